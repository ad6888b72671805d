"""Bank invariant: concurrent transfers between accounts conserve the total.

Oracle: the conserved total, checked (a) by a concurrent auditor in read-only
transactions, both inside every attempt (opacity: even a doomed attempt must see a
consistent snapshot) and for every committed audit, (b) at the end.
"""

import multiprocessing
import random
import sys
import threading

import pytest

import shmstm
from _helpers import Group, deadline_for, open_rt, scaled

N_ACCOUNTS = 50

pytestmark = pytest.mark.stress


def _accounts(rt):
    return [rt.tvar("acct:%d" % i) for i in range(N_ACCOUNTS)]


def _transfer_worker(start, name, seed, n_txns):
    """Unconditional transfers (balances may go negative; the total may not change)."""
    rt = open_rt(name)
    try:
        accts = _accounts(rt)
        rnd = random.Random(seed)
        attempts = [0]

        def transfer(a, b, amount):
            attempts[0] += 1
            assert shmstm.in_transaction()
            accts[a].value = accts[a].value - amount
            accts[b].value = accts[b].value + amount

        start()
        for _ in range(n_txns):
            a, b = rnd.sample(range(N_ACCOUNTS), 2)
            shmstm.atomically(transfer, a, b, rnd.randint(1, 100))
        return {"txns": n_txns, "attempts": attempts[0]}
    finally:
        rt.close()


def _threaded_transfer_worker(start, name, seed, n_txns, n_threads):
    """Like _transfer_worker, from ``n_threads`` threads of one process (each thread
    has its own transaction context; the GIL interleaves them mid-transaction)."""
    # Switch threads every ~10 us instead of 5 ms, so they really interleave inside
    # transactions (this is a child process: the setting dies with it).
    sys.setswitchinterval(1e-5)
    rt = open_rt(name)
    try:
        accts = _accounts(rt)
        errors = []
        barrier = threading.Barrier(n_threads + 1)

        def transfer(a, b, amount):
            accts[a].value = accts[a].value - amount
            accts[b].value = accts[b].value + amount

        def run(tseed):
            try:
                rnd = random.Random(tseed)
                barrier.wait(60)
                for _ in range(n_txns):
                    a, b = rnd.sample(range(N_ACCOUNTS), 2)
                    shmstm.atomically(transfer, a, b, rnd.randint(1, 100))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(seed * 100 + i,))
                   for i in range(n_threads)]
        for t in threads:
            t.start()
        start()
        barrier.wait(60)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "transfer thread hung"
        assert not errors, errors
        return {"txns": n_txns * n_threads}
    finally:
        rt.close()


def _auditor(start, name, total, stop, bad_attempts, min_audits, forbid_negative):
    """Read-only audits: every attempt and every committed audit must sum to total
    (and see no negative balance if ``forbid_negative``)."""
    rt = open_rt(name)
    try:
        accts = _accounts(rt)
        attempts = [0]

        def audit():
            attempts[0] += 1
            balances = [t.value for t in accts]
            s = sum(balances)
            if s != total or (forbid_negative and min(balances) < 0):
                # Recorded outside the STM, so a doomed attempt's view counts too.
                with bad_attempts.get_lock():
                    bad_attempts.value += 1
            return s, min(balances)

        start()
        committed_bad = []
        audits = 0
        while not stop.is_set() or audits < min_audits:
            s, low = shmstm.atomically(audit)
            audits += 1
            if s != total or (forbid_negative and low < 0):
                committed_bad.append((s, low))
        return {"audits": audits, "attempts": attempts[0], "committed_bad": committed_bad[:20],
                "n_committed_bad": len(committed_bad)}
    finally:
        rt.close()


def _final_total(rt):
    accts = _accounts(rt)
    snapshot = shmstm.atomically(lambda: [t.value for t in accts])
    outside = [t.value for t in accts]  # quiescent now: per-TVar snapshots agree
    assert snapshot == outside
    return sum(snapshot), snapshot


def _run_bank(rt, segname, ctx, workers, background=(), forbid_negative=False,
              min_audits=3):
    """Run ``workers`` (target, args) alongside one auditor and the ``background``
    (target, args) workers, which get a ``stop`` event appended to their args and are
    stopped, with the auditor, once every worker is done.  Returns the results."""
    total = 1000 * N_ACCOUNTS
    accts = [rt.tvar("acct:%d" % i, 1000) for i in range(N_ACCOUNTS)]
    assert sum(t.value for t in accts) == total
    mpctx = multiprocessing.get_context(ctx)
    stop = mpctx.Event()
    bad_attempts = mpctx.Value("l", 0)
    with Group(mpctx, timeout=deadline_for(120)) as g:
        widx = [g.add(target, *args) for target, args in workers]
        bidx = [g.add(target, *(tuple(args) + (stop,))) for target, args in background]
        aidx = g.add(_auditor, segname, total, stop, bad_attempts, min_audits,
                     forbid_negative)
        g.start()
        wres = g.wait(widx)
        stop.set()
        (ares,) = g.wait([aidx])
        g.wait(bidx)
    final, balances = _final_total(rt)
    return total, final, balances, wres, ares, bad_attempts.value


