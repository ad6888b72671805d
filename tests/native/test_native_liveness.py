"""Liveness decisions of the C core that need forged slot states (see
liveness_cases.c): built with -Wall -Wextra -Werror against native/, run,
every case must report ok."""
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "native")
SOURCES = ("segment.c", "heap.c", "tvar.c", "txn.c", "wait.c", "proc.c", "fault.c", "ring.c")
CASES = ("recovering_live", "recovering_reused_pid", "emfile_is_not_death", "gone_is_death")


def test_liveness_cases(tmp_path):
    exe = str(tmp_path / "liveness_cases")
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-I" + NATIVE,
                    '-DSHMSTM_PKG_VERSION="test"', os.path.join(HERE, "liveness_cases.c")]
                   + [os.path.join(NATIVE, f) for f in SOURCES] + ["-o", exe],
                   check=True, timeout=120)
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == [w for c in CASES for w in ("ok", c)], r.stdout
