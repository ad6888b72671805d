"""C-level cases of the core that need forged or exhausted shared state:
liveness decisions with forged slot states (liveness_cases.c), the conflict
counter (txn_cases.c) and the heap's
alignment, per-slot record lists and full-heap behaviour (heap_cases.c).
Each program is built with -Wall -Wextra -Werror against native/, run, and
every case must report ok."""
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "native")
SOURCES = ("clock.c", "segment.c", "heap.c", "tvar.c", "txn.c", "wait.c", "proc.c", "fault.c", "ring_commit.c",
           "ring_flush.c")


def _run_cases(tmp_path, program, cases):
    exe = str(tmp_path / program)
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-I" + NATIVE,
                    '-DSHMSTM_PKG_VERSION="test"', os.path.join(HERE, program + ".c")]
                   + [os.path.join(NATIVE, f) for f in SOURCES] + ["-o", exe],
                   check=True, timeout=120)
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == [w for c in cases for w in ("ok", c)], r.stdout


def test_liveness_cases(tmp_path):
    _run_cases(tmp_path, "liveness_cases",
               ("recovering_live", "recovering_reused_pid", "emfile_is_not_death", "gone_is_death",
                "corrupt_spill_rolls_back", "corrupt_index_rolls_back", "committed_corrupt_is_lost",
                "reclaimed_slot_aba", "free_owner_lock_released", "impossible_owner_lock_released",
                "attach_releases_orphans", "future_version_is_corrupt",
                "fork_child_free_skips_a_held_lock"))


def test_heap_cases(tmp_path):
    _run_cases(tmp_path, "heap_cases", ("line_aligned", "owner_lists", "full_heap_steals"))


def test_txn_cases(tmp_path):
    _run_cases(tmp_path, "txn_cases", ("conflicts_saturate",))
