"""Runtimes, TVars and transactions.

One module on purpose: the hot path (``TVar.value``, ``atomically``) reads
module globals and calls ``lib`` directly, which is measurably faster than
going through another module.  Everything else reaches the core through
``_binding``.

Per thread and runtime there is one *context* (a C ``shmstm_ctx`` that owns a
process slot in the segment).  A transaction binds to one runtime at its first
TVar access.
"""
import atexit
import os
import pickle
import random
import threading
import time
import types
import weakref

import posix_ipc

from . import errors
from . import _segments
from ._binding import _fast, address as _address, check as _check_rc, error_for, ffi, lib

__all__ = [
    "Runtime", "TVar", "open", "unlink", "atomically", "atomic", "retry",
    "check", "or_else", "in_transaction",
]

# ---- codec tags (native/layout.h) ----
T_NONE = lib.SHMSTM_TAG_NONE
T_FALSE = lib.SHMSTM_TAG_FALSE
T_TRUE = lib.SHMSTM_TAG_TRUE
T_INT = lib.SHMSTM_TAG_INT
T_FLOAT = lib.SHMSTM_TAG_FLOAT
T_BYTES = lib.SHMSTM_TAG_BYTES
T_STR = lib.SHMSTM_TAG_STR
T_PICKLE = lib.SHMSTM_TAG_PICKLE
T_FREE = -1          # write-buffer marker: the transaction frees the TVar

E_CONFLICT = lib.SHMSTM_ECONFLICT
E_INTR = lib.SHMSTM_EINTR
E_TIMEOUT = lib.SHMSTM_ETIMEOUT
E_INVAL = lib.SHMSTM_EINVAL
E_CLOSED = lib.SHMSTM_ECLOSED
AB_USER = lib.SHMSTM_AB_USER
AB_RESOURCE = lib.SHMSTM_AB_RESOURCE
AB_SILENT = 255

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
PICKLE_PROTOCOL = 5

# Conflicts before a transaction takes the irrevocable token.
IRREVOCABLE_AFTER = 32

_read1 = lib.shmstm_read1
_stage_i = lib.shmstm_tx_stage_i
_stage_f = lib.shmstm_tx_stage_f
_stage_b = lib.shmstm_tx_stage_b
# The hot calls keep the GIL (shmstm._fast; native/fast.h): they take the
# addresses of the context and of the TVar's shmstm_ref as ints.
_peek = _fast.peek
_readv = _fast.readv
_fcommit = _fast.commit
MISS = lib.SHMSTM_READ_MISS       # "not answered by the fast path"
_unpack = ffi.unpack
_loads = pickle.loads
_dumps = pickle.dumps

DEFAULT_LIMITS = {                  # a new segment's (shmstm.h)
    "max_tvars": lib.SHMSTM_DEFAULT_MAX_TVARS,
    "heap_size": lib.SHMSTM_DEFAULT_HEAP,
    "max_procs": lib.SHMSTM_DEFAULT_MAX_PROCS,
    "max_value_size": lib.SHMSTM_DEFAULT_MAX_VALUE,
}

_WAIT_FOR_INIT_NS = 5_000_000_000

# Seconds the last close() of a durable runtime waits for its commits to reach
# LMDB by default (Runtime.close).
CLOSE_FLUSH_TIMEOUT = 30.0


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



# ---------------------------------------------------------------- codec

_too_large = ("%s of %d bytes exceeds max_value_size=%d, which is fixed when the runtime is "
              "created (unlink it and open it again with a larger one)")


def _encode(value, max_size):
    """(tag, payload) for a value: payload is an int/float for inline tags and
    bytes otherwise.  Raises before anything shared changes."""
    t = type(value)
    if t is int:
        if INT64_MIN <= value <= INT64_MAX:
            return T_INT, value
    elif t is float:
        return T_FLOAT, value
    elif value is None:
        return T_NONE, 0
    elif t is bool:
        return (T_TRUE if value else T_FALSE), 0
    elif t is bytes:
        if len(value) > max_size:
            raise errors.ValueTooLargeError(_too_large % ("value", len(value), max_size))
        return T_BYTES, value
    elif t is str:
        b = value.encode("utf-8", "surrogatepass")
        if len(b) > max_size:
            raise errors.ValueTooLargeError(_too_large % ("value", len(b), max_size))
        return T_STR, b
    try:
        b = _dumps(value, PICKLE_PROTOCOL)
    except Exception as e:
        raise errors.EncodeError("cannot store a %s in a TVar: %s" % (t.__name__, e)) from e
    if len(b) > max_size:
        raise errors.ValueTooLargeError(_too_large % ("pickled value", len(b), max_size))
    return T_PICKLE, b


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
        data = _unpack(ctx.ptr.buf, ctx.out[1])
        if tag == T_BYTES:
            return data
        try:
            if tag == T_STR:
                return data.decode("utf-8", "surrogatepass")
            return _loads(data)
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
            raise _undecodable(tag, e) from e
    if tag == E_CONFLICT:
        raise _Conflict()
    raise error_for(tag)


def _undecodable(tag, e):
    """A value block whose bytes are not a value of its tag: only a corrupted
    segment (or LMDB file) holds one, since values are encoded when written."""
    what = "str" if tag == T_STR else "pickled value"
    return errors.CorruptSegmentError("a stored %s cannot be decoded (%s: %s): the data is "
                                      "corrupt" % (what, type(e).__name__, e))


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


