"""Durability: real processes, real LMDB, real SIGKILL.

Each test states the property it checks.  Scale the flusher-kill test with
SHMSTM_DURABLE_KILLS (default 100 kills)."""
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest

import _dhelpers
import shmstm
from _dhelpers import spawn, wait_dead, wait_for
from shmstm import _codec, _core
from shmstm.store import durable as _dur, env as _env, schema as _schema

_I64 = struct.Struct("<q")

LIMITS = dict(max_tvars=4096, heap_size=4 << 20, max_procs=8)


def flusher_pid(rt):
    wait_for(lambda: rt.stats()["durability"]["flusher_alive"], 30, "the flusher")
    return rt.stats()["durability"]["flusher_pid"]


def stopped_flusher(segname, dpath, flushers, **kw):
    """A durable runtime with a TVar "ctr" (0, in LMDB) whose flusher is
    SIGSTOPped past its start-up (its LMDB reader table): (rt, flusher pid, ctr)."""
    rt = shmstm.open(segname, path=dpath, **kw, **LIMITS)
    fpid = flusher_pid(rt)
    flushers.append(fpid)
    ctr = rt.tvar("ctr", 0)
    with shmstm.durability("sync"):
        ctr.value = 0
    os.kill(fpid, signal.SIGSTOP)
    return rt, fpid, ctr


def drain(rt, timeout=30):
    wait_for(lambda: (lambda d: d["flushed_wv"] == d["committed_wv"])(rt.stats()["durability"]),
             timeout, "the flusher to drain the ring")


def test_api_basics(segname, dpath, flushers):
    """Named TVars survive close + unlink; the clock restarts above flushed_wv;
    sync commits are in LMDB when they return; mode/override validation."""
    with pytest.raises(ValueError):
        shmstm.open(segname, path=dpath, durability="none")
    with pytest.raises(ValueError):
        shmstm.durability("none")
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    flushers.append(flusher_pid(rt))
    a, s = rt.tvar("a", 0), rt.tvar("s", "x")
    anon = rt.new_tvar(5)
    for i in range(20):
        shmstm.atomically(lambda: (a.set(a.value + 1), s.set("v%d" % i), anon.set(i)))
        assert shmstm.read_durable(dpath)["values"]["a"] == i + 1   # sync: already in LMDB
    st = rt.stats()["durability"]
    assert st["mode"] == "sync" and st["flushed_wv"] == st["committed_wv"] == 20
    rt.close()
    shmstm.unlink(segname)
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    flushers.append(flusher_pid(rt))
    assert rt.tvar("a").value == 20 and rt.tvar("s").value == "v19"
    assert rt.stats()["clock"] == 20                   # monotonic across restarts

    @shmstm.atomic(durability="sync")
    def inc():
        rt.tvar("a").value += 1
    inc()
    assert shmstm.read_durable(dpath)["values"]["a"] == 21
    rt.close()
    shmstm.unlink(segname)


def test_refuses_foreign_data(segname, dpath, flushers):
    """Refused with a clear error: a non-durable segment opened with a path;
    a durable segment opened with another path; a segment whose runtime id
    differs from the data's (another runtime's data copied into its path)."""
    import shutil
    plain = shmstm.open(segname, **LIMITS)
    plain.close()
    with pytest.raises(shmstm.DurabilityMismatchError, match="without durability"):
        shmstm.open(segname, path=dpath, **LIMITS)
    shmstm.unlink(segname)
    other = dpath + "-other"
    try:
        for p in (other, dpath):          # two runtimes, each with its own data
            rt = shmstm.open(segname, path=p, **LIMITS)
            pid = flusher_pid(rt)
            rt.tvar("a", 0).value = 1
            drain(rt)
            rt.close()
            if p == other:
                shmstm.unlink(segname)
            assert wait_dead(pid)
        # the segment now belongs to dpath's runtime
        with pytest.raises(shmstm.DurabilityMismatchError, match="keeps its durable data"):
            shmstm.open(segname, path=other, **LIMITS)
        shutil.copy(os.path.join(other, "data.mdb"), os.path.join(dpath, "data.mdb"))
        with pytest.raises(shmstm.DurabilityMismatchError, match="does not match"):
            shmstm.open(segname, path=dpath, **LIMITS)
    finally:
        shmstm.unlink(segname)
        shutil.rmtree(other, ignore_errors=True)


def test_data_in_a_newer_format_is_refused_and_left_as_it_is(segname, dpath, flushers):
    """Data this version writes carries its format (meta b"format"); data
    marked with a later format (a newer shmstm wrote it) is refused by open()
    and read_durable() with an error that names the format and the path, and
    nothing is written to it: its bytes are the same after both refusals."""
    import struct
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    pid = flusher_pid(rt)
    rt.tvar("a", 0).value = 1
    drain(rt)
    rt.close()
    shmstm.unlink(segname)
    assert wait_dead(pid)
    durable = shmstm.read_durable(dpath)
    assert durable["format"] == _env.DATA_FORMAT and durable["values"] == {"a": 1}
    env = _env.open_env(dpath)          # this process's (cached) environment
    _, meta = _env._dbs(env)
    newer = _env.DATA_FORMAT + 1
    with _env.begin(env, write=True, db=meta) as txn:
        txn.put(b"format", struct.pack("<I", newer))
    data = os.path.join(dpath, "data.mdb")
    with open(data, "rb") as f:
        before = f.read()
    want = "format %d; shmstm .* reads formats up to %d" % (newer, _env.DATA_FORMAT)
    with pytest.raises(shmstm.DurableFormatError, match=want) as ei:
        shmstm.read_durable(dpath)
    assert dpath in str(ei.value)
    with pytest.raises(shmstm.DurableFormatError, match=want):
        shmstm.open(segname, path=dpath, map_size=1 << 26, **LIMITS)   # would store map_size
    assert isinstance(ei.value, shmstm.DurabilityError)
    with open(data, "rb") as f:
        assert f.read() == before
    shmstm.unlink(segname)


@pytest.mark.parametrize("group", ["wait", "nowait"])
def test_machine_crash_sync(segname, dpath, flushers, tmp_path, monkeypatch, group):
    """Simulated machine crash: sync workers log each acknowledged commit;
    every process mapping the segment (flusher included) is frozen at once
    (SIGSTOP: nothing runs after the "crash", not even the flusher draining),
    the mapping list shows no other process, then all are SIGKILLed and the
    segment unlinked; reopening from LMDB conserves money and contains every
    acknowledged commit.  Under both group-commit choices of the flusher
    (SHMSTM_FLUSH_GROUP: waiting for a group's stragglers, or not)."""
    from shmstm.shm import segments as _segments
    monkeypatch.setenv("SHMSTM_FLUSH_GROUP", group)
    n = 8
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    accts = [rt.tvar("acct:%d" % i, 0) for i in range(n)]
    shmstm.atomically(lambda: [t.set(100) for t in accts])
    fpid = flusher_pid(rt)
    logs = [str(tmp_path / ("w%d.log" % w)) for w in range(2)]
    procs = [spawn(["bank", segname, dpath, w, n, logs[w]]) for w in range(2)]
    try:
        def acked():
            return all(os.path.exists(p) and os.path.getsize(p) > 200 for p in logs)
        wait_for(acked, 60, "acknowledged commits")
        rt.close()                       # the test process unmaps: it is not killed
        victims = [p.pid for p in procs] + [fpid]
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        (seg,) = [s for s in _segments.list_segments() if s["name"] == segname]
        assert sorted(seg["mapped_by"]) == sorted(victims), seg["mapped_by"]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert wait_dead(fpid)
    shmstm.unlink(segname)
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    flushers.append(flusher_pid(rt))
    total = sum(rt.tvar("acct:%d" % i).value for i in range(n))
    assert total == 100 * n
    for w in range(2):
        with open(logs[w]) as f:
            lines = f.read().split("\n")
        ks = [int(x) for x in lines[:-1] if x.strip()]    # the last line may be torn
        assert ks, "worker %d acknowledged nothing" % w
        assert rt.tvar("done:%d" % w).value >= max(ks), "an acknowledged commit is missing"
    rt.close()
    shmstm.unlink(segname)


