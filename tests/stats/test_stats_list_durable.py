"""shmstm-stats --list and the durability section, run as a user runs the tool.

* ``--list``: every segment on the machine with its process slots; a SIGKILLed
  process shows as dead and a segment only dead processes used is flagged
  stale, while a segment with a live process is "in use" (checked in the JSON
  and the text view).
* Durable runtime: the tool reports the LMDB path, ring size, committed and
  flushed versions and the flusher; with the flusher SIGSTOPped, async commits
  pile up and the tool shows exactly that lag (JSON, text and Prometheus, parsed
  with prometheus_client); a SIGKILLed flusher shows as dead.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import shmstm
from _helpers import LIMITS
from _tool import run_tool

WAIT = 60.0
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(shmstm.__file__)))

HOLDER = """
import sys, shmstm
rt = shmstm.open(sys.argv[1], max_tvars=%d, heap_size=%d)
rt.tvar("x", 0).value = 1          # a transaction: this process takes a slot
print("ready", flush=True)
sys.stdin.read()                   # until the test closes our stdin (or kills us)
rt.close()
""" % (LIMITS["max_tvars"], LIMITS["heap_size"])


def _holder(name):
    """A process attached to runtime ``name`` (holding a slot) until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd="/",
                         env=dict(os.environ, PYTHONPATH=PKG_PARENT))
    assert p.stdout.readline().strip() == "ready", "holder of %s did not start" % name
    return p


def _wait(cond, what, timeout=WAIT):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for " + what
        time.sleep(0.01)


