"""Fast single-process tests of the public API's semantics (safe under -n auto)."""
import math
import os
import pickle
import threading

import pytest

import shmstm
from shmstm import atomically


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


VALUES = [
    0, 1, -1, 2**63 - 1, -2**63, 2**63, -2**64 - 5, 10**40, True, False, None,
    0.0, -0.0, 1.5, float("inf"), b"", b"\x00\xff" * 100, "", "h\xe9llo \u2603",
    "\ud800 lone surrogate", [1, [2, 3]], {"a": (1, 2)}, Point(1, 2), frozenset({1}),
    "x" * 100_000,
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__ + str(len(repr(v))))
def test_values_round_trip_with_their_types(runtime, value):
    """Property: a TVar returns an equal value of the same type, in and out of
    transactions, for inline, str/bytes and pickled values."""
    tv = runtime.new_tvar(value)
    for got in (tv.value, atomically(lambda: tv.value)):
        assert type(got) is type(value)
        assert got == value or (isinstance(value, float) and math.isnan(value))
    tv.value = value
    assert tv.value == value


def test_nan_round_trips(runtime):
    assert math.isnan(runtime.new_tvar(float("nan")).value)


def test_values_are_copied_in_and_out(runtime):
    """Property: mutating an object read from (or written to) a TVar changes
    nothing shared."""
    tv = runtime.new_tvar([1, 2])
    lst = tv.value
    lst.append(3)
    assert tv.value == [1, 2]

    def body():
        mine = [9]
        tv.value = mine
        mine.append(10)          # after the write: not part of it
        return tv.value
    assert atomically(body) == [9]
    assert tv.value == [9]


def test_named_tvar_get_or_create(runtime):
    a = runtime.tvar("acct", 5)
    b = runtime.tvar("acct", 99)   # exists: default ignored
    assert a == b and b.value == 5 and a.name == "acct"
    assert runtime.tvar("\u2603 snow", [1]).value == [1]


def test_exception_discards_writes_and_propagates(runtime):
    tv = runtime.new_tvar(1)

    def body():
        tv.value = 2
        raise KeyError("boom")
    with pytest.raises(KeyError):
        atomically(body)
    assert tv.value == 1


def test_user_except_exception_cannot_swallow_internal_control_flow(runtime):
    """retry() inside ``try/except Exception`` still blocks/re-runs."""
    tv = runtime.new_tvar(0)

    @shmstm.atomic(timeout=0.05)
    def body():
        try:
            shmstm.check(tv.value > 0)
        except Exception:
            return "swallowed"
    with pytest.raises(shmstm.RetryTimeout):
        body()


def test_nested_atomically_joins_outer(runtime):
    a, b = runtime.new_tvar(0), runtime.new_tvar(0)

    def inner():
        b.value = a.value + 1

    def outer():
        a.value = 10
        atomically(inner)
        assert b.value == 11
        raise ValueError
    with pytest.raises(ValueError):
        atomically(outer)
    assert (a.value, b.value) == (0, 0)
    atomically(lambda: (setattr(a, "value", 1), atomically(inner)))
    assert (a.value, b.value) == (1, 2)


def test_or_else_rolls_back_first_branch(runtime):
    a, b = runtime.new_tvar(0), runtime.new_tvar(0)

    def first():
        a.value = 100
        shmstm.retry()

    def second():
        b.value = 1
        return "second"

    assert atomically(lambda: shmstm.or_else(first, second)) == "second"
    assert (a.value, b.value) == (0, 1)


def test_or_else_nested_and_kept_writes(runtime):
    a = runtime.new_tvar(0)

    def inner_fail():
        a.value = 3
        shmstm.retry()

    def outer_first():
        a.value = 1
        shmstm.or_else(inner_fail, lambda: None)   # inner rolled back to 1
        assert a.value == 1
        a.value = 2
        shmstm.retry()                             # whole first branch rolled back

    def outer_second():
        return a.value

    assert atomically(lambda: shmstm.or_else(outer_first, outer_second)) == 0


def test_or_else_all_branches_retry_blocks(runtime):
    a = runtime.new_tvar(False)
    f = shmstm.atomic(timeout=0.05)(
        lambda: shmstm.or_else(lambda: shmstm.check(a.value), lambda: shmstm.check(a.value)))
    with pytest.raises(shmstm.RetryTimeout):
        f()


def test_tvars_created_in_aborted_attempt_are_freed(runtime):
    created = []

    def body():
        tv = runtime.new_tvar("temp")
        created.append(tv)
        raise RuntimeError
    with pytest.raises(RuntimeError):
        atomically(body)
    with pytest.raises(shmstm.StaleTVarError):
        created[0].value


