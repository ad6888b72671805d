"""List-append history check (Jepsen Elle style) for serializability.

K TVars each hold a tuple.  Every process runs transactions that read 1-3 random keys
and append a unique element (proc, counter, key) to 1-2 keys (``tv.value = tv.value +
(v,)``); one in five transactions is read-only.  The body records its reads and appends
in a list created afresh on each attempt and returns it, so ``atomically`` hands back
exactly the committed attempt's record.  Checks:

* every committed append appears exactly once in its key's final value, and no other
  element does (no lost update, no aborted write leaking, no duplicate);
* every append landed at the index equal to the length of the value the appending
  transaction read (the append's own read);
* every read is a prefix of the key's final value;
* the dependency graph has no cycle.  Edges: ww (order of appends in the final list),
  wr (appender of the last element a read saw -> reader), rw (reader that saw a prefix
  of length L -> appender of element L+1) and process order (one process's transactions
  run one after another, so a serializable - and linearizable - STM orders them so).
"""

import multiprocessing
import random

import pytest

import shmstm
from _helpers import Group, deadline_for, scaled

pytestmark = pytest.mark.stress

KEYS = 8


def _appender(start, keys, proc, n_txns, seed):
    rnd = random.Random(seed)
    start()
    history = []
    for i in range(n_txns):
        read_keys = rnd.sample(range(KEYS), rnd.randint(1, 3))
        if i % 5 == 4:
            append_keys = []
        else:
            append_keys = rnd.sample(range(KEYS), rnd.randint(1, 2))

        def body():
            ops = []  # fresh on every attempt: only the committed attempt's ops survive
            for k in read_keys:
                ops.append(("r", k, keys[k].value))
            for k in append_keys:
                elem = (proc, i, k)  # unique across the whole history
                cur = keys[k].value
                keys[k].value = cur + (elem,)
                ops.append(("a", k, elem, len(cur)))
            return ops

        history.append(shmstm.atomically(body))
    return history


