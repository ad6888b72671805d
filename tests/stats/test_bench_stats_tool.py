"""tools/bench_stats runs end to end (--quick) and reports what it measured."""
import glob
import json
import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "tools", "bench_stats")


def test_bench_stats_quick(tmp_path):
    out = tmp_path / "bench_stats.json"
    proc = subprocess.Popen([sys.executable, BENCH, "--quick", "--json", str(out)],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError("tools/bench_stats --quick timed out\n" + stdout + stderr) from None
    assert proc.returncode == 0, (proc.returncode, stdout, stderr)
    assert glob.glob("/dev/shm/shmstm.bench-%d-*" % proc.pid) == []

    rep = json.loads(out.read_text())
    assert rep["repeats"] == len(rep["pairs"]) == 2
    # ABBA: the pairs alternate which condition runs first
    assert [p["order"] for p in rep["pairs"]] == [["off", "watch"], ["watch", "off"]]
    for p in rep["pairs"]:
        assert p["off"]["ops_per_s"] > 0 and p["watch"]["ops_per_s"] > 0
        assert p["ratio"] == p["watch"]["ops_per_s"] / p["off"]["ops_per_s"]
        assert p["watch"]["tool_cpu_s"] >= 0
    assert rep["target"]["status"] in ("PASS", "MISS")
    assert rep["machine"]["nproc"] >= 1
    assert "nproc=" in stdout and "--quick" in stdout and "target: drop < 2%" in stdout