def test_free_is_effective_at_commit(runtime):
    tv = runtime.new_tvar(1)

    def body():
        tv.free()
        with pytest.raises(shmstm.StaleTVarError):
            tv.value
        raise ValueError         # abort: the free never happened
    with pytest.raises(ValueError):
        atomically(body)
    assert tv.value == 1
    tv.free()
    with pytest.raises(shmstm.StaleTVarError):
        tv.value
    with pytest.raises(shmstm.StaleTVarError):
        tv.value = 2
    # the slot is reused with a new generation; the old handle stays stale
    again = runtime.new_tvar(5)
    assert again._idx == tv._idx and again._gen != tv._gen
    with pytest.raises(shmstm.StaleTVarError):
        tv.value


def test_named_tvars_cannot_be_freed(runtime):
    with pytest.raises(shmstm.Error):
        runtime.tvar("keep", 1).free()


def test_modify_returns_new_value(runtime):
    tv = runtime.new_tvar(2)
    assert tv.modify(lambda v: v * 21) == 42 == tv.value


def test_retry_outside_transaction(runtime):
    with pytest.raises(shmstm.NotInTransactionError):
        shmstm.retry()
    with pytest.raises(shmstm.NotInTransactionError):
        shmstm.or_else(lambda: 1)


def test_retry_with_nothing_read_raises(runtime):
    with pytest.raises(shmstm.BlockedForeverError):
        atomically(shmstm.retry)


def test_pickle_round_trip_in_process(runtime):
    tv = runtime.tvar("p", 7)
    tv2 = pickle.loads(pickle.dumps(tv))
    assert tv2 == tv and tv2.value == 7
    rt2 = pickle.loads(pickle.dumps(runtime))
    assert rt2 is runtime


def test_open_twice_shares_attachment(runtime, segname):
    rt2 = shmstm.open(segname)
    assert rt2 is runtime
    rt2.close()                       # one reference left: still usable
    assert runtime.tvar("x", 1).value == 1


def test_threads_have_own_transactions(runtime):
    """Property (conservation): threads of one process transfer concurrently
    with their own contexts; the total is conserved."""
    accts = [runtime.new_tvar(100) for _ in range(8)]

    def worker(seed):
        import random
        r = random.Random(seed)
        for _ in range(2000):
            a, b = r.sample(accts, 2)

            def tr():
                a.value -= 1
                b.value += 1
            atomically(tr)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sum(a.value for a in accts) == 800
    assert len([p for p in runtime.stats()["processes"] if p["pid"] == os.getpid()]) >= 1


def test_thread_slot_released_at_thread_exit(segname):
    rt = shmstm.open(segname, max_tvars=64, heap_size=1 << 16, max_procs=2)
    try:
        tv = rt.new_tvar(0)
        for _ in range(10):           # more threads than slots, one after another
            t = threading.Thread(target=lambda: tv.modify(lambda v: v + 1))
            t.start()
            t.join()
        assert tv.value == 10
    finally:
        rt.close()


class _LeaveTx(Exception):
    pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_inside_a_transaction_the_child_commits_nothing_of_it(runtime):
    """Regression: a child forked inside a transaction read committed values
    instead of the transaction's writes, and committed the rest of the body's
    writes one by one.  Now the transaction stays the parent's: in the child
    every TVar access raises ForkedContextError before any write lands; once
    out of it, the child's own transactions work, on a slot of its own."""
    tv = runtime.new_tvar(0)
    parent_slot = runtime._ctx().ptr.slot
    r, w = os.pipe()

    def body():
        tv.value = 1
        pid = os.fork()
        if pid == 0:
            seen = [shmstm.in_transaction()]
            for op in (lambda: tv.value, lambda: setattr(tv, "value", 5), runtime.new_tvar):
                try:
                    op()
                    seen.append(False)
                except shmstm.ForkedContextError:
                    seen.append(True)
            raise _LeaveTx(seen)
        return pid
    try:
        pid = atomically(body)
    except _LeaveTx as e:               # the child only
        try:
            ok = (all(e.args[0]) and not shmstm.in_transaction()
                  and tv.modify(lambda v: v + 10) in (10, 11)
                  and runtime._ctx().ptr.slot != parent_slot)
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    # The parent's blind write of 1 and the child's +10 serialise either way.
    assert tv.value in (1, 11)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_inside_a_transaction_its_commit_in_the_child_raises(runtime):
    """The body returns normally in the child: its commit raises
    ForkedContextError and writes nothing (the parent's attempt is abandoned,
    so any value here would be the child's)."""
    tv = runtime.new_tvar(0)
    r, w = os.pipe()

    def body():
        tv.value = 1
        pid = os.fork()
        if pid:
            raise _LeaveTx(pid)         # the parent commits nothing
        return "child"
    me = os.getpid()
    try:
        atomically(body)
    except _LeaveTx as e:
        pid = e.args[0]
    except BaseException as e:
        if os.getpid() == me:
            raise
        os.write(w, b"1" if isinstance(e, shmstm.ForkedContextError) else b"0")
        os._exit(0)
    else:
        if os.getpid() == me:
            pytest.fail("the parent's attempt committed")
        os.write(w, b"0")               # the child's commit returned
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    assert tv.value == 0