def _find_cycle(nodes, edges):
    """Return one cycle (list of nodes) of the digraph, or None.  Iterative DFS."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(nodes, WHITE)
    parent = {}
    for root in nodes:
        if color[root] != WHITE:
            continue
        color[root] = GREY
        stack = [(root, iter(edges.get(root, ())))]
        while stack:
            node, it = stack[-1]
            for nxt in it:
                if color[nxt] == WHITE:
                    color[nxt] = GREY
                    parent[nxt] = node
                    stack.append((nxt, iter(edges.get(nxt, ()))))
                    break
                if color[nxt] == GREY:
                    cycle = [nxt, node]
                    while cycle[-1] != nxt:
                        cycle.append(parent[cycle[-1]])
                    return cycle[::-1]
            else:
                color[node] = BLACK
                stack.pop()
    return None


def check_history(histories, final):
    """Check per-process histories against final key values; return the edge count.

    ``histories[p][i]`` is the ops list of process p's i-th committed transaction;
    ``final[k]`` the final tuple of key k.  Raises AssertionError on an anomaly.
    """
    appender = {}  # element -> txn id
    for p, hist in enumerate(histories):
        for i, ops in enumerate(hist):
            for op in ops:
                if op[0] == "a":
                    _, k, elem, _ = op
                    assert elem not in appender, "element %r appended twice" % (elem,)
                    appender[elem] = (p, i)

    position = {}
    for k, val in enumerate(final):
        assert isinstance(val, tuple), (k, type(val))
        assert len(set(val)) == len(val), "key %d has duplicate elements" % k
        for pos, elem in enumerate(val):
            assert elem in appender, ("key %d holds %r, which no committed transaction "
                                      "appended (aborted write leaked?)" % (k, elem))
            position[(k, elem)] = pos

    edges = {}

    def edge(a, b, why):
        if a != b:
            edges.setdefault(a, {})[b] = why

    for p, hist in enumerate(histories):
        for i, ops in enumerate(hist):
            me = (p, i)
            if i:
                edge((p, i - 1), me, "po")
            for op in ops:
                if op[0] == "a":
                    _, k, elem, seen_len = op
                    assert (k, elem) in position, (
                        "lost update: %r appended to key %d by txn %r is missing from "
                        "the final value" % (elem, k, me))
                    assert position[(k, elem)] == seen_len, (
                        "txn %r appended %r to key %d after reading %d elements, but it "
                        "sits at index %d" % (me, elem, k, seen_len, position[(k, elem)]))
                else:
                    _, k, seen = op
                    fin = final[k]
                    assert fin[:len(seen)] == seen, (
                        "txn %r read key %d = %r, not a prefix of the final %r"
                        % (me, k, seen[-5:], fin[:len(seen)][-5:]))
                    if seen:
                        edge(appender[seen[-1]], me, "wr")
                    if len(seen) < len(fin):
                        edge(me, appender[fin[len(seen)]], "rw")

    for k, val in enumerate(final):
        for a, b in zip(val, val[1:]):
            edge(appender[a], appender[b], "ww")

    nodes = [(p, i) for p, hist in enumerate(histories) for i in range(len(hist))]
    cycle = _find_cycle(nodes, edges)
    if cycle is not None:
        steps = ["%r -%s-> %r" % (a, edges[a][b], b) for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("dependency cycle (not serializable): " + "; ".join(steps))
    return sum(len(v) for v in edges.values())


def test_checker_finds_anomalies():
    """The checker itself: accepts a serial history and rejects a lost update, a
    non-prefix read, a misplaced append and a G2 (anti-dependency) cycle."""
    # Serial: T0 appends 1 to k0; T1 reads k0=(1,) and appends 2 to k1.
    ok = [[[("a", 0, 1, 0)], [("r", 0, (1,)), ("a", 1, 2, 0)]]]
    assert check_history(ok, [(1,), (2,)]) >= 1
    with pytest.raises(AssertionError, match="lost update|which no committed"):
        check_history(ok, [(), (2,)])
    with pytest.raises(AssertionError, match="not a prefix"):
        check_history([[[("r", 0, (9,))], [("a", 0, 1, 0)]]], [(1,)])
    with pytest.raises(AssertionError, match="sits at index"):
        check_history([[[("a", 0, 1, 0)]], [[("a", 0, 2, 0)]]], [(1, 2)])
    # Write skew as list-append: A reads k1=() appends to k0; B reads k0=() appends to k1.
    skew = [[[("r", 1, ()), ("a", 0, "a", 0)]], [[("r", 0, ()), ("a", 1, "b", 0)]]]
    with pytest.raises(AssertionError, match="cycle"):
        check_history(skew, [("a",), ("b",)])


@pytest.mark.parametrize("ctx", ["spawn", "fork"])
def test_list_append_serializable(runtime, ctx):
    """Serializability (Elle list-append): committed reads are prefixes of the final
    values, every committed append appears exactly once where its transaction read the
    end of the list, and the ww/wr/rw/process-order dependency graph is acyclic."""
    keys = [runtime.tvar("k%d" % k, ()) for k in range(KEYS)]
    mp = multiprocessing.get_context(ctx)
    n = scaled(1000)
    procs = 3
    with Group(mp, timeout=deadline_for(120)) as g:
        for p in range(procs):
            g.add(_appender, keys, p, n, 4000 + p)
        g.start()
        histories = g.wait()
    final = shmstm.atomically(lambda: [k.value for k in keys])
    assert [len(h) for h in histories] == [n] * procs
    n_edges = check_history(histories, final)
    n_appends = sum(len(v) for v in final)
    assert n_appends == sum(op[0] == "a" for h in histories for ops in h for op in ops)
    print("ctx=%s txns=%d appends=%d edges=%d" % (ctx, procs * n, n_appends, n_edges))