@pytest.mark.parametrize("ctx", ["spawn", "fork"])
def test_bank_total_conserved(runtime, segname, ctx):
    """Lost-update / bank invariant: P=3 processes make random transfers among 50
    accounts; every audit (each attempt and each committed read-only transaction)
    sees the conserved total, and so does the final state."""
    n = scaled(20000)
    workers = [(_transfer_worker, (segname, 1000 + i, n)) for i in range(3)]
    total, final, balances, wres, ares, bad = _run_bank(runtime, segname, ctx, workers)
    assert final == total, "total not conserved: %d != %d" % (final, total)
    assert ares["n_committed_bad"] == 0, "committed audits saw wrong totals: %r" % ares
    assert bad == 0, "%d audit attempts saw an inconsistent snapshot (opacity)" % bad
    assert ares["audits"] >= 3
    assert sum(r["txns"] for r in wres) == 3 * n
    print("ctx=%s transfers=%d attempts=%d audits=%d audit-attempts=%d" % (
        ctx, 3 * n, sum(r["attempts"] for r in wres), ares["audits"], ares["attempts"]))


def test_bank_threads_in_processes(runtime, segname):
    """Bank invariant with threads: 2 processes x 3 threads transfer concurrently
    (threads of one process conflict with each other as well as across processes);
    audits and the final state see the conserved total."""
    n = scaled(3000)
    workers = [(_threaded_transfer_worker, (segname, 5000 + i, n, 3)) for i in range(2)]
    total, final, balances, wres, ares, bad = _run_bank(runtime, segname, "spawn", workers)
    assert final == total, "total not conserved: %d != %d" % (final, total)
    assert ares["n_committed_bad"] == 0, "committed audits saw wrong totals: %r" % ares
    assert bad == 0, "%d audit attempts saw an inconsistent snapshot (opacity)" % bad
    assert sum(r["txns"] for r in wres) == 2 * 3 * n


# -- variant: check(balance >= amount), never negative ----------------------------

def _checked_worker(start, name, seed, n_txns, negatives, timeout, max_timeouts):
    """Transfers that retry until the source can pay (bounded by a RetryTimeout).
    Gives up after ``max_timeouts`` timeouts (the test then fails on the count)."""
    rt = open_rt(name)
    try:
        accts = _accounts(rt)
        rnd = random.Random(seed)

        attempts = [0]

        @shmstm.atomic(timeout=timeout)
        def transfer(a, b, amount):
            attempts[0] += 1
            src = accts[a].value
            dst = accts[b].value
            if src < 0 or dst < 0:
                with negatives.get_lock():
                    negatives.value += 1
            shmstm.check(src >= amount)
            accts[a].value = src - amount
            accts[b].value = dst + amount

        start()
        timeouts = done = 0
        for _ in range(n_txns):
            a, b = rnd.sample(range(N_ACCOUNTS), 2)
            try:
                transfer(a, b, rnd.randint(1, 400))
                done += 1
            except shmstm.RetryTimeout as e:
                assert isinstance(e, TimeoutError)
                timeouts += 1
                if timeouts > max_timeouts:
                    break
        return {"done": done, "timeouts": timeouts, "attempts": attempts[0]}
    finally:
        rt.close()


def _mover_worker(start, name, seed, min_txns, negatives, stop):
    """Never blocks: moves min(amount, balance), so blocked transfers get unblocked.
    Runs until the checked transfers are done (``stop``), at least ``min_txns``."""
    rt = open_rt(name)
    try:
        accts = _accounts(rt)
        rnd = random.Random(seed)

        def move(a, b, amount):
            src = accts[a].value
            dst = accts[b].value
            if src < 0 or dst < 0:
                with negatives.get_lock():
                    negatives.value += 1
            amount = min(amount, src)
            accts[a].value = src - amount
            accts[b].value = dst + amount

        start()
        done = 0
        while done < min_txns or not stop.is_set():
            a, b = rnd.sample(range(N_ACCOUNTS), 2)
            shmstm.atomically(move, a, b, rnd.randint(1, 400))
            done += 1
        return {"done": done}
    finally:
        rt.close()


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_bank_check_never_negative(runtime, segname, ctx):
    """Bank with blocking transfers: shmstm.check(balance >= amount) retries until the
    source can pay (bounded by @atomic(timeout=...); timeouts are counted, not errors);
    no transaction ever sees a negative balance, audits and the final state see the
    conserved total and no negative balance."""
    n = scaled(2500)
    max_timeouts = max(5, n // 250)
    negatives = multiprocessing.get_context(ctx).Value("l", 0)
    workers = [(_checked_worker, (segname, 2000 + i, n, negatives, 1.0, max_timeouts))
               for i in range(2)]
    mover = [(_mover_worker, (segname, 3000, n, negatives))]
    total, final, balances, wres, ares, bad = _run_bank(runtime, segname, ctx, workers,
                                                        background=mover,
                                                        forbid_negative=True)
    assert final == total, "total not conserved: %d != %d" % (final, total)
    assert min(balances) >= 0, "negative final balance: %r" % balances
    assert negatives.value == 0, "%d transactions saw a negative balance" % negatives.value
    assert ares["n_committed_bad"] == 0, "committed audits saw wrong totals: %r" % ares
    assert bad == 0, "%d audit attempts saw an inconsistent/negative snapshot" % bad
    checked = wres
    timeouts = sum(r["timeouts"] for r in checked)
    # The mover never blocks, so a blocked transfer is woken by a deposit well within
    # its 1 s budget; many timeouts mean wake-ups are being lost.
    assert all(r["timeouts"] <= max_timeouts for r in checked), (
        "too many RetryTimeouts (lost wake-ups?): %r" % (checked,))
    assert sum(r["done"] + r["timeouts"] for r in checked) == 2 * n
    print("ctx=%s checked-transfers done=%d timeouts=%d attempts=%d audits=%d" % (
        ctx, sum(r["done"] for r in checked), timeouts, sum(r["attempts"] for r in checked),
        ares["audits"]))
