"""Opacity: every attempt of a transaction, even one that will abort, sees a consistent
snapshot.

Writers keep y == x + 1 (both set in one transaction, to new values that alternate
between inline int64 and big, pickled ints), keep a group of TVars all equal, and keep
two TVars holding the same bytes blob (uniform bytes, sizes varying so heap blocks of
many size classes are freed and reused under the readers).  Readers read x then y, y
then x, the group forwards and backwards, and the blobs, and record any violation
*from inside the transaction body* into a multiprocessing.Array (outside the STM, so a
doomed attempt's view is counted even though its transaction never commits); a torn
read of a reused heap block shows up as a non-uniform or mismatched blob.
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


def _blob(n):
    return bytes([n % 251]) * (16 + (n * 7919) % 20000)


def _writer(start, x, y, zs, blobs, stop, seed, blind, min_txns):
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

    def blob(v):
        for b in blobs:
            b.value = v

    start()
    n = 0
    while n < min_txns or not stop.is_set():
        if blind:
            v = rnd.randrange(-(1 << 80), 1 << 80) if n % 2 else rnd.randrange(1 << 40)
            shmstm.atomically(blind_write, v)
            shmstm.atomically(group, ("t", n) if n % 3 == 0 else n)
            shmstm.atomically(blob, _blob(2 * n + 1))
        else:
            shmstm.atomically(rmw)
            shmstm.atomically(group, "s%d" % n)
            shmstm.atomically(blob, _blob(2 * n))
        n += 1
    return {"txns": n}


def _reader(start, x, y, zs, blobs, scratch, n_txns, violations, attempts):
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

    def blob(order):
        attempts[3] += 1
        vals = [b.value for b in order]
        v = vals[0]
        if (not isinstance(v, bytes) or any(w != v for w in vals)
                or v != v[:1] * len(v)):
            with violations.get_lock():
                violations[3] += 1

    start()
    rev = list(reversed(zs))
    for i in range(n_txns):
        shmstm.atomically(xy)
        shmstm.atomically(yx)
        shmstm.atomically(grp, zs if i % 2 else rev, i % 4 == 0)
        shmstm.atomically(blob, blobs if i % 2 else blobs[::-1])
        v = blobs[i % 2].value  # a snapshot read outside any transaction: never torn
        if v != v[:1] * len(v):
            with violations.get_lock():
                violations[3] += 1
    return {"txns": 4 * n_txns}


@pytest.mark.parametrize("ctx", ["spawn", "fork"])
def test_opacity_no_inconsistent_reads(runtime, ctx):
    """Opacity: while writers keep y == x + 1, a group of TVars equal and two blobs
    equal and uniform, no reader attempt (committed or later aborted; read-only or
    update) ever observes a state violating those invariants, torn heap reads
    included."""
    x = runtime.new_tvar(0)
    y = runtime.new_tvar(1)
    zs = [runtime.new_tvar(0) for _ in range(GROUP)]
    blobs = [runtime.new_tvar(_blob(0)) for _ in range(2)]
    scratch = [runtime.new_tvar(None) for _ in range(2)]
    mp = multiprocessing.get_context(ctx)
    violations = mp.Array("l", 4)
    attempts = mp.Array("l", 4, lock=False)
    attempts2 = mp.Array("l", 4, lock=False)
    stop = mp.Event()
    n = scaled(6000)
    with Group(mp, timeout=deadline_for(120)) as g:
        w = [g.add(_writer, x, y, zs, blobs, stop, 1, True, 50),
             g.add(_writer, x, y, zs, blobs, stop, 2, False, 50)]
        r = [g.add(_reader, x, y, zs, blobs, scratch[0], n, violations, attempts),
             g.add(_reader, x, y, zs, blobs, scratch[1], n, violations, attempts2)]
        g.start()
        g.wait(r)
        stop.set()
        wres = g.wait(w)
    fx, fy, fz, fb = shmstm.atomically(
        lambda: (x.value, y.value, [z.value for z in zs], [b.value for b in blobs]))
    assert fy == fx + 1
    assert all(v == fz[0] for v in fz), fz
    assert fb[0] == fb[1] and fb[0] == fb[0][:1] * len(fb[0])
    v = list(violations)
    assert v == [0, 0, 0, 0], ("inconsistent snapshots seen inside transactions "
                               "(x-then-y, y-then-x, group, blobs): %r" % v)
    print("ctx=%s writer txns=%r reader attempts=%r/%r (for %d txns each)" % (
        ctx, wres, list(attempts), list(attempts2), n))


# -- free + slot reuse under readers ----------------------------------------------------

LIVE = 4


def _churner(start, registry, stop, min_txns):
    """Keep ``registry`` a tuple of LIVE live anonymous TVars: each transaction creates
    one, appends it and frees the oldest, atomically (so every committed state only
    lists live TVars, while freed slots are reused by later creations)."""
    rt = registry.runtime

    def turn(k):
        live = registry.value
        new = rt.new_tvar(("payload", k, "x" * (k % 300)))
        if len(live) >= LIVE:
            live[0].free()
            live = live[1:]
        registry.value = live + (new,)

    start()
    k = 0
    while k < min_txns or not stop.is_set():
        shmstm.atomically(turn, k)
        k += 1
    return {"txns": k}


def _follower(start, registry, n_txns, violations):
    """Read every TVar the registry lists, in the same transaction.  In any snapshot
    they are all live, so StaleTVarError (or a foreign value) means the transaction saw
    the free/reuse of a later commit: no opacity."""
    def look():
        vals = [h.value for h in registry.value]
        bad = [v for v in vals if not (isinstance(v, tuple) and v[0] == "payload")]
        if bad:
            with violations.get_lock():
                violations[1] += 1
        return len(vals)

    start()
    stale = 0
    seen = 0
    for _ in range(n_txns):
        try:
            seen += shmstm.atomically(look)
        except shmstm.StaleTVarError:
            stale += 1
    with violations.get_lock():
        violations[0] += stale
    return {"read": seen}


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_opacity_free_and_reuse(runtime, ctx):
    """Opacity across free(): a transaction that reads a registry of live TVars and
    then each listed TVar never gets StaleTVarError nor another TVar's value, while a
    concurrent process keeps freeing the oldest entry and creating new TVars that reuse
    the freed slots (the free commits atomically with its removal from the registry)."""
    registry = runtime.tvar("registry", ())
    mp = multiprocessing.get_context(ctx)
    violations = mp.Array("l", 2)
    stop = mp.Event()
    n = scaled(3000)
    with Group(mp, timeout=deadline_for(120)) as g:
        c = g.add(_churner, registry, stop, 50)
        f = [g.add(_follower, registry, n, violations) for _ in range(2)]
        g.start()
        fres = g.wait(f)
        stop.set()
        (cres,) = g.wait([c])
    v = list(violations)
    assert v == [0, 0], ("transactions saw freed/reused TVars listed as live "
                         "(StaleTVarError, foreign value): %r" % v)
    final = registry.value
    assert len(final) == LIVE
    assert all(h.value[0] == "payload" for h in final)
    print("ctx=%s churn txns=%d followers read %r" % (ctx, cres["txns"], fres))
    shmstm.atomically(lambda: [h.free() for h in registry.value])