# ---------------------------------------------------------------- contexts

class _Ctx(_fast.Ctx):
    """A thread's context on a runtime: the C context (one process slot) and
    its out-parameters, allocated once (never an ffi.new per operation).

    The base class (shmstm._fast.Ctx, native/pyfast.c) owns the C context:
    ``claim`` takes it and ``release`` gives it back, each in one C call that
    clears ``ptr``/``out``/``outf`` with it, and the object's death gives it
    back too.  So an asynchronous exception at any bytecode can neither free
    it twice nor lose it: a context dropped half-made, or left by a thread
    that ended (its threading.local and its _Tx are the only strong
    references; Runtime._ctxs is weak), is given back when the object dies,
    and close() (shmstm_seg_detach) gives back any that is still alive.
    ``addr`` is the context's address for shmstm._fast (0 once released)."""
    __slots__ = ("rt", "sync", "__weakref__")

    def __init__(self, rt):
        self.rt = rt
        self.sync = 0               # durable sync commits (the C context's dsync; close())


class _Local(threading.local):
    ctx = None


# ---------------------------------------------------------------- runtime

_registry = {}                 # name -> Runtime attached (or lazily attachable) here
_registry_lock = threading.RLock()


def _shm_name(name):
    return "/shmstm." + name


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError("runtime name must be a str, not %s" % type(name).__name__)
    if not name or len(name) > 200 or "/" in name or "\0" in name:
        raise ValueError("runtime name must be 1-200 characters without '/' or NUL: %r" % (name,))


