"""Blocking: retry / check / or_else wake-ups across processes, and retry timeouts.

A lost wake-up would hang; every wait here is bounded (transaction timeouts in the
children, deadlines in the parent) so it fails the test instead.
"""

import multiprocessing
import queue
import signal
import time

import pytest

import shmstm
from _helpers import Group, deadline_for, scaled, wait_event, wait_until_blocked


# A blocked transaction whose wake-up was lost is released only when its timeout
# expires and the re-check finds the change: no exception, just a stall.  So every
# blocking call is timed, and a stall this long fails the test (a healthy hand-off
# takes microseconds; this bound only allows for a badly overloaded machine).
STALL = 3.0
OP_TIMEOUT = 6.0


def _timed(what, fn, *args):
    t0 = time.monotonic()
    r = fn(*args)
    dt = time.monotonic() - t0
    if dt > STALL:
        raise AssertionError("%s blocked %.1f s: lost wake-up?" % (what, dt))
    return r


# -- producer/consumer hand-off through one slot ------------------------------------

def _producer(start, slot, n, timeout):
    @shmstm.atomic(timeout=timeout)
    def put(i):
        shmstm.check(slot.value is None)
        slot.value = i

    start()
    for i in range(n):
        _timed("put(%d)" % i, put, i)
    return n


def _consumer(start, slot, n, timeout):
    attempts = [0]

    @shmstm.atomic(timeout=timeout)
    def take():
        attempts[0] += 1
        v = slot.value
        if v is None:
            shmstm.retry()
        slot.value = None
        return v

    start()
    out_of_order = []
    for i in range(n):
        v = _timed("take #%d" % i, take)
        if v != i and len(out_of_order) < 10:
            out_of_order.append((i, v))
    return {"bad": out_of_order, "attempts": attempts[0]}


@pytest.mark.stress
@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_handoff_no_lost_wakeup(runtime, ctx):
    """Lost wake-up: a consumer blocked in retry() on an empty slot is woken by a
    producer in another process (and the producer, blocked by check() on a full slot, by
    the consumer); 10,000+ hand-offs deliver every value exactly once, in order, and no
    call stalls (a lost wake-up shows as a stall until the transaction's timeout)."""
    slot = runtime.new_tvar(None)
    n = scaled(10000, minimum=10000)
    with Group(ctx, timeout=deadline_for(60)) as g:
        c = g.add(_consumer, slot, n, OP_TIMEOUT)
        p = g.add(_producer, slot, n, OP_TIMEOUT)
        g.start()
        rc, rp = g.wait([c, p])
    assert rp == n
    assert rc["bad"] == [], "values received out of order / duplicated: %r" % rc["bad"]
    assert slot.value is None
    print("ctx=%s handoffs=%d consumer attempts=%d" % (ctx, n, rc["attempts"]))


# -- or_else whose branches all retry ------------------------------------------------

def _or_else_waiter(start, tvs, attempted, tried, timeout):
    def branch(i):
        def f():
            tried[i] += 1
            if not tvs[i].value:
                shmstm.retry()
            return i
        return f

    @shmstm.atomic(timeout=timeout)
    def first_attempt():
        # Signal once the branches ran (and retried), before the transaction blocks.
        try:
            return shmstm.or_else(*[branch(i) for i in range(len(tvs))])
        finally:
            attempted.set()

    start()
    t0 = time.monotonic()
    r = first_attempt()
    t1 = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes on Linux
    return {"branch": r, "waited": t1 - t0, "done_at": t1}


@pytest.mark.parametrize("ctx,n_branches,which", [
    ("fork", 2, 0), ("fork", 2, 1), ("fork", 3, 2), ("spawn", 2, 0)])
def test_or_else_all_branches_retry_wakes(runtime, ctx, n_branches, which):
    """or_else keeps every branch's reads when all branches retry: a waiter asleep in
    or_else(wait-for-a, wait-for-b[, wait-for-c]) is woken promptly when another process
    sets only one of them, and returns from that branch (ZIO #8696, dejafu #55)."""
    mp = multiprocessing.get_context(ctx)
    tvs = [runtime.new_tvar(False) for _ in range(n_branches)]
    attempted = mp.Event()
    tried = mp.Array("l", n_branches)
    with Group(mp, timeout=deadline_for(30)) as g:
        w = g.add(_or_else_waiter, tvs, attempted, tried, 30.0)
        g.start()
        # All branches ran and retried, and the waiter is asleep in retry(): only a
        # wake-up by the commit below can release it.
        wait_event(attempted, 20, "the waiter's first attempt")
        assert all(t >= 1 for t in tried[:]), list(tried)
        wait_until_blocked(runtime, g.procs[w].pid, 20)
        set_at = time.monotonic()
        tvs[which].value = True  # a one-TVar transaction from another process
        (res,) = g.wait([w], timeout=STALL)  # no answer by then: the wake-up was lost
    assert res["branch"] == which, res
    # Woken by the commit, not by its own timeout expiring and re-checking.
    assert res["done_at"] - set_at < STALL, (
        "waiter returned %.1f s after the write: its wake-up was lost"
        % (res["done_at"] - set_at))
    assert [t.value for t in tvs] == [i == which for i in range(n_branches)]
    print("tried=%r waited=%.3fs woken after %.4fs" % (
        list(tried), res["waited"], res["done_at"] - set_at))


# -- timeouts and blocking without spinning (single process) -------------------------

