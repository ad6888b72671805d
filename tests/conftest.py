"""Shared fixtures for the shmstm test tiers.

* ``segname``: a unique segment name for one test, unlinked at teardown.
* ``runtime``: a fresh, small runtime on a ``segname`` (closed and unlinked at teardown).
* Leak checks (posix_ipc's tests do the same with their unique names): each test
  process fails at session teardown if a segment it named is left behind; at the end
  of the session (in the xdist controller, after every worker) a new
  ``/dev/shm/shmstm.*`` segment still present fails the run if this run named it or
  no live process maps it (see pytest_sessionfinish).
* The ``stress`` marker (selection only: stress tests run by default).

Names are ``t-<run>-<pid>-<uuid>``: ``<run>`` is one token per pytest invocation, shared
with xdist workers through the environment, so a worker's check only looks at its own
segments (other workers' are still in use) and this run's leaks can be cleaned up.
"""

import glob
import os
import sys
import time

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_STRESS = os.path.join(_HERE, "stress")
# Helpers in tests/stress/_helpers.py are imported as ``from _helpers import ...``, also
# by spawned/forkserver children (multiprocessing hands them the parent's sys.path).
if _STRESS not in sys.path:
    sys.path.insert(0, _STRESS)

# Small limits (LIMITS) so a test never needs much of /dev/shm on the 2-core CI box.
from _helpers import LIMITS as SMALL_LIMITS  # noqa: E402
from _helpers import run_token as _run_token  # noqa: E402
from _helpers import unique_name  # noqa: E402

SHM_DIR = "/dev/shm"
SEG_PREFIX = "shmstm."


def _segments(pattern="*"):
    return set(glob.glob(os.path.join(SHM_DIR, SEG_PREFIX + pattern)))


def _is_xdist_worker(config):
    return hasattr(config, "workerinput")


def pytest_configure(config):
    if not any(m.split(":")[0].strip() == "stress" for m in config.getini("markers")):
        config.addinivalue_line(
            "markers",
            "stress: multi-process stress workload (runs by default; -m stress selects, "
            "-m 'not stress' skips). Scale with SHMSTM_STRESS=<float>.",
        )
    _run_token()
    config._shmstm_before = _segments()


def _mapped_segments():
    """Paths of /dev/shm/shmstm.* files that some live process has mapped (the
    kernel's answer to "is anyone still using it"; /proc/<pid>/maps).  Matched by
    inode: a creator maps its segment under a temporary name that the maps file
    keeps showing (deleted) after the segment was linked to its real name."""
    inodes = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/maps" % pid) as f:
                for line in f:
                    if os.path.join(SHM_DIR, SEG_PREFIX) in line:
                        fields = line.split(None, 5)
                        if len(fields) == 6 and fields[4].isdigit():
                            inodes.add(int(fields[4]))
        except OSError:  # gone, or not ours to read
            pass
    mapped = set()
    for path in _segments():
        try:
            if os.stat(path).st_ino in inodes:
                mapped.add(path)
        except OSError:
            pass
    return mapped


def _orphans(paths, grace=3.0):
    """The ``paths`` that still exist and that no process maps, after giving their
    owners ``grace`` seconds to finish a close-then-unlink in flight."""
    end = time.monotonic() + grace
    while True:
        left = {p for p in paths if os.path.exists(p)} - _mapped_segments()
        if not left or time.monotonic() >= end:
            return left
        time.sleep(0.1)


def pytest_sessionfinish(session, exitstatus):
    """Run-wide leak check, in the xdist controller (or the only process), after every
    test and worker is done: a ``shmstm.*`` segment that appeared during the session
    and is still there fails the run if this run named it (``t-<run>-...``) or if no
    live process maps it (an orphan: whatever made it, e.g. a tool a test ran, is
    gone without unlinking it).  Segments other live processes still map belong to
    someone else's run on this machine: noted, never touched.  This run's leaks are
    removed after being reported, so the next run starts clean.
    """
    config = session.config
    if _is_xdist_worker(config):
        return
    before = getattr(config, "_shmstm_before", set())
    new = _segments() - before
    ours = {p for p in new
            if os.path.basename(p).startswith(SEG_PREFIX + "t-%s-" % _run_token())}
    orphans = _orphans(new - ours)
    others = (new - ours - orphans) & _segments()
    tr = config.pluginmanager.get_plugin("terminalreporter")

    def say(msg):
        if tr is not None:
            tr.write_line(msg, red=True, bold=True)
        else:
            print(msg, file=sys.stderr)

    leaked = sorted(ours | orphans)
    if leaked:
        say("shmstm: segments left behind by this test session: %s" % ", ".join(leaked))
        for path in sorted(ours):
            try:
                os.unlink(path)
            except OSError:
                pass
        session.exitstatus = 1
    if others:
        say("shmstm: note: new segments in use by other processes (another run?): %s"
            % ", ".join(sorted(others)))


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_segments():
    """Fail (as a teardown error) if this process's tests left a segment behind."""
    mine = "t-%s-%s-*" % (_run_token(), os.getpid())
    before = _segments(mine)
    yield
    leaked = sorted(_segments(mine) - before)
    if leaked:
        pytest.fail("shmstm segments left behind: %s" % ", ".join(leaked), pytrace=False)


def _unlink_quiet(name):
    import shmstm

    try:
        shmstm.unlink(name)
    except Exception:  # already gone / never created
        pass


@pytest.fixture
def segname():
    """A unique segment name, unlinked at teardown (whatever the test did)."""
    name = unique_name()
    yield name
    _unlink_quiet(name)


@pytest.fixture
def runtime(segname):
    """A fresh runtime with small limits; closed and unlinked at teardown."""
    import shmstm

    rt = shmstm.open(segname, **SMALL_LIMITS)
    try:
        yield rt
    finally:
        try:
            rt.close()
        finally:
            _unlink_quiet(segname)
