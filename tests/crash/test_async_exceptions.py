"""An asynchronous exception at any point gives every shared resource back
exactly once (a signal handler that raises, KeyboardInterrupt,
PyThreadState_SetAsyncExc).

Regression: Runtime.close() freed a context in one call and marked it freed in
the next bytecode; an exception in between left a freed pointer that close()
or the garbage collector freed again, releasing a process slot another owner
had claimed (SIGSEGV, "double free", a bank whose total drifted), and slots
leaked until TooManyProcessesError.

The deterministic tests run ``_async_exc.py``: an operation of the public API
interrupted, in turn, at every point of shmstm's own code where CPython can
deliver an asynchronous exception; after each run the process must own no slot
and map no segment once it has closed the runtime, and the test's own slot and
the accounts' total must be intact.
"""
import json
import os
import subprocess
import sys

import pytest

import shmstm

pytestmark = pytest.mark.crash

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_async_exc.py")
ACCT_LIMITS = dict(max_tvars=64, heap_size=1 << 16, max_procs=16)   # _async_exc.LIMITS


def run_injections(name, mode):
    total = 400
    with shmstm.open(name, **ACCT_LIMITS) as rt:
        for i in range(4):
            rt.tvar("acct%d" % i, total // 4)
        rt.tvar("acct0").value                      # this process holds a slot meanwhile
        r = subprocess.run([sys.executable, SCRIPT, mode, name, str(os.getpid()), str(total)],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, "exit %d (a crash?)\n%s" % (r.returncode, r.stderr[-4000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        mine = [p for d in shmstm.list_segments() if d["name"] == name
                for p in d["processes"] if p["pid"] == os.getpid()]
        assert mine, "the test's own slot was given away"
        total_now = shmstm.atomically(lambda: sum(rt.tvar("acct%d" % i).value for i in range(4)))
    print("%s: %d points, %d injected" % (mode, res["points"], res["injected"]))
    assert res["points"] > 50 and res["injected"] > 0.9 * res["points"], res
    assert res["problems"] == []
    assert total_now == total


def test_an_exception_anywhere_in_open_transact_close_leaves_no_slot_and_no_mapping(segname):
    """Conservation and exactly-once release: open -> transfer -> a thread's
    transfer -> close, interrupted in the main thread at each point in turn."""
    run_injections(segname, "close")


def test_an_exception_anywhere_in_a_thread_gives_its_slot_back_when_it_ends(segname):
    """No slot stays held by a live process once its threads have ended: the
    worker thread is interrupted at each point in turn."""
    run_injections(segname, "thread")