def test_sync_wake_ups_are_not_lost(segname, dpath, flushers):
    """No lost wake-up: in each round, 16 sync committers (2 processes x 8
    threads) commit one transfer each while the flusher is stopped
    (SIGSTOP), so that its next write holds them all and its release wakes
    them all: chained (the flusher wakes one committer, which wakes the
    rest: ring.c, pass_flush_wake).  No later release can reach a waiter by
    chance (a shared futex bit), so a wake-up not passed on shows: that
    commit sees its write in LMDB only at its wait's 50 ms re-check, which
    the segment counts (late_wakeups).  Allowed: a few (the committer that
    passes the wake-ups on, starved of a vCPU for 50 ms, makes the others
    late); a broken chain makes 15 late in every round.  Every commit
    returns (each is counted; money is conserved, in LMDB too)."""
    rounds, threads, procs_n = 20, 8, 2
    rt = shmstm.open(segname, path=dpath, durability="sync", **dict(LIMITS, max_procs=24))
    fpid = flusher_pid(rt)
    flushers.append(fpid)
    accts = [rt.tvar("acct:%d" % i, 0) for i in range(8)]
    shmstm.atomically(lambda: [t.set(100) for t in accts])
    go, tick = rt.tvar("go", 0), rt.tvar("tick", 0)
    dones = [rt.tvar("done:%d.%d" % (w, t), 0) for w in range(procs_n) for t in range(threads)]
    before = rt.stats()["durability"]["late_wakeups"]
    procs = [spawn(["sync_rounds", segname, dpath, w, threads, rounds], stdout=subprocess.PIPE)
             for w in range(procs_n)]
    try:
        # Open first: an open waits for LMDB's write lock, which a flusher
        # stopped in its write holds.
        for p in procs:
            assert p.stdout.readline() == b"ready\n"
        for r in range(1, rounds + 1):
            os.kill(fpid, signal.SIGSTOP)
            with shmstm.durability("async"):
                go.value = r
            # Blocking retry: until every committer made its round-r commit
            # (committed at its fill; its sync wait goes on).
            shmstm.atomically(lambda: shmstm.check(all(d.value >= r for d in dones)))
            os.kill(fpid, signal.SIGCONT)
            tick.value = r      # sync: returns once the round's batch is in LMDB
    finally:
        os.kill(fpid, signal.SIGCONT)
        for p in procs:
            assert p.wait(timeout=120) == 0
    commits = procs_n * threads * rounds
    assert sum(d.value for d in dones) == commits
    assert sum(t.value for t in accts) == 800
    late = rt.stats()["durability"]["late_wakeups"] - before
    assert late <= 3, "%d of %d sync commits were not woken" % (late, commits)
    vals = shmstm.read_durable(dpath)["values"]
    assert sum(vals["acct:%d" % i] for i in range(8)) == 800
    rt.close()
    shmstm.unlink(segname)


def _start_now(d):
    """ensure_flusher() now: first wait until each flusher this process started
    has either exited (it lost the lease) or holds the lease (ensure_flusher
    keeps one start in flight, so it would not start another before).  The
    flusher started, or None if one had taken the lease meanwhile."""
    for p in _dur._children:
        wait_for(lambda: p.poll() is not None or d.rt.stats()["durability"]["flusher_pid"] == p.pid,
                 30, "flusher %d to exit or take the lease" % p.pid)
    return _dur._children[-1] if d.ensure_flusher() else None


def _check_prefix(vals):
    """LMDB state after commits 1..C of the count workload: gap-free, no duplicate."""
    c = vals.get("ctr", 0)
    for i in range(8):
        expect = max([v for v in range(max(1, c - 16), c + 1) if v % 8 == i], default=0)
        got = vals.get("slot:%d" % i, 0)
        assert got == expect, "ctr=%d but slot:%d=%d (want %d): not a prefix" % (c, i, got, expect)
    return c


def test_flusher_killed_repeatedly(segname, dpath, flushers):
    """The flusher SIGKILLed at each kill point (before the LMDB txn, inside
    it, after its commit, after advancing) and at random times, >= 100 times:
    LMDB always holds a gap-free, duplicate-free prefix of the commit order
    (flushed_wv never goes back); after the final drain LMDB equals the segment."""
    kills_wanted = int(os.environ.get("SHMSTM_DURABLE_KILLS", "100"))
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    d = rt._durable
    pid = flusher_pid(rt)
    workers = [spawn(["count", segname, dpath, 10 ** 9]) for _ in range(2)]
    wait_for(lambda: rt.tvar("ctr", 0).value > 100, 60, "the workers to commit")
    points = ["before_txn", "in_txn", "after_commit", "after_advance"]
    rnd = random.Random(7)
    last_fw = last_c = 0
    kills = 0
    try:
        while kills < kills_wanted:
            if kills < 4 * 3:                 # 3 rounds over every kill point
                # Workers are stopped while the flusher is swapped, so that the
                # one holding the lease is ours, started with the kill point.
                for w in workers:
                    os.kill(w.pid, signal.SIGSTOP)
                os.environ["SHMSTM_FLUSHER_FAULT"] = "%s:%d" % (points[kills % 4], 1 + kills % 3)
                while True:
                    os.kill(pid, signal.SIGKILL)
                    assert wait_dead(pid)
                    fp = _start_now(d)
                    if fp is None:            # an earlier one took the lease: kill it too
                        pid = flusher_pid(rt)
                        continue
                    # resume the workers once ours holds the lease (or already died)
                    wait_for(lambda: fp.poll() is not None
                             or rt.stats()["durability"]["flusher_pid"] == fp.pid, 30, "the lease")
                    if fp.poll() != 0:
                        break
                    pid = flusher_pid(rt)     # lost the lease to one a worker started
                del os.environ["SHMSTM_FLUSHER_FAULT"]
                for w in workers:
                    os.kill(w.pid, signal.SIGCONT)
                # it SIGKILLs itself at the kill point
                assert fp.wait(60) == -signal.SIGKILL, "the flusher never reached its kill point"
            else:
                time.sleep(rnd.random() * 0.05)
                os.kill(pid, signal.SIGKILL)
                assert wait_dead(pid)
            kills += 1
            info = shmstm.read_durable(dpath)
            c = _check_prefix(info["values"])
            assert info["flushed_wv"] >= last_fw and c >= last_c
            last_fw, last_c = info["flushed_wv"], c
            _start_now(d)
            pid = flusher_pid(rt)
    finally:
        os.environ.pop("SHMSTM_FLUSHER_FAULT", None)
        for w in workers:
            os.kill(w.pid, signal.SIGCONT)
            w.kill()
            w.wait()
    assert last_c > 0, "nothing was ever flushed"
    _start_now(d)
    flushers.append(flusher_pid(rt))
    drain(rt)
    info = shmstm.read_durable(dpath)
    seg_vals = {k: rt.tvar(k).value for k in ["ctr"] + ["slot:%d" % i for i in range(8)]}
    assert info["values"] == seg_vals
    assert info["flushed_wv"] == rt.stats()["clock"]
    _check_prefix(info["values"])
    rt.close()
    shmstm.unlink(segname)


def _victim(segname, dpath, flushers, debug_pkg, fault):
    """A durable runtime with a 0.3 s grace, TVars victim (= 1) and other, and a
    victim process (debug build, armed with ``fault``) told to write victim."""
    os.environ["SHMSTM_FLUSH_GRACE"] = "0.3"
    try:
        rt = shmstm.open(segname, path=dpath, **LIMITS)
        flushers.append(flusher_pid(rt))
    finally:
        del os.environ["SHMSTM_FLUSH_GRACE"]
    v, other = rt.tvar("victim", 0), rt.tvar("other", 0)
    v.value = 1
    p = spawn(["victim", segname, dpath], pythonpath=debug_pkg, stdin=subprocess.PIPE,
              stdout=subprocess.PIPE, env={"SHMSTM_FAULT": fault})
    assert p.stdout.readline().strip() == b"ready"
    p.stdin.write(b"go\n")
    p.stdin.flush()
    return rt, v, other, p


