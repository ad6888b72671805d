"""TVar and Runtime handles travel into multiprocessing pools (spawn, fork, forkserver).

The receiving process attaches lazily by name.  Lost update is the anomaly checked:
concurrent atomic increments from pool workers must all count.
"""

import multiprocessing

import pytest

import shmstm
from _helpers import Group, deadline_for, open_rt, scaled

pytestmark = pytest.mark.stress

CONTEXTS = ["spawn", "fork", "forkserver"]


def _incr_task(arg):
    """n atomic increments of each counter (TVar handles unpickled in the worker)."""
    counter, named, n = arg

    def bump(tv):
        tv.value = tv.value + 1

    for i in range(n):
        if i % 2:
            counter.modify(lambda v: v + 1)
        else:
            shmstm.atomically(bump, counter)
        shmstm.atomically(bump, named)
    return n


def _pool_map(ctx, fn, args):
    pool = multiprocessing.get_context(ctx).Pool(2)
    try:
        res = pool.map_async(fn, args).get(timeout=deadline_for(60))
        pool.close()
        pool.join()
        return res
    except BaseException:
        pool.terminate()
        pool.join()
        raise


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_pool_counter_exact(runtime, ctx):
    """Lost update through pools: TVars pickled into Pool(2) tasks, each incrementing
    an anonymous and a named counter n times atomically; the final counts are exact."""
    counter = runtime.new_tvar(0)
    named = runtime.tvar("pool-counter", 0)
    n = scaled(2000)
    tasks = 8
    done = _pool_map(ctx, _incr_task, [(counter, named, n)] * tasks)
    assert done == [n] * tasks
    assert counter.value == tasks * n
    assert named.value == tasks * n
    assert runtime.tvar("pool-counter").value == tasks * n


def _runtime_task(arg):
    rt, i = arg
    assert isinstance(rt, shmstm.Runtime)
    shared = rt.tvar("made-by-pool:shared", 0)
    mine = rt.tvar("made-by-pool:%d" % i, ("created", i))
    shmstm.atomically(lambda: setattr(shared, "value", shared.value + 1))
    anon = rt.new_tvar(i * 10)  # handed back to the parent by pickling
    return mine.name, mine.value, anon


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_pool_runtime_pickles(runtime, ctx):
    """A Runtime pickled into pool tasks can get-or-create named TVars (visible to the
    parent afterwards) and create anonymous TVars whose handles pickle back."""
    tasks = 6
    res = _pool_map(ctx, _runtime_task, [(runtime, i) for i in range(tasks)])
    missing = object()
    for i, (name, value, anon) in enumerate(res):
        assert name == "made-by-pool:%d" % i
        assert value == ("created", i)
        tv = runtime.tvar(name, missing)  # get, not create: the task created it
        assert tv.value == ("created", i)
        assert anon.value == i * 10
        anon.free()
        with pytest.raises(shmstm.StaleTVarError):
            anon.value
    assert runtime.tvar("made-by-pool:shared", missing).value == tasks


def _handle_ints(tv):
    """The integers identifying a TVar in its pickled form (index, generation)."""
    return tuple(a for a in tv.__reduce__()[1] if type(a) is int)


def _racer(start, name, me, n_names):
    rt = open_rt(name)
    try:
        start()
        handles = {}
        for k in range(n_names):
            tv = rt.tvar("race:%d" % k, 0)  # every racer asks for the same names at once
            handles[k] = _handle_ints(tv)
            tv.modify(lambda v: v + 1)
        return handles
    finally:
        rt.close()


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_named_get_or_create_race(runtime, segname, ctx):
    """Named get-or-create is atomic across processes: 3 processes racing for the
    same 200 names all get the same TVar for each name (one creator wins) and every
    one of their increments lands in it."""
    n_names, procs = 200, 3
    with Group(ctx, timeout=deadline_for(60)) as g:
        for me in range(procs):
            g.add(_racer, segname, me, n_names)
        g.start()
        res = g.wait()
    for k in range(n_names):
        ids = {r[k] for r in res}
        assert len(ids) == 1, "name race:%d resolved to different TVars: %r" % (k, ids)
        tv = runtime.tvar("race:%d" % k, "missing")
        assert _handle_ints(tv) in ids
        assert tv.value == procs, (k, tv.value)
