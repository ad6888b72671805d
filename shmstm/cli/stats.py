"""``shmstm-stats``: one screen on a running shmstm runtime, like ``mdb_stat``.

    shmstm-stats NAME                    runtime facts, processes, hot TVars
    shmstm-stats NAME --watch [SECONDS]  refresh every SECONDS (1) with rates, until Ctrl-C
    shmstm-stats NAME --json             the same as one JSON document
    shmstm-stats NAME --prometheus       Prometheus text exposition, once
    shmstm-stats NAME --serve PORT       serve /metrics on 127.0.0.1:PORT
    shmstm-stats --list [--json]         every shmstm segment on the machine

It attaches read-only (``StatsReader``): no process slot, no lock, no write,
so it never disturbs the workload.  Documentation: docs/stats.md.

Exit status: 0 ok (also on Ctrl-C), 1 the runtime cannot be read (missing,
permission, other layout version, corrupt), 2 bad usage.
"""
import argparse
import datetime
import http.server
import json
import math
import os
import shutil
import sys
import time

from .. import errors
from ..shm import segments as _segments
from ..shm.segments import list_segments
from ..stats.reader import ABORT_REASONS, DEFAULT_HOT, StatsReader, rates

PROG = "shmstm-stats"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------- formatting

def _bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d%s" % (n, unit)) if unit == "B" else ("%.1f%s" % (n, unit))
        n /= 1024.0
    return str(n)  # pragma: no cover


def _block(size):
    for unit, k in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << k and size % (1 << k) == 0:
            return "%d%s" % (size >> k, unit)
    return "%dB" % size


def _rate(x):
    if x is None or x != x:
        return "-"
    return "%.1f" % x if x < 100 else "%.0f" % x


def _pct(x):
    return "-" if x is None else "%.1f" % x


def _printable(s, width=48):
    """A TVar name made safe for a terminal (control characters and lone
    surrogates escaped) and cut to ``width``."""
    if s is None:
        return "(anonymous)"
    out = "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF
                  else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in s)
    return out if len(out) <= width else out[:width - 1] + "~"


_STATUS = {"running": "run", "sleeping": "sleep", "disk-sleep": "disk", "stopped": "stop",
           "tracing-stop": "trace", "idle": "idle", "dead": "dead", "unknown": "?"}


def _state(p):
    if p["state"] == "recovering":
        return "recov"
    if not p["alive"]:
        return "dead"
    if p["waiting"]:
        return "retry"
    return _STATUS.get(p["status"], p["status"][:5])


def _table(header, rows, left=(), width=None, drop=()):
    """Aligned rows.  With ``width``, the columns named in ``drop`` are left
    out, in that order, until the table fits; returns (lines, dropped)."""
    keep = list(range(len(header)))
    dropped = []
    while True:
        widths = {i: max(len(str(r[i])) for r in [header] + rows) for i in keep}
        total = sum(widths.values()) + 2 * (len(keep) - 1)
        if width is None or total <= width:
            break
        left_to_drop = [c for c in drop if c in header and header.index(c) in keep]
        if not left_to_drop:
            break
        keep.remove(header.index(left_to_drop[0]))
        dropped.append(left_to_drop[0])
    lines = []
    for r in [header] + rows:
        cells = [str(r[i]).ljust(widths[i]) if i in left else str(r[i]).rjust(widths[i])
                 for i in keep]
        lines.append("  ".join(cells).rstrip())
    return (lines, dropped) if width is not None else lines


def _fold(line, width, indent="    "):
    """A line cut at its two-space separators into lines of at most ``width``
    (a part longer than that stands alone)."""
    if width is None or len(line) <= width:
        return [line]
    lead = line[:len(line) - len(line.lstrip(" "))]
    parts = [p for p in line.strip(" ").split("  ") if p]
    out, cur = [], lead
    for p in parts:
        cand = cur + ("  " if cur.strip() else "") + p
        if len(cand) <= width or not cur.strip():
            cur = cand
        else:
            out.append(cur)
            cur = indent + p
    out.append(cur)
    return out


