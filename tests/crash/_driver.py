"""Crash-test driver: run as ``python _driver.py SCENARIO CONFIG.json RESULT.json``.

Runs in its own process (with PYTHONPATH pointing at the debug build of shmstm for
scenarios that need kill points), forks real worker processes, kills them with real
SIGKILL / SIGSTOP, and writes raw observations as JSON.  It decides nothing: the
pytest side (tests/crash/test_*.py) asserts on what it reports, and re-checks the
segment itself with its own build of shmstm.

Workers are forked from the driver (fast: shmstm is already imported) and report
progress on a shared anonymous mapping (``Board``), written after each commit and
read by the driver without any lock.
"""
import json
import mmap
import os
import random
import signal
import struct
import sys
import time
import traceback

import shmstm
from shmstm.shm import segments as _segments
from shmstm._core import ffi, lib

REC_STATES = {0: "idle", 1: "locking", 2: "validating", 3: "committed"}
IN_COMMIT = (1, 2, 3)

COMMIT_POINTS = [
    "commit.sorted", "commit.token", "commit.locking", "commit.locked_one",
    "commit.validating", "commit.validated", "commit.committed", "commit.published_one",
    "commit.released_one", "commit.woken", "commit.freed", "commit.rollback_one",
]
RECOVER_POINTS = [
    "recover.claimed", "recover.published_one", "recover.entry", "recover.token",
    "recover.before_free",
]
# Commit points a process dies at while holding locks (a recoverer has work to do);
# the first two leave a COMMITTED record (roll forward).
ROLL_FORWARD_VICTIMS = ["commit.committed", "commit.published_one"]
# Durable runtimes (ring.c): the commit point is the fill of ring slot wv.
RING_POINTS = ["ring.before_fill", "ring.claimed", "ring.filled"]


# ---------------------------------------------------------------- progress board

class Board:
    """Shared anonymous mapping: a stop flag, then per worker k: commits (q),
    last commit's begin and end (d, d, CLOCK_MONOTONIC), bad audits (q), flag (q)."""
    REC = struct.Struct("<qddqq")

    def __init__(self, n):
        self.n = n
        self.mm = mmap.mmap(-1, 64 + self.REC.size * n)

    def stop(self):
        struct.pack_into("<q", self.mm, 0, 1)

    def stopped(self):
        return struct.unpack_from("<q", self.mm, 0)[0] != 0

    def get(self, k):
        return self.REC.unpack_from(self.mm, 64 + self.REC.size * k)

    def put(self, k, commits, begin, end, bad, flag):
        self.REC.pack_into(self.mm, 64 + self.REC.size * k, commits, begin, end, bad, flag)

    def reset(self, k):
        self.put(k, 0, 0.0, 0.0, 0, 0)


def arm(fault):
    """Arm this (forked) process's fault injection: fault = [point, countdown,
    delay_permille, delay_max_us, shake_permille]."""
    if not fault:
        return
    point, count, dpm, dus, shake = fault
    rc = lib.shmstm_fault_set(point.encode() if point else ffi.NULL, count, dpm, dus, shake)
    if rc != 0:
        raise RuntimeError("fault injection unavailable (release build?)")


def fork(fn, *args):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            try:
                shmstm.shm.runtime._close_all()    # what a normal exit's atexit hook does
            except BaseException:
                code = code or 4
            os._exit(code)
    return pid


def is_debug_build():
    return ffi.string(lib.shmstm_build_info()).decode().endswith(" debug")


def slot_states(rt):
    """{pid: (slot, rec_state)} of the ACTIVE slots (read without any lock)."""
    pi = ffi.new("shmstm_proc_info *")
    out = {}
    for slot in range(rt.limits["max_procs"]):
        lib.shmstm_seg_proc_info(rt._seg, slot, pi)
        if pi.state == 1:
            out[pi.pid] = (slot, pi.rec_state)
    return out


def stop_and_wait(pid):
    """SIGSTOP a child and wait until the kernel reports it stopped.  Returns False
    if it died instead."""
    os.kill(pid, signal.SIGSTOP)
    _, st = os.waitpid(pid, os.WUNTRACED)
    return os.WIFSTOPPED(st)


def kill_and_reap(pid):
    os.kill(pid, signal.SIGKILL)
    _, st = os.waitpid(pid, 0)
    return st


