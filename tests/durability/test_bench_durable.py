"""tools/bench_durable runs end to end (--quick) and reports every row."""
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_durable_quick(tmp_path):
    out = tmp_path / "b.json"
    # From a scratch directory: the installed package, as a user runs the tool.
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_durable"), "--quick",
                        "--json", str(out)], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert len(res) == 12 and all(v["ops_per_s"] > 0 for v in res.values())
    assert set(doc["ratios"]) == {"async/none P=1", "async/none P=2", "sync/lmdb-sync P=2",
                                  "sync x16/lmdb-sync P=2", "sync x16/lmdb-sync x16",
                                  "async/none P=1 interleaved", "async/none P=2 interleaved"}
    assert all(v > 0 for v in doc["ratios"].values()) and len(doc["checks"]) == 8
    # The interleaved measure (tools/bench_interleaved): both sides counted in
    # every pair of slices.
    for P in ("1", "2"):
        inter = doc["interleaved"][P]
        assert inter["procs"] == int(P) and inter["pairs"] == 8
        assert inter["none_ops_per_s"] > 0 and inter["async_ops_per_s"] > 0
        lo, hi = inter["pair_ratio_min_max"]
        assert 0 < lo <= inter["pair_ratio_median"] <= hi
    assert res["shmstm async P=2"]["flusher_updates_per_cpu_s"] > 0
    # A synchronous LMDB commit writes to the device, and on a device that
    # caches writes it also flushes it (where the kernel counts them).
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import _machine
    row = res["lmdb sync=True P=1"]
    if "disk_writes_per_op" in row:
        assert row["disk_writes_per_op"] >= 1
        if "disk_flushes_per_op" in row and _machine.DiskRequests(tempfile.gettempdir()).write_back():
            assert row["disk_flushes_per_op"] >= 1


def test_bench_durable_row_prints_one_json_row(tmp_path):
    """bench_durable --row (one row once, the unit of an A/B comparison of two
    builds: docs/benchmarks.md) prints that row as one JSON line, for a shmstm
    row with threads and for LMDB used directly."""
    tool = os.path.join(REPO, "tools", "bench_durable")
    for row in (["sync", "2", "2"], ["lmdb-sync", "1", "1"]):
        r = subprocess.run([sys.executable, tool, "--row"] + row + ["--seconds", "0.3"],
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (row, r.stderr[-3000:])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["ops_per_s"] > 0 and "steal" in out, (row, out)
        if row[0] == "sync":
            assert out["ring_full_waits"] == 0 and out["ops_per_cpu_s"] > 0
            assert out["group_commit"] in ("wait", "nowait", None)
