"""Bad input and resource exhaustion (single process): each error is the documented
exception, raised before anything shared changes, and the runtime keeps working."""

import multiprocessing
import pickle
import queue
import threading

import pytest

import shmstm
from _helpers import unique_name

SMALL = dict(max_tvars=256, heap_size=1 << 20, max_value_size=64 << 10)


def assert_healthy(rt):
    """A normal transaction still works on ``rt``."""
    tv = rt.tvar("health", 0)
    before = tv.value
    assert shmstm.atomically(lambda: setattr(tv, "value", tv.value + 1) or tv.value) \
        == before + 1
    assert tv.value == before + 1
    assert not shmstm.in_transaction()


@pytest.fixture
def extra_segments():
    """Open more runtimes on unique names; all closed and unlinked at teardown."""
    opened = []

    def make(**limits):
        name = unique_name()
        rt = shmstm.open(name, **limits)
        opened.append((name, rt))
        return name, rt

    yield make
    for name, rt in opened:
        try:
            rt.close()
        except Exception:
            pass
        shmstm.unlink(name)


def test_wrong_types(runtime):
    """Wrong argument types raise TypeError: tvar name not a str, atomically of a
    non-callable, modify with a non-callable, open/unlink with a non-str name,
    or_else of non-callables."""
    for bad in (123, None, b"bytes", ("t",)):
        with pytest.raises(TypeError):
            runtime.tvar(bad, 0)
    for bad in (42, None, "not callable"):
        with pytest.raises(TypeError):
            shmstm.atomically(bad)
    tv = runtime.new_tvar(1)
    with pytest.raises(TypeError):
        tv.modify(5)
    assert tv.value == 1
    with pytest.raises(TypeError):
        shmstm.open(123)
    with pytest.raises(TypeError):
        shmstm.unlink(123)
    with pytest.raises(TypeError):
        shmstm.atomically(lambda: shmstm.or_else(1, 2))
    assert_healthy(runtime)


@pytest.mark.parametrize("what", ["open-limit", "atomic-timeout"])
def test_wrong_types_options(runtime, what):
    """Wrong types for options raise TypeError too (the contract's rule for wrong
    argument types): a str limit in open(), a str timeout in atomic()."""
    if what == "open-limit":
        name = unique_name()
        try:
            with pytest.raises(TypeError):
                shmstm.open(name, max_tvars="4096")  # a str where an int belongs
        finally:
            shmstm.unlink(name)
    else:
        with pytest.raises(TypeError):
            shmstm.atomic(timeout="2")
    assert_healthy(runtime)


def test_unpicklable_value(runtime):
    """An unpicklable value (lambda, lock) raises shmstm.EncodeError (a TypeError)
    before anything shared changes: the TVar keeps its old value, get-or-create creates
    nothing."""
    tv = runtime.new_tvar("old")
    for bad in (lambda: 1, threading.Lock(), [1, 2, lambda: 3]):
        with pytest.raises(shmstm.EncodeError) as ei:
            tv.value = bad
        assert isinstance(ei.value, TypeError) and isinstance(ei.value, shmstm.Error)
        assert tv.value == "old"
        with pytest.raises(shmstm.EncodeError):
            tv.set(bad)
        with pytest.raises(shmstm.EncodeError):
            tv.modify(lambda v: bad)
        assert tv.value == "old"

        def txn():
            tv.value = "new"
            tv.value = bad

        with pytest.raises(shmstm.EncodeError):
            shmstm.atomically(txn)
        assert tv.value == "old"  # the whole transaction was discarded
        with pytest.raises(shmstm.EncodeError):
            runtime.new_tvar(bad)
        with pytest.raises(shmstm.EncodeError):
            runtime.tvar("never-created", bad)
    # The failed get-or-create created nothing: the default is used now.
    assert runtime.tvar("never-created", 7).value == 7
    assert_healthy(runtime)


def test_user_exception_discards_writes(runtime):
    """An exception raised by fn inside atomically discards the transaction's writes
    and the anonymous TVars it created (GHC #18453), and propagates; nested atomically
    joins the outer transaction."""
    tv = runtime.new_tvar(1)
    created = []

    class Boom(Exception):
        pass

    def txn():
        tv.value = 2
        inner = shmstm.atomically(lambda: shmstm.in_transaction() and tv.value)
        assert inner == 2  # nested atomically joined the outer transaction
        t = runtime.new_tvar("created in an aborted transaction")
        created.append(t)
        assert t.value == "created in an aborted transaction"
        raise Boom

    with pytest.raises(Boom):
        shmstm.atomically(txn)
    assert tv.value == 1
    assert len(created) == 1
    with pytest.raises(shmstm.StaleTVarError):
        created[0].value
    assert not shmstm.in_transaction()
    assert_healthy(runtime)