# Columns left out first when the terminal is narrow (abort reasons are then
# summed on a line of their own).
_DROP = ["STALE", "RES", "USER", "VALID", "LOCKED", "RO", "RO/s", "WAKEUPS", "WAKE/s", "RSS",
         "RETRIES", "RETRY/s", "CPU%"]


def render_text(doc, rate=None, width=None):
    """The one-screen view of a statistics document; with ``rate`` (from
    ``rates()``) the counters are per second over rate["interval_s"].  With
    ``width`` (the terminal's columns) every line fits in it: long lines are
    folded and the least needed columns left out."""
    created = datetime.datetime.fromtimestamp(doc["created_ns"] / 1e9).strftime("%Y-%m-%d %H:%M:%S")
    lim, tv, heap = doc["limits"], doc["tvars"], doc["heap"]
    procs = doc["processes"]
    lines = [
        "shmstm runtime %r  layout %d  id %s  created %s by pid %d" % (
            doc["name"], doc["layout_version"], doc["runtime_id"][:16], created, doc["creator_pid"]),
    ]
    clock = "clock %d" % doc["clock"]
    if rate is not None:
        clock += " (+%s/s)" % _rate(rate["clock_per_s"])
    holder = doc["irrevocable_holder_slot"]
    lines.append("segment %s  %s  TVars %d live of %d (%d named)  slots %d of %d  irrevocable: %s" % (
        _bytes(doc["segment_size"]), clock, tv["live"], lim["max_tvars"], tv["named"],
        len(procs), lim["max_procs"], "slot %d" % holder if holder is not None else "free"))
    classes = " ".join("%s x%d" % (_block(c["block_size"]), c["blocks"]) for c in heap["classes"])
    lines.append("heap %s used in %d blocks, %s of %s carved (%.1f%%)%s" % (
        _bytes(heap["used_bytes"]), sum(c["blocks"] for c in heap["classes"]),
        _bytes(heap["bump"]), _bytes(heap["size"]), 100.0 * heap["bump"] / heap["size"],
        (": " + classes) if classes else ""))
    lines += _durability_lines(doc["durability"], rate and rate.get("durability"), width)
    lines.append("")

    if not procs:
        lines.append("no process attached")
    elif rate is None:
        header = ["SLOT", "PID", "STATE", "CPU%", "RSS", "COMMITS", "RO", "ABORTS", "LOCKED",
                  "VALID", "USER", "STALE", "RES", "RETRIES", "WAKEUPS", "COMMIT/s"]
        rows = []
        for p in procs:
            a = p["aborts"]
            rows.append([p["slot"], p["pid"], _state(p), _pct(p["cpu_percent"]),
                         _bytes(p["rss_bytes"]), p["commits"], p["ro_commits"], p["aborts_total"],
                         a["locked"], a["validate"], a["user"], a["stale"], a["resource"],
                         p["retries"], p["wakeups"], _rate(p["commit_rate"])])
        tot = [sum(r[i] for r in rows) for i in range(5, 15)]
        rows.append(["all", "", "", "", ""] + tot + [_rate(sum(p["commit_rate"] for p in procs))])
        lines += _fitted(header, rows, width, [str(t) for t in tot[3:8]])
    else:
        header = ["SLOT", "PID", "STATE", "CPU%", "RSS", "COMMIT/s", "RO/s", "ABORT/s", "LOCKED",
                  "VALID", "USER", "STALE", "RES", "RETRY/s", "WAKE/s"]
        by_slot = {r["slot"]: r for r in rate["processes"]}
        rows, sums = [], [0.0] * 10
        for p in procs:
            r = by_slot[p["slot"]]
            a = r["aborts_per_s"]
            vals = [r["commits_per_s"], r["ro_commits_per_s"], sum(a.values())] + \
                [a[k] for k in ABORT_REASONS] + [r["retries_per_s"], r["wakeups_per_s"]]
            sums = [s + v for s, v in zip(sums, vals)]
            rows.append([p["slot"], p["pid"], _state(p), _pct(r["cpu_percent"]),
                         _bytes(p["rss_bytes"])] + [_rate(v) for v in vals])
        rows.append(["all", "", "", "", ""] + [_rate(v) for v in sums])
        lines += _fitted(header, rows, width, [_rate(v) for v in sums[3:8]], "/s")

    waiting = [p for p in procs if p["waiting"]]
    if waiting:
        lines.append("")
        lines.append("waiting in retry() for a change to:")
        for p in waiting:
            on = ", ".join(_printable(n, 40) for n in p["waiting_on"]) or "(nothing found)"
            lines += _fold("  slot %d pid %d:  %s" % (p["slot"], p["pid"], on.replace(", ", ",  ")),
                           width)

    lines.append("")
    hot = doc["hottest_tvars"] if rate is None else rate["hottest_tvars"]
    name_w = 48 if width is None else max(16, min(48, width - 24))
    if not hot:
        lines.append("hottest TVars: no conflicts")
    else:
        lines.append("hottest TVars by conflicts:")
        if rate is None:
            rows = [[t["conflicts"], t["index"], _printable(t["name"], name_w)] for t in hot]
            lines += ["  " + s for s in _table(["CONFLICTS", "INDEX", "NAME"], rows, left={2})]
        else:
            rows = [[t["conflicts"], _rate(t["conflicts_per_s"]), t["index"],
                     _printable(t["name"], name_w)] for t in hot]
            lines += ["  " + s for s in _table(["CONFLICTS", "/s", "INDEX", "NAME"], rows, left={3})]
    if width is not None:
        lines = [f for ln in lines for f in _fold(ln, width)]
    return "\n".join(lines) + "\n"


