"""Reading a segment's counters without taking a slot or a lock.

One source for every view of the statistics: ``runtime_stats`` builds the
document that ``rt.stats()`` returns, that ``shmstm-stats --json`` prints and
that the text, ``--watch`` and Prometheus views render (schema:
docs/stats.md).  ``StatsReader`` is the read-only attachment the
``shmstm-stats`` tool uses: it opens the shared-memory object ``O_RDONLY``
and the C core maps it ``PROT_READ``, so it can neither take a process slot
nor a lock nor write anything; a stray write would be a SIGSEGV, not a
corrupted runtime.

Every counter is read with relaxed loads while the workload runs, so one
document is not a snapshot: counters of different slots may be a few
transactions apart (they are advisory; see native/layout.h).
"""
import time

import posix_ipc
import psutil

from .. import _core, errors
from .._core import _fast, address, error_for, ffi, lib
from ..store.durable import ring_stats

SCHEMA = "shmstm-stats/1"
ABORT_REASONS = ("locked", "validate", "user", "stale", "resource")
PROC_STATES = ("free", "active", "recovering", "recovering")   # 3: claiming, for recovery
# native/layout.h CR_*: where the slot's commit record stands (a dead slot
# that is not "idle" still holds locks until a claimer recovers it).
COMMIT_STATES = ("idle", "locking", "validating", "committed")
DEFAULT_HOT = 10
_NAME_CAP = lib.SHMSTM_MAX_NAME + 1


class _Cache:
    """What may be kept between two reads of one segment: names of named
    TVars (a named TVar is never freed, so its index keeps its name) and
    psutil handles (psutil checks a pid was not reused before answering)."""
    __slots__ = ("names", "procs")

    def __init__(self):
        self.names = {}
        self.procs = {}


def _os_view(pid, cache):
    """(alive, status, cpu_seconds, rss_bytes, started) for ``pid`` from psutil,
    or None when psutil cannot tell (another user's process)."""
    p = cache.procs.pop(pid, None) if cache is not None else None
    for fresh in (p is None, True):
        try:
            if fresh:
                p = psutil.Process(pid)
            with p.oneshot():
                # is_running() compares the creation time, so a cached handle
                # never answers for a later process that reused the pid (then
                # ask again with a fresh handle).  It is True for a zombie,
                # hence the status check.
                if not p.is_running():
                    if fresh:
                        return False, "gone", None, None, None
                    continue
                status = p.status()
                if status == psutil.STATUS_ZOMBIE:
                    return False, "zombie", None, None, None
                t = p.cpu_times()
                out = True, status, t.user + t.system, p.memory_info().rss, p.create_time()
        except psutil.NoSuchProcess:
            return False, "gone", None, None, None
        except psutil.AccessDenied:
            return None
        if cache is not None:
            cache.procs[pid] = p
        return out
    return None  # pragma: no cover - the second pass always returns


def _name_of(seg, idx, cache):
    """TVar idx's name, or None (anonymous); cached per reader."""
    name = cache.names.get(idx) if cache is not None else None
    if name is None:
        buf = ffi.new("char[]", _NAME_CAP)
        r = lib.shmstm_seg_name_of(seg, idx, buf, _NAME_CAP)
        if r >= 0:
            # Names are stored as UTF-8 with surrogatepass (Runtime.tvar).
            name = ffi.unpack(buf, r).decode("utf-8", "surrogatepass")
            if cache is not None:
                cache.names[idx] = name
    return name


WAITED_CAP = 4096          # TVars with waiters listed per read


