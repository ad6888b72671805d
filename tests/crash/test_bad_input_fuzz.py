"""Bad input in bulk: >= 500 malformed segment headers and >= 500 forged handles, each
a clear exception (a shmstm.Error) or a harmless success, never a crash or a hang.

Both run in a child process so that a segfault is seen as such (exit code) instead of
killing the test run; the child reports every case's outcome.
"""
import multiprocessing
import os
import pickle
import queue
import random

import posix_ipc
import pytest

import shmstm
from shmstm._core import ffi, lib

pytestmark = pytest.mark.crash

# A small source segment so that 500 forged copies are cheap.
TINY = dict(max_tvars=64, max_procs=4, heap_size=1 << 16, max_value_size=1 << 12)
CODE_NAMES = {lib.SHMSTM_ELAYOUT: "ELAYOUT", lib.SHMSTM_ECORRUPT: "ECORRUPT",
              lib.SHMSTM_EINIT: "EINIT", 0: "OK"}


def _mutants(image, n, seed):
    """n copies of ``image`` (bytes) with 1-4 random bytes xor-ed with a random
    non-zero value; 3/4 of the flips in the first 128 bytes (identity, limits and
    region offsets), the rest anywhere in the first 1 KiB (clock, token, allocator
    heads...)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        b = bytearray(image)
        flips = []
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(128) if rnd.random() < 0.75 else rnd.randrange(1024)
            b[pos] ^= rnd.randint(1, 255)
            flips.append(pos)
        out.append((flips, bytes(b)))
    return out


def _header_child(q, name, image, file_size, n):
    """For each mutant: shmstm_header_check on the bytes, then the real thing: a
    forged segment with that header, opened with shmstm.open and used."""
    try:
        shmstm.shm.runtime._WAIT_FOR_INIT_NS = 20_000_000    # an init_state flip: short wait
        buf = ffi.new("unsigned char[]", len(image))
        results = []
        for flips, data in _mutants(image, n, 7):
            ffi.memmove(buf, data, len(data))
            rc = lib.shmstm_header_check(buf, len(data), file_size)
            shm = posix_ipc.SharedMemory("/shmstm." + name, posix_ipc.O_CREX, mode=0o600,
                                         size=file_size)
            try:
                os.pwrite(shm.fd, data, 0)
            finally:
                shm.close_fd()
            outcome = "opened"
            try:
                rt = shmstm.open(name)
                try:
                    tv = rt.tvar("fz", 0)
                    tv.modify(lambda v: v + 1)
                    assert tv.value >= 1
                finally:
                    rt.close()
            except shmstm.Error as e:
                outcome = type(e).__name__
            except Exception as e:  # noqa: BLE001 - reported: not a clear shmstm error
                outcome = "UNCLEAR %s: %s" % (type(e).__name__, e)
            finally:
                shmstm.unlink(name)
            results.append((flips, CODE_NAMES.get(rc, str(rc)), outcome))
        q.put(("ok", results))
    except BaseException:
        import traceback
        q.put(("err", traceback.format_exc()))


def _run_child(target, args, timeout=120):
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    p = mp.Process(target=target, args=(q,) + args, daemon=True)
    p.start()
    try:
        status, results = q.get(timeout=timeout)
    except queue.Empty:
        status, results = "no answer (crash or hang)", None
    p.join(10)
    if p.is_alive():
        p.kill()
        p.join(5)
    assert status == "ok", "child: %s (exit code %s)\n%s" % (status, p.exitcode, results)
    assert p.exitcode == 0, "child crashed: exit code %s" % p.exitcode
    return results


def test_malformed_headers(segname):
    """500 segment headers with random byte flips: shmstm_header_check returns OK or a
    layout/corruption/init code (never crashes); opening a forged segment carrying the
    header raises LayoutMismatchError, CorruptSegmentError or SegmentInitError, or
    opens a runtime that works (flips in fields that do not describe the layout:
    runtime id, creation time, clock, ...).  Flips in the magic, the layout
    signature, the limits or the region offsets are always refused."""
    rt = shmstm.open(segname, **TINY)
    try:
        rt.tvar("fz", 0)
        path = "/dev/shm/shmstm." + segname
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            image = f.read(4096)
    finally:
        rt.close()
        shmstm.unlink(segname)
    assert lib.shmstm_header_check(ffi.from_buffer(image), len(image), file_size) == 0
    results = _run_child(_header_child, (segname + "-fz", image, file_size, 500))
    assert len(results) == 500
    unclear = [r for r in results if r[2].startswith("UNCLEAR")]
    assert not unclear, unclear[:10]
    allowed = {"opened", "LayoutMismatchError", "CorruptSegmentError", "SegmentInitError"}
    assert {r[2] for r in results} <= allowed, {r[2] for r in results} - allowed
    assert {r[1] for r in results} <= set(CODE_NAMES.values())
    # Identity and geometry (bytes 0-15 magic+signature, 24-127 creator, size, limits,
    # offsets): a flip there that the check accepts must be in a field nobody trusts
    # (creator pid/start, runtime id, creation time, reserved flags/padding).
    for flips, code, outcome in results:
        if any(p < 16 for p in flips):      # magic / signature (or also init_state)
            assert (code, outcome) in {("ELAYOUT", "LayoutMismatchError"),
                                       ("EINIT", "SegmentInitError")}, (flips, code, outcome)
        if code != "OK":
            assert outcome != "opened", (flips, code, outcome)
    refused = sum(r[2] != "opened" for r in results)
    print("headers: %d mutants, %d refused (%s), %d harmless and working" % (
        len(results), refused,
        ", ".join("%s=%d" % (k, sum(r[2] == k for r in results)) for k in sorted(allowed)),
        len(results) - refused))


class _Forged:
    """Pickles as a TVar handle with arbitrary (runtime, index, generation, name)."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (shmstm.stm.tvar._tvar_from_pickle, self.args)


