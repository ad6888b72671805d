"""tools/bench runs end to end (--quick) and its JSON report is complete."""

import glob
import json
import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench")

WORKLOADS = ("counter", "bank", "disjoint")
MECHANISMS = ("lock", "striped", "manager", "shmstm")
PROCS = ("1", "2")


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    md.write_text("# Bench\n\nkept above\n\n<!-- bench:core:start -->\nOLD-SECTION-SENTINEL\n"
                  "<!-- bench:core:end -->\n\nkept below\n")
    proc = subprocess.Popen(
        [sys.executable, BENCH, "--quick", "--json", str(out), "--markdown", str(md)],
        cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and the workers it spawned
        stdout, stderr = proc.communicate()
        raise AssertionError("tools/bench --quick timed out\n" + stdout + stderr) from None
    assert proc.returncode == 0, (
        "exit %d\nstdout:\n%s\nstderr:\n%s" % (proc.returncode, stdout, stderr))
    # every shmstm segment the bench made (named bench-<its pid>-...) is unlinked
    assert glob.glob("/dev/shm/shmstm.bench-%d-*" % proc.pid) == []

    report = json.loads(out.read_text())
    ops = report["ops_per_sec"]
    for wl in WORKLOADS:
        for m in MECHANISMS:
            for p in PROCS:
                v = ops[wl][m][p]
                assert isinstance(v, (int, float)) and v > 0, (wl, m, p, v)

    cons = report["bank_conservation"]
    assert cons["ok"] is True
    # one check per bank run: 4 mechanisms x 2 process counts x 1 repeat
    assert len(cons["checks"]) == len(MECHANISMS) * len(PROCS)
    assert all(c["ok"] and c["actual"] == c["expected"] for c in cons["checks"])
    assert report["checks_ok"] is True
    assert not report["errors"]

    assert {t["status"] for t in report["targets"]} <= {"PASS", "MISS"}
    assert report["percall"]["empty_python_call_ns"] > 0
    assert report["machine"]["nproc"] >= 1

    # the report names the machine and the command, and the markdown section
    # was replaced in place
    assert "nproc=" in stdout and "--quick" in stdout
    assert "Targets:" in stdout
    text = md.read_text()
    assert text.startswith("# Bench\n\nkept above\n")
    assert text.rstrip().endswith("kept below")
    assert "OLD-SECTION-SENTINEL" not in text
    assert text.count("<!-- bench:core:start -->") == 1
    assert "| bank | shmstm |" in text
    # the section says what was run and on what kind of machine, not when, and
    # names no path of the machine (the JSON report keeps the date and argv)
    assert "Command: `tools/bench --quick`  " in text
    assert "Date:" not in text and str(tmp_path) not in text and BENCH not in text
    assert report["date"] and report["argv"][1] == BENCH

    # --from-json measures nothing and records the saved run as it was: the
    # same report and the same section (its command and date, not the replay's)
    md2 = tmp_path / "replay.md"
    md2.write_text("# Bench\n\nkept above\n\n<!-- bench:core:start -->\nOLD-SECTION-SENTINEL\n"
                   "<!-- bench:core:end -->\n\nkept below\n")
    replay = subprocess.run([sys.executable, BENCH, "--from-json", str(out), "--markdown", str(md2)],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == stdout.strip()
    assert md2.read_text() == text


def test_bench_c_builds_warning_free_and_runs(tmp_path):
    """tools/bench_c.c (the C core's own cost) builds with -Wall -Wextra -Werror
    with the command its header gives, runs, reports four positive figures and
    removes its segment."""
    exe = str(tmp_path / "bench_c")
    native = os.path.join(REPO, "native")
    # every C file of the core: all of native's but the CPython module
    sources = sorted(os.path.join(native, f) for f in os.listdir(native)
                     if f.endswith(".c") and f != "pyfast.c")
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I" + native,
                    '-DSHMSTM_PKG_VERSION="bench"', os.path.join(REPO, "tools", "bench_c.c")]
                   + sources + ["-o", exe], check=True, timeout=120)
    proc = subprocess.Popen([exe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    lines = [ln for ln in stdout.splitlines() if ln.endswith(" ns")]
    assert len(lines) == 4, stdout
    assert all(float(ln.split()[-2]) > 0 for ln in lines)
    assert not os.path.exists("/dev/shm/shmstm-bench-c-%d" % proc.pid)


def test_machine_check_prints_rates_and_the_scaling():
    """tools/machine_check (the control for P=2 figures) runs and reports a
    positive P2/P1 and the CPU time it got, per round."""
    tool = os.path.join(REPO, "tools", "machine_check")
    out = subprocess.run([sys.executable, tool, "--seconds", "0.3", "--rounds", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("round 1 P=1: ") and lines[1].startswith("round 1 P=2: ")
    assert float(lines[2].rsplit("=", 1)[1]) > 0
    for line in lines[:2]:
        cpu = float(line.split("CPU ")[1].split(" s")[0])
        assert 0 < cpu <= 1.05


def test_percall_ops_runs_every_op(tmp_path):
    """tools/percall_ops (instruction counts under valgrind) runs each op."""
    tool = os.path.join(REPO, "tools", "percall_ops")
    for op in ("loop", "peek", "empty", "read", "inc", "transfer"):
        r = subprocess.run([sys.executable, tool, op, "20"], cwd=str(tmp_path),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (op, r.stderr)
    r = subprocess.run([sys.executable, tool, "nope", "1"], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "usage" in r.stderr
