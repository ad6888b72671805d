"""shmstm-stats fails with one clear line and a non-zero exit status.

1: the runtime cannot be read (missing, permission, another layout version,
not shmstm, corrupt, never initialised, bad name); 2: bad usage (argparse).
The same conditions raise the named exceptions from ``StatsReader``.
"""
import os
import struct
import sys

import posix_ipc
import pytest

from _helpers import as_other_user
from _tool import run_tool

SHM = "/dev/shm/shmstm."


def _fails(res, status, *words):
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    if status == 1:
        assert len(lines) == 1 and lines[0].startswith("shmstm-stats: error: "), res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    return res.stderr


def _raw_segment(name, data):
    shm = posix_ipc.SharedMemory("/shmstm." + name, posix_ipc.O_CREX, mode=0o600, size=len(data))
    try:
        os.pwrite(shm.fd, data, 0)
    finally:
        shm.close_fd()


def _reader_raises(name, exc, *words):
    import shmstm
    from shmstm.stats.reader import StatsReader

    with pytest.raises(exc) as e:
        StatsReader(name)
    assert isinstance(e.value, shmstm.Error)
    for w in words:
        assert w in str(e.value)


def test_no_such_runtime(segname):
    import shmstm

    _fails(run_tool(segname), 1, "no shmstm runtime named %r" % segname)
    _fails(run_tool(segname, "--json"), 1, "no shmstm runtime")
    _reader_raises(segname, shmstm.SegmentNotFoundError, segname)


def test_permission_denied(runtime):
    """A segment not of mode 0600 (shared with the group) is refused, as open() does."""
    import shmstm

    os.chmod(SHM + runtime.name, 0o640)
    try:
        _fails(run_tool(runtime.name), 1, "not mode 0600", repr(runtime.name))
        _reader_raises(runtime.name, shmstm.PermissionDeniedError, "0600")
    finally:
        os.chmod(SHM + runtime.name, 0o600)


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="needs root to act as a second user (os.setuid in a child)")
def test_segment_not_readable_by_this_user(runtime):
    """Another user may not even open our 0600 segment for reading: the open of
    the shared-memory object fails (EACCES) before any mode check, with one line
    naming the runtime and the object, and exit status 1."""
    import io
    import shmstm
    from shmstm.cli import stats as stats_cli
    from shmstm.stats.reader import StatsReader

    def other():
        try:
            StatsReader(runtime.name).close()
            reader = "opened"
        except shmstm.PermissionDeniedError as e:
            reader = "PermissionDeniedError: %s" % e
        sys.stderr, sys.stdout = io.StringIO(), io.StringIO()
        rc = stats_cli.main([runtime.name])
        return {"reader": reader, "rc": rc, "stdout": sys.stdout.getvalue(),
                "stderr": sys.stderr.getvalue()}

    assert os.stat(SHM + runtime.name).st_uid == 0
    got = as_other_user(other)
    want = "runtime %r: cannot open /shmstm.%s for reading: " % (runtime.name, runtime.name)
    assert got["reader"].startswith("PermissionDeniedError: " + want), got
    assert (got["rc"], got["stdout"]) == (1, ""), got
    assert got["stderr"].startswith("shmstm-stats: error: " + want), got
    assert got["stderr"].count("\n") == 1 and got["stderr"].endswith("\n"), got


def test_another_layout_version(runtime):
    """A real segment whose layout signature is not this build's."""
    import shmstm
    from shmstm._core import lib

    sig = struct.pack("=Q", lib.shmstm_layout_signature())
    with open(SHM + runtime.name, "r+b") as f:
        head = f.read(4096)
        at = head.find(sig)
        assert at >= 0
        f.seek(at)
        f.write(struct.pack("=Q", lib.shmstm_layout_signature() ^ 0xFF))
    _fails(run_tool(runtime.name), 1, "layout version", repr(runtime.name))
    _reader_raises(runtime.name, shmstm.LayoutMismatchError,
                   "layout version %d" % lib.SHMSTM_LAYOUT_VERSION_)


