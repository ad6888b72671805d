"""Asynchronous exceptions at every bytecode (run by test_async_exceptions.py).

``python _async_exc.py MODE NAME HOLDER_PID TOTAL [STRIDE]`` runs one operation
of shmstm's public API once to count the points in shmstm's own code where an
asynchronous exception can land (see _AFTER), then again and again, each time
with a KeyboardInterrupt raised at the k-th of those points (a trace function
with ``f_trace_opcodes``).  After each interrupted run it
finishes with the public API only (``close()`` until the runtime says it is
closed), then checks:

* no slot of the segment is owned by this process (a context given back
  exactly once: never kept, never freed twice);
* this process maps no segment of the runtime (the mapping was released);
* the holder process (the test) still owns its slot, and the accounts still
  hold TOTAL (nothing another process owns was damaged).

A double free of a context usually aborts the process (glibc, ASan); the test
reads the exit status.  Prints one JSON line of observations.

Modes:
  close   open -> transfer -> a thread's transfer -> close, interrupted in the
          main thread (contexts, slots, the mapping, close's teardown)
  thread  the same, interrupted in the worker thread only (a thread's context
          and its release when the thread ends)
  wait    open -> a retry() wait that times out -> close (a wait that close()
          would wait for forever if its registration were kept)
"""
import dis
import json
import os
import sys
import threading

import shmstm
from shmstm.shm import segments as _segments

PKG = os.path.dirname(os.path.abspath(shmstm.__file__)) + os.sep
LIMITS = dict(max_tvars=64, heap_size=1 << 16, max_procs=16)
ACCOUNTS = 4


# CPython runs signal handlers and raises asynchronous exceptions at its "eval
# breaker" checks: when a function starts, at a loop's back edge, and when a
# call returns.  So the instructions an asynchronous exception can land before
# are a frame's first one and the ones right after a call or a backward jump.
# (Between other instructions, e.g. inside a `with` block's exit sequence
# before the call of __exit__, no exception can arrive.)
_AFTER = {dis.opmap[n] for n in ("CALL", "CALL_FUNCTION_EX", "JUMP_BACKWARD", "CALL_KW")
          if n in dis.opmap}


class Injector:
    """Counts the points in shmstm's code where an asynchronous exception can
    land (see _AFTER), or raises KeyboardInterrupt at the ``at``-th of them."""

    def __init__(self, at=None):
        self.at = at
        self.n = 0
        self.fired = False
        self.prev = {}

    def global_trace(self, frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(PKG):
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self.local_trace

    def local_trace(self, frame, event, arg):
        if event == "opcode":
            op = frame.f_code.co_code[frame.f_lasti]
            prev = self.prev.get(frame, -1)
            self.prev[frame] = op
            if prev == -1 or prev in _AFTER:
                n = self.n
                self.n = n + 1
                if n == self.at:
                    self.fired = True
                    raise KeyboardInterrupt("injected at point %d" % n)
        elif event == "return":
            self.prev.pop(frame, None)
        return self.local_trace


def wait_operation(name, inj):
    """open -> a retry() that waits and times out -> close: the wait's
    registration (close() waits for registered waits) must be given back."""
    sys.settrace(inj.global_trace)
    try:
        with shmstm.open(name, **LIMITS) as rt:
            acct = rt.tvar("acct0")
            try:
                shmstm.atomic(timeout=0.002)(lambda: shmstm.check(acct.value < -1))()
            except shmstm.RetryTimeout:
                pass
    finally:
        sys.settrace(None)


def operation(name, main_inj, thread_inj):
    def transfer(rt):
        accts = [rt.tvar("acct%d" % i) for i in range(ACCOUNTS)]

        @shmstm.atomic
        def move():
            accts[0].value -= 1
            accts[1].value += 1
        move()

    def in_thread(rt):
        if thread_inj is not None:
            sys.settrace(thread_inj.global_trace)
        try:
            transfer(rt)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)

    if main_inj is not None:
        sys.settrace(main_inj.global_trace)
    try:
        with shmstm.open(name, **LIMITS) as rt:
            transfer(rt)
            t = threading.Thread(target=in_thread, args=(rt,))
            t.start()
            t.join()
    finally:
        sys.settrace(None)


def finish(name):
    """What a user does after an interrupted close: close again, until closed."""
    rt = shmstm.open(name, **LIMITS)
    while not rt.closed:
        rt.close()


def mapped_here(name):
    try:
        ino = os.stat(_segments.SHM_DIR + _segments.shm_name(name)).st_ino
    except FileNotFoundError:
        return False
    with open("/proc/self/maps") as f:
        return any(len(p) == 6 and p[4] == str(ino) for p in (ln.split(None, 5) for ln in f))


def check(name, holder, total, k):
    problems = []
    seg = [d for d in shmstm.list_segments() if d["name"] == name]
    procs = seg[0]["processes"] if seg else []
    mine = [p["slot"] for p in procs if p["pid"] == os.getpid()]
    if mine:
        problems.append("k=%d: slots %s still owned by this process" % (k, mine))
    if not any(p["pid"] == holder for p in procs):
        problems.append("k=%d: the holder's slot was given away" % k)
    if mapped_here(name):
        problems.append("k=%d: the segment is still mapped here" % k)
    with shmstm.open(name, **LIMITS) as rt:
        s = shmstm.atomically(lambda: sum(rt.tvar("acct%d" % i).value for i in range(ACCOUNTS)))
    while not rt.closed:
        rt.close()
    if s != total:
        problems.append("k=%d: accounts hold %d, not %d" % (k, s, total))
    return problems


def main():
    mode, name, holder, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    stride = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    def run(inj):
        if mode == "close":
            operation(name, inj, None)
        elif mode == "thread":
            operation(name, None, inj)
        else:
            wait_operation(name, inj)

    count = Injector()
    run(count)
    finish(name)
    n = count.n
    fired = 0
    problems = check(name, holder, total, -1)
    for k in range(0, n, stride):
        inj = Injector(at=k)
        try:
            run(inj)
        except KeyboardInterrupt:
            pass
        fired += inj.fired
        finish(name)
        problems += check(name, holder, total, k)
        if len(problems) > 20:
            break
    print(json.dumps({"points": n, "injected": fired, "problems": problems}))


if __name__ == "__main__":
    main()