def test_a_nested_atomically_that_raises_undoes_its_writes(runtime):
    """Regression: the outer transaction caught the inner one's exception and
    committed the inner writes.  A nested atomically that raises leaves the
    enclosing transaction as it was before the call, TVars it created
    included (GHC's catchSTM, ScalaSTM's nested atomic blocks)."""
    a, b = runtime.new_tvar(0), runtime.new_tvar(0)
    made = []

    def inner():
        a.value = 2
        b.value = 2
        made.append(runtime.new_tvar("x"))
        raise ValueError("inner")

    def outer():
        a.value = 1
        with pytest.raises(ValueError):
            atomically(inner)
        return a.value, b.value

    assert atomically(outer) == (1, 0)
    assert (a.value, b.value) == (1, 0)
    with pytest.raises(shmstm.StaleTVarError):
        made[0].value


def test_a_nested_atomically_that_returns_keeps_its_writes(runtime):
    a = runtime.new_tvar(0)

    def outer():
        atomically(lambda: a.set(5))
        return a.value
    assert atomically(outer) == 5
    assert a.value == 5


def test_lazy_attach_never_recreates_an_unlinked_segment(segname):
    """An unpickled runtime attaches lazily; if the segment was unlinked
    meanwhile it raises SegmentNotFoundError instead of creating a new one."""
    rt = shmstm.open(segname, max_tvars=64, heap_size=1 << 16)
    data = pickle.dumps(rt.new_tvar(1))
    rt.close()
    shmstm.unlink(segname)
    tv = pickle.loads(data)          # lazy: nothing attached yet
    with pytest.raises(shmstm.SegmentNotFoundError):
        tv.value
    assert not os.path.exists("/dev/shm/shmstm." + segname)
    tv.runtime.close()


def test_named_tvar_declared_in_aborted_transaction_keeps_its_default(runtime):
    """Documented semantics (docs/api.md): rt.tvar() is a declaration that takes
    effect at once; the aborted transaction's writes to the TVar are discarded,
    so it holds the default, as if it had been declared outside."""
    def body():
        tv = runtime.tvar("declared-in-abort", 5)
        tv.value = 99
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        atomically(body)
    again = runtime.tvar("declared-in-abort", 1234)
    assert again.value == 5


def test_a_forged_handle_cannot_free_a_named_tvar(runtime):
    """Regression: a named TVar's handle unpickled with name=None could be
    freed; the name then named an unrelated TVar in every process once the
    slot was reused.  The core refuses, whatever the Python object claims."""
    named = runtime.tvar("acct", 5)
    fn, args = named.__reduce__()
    forged = fn(args[0], args[1], args[2], None)        # as a tampered pickle would
    assert forged.name is None
    with pytest.raises(shmstm.Error, match="named TVar cannot be freed"):
        forged.free()
    for _ in range(3):
        runtime.new_tvar(0)                             # would take a freed slot
    assert runtime.tvar("acct").value == 5
    assert named.value == 5 and forged.value == 5


def test_lookup_raises_keyerror_for_a_missing_name_and_names_lists_them(runtime):
    """rt.tvar() creates a TVar for any name, a typo included; rt.lookup()
    finds an existing one or raises KeyError, and creates nothing."""
    runtime.tvar("user:17", 5)
    runtime.tvar("user:2", 6)
    runtime.new_tvar(7)                           # anonymous: not listed
    assert runtime.lookup("user:17").value == 5
    with pytest.raises(KeyError):
        runtime.lookup("user:71")
    assert runtime.names() == ["user:17", "user:2"]
    with pytest.raises(TypeError):
        runtime.lookup(17)


def test_limit_errors_name_the_limit_its_value_and_the_tvar(segname):
    rt = shmstm.open(segname, heap_size=1 << 16, max_tvars=8, max_value_size=1 << 14)
    try:
        with pytest.raises(shmstm.TVarTableFullError,
                           match=r"max_tvars=8 TVars reached.*unlink.*larger max_tvars"):
            for i in range(20):
                rt.new_tvar(i)
    finally:
        rt.close()
        shmstm.unlink(segname)
    rt = shmstm.open(segname, heap_size=1 << 16, max_tvars=64, max_value_size=1 << 14)
    try:
        tvs = [rt.tvar("big%d" % j, b"") for j in range(8)]
        with pytest.raises(shmstm.HeapFullError,
                           match=r"committing TVar 'big\d': heap_size=65536 bytes"):
            shmstm.atomically(lambda: [t.set(b"x" * 10000) for t in tvs])
    finally:
        rt.close()
