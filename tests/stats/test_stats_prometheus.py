"""Prometheus conventions of shmstm-stats, checked on real processes.

* A counter never goes down within one series.  Per-slot counters restart at
  zero when a slot gets a new owner, so the per-slot series carry the claim
  (``attach_ns``) besides slot and pid: a process that closes and re-opens the
  runtime takes the same slot with the same pid, and must get a new series.
"""
import os

import shmstm
from _helpers import LIMITS
from _tool import run_tool


def _prom(name):
    from prometheus_client.parser import text_string_to_metric_families

    r = run_tool(name, "--prometheus")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return {f.name: f for f in text_string_to_metric_families(r.stdout)}


def _series(fams, family, sample=None):
    """{(slot, pid, attach_ns): value} of a per-slot family."""
    sample = sample or family
    return {(s.labels["slot"], s.labels["pid"], s.labels["attach_ns"]): s.value
            for s in fams[family].samples if s.name == sample}


def test_same_pid_reclaiming_its_slot_is_a_new_series(segname):
    """close() frees this process's slot and a re-open claims it again, with
    the same pid and counters from zero: the old series must not continue."""
    rt = shmstm.open(segname, **LIMITS)
    try:
        x = rt.tvar("x", 0)
        for i in range(3):
            x.value = i + 1
        before = _series(_prom(segname), "shmstm_commits", "shmstm_commits_total")
        (key1, n1), = before.items()
        assert key1[1] == str(os.getpid()) and n1 == 3
    finally:
        rt.close()
    rt = shmstm.open(segname, **LIMITS)
    try:
        rt.tvar("x").value = 10
        fams = _prom(segname)
        after = _series(fams, "shmstm_commits", "shmstm_commits_total")
        (key2, n2), = after.items()
        assert key2[:2] == key1[:2] and n2 == 1       # same slot, same pid, fresh counter
        assert key2 != key1, "a counter series went from %d down to %d" % (n1, n2)
        assert key2[2] == str(rt.stats()["processes"][0]["attach_ns"])
        # every per-slot family labels the slot with the same claim
        for fam, sample in (("shmstm_process_alive", None),
                            ("shmstm_readonly_commits", "shmstm_readonly_commits_total"),
                            ("shmstm_aborts", "shmstm_aborts_total"),
                            ("shmstm_process_cpu_seconds", "shmstm_process_cpu_seconds_total"),
                            ("shmstm_commit_latency_seconds", "shmstm_commit_latency_seconds_count")):
            assert set(_series(fams, fam, sample)) == {key2}, fam
    finally:
        rt.close()