def _fitted(header, rows, width, reasons, unit=""):
    """The process table, fitted to ``width``; if the abort reasons' columns
    had to go, their totals follow on a line of their own."""
    if width is None:
        return _table(header, rows, left={2})
    lines, dropped = _table(header, rows, left={2}, width=width, drop=_DROP)
    if any(r in dropped for r in ("LOCKED", "VALID", "USER", "STALE", "RES")):
        lines.append("aborts%s by reason: %s" % (unit, "  ".join(
            "%s %s" % (k, v) for k, v in zip(ABORT_REASONS, reasons))))
    return lines


# ---------------------------------------------------------------- Prometheus

def _esc(v):
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


class _Families:
    def __init__(self):
        self.fams = []

    def add(self, name, typ, help_, samples):
        self.fams.append((name, typ, help_, samples))

    def text(self):
        out = []
        for name, typ, help_, samples in self.fams:
            out.append("# HELP %s %s" % (name, help_))
            out.append("# TYPE %s %s" % (name, typ))
            for sname, labels, value in samples:
                lab = ",".join('%s="%s"' % (k, _esc(v)) for k, v in labels)
                out.append("%s{%s} %s" % (sname, lab, _num(value)))
        return "\n".join(out) + "\n"


def _middle(s, width):
    """``s`` cut in the middle to ``width`` characters (a long path)."""
    if width is None or len(s) <= width:
        return s
    keep = max(width - 3, 8)
    return s[:keep // 2] + "..." + s[len(s) - (keep - keep // 2):]


def _durability_lines(dur, rate, width=None):
    if dur is None:
        return ["durability: none"]
    path = dur["path"] if dur["path"] is not None else "(path not stored yet)"
    lines = ["durability: LMDB at %s%s" % (
        _middle(path, None if width is None else width - len("durability: LMDB at ")),
        "" if dur["ready"] else "  (creator still loading LMDB)")]
    fill = "ring %d/%d slots used (%.1f%%)" % (
        dur["ring_fill"], dur["ring_slots"], 100.0 * dur["ring_fill"] / max(dur["ring_slots"], 1))
    ver = "committed v%d  flushed v%d  lag %d" % (dur["committed_wv"], dur["flushed_wv"], dur["lag"])
    if rate is not None:
        ver += " (%s s)" % ("-" if rate["lag_seconds"] is None else "%.2f" % rate["lag_seconds"])
        ver += "  flushing %s/s" % _rate(rate["flushed_per_s"])
    lines.append("  %s  %s  ring-full waits %d  late wake-ups %d" % (
        fill, ver, dur["ring_full_waits"], dur["late_wakeups"]))
    fl = "  flusher: %s" % dur["flusher_state"]
    if dur["flusher_pid"]:
        fl += " (pid %d)" % dur["flusher_pid"]
    if dur["group_commit"] is not None:
        fl += "  group commit: %s (%s)" % (
            "waits for stragglers" if dur["group_commit"] == "wait" else "writes at once",
            "SHMSTM_FLUSH_GROUP" if dur["group_commit_fixed"] else "measured")
    if dur["error"]:
        fl += "  ERROR: %s" % dur["error_message"]
    lines.append(fl)
    return lines


def prometheus_text(doc):
    """The statistics document in the Prometheus text exposition format 0.0.4
    (metric list: docs/stats.md)."""
    f = _Families()
    rt = [("runtime", doc["name"])]

    def one(name, typ, help_, value, extra=()):
        f.add(name, typ, help_, [(name, rt + list(extra), value)])

    one("shmstm_info", "gauge", "Runtime identity (always 1).", 1,
        [("layout_version", doc["layout_version"]), ("runtime_id", doc["runtime_id"])])
    one("shmstm_segment_size_bytes", "gauge", "Size of the shared-memory segment.",
        doc["segment_size"])
    one("shmstm_clock_total", "counter",
        "Global version clock: advances once per writer commit (and per commit "
        "that failed validation after taking a write version).", doc["clock"])
    one("shmstm_tvars", "gauge", "Live TVars.", doc["tvars"]["live"])
    one("shmstm_tvars_named", "gauge", "Named TVars.", doc["tvars"]["named"])
    one("shmstm_tvars_max", "gauge", "TVar table size (max_tvars).", doc["limits"]["max_tvars"])
    one("shmstm_heap_size_bytes", "gauge", "Size of the value heap.", doc["heap"]["size"])
    one("shmstm_heap_used_bytes", "gauge", "Bytes in live heap blocks.", doc["heap"]["used_bytes"])
    one("shmstm_heap_carved_bytes", "gauge",
        "Heap bytes ever carved into blocks (the bump pointer).", doc["heap"]["bump"])
    f.add("shmstm_heap_blocks", "gauge", "Live heap blocks by block size.",
          [("shmstm_heap_blocks", rt + [("block_bytes", c["block_size"])], c["blocks"])
           for c in doc["heap"]["classes"]])
    one("shmstm_process_slots", "gauge", "Process slots in use.", len(doc["processes"]))
    one("shmstm_process_slots_max", "gauge", "Process slots (max_procs).",
        doc["limits"]["max_procs"])
    one("shmstm_irrevocable_held", "gauge",
        "1 while a transaction holds the irrevocable token.",
        int(doc["irrevocable_holder_slot"] is not None))
    dur = doc["durability"]
    one("shmstm_durable", "gauge", "1 for a durable runtime.", int(dur is not None))
    if dur is not None:
        one("shmstm_ring_slots", "gauge", "Slots of the commit ring.", dur["ring_slots"])
        one("shmstm_ring_used_slots", "gauge", "Commits in the ring not yet in LMDB.",
            dur["ring_fill"])
        one("shmstm_committed_version", "gauge", "Write version of the last commit (the clock).",
            dur["committed_wv"])
        one("shmstm_flushed_version", "gauge",
            "Write version up to which every commit is in LMDB.", dur["flushed_wv"])
        one("shmstm_flusher_lag_versions", "gauge", "Committed minus flushed versions.",
            dur["lag"])
        one("shmstm_flusher_up", "gauge", "1 while the flusher process is alive.",
            int(dur["flusher_alive"]))
        # Summed over every slot: a slot's ring_waits is kept when it changes
        # owner (native/txn.c), so the sum never drops: a counter.
        one("shmstm_ring_full_waits_total", "counter",
            "Commits that waited for room in a full ring (since the segment was created).",
            dur["ring_full_waits"])
        one("shmstm_sync_late_wakeups_total", "counter",
            "Sync commits that saw their write flushed only at a 50 ms re-check: a wake-up "
            "lost or late (since the segment was created).", dur["late_wakeups"])
        if dur["group_commit"] is not None:
            one("shmstm_flusher_group_wait", "gauge",
                "1 while the flusher's group commit waits for a group's stragglers, 0 while "
                "it writes at once.", int(dur["group_commit"] == "wait"))
        one("shmstm_durable_error", "gauge",
            "Code of the flusher's last LMDB failure (0: none).", dur["error"] or 0)

    procs = doc["processes"]

    def per(p):
        # attach_ns: a slot's counters restart at zero when it gets a new owner,
        # also one with the same pid (another thread, or a close and re-open),
        # so each claim is its own series; a counter never goes down in one.
        return rt + [("slot", p["slot"]), ("pid", p["pid"]), ("attach_ns", p["attach_ns"])]

    def fam(name, typ, help_, key):
        f.add(name, typ, help_, [(name, per(p), key(p)) for p in procs if key(p) is not None])

    fam("shmstm_process_alive", "gauge",
        "1 if the slot's process is alive (same pid and start time, not a zombie).",
        lambda p: int(p["alive"]))
    fam("shmstm_process_waiting", "gauge", "1 while the slot sleeps in retry().",
        lambda p: int(p["waiting"]))
    fam("shmstm_commits_total", "counter", "Writer transactions committed.",
        lambda p: p["commits"])
    fam("shmstm_readonly_commits_total", "counter", "Read-only transactions committed.",
        lambda p: p["ro_commits"])
    f.add("shmstm_aborts_total", "counter", "Aborted transaction attempts by reason.",
          [("shmstm_aborts_total", per(p) + [("reason", r)], p["aborts"][r])
           for p in procs for r in ABORT_REASONS])
    fam("shmstm_retries_total", "counter", "Blocking waits entered by retry().",
        lambda p: p["retries"])
    fam("shmstm_wakeups_total", "counter", "Blocking waits ended by a change.",
        lambda p: p["wakeups"])
    fam("shmstm_committed_bytes_total", "counter", "Bytes of heap values committed.",
        lambda p: p["bytes_committed"])
    fam("shmstm_irrevocable_total", "counter",
        "Transactions run holding the irrevocable token.", lambda p: p["irrevocable"])
    fam("shmstm_process_cpu_seconds_total", "counter",
        "User and system CPU time of the slot's process (shared by its slots).",
        lambda p: p["cpu_seconds"])
    fam("shmstm_process_resident_memory_bytes", "gauge",
        "Resident memory of the slot's process.", lambda p: p["rss_bytes"])
    lat = []
    for p in procs:
        hist = p["commit_latency_log2_ns"]
        acc = 0
        # Core bucket i < last counts durations (whole ns) with floor(log2(ns)) == i,
        # at most 2**(i+1) - 1 ns: that is its cumulative bucket's "le".  The last
        # core bucket counts every longer call (no upper bound): it is only in +Inf.
        for i, n in enumerate(hist[:-1]):
            acc += n
            lat.append(("shmstm_commit_latency_seconds_bucket",
                        per(p) + [("le", repr(((1 << (i + 1)) - 1) / 1e9))], acc))
        acc += hist[-1]
        lat.append(("shmstm_commit_latency_seconds_bucket", per(p) + [("le", "+Inf")], acc))
        lat.append(("shmstm_commit_latency_seconds_count", per(p), acc))
    f.add("shmstm_commit_latency_seconds", "histogram",
          "Duration of writer commit calls (log2 buckets; no _sum: the core keeps none).", lat)
    f.add("shmstm_tvar_conflicts_total", "counter",
          "Aborts caused by a TVar, for the most conflicted TVars.",
          # generation: a freed anonymous TVar's index is reused with conflicts from 0
          [("shmstm_tvar_conflicts_total",
            rt + [("index", t["index"]), ("generation", t["generation"]),
                  ("name", t["name"] or "")], t["conflicts"])
           for t in doc["hottest_tvars"]])
    return f.text()


# ---------------------------------------------------------------- modes

def _show_frame(text, tty):
    if tty:
        sys.stdout.write("\x1b[H\x1b[2J" + text)
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _width():
    """The terminal's columns when the text goes to a terminal (or COLUMNS
    is set); None (no limit) when it goes to a file or a pipe."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return shutil.get_terminal_size((80, 24)).columns
    return None


def _watch(reader, args):
    tty = sys.stdout.isatty() and not args.json
    prev = reader.read(args.hot)
    n = 0
    while args.count is None or n < args.count:
        time.sleep(args.watch)          # the refresh period
        cur = reader.read(args.hot)
        r = rates(prev, cur)
        if args.json:
            cur_out = dict(cur, rates=r)
            sys.stdout.write(json.dumps(cur_out, sort_keys=True) + "\n")
            sys.stdout.flush()
        else:
            width = _width()
            head = "%s %s:  every %gs, %s  (Ctrl-C quits)" % (
                PROG, reader.name, args.watch, time.strftime("%H:%M:%S"))
            head = "\n".join(_fold(head, width)) + "\n"
            _show_frame(head + render_text(cur, r, width), tty)
        prev = cur
        n += 1
    return 0


def _serve(reader, args):
    hot = args.hot

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics is served")
                return
            if self.path.startswith("/metrics"):
                body = prometheus_text(reader.read(hot)).encode("utf-8")
                ctype = CONTENT_TYPE
            else:
                body = b"shmstm-stats: metrics at /metrics\n"
                ctype = "text/plain; charset=utf-8"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *a):   # no per-request noise on stderr
            pass

    try:
        server = http.server.HTTPServer(("127.0.0.1", args.serve), Handler)
    except OSError as e:
        raise _UsageError("cannot listen on 127.0.0.1:%d: %s" % (args.serve, e.strerror or e)) from None
    with server:
        print("%s: serving runtime %r at http://127.0.0.1:%d/metrics" % (
            PROG, reader.name, server.server_address[1]), flush=True)
        server.serve_forever()
    return 0


def _list(args):
    """``--list``: every shmstm segment on the machine with its processes."""
    segs = list_segments()
    if args.json:
        sys.stdout.write(json.dumps({"schema": "shmstm-stats-list/1", "segments": segs},
                                    indent=2, sort_keys=True, default=str) + "\n")
    else:
        sys.stdout.write(render_list(segs))
    sys.stdout.flush()
    return 0


def render_list(segs):
    """The text view of ``--list``: a row per segment, an indented row per
    process slot (dead ones flagged), then a count."""
    if not segs:
        return "no shmstm segment on this machine\n"
    rows = []
    for d in segs:
        if d["creating"]:
            c = d["creating"]
            state = "INITIALISING" if c["alive"] else "STALE (creator died)"
            note = "creating %r, creator pid %d %s" % (c["runtime"], c["pid"],
                                                     "alive" if c["alive"] else "dead")
        else:
            state = "STALE" if d["stale"] else "in use"
            note = ""
        if d["error"]:
            note = (note + "  " if note else "") + d["error"]
        if _segments.lock_note(d):
            note = (note + "  " if note else "") + _segments.lock_note(d)
        rows.append([d["name"], _bytes(d["size"]), "%d/%d" % (d["live_processes"],
                     len(d["processes"])), str(len(d["mapped_by"])), state, note])
        for p in d["processes"]:
            rows.append(["  slot %d" % p["slot"], "", "", "",
                         "pid %d %s" % (p["pid"], "alive" if p["alive"] else "DEAD"), ""])
    lines = _table(["NAME", "SIZE", "LIVE/SLOTS", "MAPPED", "STATE", "NOTE"], rows,
                   left={0, 4, 5})
    stale = sum(1 for d in segs if d["stale"])
    lines.append("")
    lines.append("%d segment(s), %d stale%s" % (
        len(segs), stale, " (remove with: shmstm-cleanup)" if stale else ""))
    return "\n".join(lines) + "\n"


class _UsageError(Exception):
    pass


def _seconds(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % s) from None
    if not (0.01 <= v <= 86400):
        raise argparse.ArgumentTypeError("SECONDS must be between 0.01 and 86400, not %r" % s)
    return v


def _nonneg(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % s) from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0, not %d" % v)
    return v


def _port(s):
    v = _nonneg(s)
    if v > 65535:
        raise argparse.ArgumentTypeError("not a TCP port: %d" % v)
    return v


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Statistics of a running shmstm runtime, read without taking a "
                    "process slot or a lock (docs/stats.md).",
        epilog="Exit status: 0 ok (also on Ctrl-C), 1 the runtime cannot be read, 2 bad usage.")
    ap.add_argument("name", metavar="NAME", nargs="?",
                    help="runtime name (the segment /dev/shm/shmstm.NAME)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="one JSON document (with --watch: one per line, with rates)")
    out.add_argument("--prometheus", action="store_true",
                     help="print the Prometheus text exposition once")
    out.add_argument("--serve", metavar="PORT", type=_port,
                     help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics "
                          "(0: any free port, printed)")
    ap.add_argument("--watch", metavar="SECONDS", nargs="?", type=_seconds, const=1.0,
                    help="refresh every SECONDS (default 1) showing per-second rates, "
                         "until Ctrl-C")
    ap.add_argument("--count", metavar="N", type=_nonneg,
                    help="with --watch: stop after N refreshes")
    ap.add_argument("--hot", metavar="N", type=_nonneg, default=DEFAULT_HOT,
                    help="how many of the most conflicted TVars to show (default %d)"
                         % DEFAULT_HOT)
    ap.add_argument("--list", action="store_true",
                    help="every shmstm segment on the machine with its processes; "
                         "dead processes and stale segments flagged (text or --json)")
    args = ap.parse_args(argv)
    if args.list:
        if args.name or args.prometheus or args.serve is not None or args.watch is not None:
            ap.error("--list takes no NAME and no other mode than --json")
    elif not args.name:
        ap.error("the runtime NAME is required")
    if args.watch is not None and (args.prometheus or args.serve is not None):
        ap.error("--watch goes with the text or --json view, not with Prometheus output")
    if args.count is not None and args.watch is None:
        ap.error("--count goes with --watch")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reader = None
    try:
        if args.list:
            return _list(args)
        reader = StatsReader(args.name)
        if args.watch is not None:
            return _watch(reader, args)
        if args.serve is not None:
            return _serve(reader, args)
        doc = reader.read(args.hot)
        if args.json:
            sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        elif args.prometheus:
            sys.stdout.write(prometheus_text(doc))
        else:
            sys.stdout.write(render_text(doc, width=_width()))
        sys.stdout.flush()
        return 0
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader of our output went away (| head): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (errors.Error, ValueError, OSError, _UsageError) as e:
        msg = str(e).replace("\n", " ")
        sys.stderr.write("%s: error: %s\n" % (PROG, msg))
        return 1
    finally:
        if reader is not None:
            reader.close()


if __name__ == "__main__":
    sys.exit(main())
