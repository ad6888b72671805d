"""The STM front: transactions.  atomically/atomic and their loop, retry,
check, or_else, the per-thread transaction object (_Tx) and its write
buffer, and what happens to a transaction at fork.

The hot path (TVar.value in tvar.py, atomically here) reads module globals
and calls the compiled core directly: each line of it counts (tools/bench,
tools/percall_ops).  A transaction binds to one runtime at its first TVar
access; a runtime here is the shared-memory backend's (shm/runtime.py), used
through its methods only.
"""
import os
import pickle
import random
import time

from .. import errors
from .._codec import T_BYTES, T_FALSE, T_FLOAT, T_INT, T_NONE, T_PICKLE, T_TRUE, decode_heap
from .._core import _fast, error_for, ffi, lib
from ..store.durable import durability as _durability

__all__ = ["atomically", "atomic", "retry", "check", "or_else", "in_transaction"]

T_FREE = -1          # write-buffer marker: the transaction frees the TVar

E_CONFLICT = lib.SHMSTM_ECONFLICT
E_INTR = lib.SHMSTM_EINTR
E_TIMEOUT = lib.SHMSTM_ETIMEOUT
E_INVAL = lib.SHMSTM_EINVAL
E_CLOSED = lib.SHMSTM_ECLOSED
AB_USER = lib.SHMSTM_AB_USER
AB_RESOURCE = lib.SHMSTM_AB_RESOURCE
AB_SILENT = 255

# Conflicts before a transaction takes the irrevocable token.
IRREVOCABLE_AFTER = 32

_stage_i = lib.shmstm_tx_stage_i
_stage_f = lib.shmstm_tx_stage_f
_stage_b = lib.shmstm_tx_stage_b
# The hot calls keep the GIL (shmstm._fast; native/fast.h): they take the
# addresses of the context and of the TVar's shmstm_ref as ints.
_readv = _fast.readv
_fcommit = _fast.commit
MISS = lib.SHMSTM_READ_MISS       # "not answered by the fast path"
_unpack = ffi.unpack
_loads = pickle.loads


class _Conflict(BaseException):
    """Internal: the attempt must re-run.  A BaseException so that a user's
    ``except Exception`` inside a transaction cannot swallow it."""


class _RetrySignal(BaseException):
    """Internal: retry() was called."""


class _PollExpired(errors.RetryTimeout):
    """Internal: a wait cut short by atomically_async's poll deadline."""


# This thread's _Tx, reused by every transaction the thread runs (tx.running
# says whether one is running now), kept in the thread state's dict by
# shmstm._fast: read once per TVar access and once per transaction, it costs
# ~150 instructions where a threading.local attribute cost ~600.
_get_tx = _fast.tx
_set_tx = _fast.set_tx
_call = _fast.call
_busy = _fast.busy

# _Tx.doomed while a rollback (_Tx._rollback) is under way: truthy, so the
# attempt never commits, but not True, so the exception that cut the rollback
# short is raised, not taken for a symptom of an inconsistent view.
_UNDOING = 2


class _ForkedRuntime:
    """_Tx.rt in a fork child of a transaction: the transaction is the
    parent's; every TVar access and the commit raise ForkedContextError."""
    name = "<forked>"
    _durable = None


_FORKED = _ForkedRuntime()


def _current():
    """This thread's running transaction, or None (off the hot path)."""
    tx = _get_tx()
    return tx if tx is not None and tx.running else None

# Every transaction in flight in this process, in any thread.  While it is
# empty (the common case for a read outside a transaction) TVar.get() knows
# without a thread-state lookup that no transaction is running in this
# thread.  set.add/discard are atomic.
_active = set()


def _decode(tag, ctx):
    """Decode a read result (tag from the core, payload in ctx.out / ctx.buf)."""
    if tag == T_INT:
        return ctx.out[0]
    if tag == T_NONE:
        return None
    if tag == T_TRUE:
        return True
    if tag == T_FALSE:
        return False
    if tag == T_FLOAT:
        return ctx.outf[0]
    if tag >= T_BYTES:
        # A copy: unpickling may run code that reads TVars and reuses the buffer.
        return decode_heap(tag, _unpack(ctx.ptr.buf, ctx.out[1]))
    if tag == E_CONFLICT:
        raise _Conflict()
    raise error_for(tag)


