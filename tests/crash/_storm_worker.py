"""A worker of the signal storm (test_async_exceptions.py).

``python _storm_worker.py NAME N_ACCOUNTS SEED``: open -> transfers -> close,
in a loop, in three kinds of thread at once:

* the main thread, while a 0.2-3 ms ITIMER_REAL timer's handler raises in it
  and the parent's SIGINT (KeyboardInterrupt) and SIGTERM (a handler that
  raises) land at random moments;
* a long-lived thread, and short-lived threads it starts one after another
  (each ends after one cycle: its context is given back when it ends), while
  an injector thread raises in them with PyThreadState_SetAsyncExc.

A thread is a target only while it is "armed", inside its own open ->
transfers -> close: the standard library's threading (Thread.start, join, the
thread's bootstrap) is not safe against asynchronous exceptions, and breaking
it is not the point.  A thread disarms itself and clears any exception still
pending for it before it leaves that part.

Prints "ready" once the handlers are in place, and stops when a line arrives
on stdin (the parent stops signalling first).  Then, with every signal
ignored and every thread ended, it closes the runtime until it says it is
closed and prints one JSON line: cycles completed, exceptions caught, the
slots of the segment still owned by this process and whether it still maps
the segment (both must be empty).
"""
import ctypes
import json
import os
import random
import signal
import sys
import threading

import shmstm
from shmstm.shm import segments as _segments

LIMITS = dict(max_tvars=256, heap_size=1 << 16, max_procs=24)


class Storm(Exception):
    """Raised by the signal handlers and injected into threads."""


def cycle(name, n_acc, rng):
    """One open -> transfers -> close."""
    with shmstm.open(name, **LIMITS) as rt:
        transfers(rt, n_acc, rng, rng.randint(1, 20))


def raise_storm(signum, frame):
    """The handler of SIGALRM, SIGINT and SIGTERM: raises (KeyboardInterrupt
    for SIGINT) if the signal landed inside cycle(), anywhere down to the
    core's calls; a signal that lands in this harness is ignored (no Python
    loop can catch an exception at its own back edge)."""
    f = frame
    while f is not None:
        if f.f_code is cycle.__code__:
            raise KeyboardInterrupt if signum == signal.SIGINT else Storm(signum)
        f = f.f_back


_set_async_exc = ctypes.pythonapi["PyThreadState_SetAsyncExc"]
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_clear_async_exc = ctypes.pythonapi["PyThreadState_SetAsyncExc"]     # exc NULL: clear
_clear_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)


class Targets:
    """The threads the injector may hit now."""

    def __init__(self):
        self.lock = threading.Lock()
        self.armed = set()
        self.injected = 0

    def arm(self):
        with self.lock:
            self.armed.add(threading.get_ident())

    def disarm(self):
        """Leave the armed part: no injection after this returns."""
        me = threading.get_ident()
        while True:
            try:
                with self.lock:
                    self.armed.discard(me)
                # One injected before the discard may still be pending.
                _clear_async_exc(me, None)
                return
            except Storm:
                pass

    def inject(self, rng):
        with self.lock:
            if self.armed:
                tid = rng.choice(sorted(self.armed))
                self.injected += _set_async_exc(tid, Storm)


def transfers(rt, n_acc, rng, k):
    accts = [rt.tvar("acct:%d" % i) for i in range(n_acc)]

    @shmstm.atomic
    def move(i, j, amt):
        a, b = accts[i], accts[j]
        if a.value >= amt:
            a.value -= amt
            b.value += amt

    for _ in range(k):
        i, j = rng.sample(range(n_acc), 2)
        move(i, j, rng.randint(1, 50))


def main():
    name, n_acc, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    stop = threading.Event()
    targets = Targets()
    counts = {"cycles": 0, "caught": 0, "thread_cycles": 0, "thread_caught": 0}

    def armed_cycle(r):
        targets.arm()
        try:
            cycle(name, n_acc, r)
            counts["thread_cycles"] += 1
        except Storm:
            counts["thread_caught"] += 1
        finally:
            targets.disarm()

    def short_lived(tseed):
        r = random.Random(tseed)
        try:
            armed_cycle(r)
        except Storm:                   # landed before armed_cycle's try
            counts["thread_caught"] += 1
            targets.disarm()

    def long_lived():
        r = random.Random(seed + 2)
        while not stop.is_set():
            t = threading.Thread(target=short_lived, args=(r.random(),))
            t.start()
            t.join()
            try:
                armed_cycle(r)
            except Storm:
                counts["thread_caught"] += 1
                targets.disarm()

    def injector():
        r = random.Random(seed + 1)
        while not stop.wait(r.uniform(0.0002, 0.002)):
            targets.inject(r)

    workers = [threading.Thread(target=long_lived), threading.Thread(target=injector)]
    for t in workers:
        t.start()
    for s in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM):
        signal.signal(s, raise_storm)
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0002, 0.001),
                         rng.uniform(0.0003, 0.003))
        try:
            cycle(name, n_acc, rng)
            counts["cycles"] += 1
        except (Storm, KeyboardInterrupt):
            counts["caught"] += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    for t in workers:
        t.join()
    counts["injected"] = targets.injected
    # What a user does after an interrupted close: close until it says closed.
    rt = shmstm.open(name, **LIMITS)
    while not rt.closed:
        rt.close()
    procs = [p for d in shmstm.list_segments() if d["name"] == name for p in d["processes"]]
    counts["own_slots"] = [p["slot"] for p in procs if p["pid"] == os.getpid()]
    ino = os.stat(_segments.SHM_DIR + _segments.shm_name(name)).st_ino
    with open("/proc/self/maps") as f:
        counts["mapped"] = any(len(p) == 6 and p[4] == str(ino)
                               for p in (ln.split(None, 5) for ln in f))
    counts["threads"] = threading.active_count()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