class Runtime:
    """A shmstm runtime attached in this process.  Create with ``shmstm.open``.

    Use as a context manager or call ``close()``; closing detaches this
    process only (the segment stays until ``shmstm.unlink``)."""

    def __init__(self, name):
        self.name = name
        # The mapped segment (NULL while not attached): the only place it is
        # kept, so that shmstm._fast.detach takes it out and unmaps it in one
        # call.  Every TVar's shmstm_ref points here, so a read after close()
        # misses.  Read it as self._seg.
        self._segbox = ffi.new("shmstm_seg *[1]")
        self._boxaddr = _address(self._segbox)
        self._params = None
        self._local = _Local()
        self._ctxs = weakref.WeakSet()   # every live _Ctx of this process (weak: see _Ctx)
        self._lock = threading.RLock()
        self._waits = threading.Condition(self._lock)
        # Waits of this process's threads in the core (retry(), a sync
        # commit, flush()) that close() must interrupt and wait for: one token
        # each, added by _wait_begin and discarded by the waiter's finally in
        # one C call (set.discard), so an asynchronous exception can neither
        # leave a token behind nor drop one twice.
        self._waiters = set()
        self._refs = 0
        self._closed = False
        self._pid = os.getpid()
        self._durable = None       # a _durable.Durable when opened with a path
        self._created = False

    # -- attach / detach

    def _attach(self, limits, create_limits=None, wait_ns=None, create=True, durable=None,
                must_create=False, not_found_hint="; open it with shmstm.open()"):
        """Attach to the segment, creating it first when ``create`` (open());
        a lazy attach (an unpickled runtime) passes create=False, so it can
        never re-create a segment that was unlinked.  ``must_create``:
        RuntimeExistsError if the segment exists (open(create=True))."""
        if wait_ns is None:
            wait_ns = _WAIT_FOR_INIT_NS      # read at call time (tests lower it)
        # The core fills params and the box together, on success only; params
        # is in place first, so no bytecode sees the segment without it.
        params = self._params = ffi.new("shmstm_params *")
        segp = self._segbox
        shm_name = _shm_name(self.name)
        for _ in range(3):
            # Created under a temporary name and linked into place once complete
            # (_segments.create_segment): the name never shows a half-made segment.
            # A durable create also fills the ring size, LMDB's runtime id and clock.
            fill = None if durable is None else \
                (lambda prm: _durable_mod().Durable.fill_params(prm, durable))
            if create and not os.path.exists(_segments.SHM_DIR + shm_name) and \
                    _segments.create_segment(self.name, create_limits or _creation_limits(limits),
                                             params, segp, fill):
                self._created = True
                break
            if must_create:
                raise _exists_error(self.name, "its segment %s is in /dev/shm" % shm_name)
            try:
                shm = posix_ipc.SharedMemory(shm_name, 0)
            except posix_ipc.ExistentialError:
                if not create:
                    raise errors.SegmentNotFoundError(
                        "runtime %r does not exist (unlinked, or never created)%s"
                        % (self.name, not_found_hint)) from None
                continue            # unlinked between our two opens: create again
            except posix_ipc.PermissionsError as e:
                raise errors.PermissionDeniedError(
                    "cannot attach to %s: %s (another user's segment?)" % (shm_name, e)) from None
            try:
                rc = lib.shmstm_seg_attach(shm.fd, 0, wait_ns, params, segp)
            finally:
                shm.close_fd()
            if rc < 0:
                raise error_for(rc, "attaching to runtime %r" % self.name)
            mismatch = [
                "%s=%d (segment has %d)" % (k, v, getattr(params, k))
                for k, v in sorted(limits.items()) if getattr(params, k) != v
            ]
            if mismatch:
                _fast.detach(self._boxaddr)
                raise errors.LimitMismatchError(
                    "runtime %r exists with other limits: %s" % (self.name, ", ".join(mismatch)))
            break
        else:
            raise errors.Error("runtime %r: segment kept vanishing while opening" % self.name)
        self._pid = os.getpid()

    @property
    def _max_value_size(self):
        p = self._params
        if p is None or self._seg is None:
            self._ensure()
            p = self._params
        return p.max_value_size

    @property
    def _seg(self):
        """The mapped segment (a cffi pointer), or None while not attached."""
        s = self._segbox[0]
        return None if s == ffi.NULL else s

    def _ensure(self):
        if self._seg is None:
            with self._lock:
                if self._closed:
                    raise errors.RuntimeClosedError("runtime %r is closed" % self.name)
                if self._seg is None:
                    self._attach({}, create=False)
                    _adopt_durable(self)

    def _new_ctx(self):
        """The calling thread's context, creating it (and claiming a slot)."""
        if self._closed:
            raise errors.RuntimeClosedError("runtime %r is closed" % self.name)
        self._ensure()
        ctx = _Ctx(self)
        with self._lock:
            if self._closed:            # by another thread meanwhile
                raise errors.RuntimeClosedError("runtime %r is closed" % self.name)
            # From here the object owns the context: dropped at any bytecode,
            # it gives it back (see _Ctx).
            rc = ctx.claim(_address(self._segbox[0]))
            if rc < 0:
                raise self._error(rc, "runtime %r" % self.name)
            ptr = ffi.cast("shmstm_ctx *", ctx.addr)
            ctx.out = ptr.out           # views of the context's own out-words
            ctx.outf = ffi.cast("double *", ptr.out)
            ctx.ptr = ptr               # last: a ctx with ptr set is complete
            self._ctxs.add(ctx)
        if self._durable is not None:
            self._durable.on_new_ctx(ctx)   # before the thread uses it
        self._local.ctx = ctx
        return ctx

    def _ctx(self):
        ctx = self._local.ctx
        if ctx is None or ctx.ptr is None:
            return self._new_ctx()
        return ctx

    def _wait_begin(self, tok, on_closed=None, arg=None):
        """Register the wait ``tok`` (a new object) in the core, which close()
        from another thread interrupts and waits for; on a closed runtime, run
        ``on_closed(arg)`` under the lock and raise RuntimeClosedError.  The
        caller discards the token in a ``finally`` that begins before this
        call: ``self._waiters.discard(tok)``."""
        with self._lock:
            if self._closed:
                if on_closed is not None:
                    on_closed(arg)
                raise errors.RuntimeClosedError("runtime %r is closed" % self.name)
            self._waiters.add(tok)

    def close(self, timeout=CLOSE_FLUSH_TIMEOUT):
        """Detach this process from the runtime (idempotent).  ``open()`` is
        counted per process: the last ``close()`` detaches.

        For a durable runtime the last ``close()`` first waits, at most
        ``timeout`` seconds (None: no limit), until the flusher has written
        every commit this process made to LMDB (``flush()``); if it cannot,
        the runtime is closed all the same and ``DurabilityError`` says which
        commits are not yet durable (they stay in the segment's commit ring,
        which the flusher drains while the segment exists).

        Threads of this process blocked in retry() on it are woken and raise
        RuntimeClosedError, and those waiting for a sync commit's flush raise
        DurabilityError (committed, not known durable); close waits until they
        have left the core.  Other threads must not be inside a transaction
        on it.

        Interrupted (KeyboardInterrupt, a signal handler that raises), it
        can be called again: it finishes what the interrupted call began."""
        unflushed = None
        flushed = False
        while True:
            with _registry_lock:
                with self._lock:
                    flush_now = False
                    if not self._closed:
                        if self._refs > 1:
                            self._refs -= 1
                            return
                        # The last handle: a durable runtime's commits first
                        # (decided here, under the lock, so that two threads
                        # closing at once cannot both skip it).
                        flush_now = not flushed and self._durable is not None and \
                            self._seg is not None and _current() is None
                        if not flush_now:
                            self._closed = True
                    if not flush_now:
                        self._teardown()
                        break
            flushed = True
            try:
                self.flush(timeout)             # counted: a concurrent teardown waits for it
            except (errors.DurabilityError, errors.RuntimeClosedError) as e:
                if not self._closed:            # else another thread closed it meanwhile
                    unflushed = e
        if unflushed is not None:
            raise errors.DurabilityError("runtime %r closed; %s" % (self.name, unflushed))

    def flush(self, timeout=None):
        """Wait until every commit this process made on this durable runtime
        is in LMDB (a barrier for ``durability="async"`` commits); returns at
        once for a runtime without durability.  ``DurabilityError`` if the
        flusher cannot write them (a full map, an I/O error) or, with a
        ``timeout`` in seconds, if they are not written in time; the commits
        stay in the segment's commit ring either way."""
        if _current() is not None:
            raise errors.Error("flush() inside a transaction would wait for itself")
        if timeout is not None and (not isinstance(timeout, (int, float)) or
                                    isinstance(timeout, bool) or not timeout >= 0):
            raise ValueError("timeout must be a non-negative number of seconds or None")
        self._ensure()
        d = self._durable
        if d is None:
            return
        tok = object()
        try:
            self._wait_begin(tok)           # close() from another thread waits for us
            d.flush(timeout)
        finally:
            self._waiters.discard(tok)

    def _teardown(self):
        """Give back everything this process holds of the runtime (close();
        _registry_lock and self._lock held).  Every step is idempotent, so an
        interrupted teardown is finished by the next close()."""
        if self._waiters:
            mine = self._local.ctx
            for ctx in list(self._ctxs):
                p = ctx.ptr
                if ctx is not mine and p is not None:
                    lib.shmstm_ctx_interrupt(p)
            while self._waiters:
                self._waits.wait(0.05)  # releases self._lock, not _registry_lock
        if self._durable is not None:
            self._durable.close()
        # Gives back the slot of every context of this process (each thread's,
        # and any a traceback may hold), then unmaps.  The contexts' memory
        # stays with their owners (freed when each object dies), so a thread
        # that still uses one gets RuntimeClosedError (SHMSTM_ECLOSED), never
        # freed memory.
        _fast.detach(self._boxaddr)
        self._local = _Local()
        if _registry.get(self.name) is self:
            del _registry[self.name]

    @property
    def closed(self):
        """True once close() has detached this process (the last handle)."""
        return self._closed

    @property
    def created(self):
        """True if this process created the runtime's segment when it
        attached (open() created it), False if it attached to an existing one."""
        return self._created

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else ("attached" if self._seg is not None else "lazy")
        return "<shmstm.Runtime %r %s>" % (self.name, state)

    def __reduce__(self):
        return (_runtime_from_pickle, (self.name,))

    # -- limits

    @property
    def limits(self):
        """The segment's limits (dict)."""
        self._ensure()
        p = self._params
        return {
            "max_tvars": p.max_tvars, "heap_size": p.heap_size,
            "max_procs": p.max_procs, "max_value_size": p.max_value_size,
        }

    # -- TVars

    def tvar(self, name, default=None):
        """The TVar named ``name``, created with ``default`` if it does not exist
        (atomic across processes: exactly one creator wins).  ``lookup(name)``
        finds one without creating it."""
        b = _name_bytes(name)
        ctx = self._ctx()
        oi = ffi.new("uint32_t[2]")
        rc = lib.shmstm_tvar_lookup(ctx.ptr, b, len(b), oi, oi + 1)
        if rc == lib.SHMSTM_ENOTFOUND:
            tag, payload = _encode(default, self._max_value_size)
            rc = _new_call(lib.shmstm_tvar_named, ctx.ptr, (b, len(b)), tag, payload, oi)
        if rc < 0:
            raise self._error(rc, "TVar %r" % name)
        return TVar(self, oi[0], oi[1], name)

    def lookup(self, name):
        """The existing TVar named ``name``; ``KeyError`` if there is none
        (``tvar()`` would create it)."""
        b = _name_bytes(name)
        ctx = self._ctx()
        oi = ffi.new("uint32_t[2]")
        rc = lib.shmstm_tvar_lookup(ctx.ptr, b, len(b), oi, oi + 1)
        if rc == lib.SHMSTM_ENOTFOUND:
            raise KeyError(name)
        _check_rc(rc, "TVar %r" % name)
        return TVar(self, oi[0], oi[1], name)

    _LIMIT_HINTS = {
        lib.SHMSTM_ETVARSFULL: ("max_tvars", "TVars"),
        lib.SHMSTM_EDIRFULL: ("max_tvars", "TVars"),
        lib.SHMSTM_EHEAPFULL: ("heap_size", "bytes of values"),
        lib.SHMSTM_EPROCSFULL: ("max_procs", "process slots (one per thread and process)"),
    }

    def _error(self, rc, what):
        """The exception for core code ``rc``; a full table, heap or slot
        table names the limit, its value and the way out."""
        if rc == lib.SHMSTM_EDURABLE and self._durable is not None and self._seg is not None:
            info = ffi.new("shmstm_ring_info *")
            lib.shmstm_ring_info_get(self._seg, info)
            if info.durable_error == lib.SHMSTM_EFOREIGN:
                return errors.DurabilityMismatchError("%s: commit refused: %s" % (
                    what, _durable_mod().flusher_error_text(info.durable_error)))
        e = error_for(rc, what)
        hint = self._LIMIT_HINTS.get(rc)
        p = self._params
        if hint is None or p is None:
            return e
        key, unit = hint
        extra = {"max_tvars": "free the anonymous TVars you no longer need (named ones stay), or ",
                 "heap_size": "free TVars you no longer need, or ",
                 "max_procs": "let threads that no longer use it end (each gives its slot back), "
                              "or "}[key]
        durable = (" (a durable runtime's named TVars come back from LMDB)"
                   if self._durable is not None else "")
        return type(e)(
            "%s: %s=%d %s reached; limits are fixed when the runtime is created: %sclose "
            "it everywhere, shmstm.unlink(%r) and open it again with a larger %s%s"
            % (what, key, getattr(p, key), unit, extra, self.name, key, durable))

    def _describe(self, idx):
        """A TVar for an error message: its name, or its index."""
        seg = self._seg
        if seg is not None:
            buf = ffi.new("char[]", lib.SHMSTM_MAX_NAME + 1)
            n = lib.shmstm_seg_name_of(seg, idx, buf, lib.SHMSTM_MAX_NAME + 1)
            if n >= 0:
                return "TVar %r" % ffi.buffer(buf, n)[:].decode("utf-8", "surrogatepass")
        return "anonymous TVar #%d" % idx

    def names(self):
        """The names of the runtime's named TVars, sorted (a snapshot)."""
        self._ensure()
        seg = self._seg
        cap = 1024
        while True:
            idx = ffi.new("uint32_t[]", cap)
            n = _check_rc(lib.shmstm_seg_named(seg, idx, cap), "runtime %r" % self.name)
            if n <= cap:
                break
            cap = n
        buf = ffi.new("char[]", lib.SHMSTM_MAX_NAME + 1)
        out = []
        for i in range(n):
            k = _check_rc(lib.shmstm_seg_name_of(seg, idx[i], buf, lib.SHMSTM_MAX_NAME + 1),
                          "runtime %r: TVar #%d" % (self.name, idx[i]))
            out.append(ffi.buffer(buf, k)[:].decode("utf-8", "surrogatepass"))
        return sorted(out)

    def new_tvar(self, value=None):
        """A new anonymous TVar holding ``value``.  Inside a transaction it
        exists only if the transaction commits."""
        tag, payload = _encode(value, self._max_value_size)
        tx = _current()
        if tx is not None:
            tx._bind(self)              # raises before anything is created
        ctx = self._ctx()
        oi = ffi.new("uint32_t[2]")
        rc = _new_call(lib.shmstm_tvar_new, ctx.ptr, (), tag, payload, oi)
        if rc < 0:
            raise self._error(rc, "new TVar")
        tv = TVar(self, oi[0], oi[1], None)
        if tx is not None:
            tx.created.append(tv)
        return tv

    def free(self, tv):
        """Free an anonymous TVar (effective when the transaction commits)."""
        tv.free()

    def stats(self):
        """Counters and facts read from the segment (no lock taken): the same
        document as ``shmstm-stats --json`` (schema in docs/stats.md)."""
        from ._stats import runtime_stats
        self._ensure()
        st = runtime_stats(self._seg, self.name, self._params.ring_slots)
        if self._durable is not None:       # this process knows the mode and path
            st["durability"] = self._durable.stats()
        return st


