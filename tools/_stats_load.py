"""The workload of tools/bench_stats (a module, so spawned workers can import it).

Each worker increments its own TVar (no conflicts: throughput is bound by CPU,
which is what a stats reader could take away) in windows the parent gives it.
"""
import os
import time

BATCH = 16          # ops between two looks at the clock


def worker(name, ctl):
    """Attach, then for each ``(start, end)`` window (time.monotonic(), which is
    system-wide on Linux) received on ``ctl``: wait for start, count ops until
    end, send (count, CPU seconds this process used meanwhile).  ``None`` ends
    the worker."""
    import shmstm

    with shmstm.open(name) as rt:
        t = rt.tvar("load:%d" % os.getpid(), 0)

        def inc():
            t.value = t.value + 1

        atomically = shmstm.atomically
        for _ in range(1000):                 # warm up
            atomically(inc)
        ctl.send("ready")
        while True:
            msg = ctl.recv()
            if msg is None:
                break
            start, end = msg
            while time.monotonic() < start:
                time.sleep(min(0.01, max(0.0, start - time.monotonic())))
            n = 0
            cpu0 = time.process_time()
            while time.monotonic() < end:
                for _ in range(BATCH):
                    atomically(inc)
                n += BATCH
            ctl.send((n, time.process_time() - cpu0))
