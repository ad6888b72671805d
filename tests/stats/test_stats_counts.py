"""shmstm-stats reports the counters that real worker processes produced.

Spawned workers do known numbers of writer commits, read-only commits, user
aborts, blocking retries and forced conflicts; one is SIGKILLed (and left a
zombie, unreaped, while the tool runs: psutil's is_running() is True for a
zombie, so it must still show as dead).  The tool then runs as a subprocess
(--json, text, --prometheus) and every number it prints is checked: exact
where the workload makes it exact (all of them, since the workers are idle
and synchronised when the tool runs).
"""
import json
import multiprocessing as mp
import os
import signal
import time
from types import SimpleNamespace

import psutil
import pytest

from shmstm._core import lib

import _stats_workers as W
from _helpers import LIMITS, unique_name, wait_until_blocked
from _tool import check_latency_histogram, run_tool, text_rows

N_COMMITS, N_RO, N_USER, N_RETRY = 300, 40, 7, 5
ROUNDS = 25          # forced conflicts (victim/spoiler rounds)
N_DOOMED = 5
WAIT = 120.0


def _recv(conn, what):
    if not conn.poll(WAIT):
        raise AssertionError("timed out waiting for %s" % what)
    msg = conn.recv()
    if msg[0] == "error":
        raise AssertionError("worker failed: %s" % msg[1])
    return msg


def _zombie(pid):
    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _wait_sleeping(pids):
    """Poll (bounded) until each pid sleeps: a worker that reported "done"
    blocks in its control pipe's poll() until the parent says "exit"."""
    end = time.monotonic() + WAIT
    while not all(psutil.Process(p).status() == psutil.STATUS_SLEEPING for p in pids):
        assert time.monotonic() < end, "workers %s never went to sleep" % (pids,)
        time.sleep(0.01)


# What a live process's "status" may be (docs/stats.md: psutil's status);
# psutil's "zombie" and "dead" belong to processes the tool reports as dead.
LIVE_STATUSES = {getattr(psutil, k) for k in dir(psutil) if k.startswith("STATUS_")} - {
    psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD}


@pytest.fixture(scope="module")
def scenario():
    import shmstm

    name = unique_name("stats")
    ctx = mp.get_context("spawn")
    rt = shmstm.open(name, **LIMITS)
    gate = rt.tvar("gate", 0)
    rt.tvar("hot-x", 0)
    workers = {}          # role -> (Process, control pipe)
    try:
        def start(role, fn, *args):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=W.run, args=(child, fn, ((name,),) + args), daemon=True)
            p.start()
            workers[role] = (p, parent)

        gate_parent, gate_child = ctx.Pipe()
        peer_v, peer_s = ctx.Pipe()
        start("counters", "counters", N_COMMITS, N_RO, N_USER, N_RETRY, gate_child)
        start("victim", "victim", ROUNDS, peer_v)
        start("spoiler", "spoiler", ROUNDS, peer_s)
        start("doomed", "doomed", N_DOOMED)

        cpid = workers["counters"][0].pid
        for i in range(1, N_RETRY + 1):
            assert _recv(gate_parent, "retry round %d" % i) == ("blocking", i)
            wait_until_blocked(rt, cpid, WAIT)       # it sleeps in retry(): release it
            gate.value = i

        info = {role: _recv(conn, role + " done")[1] for role, (p, conn) in workers.items()}
        assert info["victim"]["attempts"] == 2 * ROUNDS

        dpid = workers["doomed"][0].pid
        os.kill(dpid, signal.SIGKILL)
        # Dead but not reaped: a zombie for as long as the tool runs.
        os.waitid(os.P_PID, dpid, os.WEXITED | os.WNOWAIT)
        assert _zombie(dpid)
        idle = [workers[r][0].pid for r in ("counters", "victim", "spoiler")]
        _wait_sleeping(idle)
        js = run_tool(name, "--json")
        text_from = time.time_ns()      # the text view is read within this window
        text = run_tool(name)
        text_until = time.time_ns()
        out = SimpleNamespace(
            name=name, rt=rt, pids={r: p.pid for r, (p, _) in workers.items()},
            json=js, text=text, text_window=(text_from, text_until),
            prom=run_tool(name, "--prometheus"))
        assert _zombie(dpid), "the doomed worker was reaped while the tool ran"
        yield out
    finally:
        for role, (p, conn) in workers.items():
            try:
                conn.send("exit")
            except OSError:
                pass
        for p, _ in workers.values():
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        rt.close()
        shmstm.unlink(name)


