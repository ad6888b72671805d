"""Run by test_gil.py with the debug build on PYTHONPATH.  A child commits to
x and stops itself (SIGSTOP, fault point commit.locked_one) holding x's lock;
two CPU burners keep both cores busy, so every sched_yield of a lock wait can
give up a time slice.  Then, for a commit and for a transactional read of x
in a second thread, a ticker thread of this process sleeps 1 ms at a time
and records its largest gap.  Prints JSON: {"commit": s, "read": s, ...}.

    python _gil_stall.py NAME SECONDS
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import shmstm

name, secs = sys.argv[1], float(sys.argv[2])
rt = shmstm.open(name)
x = rt.tvar("x", 0)
owner = subprocess.Popen(
    [sys.executable, "-c", "import shmstm, sys; shmstm.open(sys.argv[1]).tvar('x', 0).value = 1", name],
    env=dict(os.environ, SHMSTM_FAULT="commit.locked_one:1:stop"))
while True:                                    # until the owner is stopped, holding the lock
    pid, st = os.waitpid(owner.pid, os.WUNTRACED)
    if os.WIFSTOPPED(st):
        break
burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
out = {}
try:
    for what, body in (("commit", lambda: x.set(5)), ("read", lambda: shmstm.atomically(x.get))):
        stop = threading.Event()
        worst = [0.0, 0]

        def ticker():
            last = time.monotonic()
            while not stop.is_set():
                time.sleep(0.001)
                now = time.monotonic()
                worst[0] = max(worst[0], now - last)
                worst[1] += 1
                last = now

        def waiter():
            try:
                body()                         # spins on the stopped owner's lock, re-runs...
            except shmstm.RuntimeClosedError:
                pass

        t1 = threading.Thread(target=ticker)
        t1.start()
        t2 = threading.Thread(target=waiter, daemon=True)
        t2.start()
        time.sleep(secs)                       # the length of the measurement, not a sync
        stop.set()
        t1.join()
        out[what] = worst[0]
        out[what + "_ticks"] = worst[1]
        out[what + "_waiting"] = t2.is_alive()  # still blocked by the stopped owner
        os.kill(owner.pid, signal.SIGKILL)      # recovery releases x; the waiter finishes
        owner.wait()
        t2.join(30)
        out[what + "_finished"] = not t2.is_alive()
        if what == "commit":
            owner = subprocess.Popen(
                [sys.executable, "-c", "import shmstm, sys; shmstm.open(sys.argv[1]).tvar('x', 0).value = 1", name],
                env=dict(os.environ, SHMSTM_FAULT="commit.locked_one:1:stop"))
            while not os.WIFSTOPPED(os.waitpid(owner.pid, os.WUNTRACED)[1]):
                pass
finally:
    for b in burners:
        b.kill()
    if owner.poll() is None:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
print(json.dumps(out), flush=True)
rt.close()
shmstm.unlink(name)
os._exit(0)
