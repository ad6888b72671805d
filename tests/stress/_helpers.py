"""Helpers for the multi-process stress tests (imported as ``from _helpers import ...``).

Children are real processes (spawn, fork, forkserver).  Every child runs inside
``_child_main``: it reports ``(idx, ok, result-or-traceback)`` on a queue, so a
failing child fails the test with its traceback instead of a bare exit code, and the
parent never waits longer than a deadline for anything (a hang becomes a failure).
No sleep stands in for synchronisation: children signal "ready" and wait for "go".
"""

import json
import multiprocessing
import os
import queue as _queue
import time
import traceback
import uuid

_RUN_ENV = "SHMSTM_TEST_RUN"

# Same small limits as tests/conftest.py (children attach with the explicit limits).
LIMITS = dict(max_tvars=4096, heap_size=4 << 20)

# Upper bound for anything a child waits on (barrier, events); tests pass their own
# overall deadline to Group.
CHILD_WAIT = 120.0


def stress_scale():
    """The SHMSTM_STRESS multiplier (float, default 1)."""
    try:
        return max(0.0, float(os.environ.get("SHMSTM_STRESS", "1") or "1"))
    except ValueError:
        return 1.0


def scaled(n, minimum=1):
    """``n`` scaled by SHMSTM_STRESS, at least ``minimum``."""
    return max(int(minimum), int(round(n * stress_scale())))


def deadline_for(base):
    """A join/collection deadline (seconds) that grows with the stress scale."""
    return base * max(1.0, stress_scale())


def run_token():
    """One token per pytest run, shared with xdist workers and children via the
    environment (conftest sets it at configure time, before workers start)."""
    tok = os.environ.get(_RUN_ENV)
    if not tok:
        tok = uuid.uuid4().hex[:6]
        os.environ[_RUN_ENV] = tok
    return tok


def unique_name(tag=""):
    """A segment name unique to this run, process and call: t-<run>-<pid>-<uuid>."""
    name = "t-%s-%s-%s" % (run_token(), os.getpid(), uuid.uuid4().hex[:8])
    return name + ("-" + tag if tag else "")


def open_rt(name, **extra):
    """Attach to the test's segment with the test's explicit limits."""
    import shmstm  # lazily: conftest imports this module before any test needs shmstm

    kw = dict(LIMITS)
    kw.update(extra)
    return shmstm.open(name, **kw)


def mp_context(method):
    return multiprocessing.get_context(method)


def _child_main(q, idx, ready, go, target, args):
    def start():
        """Tell the parent this child is set up; block until every child is."""
        ready.release()
        if not go.wait(CHILD_WAIT):
            raise RuntimeError("child %d: parent never said go" % idx)

    try:
        result = target(start, *args)
    except BaseException:
        q.put((idx, False, "pid %d:\n%s" % (os.getpid(), traceback.format_exc())))
    else:
        q.put((idx, True, result))
    q.close()
    q.join_thread()


class ChildFailed(AssertionError):
    pass