def _json(*args):
    r = run_tool(*args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_list_flags_dead_processes_and_stale_segments(segname):
    live, dead = segname + "-live", segname + "-dead"
    holders = []
    try:
        a = _holder(live)
        holders.append(a)
        b = _holder(dead)
        holders.append(b)
        b.kill()                        # kill -9 while attached: its slot stays claimed
        b.wait()                        # reaped: the kernel reports it gone

        doc = _json("--list", "--json")
        assert doc["schema"] == "shmstm-stats-list/1"
        segs = {d["name"]: d for d in doc["segments"]}
        assert live in segs and dead in segs, sorted(segs)
        L, D = segs[live], segs[dead]
        assert L["layout_ok"] and L["error"] is None
        assert L["processes"] == [{"slot": 0, "pid": a.pid, "alive": True}]
        assert L["live_processes"] == 1 and not L["stale"]
        assert a.pid in L["mapped_by"]
        assert D["layout_ok"]
        assert [(p["pid"], p["alive"]) for p in D["processes"]] == [(b.pid, False)]
        assert D["live_processes"] == 0 and D["stale"] and D["mapped_by"] == []

        r = run_tool("--list")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        i = next(k for k, ln in enumerate(lines) if ln.split()[:1] == [live])
        assert "in use" in lines[i] and "1/1" in lines[i]
        assert lines[i + 1].split() == ["slot", "0", "pid", str(a.pid), "alive"]
        j = next(k for k, ln in enumerate(lines) if ln.split()[:1] == [dead])
        assert "STALE" in lines[j] and "0/1" in lines[j]
        assert lines[j + 1].split()[2:] == ["pid", str(b.pid), "DEAD"]
        assert "stale (remove with: shmstm-cleanup)" in lines[-1]

        # The listing is what cleanup acts on: the stale one goes, the live one stays.
        assert shmstm.cleanup_segments(names=[live, dead]) == [dead]
    finally:
        for p in holders:
            if p.poll() is None:
                p.stdin.close()
                p.wait(WAIT)
        for n in (live, dead):
            try:
                shmstm.unlink(n)
            except shmstm.Error:
                pass


@pytest.fixture
def durable_rt(segname, tmp_path):
    path = str(tmp_path / "lmdb")
    rt = shmstm.open(segname, path=path, **LIMITS)
    try:
        yield rt, path
    finally:
        rt.close()


def test_durability_section(durable_rt):
    from prometheus_client.parser import text_string_to_metric_families

    rt, path = durable_rt
    a = rt.tvar("a", 0)
    with shmstm.durability("sync"):
        a.value = 1                      # returns once in LMDB: the flusher is running
    mine = rt.stats()["durability"]
    fpid = mine["flusher_pid"]
    assert mine["mode"] == "async" and mine["flusher_alive"] and fpid

    d = _json(rt.name, "--json")["durability"]
    assert d["path"] == os.path.realpath(path) and d["ready"]
    assert d["mode"] is None            # a per-process choice: not in the segment
    assert d["ring_slots"] == mine["ring_slots"] > 0
    assert d["flusher_pid"] == fpid and d["flusher_alive"] and d["flusher_state"] == "running"
    assert d["committed_wv"] == d["flushed_wv"] == mine["committed_wv"]
    assert d["lag"] == d["ring_fill"] == 0 and d["error"] is None
    # One sync commit measures nothing: the flusher keeps its first choice.
    assert d["group_commit"] == "wait" and d["group_commit_fixed"] is False
    assert mine["group_commit"] == "wait"

    os.kill(fpid, signal.SIGSTOP)        # the flusher stops draining the ring
    try:
        for _ in range(10):
            a.value += 1                 # async: returns at the commit point
        d = _json(rt.name, "--json")["durability"]
        assert d["committed_wv"] == mine["committed_wv"] + 10
        assert d["flushed_wv"] == mine["flushed_wv"]
        assert d["lag"] == d["ring_fill"] == 10
        assert d["flusher_state"] == "running"     # stopped is alive: never "dead"

        r = run_tool(rt.name)
        assert r.returncode == 0, r.stderr
        assert "durability: LMDB at %s" % os.path.realpath(path) in r.stdout
        assert "ring 10/%d slots used" % d["ring_slots"] in r.stdout
        assert "committed v%d  flushed v%d  lag 10" % (d["committed_wv"], d["flushed_wv"]) \
            in r.stdout
        assert "flusher: running (pid %d)  group commit: waits for stragglers (measured)" % fpid \
            in r.stdout

        r = run_tool(rt.name, "--prometheus")
        assert r.returncode == 0, r.stderr
        samples = {s.name: s.value for fam in text_string_to_metric_families(r.stdout)
                   for s in fam.samples if s.labels.get("runtime") == rt.name}
        assert samples["shmstm_durable"] == 1
        assert samples["shmstm_flusher_lag_versions"] == 10
        assert samples["shmstm_ring_used_slots"] == 10
        assert samples["shmstm_flushed_version"] == d["flushed_wv"]
        assert samples["shmstm_committed_version"] == d["committed_wv"]
        assert samples["shmstm_flusher_up"] == 1
        assert samples["shmstm_flusher_group_wait"] == 1
    finally:
        os.kill(fpid, signal.SIGCONT)
    _wait(lambda: rt.stats()["durability"]["lag"] == 0, "the flusher to drain the ring")
    assert shmstm.read_durable(path)["values"]["a"] == 11

    os.kill(fpid, signal.SIGKILL)
    _wait(lambda: not rt.stats()["durability"]["flusher_alive"], "the kernel to report it gone")
    d = _json(rt.name, "--json")["durability"]
    assert d["flusher_state"] == "dead" and not d["flusher_alive"] and d["flusher_pid"] == fpid
    r = run_tool(rt.name)
    assert "flusher: dead (pid %d)" % fpid in r.stdout


def test_group_commit_choice_set_by_the_environment(segname, tmp_path, monkeypatch):
    """SHMSTM_FLUSH_GROUP=nowait reaches the flusher, which states it in the
    segment: the JSON, text and Prometheus views show a fixed "writes at once"."""
    from prometheus_client.parser import text_string_to_metric_families

    monkeypatch.setenv("SHMSTM_FLUSH_GROUP", "nowait")
    rt = shmstm.open(segname, path=str(tmp_path / "lmdb"), **LIMITS)
    try:
        with shmstm.durability("sync"):
            rt.tvar("a", 0).value = 1        # returns once in LMDB: the flusher is running
        d = _json(rt.name, "--json")["durability"]
        assert d["group_commit"] == "nowait" and d["group_commit_fixed"] is True
        r = run_tool(rt.name)
        assert r.returncode == 0, r.stderr
        assert "group commit: writes at once (SHMSTM_FLUSH_GROUP)" in r.stdout
        r = run_tool(rt.name, "--prometheus")
        samples = {s.name: s.value for fam in text_string_to_metric_families(r.stdout)
                   for s in fam.samples if s.labels.get("runtime") == rt.name}
        assert samples["shmstm_flusher_group_wait"] == 0
    finally:
        rt.close()
