"""The shared-memory backend: a runtime's segment attached in this process
(SegmentRuntime), the threads' contexts, open/unlink, the process-wide
registry of runtimes, and what happens to them at fork and exit.

Per thread and runtime there is one *context* (a C ``shmstm_ctx`` that owns a
process slot in the segment).
"""
import atexit
import os
import threading
import time
import weakref

import posix_ipc

from .. import _core, errors
from .._core import _fast, address as _address, check as _check_rc, error_for, ffi, lib
from ..stats.reader import runtime_stats
from ..store.durable import Durable, flusher_error_text
from ..store.env import _check_map_size, open_env
from ..store.schema import parse_writer
from . import segments

DEFAULT_LIMITS = {                  # a new segment's (shmstm.h)
    "max_tvars": lib.SHMSTM_DEFAULT_MAX_TVARS,
    "heap_size": lib.SHMSTM_DEFAULT_HEAP,
    "max_procs": lib.SHMSTM_DEFAULT_MAX_PROCS,
    "max_value_size": lib.SHMSTM_DEFAULT_MAX_VALUE,
}

_WAIT_FOR_INIT_NS = 5_000_000_000

# Seconds the last close() of a durable runtime waits for its commits to reach
# LMDB by default (SegmentRuntime.close).
CLOSE_FLUSH_TIMEOUT = 30.0


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


_registry = {}                 # name -> Runtime attached (or lazily attachable) here
_registry_lock = threading.RLock()


class SegmentRuntime:
    """A runtime's segment attached in this process: the mapping, the threads'
    contexts, the waits close() interrupts, durability (store.durable).  The
    STM front's Runtime (stm/runtime.py) adds the TVars on top; open_runtime()
    makes instances of either."""

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
        shm_name = _core.shm_name(self.name)
        for _ in range(3):
            # Created under a temporary name and linked into place once complete
            # (segments.create_segment): the name never shows a half-made segment.
            # A durable create also fills the ring size, LMDB's runtime id and clock.
            fill = None if durable is None else \
                (lambda prm: Durable.fill_params(prm, durable))
            if create and not os.path.exists(_core.SHM_DIR + shm_name) and \
                    segments.create_segment(self.name, create_limits or _creation_limits(limits),
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
                            self._seg is not None and not self._in_transaction()
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
        if self._in_transaction():
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
        return (runtime_from_pickle, (type(self), self.name))

    def _in_transaction(self):
        """Whether this thread is inside a transaction (the front knows)."""
        return False

    def _name_is_ours(self):
        """The runtime's name still refers to this process's segment (a
        flusher attaches by name: store.durable)."""
        seg, _ = segments._attach_ro(_core.SHM_DIR + _core.shm_name(self.name))
        if seg is None:
            return False
        try:
            info = ffi.new("shmstm_seg_info *")
            lib.shmstm_seg_info_get(seg, info)
            return info.created_ns == self._params.created_ns
        finally:
            lib.shmstm_seg_detach(seg)

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
                    what, flusher_error_text(info.durable_error)))
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

    def stats(self):
        """Counters and facts read from the segment (no lock taken): the same
        document as ``shmstm-stats --json`` (schema in docs/stats.md)."""
        self._ensure()
        st = runtime_stats(self._seg, self.name, self._params.ring_slots)
        if self._durable is not None:       # this process knows the mode and path
            st["durability"] = self._durable.stats()
        return st


def _creation_limits(limits):
    """The limits a new segment gets: the defaults, with max_value_size capped
    at a quarter of the heap unless given."""
    lim = dict(DEFAULT_LIMITS)
    lim.update(limits)
    if "max_value_size" not in limits:
        lim["max_value_size"] = min(DEFAULT_LIMITS["max_value_size"], lim["heap_size"] // 4)
    return lim


def runtime_from_pickle(cls, name):
    """An unpickled runtime: the one registered under ``name`` in this
    process, or a new ``cls`` that attaches lazily, on first use."""
    with _registry_lock:
        rt = _registry.get(name)
        if rt is None or rt._closed:
            rt = cls(name)
            rt._refs = 1
            _registry[name] = rt
        return rt


def _adopt_durable(rt):
    """A segment with a commit ring attached without a path (unpickled, or
    open() without one): async mode, the path stored in the segment."""
    if rt._params.ring_slots and rt._durable is None:
        d = Durable(rt, None, "async")
        rt._durable = d
        d.after_attach(False)


def open_runtime(cls, name, path=None, *, create=None, durability=None, ring_slots=None,
                 map_size=None, **limits):
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
    _core.check_name(name)
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
            _check_map_size(map_size)    # before anything is created
        if create is True and path is None:
            raise ValueError("creating a durable runtime needs path=, the directory of its "
                             "LMDB data")
        return _open_durable(cls, name, path, durability, ring_slots, map_size, limits, create)
    if ring_slots is not None:
        raise ValueError("ring_slots needs a path (a durable runtime)")
    if map_size is not None:
        raise ValueError("map_size needs a path (a durable runtime)")
    return _open_plain(cls, name, limits, create)


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


def _open_durable(cls, name, path, mode, ring_slots, map_size, limits, create=None):
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
        prep = Durable.prepare(path, lim2, map_size)
        segments.check_writer(parse_writer(prep["writer"]), path, name)
    with _registry_lock:
        old = _registered(name)         # another thread may have opened it meanwhile
        if old is not None and old._pid == os.getpid():
            if create is True:
                raise _exists_error(name, "open in this process")
            return _reopen_durable(old, path, mode, map_size, limits)
        rt = _register_new(cls, name)
        hint = (" and open(create=False) only attaches" if create is False else
                "; a durable runtime is created by open() with path=, the directory of its "
                "LMDB data")
        try:
            rt._attach(limits, lim, create=prep is not None, durable=prep,
                       must_create=create is True, not_found_hint=hint)
        except BaseException:
            _unregister_unattached(rt)
            raise
        rt._durable = Durable(rt, path, mode)
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
        open_env(d.path, map_size=map_size)
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


def _register_new(cls, name):
    """A new runtime (a ``cls``) registered before it holds anything
    (_registry_lock held), so that an open() interrupted at any bytecode
    leaves whatever it took where the next open(), close() or the exit finds
    it."""
    rt = cls(name)
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
    pids = segments.users(name)
    who = ("in use by pid %s (shmstm-stats --list shows them; a killed program's "
           "workers may outlive it)" % ", ".join(map(str, pids)) if pids else
           "used by no live process: shmstm.cleanup_segments(names=[%r]) removes it" % name)
    return errors.RuntimeExistsError(
        "runtime %r exists (%s), %s; open(create=True) must create it: stop those processes "
        "or shmstm.unlink(%r), or open it with create=None to attach" % (name, where, who, name))


def _open_plain(cls, name, limits, create=None):
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
        rt = _register_new(cls, name)
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
    _core.check_name(name)
    if not discard:
        _drain_before_unlink(name, timeout)
    try:
        posix_ipc.unlink_shared_memory(_core.shm_name(name))
        return True
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError as e:
        raise errors.PermissionDeniedError(
            "cannot remove runtime %r: %s (another user's segment?)" % (name, e)) from None


def _drain_before_unlink(name, timeout):
    """unlink(): the commits only this segment's ring holds go to LMDB first."""
    path = _core.SHM_DIR + _core.shm_name(name)
    seg, _ = segments._attach_ro(path)
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
        rt = open_runtime(SegmentRuntime, name, create=False)   # starts a flusher if none runs
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
    them without releasing the slots; the child claims its own lazily.  (The
    thread's transaction: stm/tx.py.)"""
    global _registry_lock
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