def test_retry_timeout_raises(runtime):
    """@atomic(timeout=0.2) on a transaction that always retries raises
    shmstm.RetryTimeout (a TimeoutError and a shmstm.Error) after about 0.2 s, having
    blocked rather than spun, discarding its writes; the runtime still works after."""
    tv = runtime.new_tvar(0)
    other = runtime.new_tvar("old")
    attempts = [0]

    @shmstm.atomic(timeout=0.2)
    def never():
        attempts[0] += 1
        other.value = "written by a retrying transaction"
        if tv.value == 0:
            shmstm.retry()
        return "woke?"

    t0 = time.monotonic()
    with pytest.raises(shmstm.RetryTimeout) as ei:
        never()
    dt = time.monotonic() - t0
    assert isinstance(ei.value, TimeoutError)
    assert isinstance(ei.value, shmstm.Error)
    assert 0.15 <= dt < 5.0, dt
    # Blocking, not polling: with nothing changing, re-running the body more than
    # once per ~2 ms would be a spin.
    assert attempts[0] <= 100, "retry() re-ran the body %d times in 0.2 s" % attempts[0]
    assert other.value == "old"
    assert not shmstm.in_transaction()

    @shmstm.atomic(timeout=0.2)
    def never_check():
        shmstm.check(tv.value == 1)

    with pytest.raises(TimeoutError):
        never_check()

    @shmstm.atomic(timeout=0.2)
    def or_else_both_retry():
        return shmstm.or_else(lambda: shmstm.check(tv.value == 1),
                              lambda: shmstm.check(other.value == "new"))

    with pytest.raises(shmstm.RetryTimeout):
        or_else_both_retry()

    tv.value = 1
    assert never() == "woke?"
    assert other.value == "written by a retrying transaction"
    assert shmstm.atomically(lambda: tv.value + 1) == 2


def _blocked_forever_child(q, tv):
    try:
        shmstm.atomically(shmstm.retry)
    except shmstm.BlockedForeverError as e:
        q.put(("BlockedForeverError", isinstance(e, shmstm.Error)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((type(e).__name__, repr(e)))
    else:
        q.put(("returned", None))
    # The runtime still works afterwards.
    tv.value = tv.value + 1
    q.put(("ok", tv.value))


def test_retry_with_nothing_read_is_blocked_forever(runtime):
    """retry() in a transaction that read nothing can never be woken: it raises
    shmstm.BlockedForeverError instead of hanging (checked in a child so a hang fails
    the test by timeout)."""
    tv = runtime.new_tvar(0)
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    p = mp.Process(target=_blocked_forever_child, args=(q, tv), daemon=True)
    p.start()
    try:
        try:
            first = q.get(timeout=20)
            second = q.get(timeout=20)
        except queue.Empty:
            pytest.fail("retry() with nothing read hung instead of raising "
                        "BlockedForeverError")
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    assert first == ("BlockedForeverError", True), first
    assert second == ("ok", 1), second
    assert p.exitcode == 0


# -- the timeout is a total, however often the waiter is woken ----------------------

def _churn_writer(start, tv, stop):
    start()
    n = 0
    while not stop.is_set():
        tv.value = n  # never negative: wakes the waiter without satisfying it
        n += 1
    return n


@pytest.mark.parametrize("ctx", ["fork"])
def test_retry_timeout_is_total_across_wakeups(runtime, ctx):
    """@atomic(timeout=0.5) bounds the total blocking time: a waiter woken over and
    over by commits that never satisfy its condition still raises RetryTimeout after
    about 0.5 s (not 0.5 s after the last wake-up, which would be never)."""
    tv = runtime.new_tvar(0)
    mp = multiprocessing.get_context(ctx)
    stop = mp.Event()
    attempts = [0]

    @shmstm.atomic(timeout=0.5)
    def wait_negative():
        attempts[0] += 1
        shmstm.check(tv.value < 0)

    with Group(mp, timeout=deadline_for(30)) as g:
        w = g.add(_churn_writer, tv, stop)
        g.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(shmstm.RetryTimeout):
                wait_negative()
            dt = time.monotonic() - t0
        finally:
            stop.set()
        (writes,) = g.wait([w])
    assert 0.4 <= dt < STALL, "RetryTimeout after %.2f s (timeout 0.5 s)" % dt
    print("timeout after %.3fs, %d attempts, %d writes" % (dt, attempts[0], writes))


# -- a signal handler raising while the transaction sleeps in retry() ---------------

class _Interrupted(Exception):
    pass


def _interrupted_child(q, tv, flag):
    def on_alarm(signum, frame):
        raise _Interrupted()

    signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        try:
            shmstm.atomically(lambda: shmstm.check(tv.value == 1))  # no timeout
            q.put(("returned", None))
            return
        except _Interrupted:
            q.put(("interrupted", time.monotonic() - t0))
        assert not shmstm.in_transaction()
        # The runtime is still usable: a write, and a blocking wait the parent ends.
        tv.value = 2
        q.put(("wrote", tv.value))
        r = shmstm.atomic(timeout=20)(lambda: shmstm.check(flag.value) or flag.value)()
        q.put(("woken", r))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", repr(e)))


def test_signal_during_retry(runtime):
    """An exception raised by a signal handler while a transaction sleeps in retry()
    (no timeout) propagates promptly, leaves no transaction behind, and the process
    can write and block/wake again afterwards (EINTR path)."""
    tv = runtime.new_tvar(0)
    flag = runtime.new_tvar(False)
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    p = mp.Process(target=_interrupted_child, args=(q, tv, flag), daemon=True)
    p.start()
    got = []
    try:
        for _ in range(2):
            got.append(q.get(timeout=20))
        assert got[0][0] == "interrupted" and got[0][1] < STALL, got
        assert got[1] == ("wrote", 2), got
        wait_until_blocked(runtime, p.pid, 20)
        flag.value = True
        got.append(q.get(timeout=STALL))
        assert got[2] == ("woken", True), got
    except queue.Empty:
        pytest.fail("child stopped answering after %r" % (got,))
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    assert p.exitcode == 0
    assert tv.value == 2