_GEN_SHIFT = lib.SHMSTM_HANDLE_GEN_SHIFT
_IDX_MASK = lib.SHMSTM_HANDLE_IDX_MASK


def _handle(idx, gen):
    """The TVar handle the fast paths take: (int64_t)(gen << shift | idx)."""
    h = gen << _GEN_SHIFT | idx
    return h - (1 << 64) if h >= 1 << 63 else h


class _Enc:
    """A buffered write of anything but an int64: encoded when it is written
    (so bad values raise at the assignment), staged at commit.  An int is
    buffered as itself."""
    __slots__ = ("tag", "payload", "value")

    def __init__(self, tag, payload, value):
        self.tag = tag
        self.payload = payload
        self.value = value

    def read(self):
        """The value, copied out like a read from the segment would be."""
        tag = self.tag
        if tag == T_PICKLE:
            return _loads(self.payload)
        if tag == T_FREE:
            raise errors.StaleTVarError("the TVar was freed by this transaction")
        return self.value

    def stage(self, ptr, h):
        idx = h & _IDX_MASK
        gen = (h >> _GEN_SHIFT) & _IDX_MASK
        tag = self.tag
        if tag >= T_BYTES:
            return _stage_b(ptr, idx, gen, tag, self.payload, len(self.payload))
        if tag == T_FLOAT:
            return _stage_f(ptr, idx, gen, self.payload)
        if tag == T_FREE:
            return lib.shmstm_tx_stage_free(ptr, idx, gen)
        return _stage_i(ptr, idx, gen, tag, self.payload)


_FREED = _Enc(T_FREE, None, None)


