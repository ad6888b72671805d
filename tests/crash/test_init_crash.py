"""Segment creation is a crash point: a creator killed half-way through initialisation
never leaves later openers hanging.

Decision (docs/reliability.md): a segment is initialised under a temporary name and
linked to the runtime's name only when complete, so the runtime's name never shows a
half-made segment: the next opener simply creates it (a clean re-create, at once).
The creator's temporary name is left behind and removed by ``cleanup_segments``.  An
object at the runtime's name that never became ready (made by something else) is a
clear ``SegmentInitError``: at once if the kernel says its creator is dead, else after
a bounded wait.
"""
import mmap
import time

import posix_ipc
import pytest

import shmstm
from _common import LIMITS

pytestmark = pytest.mark.crash


def test_creator_killed_before_ready(segname, run_driver):
    """A creator SIGKILLed at create.before_ready (debug kill point) leaves no
    runtime name and its temporary name listed as stale; the next opener creates the
    runtime at once; 6 openers racing, 3 of them armed to die mid-initialisation
    (those that get to create do; one that attaches to a winner's segment lives),
    all survivors end up on one and the same segment and their increments all land;
    cleanup_segments removes exactly the dead creators' temporary names."""
    r = run_driver("init_crash", {"name": segname, "limits": dict(LIMITS), "racers": 6})
    assert r["debug_build"]
    assert r["creator"] == "signal 9"
    assert not r["final_name_exists"], "a half-initialised segment got the runtime's name"
    (tmp,) = r["left_behind"]
    assert tmp["creating"]["alive"] is False and tmp["stale"]
    assert "SegmentInitError" in (tmp["error"] or ""), tmp
    assert r["next_opener"] == "exit 0" and r["next_open_s"] < 1.0, r
    racers = r["racers"]
    armed = [x for x in racers if x["armed"]]
    survivors = [x for x in racers if not x["armed"]]
    assert all(x["status"] in ("signal 9", "exit 0") for x in armed), armed
    assert all(x["status"] == "exit 0" and x["open_s"] < 2.0 for x in survivors), survivors
    ids = {x["runtime_id"] for x in racers if x["status"] == "exit 0"}
    assert len(ids) == 1, "openers ended up on different segments: %r" % racers
    assert r["counter"] == sum(x["status"] == "exit 0" for x in racers)
    dead_creators = 1 + sum(x["status"] == "signal 9" for x in armed)
    assert len(r["cleanup_removed"]) == dead_creators, r["cleanup_removed"]
    assert all(".init-" in n for n in r["cleanup_removed"])
    assert r["after_cleanup"] == [segname], r["after_cleanup"]


def test_half_initialised_object_of_a_dead_creator_fails_fast(segname):
    """An object at the runtime's name with init_state CREATING whose recorded creator
    pid is dead (a foreign or older creator killed half-way): open() raises
    SegmentInitError at once instead of waiting for the deadline."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shm = posix_ipc.SharedMemory("/shmstm." + segname, posix_ipc.O_CREX, mode=0o600,
                                 size=1 << 16)
    try:
        m = mmap.mmap(shm.fd, 1 << 16)
        m[0:8] = (0x314d54534d4853).to_bytes(8, "little")     # magic, nothing else
        m[20:24] = dead.pid.to_bytes(4, "little")             # creator_pid (offset 20)
        m.close()
        t0 = time.monotonic()
        with pytest.raises(shmstm.SegmentInitError):
            shmstm.open(segname)
        assert time.monotonic() - t0 < 2.0, "waited for the deadline despite a dead creator"
    finally:
        shm.close_fd()
        shm.unlink()
