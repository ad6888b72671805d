"""shmstm-stats modes (--watch, --serve) and its read-only promise.

The read-only promise is checked three ways: the running tool's only mapping of
the segment is ``r--s`` (so any write would be a SIGSEGV, not a change); the
segment's bytes are identical before and after the tool ran; and it works on a
runtime whose only process slot is taken (it needs none).
"""
import hashlib
import json
import multiprocessing as mp
import os
import re
import select
import signal
import urllib.error
import urllib.request

import pytest

import _stats_workers as W
from _helpers import LIMITS
from _tool import run_tool, start_tool, text_rows

WAIT = 60.0


def _readline(proc, what, timeout=WAIT):
    """The tool's next stdout line, failing (not hanging) after ``timeout``."""
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    if not r:
        proc.kill()
        raise AssertionError("no %s from the tool within %.0f s (stderr: %s)"
                             % (what, timeout, proc.communicate()[1]))
    return proc.stdout.readline()


def _interrupt(proc):
    """Ctrl-C the tool; it must exit 0 without a traceback."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Traceback" not in err and err == "", err
    return out


@pytest.fixture
def spinner(runtime):
    """A spawned worker committing (writer and read-only) and aborting (user)
    as fast as it can while the test runs (and this process attached, idle)."""
    runtime.tvar("idle", 0)                           # claims this process's slot
    ctx = mp.get_context("spawn")
    ctl, ctl_child = ctx.Pipe()
    stop, stop_child = ctx.Pipe()
    p = ctx.Process(target=W.run, args=(ctl_child, "spinner", ((runtime.name,), stop_child)),
                    daemon=True)
    p.start()
    try:
        assert stop.poll(WAIT) and stop.recv() == "started"
        yield p.pid
        stop.send("stop")
        assert ctl.poll(WAIT)
        msg = ctl.recv()
        assert msg[0] == "done", msg
        ctl.send("exit")
    finally:
        p.join(WAIT)
        if p.is_alive():
            p.kill()
            p.join()


def _shows(cell, x):
    """A text cell shows rate ``x`` (one decimal below 100, none from 100)."""
    return abs(float(cell) - x) <= (0.05 if x < 100 else 0.5) + 1e-9


def test_watch_json_rates_match_totals(runtime, spinner):
    from shmstm.stats.reader import ABORT_REASONS
    from shmstm.cli.stats import render_text

    res = run_tool(runtime.name, "--watch", "0.2", "--count", "3", "--json")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    docs = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert len(docs) == 3
    for prev, cur in zip(docs, docs[1:]):
        r = cur["rates"]
        dt = (cur["time_ns"] - prev["time_ns"]) / 1e9
        assert r["interval_s"] == pytest.approx(dt) and dt >= 0.2
        p0 = next(p for p in prev["processes"] if p["pid"] == spinner)
        p1 = next(p for p in cur["processes"] if p["pid"] == spinner)
        rp = next(p for p in r["processes"] if p["pid"] == spinner)
        assert p1["commits"] > p0["commits"]          # it kept committing
        assert p1["ro_commits"] > p0["ro_commits"]    # ... read-only too
        assert p1["aborts"]["user"] > p0["aborts"]["user"]   # ... and aborting
        for key in ("commits", "ro_commits", "retries", "wakeups"):
            assert rp[key + "_per_s"] == pytest.approx((p1[key] - p0[key]) / dt), key
        for reason in ABORT_REASONS:
            assert rp["aborts_per_s"][reason] == pytest.approx(
                (p1["aborts"][reason] - p0["aborts"][reason]) / dt), reason
        assert rp["cpu_percent"] is not None and rp["cpu_percent"] >= 0
        # The text frame of the same two documents shows these rates in its columns.
        row = text_rows(render_text(cur, r))[spinner]
        assert _shows(row["COMMIT/s"], rp["commits_per_s"]), row
        assert _shows(row["RO/s"], rp["ro_commits_per_s"]), row
        assert _shows(row["ABORT/s"], sum(rp["aborts_per_s"].values())), row
        assert _shows(row["USER"], rp["aborts_per_s"]["user"]), row
        assert _shows(row["VALID"], 0) and _shows(row["RETRY/s"], 0), row
        assert r["clock_per_s"] == pytest.approx((cur["clock"] - prev["clock"]) / dt)
        mine = next(p for p in r["processes"] if p["pid"] == os.getpid())
        assert mine["commits_per_s"] == 0            # this process is idle meanwhile


def test_watch_text_frames(runtime, spinner):
    res = run_tool(runtime.name, "--watch", "0.2", "--count", "2")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    frames = res.stdout.split("shmstm-stats %s:  every 0.2s" % runtime.name)
    assert frames[0] == "" and len(frames) == 3
    for f in frames[1:]:
        rows = text_rows(f)
        assert float(rows[spinner]["COMMIT/s"]) > 0
        assert float(rows[os.getpid()]["COMMIT/s"]) == 0
        assert re.search(r"clock \d+ \(\+[\d.]+/s\)", f)


def test_watch_ctrl_c_exits_cleanly(runtime):
    proc = start_tool(runtime.name, "--watch", "0.1")
    try:
        assert _readline(proc, "first frame").startswith("shmstm-stats %s:  every 0.1s" % runtime.name)
        _interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _maps_of(pid, path):
    with open("/proc/%d/maps" % pid) as f:
        return [ln.split()[1] for ln in f if ln.rstrip("\n").endswith(path)]


def test_serve_metrics_read_only_mapping(runtime):
    from prometheus_client.parser import text_string_to_metric_families

    runtime.tvar("x", 1).value = 2
    proc = start_tool(runtime.name, "--serve", "0")
    try:
        line = _readline(proc, "the serving line")
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert m, line
        url = m.group(0)
        # The tool's view of the segment: mapped, and only ever read-only shared.
        perms = _maps_of(proc.pid, "/dev/shm/shmstm." + runtime.name)
        assert perms and all(p == "r--s" for p in perms), perms
        with urllib.request.urlopen(url, timeout=WAIT) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        mine = [s for s in fams["shmstm_commits"].samples if s.labels["pid"] == str(os.getpid())]
        assert [s.value for s in mine] == [1]
        runtime.tvar("x").value = 3                    # a scrape is a fresh read
        with urllib.request.urlopen(url, timeout=WAIT) as resp:
            fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        mine = [s for s in fams["shmstm_commits"].samples if s.labels["pid"] == str(os.getpid())]
        assert [s.value for s in mine] == [2]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.replace("/metrics", "/nothing"), timeout=WAIT)
        assert e.value.code == 404
        _interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _digest(name):
    with open("/dev/shm/shmstm." + name, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_tool_changes_no_byte(runtime):
    runtime.tvar("a", "some value").value = "another"
    runtime.new_tvar([1, 2, 3])
    before = _digest(runtime.name)
    for args in ([], ["--json"], ["--prometheus"], ["--watch", "0.05", "--count", "2"]):
        res = run_tool(runtime.name, *args)
        assert res.returncode == 0, res.stderr
    assert _digest(runtime.name) == before


def test_needs_no_process_slot(segname):
    """max_procs=1 and the slot is taken: the tool still reads everything."""
    import shmstm

    with shmstm.open(segname, max_procs=1, **LIMITS) as rt:
        rt.tvar("n", 0).value = 7                      # claims the only slot
        res = run_tool(segname, "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["limits"]["max_procs"] == 1
        assert [(p["pid"], p["commits"]) for p in doc["processes"]] == [(os.getpid(), 1)]
        assert rt.tvar("n").value == 7                 # and the owner carries on


def test_reads_a_segment_it_may_not_write(runtime):
    """Mode 0400: the tool opens the object O_RDONLY.  (As root the kernel would
    allow a writable open too; the maps test above covers that case.)"""
    path = "/dev/shm/shmstm." + runtime.name
    os.chmod(path, 0o400)
    try:
        res = run_tool(runtime.name, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["name"] == runtime.name
    finally:
        os.chmod(path, 0o600)