def test_committer_killed_before_commit_point(segname, dpath, flushers, debug_pkg):
    """A committer SIGKILLed between taking its wv and the commit point (debug
    fault point commit.validating): the flusher voids its slot after the grace
    period instead of stalling (a later sync commit completes), and its write
    never appears, neither in the segment nor in LMDB."""
    rt, v, other, p = _victim(segname, dpath, flushers, debug_pkg, "commit.validating:1")
    try:
        assert p.wait(60) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
    with shmstm.durability("sync"):
        t0 = time.monotonic()
        other.value = 7                    # its wv is after the victim's: must not stall
    assert time.monotonic() - t0 < 20
    assert shmstm.read_durable(dpath)["values"]["other"] == 7
    assert v.value == 1                    # rolled back (recovered when met)
    drain(rt)
    assert shmstm.read_durable(dpath)["values"]["victim"] == 1
    rt.close()
    shmstm.unlink(segname)


def _stopped(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


@pytest.mark.parametrize("point", ["commit.validated", "ring.before_fill"])
def test_committer_stalled_past_grace_rolls_back_and_reruns(segname, dpath, flushers, debug_pkg,
                                                            point):
    """Regression (liveness): a live committer stalled between taking its wv and
    its fill of ring slot wv (SIGSTOPped there by the debug fault point
    commit.validated) for longer than the grace period: the flusher voids and
    recycles the slot.  After SIGCONT the committer must roll back and re-run
    its transaction (it used to spin forever waiting for the slot's old round,
    holding its locks).  Stopped at ring.before_fill (after it saw the slot's
    round, just before its fill CAS), it must not fill the recycled slot of a
    later round (it did: the flusher then found a record of the wrong round and
    stopped with ECORRUPT).  Its write then appears once, in the segment and
    LMDB, and the flusher carries on."""
    rt, v, other, p = _victim(segname, dpath, flushers, debug_pkg, point + ":1:stop")
    try:
        wait_for(lambda: _stopped(p.pid), 30, "the victim to stop inside its commit")
        other.value = 7                    # a later wv, while the victim's slot is empty
        drain(rt)                          # only after the grace: the victim's slot voided
        os.kill(p.pid, signal.SIGCONT)
        assert p.stdout.readline().strip() == b"survived"
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
    assert v.value == 999 and other.value == 7
    drain(rt)
    assert shmstm.read_durable(dpath)["values"]["victim"] == 999
    st = rt.stats()["durability"]
    assert st["error"] is None and st["flusher_alive"], st
    other.value = 8                        # the ring keeps working past the recycled round
    drain(rt)
    assert shmstm.read_durable(dpath)["values"]["other"] == 8
    rt.close()
    shmstm.unlink(segname)


def test_full_ring_stopped_flusher(segname, dpath, flushers):
    """A SIGSTOPped flusher fills a small ring: committers wait (counted in
    ring_full_waits) holding no locks, nothing is lost, and they finish after
    SIGCONT."""
    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers, ring_slots=18)
    per = 100
    workers = [spawn(["count", segname, dpath, per]) for _ in range(2)]
    try:
        wait_for(lambda: rt.stats()["durability"]["ring_full_waits"] >= 2, 60, "ring-full waits")
        st = rt.stats()["durability"]
        assert st["ring_fill"] <= 18 and st["flusher_alive"]
        assert ctr.value < 2 * per
        assert all(w.poll() is None for w in workers)
        # No lock is held while waiting: a read-only snapshot and another
        # TVar's commit path are not blocked (a read of ctr is not locked).
        assert isinstance(ctr.value, int)
    finally:
        os.kill(fpid, signal.SIGCONT)
    for w in workers:
        assert w.wait(120) == 0
    assert ctr.value == 2 * per
    drain(rt)
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 2 * per
    rt.close()
    shmstm.unlink(segname)


@pytest.mark.parametrize("kind", ["inline", "heap"])
def test_a_forged_ring_record_is_never_written_to_lmdb(segname, dpath, flushers, kind):
    """A ring record whose bytes no longer match its checksum (forged here
    through the segment's file, behind a stopped flusher) never reaches LMDB:
    the flusher writes the commits before it, stops at it and sets the
    runtime's durable error (in the stats, with its message); a later commit
    is refused before its commit point with a DurabilityError, and nothing
    of it is in the segment either.  Both record kinds: an int's inline
    record in its ring slot, a string's heap record."""
    import mmap
    import struct
    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers)     # ctr == 0 in LMDB
    marker = 0x5EC0DE5EC0DE5 if kind == "inline" else "forged-record-marker-5EC0DE"
    ctr.value = 1                                  # async: in the ring only
    ctr.value = marker
    wv = rt.stats()["durability"]["committed_wv"]

    def is_record(m, i):
        if kind == "inline":
            # Its slot (a 64-byte line) starts with seq == wv and holds one
            # entry (in_n at +16) whose value is the marker.
            return struct.unpack_from("<QQI", m, i & ~63)[::2] == (wv, 1)
        # The heap record: ring_rec {wv, n, owner, bytes, sum}, then one
        # ring_ent {idx, tag, len, pad} before the payload (the TVar's own
        # value block holds the same bytes under another header).
        return i >= 40 and struct.unpack_from("<QI", m, i - 40) == (wv, 1) and \
            struct.unpack_from("<I", m, i - 8)[0] == len(marker)
    with open("/dev/shm/shmstm." + segname, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        try:
            needle = struct.pack("<q", marker) if kind == "inline" else marker.encode()
            hits, i = [], 0
            while (i := m.find(needle, i)) >= 0:
                if is_record(m, i):
                    hits.append(i)
                i += 1
            assert len(hits) == 1, hits
            m[hits[0]] ^= 0x10                     # the value the record now says: forged
        finally:
            m.close()
    os.kill(fpid, signal.SIGCONT)
    assert wait_dead(fpid)
    st = rt.stats()["durability"]
    assert st["error"] == _core.lib.SHMSTM_ECORRUPT and "corrupt" in st["error_message"]
    durable = shmstm.read_durable(dpath)
    assert durable["flushed_wv"] == wv - 1 and durable["values"]["ctr"] == 1
    other = rt.tvar("other", 5)
    with pytest.raises(shmstm.DurabilityError):
        other.value = 6
    assert other.value == 5 and ctr.value == marker
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 1
    with pytest.raises(shmstm.DurabilityError, match="closed;.*corrupt"):
        rt.close()                      # the last close says what is not durable
    with pytest.raises(shmstm.DurabilityError, match="discard=True"):
        shmstm.unlink(segname)
    shmstm.unlink(segname, discard=True)


def test_flusher_poll_sees_a_fill_and_ends_at_its_deadline(segname, dpath, flushers):
    """shmstm_flusher_poll (the flusher's wait after a batch of few sync
    commits) returns 1 for a filled slot, also one filled by another thread
    while it polls, and 0 only once its deadline has passed.  The flusher is
    stopped so that nothing recycles the slots meanwhile."""
    from shmstm._core import lib

    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers)
    try:
        ctr.value = 1                               # async: returns at its commit point
        wv = rt.stats()["clock"]
        assert lib.shmstm_flusher_poll(rt._seg, wv, 10_000_000_000) == 1
        t0 = time.monotonic()
        assert lib.shmstm_flusher_poll(rt._seg, wv + 1, 50_000_000) == 0
        assert time.monotonic() - t0 >= 0.05
        # A commit from another thread fills slot wv + 1 while we poll.
        import threading
        go = threading.Event()
        th = threading.Thread(target=lambda: (go.wait(), ctr.set(2)))
        th.start()
        go.set()
        assert lib.shmstm_flusher_poll(rt._seg, wv + 1, 30_000_000_000) == 1
        th.join(30)
        assert rt.stats()["clock"] == wv + 1
    finally:
        os.kill(fpid, signal.SIGCONT)
    drain(rt)
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 2
    rt.close()
    shmstm.unlink(segname)