def test_not_a_shmstm_segment(segname):
    import shmstm

    _raw_segment(segname, b"not shmstm at all" * 512)
    _fails(run_tool(segname), 1, "not a shmstm segment")
    _reader_raises(segname, shmstm.LayoutMismatchError)


def test_corrupt_segment(runtime):
    """The header claims more bytes than the object has."""
    import shmstm

    os.truncate(SHM + runtime.name, 8192)
    _fails(run_tool(runtime.name), 1, "corrupt")
    _reader_raises(runtime.name, shmstm.CorruptSegmentError, "corrupt")


def test_never_initialised(segname):
    import shmstm

    posix_ipc.SharedMemory("/shmstm." + segname, posix_ipc.O_CREX, mode=0o600, size=0).close_fd()
    _fails(run_tool(segname), 1, "never finished initialising")
    _reader_raises(segname, shmstm.SegmentInitError)


def test_bad_name():
    _fails(run_tool("a/b"), 1, "without '/'")
    with pytest.raises(TypeError):
        from shmstm.stats.reader import StatsReader
        StatsReader(3)


@pytest.mark.parametrize("args, words", [
    ([], ["NAME is required"]),
    (["x", "--count", "2"], ["--count goes with --watch"]),
    (["x", "--watch", "0"], ["between 0.01 and 86400"]),
    (["x", "--watch", "-1"], []),
    (["x", "--json", "--prometheus"], ["not allowed with"]),
    (["x", "--watch", "--serve", "0"], ["--watch goes with"]),
    (["x", "--serve", "70000"], ["not a TCP port"]),
    (["x", "--hot", "-1"], ["must be >= 0"]),
    (["x", "--list"], ["--list takes no NAME"]),
    (["--list", "--prometheus"], ["--list takes no NAME and no other mode than --json"]),
    (["--list", "--watch"], ["--list takes no NAME and no other mode than --json"]),
])
def test_usage_errors(args, words):
    _fails(run_tool(*args), 2, *words)


def test_reader_bad_arguments(runtime):
    import shmstm
    from shmstm.stats.reader import StatsReader

    for wait in (-1, "1", None, float("nan")):
        with pytest.raises((ValueError, TypeError)):
            StatsReader(runtime.name, wait=wait)
    r = StatsReader(runtime.name)
    for hot in (-1, 1.5, True):
        with pytest.raises(ValueError):
            r.read(hot=hot)
    assert r.read(hot=0)["hottest_tvars"] == []
    r.close()
    r.close()                                   # idempotent
    with pytest.raises(shmstm.RuntimeClosedError):
        r.read()


def test_rates_of_a_slot_claimed_in_the_interval():
    """A slot that appears between two reads is rated from its claim, not over
    the whole interval; one that was there is rated over the interval."""
    from shmstm.stats.reader import ABORT_REASONS, rates

    def proc(slot, attach_ns, commits, cpu):
        return {"slot": slot, "pid": 100 + slot, "attach_ns": attach_ns, "alive": True,
                "status": "running", "commits": commits, "ro_commits": 0, "retries": 0,
                "wakeups": 0, "aborts": dict.fromkeys(ABORT_REASONS, 0), "cpu_seconds": cpu}

    s = 10 ** 9
    prev = {"time_ns": 10 * s, "clock": 5, "hottest_tvars": [], "processes": [proc(0, s, 100, 1.0)]}
    cur = {"time_ns": 12 * s, "clock": 405, "hottest_tvars": [],
           "processes": [proc(0, s, 300, 1.5), proc(1, 11 * s, 50, 0.2)]}
    r = rates(prev, cur)
    assert r["interval_s"] == 2 and r["clock_per_s"] == 200
    old, new = r["processes"]
    assert (old["commits_per_s"], old["cpu_percent"]) == (100, 25)
    assert new["commits_per_s"] == 50 and new["cpu_percent"] is None
