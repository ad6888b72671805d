"""The flusher's group-commit tuner (shmstm.store.flusher.GroupTuner): pure logic,
fed with batch acknowledgements at chosen times.  Properties: it keeps
waiting for stragglers unless not waiting was measured faster by its margin,
it probes wait / no wait / no wait / wait, a pause of the load restarts the
probes, and it probes again after its exploit epochs."""
import pytest

from shmstm.store.flusher import GroupTuner


def feed(t, now, rate, seconds, batch=8):
    """Acknowledge batches of ``batch`` sync commits at ``rate`` commits per
    second for ``seconds``, as the flusher would; returns the new time."""
    dt = batch / rate
    end = now + seconds
    while now < end:
        now += dt
        t.note(batch, now)
    return now


def run_probes(t, now, rate_wait, rate_nowait):
    """Feed each probe at the rate of the mode it runs; returns the time."""
    seen = []
    while t.phase < len(GroupTuner.PROBES):
        seen.append(t.wait)
        phase = t.phase
        while t.phase == phase:
            now = feed(t, now, rate_wait if t.wait else rate_nowait, 0.001)
    assert seen == list(GroupTuner.PROBES)
    return now


@pytest.mark.parametrize("rate_nowait, expect_wait", [(14000, False), (10500, True), (7000, True)])
def test_keeps_the_faster_mode_and_waits_on_a_tie(rate_nowait, expect_wait):
    t = GroupTuner("auto", 0.0)
    assert t.wait                       # it starts as before the tuner: waiting
    now = run_probes(t, 0.0, 10000, rate_nowait)
    assert t.wait is expect_wait
    # It keeps that choice for its exploit epochs, whatever the rates do then ...
    for _ in range(GroupTuner.EXPLOIT - 1):
        now = feed(t, now, 10000, GroupTuner.EPOCH)
        assert t.wait is expect_wait
    # ... and then probes again, from waiting.
    now = feed(t, now, 10000, 2 * GroupTuner.EPOCH)
    assert t.phase < len(GroupTuner.PROBES)


def test_a_pause_of_the_load_restarts_the_probes():
    t = GroupTuner("auto", 0.0)
    now = feed(t, 0.0, 10000, GroupTuner.EPOCH * 1.5)   # probe 1 (wait) done
    assert t.phase == 1 and not t.wait
    t.idle(now)
    assert t.phase == 0 and t.wait
    # A pause while keeping a choice keeps it.
    now = run_probes(t, now, 10000, 20000)
    assert not t.wait
    t.idle(now)
    assert not t.wait and t.phase == len(GroupTuner.PROBES)


def test_a_probe_with_too_few_batches_measures_nothing():
    t = GroupTuner("auto", 0.0)
    # Two big batches an epoch apart: a trickle, not a measurement.
    t.note(100, 0.01)
    t.note(100, 0.01 + 2 * GroupTuner.EPOCH)
    assert t.phase == 0 and t.wait


@pytest.mark.parametrize("mode, wait", [("wait", True), ("nowait", False)])
def test_a_fixed_mode_never_changes(mode, wait):
    t = GroupTuner(mode, 0.0)
    now = feed(t, 0.0, 10000 if wait else 1000, 1.0)
    t.idle(now)
    feed(t, now, 1000 if wait else 10000, 1.0)
    assert t.wait is wait


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="SHMSTM_FLUSH_GROUP"):
        GroupTuner("sometimes", 0.0)