def wait_children(pids, timeout):
    """Reap ``pids``; {pid: status}.  Stragglers after ``timeout`` are SIGKILLed and
    reported with status 'hung'."""
    end = time.monotonic() + timeout
    out = {}
    left = set(pids)
    while left and time.monotonic() < end:
        for pid in list(left):
            r, st = os.waitpid(pid, os.WNOHANG)
            if r:
                out[pid] = st
                left.discard(pid)
        time.sleep(0.002)
    for pid in left:
        kill_and_reap(pid)
        out[pid] = "hung"
    return out


def describe_status(st):
    if st == "hung":
        return "hung"
    if os.WIFSIGNALED(st):
        return "signal %d" % os.WTERMSIG(st)
    return "exit %d" % os.WEXITSTATUS(st)


# ---------------------------------------------------------------- bank workload

def accounts(rt, n):
    return [rt.tvar("acct:%d" % i) for i in range(n)]


def w_bank(board, k, name, limits, seed, n_acc, fault, max_txns):
    arm(fault)
    rt = shmstm.open(name, **limits)
    accts = accounts(rt, n_acc)
    total = 1000 * n_acc
    rnd = random.Random(seed)
    # Anonymous TVars created and freed again: freeing commits (WE_FREE entries)
    # go through the kill points and recovery too.
    spare = []

    def transfer(a, b, amt, free_one):
        accts[a].value = accts[a].value - amt
        accts[b].value = accts[b].value + amt
        if free_one is not None:
            free_one.free()

    def audit():
        return sum(t.value for t in accts)

    commits = bad = 0
    for i in range(max_txns):
        if board.stopped():
            break
        t0 = time.monotonic()
        if i % 10 == 9:
            if shmstm.atomically(audit) != total:
                bad += 1
        elif i % 10 == 4:
            spare.append(rt.new_tvar(i))
        else:
            a, b = rnd.sample(range(n_acc), 2)
            victim = spare.pop() if spare and i % 10 == 7 else None
            shmstm.atomically(transfer, a, b, rnd.randint(1, 100), victim)
        commits += 1
        board.put(k, commits, t0, time.monotonic(), bad, 0)


def setup_bank(name, limits, n_acc):
    rt = shmstm.open(name, **limits)
    accts = [rt.tvar("acct:%d" % i, 1000) for i in range(n_acc)]
    assert sum(t.value for t in accts) == 1000 * n_acc
    return rt, accts


def scenario_bank_kills(cfg):
    """Random SIGKILLs of bank workers; every other kill is taken while the victim is
    inside a commit (SIGSTOP, read its commit record state, SIGKILL)."""
    name, limits, n_acc = cfg["name"], cfg["limits"], cfg["accounts"]
    n_workers, n_kills = cfg["workers"], cfg["kills"]
    rnd = random.Random(cfg.get("seed", 1))
    rt, accts = setup_bank(name, limits, n_acc)
    total = 1000 * n_acc
    board = Board(n_workers)
    fault = [None, 0, cfg.get("delay_permille", 0), cfg.get("delay_max_us", 0), 0]
    workers = {}                    # pid -> board index
    seq = [0]

    def spawn(k):
        board.reset(k)
        seq[0] += 1
        pid = fork(w_bank, board, k, name, limits, 1000 + seq[0], n_acc, fault, 10 ** 9)
        workers[pid] = k

    for k in range(n_workers):
        spawn(k)
    kills, errors = [], []
    stop_tries = 0
    t_start = time.monotonic()
    while len(kills) < n_kills and time.monotonic() - t_start < cfg.get("max_seconds", 120):
        time.sleep(rnd.uniform(0.001, 0.01))
        victim = rnd.choice(sorted(workers))
        want_in_commit = len(kills) % 2 == 0
        if not stop_and_wait(victim):
            errors.append("worker %d died on its own" % victim)
            break
        slot, state = slot_states(rt).get(victim, (None, None))
        if want_in_commit and state not in IN_COMMIT and stop_tries < 2000:
            stop_tries += 1
            os.kill(victim, signal.SIGCONT)
            continue
        t_kill = time.monotonic()
        st = kill_and_reap(victim)
        if not (os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL):
            errors.append("victim %d: %s" % (victim, describe_status(st)))
        k = workers.pop(victim)
        survivors = dict(workers)
        seen = {}
        while len(seen) < len(survivors) and time.monotonic() - t_kill < 10:
            now = time.monotonic()
            for pid, kk in survivors.items():
                if pid not in seen and board.get(kk)[1] > t_kill:
                    seen[pid] = now - t_kill
            time.sleep(0.0002)
        t_surv = max(seen.values()) if len(seen) == len(survivors) else None
        # A read of every account: meets (and recovers) any lock the victim held.
        s = shmstm.atomically(lambda: sum(t.value for t in accts))
        t_all = time.monotonic() - t_kill
        kills.append({"state": REC_STATES.get(state, str(state)), "in_commit": state in IN_COMMIT,
                      "survivors_s": t_surv, "all_accounts_s": t_all, "total_ok": s == total})
        spawn(k)
    # Quiescence: every worker finishes its current transaction and exits normally.
    time.sleep(0.2)
    board.stop()
    statuses = wait_children(list(workers), 30)
    for pid, st in statuses.items():
        if st == "hung" or not os.WIFEXITED(st) or os.WEXITSTATUS(st) != 0:
            errors.append("worker %d at the end: %s" % (pid, describe_status(st)))
    locks = _segments.lock_report(name)     # before anyone reads: what recovery left
    bad_audits = sum(board.get(k)[3] for k in range(n_workers))
    final = shmstm.atomically(lambda: [t.value for t in accts])
    return {"kills": kills, "errors": errors, "locks_at_quiescence": locks,
            "bad_audits_in_workers": bad_audits, "final_total": sum(final), "total": total,
            "stop_tries": stop_tries, "seconds": time.monotonic() - t_start,
            "debug_build": is_debug_build()}