def test_flusher_poll_sync_sees_a_sync_fill_and_ends_at_its_deadline(segname, dpath, flushers):
    """shmstm_flusher_poll_sync (the group-commit wait after a batch of one or
    two sync commits) returns once sync_fills reaches its target, also when
    the sync commit that gets there is another thread's (made before or while
    it polls), and returns the count short of the target only once its
    deadline has passed.  An async commit does not count.  The flusher is
    stopped, so the sync commit waits for it until it continues."""
    import threading

    from shmstm._core import lib

    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers)
    th = None
    try:
        seg = rt._seg
        n0 = lib.shmstm_ring_sync_fills(seg)
        assert lib.shmstm_flusher_poll_sync(seg, n0, 10_000_000_000) == n0
        ctr.value = 1                               # async: not a sync fill
        t0 = time.monotonic()
        assert lib.shmstm_flusher_poll_sync(seg, (n0 + 1) & 0xFFFFFFFF, 50_000_000) == n0
        assert time.monotonic() - t0 >= 0.05
        go = threading.Event()

        def sync_commit():
            go.wait()
            with shmstm.durability("sync"):
                ctr.value = 2                       # returns once the flusher wrote it

        th = threading.Thread(target=sync_commit)
        th.start()
        go.set()
        assert lib.shmstm_flusher_poll_sync(seg, (n0 + 1) & 0xFFFFFFFF, 30_000_000_000) == \
            (n0 + 1) & 0xFFFFFFFF
    finally:
        os.kill(fpid, signal.SIGCONT)
        if th is not None:
            th.join(30)
    assert not th.is_alive()
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 2     # sync: in LMDB on return
    rt.close()
    shmstm.unlink(segname)


def test_close_from_another_thread_ends_a_sync_commit_wait(segname, dpath, flushers):
    """close() while another thread of the process waits for its sync
    commit's flush (the flusher is stopped): the waiter is woken and raises
    DurabilityError saying the commit happened but is not known durable,
    close() returns, and once the flusher continues the commit reaches LMDB
    (nothing lost, nothing half-done)."""
    import threading

    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers)
    got = []

    def committer():
        try:
            with shmstm.durability("sync"):
                ctr.value = 2
            got.append("returned")
        except shmstm.DurabilityError as e:
            got.append(e)

    th = threading.Thread(target=committer, daemon=True)    # a failure must not hang pytest
    try:
        c0 = rt.stats()["durability"]["committed_wv"]
        th.start()
        wait_for(lambda: rt.stats()["durability"]["committed_wv"] > c0, 30,
                 "the sync commit to pass its commit point")
        with pytest.raises(shmstm.DurabilityError, match="closed;"):
            rt.close(timeout=0.2)       # its own flush wait ends too
        th.join(30)
        assert not th.is_alive()
    finally:
        os.kill(fpid, signal.SIGCONT)
    assert len(got) == 1 and isinstance(got[0], shmstm.DurabilityError), got
    assert "closed by another thread" in str(got[0]) and "committed" in str(got[0])
    wait_for(lambda: shmstm.read_durable(dpath)["values"]["ctr"] == 2, 30,
             "the commit to reach LMDB")
    shmstm.unlink(segname)


def test_heap_full_of_unflushed_records_waits_for_the_flusher(segname, dpath, flushers):
    """A stopped flusher frees no commit records, so big values fill the heap
    before the ring: the committer waits for the flusher (counted in
    ring_full_waits) instead of failing with HeapFullError, and finishes with
    nothing lost after SIGCONT."""
    rt = shmstm.open(segname, path=dpath, ring_slots=4096, **LIMITS)
    fpid = flusher_pid(rt)
    flushers.append(fpid)
    with shmstm.durability("sync"):
        rt.tvar("ctr", 0).value = 0
    os.kill(fpid, signal.SIGSTOP)
    n = 400                           # 400 x 16 kB of records > the 4 MiB heap
    w = spawn(["blobs", segname, dpath, n], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: rt.stats()["durability"]["ring_full_waits"] >= 1 or w.poll() is not None,
                 60, "a wait for the flusher")
        assert w.poll() is None, w.stderr.read()
        st = rt.stats()["durability"]
        assert st["ring_fill"] < 4096 - 16          # the heap filled, not the ring
    finally:
        os.kill(fpid, signal.SIGCONT)
    assert w.wait(120) == 0, w.stderr.read()
    drain(rt)
    last = {"blob:%d" % (i % 4): bytes([i % 256]) * 16000 for i in range(n)}
    vals = shmstm.read_durable(dpath)["values"]
    assert {k: vals[k] for k in last} == last
    rt.close()
    shmstm.unlink(segname)


