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


def test_probe_lmdb_reports_every_mode(tmp_path):
    """tools/probe_lmdb runs a round and reports, per wait mode, positive
    transaction times."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "probe_lmdb"), "--seconds", "0.2",
                        "--rounds", "1", "--keys", "2", "--dir", str(tmp_path)],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("LMDB write transactions (sync=True, 2 keys")
    modes = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(modes) == {"sleep", "yield", "spin"}
    for ln in modes.values():
        assert int(ln.split()[1]) > 0
        assert float(ln.split("median ")[1].split(" ms")[0]) > 0
    assert os.listdir(str(tmp_path)) == []          # its LMDB is removed


def test_ab_sync_one_round(tmp_path):
    """tools/ab_sync (through bench_durable --row) runs a round with the same
    interpreter on both sides and summarises every sync row with positive
    rates."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ab_sync"), sys.executable,
                        sys.executable, "--rounds", "1", "--seconds", "0.3"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("round 1: lmdb sync=True P=2 ")
    summary = {ln.split(":")[0]: ln for ln in lines[1:]}
    assert set(summary) == {"sync P=1", "sync P=2", "sync x16"}
    for ln in summary.values():
        a = int(ln.split("A median ")[1].split(",")[0])
        b = int(ln.split("B median ")[1].split(";")[0])
        assert a > 0 and b > 0 and "B faster in" in ln
