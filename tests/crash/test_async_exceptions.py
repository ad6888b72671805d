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


def test_an_exception_anywhere_in_a_retry_wait_leaves_close_nothing_to_wait_for(segname):
    """Regression: an exception landing just after a wait registered itself
    (or just before it unregistered) left close() waiting for it forever."""
    run_injections(segname, "wait")


def test_an_exception_anywhere_in_a_thread_gives_its_slot_back_when_it_ends(segname):
    """No slot stays held by a live process once its threads have ended: the
    worker thread is interrupted at each point in turn."""
    run_injections(segname, "thread")


STORM = os.path.join(HERE, "_storm_worker.py")
STORM_LIMITS = dict(max_tvars=256, heap_size=1 << 16, max_procs=24)     # _storm_worker.LIMITS


def test_signal_storm_open_transfer_close(segname):
    """Conservation, no crash, no slot left: each round, 3 workers loop over
    open -> transfers (some in a second thread) -> close while a 0.2-3 ms
    timer raises in them, this process sends SIGINT/SIGTERM at random
    moments and a thread injects exceptions into their transfer threads.
    After every round: no worker died of a signal (SIGSEGV, SIGABRT), the
    accounts hold the total, and no slot is held by anyone but this process;
    each worker, alive, owned no slot and mapped nothing once closed."""
    import random
    import signal
    import time

    rounds = int(os.environ.get("SHMSTM_STORM_ROUNDS", "8"))
    seconds = float(os.environ.get("SHMSTM_STORM_SECONDS", "1.0"))
    n_acc = 8
    rng = random.Random(18)
    totals = {"cycles": 0, "caught": 0, "thread_cycles": 0, "thread_caught": 0, "injected": 0, "sent": 0}
    with shmstm.open(segname, **STORM_LIMITS) as rt:
        for i in range(n_acc):
            rt.tvar("acct:%d" % i, 1000)
        rt.tvar("acct:0").value                     # this process holds one slot
        for rnd in range(rounds):
            workers = [subprocess.Popen(
                [sys.executable, STORM, segname, str(n_acc), str(rnd * 10 + k)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True) for k in range(3)]
            for w in workers:
                assert w.stdout.readline().strip() == "ready", w.stderr.read()[-3000:]
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                w = rng.choice(workers)
                w.send_signal(rng.choice((signal.SIGINT, signal.SIGTERM)))
                totals["sent"] += 1
                time.sleep(rng.uniform(0.001, 0.01))
            reports = []
            for w in workers:
                out, err = w.communicate("stop\n", timeout=120)
                assert w.returncode == 0, "round %d: worker exit %d\n%s" % (
                    rnd, w.returncode, err[-4000:])
                reports.append(json.loads(out.strip().splitlines()[-1]))
            for r in reports:
                assert r["own_slots"] == [] and not r["mapped"], (rnd, r)
                for k in ("cycles", "caught", "thread_cycles", "thread_caught", "injected"):
                    totals[k] += r[k]
            balances = shmstm.atomically(
                lambda: [rt.tvar("acct:%d" % i).value for i in range(n_acc)])
            assert sum(balances) == 1000 * n_acc, (rnd, balances)
            procs = [p for d in shmstm.list_segments() if d["name"] == segname
                     for p in d["processes"]]
            assert [p["pid"] for p in procs] == [os.getpid()], (rnd, procs)
    print("storm: %d rounds x 3 workers x %.1f s: main threads %d cycles completed, %d "
          "interrupted (timer + %d SIGINT/SIGTERM sent); other threads %d cycles, %d "
          "interrupted (%d injected)" % (
              rounds, seconds, totals["cycles"], totals["caught"], totals["sent"],
              totals["thread_cycles"], totals["thread_caught"], totals["injected"]))
    assert totals["cycles"] > 0 and totals["caught"] > 100 * rounds
    assert totals["thread_cycles"] > 0 and totals["thread_caught"] > 10 * rounds


REENTRY = r'''
import json, signal, sys, threading, time
import shmstm
rt = shmstm.open(sys.argv[1], max_tvars=256, heap_size=1 << 16, max_procs=24)
a, b, flag, noise = rt.tvar("a", 0), rt.tvar("b", 0), rt.tvar("flag", 0), rt.tvar("noise", 0)
res = {"ok": 0, "refused": 0, "other": 0}

def inc(tv):
    tv.value += 1

guard = [False]

def handler(signum, frame):
    if guard[0]:
        return      # a handler interrupting a handler interleaves with it: not tested here
    guard[0] = True
    try:
        if in_wait[0] and shmstm.in_transaction():
            return  # it would join the waiting transaction's attempt, which retries
        shmstm.atomically(inc, noise if in_wait[0] else b)
        res["ok"] += 1
    except shmstm.Error as e:
        res["refused" if "cannot start while" in str(e) else "other"] += 1
    finally:
        guard[0] = False

in_wait = [False]
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0004, 0.0004)
acked = 0
t_end = time.monotonic() + 1.5
while time.monotonic() < t_end:
    shmstm.atomically(inc, a)
    acked += 1
ok_before_wait = res["ok"]
in_wait[0] = True
threading.Timer(0.5, lambda: flag.set(1)).start()
shmstm.atomically(lambda: shmstm.check(flag.value == 1))   # handlers run during the wait
signal.setitimer(signal.ITIMER_REAL, 0)
signal.signal(signal.SIGALRM, signal.SIG_IGN)
res.update(acked=acked, a=a.value, b=b.value, noise=noise.value, ok_before_wait=ok_before_wait)
rt.close()
print(json.dumps(res))
'''


def test_a_signal_handlers_transaction_never_undoes_the_threads_own(segname):
    """Regression (lost acknowledged commits): a SIGALRM handler running a
    transaction while its thread's transaction committed reset the thread's
    context, and the thread's atomically() returned without committing.  Now
    a handler's transaction is refused while its thread commits, joins the
    thread's transaction while its function runs (as a nested atomically),
    and runs on its own while the thread waits in retry() (which then
    re-runs); every transaction that returned is in the TVars, and nothing
    else is."""
    with shmstm.open(segname, **STORM_LIMITS):
        r = subprocess.run([sys.executable, "-c", REENTRY, segname], capture_output=True,
                           text=True, timeout=120, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["a"] == res["acked"] > 0, res
    assert res["b"] == res["ok_before_wait"] and res["noise"] == res["ok"] - res["ok_before_wait"]
    assert res["other"] == 0 and res["noise"] > 0, res
    print("re-entry: %d thread commits, %d handler commits (%d during a retry wait), %d "
          "refused" % (res["acked"], res["ok"], res["noise"], res["refused"]))


def test_a_transaction_that_touched_nothing_gives_the_irrevocable_token_back(runtime):
    """Regression: an attempt that ended before its first TVar access (here:
    its function raised) kept the irrevocable token its loop had taken, and
    every writer of every process waited until the thread's next transaction."""
    from shmstm._core import lib

    runtime.tvar("x", 0).value = 1
    ctx = runtime._ctx()
    assert lib.shmstm_tx_irrevocable(ctx.ptr, -1) == 0
    assert runtime.stats()["irrevocable_holder_slot"] == ctx.ptr.slot
    with pytest.raises(ZeroDivisionError):
        shmstm.atomically(lambda: 1 / 0)
    assert runtime.stats()["irrevocable_holder_slot"] is None


CLOSED_UNDER = r'''
import sys, threading
import shmstm
rt = shmstm.open(sys.argv[1], max_tvars=256, heap_size=1 << 16, max_procs=24)
tv = rt.tvar("x", 5)
bound, closed, out = threading.Event(), threading.Event(), []

def other():
    out.append(shmstm.atomically(lambda: tv.value))   # binds this thread's context
    bound.set()
    closed.wait()
    for op in (lambda: shmstm.atomically(lambda: tv.value), lambda: tv.value,
               lambda: tv.set(6)):
        try:
            op()
            out.append("no error")
        except shmstm.RuntimeClosedError:
            out.append("closed")

t = threading.Thread(target=other)
t.start()
bound.wait()
rt.close()
closed.set()
t.join()
print(out)
'''


def test_a_thread_that_uses_a_runtime_closed_by_another_gets_runtime_closed_error(segname):
    """Regression (use after free): close() freed every thread's context, and
    another thread's next transaction used the freed memory.  Now close()
    gives back their slots and leaves the memory to their owners: the thread
    gets RuntimeClosedError."""
    with shmstm.open(segname, **STORM_LIMITS):
        r = subprocess.run([sys.executable, "-c", CLOSED_UNDER, segname], capture_output=True,
                           text=True, timeout=60, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[5, 'closed', 'closed', 'closed']", r.stdout
