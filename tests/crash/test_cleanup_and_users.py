"""Cleanup (list_segments / cleanup_segments / shmstm-cleanup) and segment ownership.

Cleanup calls are limited to this test's own names (``names=``), so a run never
touches other runs' segments on the same machine.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

import shmstm
from _helpers import LIMITS, as_other_user, unique_name

pytestmark = pytest.mark.crash

# Children run from a neutral directory: from the repository root, ``python -c`` would
# import the uncompiled source tree instead of the installed package.
NEUTRAL = tempfile.gettempdir()

KEYS = {"name", "shm_path", "size", "uid", "mode", "layout_ok", "error", "processes",
        "live_processes", "stale"}


def _attached_child(name, lock_one):
    """A child that attaches, commits, optionally parks inside nothing (no lock is
    ever held across Python), reports ready on stdout and then waits forever."""
    code = ("import shmstm, sys, time\n"
            "rt = shmstm.open(%r, max_tvars=%d, heap_size=%d)\n"
            "rt.tvar('x', 0).modify(lambda v: v + 1)\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n" % (name, LIMITS["max_tvars"], LIMITS["heap_size"]))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=NEUTRAL)
    assert p.stdout.readline().strip() == "ready"
    return p


def _entry(name):
    (d,) = [d for d in shmstm.list_segments() if d["name"] == name]
    return d


def test_stale_segment_listed_and_removed(segname):
    """A segment whose only user was SIGKILLed is listed with its dead process
    (alive False), stale; cleanup_segments removes it.  A segment a live process is
    attached to is listed as in use and never removed.  Listing takes no slot: the
    slot table is the same before and after."""
    other = unique_name()
    dead = _attached_child(segname, False)
    live = _attached_child(other, False)
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        d = _entry(segname)
        assert KEYS <= set(d), set(d)
        assert d["shm_path"] == "/dev/shm/shmstm." + segname and d["size"] > 0
        assert d["uid"] == os.geteuid() and d["mode"] == 0o600
        assert d["layout_ok"] and d["error"] is None
        assert [(p["pid"], p["alive"]) for p in d["processes"]] == [(dead.pid, False)]
        assert d["live_processes"] == 0 and d["stale"]
        e = _entry(other)
        assert [(p["pid"], p["alive"]) for p in e["processes"]] == [(live.pid, True)]
        assert e["live_processes"] == 1 and not e["stale"]
        assert _entry(other)["processes"] == e["processes"], "listing changed the slot table"
        assert shmstm.cleanup_segments(dry_run=True, names=[segname, other]) == [segname]
        assert os.path.exists(d["shm_path"]), "dry run removed something"
        assert shmstm.cleanup_segments(names=[segname, other]) == [segname]
        assert not os.path.exists(d["shm_path"])
        assert os.path.exists(e["shm_path"]), "a segment in use was removed"
    finally:
        live.kill()
        live.wait()
        shmstm.unlink(other)


def test_mapped_without_slot_is_in_use(segname):
    """A process that has the segment mapped but no slot (opened, no transaction yet:
    e.g. a lazy attach) is seen through /proc/<pid>/maps: not stale, not removed."""
    code = ("import shmstm, time\n"
            "rt = shmstm.open(%r)\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n" % segname)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=NEUTRAL)
    try:
        assert p.stdout.readline().strip() == "ready"
        d = _entry(segname)
        assert d["processes"] == [] and p.pid in d["mapped_by"] and not d["stale"]
        assert shmstm.cleanup_segments(names=[segname]) == []
    finally:
        p.kill()
        p.wait()
    assert _entry(segname)["stale"]
    assert shmstm.cleanup_segments(names=[segname]) == [segname]


def test_cleanup_command(segname):
    """shmstm-cleanup --dry-run --json lists the segment as stale and removes nothing;
    without --dry-run it removes it (run as ``python -m shmstm.cli.cleanup``, the
    console script's module, so it also works from a source tree)."""
    with shmstm.open(segname, **LIMITS) as rt:
        rt.tvar("x", 1)
    cmd = [sys.executable, "-m", "shmstm.cli.cleanup"]
    out = subprocess.run(cmd + ["--dry-run", "--json", segname], capture_output=True,
                         text=True, timeout=60, check=True, cwd=NEUTRAL)
    doc = json.loads(out.stdout)
    assert doc["dry_run"] and doc["removed"] == [segname]
    (d,) = [d for d in doc["segments"] if d["name"] == segname]
    assert d["stale"] and d["layout_ok"]
    assert os.path.exists("/dev/shm/shmstm." + segname)
    out = subprocess.run(cmd + [segname], capture_output=True, text=True, timeout=60,
                         check=True, cwd=NEUTRAL)
    assert "removed 1 segment(s)" in out.stdout, out.stdout
    assert not os.path.exists("/dev/shm/shmstm." + segname)


def _setuid_possible():
    return os.geteuid() == 0


@pytest.mark.skipif(not _setuid_possible(),
                    reason="needs root to act as a second user (os.setuid in a child)")
def test_other_user_cannot_attach(segname):
    """Segments are private to their user: a segment created by another uid (a child
    that switched to uid/gid 65534 with os.setuid) is refused by open() with
    PermissionDeniedError even for root, listed with an ownership error and never
    removed by cleanup; and that other user can neither attach to ours nor
    unlink it (PermissionDeniedError, a PermissionError)."""
    other = unique_name()
    with shmstm.open(other, **LIMITS) as mine:
        mine.tvar("x", 1)
    def the_other_user():
        rt = shmstm.open(segname, **LIMITS)
        rt.tvar("x", 1)
        rt.close()
        try:
            shmstm.open(other, **LIMITS)
            return "ATTACHED"
        except shmstm.PermissionDeniedError:
            pass
        try:                                # regression: a raw posix_ipc.PermissionsError
            shmstm.unlink(other)
            return "UNLINKED"
        except shmstm.PermissionDeniedError as e:
            return "refused" if isinstance(e, PermissionError) else "not a PermissionError"

    try:
        verdict = as_other_user(the_other_user)     # fails on the child's error
        assert verdict == "refused", "other user's view of ours: %s" % verdict
        assert os.path.exists("/dev/shm/shmstm." + other)
        st_ = os.stat("/dev/shm/shmstm." + segname)
        assert st_.st_uid == 65534 and (st_.st_mode & 0o777) == 0o600
        with pytest.raises(shmstm.PermissionDeniedError):
            shmstm.open(segname, **LIMITS)
        d = _entry(segname)
        assert d["uid"] == 65534 and not d["stale"] and "another user" in d["error"]
        assert shmstm.cleanup_segments(names=[segname]) == []
        assert os.path.exists("/dev/shm/shmstm." + segname)
    finally:
        shmstm.unlink(other)
        shmstm.unlink(segname)            # root may unlink it (the fixture would too)


def test_mode_other_than_0600_refused(segname):
    """A segment whose mode was widened (chmod 0644) is refused: its contents could
    have been written by anyone (pickles are code)."""
    with shmstm.open(segname, **LIMITS) as rt:
        rt.tvar("x", 1)
    os.chmod("/dev/shm/shmstm." + segname, 0o644)
    with pytest.raises(shmstm.PermissionDeniedError):
        shmstm.open(segname, **LIMITS)
    assert "PermissionDeniedError" in _entry(segname)["error"]