def test_record_blocks_of_one_process_serve_another_when_the_heap_is_full(segname, dpath, flushers):
    """The flusher returns a commit record's heap block to its committer's
    process slot.  When one process holds every free record block that way
    (its commits filled the heap while the flusher was stopped) and the rest
    of the heap is used up, another process's durable commits take blocks
    from that slot instead of failing with HeapFullError."""
    rt = shmstm.open(segname, path=dpath, ring_slots=65536, **LIMITS)
    fpid = flusher_pid(rt)
    flushers.append(fpid)
    # The TVars of both workers exist before the heap fills (their names are
    # heap blocks of another class, and the heap does not coalesce).
    for k in ["fill", "fill:b", "fill:c", "ctr", "ctr:b"] + ["slot:%d" % i for i in range(8)]:
        rt.tvar(k, 0)
    with shmstm.durability("sync"):
        rt.tvar("ctr").value = 0
    os.kill(fpid, signal.SIGSTOP)
    # 40,000 records of 128 B (three ints each: commits of at most two named
    # inline values keep their record in the ring slot) > the 4 MiB heap < the ring.
    n = 40000
    a = spawn(["fill", segname, dpath, n], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        try:
            wait_for(lambda: rt.stats()["durability"]["ring_full_waits"] >= 1 or a.poll() is not None,
                     60, "the filler to wait for the flusher")
            assert a.poll() is None
            heap = rt.stats()["heap"]
            assert heap["size"] - heap["bump"] < 4096           # the bump pointer is used up
        finally:
            os.kill(fpid, signal.SIGCONT)
        assert a.stdout.readline().strip() == "done"
        drain(rt)
        # Every record block is now free on the filler's slot (it stays
        # attached, so the next process gets another slot).
        b = spawn(["count3", segname, dpath, 2000], stderr=subprocess.PIPE, text=True)
        assert b.wait(120) == 0, b.stderr.read()
    finally:
        a.stdin.write("\n")
        a.stdin.flush()
        a.wait(60)
    drain(rt)
    vals = shmstm.read_durable(dpath)["values"]
    assert (vals["fill"], vals["ctr"]) == (n, 2000)
    rt.close()
    shmstm.unlink(segname)


def test_ring_room_wait_lets_the_processs_other_threads_run(segname, dpath, flushers):
    """A commit waiting for ring room (flusher stopped) holds no lock and not
    the GIL either: hot commits go through shmstm._fast, which keeps the GIL
    except in the core's blocking waits.  Checked in a worker whose main
    thread must run (poll the stats, print) while its second thread waits; if
    that wait held the GIL, the main thread could never report."""
    import select
    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers, ring_slots=18)
    per = 60
    w = spawn(["count_in_thread", segname, dpath, per], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([w.stdout], [], [], 60)
        line = w.stdout.readline() if ready else ""
        assert rt.stats()["durability"]["ring_full_waits"] >= 1
    finally:
        os.kill(fpid, signal.SIGCONT)
    assert line.strip() == "main thread runs while the committer waits: True", line
    assert w.stdout.readline().strip() == "done"
    assert w.wait(120) == 0
    assert ctr.value == per
    drain(rt)
    rt.close()
    shmstm.unlink(segname)


def test_full_map_is_an_error_and_loses_nothing(segname, dpath, flushers):
    """A full LMDB map (a real MDB_MAP_FULL: map_size 256 KiB): once the
    flusher's write fails, commits are refused before their commit point
    (DurabilityError) and change nothing; LMDB keeps the state after a prefix
    of the commits and the ring keeps the rest; with nobody attached the
    flusher exits instead of retrying forever, and shmstm-cleanup keeps the
    segment (its ring holds the only copy of those commits); reopening with a
    larger map_size lets a new flusher drain the ring, the error clears, and
    LMDB then equals the segment."""
    rt = shmstm.open(segname, path=dpath, map_size=1 << 18, **LIMITS)
    fpid = flusher_pid(rt)
    flushers.append(fpid)
    blobs = [rt.tvar("blob:%d" % i, b"") for i in range(8)]
    states = []                     # (wv, {name: value}) after each acknowledged commit
    cur = {}                        # the TVars written (LMDB holds those, not defaults)
    refused = None
    for i in range(64):
        val = bytes([i]) * 30000
        try:
            blobs[i % 8].value = val
        except shmstm.DurabilityError as e:
            refused = (i, e)
            break
        cur["blob:%d" % (i % 8)] = val
        states.append((rt.stats()["durability"]["committed_wv"], dict(cur)))
        wait_for(lambda: (lambda d: d["error"] or d["flushed_wv"] == d["committed_wv"])(
            rt.stats()["durability"]), 30, "the flusher to write or fail")
    assert refused is not None, "256 KiB of map took 64 values of 30 kB"
    i, err = refused
    assert "LMDB" in str(err) or "durable" in str(err), err
    assert blobs[i % 8].value == cur.get("blob:%d" % (i % 8), b"")  # the refused commit changed nothing
    st = rt.stats()["durability"]
    assert st["error"] and st["flushed_wv"] < st["committed_wv"]
    disk = shmstm.read_durable(dpath)
    prefix = [vals for wv, vals in states if wv <= disk["flushed_wv"]]
    assert prefix and disk["values"] == prefix[-1]
    with pytest.raises(shmstm.DurabilityError, match="closed;.*not yet durable"):
        rt.close()
    assert wait_dead(fpid, 30), "a failing flusher with nobody attached must exit"
    # The commits LMDB lacks are in the segment's ring: cleanup must keep it...
    from shmstm.shm.segments import cleanup_segments, list_segments
    assert cleanup_segments(names=[segname]) == []
    listed = [d for d in list_segments() if d["name"] == segname]
    assert listed and listed[0]["unflushed"] == st["committed_wv"] - st["flushed_wv"] > 0
    assert not listed[0]["stale"]
    # ... and a larger map drains them.
    rt = shmstm.open(segname, path=dpath, map_size=1 << 24, **LIMITS)
    flushers.append(flusher_pid(rt))
    wait_for(lambda: rt.stats()["durability"]["error"] is None, 30, "the error to clear")
    drain(rt)
    assert shmstm.read_durable(dpath)["values"] == cur
    rt.tvar("blob:0").value = b"after"      # commits are accepted again
    drain(rt)
    assert shmstm.read_durable(dpath)["values"]["blob:0"] == b"after"
    with pytest.raises(shmstm.DurabilityMismatchError, match="cannot shrink"):
        shmstm.open(segname, path=dpath, map_size=1 << 18, **LIMITS)
    rt.close()
    shmstm.unlink(segname)


def test_map_size_cannot_shrink_below_the_default_it_was_made_with(segname, dpath, flushers):
    """Data first opened without map_size was sized with the default (16 GiB):
    a later, smaller map_size is refused, not stored (it would fill at once)."""
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    flushers.append(flusher_pid(rt))
    with shmstm.durability("sync"):
        rt.tvar("x", 0).value = 1
    rt.close()
    with pytest.raises(shmstm.DurabilityMismatchError, match="cannot shrink"):
        shmstm.open(segname, path=dpath, map_size=1 << 18, **LIMITS)
    rt = shmstm.open(segname, path=dpath, map_size=1 << 35, **LIMITS)   # raising it is fine
    assert rt.tvar("x", 0).value == 1
    rt.close()
    shmstm.unlink(segname)


def test_map_size_raise_waits_for_the_read_txn_of_another_thread(segname, dpath, flushers):
    """LMDB's set_mapsize is undefined while a transaction of the process is
    active (LMDB does not check; py-lmdb invalidates the transaction).  A
    thread that raises the map (open() with a larger map_size) waits for
    another thread's read transaction, which reads the data unharmed."""
    import threading

    rt = shmstm.open(segname, path=dpath, map_size=1 << 24, **LIMITS)
    flushers.append(flusher_pid(rt))
    with shmstm.durability("sync"):
        rt.tvar("x", 0).value = 7
    env = _env.open_env(dpath)
    vars_db, _ = _env._dbs(env)
    logs = _schema.LogDBs(env)
    inside, leave, read = threading.Event(), threading.Event(), []

    def reader():
        with _env.begin(env) as txn:
            inside.set()
            leave.wait(30)
            read.append(_codec.decode_record(_schema.durable_items(txn, vars_db, logs)[b"x"]))

    def raiser():
        _env.open_env(dpath, map_size=1 << 26)      # what open(map_size=) does first

    r = threading.Thread(target=reader)
    r.start()
    assert inside.wait(30)
    w = threading.Thread(target=raiser)
    w.start()
    try:
        wait_for(lambda: _env._gate(env).waiting == 1, 30, "the raise to wait for the reader")
        assert env.info()["map_size"] == 1 << 24            # not raised under the reader
    finally:
        leave.set()
        r.join(30)
        w.join(30)
    assert not r.is_alive() and not w.is_alive()
    assert read == [7]
    assert env.info()["map_size"] == 1 << 26
    assert _env.stored_map_size(env) == 1 << 26
    assert shmstm.read_durable(dpath)["values"]["x"] == 7
    rt.close()
    shmstm.unlink(segname)


def test_txn_gate_nests_in_a_thread_and_a_resize_waits_for_every_holder():
    """_TxnGate: a thread holding the gate shared takes it again without
    waiting, also while a resize waits (no deadlock); the resize runs only
    once every hold is released; a resize inside the thread's own hold is
    refused (it would wait for itself)."""
    import threading

    gate = _env._TxnGate()
    order = []
    inside, nest = threading.Event(), threading.Event()

    def holder():
        with gate.shared():
            inside.set()
            assert nest.wait(30)
            with gate.shared():               # nested, while the resize waits
                order.append("nested")
            with pytest.raises(RuntimeError, match="inside a transaction"):
                with gate.alone():
                    pass
            order.append("released")

    def resizer():
        with gate.alone():
            order.append("resized")

    h = threading.Thread(target=holder)
    h.start()
    assert inside.wait(30)
    r = threading.Thread(target=resizer)
    r.start()
    wait_for(lambda: gate.waiting == 1, 30, "the resize to wait")
    nest.set()
    h.join(30)
    r.join(30)
    assert not h.is_alive() and not r.is_alive()
    assert order == ["nested", "released", "resized"]
    with gate.shared():                       # usable again, with nothing held
        pass


def test_flusher_that_cannot_start_is_an_error_not_a_hang(segname, dpath, flushers, monkeypatch):
    """Regression (a CI run hung for good): a flusher that exits with an error at
    start (here the interpreter is /bin/false) makes a sync commit raise
    DurabilityError after a few tries instead of waiting forever; the commit
    stays in the ring, and once a flusher can run it reaches LMDB (nothing lost)."""
    import sys
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    flushers.append(flusher_pid(rt))
    a = rt.tvar("a", 0)
    a.value = 1                                   # a working flusher: durable at once
    assert shmstm.read_durable(dpath)["values"]["a"] == 1
    os.kill(flushers[-1], signal.SIGKILL)
    assert wait_dead(flushers[-1])
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(shmstm.DurabilityError, match=r"committed \(wv \d+\) but not yet durable.*"
                                                     r"failed to start 3 times.*exit status 1"):
        a.value = 2
    assert a.value == 2                           # committed: the segment has it
    assert shmstm.read_durable(dpath)["values"]["a"] == 1
    monkeypatch.undo()
    a.value = 3                                   # starts a real flusher, which drains 2 and 3
    assert shmstm.read_durable(dpath)["values"]["a"] == 3
    flushers.append(flusher_pid(rt))
    rt.close()
    shmstm.unlink(segname)


def test_flusher_lease_has_one_holder(segname, dpath, flushers, debug_pkg):
    """Regression (two flushers ran at once; one spun forever on slots the other
    had recycled): claimers race for the lease of a dead flusher, with a random
    delay of up to 20 ms inside the claim (debug build, SHMSTM_DELAY); in every
    round exactly one wins, and the others see it alive."""
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    pid = flusher_pid(rt)
    os.kill(pid, signal.SIGKILL)
    assert wait_dead(pid)
    for _round in range(6):
        claimers = [spawn(["claim", segname], pythonpath=debug_pkg, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env={"SHMSTM_DELAY": "1000:20000"})
                    for _ in range(5)]
        try:
            for c in claimers:
                assert c.stdout.readline().strip() == "ready"
            for c in claimers:                        # all claim at about the same time
                c.stdin.write("go\n")
                c.stdin.flush()
            won = [int(c.stdout.readline()) for c in claimers]
            assert won.count(1) == 1, won
            assert rt.stats()["durability"]["flusher_pid"] == claimers[won.index(1)].pid
        finally:
            for c in claimers:                        # the holder dies holding the lease
                c.kill()
                c.wait()
    assert not rt.stats()["durability"]["flusher_alive"]
    rt.close()
    shmstm.unlink(segname)


def test_reopen_in_process_and_fork_child(segname, dpath, flushers):
    """open() with a path of a runtime already open in this process returns the
    same Runtime if path and mode agree (a fork child inherits the parent's, as
    a fork pool worker calling open() at start does), and refuses another path
    or mode; the child's commits reach LMDB."""
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    flushers.append(flusher_pid(rt))
    ctr = rt.tvar("ctr", 0)
    assert shmstm.open(segname, path=dpath, **LIMITS) is rt
    assert shmstm.open(segname, **LIMITS) is rt              # plain open of a durable one
    with pytest.raises(shmstm.DurabilityMismatchError, match="keeps its durable data"):
        shmstm.open(segname, path=dpath + "-elsewhere")
    with pytest.raises(shmstm.Error, match="durability='async'"):
        shmstm.open(segname, path=dpath, durability="sync")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = shmstm.open(segname, path=dpath, **LIMITS)
            for _ in range(50):
                child.tvar("ctr").modify(lambda v: v + 1)
            child.close()
            code = 0
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    assert ctr.value == 50
    drain(rt)
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 50
    for _ in range(3):
        rt.close()
    shmstm.unlink(segname)


def test_open_with_path_after_unpickling_a_tvar(segname, dpath, flushers):
    """A process that first met the runtime through a pickled TVar (a lazy,
    not yet attached Runtime) may then open it with its path: the same runtime,
    durable, and its commit reaches LMDB."""
    import pickle
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    flushers.append(flusher_pid(rt))
    n = rt.tvar("n", 0)
    code = ("import pickle, sys, shmstm\n"
            "tv = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
            "rt = shmstm.open(sys.argv[2], path=sys.argv[3])\n"
            "assert tv.runtime is rt, (tv.runtime, rt)\n"
            "with shmstm.durability('sync'):\n"
            "    tv.modify(lambda v: v + 41)\n"
            "rt.close()\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, pickle.dumps(n).hex(), segname, dpath],
                       capture_output=True, text=True, timeout=60, cwd="/",
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                           os.path.abspath(shmstm.__file__)))))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert n.value == 41 and shmstm.read_durable(dpath)["values"]["n"] == 41
    rt.close()
    shmstm.unlink(segname)


