"""The hot path's special cases (shmstm_peek, shmstm_tx_readv,
shmstm_tx_commit_ints and the write buffer): each must answer exactly as the
general path would."""
import threading

import pytest

import shmstm
from shmstm import atomically
from shmstm.stm import tvar as _tvar, tx as _tx

from test_api import VALUES


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__ + str(len(repr(v))))
def test_buffered_write_reads_back_before_commit(runtime, value):
    """Property: inside a transaction, a TVar reads back what the transaction
    wrote (an int kept as itself, anything else encoded), of the same type."""
    tv = runtime.new_tvar("start")

    def body():
        tv.value = value
        return tv.value

    got = atomically(body)
    assert type(got) is type(value) and got == value
    assert tv.value == value


def test_overwrites_between_int_and_other_values(runtime):
    """Property: the last write in a transaction wins, whichever of the two
    buffer representations (int, encoded) the earlier writes used."""
    a, b = runtime.new_tvar(0), runtime.new_tvar(0)

    def body():
        a.value = "text"
        a.value = 7               # int after encoded
        b.value = 7
        b.value = [1, 2]          # encoded after int
        return a.value, b.value

    assert atomically(body) == (7, [1, 2])
    assert (a.value, b.value) == (7, [1, 2])


def test_mixed_write_set_commits_all_or_nothing(runtime):
    """Property: a write set of ints, floats, None, bools, bytes and pickles
    commits as one transaction, and an exception discards all of it."""
    tvs = [runtime.new_tvar(0) for _ in range(6)]
    new = [5, 2.5, None, True, b"xy", {"k": 1}]

    def write():
        for tv, v in zip(tvs, new):
            tv.value = v

    def write_then_fail():
        for tv in tvs:
            tv.value = "discarded"
        raise KeyError("boom")

    atomically(write)
    assert [tv.value for tv in tvs] == new
    with pytest.raises(KeyError):
        atomically(write_then_fail)
    assert [tv.value for tv in tvs] == new


def test_many_int_writes_in_one_commit(runtime):
    """Property: a write set far larger than the commit record's inline
    entries commits completely (the record spills to the heap)."""
    tvs = [runtime.new_tvar(i) for i in range(500)]

    def bump():
        for tv in tvs:
            tv.value += 1000

    atomically(bump)
    assert [tv.value for tv in tvs] == [i + 1000 for i in range(500)]


@pytest.mark.parametrize("gen", [2, 0x7FFFFFFF, 0x80000001, 0xFFFFFFFF])
def test_forged_generations_are_stale_on_every_path(runtime, gen):
    """Property: a handle whose generation differs from the TVar's (including
    those whose 64-bit handle is negative) is refused by the snapshot read,
    the transactional read and the commit, never answered."""
    tv = runtime.new_tvar(41)
    forged = _tvar.TVar(runtime, tv._idx, gen, None)
    with pytest.raises(shmstm.StaleTVarError):
        forged.value
    with pytest.raises(shmstm.StaleTVarError):
        atomically(lambda: forged.value)

    def write():
        forged.value = 1

    with pytest.raises(shmstm.StaleTVarError):
        atomically(write)
    assert tv.value == 41


def test_handle_packing():
    for idx, gen in [(0, 1), (5, 0x7FFFFFFF), (65535, 0x80000000), (0xFFFFFFFF, 0xFFFFFFFF)]:
        h = _tx._handle(idx, gen)
        assert -(1 << 63) <= h < (1 << 63)
        assert (h & 0xFFFFFFFF, (h >> 32) & 0xFFFFFFFF) == (idx, gen)


def test_read_outside_while_another_thread_is_in_a_transaction(runtime):
    """Property: a snapshot read in one thread never sees another thread's
    uncommitted writes (the reader takes the general path while any
    transaction of the process is running)."""
    tv = runtime.new_tvar(1)
    written = threading.Event()
    release = threading.Event()

    def writer():
        def body():
            tv.value = 2
            written.set()
            release.wait(10)
        atomically(body)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert written.wait(10)
        assert _tx._active                  # the writer's transaction is running
        assert tv.value == 1                 # not the buffered 2
    finally:
        release.set()
        t.join(10)
    assert tv.value == 2


def test_signal_during_a_commit_wait_reruns_the_commit(runtime):
    """Property: a signal whose Python handler returns, arriving while a
    commit waits in the core (here for the irrevocable token another thread
    holds), re-runs the transaction after the handler: the commit happens
    once and raises nothing (it used to raise 'error -14' on a runtime
    without durability)."""
    import signal
    from shmstm._core import lib
    tv = runtime.tvar("x", 0)
    got, handled = threading.Event(), threading.Event()

    def holder():
        ctx = runtime._ctx()
        assert lib.shmstm_tx_irrevocable(ctx.ptr, -1) == 0    # take the token
        got.set()
        handled.wait(30)                                       # until the signal was handled
        lib.shmstm_tx_abort(ctx.ptr, 255)                      # release it

    old = signal.signal(signal.SIGALRM, lambda *a: handled.set())
    t = threading.Thread(target=holder)
    t.start()
    try:
        got.wait(30)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        tv.modify(lambda v: v + 1)          # waits for the token inside the commit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        handled.set()
        t.join(30)
    assert handled.is_set() and tv.value == 1


def test_threads_transaction_objects_die_with_their_threads(runtime):
    """Property: each thread's transaction object lives in its thread state
    (shmstm._fast.tx) and is freed when the thread ends: 50 threads that each
    ran a transaction leave no _Tx behind, and a thread never sees another's."""
    import gc
    tv = runtime.new_tvar(0)

    def count():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is _tx._Tx)

    atomically(lambda: tv.value)            # this thread's own, kept
    before = count()
    seen = []

    def body():
        assert _tx._fast.tx() is None       # a new thread starts without one
        tv.modify(lambda v: v + 1)
        seen.append(id(_tx._fast.tx()))
    for _ in range(50):
        t = threading.Thread(target=body)
        t.start()
        t.join()
    assert tv.value == 50 and len(seen) == 50
    assert count() == before
