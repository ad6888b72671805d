"""Worker side of ``tools/bench``.

Kept in its own module (not in the ``bench`` script) so that spawned workers
import a small, side-effect-free module.  ``tools/bench`` puts this directory
on ``sys.path``; ``multiprocessing``'s spawn start method copies ``sys.path``
into the children, so they can import it too.

Every mechanism runs the same three workloads with the same per-op overhead
(one Python closure call, the same pre-drawn random transfers for *bank*), so the
ratios between mechanisms measured in one run are comparable.
"""

import itertools
import random
import time
import traceback

# mechanism keys, in display order
MECHANISMS = ("lock", "striped", "manager", "shmstm")
MECHANISM_LABELS = {
    "lock": "Array + global Lock",
    "striped": "Array + 64 striped Locks",
    "manager": "Manager().dict() + Lock",
    "shmstm": "shmstm",
}
WORKLOADS = ("counter", "bank", "disjoint")

N_ACCOUNTS = 1000
INITIAL_BALANCE = 1000
N_STRIPES = 64
# Disjoint counters of the Array baselines are one cache line apart (8 int64s),
# so the baselines do not pay for false sharing: a careful user would pad too.
PAD = 8


def array_size(workload, procs):
    if workload == "counter":
        return 1
    if workload == "bank":
        return N_ACCOUNTS
    return procs * PAD


N_DRAWS = 1 << 16


def _bank_draws(rng):
    """An endless iterator of (i, j, amount): i != j accounts, amount in 1..100.

    Drawn up front (2**16 per worker, cycled), so an op pays one next() instead
    of three random() calls; the cost is the same for every mechanism and the
    mechanism's own cost dominates the measurement.
    """
    draws = []
    for _ in range(N_DRAWS):
        i = rng.randrange(N_ACCOUNTS)
        j = rng.randrange(N_ACCOUNTS - 1)
        if j >= i:
            j += 1
        draws.append((i, j, rng.randint(1, 100)))
    return itertools.cycle(draws)


# ---------------------------------------------------------------------------
# op factories: each returns (op, warmup); op() performs exactly one operation,
# warmup() touches the shared objects without changing them (attach, page in).


def _ops_lock(workload, shared, k, rng):
    arr, lock = shared
    if workload == "counter":
        def op():
            with lock:
                arr[0] += 1
    elif workload == "disjoint":
        idx = k * PAD

        def op():
            with lock:
                arr[idx] += 1
    else:
        draw = _bank_draws(rng).__next__

        def op():
            i, j, amt = draw()
            with lock:
                arr[i] -= amt
                arr[j] += amt

    def warmup():
        with lock:
            arr[0]
    return op, warmup


def _ops_striped(workload, shared, k, rng):
    arr, locks = shared
    if workload == "counter":
        lock = locks[0]

        def op():
            with lock:
                arr[0] += 1
    elif workload == "disjoint":
        idx = k * PAD
        lock = locks[k % N_STRIPES]

        def op():
            with lock:
                arr[idx] += 1
    else:
        draw = _bank_draws(rng).__next__

        def op():
            i, j, amt = draw()
            a = i % N_STRIPES
            b = j % N_STRIPES
            if a == b:
                with locks[a]:
                    arr[i] -= amt
                    arr[j] += amt
            else:
                if a > b:
                    a, b = b, a
                with locks[a]:
                    with locks[b]:
                        arr[i] -= amt
                        arr[j] += amt

    def warmup():
        for lk in locks:
            with lk:
                pass
        arr[0]
    return op, warmup


def _ops_manager(workload, shared, k, rng):
    d, lock = shared
    if workload == "counter":
        def op():
            with lock:
                d[0] = d[0] + 1
    elif workload == "disjoint":
        def op():
            with lock:
                d[k] = d[k] + 1
    else:
        draw = _bank_draws(rng).__next__

        def op():
            i, j, amt = draw()
            with lock:
                d[i] = d[i] - amt
                d[j] = d[j] + amt

    def warmup():
        with lock:
            d.get(0)
    return op, warmup


def _ops_shmstm(workload, shared, k, rng):
    import shmstm

    atomically = shmstm.atomically
    tvars = shared
    if workload in ("counter", "disjoint"):
        # disjoint: the parent passes this worker only its own TVar
        tv = tvars[0]

        def inc():
            tv.value += 1

        def op():
            atomically(inc)
    else:
        draw = _bank_draws(rng).__next__

        def xfer(a, b, amt):
            a.value -= amt
            b.value += amt

        def op():
            i, j, amt = draw()
            atomically(xfer, tvars[i], tvars[j], amt)

    def warmup():
        # Attaches the runtime (lazily, on first use) and reads every TVar once.
        for t in tvars:
            _ = t.value
    return op, warmup


_FACTORIES = {
    "lock": _ops_lock,
    "striped": _ops_striped,
    "manager": _ops_manager,
    "shmstm": _ops_shmstm,
}


def _shmstm_own_stats(rt):
    """This process's commit/abort counters, if the runtime offers ``stats()``
    (not part of the API contract, so optional).  Read before close() frees
    the process slot and its counters."""
    try:
        import os
        me = os.getpid()
        for p in rt.stats()["processes"]:
            if p.get("pid") == me:
                return {"commits": p.get("commits"), "ro_commits": p.get("ro_commits"),
                        "aborts": dict(p.get("aborts") or {}),
                        "irrevocable": p.get("irrevocable")}
    except Exception as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}
    return None


def worker(mechanism, workload, shared, k, seed, batch, barrier, gun, times, results):
    """One benchmark process.

    Protocol: build the op, warm up, wait at ``barrier`` (all workers + the
    parent), wait for the ``gun`` event; the parent has written the window's
    start and end (``time.monotonic()``, system-wide on Linux) into
    ``times``.  Run ops in batches of ``batch`` until the end time, then report
    ``("ok", k, ops, t_stop, extra)`` on ``results`` (extra: shmstm's own
    commit/abort counters, or None).  Any failure is reported as
    ``("error", k, traceback)`` and breaks the barrier so nobody waits for it.
    """
    try:
        rng = random.Random(seed)
        op, warmup = _FACTORIES[mechanism](workload, shared, k, rng)
        warmup()
        barrier.wait()
        gun.wait()
        t_end = times[1]
        mono = time.monotonic
        rep = itertools.repeat
        ops = 0
        while True:
            for _ in rep(None, batch):
                op()
            ops += batch
            if mono() >= t_end:
                break
        t_stop = mono()
        extra = _shmstm_own_stats(shared[0].runtime) if mechanism == "shmstm" else None
        results.put(("ok", k, ops, t_stop, extra))
    except BaseException:
        try:
            barrier.abort()
        except Exception:
            pass
        results.put(("error", k, traceback.format_exc()))
    finally:
        if mechanism == "shmstm":
            try:
                shared[0].runtime.close()
            except Exception:
                pass