# ---------------------------------------------------------------- kill points

def read_fault_log(path):
    hits = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit():
                    hits[int(parts[0])] = parts[1]
    except FileNotFoundError:
        pass
    return hits


def scenario_kill_points(cfg):
    """Workers armed with one kill point each, until every commit and recovery point
    was hit ``target`` times; then a clean final phase."""
    name, limits, n_acc = cfg["name"], cfg["limits"], cfg["accounts"]
    target, n_commit_w, n_recover_w = cfg["target"], cfg["commit_workers"], cfg["recover_workers"]
    commit_points = COMMIT_POINTS + (RING_POINTS if limits.get("path") else [])
    log = cfg["fault_log"]
    os.environ["SHMSTM_FAULT_LOG"] = log      # read by shmstm_fault_set in each worker
    rnd = random.Random(cfg.get("seed", 2))
    rt, accts = setup_bank(name, limits, n_acc)
    total = 1000 * n_acc
    n_slots = n_commit_w + n_recover_w + 2
    board = Board(n_slots)
    hits = {p: 0 for p in commit_points + RECOVER_POINTS}
    workers = {}                    # pid -> (board index, point)
    errors = []
    seq = [0]
    clean_exits = 0

    def least(points):
        m = min(hits[p] for p in points)
        return rnd.choice([p for p in points if hits[p] == m])

    def spawn(k, kind):
        if kind == "recover":
            point, count = least(RECOVER_POINTS), 1
        else:
            armed = [p for _, p in workers.values()]
            if hits["recover.published_one"] < target and \
                    not any(p in ROLL_FORWARD_VICTIMS for p in armed):
                point = rnd.choice(ROLL_FORWARD_VICTIMS)
            else:
                point = least(commit_points)
            count = rnd.randint(1, 4)
        board.reset(k)
        seq[0] += 1
        fault = [point, count, cfg.get("delay_permille", 0), cfg.get("delay_max_us", 0),
                 cfg.get("shake_permille", 0)]
        pid = fork(w_bank, board, k, name, limits, 5000 + seq[0], n_acc, fault,
                   cfg.get("max_txns", 3000))
        workers[pid] = (k, point)

    for k in range(n_commit_w):
        spawn(k, "commit")
    for k in range(n_commit_w, n_commit_w + n_recover_w):
        spawn(k, "recover")
    t_start = time.monotonic()
    while min(hits.values()) < target and time.monotonic() - t_start < cfg.get("max_seconds", 150):
        pid, st = os.waitpid(-1, 0)
        if pid not in workers:
            continue
        k, point = workers.pop(pid)
        if os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL:
            died_at = read_fault_log(log).get(pid)
            if died_at != point:
                errors.append("worker %d armed at %s died by SIGKILL at %r" % (pid, point, died_at))
            else:
                hits[point] += 1
        elif os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0:
            clean_exits += 1        # ran max_txns without reaching its point
        else:
            errors.append("worker %d armed at %s: %s" % (pid, point, describe_status(st)))
        spawn(k, "recover" if k >= n_commit_w else "commit")
    # Disarm: let the armed workers go, then a clean final phase touches every account.
    board.stop()
    for pid, st in wait_children(list(workers), 30).items():
        k, point = workers[pid]
        if os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL and \
                read_fault_log(log).get(pid) == point:
            hits[point] += 1
        elif st == "hung" or not os.WIFEXITED(st) or os.WEXITSTATUS(st) != 0:
            errors.append("worker %d armed at %s at the end: %s" % (pid, point, describe_status(st)))
    board = Board(2)
    final_pids = [fork(w_bank, board, k, name, limits, 9000 + k, n_acc, None, cfg.get("final_txns", 300))
                  for k in range(2)]
    for pid, st in wait_children(final_pids, 60).items():
        if st == "hung" or not os.WIFEXITED(st) or os.WEXITSTATUS(st) != 0:
            errors.append("final worker %d: %s" % (pid, describe_status(st)))
    locks = _segments.lock_report(name)
    final = shmstm.atomically(lambda: [t.value for t in accts])
    durable = None
    if limits.get("path"):              # the flusher drains what the segment holds
        end = time.monotonic() + 60
        while time.monotonic() < end:
            d = rt.stats()["durability"]
            if d["flushed_wv"] == d["committed_wv"]:
                break
            time.sleep(0.01)
        vals = shmstm.read_durable(limits["path"])["values"]
        durable = [vals.get("acct:%d" % i) for i in range(n_acc)]
    return {"hits": hits, "errors": errors, "clean_exits": clean_exits, "final": final,
            "durable_final": durable,
            "locks_at_quiescence": locks, "final_total": sum(final), "total": total,
            "bad_audits_in_final": sum(board.get(k)[3] for k in range(2)),
            "seconds": time.monotonic() - t_start, "debug_build": is_debug_build()}


