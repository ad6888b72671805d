"""Asynchronous exceptions (KeyboardInterrupt from signal handlers) in a live process.

The whole lock -> validate -> publish -> release sequence is one C call, so a signal
can never leave a lock held; what a signal *can* cut short is the Python cleanup
around it.  These tests check that no interrupted transaction is ever half-applied,
later or now, and that no lock is left held.
"""
import pytest

import shmstm
from shmstm.shm import segments as _segments
from _helpers import LIMITS


class _AbortInterrupted:
    """Stands in for the compiled ``lib`` in shmstm.stm.tx: once ``armed``, the next
    call of ``shmstm_tx_abort`` raises KeyboardInterrupt *instead of* running, as if
    a signal handler had raised just before Python made that C call."""

    def __init__(self, real):
        self._real = real
        self.armed = False
        self.fired = 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def shmstm_tx_abort(self, ptr, reason):
        if self.armed and not self.fired:
            self.fired += 1
            raise KeyboardInterrupt
        return self._real.shmstm_tx_abort(ptr, reason)


def test_interrupted_cleanup_never_commits_later(runtime, monkeypatch):
    """Regression (atomicity): a KeyboardInterrupt while a commit is staging its writes,
    followed by a second one that cuts the abort short, used to leave the first
    transaction's staged entries in the thread's C context; the thread's next commit
    then applied them too: half of an interrupted transfer became visible.  Checks
    that the next, unrelated transaction changes only what it wrote.  Floats: a
    write set of ints only is staged and committed in one C call, anything else is
    staged one C call per write, which a signal can interrupt in between."""
    a, b, c = runtime.tvar("a", 100.0), runtime.tvar("b", 0.0), runtime.tvar("c", 0)
    real_stage = shmstm.stm.tx._stage_f
    calls = [0]

    def stage_then_interrupt(*args):
        calls[0] += 1
        if calls[0] == 2:                 # a's entry is staged, b's never is
            proxy.armed = True            # ... and the abort that follows is cut short
            raise KeyboardInterrupt
        return real_stage(*args)

    def transfer():
        a.value = a.value - 10
        b.value = b.value + 10

    proxy = _AbortInterrupted(shmstm.stm.tx.lib)
    monkeypatch.setattr(shmstm.stm.tx, "_stage_f", stage_then_interrupt)
    monkeypatch.setattr(shmstm.stm.tx, "lib", proxy)
    with pytest.raises(KeyboardInterrupt):
        shmstm.atomically(transfer)
    assert calls[0] == 2 and proxy.fired == 1
    monkeypatch.setattr(shmstm.stm.tx, "_stage_f", real_stage)
    monkeypatch.setattr(shmstm.stm.tx, "lib", proxy._real)
    assert not shmstm.in_transaction()
    assert (a.value, b.value) == (100.0, 0.0), "interrupted transfer visible"
    c.value = 1                             # an unrelated transaction in the same thread
    assert (a.value, b.value, c.value) == (100.0, 0.0, 1), (
        "the interrupted transfer's staged write was committed by a later transaction")
    assert _segments.lock_report(runtime.name) == []


def test_signal_interrupts_at_arbitrary_points(segname, run_driver):
    """KeyboardInterrupt raised by signal handlers at arbitrary points of transactions
    in a live process: a one-shot setitimer (SIGALRM 10-300 us after each transaction
    starts) and real SIGINTs from another process (os.kill every 0.2-3 ms), for 4 s.
    Afterwards: no lock held (scan of every TVar lock word), no half-applied write
    (transfers conserve the total; pair writes leave both halves equal), the process
    is not left inside a transaction, and the runtime keeps working."""
    r = run_driver("interrupts", {"name": segname, "limits": dict(LIMITS), "seconds": 4},
                   debug=False)
    c = r["counts"]
    print("interrupts: %r" % c)
    assert c["caught"] >= 200, "too few interrupts landed to test anything: %r" % c
    assert c["SIGINT"] >= 100 and c["SIGALRM"] >= 100, c
    assert c["in_tx_after"] == 0
    assert c["shmstm_errors"] == 0, r["errors"]
    assert r["locks"] == [], "locks held after interrupts: %r" % r["locks"]
    assert r["total"] == r["expected_total"], "half-applied transfer: total %d != %d" % (
        r["total"], r["expected_total"])
    assert r["total_after_one_more"] == r["expected_total"]
    for pa, pb in r["pairs"]:
        assert pa == pb, "half-applied pair write: %r != %r" % (pa, pb)
    rt = shmstm.open(segname, **LIMITS)
    try:
        assert sum(rt.tvar("acct:%d" % i).value for i in range(6)) == r["expected_total"]
    finally:
        rt.close()
