"""README.md's example runs as a user pastes it: twice in a row, and again
after a run that was killed (regression: a rerun after a crash attached to the
segment the dead run left, whose TVars kept the dead run's values, and blocked
forever in check())."""
import os
import re
import signal
import subprocess
import sys

import pytest

import shmstm
from _helpers import unique_name

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")


@pytest.fixture
def example(tmp_path):
    """README's first python block, with the runtime name made unique, as a
    script in an empty directory; its name."""
    with open(README) as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    name = unique_name()
    assert code.count('"example"') >= 3
    script = tmp_path / "example.py"
    script.write_text(code.replace('"example"', repr(name)))
    yield str(script), name
    shmstm.unlink(name, discard=True)


def run(script, **kw):
    return subprocess.run([sys.executable, script], cwd=os.path.dirname(script),
                          capture_output=True, text=True, timeout=120, **kw)


def test_readme_example_runs_twice(example):
    script, name = example
    for _ in range(2):
        r = run(script)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip().splitlines()[-1] == "(0, 1000)"
    assert not os.path.exists("/dev/shm/shmstm." + name)


def test_readme_example_runs_after_a_killed_run(example):
    """A run killed after it moved the money leaves its segment with a == 0:
    the next run must not attach to it (its workers would wait for money
    forever) but start from a new runtime."""
    script, name = example
    killed = (
        "import os, signal, sys, shmstm\n"
        "rt = shmstm.open(sys.argv[1])\n"
        "rt.tvar('a', 1000), rt.tvar('b', 0)\n"
        "shmstm.atomically(lambda: (rt.tvar('a').set(0), rt.tvar('b').set(1000)))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", killed, name], cwd=os.path.dirname(script),
                       timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert os.path.exists("/dev/shm/shmstm." + name)      # what the killed run left
    r = run(script)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "(0, 1000)"
