"""Running ``shmstm-stats`` the way a user does: as a separate process.

The installed console script is used when it sits next to this interpreter
(``pip install '.[test]'``, as CI does); otherwise ``python -m
shmstm.cli.stats`` (a source checkout on PYTHONPATH).  Either way the tool
runs from a scratch directory, never from the repository root, where the
source tree (without the compiled core) would shadow the installed package.
"""
import os
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(sys.executable), "shmstm-stats")


def tool_cmd():
    if os.path.exists(SCRIPT):
        return [SCRIPT]
    return [sys.executable, "-m", "shmstm.cli.stats"]


def run_tool(*args, timeout=60, env=None):
    """CompletedProcess of ``shmstm-stats *args`` (text mode); ``env``: extra
    environment variables."""
    return subprocess.run(tool_cmd() + [str(a) for a in args], cwd=tempfile.gettempdir(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, env=_env(env))


def _env(extra=None):
    """The tool's environment: no COLUMNS (so the text view is not fitted to
    whatever terminal ran the tests) unless the test sets it."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(extra or {})
    return env


def start_tool(*args):
    """A running ``shmstm-stats *args`` (Popen, text pipes)."""
    return subprocess.Popen(tool_cmd() + [str(a) for a in args], cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def text_rows(out):
    """The process table of the text view: {pid: {column: cell}} (the "all"
    row under the key "all")."""
    lines = out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.split()[:3] == ["SLOT", "PID", "STATE"])
    header = lines[i].split()
    rows = {}
    for ln in lines[i + 1:]:
        if not ln.strip():
            break
        cells = ln.split()
        if cells[0] == "all":
            rows["all"] = dict(zip(header[5:], cells[1:]))
            break
        else:
            assert len(cells) == len(header), ln
            rows[int(cells[1])] = dict(zip(header, cells))
    return rows


def check_latency_histogram(fams, pid, hist):
    """Check the Prometheus latency histogram of ``pid``'s slot (parsed with
    prometheus_client) against the slot's core buckets ``hist``
    (``commit_latency_log2_ns``: core bucket k counts whole-ns durations with
    floor(log2(ns)) == k, the last one every longer duration).  Returns the
    buckets [(le, cumulative count)], +Inf last."""
    import math

    samples = [s for s in fams["shmstm_commit_latency_seconds"].samples
               if s.labels.get("pid") == str(pid)]
    buckets = sorted((float(s.labels["le"]), s.value) for s in samples
                     if s.name == "shmstm_commit_latency_seconds_bucket")
    count = [s.value for s in samples if s.name == "shmstm_commit_latency_seconds_count"]
    # one finite bucket per bounded core bucket, at its largest duration; the last
    # core bucket has no bound and is only in +Inf
    assert [le for le, _ in buckets[:-1]] == [((1 << (k + 1)) - 1) / 1e9
                                             for k in range(len(hist) - 1)]
    assert math.isinf(buckets[-1][0])
    # cumulative, and +Inf is everything: equal to _count
    values = [v for _, v in buckets]
    assert all(a <= b for a, b in zip(values, values[1:])), values
    assert values == [sum(hist[:k + 1]) for k in range(len(hist) - 1)] + [sum(hist)], \
        (values, hist)
    assert count == [sum(hist)]
    return buckets
