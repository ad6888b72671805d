"""Shared bits of the crash tests (imported as ``from _common import ...``)."""
import os
import statistics

import pytest

import shmstm
from _helpers import LIMITS

SOAK = os.environ.get("SHMSTM_SOAK", "") not in ("", "0")


def soak(ci, long):
    """``ci`` normally, ``long`` when SHMSTM_SOAK=1 (the opt-in long variants)."""
    return long if SOAK else ci


def final_check(name, n_acc, limits=LIMITS):
    """Re-check a bank segment with this test process's own shmstm (the release
    build in CI): the total is conserved and no TVar lock is held.  Returns the
    balances."""
    from shmstm.shm import segments as _segments

    locks = _segments.lock_report(name)
    assert locks == [], "locks held at quiescence: %r" % locks
    rt = shmstm.open(name, **limits)
    try:
        accts = [rt.tvar("acct:%d" % i) for i in range(n_acc)]
        balances = shmstm.atomically(lambda: [t.value for t in accts])
    finally:
        rt.close()
    assert sum(balances) == 1000 * n_acc, "total not conserved: %r" % balances
    return balances


def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n=0"
    return "n=%d median=%.1f ms p99=%.1f ms max=%.1f ms" % (
        len(xs), 1e3 * statistics.median(xs), 1e3 * sorted(xs)[int(0.99 * (len(xs) - 1))],
        1e3 * max(xs))


soak_only = pytest.mark.skipif(not SOAK, reason="long soak variant: set SHMSTM_SOAK=1")