# ---------------------------------------------------------------- freeing + re-recovery

def w_free_and_die(name, limits, handle_q):
    """Create an anonymous TVar, then free it in a commit that dies at its commit
    point (armed by the caller): the record is COMMITTED with a WE_FREE entry."""
    rt = shmstm.open(name, **limits)
    x = rt.new_tvar("doomed")
    os.write(handle_q, struct.pack("<II", x._idx, x._gen))
    arm(["commit.committed", 1, 0, 0, 0])
    shmstm.atomically(x.free)


def w_touch(name, limits, idx, gen, fault):
    """Read TVar (idx, gen): meets the dead owner's lock and recovers it."""
    arm(fault)
    rt = shmstm.open(name, **limits)
    tv = shmstm.TVar(rt, idx, gen, None)
    try:
        tv.value
    except shmstm.StaleTVarError:
        pass


def scenario_free_rerecovery(cfg):
    """A freeing commit dies after its commit point; its first recoverer dies after
    publishing (generation stored, lock still held); a second recoverer finishes.
    Reports the generation parity afterwards (must be even: free)."""
    name, limits = cfg["name"], cfg["limits"]
    rt = shmstm.open(name, **limits)
    ctx = rt._ctx()
    r, w = os.pipe()
    pid = fork(w_free_and_die, name, limits, w)
    idx, gen = struct.unpack("<II", os.read(r, 8))
    st1 = os.waitpid(pid, 0)[1]
    locked_after_owner = _segments.lock_report(name)
    pid = fork(w_touch, name, limits, idx, gen, ["recover.published_one", 1, 0, 0, 0])
    st2 = os.waitpid(pid, 0)[1]
    locked_after_first = _segments.lock_report(name)
    pid = fork(w_touch, name, limits, idx, gen, None)
    st3 = os.waitpid(pid, 0)[1]
    locked_after_second = _segments.lock_report(name)
    live = {g: lib.shmstm_tvar_check(ctx.ptr, idx, g) == 0 for g in (gen, gen + 2)}
    return {"owner": describe_status(st1), "first_recoverer": describe_status(st2),
            "second_recoverer": describe_status(st3),
            "locked_after_owner": locked_after_owner, "locked_after_first": locked_after_first,
            "locked_after_second": locked_after_second, "idx": idx, "gen": gen,
            "live_at_gen": {str(k): v for k, v in live.items()},
            "debug_build": is_debug_build()}


# ---------------------------------------------------------------- list-append history

