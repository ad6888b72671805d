"""Random SIGKILLs of worker processes during a bank workload (real processes, real
shared memory, real ``kill -9``).

Oracle: the conserved total (checked after every kill by a transaction reading every
account, by audits inside the workers, and at the end by this process's own build),
plus the kernel-level facts: every survivor completes a new commit after each kill,
and no TVar lock is held once the workload has stopped.
"""
import collections

import pytest

from _common import LIMITS, final_check, soak_only, summary

pytestmark = pytest.mark.crash

N_ACC = 8       # few accounts: a dead worker's locks are met by survivors at once


def _run(run_driver, segname, kills, seconds):
    r = run_driver("bank_kills", {
        "name": segname, "limits": dict(LIMITS), "accounts": N_ACC, "workers": 3,
        "kills": kills, "max_seconds": seconds,
        # Debug-build delays at every commit step (30 %: up to 300 us): commits last
        # long enough that a victim is often stopped inside one.
        "delay_permille": 300, "delay_max_us": 300})
    assert r["debug_build"]
    return r


def _check(r, segname, kills):
    assert r["errors"] == [], r["errors"]
    k = r["kills"]
    assert len(k) >= kills, "only %d kills in the time budget" % len(k)
    in_commit = sum(x["in_commit"] for x in k)
    assert in_commit >= len(k) // 2, "only %d of %d kills inside a commit" % (in_commit, len(k))
    late = [x for x in k if x["survivors_s"] is None or x["survivors_s"] > 2.0]
    assert not late, "survivors did not commit again within 2 s after %d kills: %r" % (
        len(late), late[:5])
    slow = [x for x in k if x["all_accounts_s"] > 2.0]
    assert not slow, "a read of every account took > 2 s after a kill: %r" % slow[:5]
    assert all(x["total_ok"] for x in k), "a kill broke the total"
    assert r["bad_audits_in_workers"] == 0
    assert r["locks_at_quiescence"] == [], r["locks_at_quiescence"]
    assert r["final_total"] == r["total"]
    final_check(segname, N_ACC)
    print("kills=%d in-commit=%d states=%s" % (
        len(k), in_commit, dict(collections.Counter(x["state"] for x in k))))
    print("kill -> every survivor committed again: %s" % summary([x["survivors_s"] for x in k]))
    print("kill -> a transaction reading every account done: %s" % summary(
        [x["all_accounts_s"] for x in k]))


def test_random_sigkills_bank(segname, run_driver):
    """>= 200 SIGKILLs of 3 bank workers (half of them while the victim is inside a
    commit: stopped with SIGSTOP, its commit record read, then killed); after each kill
    every survivor commits again within 2 s and the total is intact; at the end the
    total is conserved and no lock is held by anyone."""
    _check(_run(run_driver, segname, 200, 90), segname, 200)


@soak_only
def test_random_sigkills_bank_soak(segname, run_driver):
    """The same with 5000 kills (SHMSTM_SOAK=1)."""
    _check(_run(run_driver, segname, 5000, 1800), segname, 5000)