def test_value_too_large(extra_segments):
    """A value over max_value_size raises shmstm.ValueTooLargeError (a ValueError) and
    the TVar keeps its old value."""
    limit = 64 << 10
    _, rt = extra_segments(max_tvars=256, heap_size=4 << 20, max_value_size=limit)
    tv = rt.new_tvar(b"small")
    for big in (b"x" * (2 * limit), "y" * (2 * limit), list(range(limit))):
        with pytest.raises(shmstm.ValueTooLargeError) as ei:
            tv.value = big
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, shmstm.Error)
        assert tv.value == b"small"
        with pytest.raises(shmstm.ValueTooLargeError):
            shmstm.atomically(lambda: setattr(tv, "value", big))
        assert tv.value == b"small"
        with pytest.raises(shmstm.ValueTooLargeError):
            rt.new_tvar(big)
    tv.value = b"z" * (limit // 2)  # under the limit: fine
    assert tv.value == b"z" * (limit // 2)
    assert_healthy(rt)


def _reclaim(scratch, attempt, tries=200):
    """Run ``attempt`` until it stops raising HeapFullError/TVarTableFullError, running
    small transactions on the existing int TVar ``scratch`` in between (reclaiming freed
    space may be deferred to a later commit)."""
    for _ in range(tries):
        try:
            return attempt()
        except (shmstm.HeapFullError, shmstm.TVarTableFullError):
            scratch.value = scratch.value + 1
    return attempt()


def test_heap_full_then_recovers(extra_segments):
    """Filling a small heap raises shmstm.HeapFullError (the failed write changes
    nothing); existing TVars stay readable; freeing TVars makes room again."""
    chunk = 60 << 10
    _, rt = extra_segments(max_tvars=1024, heap_size=1 << 20, max_value_size=64 << 10)
    scratch = rt.new_tvar(0)
    keep = rt.new_tvar(b"k" * 100)
    big = []
    with pytest.raises(shmstm.HeapFullError) as ei:
        for i in range(1000):  # 1 MiB / 60 KiB: full long before this bound
            big.append(rt.new_tvar(bytes([i % 251]) * chunk))
    assert isinstance(ei.value, shmstm.Error)
    assert 1 <= len(big) < 1000
    with pytest.raises(shmstm.HeapFullError):
        keep.value = b"K" * chunk
    assert keep.value == b"k" * 100

    def two_writes():
        scratch.value = 99  # inline: staged fine, but the transaction must not commit
        keep.value = b"K" * chunk

    with pytest.raises(shmstm.HeapFullError):
        shmstm.atomically(two_writes)
    assert (scratch.value, keep.value) == (0, b"k" * 100)
    for i, tv in enumerate(big):
        assert tv.value == bytes([i % 251]) * chunk
    scratch.value = 1  # inline values need no heap
    for tv in big:
        tv.free()
    again = [_reclaim(scratch, lambda: rt.new_tvar(b"n" * chunk))
             for _ in range(len(big) // 2)]
    assert all(t.value == b"n" * chunk for t in again)
    keep.value = b"K" * chunk
    assert keep.value == b"K" * chunk
    assert_healthy(rt)


def test_tvar_table_full_then_recovers(extra_segments):
    """Creating more TVars than max_tvars raises shmstm.TVarTableFullError; existing
    TVars keep working; freeing one makes room again."""
    max_tvars = 64
    _, rt = extra_segments(max_tvars=max_tvars, heap_size=1 << 20, max_value_size=64 << 10)
    made = []
    with pytest.raises(shmstm.TVarTableFullError) as ei:
        for i in range(10 * max_tvars + 10):
            made.append(rt.new_tvar(i))
    assert isinstance(ei.value, shmstm.Error)
    assert 1 <= len(made) <= max_tvars
    with pytest.raises(shmstm.TVarTableFullError):
        rt.tvar("one-too-many", 0)
    assert [t.value for t in made] == list(range(len(made)))
    made[0].value = "still writable"
    assert made[0].value == "still writable"
    for _ in range(3):
        made.pop().free()
    # Wait until the three freed slots can be handed out again (all three in one
    # transaction, so a failed try leaves none of them allocated).
    trio = _reclaim(made[1], lambda: shmstm.atomically(
        lambda: [rt.new_tvar(k) for k in range(3)]))
    for t in trio:
        t.free()
    # A transaction that creates more TVars than fit fails as a whole: the ones it
    # did create are rolled back with it (GHC #18453), so all three slots stay free.
    before = made[1].value
    created = []

    def greedy():
        made[1].value = "greedy was here"
        for k in range(10):
            created.append(rt.new_tvar(k))

    with pytest.raises(shmstm.TVarTableFullError):
        shmstm.atomically(greedy)
    assert made[1].value == before
    assert created, "no TVar was created before the table filled"
    for t in created:
        with pytest.raises(shmstm.StaleTVarError):
            t.value
    extra = _reclaim(made[1], lambda: rt.new_tvar("room again"))
    assert extra.value == "room again"
    tv = _reclaim(made[1], lambda: rt.tvar("health", 0))
    tv.value = tv.value + 1
    assert tv.value == 1


def test_stale_handle_after_free(runtime):
    """After free() commits, every handle to the TVar (including pickled copies and
    after its slot is reused) raises shmstm.StaleTVarError; named TVars can't be
    freed; a free in an aborted transaction does not happen."""
    tv = runtime.new_tvar([1, 2])
    copy = pickle.loads(pickle.dumps(tv))
    assert copy.value == [1, 2]

    class Boom(Exception):
        pass

    def free_then_fail():
        tv.free()
        raise Boom

    with pytest.raises(Boom):
        shmstm.atomically(free_then_fail)
    assert tv.value == [1, 2]  # the free was rolled back with its transaction

    tv.free()
    for h in (tv, copy):
        with pytest.raises(shmstm.StaleTVarError):
            h.value
        with pytest.raises(shmstm.StaleTVarError):
            h.value = 3
        with pytest.raises(shmstm.StaleTVarError):
            h.modify(lambda v: v)
        with pytest.raises(shmstm.StaleTVarError):
            shmstm.atomically(lambda: h.value)
        with pytest.raises(shmstm.StaleTVarError):
            h.free()
    # Reuse slots: the old handle must not alias a new TVar (generation check).
    fresh = [runtime.new_tvar(("fresh", i)) for i in range(32)]
    with pytest.raises(shmstm.StaleTVarError):
        tv.value
    assert [t.value for t in fresh] == [("fresh", i) for i in range(32)]
    named = runtime.tvar("named", 5)
    with pytest.raises((shmstm.Error, TypeError, ValueError)):
        named.free()
    assert named.value == 5
    assert_healthy(runtime)


# -- forged handles (in a child: a crash must fail the test, not kill pytest) --------

def _forgeries(tv, max_tvars):
    """(description, must_refuse, forged handle or the exception unpickling raised).

    ``TVar.__reduce__`` gives ``(fn, (runtime, index, generation, name))``: tamper with
    the generation (never valid for this live slot), with the index (out of range, or a
    slot far beyond any this test allocated), and with the types.
    """
    fn, args = tv.__reduce__()[:2]
    ints = [i for i, a in enumerate(args) if type(a) is int]
    assert len(ints) == 2, "expected (runtime, index, generation, name): %r" % (args,)
    ipos, gpos = ints
    idx, gen = args[ipos], args[gpos]
    cases = []
    for g in (gen + 1, gen + 1000, gen - 1, 0, 2 ** 31, 2 ** 32 - 1, 2 ** 32, -1, 2 ** 64 + 5):
        if g != gen:
            cases.append(("generation %d -> %d" % (gen, g), gpos, g))
    for i in (idx + 1000, max_tvars - 1, max_tvars, max_tvars + 7, 2 ** 31, 2 ** 32 - 1,
              2 ** 32, -1, 2 ** 64 + 5):
        cases.append(("index %d -> %d" % (idx, i), ipos, i))
    cases.append(("index -> str", ipos, "7"))
    cases.append(("generation -> float", gpos, 1.5))
    seen = set()
    for desc, pos, new in cases:
        if (pos, new) in seen:
            continue
        seen.add((pos, new))
        forged = list(args)
        forged[pos] = new
        try:
            h = fn(*forged)
        except Exception as e:  # noqa: BLE001 - refusing at unpickle time is fine
            yield desc, e
        else:
            yield desc, h


def _forged_child(q, tv, max_tvars, other):
    try:
        results = []
        for desc, h in _forgeries(tv, max_tvars):
            if isinstance(h, Exception):
                results.append((desc, "unpickle", type(h).__name__, isinstance(h, shmstm.Error)))
                continue
            for op in ("read", "write", "txn", "free"):
                try:
                    if op == "read":
                        h.value
                    elif op == "write":
                        h.value = "forged"
                    elif op == "txn":
                        shmstm.atomically(lambda: h.value)
                    else:
                        h.free()
                except shmstm.Error as e:
                    results.append((desc, op, type(e).__name__, True))
                except Exception as e:  # noqa: BLE001 - reported to the parent
                    results.append((desc, op, type(e).__name__, False))
                else:
                    results.append((desc, op, "ACCEPTED", False))
        # The real handles still work, and nothing was overwritten.
        results.append(("real", tv.value, other.value))
        q.put(("ok", results))
    except BaseException:
        import traceback
        q.put(("err", traceback.format_exc()))


def test_forged_handle_rejected(runtime):
    """A forged TVar handle (pickled state tampered: wrong generation, out-of-range or
    unallocated index, wrong types) raises StaleTVarError or another shmstm.Error, in
    the unpickling or at first use; never crashes (checked in a child process), never
    reads or writes another TVar."""
    tv = runtime.new_tvar("real")
    other = runtime.new_tvar("other")
    max_tvars = runtime.limits["max_tvars"] if hasattr(runtime, "limits") else 4096
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    p = mp.Process(target=_forged_child, args=(q, tv, max_tvars, other), daemon=True)
    p.start()
    try:
        status, results = q.get(timeout=60)
    except queue.Empty:
        status, results = "no answer (crash or hang)", None
    p.join(10)
    if p.is_alive():
        p.kill()
        p.join(5)
    assert status == "ok", "forged-handle child: %s (exit code %s)\n%s" % (
        status, p.exitcode, results)
    assert p.exitcode == 0, "child crashed: exit code %s" % p.exitcode
    assert results[-1] == ("real", "real", "other"), results[-1]
    not_refused = [r for r in results[:-1] if not r[3]]
    assert not not_refused, "forged handles not refused with a shmstm.Error: %r" % (
        not_refused,)
    assert tv.value == "real" and other.value == "other"
    assert_healthy(runtime)


def test_limit_mismatch(extra_segments):
    """Attaching with explicit limits different from the segment's raises
    shmstm.LimitMismatchError (a ValueError); matching limits attach fine."""
    name, rt = extra_segments(max_tvars=256, heap_size=2 << 20)
    rt.tvar("x", 1)
    for bad in (dict(max_tvars=512, heap_size=2 << 20), dict(max_tvars=256, heap_size=4 << 20)):
        with pytest.raises(shmstm.LimitMismatchError) as ei:
            shmstm.open(name, **bad)
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, shmstm.Error)
    assert rt.tvar("x").value == 1
    assert_healthy(rt)


def test_use_after_close(segname):
    """After Runtime.close(), using the runtime or its TVars raises
    shmstm.RuntimeClosedError (no segfault); reopening by name sees the data."""
    name = segname
    with shmstm.open(name, **SMALL) as rt2:
        tv = rt2.tvar("x", 41)
        anon = rt2.new_tvar("anon")
        tv.value = 42
    # The with block closed rt2.
    for action in (lambda: tv.value, lambda: setattr(tv, "value", 1),
                   lambda: tv.modify(lambda v: v), lambda: anon.value,
                   lambda: rt2.tvar("y", 0), lambda: rt2.new_tvar(0),
                   lambda: shmstm.atomically(lambda: tv.value)):
        with pytest.raises(shmstm.RuntimeClosedError):
            action()
    assert not shmstm.in_transaction()
    with shmstm.open(name, **SMALL) as rt3:
        assert rt3.tvar("x").value == 42
        assert_healthy(rt3)


def test_cross_runtime_transaction(runtime, extra_segments):
    """One transaction touching TVars of two runtimes raises shmstm.CrossRuntimeError
    and changes nothing; each runtime alone still works."""
    _, rt2 = extra_segments(**SMALL)
    a = runtime.new_tvar(1)
    b = rt2.new_tvar(2)

    def read_both():
        return a.value + b.value

    def write_both():
        a.value = 10
        b.value = 20

    for fn in (read_both, write_both):
        with pytest.raises(shmstm.CrossRuntimeError) as ei:
            shmstm.atomically(fn)
        assert isinstance(ei.value, shmstm.Error)
    assert (a.value, b.value) == (1, 2)
    assert_healthy(runtime)
    assert_healthy(rt2)