def _ok(res):
    assert res.returncode == 0, "exit %d\nstdout:\n%s\nstderr:\n%s" % (
        res.returncode, res.stdout, res.stderr)
    assert res.stderr == ""
    return res.stdout


def _expected(pids):
    """{pid: (commits, ro_commits, aborts by reason, retries, wakeups, alive)}"""
    zero = dict.fromkeys(("locked", "validate", "user", "stale", "resource"), 0)
    return {
        pids["counters"]: (N_COMMITS, N_RO + N_RETRY, dict(zero, user=N_USER), N_RETRY, N_RETRY, True),
        pids["victim"]: (ROUNDS, 0, dict(zero, validate=ROUNDS), 0, 0, True),
        pids["spoiler"]: (ROUNDS, 0, zero, 0, 0, True),
        pids["doomed"]: (N_DOOMED, 0, zero, 0, 0, False),
    }


def test_json_numbers(scenario):
    doc = json.loads(_ok(scenario.json))
    assert doc["schema"] == "shmstm-stats/1"
    assert doc["name"] == scenario.name
    assert doc["layout_version"] == lib.SHMSTM_LAYOUT_VERSION_
    assert doc["durability"] is None
    by_pid = {p["pid"]: p for p in doc["processes"]}
    for pid, (commits, ro, aborts, retries, wakeups, alive) in _expected(scenario.pids).items():
        p = by_pid[pid]
        assert (p["commits"], p["ro_commits"], p["aborts"], p["retries"], p["wakeups"]) == \
            (commits, ro, aborts, retries, wakeups), p
        assert p["aborts_total"] == sum(aborts.values())
        assert p["alive"] is alive
        if alive:
            # idle in poll() on its control pipe (the fixture waited for that)
            assert p["status"] == psutil.STATUS_SLEEPING, p
            assert p["rss_bytes"] > 0 and p["cpu_seconds"] >= 0 and p["cpu_percent"] >= 0
            assert not p["waiting"] and p["commit_state"] == "idle"
        else:
            assert p["status"] == "dead", p
            assert p["rss_bytes"] is None and p["cpu_percent"] is None
        assert sum(p["commit_latency_log2_ns"]) == commits
        # (COMMITS + RO) per second since the claim, at the document's time;
        # a dead process commits nothing
        assert p["commit_rate"] == (pytest.approx(
            (commits + ro) / ((doc["time_ns"] - p["attach_ns"]) / 1e9)) if alive else 0.0), p
    # the test process itself is attached too (it created the runtime and set "gate")
    assert os.getpid() in by_pid and by_pid[os.getpid()]["commits"] == N_RETRY
    assert by_pid[os.getpid()]["alive"] and by_pid[os.getpid()]["status"] in LIVE_STATUSES
    assert len(doc["processes"]) == 5
    # the forced conflicts are charged to hot-x, the only TVar that had any
    x = scenario.rt.tvar("hot-x")
    assert doc["hottest_tvars"] == [
        {"index": x._idx, "generation": x._gen, "name": "hot-x", "conflicts": ROUNDS}]
    # clock: every writer commit advanced it once; a commit that failed validation
    # may have taken a write version too (txn.c takes wv before validating)
    commits = sum(p["commits"] for p in doc["processes"])
    assert commits <= doc["clock"] <= commits + ROUNDS
    assert doc["tvars"]["named"] == doc["tvars"]["live"] == 2 + 1 + 1   # gate, hot-x, own, doomed