def w_appender(name, limits, keys_n, proc, log_path, seed, fault):
    arm(fault)
    rt = shmstm.open(name, **limits)
    keys = [rt.tvar("k%d" % k) for k in range(keys_n)]
    rnd = random.Random(seed)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    i = 0
    while True:
        read_keys = rnd.sample(range(keys_n), rnd.randint(1, 3))
        append_keys = [] if i % 5 == 4 else rnd.sample(range(keys_n), rnd.randint(1, 2))
        # The intent is logged before the transaction: if this process dies before
        # its "ok" line, the transaction is indeterminate (may or may not have
        # committed) and must be all-or-nothing.
        os.write(fd, (json.dumps(["intent", i, append_keys]) + "\n").encode())

        def body():
            ops = []
            for k in read_keys:
                ops.append(["r", k, keys[k].value])
            for k in append_keys:
                elem = (proc, i, k)
                cur = keys[k].value
                keys[k].value = cur + (elem,)
                ops.append(["a", k, elem, len(cur)])
            return ops

        ops = shmstm.atomically(body)
        os.write(fd, (json.dumps(["ok", i, ops]) + "\n").encode())
        i += 1


def scenario_history_kills(cfg):
    """List-append workers (Elle style) SIGKILLed at random, every other kill inside
    a commit; each incarnation logs intents and committed ops to its own file."""
    name, limits, keys_n = cfg["name"], cfg["limits"], cfg["keys"]
    rnd = random.Random(cfg.get("seed", 3))
    logdir = cfg["logdir"]
    rt = shmstm.open(name, **limits)
    keys = [rt.tvar("k%d" % k, ()) for k in range(keys_n)]
    fault = [None, 0, cfg.get("delay_permille", 0), cfg.get("delay_max_us", 0), 0]
    workers = {}
    procs = []                      # (proc id, log path, killed)
    errors = []

    def spawn():
        proc = len(procs)
        path = os.path.join(logdir, "p%d.log" % proc)
        pid = fork(w_appender, name, limits, keys_n, proc, path, 100 + proc, fault)
        workers[pid] = proc
        procs.append([proc, path, False])

    for _ in range(cfg["workers"]):
        spawn()
    kills = []
    stop_tries = 0
    t_start = time.monotonic()
    while len(kills) < cfg["kills"] and time.monotonic() - t_start < cfg.get("max_seconds", 60):
        time.sleep(rnd.uniform(0.005, 0.03))
        victim = rnd.choice(sorted(workers))
        if not stop_and_wait(victim):
            errors.append("worker %d died on its own" % victim)
            break
        slot, state = slot_states(rt).get(victim, (None, None))
        if len(kills) % 2 == 0 and state not in IN_COMMIT and stop_tries < 2000:
            stop_tries += 1
            os.kill(victim, signal.SIGCONT)
            continue
        kill_and_reap(victim)
        proc = workers.pop(victim)
        procs[proc][2] = True
        kills.append(REC_STATES.get(state, str(state)))
        spawn()
    # End: SIGKILL the rest too (their last transaction is indeterminate as well).
    for pid in list(workers):
        os.kill(pid, signal.SIGSTOP)
    for pid, proc in list(workers.items()):
        kill_and_reap(pid)
        procs[proc][2] = True
    final = shmstm.atomically(lambda: [k.value for k in keys])
    locks = _segments.lock_report(name)
    return {"kills": kills, "errors": errors, "procs": procs,
            "final": [[list(e) for e in v] for v in final], "locks_after": locks,
            "seconds": time.monotonic() - t_start, "debug_build": is_debug_build()}


# ---------------------------------------------------------------- SIGSTOP a lock holder

