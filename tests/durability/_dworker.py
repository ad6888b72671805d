"""Worker processes for tests/durability (run as scripts, real processes).

    python _dworker.py bank NAME PATH WORKER NACCTS LOG     sync transfers, ack log
    python _dworker.py count NAME PATH N                    async: ctr += 1, slot:<ctr % 8> = ctr
    python _dworker.py count_in_thread NAME PATH N          count() in a second thread (GIL check)
    python _dworker.py blobs NAME PATH N                    N commits of 16 kB values (heap-full waits)
    python _dworker.py count3 NAME PATH N                   count, also writing ctr:b = ctr (three TVars: a heap
                                                            record, where count's two ints fit in the ring slot)
    python _dworker.py fill NAME PATH N                     N async commits of fill += 1, fill:b = fill:c = fill,
                                                            then print "done" and stay attached until a line on stdin
    python _dworker.py victim NAME PATH                     one write to "victim" (killed by a fault point)
    python _dworker.py sync_rounds NAME PATH WORKER THREADS R  THREADS threads, one sync transfer each
                                                            per round of R (TVar "go" starts a round)
    python _dworker.py claim NAME                           attach as a flusher would, then on "go"
                                                            claim the lease and print 1 (won) or 0
"""
import os
import random
import sys
import time

import shmstm

LIMITS = dict(max_tvars=4096, heap_size=4 << 20, max_procs=8)


def bank(name, path, worker, naccts, log):
    rt = shmstm.open(name, path=path, durability="sync", **LIMITS)
    accts = [rt.tvar("acct:%d" % i) for i in range(naccts)]
    done = rt.tvar("done:%s" % worker, 0)
    rnd = random.Random(worker)
    with open(log, "a", buffering=1) as f:
        k = 0
        while True:
            a, b = rnd.sample(accts, 2)
            n = rnd.randint(1, 10)

            def tx():
                a.value -= n
                b.value += n
                done.value += 1
                return done.value
            k = shmstm.atomically(tx)
            # Acknowledged: a sync commit returned, so it is in LMDB.
            f.write("%d\n" % k)


def count(name, path, n, wide=False):
    rt = shmstm.open(name, path=path, **LIMITS)
    ctr = rt.tvar("ctr", 0)
    slots = [rt.tvar("slot:%d" % i, 0) for i in range(8)]
    ctr_b = rt.tvar("ctr:b", 0) if wide else None

    def tx():
        c = ctr.value + 1
        ctr.value = c
        slots[c % 8].value = c
        if wide:
            ctr_b.value = c
    for _ in range(n):
        shmstm.atomically(tx)
    rt.close()


def fill(name, path, n):
    rt = shmstm.open(name, path=path, durability="async", **LIMITS)
    tv, tw, tx3 = rt.tvar("fill", 0), rt.tvar("fill:b", 0), rt.tvar("fill:c", 0)

    def tx():                           # three ints: a 128-byte heap record, as count3's
        tv.value += 1
        tw.value = tx3.value = tv.value
    for _ in range(n):
        shmstm.atomically(tx)
    print("done", flush=True)
    sys.stdin.readline()
    rt.close()


def victim(name, path):
    rt = shmstm.open(name, path=path, **LIMITS)
    v = rt.tvar("victim", 0)
    print("ready", flush=True)
    sys.stdin.readline()
    v.value = 999           # SHMSTM_FAULT=commit.validating:1 kills us after taking wv
    print("survived", flush=True)


def count_in_thread(name, path, n):
    """count() in a second thread; the main thread reports each time it runs
    while that thread waits for ring room inside its commit (shmstm._fast
    must drop the GIL there, or the main thread never runs again)."""
    import threading
    rt = shmstm.open(name, path=path, **LIMITS)
    ctr = rt.tvar("ctr", 0)
    t = threading.Thread(target=lambda: [ctr.modify(lambda c: c + 1) for _ in range(n)])
    t.start()
    while t.is_alive() and not rt.stats()["durability"]["ring_full_waits"]:
        time.sleep(0.002)
    print("main thread runs while the committer waits: %s" % t.is_alive(), flush=True)
    t.join()
    print("done", flush=True)
    rt.close()


def blobs(name, path, n):
    """n commits of a 16 kB bytes value to blob:<i % 4> (async)."""
    rt = shmstm.open(name, path=path, **LIMITS)
    tvs = [rt.tvar("blob:%d" % i, b"") for i in range(4)]
    for i in range(n):
        tvs[i % 4].value = bytes([i % 256]) * 16000
    rt.close()


def sync_rounds(name, path, worker, threads, rounds):
    """THREADS threads of one process; in round r = 1 .. ROUNDS each waits
    (blocking retry) until TVar "go" reaches r, then makes one sync transfer
    among the acct:* TVars, counted in done:<worker>.<thread>.  Exits 1 if a
    thread failed.  Prints "ready" once open."""
    import threading
    rt = shmstm.open(name, path=path, durability="sync", **dict(LIMITS, max_procs=24))
    accts = [rt.tvar("acct:%d" % i) for i in range(8)]
    go = rt.tvar("go")
    failed = []
    print("ready", flush=True)

    def work(t):
        done = rt.tvar("done:%s.%d" % (worker, t), 0)
        rnd = random.Random("%s.%d" % (worker, t))
        for r in range(1, rounds + 1):
            shmstm.atomically(lambda: shmstm.check(go.value >= r))   # read-only
            a, b = rnd.sample(accts, 2)

            def tx():
                a.value -= 1
                b.value += 1
                done.value += 1
            shmstm.atomically(tx)

    def run(t):
        try:
            work(t)
        except BaseException:
            failed.append(t)
            raise
    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rt.close()
    if failed:
        os._exit(1)


def claim(name):
    from shmstm.store import flusher as _flusher
    from shmstm._core import lib
    seg, _params = _flusher.attach(name)
    print("ready", flush=True)
    sys.stdin.readline()
    print(lib.shmstm_flusher_claim(seg), flush=True)
    sys.stdin.readline()            # hold the lease (or not) until told to go


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "bank":
        bank(args[0], args[1], args[2], int(args[3]), args[4])
    elif cmd == "count":
        count(args[0], args[1], int(args[2]))
    elif cmd == "count3":
        count(args[0], args[1], int(args[2]), wide=True)
    elif cmd == "fill":
        fill(args[0], args[1], int(args[2]))
    elif cmd == "victim":
        victim(args[0], args[1])
    elif cmd == "count_in_thread":
        count_in_thread(args[0], args[1], int(args[2]))
    elif cmd == "blobs":
        blobs(args[0], args[1], int(args[2]))
    elif cmd == "sync_rounds":
        sync_rounds(args[0], args[1], args[2], int(args[3]), int(args[4]))
    elif cmd == "claim":
        claim(args[0])
    os._exit(0)
