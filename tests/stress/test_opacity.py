"""Opacity: every attempt of a transaction, even one that will abort, sees a consistent
snapshot.

Writers keep y == x + 1 (both set in one transaction, to new values that alternate
between inline int64 and big, pickled ints) and keep a group of TVars all equal.
Readers read x then y, y then x, and the group forwards and backwards, and record any
violation *from inside the transaction body* into a multiprocessing.Value (outside the
STM, so a doomed attempt's view is counted even though its transaction never commits).
Without per-read validation against the read version such views do occur (ScalaSTM
docs, cats-stm #393, ZIO #6324).
"""

import multiprocessing
import random

import pytest

import shmstm
from _helpers import Group, deadline_for, scaled

pytestmark = pytest.mark.stress

GROUP = 8


def _writer(start, x, y, zs, stop, seed, blind, min_txns):
    rnd = random.Random(seed)

    def blind_write(v):
        x.value = v
        y.value = v + 1

    def rmw():
        v = x.value + rnd.choice((1, 3, 1 << 70))  # int64 and big-int values
        x.value = v
        y.value = x.value + 1  # read-your-own-write
        assert y.value == v + 1

    def group(v):
        for z in zs:
            z.value = v

    start()
    n = 0
    while n < min_txns or not stop.is_set():
        if blind:
            v = rnd.randrange(-(1 << 80), 1 << 80) if n % 2 else rnd.randrange(1 << 40)
            shmstm.atomically(blind_write, v)
            shmstm.atomically(group, ("t", n) if n % 3 == 0 else n)
        else:
            shmstm.atomically(rmw)
            shmstm.atomically(group, "s%d" % n)
        n += 1
    return {"txns": n}


def _reader(start, x, y, zs, scratch, n_txns, violations, attempts):
    def xy():
        attempts[0] += 1
        a = x.value
        b = y.value
        if b != a + 1:
            with violations.get_lock():
                violations[0] += 1

    def yx():
        attempts[1] += 1
        b = y.value
        a = x.value
        if b != a + 1:
            with violations.get_lock():
                violations[1] += 1

    def grp(order, write):
        attempts[2] += 1
        vals = [z.value for z in order]
        if any(v != vals[0] for v in vals):
            with violations.get_lock():
                violations[2] += 1
        if write:  # an update transaction: its commit validates the reads as well
            scratch.value = vals[0]

    start()
    rev = list(reversed(zs))
    for i in range(n_txns):
        shmstm.atomically(xy)
        shmstm.atomically(yx)
        shmstm.atomically(grp, zs if i % 2 else rev, i % 4 == 0)
    return {"txns": 3 * n_txns}


@pytest.mark.parametrize("ctx", ["spawn", "fork"])
def test_opacity_no_inconsistent_reads(runtime, ctx):
    """Opacity: while writers keep y == x + 1 and a group of TVars equal, no reader
    attempt (committed or later aborted; read-only or update) ever observes a state
    violating those invariants."""
    x = runtime.new_tvar(0)
    y = runtime.new_tvar(1)
    zs = [runtime.new_tvar(0) for _ in range(GROUP)]
    scratch = [runtime.new_tvar(None) for _ in range(2)]
    mp = multiprocessing.get_context(ctx)
    violations = mp.Array("l", 3)
    attempts = mp.Array("l", 3, lock=False)
    attempts2 = mp.Array("l", 3, lock=False)
    stop = mp.Event()
    n = scaled(6000)
    with Group(mp, timeout=deadline_for(120)) as g:
        w = [g.add(_writer, x, y, zs, stop, 1, True, 50),
             g.add(_writer, x, y, zs, stop, 2, False, 50)]
        r = [g.add(_reader, x, y, zs, scratch[0], n, violations, attempts),
             g.add(_reader, x, y, zs, scratch[1], n, violations, attempts2)]
        g.start()
        g.wait(r)
        stop.set()
        wres = g.wait(w)
    fx, fy, fz = shmstm.atomically(lambda: (x.value, y.value, [z.value for z in zs]))
    assert fy == fx + 1
    assert all(v == fz[0] for v in fz), fz
    v = list(violations)
    assert v == [0, 0, 0], ("inconsistent snapshots seen inside transactions "
                            "(x-then-y, y-then-x, group): %r" % v)
    print("ctx=%s writer txns=%r reader attempts=%r/%r (for %d txns each)" % (
        ctx, wres, list(attempts), list(attempts2), n))
