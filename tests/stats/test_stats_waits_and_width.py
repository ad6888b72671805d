"""shmstm-stats says what a process blocked in retry() waits for, and fits
the terminal (regressions: a waiting process showed as waiting but not on
what; --watch wrapped in an 80-column terminal, rows of ~110 characters)."""
import json
import subprocess
import sys
import tempfile
import textwrap
import time

import shmstm
from _helpers import LIMITS
from _tool import run_tool

WAITER = textwrap.dedent('''
    import sys, shmstm
    rt = shmstm.open(sys.argv[1], max_tvars=4096, heap_size=4 << 20)
    a, b = rt.tvar("gate:a", 0), rt.tvar("gate:b", 0)
    anon = rt.new_tvar(0)
    print(anon._idx, flush=True)
    shmstm.atomically(lambda: shmstm.check(a.value + b.value + anon.value > 0))
    rt.close()
''')


def test_a_waiting_process_shows_what_it_waits_for_and_the_text_fits(segname):
    with shmstm.open(segname, **LIMITS) as rt:
        gate = rt.tvar("gate:a", 0)
        w = subprocess.Popen([sys.executable, "-c", WAITER, segname], cwd=tempfile.gettempdir(),
                             stdout=subprocess.PIPE, text=True)
        try:
            anon = int(w.stdout.readline())
            deadline = time.monotonic() + 30
            while True:
                doc = json.loads(run_tool(segname, "--json").stdout)
                mine = [p for p in doc["processes"] if p["pid"] == w.pid and p["waiting"]]
                if mine:
                    break
                assert time.monotonic() < deadline, "the waiter never blocked"
            assert mine[0]["waiting_on"] == sorted(["#%d" % anon, "gate:a", "gate:b"])
            assert all(p["waiting_on"] == [] for p in doc["processes"] if not p["waiting"])
            for args in ([segname], [segname, "--watch", "0.1", "--count", "1"]):
                out = run_tool(*args, env={"COLUMNS": "80"}).stdout
                assert max(len(ln) for ln in out.splitlines()) <= 80, out
                assert "slot %d pid %d:  #%d,  gate:a,  gate:b" % (
                    mine[0]["slot"], w.pid, anon) in out, out
                assert "aborts" in out and "by reason:" in out, out
                wide = run_tool(*args, env={"COLUMNS": "200"}).stdout
                assert "LOCKED" in wide and "VALID" in wide, wide
            gate.value = 1
            assert w.wait(30) == 0
        finally:
            if w.poll() is None:
                w.kill()
