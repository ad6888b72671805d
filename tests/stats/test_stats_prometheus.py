"""Prometheus conventions of shmstm-stats, checked on real processes.

* A counter never goes down within one series.  Per-slot counters restart at
  zero when a slot gets a new owner, so the per-slot series carry the claim
  (``attach_ns``) besides slot and pid: a process that closes and re-opens the
  runtime takes the same slot with the same pid, and must get a new series.
* A freed anonymous TVar's index is reused by the next new TVar, with
  conflicts from zero: the conflicts series carry the TVar's generation too
  (and --watch rates match TVars by index and generation).
* ``shmstm_ring_full_waits_total`` sums every slot's count, which a slot keeps
  when its owner leaves and another process claims it: it must not drop.
* The latency histogram's last core bucket (>= 2**31 ns) has no upper bound: a
  commit that waited that long for ring room (flusher SIGSTOPped) is counted in
  ``le="+Inf"`` only, and every bucket is cumulative.
"""
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import time

import pytest

import _stats_workers as W
import shmstm
from _helpers import LIMITS
from _tool import check_latency_histogram, run_tool

WAIT = 60.0
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(shmstm.__file__)))
SLOW = 2.3          # seconds a commit is held waiting: more than 2**31 ns

COMMITTER = """
import sys, shmstm
rt = shmstm.open(sys.argv[1], path=sys.argv[2], max_tvars=%d, heap_size=%d)
x = rt.tvar("x", 0)
for i in range(int(sys.argv[3])):
    x.value = i                    # async: one of them waits while the ring is full
print("done", flush=True)
sys.stdin.read()                   # attached until the test closes our stdin
rt.close()
""" % (LIMITS["max_tvars"], LIMITS["heap_size"])


def _prom(name):
    from prometheus_client.parser import text_string_to_metric_families

    r = run_tool(name, "--prometheus")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return {f.name: f for f in text_string_to_metric_families(r.stdout)}


