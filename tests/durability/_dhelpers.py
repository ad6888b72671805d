"""Helpers of the durability tests (a module of their own: ``from conftest
import`` is ambiguous when several test folders with a conftest.py are
collected in one run)."""
import os
import struct
import subprocess
import sys
import time

import shmstm

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "_dworker.py")


def pid_alive(pid):
    """The kernel's answer (a zombie is dead)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_dead(pid, timeout=30.0):
    end = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.005)


def worker_env(pythonpath=None, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath or os.path.dirname(os.path.dirname(os.path.abspath(shmstm.__file__)))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn(args, pythonpath=None, **kw):
    env = worker_env(pythonpath, **kw.pop("env", {}))
    return subprocess.Popen([sys.executable, WORKER] + [str(a) for a in args], env=env, **kw)


_LOG_LEN = struct.Struct("<I")


def encode_log(items):
    """A log record of (name, value) byte pairs, as the flusher's C encoder
    (shmstm_ring_encode_log) writes them: u32 LE length, name, u32 LE length,
    value, for each.  The reference its test compares C against, and the
    maker of 0.1.0-style data."""
    parts = []
    for k, v in items:
        parts += (_LOG_LEN.pack(len(k)), k, _LOG_LEN.pack(len(v)), v)
    return b"".join(parts)
