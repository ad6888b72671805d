"""The demo: ``shmstm-demo`` (installed with the package).

Four worker processes (spawned: they share nothing but the runtime, passed to
them by pickle) move money between 20 accounts.  A withdrawal ``check``s the
balance (it would block in ``retry`` if short) and ``or_else`` falls back to
a second account, then skips the transfer if both are short.  An auditor
process sums all accounts in read-only transactions while the transfers run,
and the main process blocks in ``retry`` until every worker has reported done.
"""
import multiprocessing as mp
import os
import random
import sys
import time

import shmstm

ACCOUNTS = 20
START = 100
TRANSFERS = 20000
WORKERS = 4


def transfer_worker(rt, seed):
    accounts = [rt.tvar("acct:%d" % i) for i in range(ACCOUNTS)]
    done = rt.tvar("workers-done")
    rng = random.Random(seed)

    def withdraw(i, amount):
        balance = accounts[i].value
        shmstm.check(balance >= amount)      # retry unless the money is there
        accounts[i].value = balance - amount
        return True

    @shmstm.atomic
    def transfer(src, alt, dst, amount):
        ok = shmstm.or_else(lambda: withdraw(src, amount),
                            lambda: withdraw(alt, amount),
                            lambda: False)   # both short: skip
        if ok:
            accounts[dst].value += amount
        return ok

    moved = 0
    for _ in range(TRANSFERS):
        src, alt, dst = rng.sample(range(ACCOUNTS), 3)
        moved += transfer(src, alt, dst, rng.randint(1, 60))
    done.modify(lambda n: n + 1)
    return os.getpid(), moved


def auditor(rt):
    accounts = [rt.tvar("acct:%d" % i) for i in range(ACCOUNTS)]
    done = rt.tvar("workers-done")
    audits = 0
    while done.value < WORKERS:
        total = shmstm.atomically(lambda: sum(a.value for a in accounts))
        assert total == ACCOUNTS * START, total   # every snapshot is consistent
        audits += 1
    return audits


def main():
    # Demos killed before their cleanup left their segments: remove those no
    # live process uses (a demo running now keeps its own).
    shmstm.cleanup_segments(names=[d["name"] for d in shmstm.list_segments()
                                   if d["name"].startswith("demo-")])
    name = "demo-%d" % os.getpid()
    ctx = mp.get_context("spawn")
    with shmstm.open(name, create=True, max_tvars=1024, heap_size=1 << 20) as rt:
        try:
            accounts = [rt.tvar("acct:%d" % i, START) for i in range(ACCOUNTS)]
            done = rt.tvar("workers-done", 0)
            t0 = time.monotonic()
            with ctx.Pool(WORKERS + 1) as pool:
                audit = pool.apply_async(auditor, (rt,))
                work = pool.starmap_async(transfer_worker, [(rt, s) for s in range(WORKERS)])
                # Block (no polling) until all workers are done, at most 120 s.
                shmstm.atomic(timeout=120)(lambda: shmstm.check(done.value == WORKERS))()
                results = work.get(timeout=60)
                audits = audit.get(timeout=60)
            elapsed = time.monotonic() - t0
            balances = shmstm.atomically(lambda: [a.value for a in accounts])
            for pid, moved in results:
                print("worker %d: %d transfers committed: %d moved money, %d found both "
                      "source accounts short and moved nothing"
                      % (pid, TRANSFERS, moved, TRANSFERS - moved))
            print("auditor: %d consistent snapshots while transfers ran" % audits)
            print("balances:", balances)
            total = sum(balances)
            ok = total == ACCOUNTS * START and min(balances) >= 0
            print("total %d (expected %d), %.2f s: %s" % (
                total, ACCOUNTS * START, elapsed, "conserved" if ok else "BROKEN"))
            return 0 if ok else 1
        finally:
            shmstm.unlink(name)


if __name__ == "__main__":
    sys.exit(main())
