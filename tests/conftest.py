"""Shared fixtures for the shmstm test tiers.

* ``segname``: a unique segment name for one test, unlinked at teardown.
* ``runtime``: a fresh, small runtime on a ``segname`` (closed and unlinked at teardown).
* Leak checks (posix_ipc's tests do the same with their unique names): each test
  process fails at session teardown if a segment it named is left behind; at the end
  of the session (in the xdist controller, after every worker) any new
  ``/dev/shm/shmstm.*`` segment still present fails the run (see pytest_sessionfinish).
* The ``stress`` marker (selection only: stress tests run by default).

Names are ``t-<run>-<pid>-<uuid>``: ``<run>`` is one token per pytest invocation, shared
with xdist workers through the environment, so a worker's check only looks at its own
segments (other workers' are still in use) and this run's leaks can be cleaned up.
"""

import glob
import os
import sys

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


def pytest_sessionfinish(session, exitstatus):
    """Run-wide leak check, in the xdist controller (or the only process), after every
    test and worker is done: any ``shmstm.*`` segment that appeared during the session
    and is still there fails the run.

    On a machine shared with other shmstm users, ``SHMSTM_LEAK_SCOPE=run`` restricts
    the failure to segments named by this run (``t-<run>-...``) and only notes others.
    Only this run's segments are removed after being reported; others are never
    touched (they may belong to a live process).
    """
    config = session.config
    if _is_xdist_worker(config):
        return
    before = getattr(config, "_shmstm_before", set())
    new = _segments() - before
    ours = {p for p in new
            if os.path.basename(p).startswith(SEG_PREFIX + "t-%s-" % _run_token())}
    others = new - ours
    strict = os.environ.get("SHMSTM_LEAK_SCOPE", "all") != "run"
    tr = config.pluginmanager.get_plugin("terminalreporter")

    def say(msg):
        if tr is not None:
            tr.write_line(msg, red=True, bold=True)
        else:
            print(msg, file=sys.stderr)

    leaked = sorted(ours | (others if strict else set()))
    if leaked:
        say("shmstm: segments left behind by this test session: %s" % ", ".join(leaked))
        for path in sorted(ours):  # report, then clean up so the next run starts clean
            try:
                os.unlink(path)
            except OSError:
                pass
        session.exitstatus = 1
    elif others:
        say("shmstm: note: new segments not named by this run (another user?): %s"
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
