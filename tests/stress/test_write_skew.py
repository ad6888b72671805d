"""Write skew: two transactions that each read the other's TVar and write their own.

x and y start at 0 (even).  Process A, in one transaction, makes x odd only if it sees
y even (and otherwise makes x even again); process B does the same for y against x.
Invariant: never (x odd and y odd).  Under serializability it holds; snapshot isolation
(validating only write-write conflicts) lets A and B both see the other even and both go
odd, breaking it.  A checker audits the invariant in read-only transactions, every
attempt included (opacity), and the final state is checked too.
"""

import multiprocessing

import pytest

import shmstm
from _helpers import Group, deadline_for, scaled

pytestmark = pytest.mark.stress


def _flipper(start, mine, other, n_txns, bad):
    """Toggle ``mine``: odd only if ``other`` is even in the same transaction."""
    attempts = [0]

    def step():
        attempts[0] += 1
        o = other.value
        m = mine.value
        if m % 2 and o % 2:
            with bad.get_lock():
                bad.value += 1
        if m % 2:
            mine.value = m + 1  # back to even: always allowed
            return 0
        if o % 2 == 0:
            mine.value = m + 1  # odd, justified by other being even
            return 1
        return 0

    start()
    went_odd = 0
    for _ in range(n_txns):
        went_odd += shmstm.atomically(step)
    return {"went_odd": went_odd, "attempts": attempts[0]}


def _checker(start, x, y, stop, bad, min_checks):
    def look():
        a, b = x.value, y.value
        c = x.value  # a second read of x must agree (repeatable read)
        if (a % 2 and b % 2) or a != c:
            with bad.get_lock():
                bad.value += 1
        return a, b

    start()
    checks = both_odd = 0
    while checks < min_checks or not stop.is_set():
        a, b = shmstm.atomically(look)
        checks += 1
        if a % 2 and b % 2:
            both_odd += 1
    return {"checks": checks, "both_odd": both_odd}


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_no_write_skew(runtime, ctx):
    """Serializability against write skew: with A flipping x only when y is even and B
    flipping y only when x is even (each in one transaction), no transaction, attempt
    or final state ever sees x and y both odd."""
    x = runtime.new_tvar(0)
    y = runtime.new_tvar(0)
    mp = multiprocessing.get_context(ctx)
    bad = mp.Value("l", 0)
    stop = mp.Event()
    n = scaled(20000)
    with Group(mp, timeout=deadline_for(120)) as g:
        # TVar handles travel to the children by pickling (spawn) or inheritance (fork).
        a = g.add(_flipper, x, y, n, bad)
        b = g.add(_flipper, y, x, n, bad)
        c = g.add(_checker, x, y, stop, bad, 3)
        g.start()
        ra, rb = g.wait([a, b])
        stop.set()
        (rc,) = g.wait([c])
    fx, fy = shmstm.atomically(lambda: (x.value, y.value))
    assert not (fx % 2 and fy % 2), "final state both odd: x=%d y=%d" % (fx, fy)
    assert rc["both_odd"] == 0, "committed checks saw both odd: %r" % rc
    assert bad.value == 0, "%d transaction attempts saw x and y both odd" % bad.value
    # The workload did something: both sides went odd at some point.
    assert ra["went_odd"] > 0 and rb["went_odd"] > 0, (ra, rb)
    # Only A writes x (+1 per committed change): x counts A's committed changes.
    assert fx == 2 * ra["went_odd"] - fx % 2, (fx, ra)
    assert fy == 2 * rb["went_odd"] - fy % 2, (fy, rb)
    print("ctx=%s A=%r B=%r checker=%r final=(%d,%d)" % (ctx, ra, rb, rc, fx, fy))