def test_interrupt_as_a_sync_commit_returns_keeps_its_new_tvars(segname, dpath, flushers):
    """Property: a KeyboardInterrupt that lands while a committed transaction
    is still in the core (a sync commit waiting for a stopped flusher) never
    frees the TVars that transaction created: the committed value refers to
    a live TVar (before the fix: StaleTVarError)."""
    import threading
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    fpid = flusher_pid(rt)
    flushers.append(fpid)
    holder = rt.tvar("holder", None)
    holder.value = 0
    os.kill(fpid, signal.SIGSTOP)       # the sync wait lasts until SIGCONT

    def body():
        holder.value = rt.new_tvar(41)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            shmstm.atomically(body)
    finally:
        timer.cancel()
        os.kill(fpid, signal.SIGCONT)
    created = holder.value
    assert isinstance(created, shmstm.TVar) and created.value == 41
    drain(rt)
    rt.close()
    shmstm.unlink(segname)


@pytest.mark.parametrize("var, value", [("SHMSTM_FLUSH_GROUP", "sometimes"),
                                        ("SHMSTM_FLUSH_POLL_NS", "1ms"),
                                        ("SHMSTM_FLUSH_LOG", "yes")])
def test_a_bad_flusher_switch_is_the_openers_error(segname, dpath, flushers, monkeypatch,
                                                   var, value):
    """A bad value of a flusher tuning variable fails open() with a
    ValueError naming it (not a flusher that dies at start), leaves no
    segment behind, and the next open with a good value works."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    from shmstm.shm import segments as _segments
    assert segname not in [s["name"] for s in _segments.list_segments()]
    monkeypatch.delenv(var)
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    flushers.append(flusher_pid(rt))
    rt.tvar("a", 0).value = 1
    assert shmstm.read_durable(dpath)["values"]["a"] == 1
    rt.close()
    shmstm.unlink(segname)


def _raw(dpath, name):
    """(log records, the raw "vars" value of name or None) in LMDB now."""
    env = _env.open_env(dpath)
    vars_db, _ = _env._dbs(env)
    logs = _schema.LogDBs(env)
    with _env.begin(env) as txn:
        v = txn.get(name, db=vars_db)
        records = sum(1 for _ in _schema.log_records(txn, logs))
        return records, None if v is None else _codec.decode_record(bytes(v))


def test_small_batches_go_to_the_log_and_every_reader_merges_it(segname, dpath, flushers,
                                                                monkeypatch):
    """A small batch (three TVars here) is one log record in LMDB's main DB, keyed by its
    flushed_wv (meta's is not written); the flusher folds the
    log into "vars" when it is idle.  With records not folded (the flusher
    SIGKILLed right after a write and its acknowledgement, the after_advance
    kill point), read_durable and an open that loads from LMDB both see the
    last acknowledged value, which "vars" alone does not hold; once a flusher
    is idle the log is empty and "vars" holds it."""
    # One thread's sync commits are one batch (one write, one release) each
    # (creating TVars commits nothing): a, b, c = i for i = 1 .. 6; the
    # flusher dies after the release of the last, and no commit follows
    # (none restarts a flusher).
    monkeypatch.setenv("SHMSTM_FLUSHER_FAULT", "after_advance:6")
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    fpid = flusher_pid(rt)
    flushers.append(fpid)
    monkeypatch.delenv("SHMSTM_FLUSHER_FAULT")     # for the flusher started later
    tvs = [rt.tvar(n, 0) for n in ("a", "b", "c")]
    for i in range(1, 7):
        shmstm.atomically(lambda: [t.set(i) for t in tvs])    # sync: in LMDB on return
    acked = 6
    assert wait_dead(fpid), "the flusher did not reach its kill point"
    records, in_vars = _raw(dpath, b"a")
    assert records >= 1, "the last batch is not a log record"
    assert in_vars != acked                         # so reading "vars" alone would be wrong
    durable = shmstm.read_durable(dpath)
    assert durable["values"]["a"] == acked
    # Its flushed_wv is the last record's key: every commit, the last included.
    assert durable["flushed_wv"] == rt.stats()["durability"]["committed_wv"]
    rt.close()
    shmstm.unlink(segname)                          # the next open loads from LMDB
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    assert [rt.tvar(n).value for n in ("a", "b", "c")] == [acked] * 3
    flushers.append(flusher_pid(rt))
    wait_for(lambda: _raw(dpath, b"a") == (0, acked), 30, "the idle flusher to fold the log")
    assert shmstm.read_durable(dpath)["values"]["a"] == acked
    rt.close()
    shmstm.unlink(segname)


def test_a_log_in_the_0_1_0_layout_is_merged_and_folded(segname, dpath, flushers):
    """0.1.0 kept the log in a DB of its own (b"log"), with flushed_wv in meta.
    Data a crash left so reads the same: read_durable and an open both merge
    that log (after "vars"), the clock goes on from its flushed_wv, and the
    idle flusher folds it into "vars" and empties it."""
    import struct

    def val(i):
        return _codec.to_record(_codec.T_INT, _I64.pack(i))

    env = _env.open_env(dpath)
    vars_db, meta = _env._dbs(env)
    with _env.begin(env, write=True) as txn:
        legacy = env.open_db(b"log", txn=txn)
        txn.put(b"a", val(1), db=vars_db)
        txn.put(b"c", val(7), db=vars_db)
        txn.put(struct.pack(">Q", 4), _dhelpers.encode_log([(b"a", val(2)), (b"b", val(3))]),
                db=legacy)
        txn.put(struct.pack(">Q", 5), _dhelpers.encode_log([(b"b", val(4))]), db=legacy)
        txn.put(b"flushed_wv", struct.pack("<Q", 5), db=meta)
    assert shmstm.read_durable(dpath) == {"flushed_wv": 5, "runtime_id": None, "format": None,
                                          "values": {"a": 2, "b": 4, "c": 7}}
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    flushers.append(flusher_pid(rt))
    assert [rt.tvar(n).value for n in ("a", "b", "c")] == [2, 4, 7]
    rt.tvar("c").value = 8                          # sync: in LMDB on return
    assert rt.stats()["durability"]["committed_wv"] == 6

    def legacy_left():
        with _env.begin(env) as txn:
            return txn.stat(legacy)["entries"]
    wait_for(lambda: legacy_left() == 0 and _raw(dpath, b"b") == (0, 4), 30,
             "the idle flusher to fold the 0.1.0 log")
    durable = shmstm.read_durable(dpath)
    assert durable["values"] == {"a": 2, "b": 4, "c": 8} and durable["flushed_wv"] == 6
    assert durable["format"] == _env.DATA_FORMAT      # the flusher marked it at its start
    rt.close()
    shmstm.unlink(segname)


def test_the_flushers_c_log_encoding_is_encode_logs(segname):
    """shmstm_ring_encode_log (the flusher's log record of a collected batch,
    in C) gives encode_log's bytes, names from the segment's directory
    included; a record longer than its cap is SHMSTM_ETOOLARGE (the flusher
    then writes "vars"), a malformed batch or an unnamed TVar an error."""
    import struct

    from shmstm._core import ffi, lib
    rt = shmstm.open(segname, **LIMITS)
    try:
        names = ["a", "\u00e9t\u00e9", "n" * 300]
        tvs = [rt.tvar(n, 0) for n in names]
        anon = rt.new_tvar(0)
        vals = [(lib.SHMSTM_TAG_INT, struct.pack("<q", -5)), (lib.SHMSTM_TAG_BYTES, b"xyz\x00"),
                (lib.SHMSTM_TAG_STR, b"")]

        def batch(entries):
            out = b""
            for tv, (tag, p) in entries:
                out += struct.pack("<IIII", tv._idx, tag, len(p), 0) + p + bytes(-len(p) % 8)
            return out

        def encode(inb, n, cap=4096):
            buf = ffi.new("char[]", max(cap, 1))
            k = lib.shmstm_ring_encode_log(rt._seg, inb, len(inb), n, buf, cap)
            return k if k < 0 else ffi.buffer(buf, k)[:]

        inb = batch(list(zip(tvs, vals)))
        want = _dhelpers.encode_log([(n.encode(), bytes((t,)) + p) for n, (t, p) in zip(names, vals)])
        assert encode(inb, 3) == want
        assert encode(inb, 3, cap=len(want)) == want
        assert encode(inb, 3, cap=len(want) - 1) == lib.SHMSTM_ETOOLARGE
        assert encode(inb[:-8], 3) == lib.SHMSTM_ECORRUPT        # the last entry cut short
        assert encode(inb, 2) == lib.SHMSTM_ECORRUPT             # bytes left over
        assert encode(batch([(anon, vals[0])]), 1) == lib.SHMSTM_ENOTFOUND
        forged = struct.pack("<IIII", 10**6, lib.SHMSTM_TAG_INT, 8, 0) + bytes(8)
        assert encode(forged, 1) == lib.SHMSTM_ECORRUPT
    finally:
        rt.close()
        shmstm.unlink(segname)


def test_log_records_are_decoded_strictly():
    """encode_log / decode_log round-trip any bytes (names and values with
    NULs), and a truncated or padded record is refused, not misread."""
    items = [(b"a\x00b", b"\x03" + bytes(8)), (b"", b"\x07xyz"), (b"\xff" * 300, b"\x01" * 9)]
    rec = _dhelpers.encode_log(items)
    assert _schema.decode_log(rec) == items
    for bad in (rec[:-1], rec + b"\x00", rec[:3]):
        with pytest.raises(shmstm.CorruptSegmentError, match="malformed log record"):
            _schema.decode_log(bad)


def test_log_folds_keep_the_state_across_many_batches(segname, dpath, flushers):
    """A run of batches of three TVars (log records, each one sync commit)
    longer than the log holds (LOG_FOLD records): the log never holds more
    than LOG_FOLD records (the write after them folds it into "vars"), and
    after every commit LMDB's merged state is that commit's."""
    from shmstm.store.flusher import LOG_FOLD
    rt = shmstm.open(segname, path=dpath, durability="sync", **LIMITS)
    flushers.append(flusher_pid(rt))
    tvs = [rt.tvar(n, 0) for n in ("a", "b", "c")]
    most = 0
    for i in range(1, LOG_FOLD + 12):
        shmstm.atomically(lambda: [t.set(i) for t in tvs])      # sync: in LMDB on return
        records, _ = _raw(dpath, b"a")
        most = max(most, records)
        assert records <= LOG_FOLD
        vals = shmstm.read_durable(dpath)["values"]
        assert (vals["a"], vals["b"], vals["c"]) == (i, i, i)
    assert most > 0, "no batch went to the log"
    rt.close()
    shmstm.unlink(segname)


def test_a_map_size_raised_by_another_process_is_adopted(segname, dpath, flushers):
    """Regression: once another process raised map_size and the flusher wrote
    past this process's map, every later open(path=) and read_durable() here
    raised lmdb.MapResizedError (the cached environment kept the old map)."""
    from _dhelpers import worker_env

    rt = shmstm.open(segname, path=dpath, durability="sync", map_size=1 << 20, **LIMITS)
    flushers.append(flusher_pid(rt))
    rt.tvar("a", 0).value = 1
    rt.close()
    assert shmstm.read_durable(dpath)["values"] == {"a": 1}      # this process's env: 1 MiB
    code = (
        "import shmstm, sys\n"
        "rt = shmstm.open(sys.argv[1], path=sys.argv[2], durability='sync', map_size=16 << 20,"
        " max_tvars=4096, heap_size=4 << 20, max_procs=8)\n"
        "for i in range(60):\n"
        "    rt.tvar('k%d' % i, b'').value = b'x' * 50000\n"   # 3 MB: past the old map
        "rt.close()\n")
    # cwd: "python -c" puts it first on sys.path, and a source checkout there
    # would shadow the installed package.
    subprocess.run([sys.executable, "-c", code, segname, dpath], env=worker_env(), check=True,
                   timeout=120, cwd=dpath)
    assert os.path.getsize(os.path.join(dpath, "data.mdb")) > 1 << 20
    vals = shmstm.read_durable(dpath)["values"]
    assert vals["a"] == 1 and len(vals) == 61 and vals["k59"] == b"x" * 50000
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    flushers.append(flusher_pid(rt))
    assert rt.tvar("k0").value == b"x" * 50000
    rt.close()
    shmstm.unlink(segname)


def test_a_full_map_error_says_one_thing_in_sync_mode(segname, dpath, flushers):
    """Regression: the first full-map DurabilityError of a sync commit said
    both "committed" and "commit refused".  Each error now says one: a sync
    commit that committed and could not be made durable says so (and its value
    is there), a refused one says refused (and changed nothing)."""
    rt = shmstm.open(segname, path=dpath, durability="sync", map_size=1 << 18, **LIMITS)
    flushers.append(flusher_pid(rt))
    blobs = [rt.tvar("blob:%d" % i, b"") for i in range(8)]
    seen = []
    for i in range(64):
        val = bytes([i]) * 30000
        before = blobs[i % 8].value
        try:
            blobs[i % 8].value = val
        except shmstm.DurabilityError as e:
            msg = str(e)
            assert not ("committed" in msg and "refused" in msg), msg
            now = blobs[i % 8].value
            assert now == (val if "committed" in msg else before), msg
            seen.append(msg)
            if len(seen) == 2:
                break
    assert seen, "256 KiB of map took 64 values of 30 kB"
    with pytest.raises(shmstm.DurabilityError, match="closed;.*not yet durable"):
        rt.close()
    # Leave nothing behind: a larger map drains what the ring kept.
    rt = shmstm.open(segname, path=dpath, map_size=1 << 24, **LIMITS)
    flushers.append(flusher_pid(rt))
    drain(rt)
    rt.close()
    shmstm.unlink(segname)


def test_async_commits_survive_close_then_unlink(segname, dpath, flushers):
    """Regression (a new user's first program): 200 async commits, the
    runtime closed by its with block, unlinked at once: LMDB had none of them.
    The last close waits until the flusher wrote every commit of the process."""
    with shmstm.open(segname, path=dpath, durability="async", **LIMITS) as rt:
        flushers.append(flusher_pid(rt))
        c = rt.tvar("c", 0)
        for _ in range(200):
            c.value += 1
    assert shmstm.unlink(segname)
    assert shmstm.read_durable(dpath)["values"] == {"c": 200}


def test_flush_is_a_barrier_for_async_commits(segname, dpath, flushers):
    """rt.flush(): every commit this process made is in LMDB when it returns
    (the runtime stays open); a runtime without durability returns at once."""
    rt = shmstm.open(segname, path=dpath, durability="async", **LIMITS)
    flushers.append(flusher_pid(rt))
    c = rt.tvar("c", 0)
    for i in range(1, 51):
        c.value = i
        if i % 10 == 0:
            rt.flush()
            assert shmstm.read_durable(dpath)["values"]["c"] == i
    with pytest.raises(ValueError):
        rt.flush(timeout=-1)
    with pytest.raises(shmstm.Error, match="inside a transaction"):
        shmstm.atomically(rt.flush)
    rt.close()
    shmstm.unlink(segname)


def test_close_that_cannot_flush_raises_and_unlink_keeps_the_commits(segname, dpath, flushers):
    """The flusher is stopped: the last close() waits its timeout, closes all
    the same and raises DurabilityError naming the commits not yet durable;
    unlink() then refuses (it would lose them), saying how to discard them;
    once the flusher runs again, unlink drains them into LMDB first."""
    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers)
    for i in range(1, 6):
        ctr.value = i                        # async: acknowledged, not yet in LMDB
    t0 = time.monotonic()
    with pytest.raises(shmstm.DurabilityError, match=r"closed; the commits of this process up "
                                                     r"to wv \d+ are not yet durable"):
        rt.close(timeout=0.5)
    assert 0.5 <= time.monotonic() - t0 < 10 and rt.closed
    with pytest.raises(shmstm.DurabilityError, match=r"discard=True"):
        shmstm.unlink(segname, timeout=0.5)
    assert os.path.exists("/dev/shm/shmstm." + segname)
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 0
    os.kill(fpid, signal.SIGCONT)
    assert shmstm.unlink(segname)
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 5


def test_unlink_discard_removes_a_segment_with_unflushed_commits(segname, dpath, flushers):
    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers)
    ctr.value = 1
    with pytest.raises(shmstm.DurabilityError):
        rt.close(timeout=0.2)
    assert shmstm.unlink(segname, discard=True)
    assert not os.path.exists("/dev/shm/shmstm." + segname)
    os.kill(fpid, signal.SIGCONT)
    assert wait_dead(fpid, 30)
    assert shmstm.read_durable(dpath)["values"]["ctr"] in (0, 1)


TWO_WRITER = r'''
import json, sys, time
import shmstm
name, path, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rt = shmstm.open(name, path=path, durability="sync",
                 max_tvars=4096, heap_size=4 << 20, max_procs=8)
if tag == "S":
    rt.tvar("S-first", 0).value = 1     # its flusher is attached and has written
    shmstm.unlink(name, discard=True)   # the name is free again; this runtime goes on
    print("unlinked", flush=True)
    sys.stdin.readline()                # until the other runtime is up
tvs = [rt.tvar("%s%d" % (tag, j), 0) for j in range(3)]
acked, refused = 0, None
for i in range(1, n + 1):
    try:
        shmstm.atomically(lambda: [t.set(i) for t in tvs])
        acked = i
    except shmstm.DurabilityError as e:
        refused = "%s: %s" % (type(e).__name__, e)
        break
    time.sleep(0.002)
try:
    rt.close(timeout=1)
except shmstm.DurabilityError:
    pass
print(json.dumps({"acked": acked, "refused": refused}), flush=True)
'''


def test_two_runtimes_on_one_path_lose_no_acknowledged_commit(segname, dpath, flushers):
    """Regression (silent data loss): two runtimes made from one LMDB path
    (here: the first unlinked while still open, the second opened with the
    same name and path) both wrote it, and acknowledged sync commits of one
    were overwritten.  Now only one segment's flusher writes the data (meta
    b"writer", checked in every LMDB write transaction); the other's commits
    are refused with DurabilityMismatchError, and every commit acknowledged
    without an error is in LMDB."""
    from _dhelpers import worker_env

    def start(tag, n):
        return subprocess.Popen([sys.executable, "-c", TWO_WRITER, segname, dpath, tag, str(n)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=worker_env(), cwd=dpath)

    s = start("S", 150)
    assert s.stdout.readline().strip() == "unlinked"
    t = start("T", 150)
    s.stdin.write("go\n")
    s.stdin.flush()
    res = {}
    for tag, p in (("S", s), ("T", t)):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        res[tag] = json.loads(out.strip().splitlines()[-1])
    refused = [k for k in res if res[k]["refused"]]
    assert len(refused) <= 1, res
    for k in refused:
        assert "DurabilityMismatchError" in res[k]["refused"] and "another runtime" in res[k]["refused"]
    vals = shmstm.read_durable(dpath)["values"]
    for tag in ("S", "T"):
        for j in range(3):
            assert vals.get("%s%d" % (tag, j), 0) == res[tag]["acked"], (tag, res, vals)


def test_a_second_runtime_on_a_path_in_use_is_refused_at_open(segname, dpath, flushers):
    rt = shmstm.open(segname, path=dpath, **LIMITS)
    flushers.append(flusher_pid(rt))
    rt.tvar("x", 0).value = 1
    other = segname + "-2"
    with pytest.raises(shmstm.DurabilityMismatchError, match=r"in use by runtime %r" % segname):
        shmstm.open(other, path=dpath, **LIMITS)
    assert not os.path.exists("/dev/shm/shmstm." + other)
    rt.close()
    shmstm.unlink(segname)


TWO_CLOSERS = r'''
import sys, threading
import shmstm
rt = shmstm.open(sys.argv[1])           # attaches; the test's flusher is stopped
rt.tvar("ctr", 0).value = 7             # async: acknowledged, not in LMDB
out = {}

def close(tag, timeout):
    try:
        rt.close(timeout=timeout)
        out[tag] = "returned"
    except shmstm.DurabilityError as e:
        out[tag] = "DurabilityError" if "not yet durable" in str(e) else "other: %s" % e

ts = [threading.Thread(target=close, args=(t, to)) for t, to in (("a", 0.5), ("b", 3.0))]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(sorted(out.values()), rt.closed)
'''


def test_two_threads_closing_at_once_neither_crashes_nor_skips_the_flush(segname, dpath,
                                                                         flushers):
    """Regression (SIGSEGV): two threads closing the last handle at once both
    waited for the flusher, unlocked; the first to finish unmapped the segment
    under the other's wait.  Now the flush is decided under the lock and
    counted: one close reports the commit not yet durable, the other returns,
    and the runtime is closed."""
    from _dhelpers import worker_env

    rt, fpid, ctr = stopped_flusher(segname, dpath, flushers)
    try:
        r = subprocess.run([sys.executable, "-c", TWO_CLOSERS, segname], capture_output=True,
                           text=True, timeout=120, env=worker_env(), cwd=dpath)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == "['DurabilityError', 'returned'] True", r.stdout
    finally:
        os.kill(fpid, signal.SIGCONT)
    rt.close()
    assert shmstm.unlink(segname)
    assert shmstm.read_durable(dpath)["values"]["ctr"] == 7