class Group:
    """A set of child processes started together and collected with a deadline.

    ``add(target, *args)`` registers ``target(start, *args)`` (a module-level function)
    and returns its index; ``start()`` starts all children, waits until each has called
    ``start()`` and then releases them at once; ``wait(idxs)`` returns their results.
    Leaving the ``with`` block joins every child (killing stragglers) and checks exit
    codes.
    """

    def __init__(self, ctx, timeout):
        if isinstance(ctx, str):
            ctx = mp_context(ctx)
        self.ctx = ctx
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.q = ctx.Queue()
        self.ready = ctx.Semaphore(0)
        self.go = ctx.Event()
        self.specs = []
        self.procs = []
        self.results = {}

    def __enter__(self):
        return self

    def add(self, target, *args):
        self.specs.append((target, args))
        return len(self.specs) - 1

    def _left(self):
        return self.deadline - time.monotonic()

    def _pump(self, block_for):
        try:
            idx, ok, res = self.q.get(timeout=max(0.0, block_for))
        except _queue.Empty:
            return
        if not ok:
            raise ChildFailed("child %d failed:\n%s" % (idx, res))
        self.results[idx] = res

    def _check_dead(self, waiting_for):
        for i in waiting_for:
            p = self.procs[i]
            if i not in self.results and not p.is_alive() and p.exitcode not in (None, 0):
                # Give its last queue message a chance, then blame the exit code.
                self._pump(0.5)
                if i not in self.results:
                    raise ChildFailed("child %d (pid %s) died with exit code %s"
                                      % (i, p.pid, p.exitcode))

    def start(self):
        for idx, (target, args) in enumerate(self.specs):
            p = self.ctx.Process(target=_child_main,
                                 args=(self.q, idx, self.ready, self.go, target, args),
                                 daemon=True)
            p.start()
            self.procs.append(p)
        n_ready = 0
        while n_ready < len(self.procs):
            if self._left() <= 0:
                raise ChildFailed("children not ready before the deadline (%.0f s)"
                                  % self.timeout)
            if self.ready.acquire(timeout=0.2):
                n_ready += 1
                continue
            self._pump(0)
            self._check_dead(range(len(self.procs)))
        self.go.set()

    def wait(self, idxs=None, timeout=None):
        """Results of children ``idxs`` (all by default), in that order; at most
        ``timeout`` s from now (and never past the group's deadline)."""
        if idxs is None:
            idxs = range(len(self.procs))
        idxs = list(idxs)
        limit, end = self.timeout, self.deadline
        if timeout is not None and time.monotonic() + timeout < end:
            limit, end = timeout, time.monotonic() + timeout
        while any(i not in self.results for i in idxs):
            left = end - time.monotonic()
            if left <= 0:
                missing = [i for i in idxs if i not in self.results]
                raise ChildFailed("children %s did not finish within %.1f s "
                                  "(hang / lost wake-up?)" % (missing, limit))
            self._pump(min(0.2, left))
            self._check_dead(idxs)
        return [self.results[i] for i in idxs]

    def __exit__(self, et, ev, tb):
        grace = 0 if et is not None else max(1.0, min(10.0, self._left()))
        end = time.monotonic() + grace
        stuck = []
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                stuck.append(p.pid)
                p.kill()
                p.join(5)
        bad = [(p.pid, p.exitcode) for p in self.procs if p.exitcode not in (0, None)]
        self.q.close()
        if et is None:
            if stuck:
                raise ChildFailed("children did not exit: %s" % stuck)
            if bad:
                raise ChildFailed("children exited with non-zero codes: %s" % bad)
        return False


def wait_until_blocked(rt, pid, timeout):
    """Wait until process ``pid`` sleeps in retry() on ``rt``'s segment.

    Observes the condition (the segment's per-process ``waiting`` flag from
    ``rt.stats()``), so a test can make sure a wake-up is really needed; not a sleep
    standing in for synchronisation.  Raises AssertionError after ``timeout`` s (a
    retry() that never sleeps is spinning).
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in rt.stats()["processes"]:
            if p["pid"] == pid and p["waiting"]:
                return
        time.sleep(0.001)
    raise AssertionError("process %d never blocked in retry() within %.0f s"
                         % (pid, timeout))


def wait_event(ev, timeout, what):
    """Wait for a multiprocessing Event with a bound; fail with a message otherwise."""
    if not ev.wait(timeout):
        raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))


def as_other_user(fn):
    """``fn()`` in a forked child that switched to uid/gid 65534 (os.setuid;
    needs root); returns what it returned (a JSON-able value), or fails with
    the child's error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps({"ok": fn()}).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = json.loads(f.read().decode() or '{"error": "no answer"}')
    _, st = os.waitpid(pid, 0)
    assert "error" not in out, out["error"]
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
    return out["ok"]