def test_text_numbers(scenario):
    out = _ok(scenario.text)
    rows = text_rows(out)
    for pid, (commits, ro, aborts, retries, wakeups, alive) in _expected(scenario.pids).items():
        r = rows[pid]
        assert (int(r["COMMITS"]), int(r["RO"]), int(r["ABORTS"])) == (commits, ro, sum(aborts.values()))
        assert (int(r["LOCKED"]), int(r["VALID"]), int(r["USER"]), int(r["STALE"]), int(r["RES"])) == \
            (aborts["locked"], aborts["validate"], aborts["user"], aborts["stale"], aborts["resource"])
        assert (int(r["RETRIES"]), int(r["WAKEUPS"])) == (retries, wakeups)
        assert r["STATE"] == ("sleep" if alive else "dead"), r
        if not alive:
            assert r["CPU%"] == "-" and r["RSS"] == "-"
    assert int(rows["all"]["COMMITS"]) == 2 * ROUNDS + N_COMMITS + N_DOOMED + N_RETRY
    # COMMIT/s: (COMMITS + RO) over the time since the slot was claimed (attach_ns,
    # 0 for a dead process;
    # from the JSON document: the same slots, idle since), read by the tool at some
    # moment of text_window; shown with one decimal below 100/s, none above.
    t0, t1 = scenario.text_window
    lo_all = hi_all = 0.0
    for p in json.loads(scenario.json.stdout)["processes"]:
        r = rows[p["pid"]]
        done = p["commits"] + p["ro_commits"]
        assert int(r["COMMITS"]) + int(r["RO"]) == done
        lo, hi = done / ((t1 - p["attach_ns"]) / 1e9), done / ((t0 - p["attach_ns"]) / 1e9)
        if not p["alive"]:
            lo = hi = 0.0               # a dead process commits nothing
        tol = 0.05 if hi < 100 else 0.5
        assert lo - tol <= float(r["COMMIT/s"]) <= hi + tol, (r, lo, hi)
        lo_all, hi_all = lo_all + lo, hi_all + hi
    assert lo_all - 0.5 <= float(rows["all"]["COMMIT/s"]) <= hi_all + 0.5, \
        (rows["all"], lo_all, hi_all)
    assert "durability: none" in out
    hot = out.split("hottest TVars by conflicts:", 1)[1].split("\n")
    assert hot[1].split() == ["CONFLICTS", "INDEX", "NAME"]
    assert hot[2].split()[0] == str(ROUNDS) and hot[2].split()[2] == "hot-x"
    assert not any(ln.strip() for ln in hot[3:])


def test_prometheus_numbers(scenario):
    from prometheus_client.parser import text_string_to_metric_families

    text = _ok(scenario.prom)
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(metric, sample_name, pid, **labels):
        got = [s.value for s in fams[metric].samples
               if s.name == sample_name and s.labels.get("pid") == str(pid)
               and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(got) == 1, (metric, pid, labels, got)
        return got[0]

    assert fams["shmstm_commits"].type == "counter"
    assert fams["shmstm_commit_latency_seconds"].type == "histogram"
    hists = {p["pid"]: p["commit_latency_log2_ns"]
             for p in json.loads(scenario.json.stdout)["processes"]}     # idle since
    for pid, (commits, ro, aborts, retries, wakeups, alive) in _expected(scenario.pids).items():
        assert value("shmstm_commits", "shmstm_commits_total", pid) == commits
        assert value("shmstm_readonly_commits", "shmstm_readonly_commits_total", pid) == ro
        for reason, n in aborts.items():
            assert value("shmstm_aborts", "shmstm_aborts_total", pid, reason=reason) == n
        assert value("shmstm_retries", "shmstm_retries_total", pid) == retries
        assert value("shmstm_wakeups", "shmstm_wakeups_total", pid) == wakeups
        assert value("shmstm_process_alive", "shmstm_process_alive", pid) == int(alive)
        assert value("shmstm_commit_latency_seconds", "shmstm_commit_latency_seconds_count",
                     pid) == commits
        assert value("shmstm_commit_latency_seconds", "shmstm_commit_latency_seconds_bucket",
                     pid, le="+Inf") == commits
        check_latency_histogram(fams, pid, hists[pid])
    conf = [s for s in fams["shmstm_tvar_conflicts"].samples]
    x = scenario.rt.tvar("hot-x")
    assert [(s.labels["name"], s.labels["index"], s.labels["generation"], s.value)
            for s in conf] == [("hot-x", str(x._idx), str(x._gen), ROUNDS)]
    assert all(s.labels["runtime"] == scenario.name for f in fams.values() for s in f.samples)
    # every family has HELP and TYPE lines; counters (and only they) end in _total
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, metric, typ = line.split()
            assert ("# HELP %s " % metric) in text
            assert metric.endswith("_total") == (typ == "counter"), line


def test_rt_stats_is_the_same_document(scenario):
    """rt.stats() in the workload's own process returns the tool's document."""
    doc = json.loads(scenario.json.stdout)
    mine = scenario.rt.stats()
    assert set(mine) == set(doc)
    assert set(mine["processes"][0]) == set(doc["processes"][0])
    by_pid = {p["pid"]: p for p in mine["processes"]}
    for pid, (commits, ro, aborts, retries, wakeups, alive) in _expected(scenario.pids).items():
        assert (by_pid[pid]["commits"], by_pid[pid]["aborts"], by_pid[pid]["alive"]) == \
            (commits, aborts, alive)
    assert mine["hottest_tvars"] == doc["hottest_tvars"]
    assert mine["runtime_id"] == doc["runtime_id"]
    assert time.time_ns() >= mine["time_ns"] >= doc["time_ns"]
