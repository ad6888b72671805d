"""Fixtures for the durability tests: a temp LMDB directory per test, a
durable runtime factory that waits for its flusher to exit at teardown (so
no process outlives the test's temp dir), and a debug build of the package
(fault points) built once per session into a temp dir."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest


from _dhelpers import REPO, spawn, wait_dead  # noqa: F401 (helpers live in _dhelpers)


@pytest.fixture
def dpath():
    d = tempfile.mkdtemp(prefix="shmstm-durable-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def flushers():
    """A list to append flusher pids to; each must have exited at teardown
    (they exit when no process is attached and the ring is drained)."""
    pids = []
    yield pids
    for pid in pids:
        if not wait_dead(pid, 30):
            os.kill(pid, 9)
            raise AssertionError("flusher %d did not exit after the last close" % pid)


@pytest.fixture(scope="session")
def debug_pkg():
    """PYTHONPATH of a debug build (SHMSTM_DEBUG=1: FAULT_POINT kill points)."""
    d = tempfile.mkdtemp(prefix="shmstm-dbgbuild-")
    for sub in ("native", "shmstm"):
        shutil.copytree(os.path.join(REPO, sub), os.path.join(d, sub),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "_native.c"))
    for f in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, f), d)
    env = dict(os.environ, SHMSTM_DEBUG="1")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=d, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    try:
        assert r.returncode == 0, r.stdout.decode()[-3000:]
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
