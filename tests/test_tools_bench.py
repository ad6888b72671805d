"""tools/bench runs end to end (--quick) and its JSON report is complete."""

import json
import os
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
    proc = subprocess.run(
        [sys.executable, BENCH, "--quick", "--json", str(out), "--markdown", str(md)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, (
        "exit %d\nstdout:\n%s\nstderr:\n%s" % (proc.returncode, proc.stdout, proc.stderr))

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
    assert "nproc=" in proc.stdout and "--quick" in proc.stdout
    assert "Targets:" in proc.stdout
    text = md.read_text()
    assert text.startswith("# Bench\n\nkept above\n")
    assert text.rstrip().endswith("kept below")
    assert "OLD-SECTION-SENTINEL" not in text
    assert text.count("<!-- bench:core:start -->") == 1
    assert "| bank | shmstm |" in text