def scenario_sigstop(cfg):
    name, limits, n_acc = cfg["name"], cfg["limits"], cfg["accounts"]
    rt, accts = setup_bank(name, limits, n_acc)
    n_workers = cfg["workers"]
    board = Board(n_workers)
    fault = [None, 0, cfg.get("delay_permille", 0), cfg.get("delay_max_us", 0), 0]
    workers = {}
    for k in range(n_workers):
        pid = fork(w_bank, board, k, name, limits, 700 + k, n_acc, fault, 10 ** 9)
        workers[pid] = k
    errors = []
    caught = None
    rnd = random.Random(4)
    for attempt in range(3000):
        time.sleep(rnd.uniform(0.0005, 0.003))
        victim = rnd.choice(sorted(workers))
        if not stop_and_wait(victim):
            errors.append("worker died")
            break
        slots = slot_states(rt)
        slot = slots.get(victim, (None, None))[0]
        held = sorted(l["index"] for l in _segments.lock_report(name) if l["slot"] == slot)
        if slot is not None and held:
            caught = (victim, slot, held, slots[victim][1])
            break
        os.kill(victim, signal.SIGCONT)
    if caught is None:
        board.stop()
        wait_children(list(workers), 30)
        return {"caught": False, "errors": errors}
    victim, slot, held, state = caught
    stats0 = {p["pid"]: p for p in rt.stats()["processes"]}
    t_stop = time.monotonic()
    observations = 0
    stolen = []
    others_commits = {pid: board.get(k)[0] for pid, k in workers.items() if pid != victim}
    while time.monotonic() - t_stop < cfg["stop_seconds"]:
        time.sleep(0.02)
        now_held = sorted(l["index"] for l in _segments.lock_report(name) if l["slot"] == slot)
        owner = slot_states(rt).get(victim, (None,))[0]
        observations += 1
        if now_held != held or owner != slot:
            stolen.append({"t": time.monotonic() - t_stop, "held": now_held, "slot_of_victim": owner})
    stats1 = {p["pid"]: p for p in rt.stats()["processes"]}
    conflicts_during_stop = sum(
        stats1[pid]["aborts"]["locked"] - stats0[pid]["aborts"]["locked"]
        for pid in workers if pid != victim and pid in stats0 and pid in stats1)
    commits_during_stop = {str(pid): board.get(k)[0] - others_commits[pid]
                           for pid, k in workers.items() if pid != victim}
    t_cont = time.monotonic()
    os.kill(victim, signal.SIGCONT)
    resumed = {}
    while len(resumed) < len(workers) and time.monotonic() - t_cont < 10:
        for pid, k in workers.items():
            if pid not in resumed and board.get(k)[1] > t_cont:
                resumed[pid] = time.monotonic() - t_cont
        time.sleep(0.001)
    board.stop()
    for pid, st in wait_children(list(workers), 30).items():
        if st == "hung" or not os.WIFEXITED(st) or os.WEXITSTATUS(st) != 0:
            errors.append("worker %d: %s" % (pid, describe_status(st)))
    locks = _segments.lock_report(name)
    final = shmstm.atomically(lambda: [t.value for t in accts])
    return {"caught": True, "victim_state": REC_STATES.get(state), "held": held,
            "observations": observations, "stolen": stolen,
            "conflicts_during_stop": conflicts_during_stop,
            "commits_during_stop": commits_during_stop,
            "resumed_s": {str(k): v for k, v in resumed.items()}, "workers": len(workers),
            "errors": errors, "locks_at_quiescence": locks, "final_total": sum(final),
            "total": 1000 * n_acc, "debug_build": is_debug_build()}


# ---------------------------------------------------------------- killed in retry

def w_block(board, k, name, limits, var):
    rt = shmstm.open(name, **limits)
    tv = rt.tvar(var)
    ctx = rt._ctx()
    board.put(k, 0, 0.0, 0.0, 0, ctx.ptr.slot + 1)      # attached: flag = slot + 1
    shmstm.atomically(lambda: shmstm.check(tv.value > 0))
    board.put(k, 1, 0.0, time.monotonic(), 0, ctx.ptr.slot + 1)