class _Tx:
    """A thread's transaction object, reused by every transaction the thread
    runs (see _run).

    rt is the runtime the current attempt touched (None: nothing touched
    yet); brt/ctx/ptr cache the binding to the last runtime used, so an
    attempt binds with two compares.  writes maps a TVar handle to its
    buffered value: an int64 as itself, anything else as an _Enc (counted in
    nonint, an upper bound, so that an all-int write set is staged in one
    call)."""
    __slots__ = ("rt", "brt", "ctx", "ptr", "pa", "writes", "undo", "depth", "created",
                 "doomed", "nonint", "running", "clean", "timed", "busy", "waiting", "epoch",
                 "__weakref__")

    def __init__(self):
        # Inside the transaction's function now: set and cleared by
        # shmstm._fast.call around each call of it, in C, so that no
        # asynchronous exception can leave it set.
        self.running = False
        # A transaction loop (_run) is on this thread's stack: set and cleared
        # in C by shmstm._fast.busy.  waiting: that loop is blocked in retry()
        # (_block), the only place where another transaction may start on
        # the thread (from a signal handler); epoch counts the loops started.
        self.busy = False
        self.waiting = False
        self.epoch = 0
        # The last transaction ended through its own cleanup.  False from the
        # start of a transaction until its cleanup is complete: if an
        # asynchronous exception cut that cleanup short, the thread's next
        # transaction resets everything first (_reset).
        self.clean = True
        # {function: deadline} of the nested @atomic(timeout=...) calls that
        # retried in this transaction (None: none); its waits end by then.
        self.timed = None
        self.rt = self.brt = self.ctx = self.ptr = self.pa = None
        self.writes = {}
        self.undo = []
        self.created = []
        self.depth = 0
        self.doomed = False
        self.nonint = 0

    def _bind(self, rt):
        if self.rt is not None:
            if rt is self.rt:
                return
            if self.rt is _FORKED:
                raise errors.ForkedContextError(
                    "this process was forked inside a transaction: the transaction belongs to "
                    "the parent and commits nothing here")
            raise errors.CrossRuntimeError(
                "a transaction cannot use TVars of two runtimes (%r and %r)" % (self.rt.name, rt.name))
        ctx = self.ctx
        if rt is not self.brt or ctx is None or ctx.ptr is None:
            ctx = rt._ctx()             # raises if the runtime is closed
            self.brt = rt
            self.ctx = ctx
            self.ptr = ctx.ptr
            self.pa = ctx.addr
            # An asynchronous exception (KeyboardInterrupt from a signal
            # handler) can cut a transaction's cleanup short before its C
            # abort: staged writes would then stay in the thread's C context
            # and be committed by its next transaction (a half-applied write).
            # _run never reuses the _Tx of a transaction that ended by an
            # exception, and every (re)binding clears the context first: one C
            # call, off the reuse path (a thread that keeps to one runtime
            # binds once).
            lib.shmstm_tx_abort(self.ptr, AB_SILENT)
        self.rt = rt

    def _discard_created(self, since=0):
        created = self.created
        if len(created) > since:
            ptr = self.ptr
            for tv in created[since:]:
                lib.shmstm_tvar_discard(ptr, tv._idx, tv._gen)
            del created[since:]

    def _end(self, reason):
        """End the attempt without committing (idempotent).  The C context is
        cleared even if the attempt touched no TVar: it may hold the
        irrevocable token, or an interrupted wait's read set."""
        ctx = self.ctx
        if ctx is not None and ctx.ptr is not None:
            if self.rt is not None:
                self._discard_created()
            else:
                reason = AB_SILENT      # nothing was attempted: no abort to count
            lib.shmstm_tx_abort(ctx.ptr, reason)
        self.rt = None
        self.writes.clear()
        del self.undo[:]
        self.doomed = False
        self.nonint = 0

    def _reset(self):
        """Everything back to the state between transactions, the C context's
        staged writes and read set included: the previous transaction's
        cleanup was cut short (see clean)."""
        ctx = self.ctx
        p = ctx.ptr if ctx is not None else None
        if p is not None:
            self.ptr = p
            self._discard_created()
            lib.shmstm_tx_abort(p, AB_SILENT)
        self.created = []
        self.rt = None
        self.depth = 0
        self._end(AB_SILENT)
        self.clean = True

    def _rollback(self, mark, created):
        """Undo the writes logged since undo mark ``mark`` and free the TVars
        created since ``created`` (or_else's failed branch, a nested
        atomically that raised).  The reads stay.  Marked doomed for the
        length of it: if an asynchronous exception cuts it short, the
        attempt can never commit half undone (it re-runs)."""
        was = self.doomed
        self.doomed = _UNDOING
        undo = self.undo
        writes = self.writes
        while len(undo) > mark:
            h, prev = undo.pop()
            if prev is None:
                writes.pop(h, None)
            else:
                writes[h] = prev
        if self.rt is not None:
            self._discard_created(created)
        self.doomed = was

    def _read_miss(self):
        """A read the fast path did not answer: the tag or error is in the
        context (shmstm_tx_readv)."""
        ctx = self.ctx
        tag = self.ptr.last
        if tag == T_INT:
            return ctx.out[0]           # the one int the fast path cannot return
        if tag == E_CONFLICT:
            self.doomed = True
            raise _Conflict()
        return _decode(tag, ctx)

    def _commit(self):
        """Stage the write buffer and commit.  True on success (the attempt
        is over), False on a conflict and None for a re-run that is not one
        (an interrupted wait; the attempt was ended either way); raises on
        errors (after ending the attempt)."""
        if self.rt is None:
            return True                     # touched no TVar
        if self.doomed:
            self._end(AB_SILENT)
            return False
        if self.rt is _FORKED:
            self._end(AB_SILENT)
            raise errors.ForkedContextError(
                "this process was forked inside a transaction: the transaction belongs to "
                "the parent and commits nothing here")
        ptr = self.ptr
        writes = self.writes
        if self.nonint:
            for h, w in writes.items():     # the ints go with the commit call
                if type(w) is not int:
                    rc = w.stage(ptr, h)
                    if rc < 0:
                        rt = self.rt
                        self._end(AB_RESOURCE)
                        raise rt._error(rc, "committing %s" % rt._describe(h & _IDX_MASK))
        # The TVars this attempt created leave self.created before the call:
        # an interrupt (KeyboardInterrupt from a signal handler) landing just
        # after a successful commit makes atomically() end the attempt, and
        # that must not free TVars the commit published.  At worst, an
        # interrupted failed commit leaks them.
        created = self.created
        if created:
            self.created = []
        if self.ctx.sync:
            return self._commit_sync(ptr, writes, created)
        rc = _fcommit(self.pa, writes)
        if rc == 0:
            writes.clear()
            if self.undo:
                del self.undo[:]
            self.nonint = 0
            self.rt = None
            return True
        return self._commit_failed(rc, ptr, created)

    def _commit_failed(self, rc, ptr, created):
        rt = self.rt
        if created:
            self.created = created + self.created
        self._end(AB_SILENT)               # the core counted the abort
        if rc == E_CONFLICT:
            return False                    # re-run, counted as a conflict
        if rc == E_INTR or (rt._durable is not None and rt._durable.retryable(rc)):
            return None                     # re-run, not a conflict (signal handlers ran,
                                            # or the flusher was restarted)
        raise rt._error(rc, "commit (%s)" % rt._describe(lib.shmstm_tx_failed_idx(ptr)))

    def _commit_sync(self, ptr, writes, created):
        """A durable sync commit: it waits for the flusher (in the core, then
        in finish_wait), so it is counted like a retry() wait: close() from
        another thread interrupts the wait and frees the context only after."""
        rt = self.rt
        tok = object()
        try:
            rt._wait_begin(tok, self._give_back, created)
            rc = _fcommit(self.pa, writes)
            if rc < 0:
                return self._commit_failed(rc, ptr, created)
            writes.clear()
            del self.undo[:]
            self.nonint = 0
            self.rt = None
            if rc > 0:                      # committed, not yet flushed
                rt._durable.finish_wait(ptr)
            return True
        finally:
            rt._waiters.discard(tok)

    def _give_back(self, created):
        """A sync commit found its runtime closed: the attempt ends (the core
        is called only if the context still exists)."""
        if created:
            self.created = created + self.created
        self._end(AB_SILENT)

    def _block(self, deadline, poll=False):
        """retry(): wait until something this attempt read changes, or until
        ``deadline`` or the deadline of a nested @atomic(timeout=...) call
        that retried (self.timed).  ``poll``: the expiry of ``deadline``
        itself raises _PollExpired (atomically_async)."""
        if self.rt is None:
            raise errors.BlockedForeverError(
                "retry() in a transaction that read no TVar would wait forever")
        if self.rt is _FORKED:
            self._end(AB_SILENT)
            raise errors.ForkedContextError(
                "this process was forked inside a transaction: the transaction belongs to "
                "the parent and commits nothing here")
        self._discard_created()
        self.writes.clear()
        del self.undo[:]
        self.nonint = 0
        if self.doomed:
            self._end(AB_SILENT)
            return
        ptr = self.ptr
        rt = self.rt
        self.rt = None                      # the next attempt binds again
        own = True
        if self.timed:
            nested = min(self.timed.values())
            if deadline is None or nested < deadline:
                deadline, own = nested, False
        # Registered while in the core: close() from another thread interrupts
        # the wait (SHMSTM_ECLOSED) and detaches only once it has left.
        # A transaction run on this thread meanwhile (a signal handler's)
        # reuses the thread's context, read set included: it bumps epoch, and
        # this wait then ends as if woken (the attempt re-runs).
        epoch = self.epoch
        was_waiting = self.waiting      # (a signal handler's transaction waits inside ours)
        tok = object()
        try:
            self.waiting = True
            rt._wait_begin(tok)
            while True:
                if self.epoch != epoch:
                    return
                if deadline is None:
                    ns = -1
                else:
                    ns = int((deadline - time.monotonic()) * 1e9)
                    if ns < 0:
                        ns = 0
                rc = lib.shmstm_tx_wait(ptr, ns)
                if rc == 0 or self.epoch != epoch:
                    return
                if rc == E_INTR:
                    continue        # signal handlers ran at this bytecode; wait on
                lib.shmstm_tx_abort(ptr, AB_SILENT)
                if rc == E_TIMEOUT:
                    if poll and own:
                        raise _PollExpired()
                    raise errors.RetryTimeout(
                        "transaction blocked in retry() for longer than its timeout%s"
                        % ("" if own else " (of an @atomic(timeout=...) call inside it)"))
                if rc == E_INVAL:
                    raise errors.BlockedForeverError(
                        "retry() in a transaction that read no TVar would wait forever")
                if rc == E_CLOSED:
                    raise errors.RuntimeClosedError(
                        "runtime %r was closed by another thread while this one waited in retry()"
                        % rt.name)
                raise error_for(rc, "retry")
        finally:
            rt._waiters.discard(tok)
            self.waiting = was_waiting