def _name_bytes(name):
    if not isinstance(name, str):
        raise TypeError("TVar name must be a str, not %s" % type(name).__name__)
    b = name.encode("utf-8", "surrogatepass")
    if not 0 < len(b) <= lib.SHMSTM_MAX_NAME:
        raise ValueError("TVar name must be 1-%d bytes of UTF-8" % lib.SHMSTM_MAX_NAME)
    return b


def _new_call(fn, cptr, name_args, tag, payload, oi):
    if tag == T_FLOAT:
        return fn(cptr, *name_args, tag, 0, payload, ffi.NULL, 0, oi, oi + 1)
    if tag >= T_BYTES:
        return fn(cptr, *name_args, tag, 0, 0.0, payload, len(payload), oi, oi + 1)
    return fn(cptr, *name_args, tag, payload, 0.0, ffi.NULL, 0, oi, oi + 1)


def _creation_limits(limits):
    """The limits a new segment gets: the defaults, with max_value_size capped
    at a quarter of the heap unless given."""
    lim = dict(DEFAULT_LIMITS)
    lim.update(limits)
    if "max_value_size" not in limits:
        lim["max_value_size"] = min(DEFAULT_LIMITS["max_value_size"], lim["heap_size"] // 4)
    return lim


def _runtime_from_pickle(name):
    with _registry_lock:
        rt = _registry.get(name)
        if rt is None or rt._closed:
            rt = Runtime(name)         # attaches lazily, on first use
            rt._refs = 1
            _registry[name] = rt
        return rt


def _durable_mod():
    from . import _durable
    return _durable


def _adopt_durable(rt):
    """A segment with a commit ring attached without a path (unpickled, or
    open() without one): async mode, the path stored in the segment."""
    if rt._params.ring_slots and rt._durable is None:
        d = _durable_mod().Durable(rt, None, "async")
        rt._durable = d
        d.after_attach(False)


def open(name, path=None, *, create=None, durability=None, ring_slots=None, map_size=None,  # noqa: A001
         **limits):
    """Create the runtime ``name`` or attach to it if it exists.

    ``create``: None (the default) creates it or attaches to it; True must
    create it (``RuntimeExistsError``, a ``FileExistsError``, if it exists,
    in this process or any other); False must attach to an existing one
    (``SegmentNotFoundError``).  ``Runtime.created`` says whether this
    process created it.

    Limits (keyword arguments): ``max_tvars`` (65536), ``heap_size`` (64 MiB),
    ``max_procs`` (64 process/thread slots), ``max_value_size`` (1 MiB, at
    most a quarter of the heap by default).
    Given limits must match an existing segment's (``LimitMismatchError``).

    ``path``: a directory for the durable copy (LMDB) of the named TVars; a
    flusher process keeps it up to date (docs/durability.md).  ``durability``:
    "async" (the default with a path) or "sync" (a commit returns once it is
    in LMDB); "none" without a path.  ``ring_slots``: commit ring size of a
    new durable segment (default max(65536, 4 * (max_procs + 1))).
    ``map_size``: the LMDB map size in bytes, stored in the data by the first
    opener that gives one (until then 16 GiB, sparse); a larger value raises
    it (the remedy for a full map), a smaller one is refused.
    """
    _check_name(name)
    if create not in (None, True, False):
        raise TypeError("create must be None, True or False, not %r" % (create,))
    if durability is None:
        durability = "async" if path is not None else "none"
    if durability not in ("none", "async", "sync"):
        raise ValueError("durability must be 'none', 'async' or 'sync', not %r" % (durability,))
    if durability == "none" and path is not None:
        raise ValueError("durability='none' with a path: use 'async' or 'sync'")
    if path is not None or durability != "none":
        if map_size is not None:
            _durable_mod()._check_map_size(map_size)    # before anything is created
        if create is True and path is None:
            raise ValueError("creating a durable runtime needs path=, the directory of its "
                             "LMDB data")
        return _open_durable(name, path, durability, ring_slots, map_size, limits, create)
    if ring_slots is not None:
        raise ValueError("ring_slots needs a path (a durable runtime)")
    if map_size is not None:
        raise ValueError("map_size needs a path (a durable runtime)")
    return _open_plain(name, limits, create)


def _check_limits(limits):
    for k, v in limits.items():
        if k not in DEFAULT_LIMITS:
            raise TypeError("open() got an unknown limit %r (known: %s)" % (k, ", ".join(DEFAULT_LIMITS)))
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError("limit %s must be an int, not %s" % (k, type(v).__name__))
        if v <= 0:
            raise ValueError("limit %s must be positive, got %r" % (k, v))
    lim = _creation_limits(limits)
    heap = lim["heap_size"]
    if not lib.SHMSTM_MIN_HEAP <= heap <= lib.SHMSTM_MAX_HEAP or heap % lib.SHMSTM_HEAP_UNIT:
        raise ValueError("heap_size must be a multiple of %d from %d to %d bytes, got %d" % (
            lib.SHMSTM_HEAP_UNIT, lib.SHMSTM_MIN_HEAP, lib.SHMSTM_MAX_HEAP, heap))
    if lim["max_value_size"] > min(heap // 2, lib.SHMSTM_MAX_VALUE):
        raise ValueError("max_value_size must be at most heap_size / 2 and %d, got %d"
                         % (lib.SHMSTM_MAX_VALUE, lim["max_value_size"]))
    if lim["max_procs"] > lib.SHMSTM_MAX_PROCS:
        raise ValueError("max_procs must be at most %d" % lib.SHMSTM_MAX_PROCS)
    if lim["max_tvars"] > lib.SHMSTM_MAX_TVARS:
        raise ValueError("max_tvars must be at most %d" % lib.SHMSTM_MAX_TVARS)
    return lim


def _open_durable(name, path, mode, ring_slots, map_size, limits, create=None):
    """open() with a path or a durability mode: a runtime of its own (not
    shared with plain open() calls in this process)."""
    lim = _check_limits(limits)
    with _registry_lock:
        old = _registered(name)
        if old is not None and old._pid == os.getpid():
            if create is True:
                raise _exists_error(name, "open in this process")
            return _reopen_durable(old, path, mode, map_size, limits)
    if path is None or create is False:
        if map_size is not None and path is None:
            raise ValueError("map_size needs the path of the durable data")
        prep = None         # attach only: the segment knows its path
    else:
        lim2 = dict(lim, ring_slots=ring_slots)
        prep = _durable_mod().Durable.prepare(name, path, lim2, map_size)
    with _registry_lock:
        old = _registered(name)         # another thread may have opened it meanwhile
        if old is not None and old._pid == os.getpid():
            if create is True:
                raise _exists_error(name, "open in this process")
            return _reopen_durable(old, path, mode, map_size, limits)
        rt = _register_new(name)
        hint = (" and open(create=False) only attaches" if create is False else
                "; a durable runtime is created by open() with path=, the directory of its "
                "LMDB data")
        try:
            rt._attach(limits, lim, create=prep is not None, durable=prep,
                       must_create=create is True, not_found_hint=hint)
        except BaseException:
            _unregister_unattached(rt)
            raise
        rt._durable = _durable_mod().Durable(rt, path, mode)
        try:
            rt._durable.after_attach(rt._created)
        except BaseException:
            created = rt._created
            rt._refs = 1
            rt.close()
            if created:
                unlink(name, discard=True)      # a half-loaded segment must not stay
            raise
        rt._refs = 1
        _registry[name] = rt
        return rt


def _reopen_durable(rt, path, mode, map_size, limits):
    """open() with durability of a runtime already open in this process (also
    one inherited across fork, or one unpickled but not attached yet): the
    same Runtime, if it agrees."""
    rt._ensure()                   # a lazy one attaches now (and adopts the ring)
    d = rt._durable
    if d is None:
        raise errors.DurabilityMismatchError(
            "runtime %r is open in this process without durability (its segment has no "
            "commit ring); it cannot be opened with durability=%r: close it everywhere, "
            "shmstm.unlink(%r) and open it with path=" % (rt.name, mode, rt.name))
    if path is not None and os.path.realpath(path) != os.path.realpath(d.path):
        raise errors.DurabilityMismatchError(
            "runtime %r keeps its durable data at %r, not %r" % (rt.name, d.path, path))
    if mode != d.mode:
        raise errors.DurabilityMismatchError(
            "runtime %r is already open in this process with durability=%r, not %r: open it "
            "with the same mode, and choose the mode of some commits with "
            "shmstm.durability(%r) or @shmstm.atomic(durability=%r)" % (
                rt.name, d.mode, mode, mode, mode))
    _check_same_limits(rt, limits)
    if map_size is not None:
        _durable_mod().open_env(d.path, map_size=map_size)
    rt._ctx()                      # hold a slot while open: the flusher waits for us
    d.ensure_flusher()
    rt._refs += 1
    return rt


def _check_same_limits(rt, limits):
    if limits:
        have = rt.limits
        bad = ["%s=%d (segment has %d)" % (k, v, have[k]) for k, v in sorted(limits.items()) if have[k] != v]
        if bad:
            raise errors.LimitMismatchError(
                "runtime %r exists with other limits: %s" % (rt.name, ", ".join(bad)))


def _registered(name):
    """The runtime ``name`` registered in this process and not closed, or
    None; one whose close() was interrupted is closed for good first
    (_registry_lock held)."""
    rt = _registry.get(name)
    if rt is not None and rt._closed:
        with rt._lock:
            rt._teardown()
        rt = None
    return rt


def _register_new(name):
    """A new Runtime registered before it holds anything (_registry_lock
    held), so that an open() interrupted at any bytecode leaves whatever it
    took where the next open(), close() or the exit finds it."""
    rt = Runtime(name)
    _registry[name] = rt
    return rt


def _unregister_unattached(rt):
    if rt._seg is None and _registry.get(rt.name) is rt:
        del _registry[rt.name]


def _exists_error(name, where):
    if where == "open in this process":
        return errors.RuntimeExistsError(
            "runtime %r exists (open in this process) and open(create=True) must create it: "
            "close it and shmstm.unlink(%r) first, or open it with create=None to attach"
            % (name, name))
    pids = _segments.users(name)
    who = ("in use by pid %s (shmstm-stats --list shows them; a killed program's "
           "workers may outlive it)" % ", ".join(map(str, pids)) if pids else
           "used by no live process: shmstm.cleanup_segments(names=[%r]) removes it" % name)
    return errors.RuntimeExistsError(
        "runtime %r exists (%s), %s; open(create=True) must create it: stop those processes "
        "or shmstm.unlink(%r), or open it with create=None to attach" % (name, where, who, name))


def _open_plain(name, limits, create=None):
    lim = _check_limits(limits)
    with _registry_lock:
        rt = _registered(name)
        if rt is not None and rt._pid == os.getpid():
            if create is True:
                raise _exists_error(name, "open in this process")
            if rt._seg is None:
                rt._attach(limits, lim, create=create is None)
            else:
                _check_same_limits(rt, limits)
            rt._refs += 1
            return rt
        rt = _register_new(name)
        try:
            rt._attach(limits, lim, create=create is not False, must_create=create is True,
                       not_found_hint=" and open(create=False) only attaches")
        except BaseException:
            _unregister_unattached(rt)
            raise
        rt._refs = 1
        _adopt_durable(rt)
        return rt


def unlink(name, *, discard=False, timeout=CLOSE_FLUSH_TIMEOUT):
    """Remove the runtime's shared-memory segment.  Processes still attached
    keep their mapping until they close.  Returns False if it did not exist.

    A durable runtime's segment may hold commits its flusher has not yet
    written to LMDB (acknowledged ``async`` commits): unlink first has them
    written (waiting at most ``timeout`` seconds), and refuses with
    ``DurabilityError`` if that fails; ``discard=True`` removes the segment
    with them, on purpose."""
    _check_name(name)
    if not discard:
        _drain_before_unlink(name, timeout)
    try:
        posix_ipc.unlink_shared_memory(_shm_name(name))
        return True
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError as e:
        raise errors.PermissionDeniedError(
            "cannot remove runtime %r: %s (another user's segment?)" % (name, e)) from None


def _drain_before_unlink(name, timeout):
    """unlink(): the commits only this segment's ring holds go to LMDB first."""
    path = _segments.SHM_DIR + _shm_name(name)
    seg, _ = _segments._attach_ro(path)
    if seg is None:
        return                          # gone, not ours, not shmstm: nothing of ours to keep
    try:
        info = ffi.new("shmstm_ring_info *")
        lib.shmstm_ring_info_get(seg, info)
        pending = info.ring_slots and info.committed_wv > info.flushed_wv
        target = info.committed_wv
    finally:
        lib.shmstm_seg_detach(seg)
    if not pending:
        return
    try:
        rt = open(name, create=False)   # attaches, and starts a flusher if none runs
    except errors.SegmentNotFoundError:
        return
    try:
        if rt._durable is None:         # another segment under the name meanwhile
            return
        tok = object()
        try:
            rt._wait_begin(tok)
            rt._durable.wait_flushed(
                target, time.monotonic() + timeout,
                "runtime %r: its commits up to wv %d are" % (name, target))
        finally:
            rt._waiters.discard(tok)
    except errors.DurabilityError as e:
        raise errors.DurabilityError(
            "%s; unlink refused, so that they are not lost: open the runtime again (with a "
            "larger map_size if the map is full) to have them written, or call "
            "shmstm.unlink(%r, discard=True) to remove it with them" % (e, name)) from None
    finally:
        rt.close()


def _close_all():
    with _registry_lock:
        for rt in list(_registry.values()):
            if rt._pid == os.getpid():
                rt._refs = 1
                rt.close()


atexit.register(_close_all)


def _after_fork_child():
    """In a fork child: the parent's contexts (and slots) are not ours.  Forget
    them without releasing the slots; the child claims its own lazily."""
    global _registry_lock
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
    _registry_lock = threading.RLock()
    for rt in list(_registry.values()):
        rt._lock = threading.RLock()
        rt._waits = threading.Condition(rt._lock)
        rt._waiters = set()         # the parent's waiting threads do not exist here
        seg = rt._seg
        if seg is not None:
            # Every inherited context answers SHMSTM_EFORKED from now on; its
            # object frees its memory, never the parent's slot.
            lib.shmstm_seg_after_fork(seg)
        rt._ctxs = weakref.WeakSet()
        rt._local = _Local()
        rt._pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_child)


# ---------------------------------------------------------------- TVar

class TVar:
    """A transactional variable in a runtime's shared segment.  Holds an
    immutable snapshot of a Python value: read it and write it back."""
    __slots__ = ("_rt", "_idx", "_gen", "_h", "_ref", "_refa", "_name", "__weakref__")
    # TVar[int] in annotations evaluated at run time (the stub makes it generic).
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, rt, idx, gen, name):
        self._rt = rt
        self._idx = idx
        self._gen = gen
        self._h = _handle(idx, gen)
        self._ref = ffi.new("shmstm_ref *", (rt._segbox, idx, gen))
        self._refa = _address(self._ref)    # kept alive by _ref
        self._name = name

    # get() and set() are the measured hot path (tools/bench): each line
    # counts.  The general cases live in the helpers they fall back to.

    def get(self):
        """The value: a transactional read inside a transaction, an atomic
        snapshot read outside."""
        if not _active:                 # no transaction in this process
            v = _peek(self._refa)
            if v != MISS:
                return v
            return self._get_outside()
        tx = _get_tx()
        if tx is None or not tx.running:
            return self._get_outside()
        rt = self._rt
        if rt is not tx.rt:
            if tx.rt is None and rt is tx.brt and tx.ctx.ptr is not None:
                tx.rt = rt              # _bind's common case, without the call
            else:
                tx._bind(rt)
        writes = tx.writes
        if writes:
            w = writes.get(self._h)
            if w is not None:
                return w if type(w) is int else w.read()
        v = _readv(tx.pa, self._refa)
        if v != MISS:
            return v
        return tx._read_miss()

    def _get_outside(self):
        ctx = self._rt._local.ctx
        if ctx is None or ctx.ptr is None:
            ctx = self._rt._ctx()
        tag = _read1(ctx.ptr, self._idx, self._gen, ctx.out)
        if tag == T_INT:
            return ctx.out[0]
        return _decode(tag, ctx)

    def set(self, value):
        """Write: buffered inside a transaction, a one-TVar transaction outside."""
        tx = _get_tx()
        if tx is None or not tx.running:
            atomically(self.set, value)
            return
        rt = self._rt
        if rt is not tx.rt:
            if tx.rt is None and rt is tx.brt and tx.ctx.ptr is not None:
                tx.rt = rt              # as in get()
            else:
                tx._bind(rt)
        if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
            try:
                value = _Enc(*_encode(value, self._rt._max_value_size), value)
            except errors.ValueTooLargeError as e:
                raise errors.ValueTooLargeError("%s: %s" % (self._label(), e)) from None
            tx.nonint += 1
        if tx.depth:
            tx.undo.append((self._h, tx.writes.get(self._h)))
        tx.writes[self._h] = value

    value = property(get, set, doc="The TVar's value (see get() and set()).")

    def _label(self):
        return "TVar %r" % self._name if self._name is not None else \
            "anonymous TVar #%d" % self._idx

    def modify(self, fn):
        """Atomically replace the value with ``fn(value)``; returns the new value."""
        def rmw():
            v = fn(self.get())
            self.set(v)
            return v
        return atomically(rmw)

    def free(self):
        """Free this anonymous TVar when the transaction commits; every handle
        to it then raises StaleTVarError."""
        if self._name is not None:
            raise errors.Error("named TVar %r cannot be freed" % self._name)
        tx = _current()
        if tx is None:
            atomically(self.free)
            return
        if self._rt is not tx.rt:
            tx._bind(self._rt)
        h = self._h
        if tx.depth:
            tx.undo.append((h, tx.writes.get(h)))
        tx.writes[h] = _FREED
        tx.nonint += 1

    @property
    def name(self):
        return self._name

    @property
    def runtime(self):
        return self._rt

    def __reduce__(self):
        return (_tvar_from_pickle, (self._rt, self._idx, self._gen, self._name))

    def __repr__(self):
        return "<shmstm.TVar %s#%d.%d of %r>" % (
            repr(self._name) if self._name else "anon", self._idx, self._gen, self._rt.name)

    def __eq__(self, other):
        return (isinstance(other, TVar) and other._rt is self._rt
                and other._idx == self._idx and other._gen == self._gen)

    def __hash__(self):
        return hash((self._rt.name, self._idx, self._gen))


def _tvar_from_pickle(rt, idx, gen, name):
    if not isinstance(rt, Runtime) or not all(isinstance(x, int) for x in (idx, gen)):
        raise errors.StaleTVarError("malformed TVar handle in pickle")
    if not (0 <= idx <= _IDX_MASK and 0 <= gen <= _IDX_MASK):
        raise errors.StaleTVarError("TVar handle out of range: (%d, %d)" % (idx, gen))
    return TVar(rt, idx, gen, name)


# ---------------------------------------------------------------- transactions

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
        dm = _durable_mod().durability
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
