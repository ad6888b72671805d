"""A stopped lock holder keeps its locks; a process killed while blocked in retry()
leaves nothing that matters."""
import pytest

from _common import LIMITS, final_check

pytestmark = pytest.mark.crash


def test_sigstop_lock_holder_keeps_its_locks(segname, run_driver):
    """Liveness is the kernel's answer, never a timeout: a bank worker is SIGSTOPped
    while it holds TVar locks (checked by scanning the lock words) for 3 s while the
    others keep trying.  Every 20 ms the same TVars are still locked by its slot and
    the slot is still its own (nobody stole them), although the others met those
    locks (conflicts counted); after SIGCONT every worker commits again, the total is
    conserved and no lock is left."""
    r = run_driver("sigstop", {
        "name": segname, "limits": dict(LIMITS), "accounts": 8, "workers": 3,
        "delay_permille": 300, "delay_max_us": 300, "stop_seconds": 3.0})
    assert r["caught"], "never caught a worker holding a lock: %r" % r
    assert r["held"], r
    assert r["observations"] >= 50
    assert r["stolen"] == [], "locks of a stopped (live) process were taken: %r" % r["stolen"]
    assert r["conflicts_during_stop"] > 0, "nobody met the stopped holder's locks"
    assert len(r["resumed_s"]) == r["workers"], "not every worker resumed: %r" % r["resumed_s"]
    assert max(r["resumed_s"].values()) < 5.0
    assert r["errors"] == [], r["errors"]
    assert r["locks_at_quiescence"] == [] and r["final_total"] == r["total"]
    final_check(segname, 8)
    print("stopped in %s holding %r; conflicts during stop=%d; commits by others=%r; "
          "resumed after SIGCONT in %s" % (r["victim_state"], r["held"],
                                          r["conflicts_during_stop"], r["commits_during_stop"],
                                          {k: round(v * 1e3, 1) for k, v in r["resumed_s"].items()}))


def test_killed_in_retry_leaves_nothing(segname, run_driver):
    """No lost wake-up, no slot leak: with max_procs=4 (this driver holds one slot),
    3 processes block in retry() on x and are SIGKILLed there.  3 new processes can
    still attach (the dead slots are reclaimed: the kernel says their owners are dead)
    and get those very slots, so the dead waiters' bits in x's waiter bitmap now name
    them, unless recovery cleared them, which it does (max_procs <= 64: the bit is
    the slot's alone): x's waiter bitmap holds exactly the dead waiters' bits before
    the kill and none after their slots are reclaimed.  A commit to x then wakes
    none of them into Python; a commit to y wakes all 3 at once."""
    r = run_driver("retry_kill", {"name": segname, "limits": dict(LIMITS, max_procs=4),
                                  "waiters": 3}, debug=False)
    assert r["blocked_before_kill"] and r["new_blocked"], r
    assert [v for k, v in sorted(r["slots_after_kill"].items()) if int(k) in r["dead_slots"]] \
        == [False] * 3, "killed waiters' slots not seen dead: %r" % r
    assert r["new_slots"] == r["dead_slots"], "new processes did not reuse the dead slots: %r" % r
    assert r["x_waiters_before_kill"] == r["dead_slots"], r
    assert r["x_waiters_after_reclaim"] == [], "dead waiters' bits left on x: %r" % r
    assert r["woken_by_x"] == [] and r["still_blocked_after_x"], (
        "a stale waiter bit woke a process into Python: %r" % r)
    assert r["retries_after_x"] == r["retries_before_x"], r
    assert all(w is not None and w < 2.0 for w in r["wake_s"]), "lost wake-up: %r" % r["wake_s"]
    assert set(r["statuses"].values()) == {"exit 0"}, r["statuses"]
    assert r["procs_left"] == [], "slots still taken after everyone left: %r" % r["procs_left"]