def _waited_by_slot(seg, max_procs, cache):
    """{slot: [TVar name, or "#index" for an anonymous one]} from the TVars'
    waiter bitmaps: what each process blocked in retry() waits for.  With
    more than 64 slots a bit stands for slots s, s+64, ...: the list of each
    is then what any of them waits for."""
    idx = ffi.new("uint32_t[]", WAITED_CAP)
    bits = ffi.new("uint64_t[]", WAITED_CAP)
    n = min(lib.shmstm_seg_waited(seg, idx, bits, WAITED_CAP), WAITED_CAP)
    out = {}
    for k in range(n):
        name = _name_of(seg, idx[k], cache)
        label = name if name is not None else "#%d" % idx[k]
        w = bits[k]
        for slot in range(max_procs):
            if w >> (slot % 64) & 1:
                out.setdefault(slot, []).append(label)
    return out


def _hot_tvars(seg, hot, cache):
    if hot <= 0:
        return []
    idx = ffi.new("uint32_t[]", hot)
    gen = ffi.new("uint32_t[]", hot)
    conf = ffi.new("uint32_t[]", hot)
    n = lib.shmstm_seg_hot_tvars(seg, idx, gen, conf, hot)
    out = []
    for i in range(n):
        out.append({"index": idx[i], "generation": gen[i], "name": _name_of(seg, idx[i], cache),
                    "conflicts": conf[i]})
    return out


def runtime_stats(seg, name, ring_slots=0, hot=DEFAULT_HOT, cache=None):
    """The statistics document of a mapped segment (schema: docs/stats.md).

    ``seg`` is a ``shmstm_seg *`` (read-only or read-write mapping: nothing is
    written either way), ``ring_slots`` the segment's commit-ring size (0: not
    durable), ``hot`` how many of the most conflicted TVars to list, ``cache``
    a ``_Cache`` kept between reads of the same segment (optional)."""
    now_ns = time.time_ns()
    info = ffi.new("shmstm_seg_info *")
    lib.shmstm_seg_info_get(seg, info)
    procs = []
    waited = None
    pi = ffi.new("shmstm_proc_info *")
    for slot in range(info.max_procs):
        lib.shmstm_seg_proc_info(seg, slot, pi)
        if pi.state == 0:
            continue
        # The C answer (pid exists, same start time as when it claimed the
        # slot, not a zombie) is authoritative; psutil adds what the OS knows.
        alive = bool(pi.alive)
        status = "dead"
        cpu_s = rss = cpu_pct = None
        if alive:
            osv = _os_view(pi.pid, cache)
            if osv is not None:
                alive, status, cpu_s, rss, started = osv
                if alive and started is not None and now_ns / 1e9 > started:
                    cpu_pct = 100.0 * cpu_s / (now_ns / 1e9 - started)
            else:
                status = "unknown"
        if not alive:
            status = "dead"
        waiting_on = []
        if pi.waiting:
            if waited is None:
                waited = _waited_by_slot(seg, info.max_procs, cache)
            waiting_on = sorted(waited.get(slot, ()))
        aborts = {r: pi.aborts[i] for i, r in enumerate(ABORT_REASONS)}
        age = (now_ns - pi.attach_ns) / 1e9 if pi.attach_ns else 0.0
        done = pi.commits + pi.ro_commits
        procs.append({
            "slot": slot,
            "pid": pi.pid,
            "tid": pi.tid,
            "state": PROC_STATES[pi.state] if pi.state < len(PROC_STATES) else str(pi.state),
            "alive": alive,
            "status": status,
            "waiting": bool(pi.waiting),
            "waiting_on": waiting_on,
            "commit_state": (COMMIT_STATES[pi.rec_state] if pi.rec_state < len(COMMIT_STATES)
                             else str(pi.rec_state)),
            "cpu_seconds": cpu_s,
            "cpu_percent": cpu_pct,
            "rss_bytes": rss,
            "commits": pi.commits,
            "ro_commits": pi.ro_commits,
            "aborts": aborts,
            "aborts_total": sum(aborts.values()),
            "retries": pi.retries,
            "wakeups": pi.wakeups,
            "bytes_committed": pi.bytes_committed,
            "irrevocable": pi.irrevocable,
            # A dead slot commits nothing (its counters stay until recovery).
            "commit_rate": done / age if age > 0 and alive else 0.0,
            "commit_latency_log2_ns": [pi.lat_hist[i] for i in range(lib.SHMSTM_LAT_BUCKETS)],
            "attach_ns": pi.attach_ns,
        })
    if cache is not None:      # forget processes that left (a long --serve)
        live = {p["pid"] for p in procs if p["alive"]}
        for pid in [pid for pid in cache.procs if pid not in live]:
            del cache.procs[pid]
    classes = [
        {"block_size": info.class_size[c], "blocks": info.class_blocks[c],
         "bytes": info.class_size[c] * info.class_blocks[c]}
        for c in range(lib.SHMSTM_HEAP_CLASSES) if info.class_blocks[c]
    ]
    return {
        "schema": SCHEMA,
        "name": name,
        "time_ns": now_ns,
        "layout_version": info.layout_version,
        "runtime_id": bytes(ffi.buffer(info.runtime_id, 16)).hex(),
        "created_ns": info.created_ns,
        "creator_pid": info.creator_pid,
        "segment_size": info.seg_size,
        "clock": info.clock,
        "limits": {
            "max_tvars": info.max_tvars, "max_procs": info.max_procs,
            "heap_size": info.heap_size, "max_value_size": info.max_value_size,
        },
        "tvars": {"live": info.tvars_live, "slots_used": info.tvar_bump, "named": info.names},
        "heap": {"bump": info.heap_bump, "size": info.heap_size,
                 "used_bytes": sum(c["bytes"] for c in classes), "classes": classes},
        "irrevocable_holder_slot": info.token - 1 if info.token else None,
        "processes": procs,
        "hottest_tvars": _hot_tvars(seg, hot, cache),
        # The commit ring's facts (docs/stats.md); None without durability.
        "durability": None if not ring_slots else ring_stats(seg),
    }


