"""shmstm._fast keeps the GIL during a read or a commit (native/fast.h); it
must drop it before any wait that can take long, or every other thread of
the process stops with it.  Real processes: a lock owner SIGSTOPped by a
fault point, two CPU burners."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.crash
def test_lock_wait_on_a_stopped_owner_lets_other_threads_run(segname, debug_pkg):
    """Property (liveness of a process's other threads): while a commit or a
    transactional read waits for a TVar lock whose owner is stopped, a
    thread ticking every 1 ms in the same process is never held up for long
    (bound 0.5 s; holding the GIL across the lock wait's yields gave 1.2 to
    2.9 s for a commit and 0.5 s for a read, with 40 ticks in 5 s instead of
    ~4,500).  After the owner is killed, both finish (recovery)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "_gil_stall.py"), segname, "2"],
                       env=dict(os.environ, PYTHONPATH=debug_pkg), capture_output=True,
                       text=True, timeout=120, cwd=debug_pkg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["commit_waiting"] and out["read_waiting"], out     # the waits were real
    assert out["commit"] < 0.5 and out["read"] < 0.5, out
    assert out["commit_finished"] and out["read_finished"], out
