"""Every kill point of the commit and recovery steps, each hit at least 20 times.

Each worker process is armed (debug build) to SIGKILL itself at the n-th hit of one
point; a point is counted only when the worker died by SIGKILL *and* the fault log
written by the C core just before the kill names that point.  Recovery points fire in
a process that is recovering a dead one: dying there leaves a half-recovered slot
(RECOVERING with a dead recoverer) that the next process must finish.
Validation fails spuriously 10 % of the time (shake) so the rollback path runs too.
Oracle: conserved total, no lock held at quiescence, clean final workload.
"""
import glob
import os
import re

import pytest

from _common import LIMITS, final_check, soak_only

pytestmark = pytest.mark.crash

N_ACC = 8
COMMIT_POINTS = [
    "commit.sorted", "commit.token", "commit.locking", "commit.locked_one",
    "commit.validating", "commit.validated", "commit.committed", "commit.published_one",
    "commit.released_one", "commit.woken", "commit.freed", "commit.rollback_one",
]
RING_POINTS = ["ring.before_fill", "ring.claimed", "ring.filled"]      # durable commit point (ring.c)
RECOVER_POINTS = ["recover.claimed", "recover.published_one", "recover.entry",
                  "recover.token", "recover.before_free"]
NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "native")


def _points_in_source(prefixes):
    found = set()
    for path in glob.glob(os.path.join(NATIVE, "*.c")):
        with open(path) as f:
            found.update(re.findall(r'FAULT_POINT\("([a-z_.]+)"\)', f.read()))
    return {p for p in found if p.startswith(prefixes)}


def test_the_lists_name_every_commit_and_recovery_point():
    """The points these tests arm are every FAULT_POINT of the commit and recovery
    steps in native/ (a new step cannot go untested unnoticed)."""
    assert _points_in_source(("commit.", "recover.")) == set(COMMIT_POINTS + RECOVER_POINTS)
    assert _points_in_source(("ring.before_fill", "ring.claimed", "ring.filled")) == set(RING_POINTS)


def _run(run_driver, segname, tmp_path, target, seconds, path=None):
    lim = dict(LIMITS, max_procs=16)        # small: dead slots are reclaimed often
    if path:
        lim["path"] = path
    r = run_driver("kill_points", {
        "name": segname, "limits": lim, "accounts": N_ACC, "target": target,
        "commit_workers": 3, "recover_workers": 2, "fault_log": str(tmp_path / "fault.log"),
        "delay_permille": 50, "delay_max_us": 0, "shake_permille": 100, "max_txns": 2000,
        "max_seconds": seconds})
    assert r["debug_build"]
    assert r["errors"] == [], r["errors"][:10]
    hits = r["hits"]
    assert set(hits) == set(COMMIT_POINTS + RECOVER_POINTS + (RING_POINTS if path else []))
    low = {p: n for p, n in hits.items() if n < target}
    assert not low, "kill points hit fewer than %d times: %r" % (target, low)
    assert r["locks_at_quiescence"] == [], r["locks_at_quiescence"]
    assert r["final_total"] == r["total"]
    assert r["bad_audits_in_final"] == 0
    if path:
        assert r["durable_final"] == r["final"], "LMDB differs from the segment after the drain"
    final_check(segname, N_ACC, lim)
    print("kill points hit: %s (%d kills, %.1f s)" % (
        ", ".join("%s=%d" % kv for kv in sorted(hits.items())), sum(hits.values()), r["seconds"]))
    return r


def test_every_kill_point(segname, run_driver, tmp_path):
    """Each of the 12 commit and 5 recovery kill points hit >= 20 times (recoverers
    killed mid-recovery included); the total is conserved and no lock is held."""
    _run(run_driver, segname, tmp_path, 20, 120)


def test_every_kill_point_durable(segname, run_driver, tmp_path):
    """The same on a durable runtime (the commit point is the ring fill), plus the
    two ring points: before the fill (rolled back: the recoverer voids the slot) and
    right after it, with the record still VALIDATING (rolled forward by the slot).
    After the final drain LMDB holds exactly the segment's balances."""
    _run(run_driver, segname, tmp_path, 20, 180, path=str(tmp_path / "lmdb"))


@soak_only
def test_every_kill_point_soak(segname, run_driver, tmp_path):
    """The same with >= 500 hits per point (SHMSTM_SOAK=1)."""
    _run(run_driver, segname, tmp_path, 500, 1800)


def test_freed_tvar_rerecovered_stays_free(segname, run_driver):
    """Regression (recovery idempotence): a commit that frees a TVar dies after its
    commit point; its first recoverer dies after publishing the entry (generation
    stored, lock still held); a second recoverer finishes.  The generation must be
    set from the record (even: free), not incremented twice (which made the freed
    TVar read as live again under generation + 2)."""
    r = run_driver("free_rerecovery", {"name": segname, "limits": dict(LIMITS)})
    assert r["debug_build"]
    assert r["owner"] == "signal 9" and r["first_recoverer"] == "signal 9", r
    assert r["second_recoverer"] == "exit 0", r
    owner_lock = r["locked_after_owner"]
    assert [l["index"] for l in owner_lock] == [r["idx"]] and not owner_lock[0]["alive"]
    first = r["locked_after_first"]
    assert [l["index"] for l in first] == [r["idx"]], "first recoverer did not die mid-entry"
    assert r["locked_after_second"] == []
    assert r["live_at_gen"] == {str(r["gen"]): False, str(r["gen"] + 2): False}, r["live_at_gen"]