def _backoff(n):
    if n < 4:
        return
    if n < 12:
        os.sched_yield()
    else:
        time.sleep(random.random() * min(0.0002 * (1 << min(n - 12, 6)), 0.01))


def atomically(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` as a transaction and return its result.

    The function is re-run if it conflicts with another commit, so it must
    not have side effects outside TVars.  Inside a transaction, a nested
    ``atomically`` joins the outer transaction; if it raises, its writes
    (and the TVars it created) are undone before the exception leaves it."""
    # The hot path of every transaction: one thread-state read (tools/bench
    # measures it).
    tx = _get_tx()
    if tx is None:
        tx = _Tx()
        _set_tx(tx)
    elif tx.running:
        return _nested(tx, fn, args, kwargs)
    elif tx.busy:
        return _reentered(tx, fn, args, kwargs, None)
    return _busy(tx, _run, (tx, fn, args, kwargs, None))


def _reentered(tx, fn, args, kwargs, deadline, poll=False, timed=None):
    """An outermost transaction started while this thread's transaction loop
    is not in its function: from a signal handler or a finalizer.  Possible
    only while that loop waits in retry() (it then re-runs: _block); while it
    commits, the thread's context holds its staged writes."""
    if not tx.waiting:
        raise errors.Error(
            "a transaction cannot start while this thread is committing one (from a signal "
            "handler or a finalizer): set a flag there and act on it outside")
    return _run(tx, fn, args, kwargs, deadline, poll, timed)


def _nested(tx, fn, args, kwargs):
    """A nested atomically: joins the running transaction; an exception
    leaving it undoes what it did (GHC's catchSTM, ScalaSTM's nested atomic
    blocks).  A conflict or a retry() is the whole transaction's."""
    mark = len(tx.undo)
    created = len(tx.created)
    tx.depth += 1
    try:
        return fn(*args, **kwargs)
    except (_Conflict, _RetrySignal):
        raise
    except BaseException:
        tx._rollback(mark, created)
        raise
    finally:
        tx.depth -= 1


def _run(tx, fn, args, kwargs, deadline, poll=False, timed=None):
    """The transaction loop of an outermost atomically (tx not running).
    ``timed``: a dict for the deadlines of nested timed calls (tx.timed) that
    outlives this run (atomically_async re-runs a waiting transaction)."""
    if not callable(fn):
        raise TypeError("atomically() needs a callable, not %s" % type(fn).__name__)
    if not tx.clean:
        tx._reset()                     # the last one's cleanup was cut short
    tx.clean = False
    tx.epoch += 1
    if tx.timed is not timed:
        tx.timed = timed
    conflicts = 0
    try:
        while True:
            try:
                # running is set (and undone) in C around the call.
                result = _call(tx, _active, fn, args, kwargs)
            except _Conflict:
                tx._end(AB_SILENT)
            except _RetrySignal:
                tx._block(deadline, poll)
                tx.clean = False                # (a transaction run in the wait cleared it)
                continue
            except Exception:
                if tx.doomed is not True:
                    raise
                tx._end(AB_SILENT)      # failed on a view we cannot trust: re-run
            else:
                done = tx._commit()
                if done:
                    tx.clean = True
                    return result
                if done is None:
                    continue            # interrupted wait, not a conflict: no backoff
            conflicts += 1
            _backoff(conflicts)
            if conflicts == IRREVOCABLE_AFTER and tx.ctx is not None and tx.ctx.ptr is not None:
                lib.shmstm_tx_irrevocable(tx.ptr, -1)
    except BaseException:
        # Ends the attempt now (the irrevocable token, the C context's
        # writes).  If another asynchronous exception cuts this short, clean
        # stays False and the thread's next transaction resets (_reset).
        tx._end(AB_USER)
        tx.clean = True
        raise


def _run_until(f, args, kwargs, deadline, timed):
    """An outermost transaction whose retry() waits until ``deadline``
    (time.monotonic()) at most, then raises _PollExpired (atomically_async,
    which passes the same ``timed`` dict to each run of one transaction)."""
    tx = _get_tx()
    if tx is None:
        tx = _Tx()
        _set_tx(tx)
    elif tx.running:
        raise errors.Error("atomically_async() inside a transaction")
    elif tx.busy:
        return _reentered(tx, f, args, kwargs, deadline, True, timed)
    return _busy(tx, _run, (tx, f, args, kwargs, deadline, True, timed))


def _run_with_timeout(f, args, kwargs, timeout):
    tx = _get_tx()
    if tx is None:
        tx = _Tx()
        _set_tx(tx)
    elif tx.running:
        # Joins the outer transaction; if it retries, the transaction's wait
        # ends by this call's deadline (from its first retry in it) at most.
        try:
            return _nested(tx, f, args, kwargs)
        except _RetrySignal:
            if tx.timed is None:
                tx.timed = {}
            tx.timed.setdefault(f, time.monotonic() + timeout)
            raise
    elif tx.busy:
        return _reentered(tx, f, args, kwargs, time.monotonic() + timeout)
    return _busy(tx, _run, (tx, f, args, kwargs, time.monotonic() + timeout))


def atomic(fn=None, *, timeout=None, durability=None):
    """Decorator: every call of the function runs atomically.

    ``@atomic`` or ``@atomic(timeout=seconds)``: with a timeout, a call that
    stays blocked in ``retry()`` longer than that raises ``RetryTimeout``.
    ``@atomic(durability="sync")`` (or "async"): the commit of each call uses
    that durability mode on a durable runtime (see ``shmstm.durability``)."""
    if durability is not None:
        dm = _durability
        dm(durability)                  # validates the mode now
        inner = atomic(timeout=timeout)

        def wrap_d(f):
            g = inner(f)

            def call_d(*args, **kwargs):
                with dm(durability):
                    return g(*args, **kwargs)
            call_d.__name__ = g.__name__
            call_d.__qualname__ = g.__qualname__
            call_d.__doc__ = g.__doc__
            call_d.__wrapped__ = f
            return call_d
        return wrap_d(fn) if fn is not None else wrap_d
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise TypeError("timeout must be a number of seconds, not %s" % type(timeout).__name__)
        if timeout < 0 or timeout != timeout:
            raise ValueError("timeout must be a non-negative number of seconds")

    def wrap(f):
        if not callable(f):
            raise TypeError("atomic() decorates a callable, not %s" % type(f).__name__)

        if timeout is None:
            def call(*args, **kwargs):
                return atomically(f, *args, **kwargs)
        else:
            def call(*args, **kwargs):
                return _run_with_timeout(f, args, kwargs, timeout)
        call.__name__ = getattr(f, "__name__", "atomic")
        call.__qualname__ = getattr(f, "__qualname__", call.__name__)
        call.__doc__ = getattr(f, "__doc__", None)
        call.__wrapped__ = f
        return call

    if fn is not None:
        return wrap(fn)
    return wrap


def retry():
    """Abandon the transaction and block until a TVar it read changes, then
    re-run it."""
    if _current() is None:
        raise errors.NotInTransactionError("retry() outside a transaction")
    raise _RetrySignal()


def check(cond):
    """``retry()`` unless ``cond`` is true (inside a transaction only)."""
    if _current() is None:
        raise errors.NotInTransactionError("check() outside a transaction")
    if not cond:
        raise _RetrySignal()


def or_else(*branches):
    """Run the first branch (a no-argument callable) as a nested transaction;
    if it calls retry(), undo its writes (keeping what it read, so a change
    to it wakes the transaction) and run the next.  Retries only if every
    branch retries.  Returns the result of the branch that finished."""
    tx = _current()
    if tx is None:
        raise errors.NotInTransactionError("or_else() outside a transaction")
    if not branches:
        raise TypeError("or_else() needs at least one branch")
    for b in branches:
        if not callable(b):
            raise TypeError("or_else() branches must be callables, not %s" % type(b).__name__)
    for b in branches[:-1]:
        mark = len(tx.undo)
        created = len(tx.created)
        tx.depth += 1
        try:
            return b()
        except _RetrySignal:
            tx._rollback(mark, created)
        finally:
            tx.depth -= 1
    return branches[-1]()


def in_transaction():
    """True inside ``atomically`` in this thread."""
    return _current() is not None


def _after_fork_child():
    """In a fork child: the forking thread's transaction, if one is running,
    is the parent's (the runtimes' contexts: shm/runtime.py)."""
    tx = _get_tx()                  # the forking thread's transaction object
    _active.clear()
    if tx is not None and tx.running:
        # Forked inside a transaction: the child must commit nothing of it.
        # Its writes are dropped and every TVar access, and the commit, raise
        # ForkedContextError (_bind, _commit); _active keeps it, so that reads
        # do not take the no-transaction path.
        _active.add(tx)
        tx.writes.clear()
        del tx.undo[:]
        tx.created = []
        tx.nonint = 0
        tx.rt = _FORKED
        tx.brt = None
    elif tx is not None:
        tx.brt = None               # the parent's context: never bound again here


os.register_at_fork(after_in_child=_after_fork_child)