class StatsReader:
    """A read-only view of runtime ``name``: no process slot, no lock, no write.

    ``wait`` bounds how long to wait (seconds) for a creator still
    initialising the segment.  Raises ``SegmentNotFoundError``,
    ``PermissionDeniedError``, ``LayoutMismatchError``,
    ``CorruptSegmentError`` or ``SegmentInitError`` with a message naming the
    runtime.  Close it (or use it as a context manager) to unmap."""

    def __init__(self, name, wait=0.5):
        _core.check_name(name)
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not wait >= 0:
            raise ValueError("wait must be a non-negative number of seconds, not %r" % (wait,))
        self.name = name
        shm_name = _core.shm_name(name)
        try:
            shm = posix_ipc.SharedMemory(shm_name, 0, read_only=True)
        except posix_ipc.ExistentialError:
            raise errors.SegmentNotFoundError(
                "no shmstm runtime named %r (no shared-memory object %s)" % (name, shm_name)
            ) from None
        except posix_ipc.PermissionsError as e:
            raise errors.PermissionDeniedError(
                "runtime %r: cannot open %s for reading: %s" % (name, shm_name, e)) from None
        params = ffi.new("shmstm_params *")
        # The mapping's only holder: written by the core on success, emptied
        # by shmstm._fast.detach in the same call that unmaps (close).
        self._box = segp = ffi.new("shmstm_seg *[1]")
        try:
            rc = lib.shmstm_seg_attach(shm.fd, 1, int(wait * 1e9), params, segp)
        finally:
            shm.close_fd()
        if rc < 0:
            err = error_for(rc, "runtime %r" % name)
            if isinstance(err, errors.LayoutMismatchError):
                err = errors.LayoutMismatchError(
                    "%s (this shmstm reads layout version %d; wrong version, or not a "
                    "shmstm segment)" % (err, lib.SHMSTM_LAYOUT_VERSION_))
            raise err
        self._ring_slots = params.ring_slots
        self._cache = _Cache()

    @property
    def _seg(self):
        box = getattr(self, "_box", None)
        s = box[0] if box is not None else ffi.NULL
        return None if s == ffi.NULL else s

    def read(self, hot=DEFAULT_HOT):
        """The statistics document (a dict, schema in docs/stats.md)."""
        if self._seg is None:
            raise errors.RuntimeClosedError("stats reader of %r is closed" % self.name)
        if not isinstance(hot, int) or isinstance(hot, bool) or hot < 0:
            raise ValueError("hot must be a non-negative int, not %r" % (hot,))
        return runtime_stats(self._seg, self.name, self._ring_slots, hot, self._cache)

    def close(self):
        box = getattr(self, "_box", None)
        if box is not None:
            _fast.detach(address(box))      # idempotent, one call

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rates(prev, cur):
    """Per-second rates between two documents of the same runtime (``--watch``).

    A slot is matched by (slot, pid, attach_ns); a slot claimed after ``prev``
    counts from its claim.  Returns the ``rates`` object of docs/stats.md."""
    dt_all = (cur["time_ns"] - prev["time_ns"]) / 1e9
    before = {(p["slot"], p["pid"], p["attach_ns"]): p for p in prev["processes"]}
    out_procs = []
    for p in cur["processes"]:
        q = before.get((p["slot"], p["pid"], p["attach_ns"]))
        if q is None:
            dt = (cur["time_ns"] - max(prev["time_ns"], p["attach_ns"])) / 1e9
            q = {"commits": 0, "ro_commits": 0, "retries": 0, "wakeups": 0,
                 "aborts": dict.fromkeys(ABORT_REASONS, 0), "cpu_seconds": None}
        else:
            dt = dt_all

        def per_s(a, b, dt=dt):
            return max(a - b, 0) / dt if dt > 0 else 0.0
        cpu = None
        if p["cpu_seconds"] is not None and q.get("cpu_seconds") is not None:
            cpu = 100.0 * per_s(p["cpu_seconds"], q["cpu_seconds"])
        aborts = {r: per_s(p["aborts"][r], q["aborts"][r]) for r in ABORT_REASONS}
        out_procs.append({
            "slot": p["slot"], "pid": p["pid"], "alive": p["alive"], "status": p["status"],
            "cpu_percent": cpu,
            "commits_per_s": per_s(p["commits"], q["commits"]),
            "ro_commits_per_s": per_s(p["ro_commits"], q["ro_commits"]),
            "aborts_per_s": aborts,
            "retries_per_s": per_s(p["retries"], q["retries"]),
            "wakeups_per_s": per_s(p["wakeups"], q["wakeups"]),
        })
    # (index, generation): a freed anonymous TVar's index is reused by a new TVar
    hot_before = {(t["index"], t["generation"]): t["conflicts"] for t in prev["hottest_tvars"]}
    hot = []
    for t in cur["hottest_tvars"]:
        was = hot_before.get((t["index"], t["generation"]))
        hot.append(dict(t, conflicts_per_s=(t["conflicts"] - was) / dt_all
                        if was is not None and dt_all > 0 else None))
    return {
        "interval_s": dt_all,
        "clock_per_s": (cur["clock"] - prev["clock"]) / dt_all if dt_all > 0 else 0.0,
        "processes": out_procs,
        "hottest_tvars": hot,
        "durability": _durability_rates(prev.get("durability"), cur.get("durability"), dt_all),
    }


def _durability_rates(prev, cur, dt):
    """Flush rate and how long the flusher would take to catch up at that rate."""
    if cur is None or prev is None or dt <= 0:
        return None
    flushed = max(cur["flushed_wv"] - prev["flushed_wv"], 0) / dt
    return {
        "committed_per_s": max(cur["committed_wv"] - prev["committed_wv"], 0) / dt,
        "flushed_per_s": flushed,
        # null: nothing flushed in the interval (idle, or a stuck flusher)
        "lag_seconds": cur["lag"] / flushed if flushed > 0 else (0.0 if cur["lag"] == 0 else None),
    }