def _json(name):
    import json

    r = run_tool(name, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return json.loads(r.stdout)


def _series(fams, family, sample=None):
    """{(slot, pid, attach_ns): value} of a per-slot family."""
    sample = sample or family
    return {(s.labels["slot"], s.labels["pid"], s.labels["attach_ns"]): s.value
            for s in fams[family].samples if s.name == sample}


def _readline(proc, what):
    r, _, _ = select.select([proc.stdout], [], [], WAIT)
    assert r, "no %s within %.0f s" % (what, WAIT)
    return proc.stdout.readline().strip()


def _committer(name, path, n):
    return subprocess.Popen([sys.executable, "-c", COMMITTER, name, path, str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
                            env=dict(os.environ, PYTHONPATH=PKG_PARENT))


def _wait(cond, what, timeout=WAIT):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for " + what
        time.sleep(0.01)


def test_same_pid_reclaiming_its_slot_is_a_new_series(segname):
    """close() frees this process's slot and a re-open claims it again, with
    the same pid and counters from zero: the old series must not continue."""
    rt = shmstm.open(segname, **LIMITS)
    try:
        x = rt.tvar("x", 0)
        for i in range(3):
            x.value = i + 1
        before = _series(_prom(segname), "shmstm_commits", "shmstm_commits_total")
        (key1, n1), = before.items()
        assert key1[1] == str(os.getpid()) and n1 == 3
    finally:
        rt.close()
    rt = shmstm.open(segname, **LIMITS)
    try:
        rt.tvar("x").value = 10
        fams = _prom(segname)
        after = _series(fams, "shmstm_commits", "shmstm_commits_total")
        (key2, n2), = after.items()
        assert key2[:2] == key1[:2] and n2 == 1       # same slot, same pid, fresh counter
        assert key2 != key1, "a counter series went from %d down to %d" % (n1, n2)
        assert key2[2] == str(rt.stats()["processes"][0]["attach_ns"])
        # every per-slot family labels the slot with the same claim
        for fam, sample in (("shmstm_process_alive", None),
                            ("shmstm_readonly_commits", "shmstm_readonly_commits_total"),
                            ("shmstm_aborts", "shmstm_aborts_total"),
                            ("shmstm_process_cpu_seconds", "shmstm_process_cpu_seconds_total"),
                            ("shmstm_commit_latency_seconds",
                             "shmstm_commit_latency_seconds_count")):
            assert set(_series(fams, fam, sample)) == {key2}, fam
    finally:
        rt.close()


def _conflicts(rt, x, rounds):
    """``rounds`` forced conflicts on TVar ``x``: a victim and a spoiler process
    (tests/stats/_stats_workers.py) share its handle."""
    ctx = mp.get_context("spawn")
    peer_v, peer_s = ctx.Pipe()
    workers = []
    try:
        for fn, peer in (("victim", peer_v), ("spoiler", peer_s)):
            ctl, ctl_child = ctx.Pipe()
            p = ctx.Process(target=W.run, args=(ctl_child, fn, ((rt.name,), rounds, peer, x)),
                            daemon=True)
            p.start()
            workers.append((p, ctl))
        for p, ctl in workers:
            assert ctl.poll(WAIT), "worker %d did not finish" % p.pid
            msg = ctl.recv()
            assert msg[0] == "done", msg
            ctl.send("exit")
    finally:
        for p, _ in workers:
            p.join(WAIT)
            if p.is_alive():
                p.kill()
                p.join()


def test_reused_tvar_index_is_a_new_series(runtime):
    from shmstm.stats.reader import rates

    t1 = runtime.new_tvar(0)
    _conflicts(runtime, t1, 3)
    doc1, fams1 = _json(runtime.name), _prom(runtime.name)
    runtime.free(t1)
    t2 = runtime.new_tvar(0)
    assert t2._idx == t1._idx and t2._gen != t1._gen        # the index was reused
    _conflicts(runtime, t2, 1)
    doc2, fams2 = _json(runtime.name), _prom(runtime.name)

    assert [(t["index"], t["generation"], t["name"], t["conflicts"])
            for t in doc1["hottest_tvars"]] == [(t1._idx, t1._gen, None, 3)]
    assert [(t["index"], t["generation"], t["name"], t["conflicts"])
            for t in doc2["hottest_tvars"]] == [(t2._idx, t2._gen, None, 1)]

    def series(fams):
        return {(s.labels["index"], s.labels["generation"], s.labels["name"]): s.value
                for s in fams["shmstm_tvar_conflicts"].samples}
    assert series(fams1) == {(str(t1._idx), str(t1._gen), ""): 3}
    assert series(fams2) == {(str(t2._idx), str(t2._gen), ""): 1}     # not 3 -> 1
    # --watch: another TVar, so no rate yet (not (1 - 3) / interval)
    assert [t["conflicts_per_s"] for t in rates(doc1, doc2)["hottest_tvars"]] == [None]


@pytest.fixture
def durable(segname, tmp_path):
    path = str(tmp_path / "lmdb")
    # A small ring: max_procs=4 needs 2 * (4 + 1); commits wait for room at a lag of 6.
    rt = shmstm.open(segname, path=path, ring_slots=10, max_procs=4, **LIMITS)
    procs = []
    try:
        yield rt, path, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(WAIT)
        rt.close()


def test_ring_full_waits_and_a_slow_commit(durable):
    rt, path, procs = durable
    name = rt.name
    with shmstm.durability("sync"):
        rt.tvar("a", 0).value = 1                    # the flusher is up and has caught up
    fpid = rt.stats()["durability"]["flusher_pid"]
    assert fpid and rt.stats()["durability"]["ring_full_waits"] == 0

    os.kill(fpid, signal.SIGSTOP)                    # nothing drains the ring
    try:
        c1 = _committer(name, path, 10)
        procs.append(c1)
        _wait(lambda: rt.stats()["durability"]["ring_full_waits"] >= 1,
              "a commit to wait for ring room")
        # The duration is the point, not a synchronisation: the waiting commit
        # began before it was seen waiting and lasts at least SLOW > 2**31 ns.
        time.sleep(SLOW)
    finally:
        os.kill(fpid, signal.SIGCONT)
    assert _readline(c1, "committer's done") == "done"

    doc = _json(name)
    waits = doc["durability"]["ring_full_waits"]
    assert waits >= 1
    p1, = [p for p in doc["processes"] if p["pid"] == c1.pid]
    hist = p1["commit_latency_log2_ns"]
    assert hist[-1] >= 1, hist                       # the slow commit: >= 2**31 ns
    assert sum(hist) == p1["commits"] >= 10
    fams = _prom(name)
    assert fams["shmstm_ring_full_waits"].type == "counter"
    assert [s.value for s in fams["shmstm_ring_full_waits"].samples] == [waits]
    buckets = check_latency_histogram(fams, c1.pid, hist)
    assert buckets[-2][1] == p1["commits"] - hist[-1] < buckets[-1][1]   # only in +Inf

    # The committer leaves: its slot is free, its ring-full waits still count ...
    c1.stdin.close()
    assert c1.wait(WAIT) == 0
    doc = _json(name)
    assert [p["pid"] for p in doc["processes"]] == [os.getpid()]
    assert doc["durability"]["ring_full_waits"] == waits
    # ... and when another process claims that slot (counters from zero), too.
    c2 = _committer(name, path, 1)
    procs.append(c2)
    assert _readline(c2, "second committer's done") == "done"
    doc = _json(name)
    p2, = [p for p in doc["processes"] if p["pid"] == c2.pid]
    assert p2["slot"] == p1["slot"] and p2["commits"] <= 2
    assert doc["durability"]["ring_full_waits"] == waits
    fams = _prom(name)
    assert [s.value for s in fams["shmstm_ring_full_waits"].samples] == [waits]
    slot_series = {k for k in _series(fams, "shmstm_commits", "shmstm_commits_total")
                   if k[0] == str(p1["slot"])}
    assert slot_series == {(str(p2["slot"]), str(c2.pid), str(p2["attach_ns"]))}
    c2.stdin.close()
    assert c2.wait(WAIT) == 0
