"""List-append history (Elle style, as tests/stress/test_history.py) with SIGKILLs
interleaved: killed transactions are all-or-nothing and the history stays
serializable.

Each worker incarnation logs, to its own file, an *intent* line before every
transaction (which keys it will append to) and an *ok* line with the committed
operations after it.  A killed worker's last transaction without an ok line is
indeterminate: it may or may not have committed, but all of its appends must be in
the final state or none of them (atomicity).  A log's last line may be torn by the
kill: it is ignored (and its transaction treated as indeterminate).
"""
import json

import pytest

from _common import soak
from _helpers import LIMITS
from test_history import check_history

pytestmark = pytest.mark.crash

KEYS = 8


def read_log(path):
    """(committed ops by transaction number, last intent without an ok, torn?).
    A worker killed before it opened its log never ran a transaction."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return {}, None, False
    torn = False
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        torn = True                  # no final newline: the kill cut the last write
        lines.pop()
    committed, intents = {}, {}
    for raw in lines:
        rec = json.loads(raw)
        if rec[0] == "intent":
            intents[rec[1]] = rec[2]
        else:
            committed[rec[1]] = [tuple(op[:2]) + (tuple(map(tuple, op[2])) if op[0] == "r"
                                                  else tuple(op[2]),) + tuple(op[3:])
                                 for op in rec[2]]
    pending = [(i, keys) for i, keys in intents.items() if i not in committed]
    assert len(pending) <= 1, "more than one unfinished transaction in %s" % path
    return committed, (pending[0] if pending else None), torn


def test_read_log_tolerates_a_torn_last_line(tmp_path):
    """The log reader itself: a torn last line is dropped, its transaction pending."""
    p = tmp_path / "p.log"
    p.write_bytes(b'["intent", 0, [1]]\n["ok", 0, [["a", 1, [0, 0, 1], 0]]]\n'
                  b'["intent", 1, [2]]\n["ok", 1, [["a", 2, [0, 1')
    committed, pending, torn = read_log(str(p))
    assert torn and list(committed) == [0] and pending == (1, [2])


def test_history_with_kills_serializable(segname, run_driver, tmp_path):
    """List-append workers SIGKILLed >= 60 times (every other kill inside a commit);
    every indeterminate transaction of a killed worker is all-or-nothing, and the
    committed history (plus the indeterminate transactions that did commit) passes the
    serializability checker: prefix reads, append positions, acyclic ww/wr/rw/po."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    kills = soak(60, 500)      # values grow without bound: the soak needs a big heap
    r = run_driver("history_kills", {
        "name": segname, "limits": dict(LIMITS, heap_size=soak(16 << 20, 512 << 20)), "keys": KEYS,
        "workers": 3, "kills": kills, "logdir": str(logdir), "max_seconds": soak(60, 1200),
        "delay_permille": 300, "delay_max_us": 300})
    assert r["debug_build"] and r["errors"] == [], r["errors"]
    assert len(r["kills"]) >= kills
    assert sum(s != "idle" for s in r["kills"]) >= len(r["kills"]) // 2
    final = [tuple(tuple(e) for e in v) for v in r["final"]]
    present = {e for v in final for e in v}
    histories = []
    indeterminate = {"committed": 0, "absent": 0}
    torn_lines = 0
    for proc, path, killed in r["procs"]:
        committed, pending, torn = read_log(path)
        torn_lines += torn
        n = len(committed)
        assert sorted(committed) == list(range(n)), "gap in %s" % path
        hist = [committed[i] for i in range(n)]
        if pending is not None:
            assert killed, "a live worker left an unfinished transaction"
            i, keys = pending
            assert i == n
            elems = [(proc, i, k) for k in keys]
            there = [e in present for e in elems]
            assert all(there) or not any(there), (
                "killed transaction %r half-applied: %r" % ((proc, i), list(zip(elems, there))))
            if elems and all(there):
                indeterminate["committed"] += 1
                # Committed without a record of its reads: keep it as an append-only
                # transaction at its real positions (ww, po edges still checked).
                pos = {e: v.index(e) for v in final for e in v if e in elems}
                hist.append([("a", e[2], e, pos[e]) for e in elems])
            else:
                indeterminate["absent"] += 1
        histories.append(hist)
    n_edges = check_history(histories, final)
    n_txns = sum(len(h) for h in histories)
    assert r["locks_after"] == []
    print("kills=%d incarnations=%d txns=%d edges=%d indeterminate=%r torn-lines=%d" % (
        len(r["kills"]), len(r["procs"]), n_txns, n_edges, indeterminate, torn_lines))