def _forgeries(rt, live, n, seed):
    rnd = random.Random(seed)
    max_tvars = rt.limits["max_tvars"]
    # (No bool: True == 1, so (True, 1) would name the live TVar (1, 1).)
    weird = [None, "7", 1.5, -1, -(1 << 40), 1 << 32, 1 << 64, b"x", (1,), 2.0]
    out = []
    while len(out) < n:
        kind = rnd.randrange(6)
        if kind == 0:              # a live index with a wrong generation
            idx, gen = rnd.choice(sorted(live))
            gen = rnd.choice([g for g in (gen + 1, gen + 2, gen - 1, 0, rnd.randrange(1 << 32))
                              if (idx, g) not in live and 0 <= g < 1 << 32])
            args = (rt, idx, gen, None)
        elif kind == 1:            # an index never allocated, any generation
            args = (rt, rnd.randrange(len(live) + 5, max_tvars), rnd.randrange(1 << 32), None)
        elif kind == 2:            # out of range for this segment
            args = (rt, rnd.randrange(max_tvars, 1 << 32), rnd.randrange(1 << 32), None)
        elif kind == 3:            # wrong types or out of the 32-bit range
            args = (rt, rnd.choice(weird), rnd.choice(weird + [1]), None)
        elif kind == 4:            # not a runtime at all
            args = (rnd.choice(["rt", 5, None, b"x"]), 0, 1, None)
        else:                      # a runtime that does not exist
            args = (shmstm.stm.runtime._runtime_from_pickle("no-such-%d" % rnd.randrange(1 << 30)),
                    0, 1, None)
        out.append(pickle.dumps(_Forged(*args)))
    return out


def _handles_child(q, name, live, n):
    try:
        rt = shmstm.open(name)
        real = [shmstm.TVar(rt, i, g, None) for i, g in sorted(live)]
        before = [t.value for t in real]
        results = []
        for data in _forgeries(rt, set(live), n, 11):
            try:
                h = pickle.loads(data)
            except shmstm.Error as e:
                results.append(("unpickle", type(e).__name__, True))
                continue
            except Exception as e:  # noqa: BLE001
                results.append(("unpickle", type(e).__name__, False))
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
                    results.append((op, type(e).__name__, True))
                except Exception as e:  # noqa: BLE001
                    results.append((op, type(e).__name__, False))
                else:
                    results.append((op, "ACCEPTED", False))
        after = [t.value for t in real]
        q.put(("ok", {"results": results, "unchanged": before == after}))
    except BaseException:
        import traceback
        q.put(("err", traceback.format_exc()))


def test_forged_handles(runtime):
    """500 forged TVar handles in pickles (wrong generation for a live index, never
    allocated or out-of-range index, wrong types, a non-runtime, a runtime that does
    not exist): each is refused with a shmstm.Error when unpickled or at every use
    (read, write, transaction, free); the real TVars are untouched; no crash."""
    live = set()
    for i in range(10):
        tv = runtime.new_tvar("real-%d" % i)
        live.add((tv._idx, tv._gen))
    res = _run_child(_handles_child, (runtime.name, sorted(live), 500))
    results = res["results"]
    bad = [r for r in results if not r[2]]
    assert not bad, "forged handles not refused with a shmstm.Error: %r" % bad[:10]
    assert res["unchanged"], "a forged handle changed a real TVar"
    n_unpickle = sum(r[0] == "unpickle" for r in results)
    print("handles: 500 forged, %d refused at unpickling, %d uses refused (%s)" % (
        n_unpickle, len(results) - n_unpickle,
        ", ".join(sorted({r[1] for r in results}))))