def _wait_blocked(rt, pids, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        waiting = {p["pid"] for p in rt.stats()["processes"] if p["waiting"]}
        if set(pids) <= waiting:
            return True
        time.sleep(0.002)
    return False


def scenario_retry_kill(cfg):
    """Waiters SIGKILLed while blocked in retry on x; new processes must reclaim
    their slots (max_procs is tight) and block on y; a commit to x (stale waiter
    bits of the dead slots, now the new processes' slots) must not wake them into
    Python; a commit to y wakes every one of them."""
    name, limits, n = cfg["name"], cfg["limits"], cfg["waiters"]
    rt = shmstm.open(name, **limits)
    x, y = rt.tvar("x", 0), rt.tvar("y", 0)
    board = Board(2 * n)
    dead = [fork(w_block, board, k, name, limits, "x") for k in range(n)]
    blocked1 = _wait_blocked(rt, dead, 20)
    dead_slots = sorted(board.get(k)[4] - 1 for k in range(n))
    wout = ffi.new("uint64_t *")

    def x_waiters():
        assert lib.shmstm_tvar_waiters(rt._seg, x._idx, wout) == 0
        return [b for b in range(64) if wout[0] >> b & 1]
    x_waiters_before_kill = x_waiters()
    for pid in dead:
        kill_and_reap(pid)
    slots_after_kill = {p["slot"]: p["alive"] for p in rt.stats()["processes"]}
    new = [fork(w_block, board, n + k, name, limits, "y") for k in range(n)]
    blocked2 = _wait_blocked(rt, new, 20)
    x_waiters_after_reclaim = x_waiters()      # the new processes reclaimed the dead slots
    new_slots = sorted(board.get(n + k)[4] - 1 for k in range(n))
    retries0 = {p["pid"]: p["retries"] for p in rt.stats()["processes"] if p["pid"] in new}
    x.value = 1                      # stale bits of the dead waiters: spurious bumps only
    time.sleep(cfg.get("observe_s", 0.5))    # observation window for a wrongful wake-up
    woken_by_x = [k for k in range(n, 2 * n) if board.get(k)[0]]
    still_blocked = _wait_blocked(rt, new, 2)
    retries1 = {p["pid"]: p["retries"] for p in rt.stats()["processes"] if p["pid"] in new}
    t_y = time.monotonic()
    y.value = 1
    end = time.monotonic() + 10
    while time.monotonic() < end and not all(board.get(k)[0] for k in range(n, 2 * n)):
        time.sleep(0.001)
    wake_s = [board.get(k)[2] - t_y if board.get(k)[0] else None for k in range(n, 2 * n)]
    statuses = {str(p): describe_status(s) for p, s in wait_children(new, 20).items()}
    procs_left = [p for p in rt.stats()["processes"] if p["pid"] != os.getpid()]
    return {"blocked_before_kill": blocked1, "dead_slots": dead_slots,
            "x_waiters_before_kill": x_waiters_before_kill,
            "x_waiters_after_reclaim": x_waiters_after_reclaim,
            "slots_after_kill": {str(k): v for k, v in slots_after_kill.items()},
            "new_blocked": blocked2, "new_slots": new_slots, "woken_by_x": woken_by_x,
            "still_blocked_after_x": still_blocked,
            "retries_before_x": list(retries0.values()), "retries_after_x": list(retries1.values()),
            "wake_s": wake_s, "statuses": statuses,
            "procs_left": [(p["slot"], p["pid"], p["alive"]) for p in procs_left]}


# ---------------------------------------------------------------- creator killed in init

def w_open(board, k, name, limits, fault, go_fd):
    arm(fault)
    os.read(go_fd, 1)                 # wait for "go" (all openers start together)
    t0 = time.monotonic()
    rt = shmstm.open(name, **limits)
    tv = rt.tvar("n", 0)
    tv.modify(lambda v: v + 1)
    rid = rt.stats()["runtime_id"]
    board.put(k, 1, t0, time.monotonic(), 0, int(rid[:15], 16))


def scenario_init_crash(cfg):
    name, limits = cfg["name"], cfg["limits"]
    out = {"debug_build": is_debug_build()}
    board = Board(16)
    # 1. A lone creator killed before its segment is ready.
    r, w = os.pipe()
    pid = fork(w_open, board, 0, name, limits, ["create.before_ready", 1, 0, 0, 0], r)
    os.write(w, b"g")
    out["creator"] = describe_status(os.waitpid(pid, 0)[1])
    out["final_name_exists"] = os.path.exists("/dev/shm/shmstm." + name)
    out["left_behind"] = [d for d in _segments.list_segments()
                          if d["creating"] and d["creating"]["runtime"] == name]
    # 2. The next opener is not held up.
    r, w = os.pipe()
    pid = fork(w_open, board, 1, name, limits, None, r)
    os.write(w, b"g")
    st = wait_children([pid], 30)[pid]
    out["next_opener"] = describe_status(st)
    out["next_open_s"] = board.get(1)[2] - board.get(1)[1]
    shmstm.unlink(name)
    # 3. Openers racing, some killed mid-initialisation.
    n = cfg["racers"]
    r, w = os.pipe()
    pids = {}
    for k in range(n):
        fault = ["create.before_ready", 1, 0, 0, 0] if k % 2 == 0 else None
        pids[fork(w_open, board, 2 + k, name, limits, fault, r)] = k
    os.write(w, b"g" * n)
    sts = wait_children(list(pids), 30)
    out["racers"] = [{"armed": pids[p] % 2 == 0, "status": describe_status(s),
                      "open_s": (board.get(2 + pids[p])[2] - board.get(2 + pids[p])[1])
                      if board.get(2 + pids[p])[0] else None,
                      "runtime_id": board.get(2 + pids[p])[4]} for p, s in sts.items()]
    rt = shmstm.open(name, **limits)
    out["counter"] = rt.tvar("n", 0).value
    out["cleanup_removed"] = shmstm.cleanup_segments(names=[name])
    out["after_cleanup"] = [d["name"] for d in _segments.list_segments()
                            if d["name"] == name or (d["creating"] and d["creating"]["runtime"] == name)]
    rt.close()
    return out


# ---------------------------------------------------------------- asynchronous KeyboardInterrupt

def w_interrupter(target, seed):
    """Send real SIGINTs to ``target`` every 0.2-3 ms until killed."""
    rnd = random.Random(seed)
    while True:
        time.sleep(rnd.uniform(0.0002, 0.003))
        os.kill(target, signal.SIGINT)


def scenario_interrupts(cfg):
    """In this (live) process: transactions interrupted by KeyboardInterrupt raised by
    signal handlers at arbitrary points: SIGALRM from a one-shot setitimer armed
    before each transaction (fires 10-300 us later) and real SIGINTs sent by another
    process every 0.2-3 ms."""
    name, limits = cfg["name"], cfg["limits"]
    rt = shmstm.open(name, **limits)
    n_acc, n_pairs = 6, 6
    accts = [rt.tvar("acct:%d" % i, 1000) for i in range(n_acc)]
    pairs = [(rt.tvar("pa:%d" % i, ("v", 0)), rt.tvar("pb:%d" % i, ("v", 0)))
             for i in range(n_pairs)]
    rnd = random.Random(5)
    counts = {"SIGALRM": 0, "SIGINT": 0, "caught": 0, "completed": 0,
              "shmstm_errors": 0, "in_tx_after": 0}
    errors = []
    # Handlers raise only while armed (around the transaction call): the driver's
    # own bookkeeping is never interrupted, so every KeyboardInterrupt observed
    # comes from inside shmstm.atomically.  (Disarming is a plain list store: no
    # call, no backward jump, so CPython runs no signal handler before it.)
    armed = [False]

    def on_signal(signum, frame):
        counts[signal.Signals(signum).name] += 1
        if armed[0]:
            raise KeyboardInterrupt

    def transfer(a, b, amt):
        accts[a].value = accts[a].value - amt
        accts[b].value = accts[b].value + amt

    def set_pair(i, v):
        a, b = pairs[i]
        a.value = ("v", v)          # pickled values: heap blocks staged before commit
        b.value = ("v", v)

    def run(end):
        i = 0
        while time.monotonic() < end:
            i += 1
            a, b = rnd.sample(range(n_acc), 2)
            amt, pair = rnd.randint(1, 50), rnd.randrange(n_pairs)
            signal.setitimer(signal.ITIMER_REAL, rnd.uniform(1e-5, 3e-4))
            try:
                armed[0] = True
                if i % 2:
                    shmstm.atomically(transfer, a, b, amt)
                else:
                    shmstm.atomically(set_pair, pair, i)
                armed[0] = False
                counts["completed"] += 1
            except KeyboardInterrupt:
                armed[0] = False
                counts["caught"] += 1
            except shmstm.Error as e:
                armed[0] = False
                counts["shmstm_errors"] += 1
                if len(errors) < 5:
                    errors.append(repr(e))
            if shmstm.in_transaction():
                counts["in_tx_after"] += 1

    signal.signal(signal.SIGALRM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sender = fork(w_interrupter, os.getpid(), 6)
    run(time.monotonic() + cfg["seconds"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0)
    kill_and_reap(sender)
    my_slot = rt._ctx().ptr.slot
    locks = _segments.lock_report(name)
    total = shmstm.atomically(lambda: sum(t.value for t in accts))
    pair_values = shmstm.atomically(lambda: [(a.value, b.value) for a, b in pairs])
    shmstm.atomically(transfer, 0, 1, 1)
    after = shmstm.atomically(lambda: sum(t.value for t in accts))
    return {"counts": counts, "errors": errors, "locks": locks, "my_slot": my_slot,
            "total": total, "expected_total": 1000 * n_acc, "total_after_one_more": after,
            "pairs": [[list(a), list(b)] for a, b in pair_values]}


SCENARIOS = {
    "bank_kills": scenario_bank_kills,
    "kill_points": scenario_kill_points,
    "free_rerecovery": scenario_free_rerecovery,
    "history_kills": scenario_history_kills,
    "sigstop": scenario_sigstop,
    "retry_kill": scenario_retry_kill,
    "init_crash": scenario_init_crash,
    "interrupts": scenario_interrupts,
}


def main():
    scenario, cfg_path, out_path = sys.argv[1:4]
    with open(cfg_path) as f:
        cfg = json.load(f)
    me = os.getpid()
    try:
        result = SCENARIOS[scenario](cfg)
    except BaseException:
        if os.getpid() != me:
            os._exit(5)
        result = {"driver_error": traceback.format_exc()}
    if os.getpid() != me:          # a forked child must never write the result
        os._exit(6)
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.rename(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main()
