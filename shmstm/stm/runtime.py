"""The STM front's Runtime: a shared-memory runtime (shm/runtime.py) with its
TVars (tvar, lookup, new_tvar, free), and open/unlink, which make and
remove these."""
from .._codec import encode
from .._core import check as _check_rc, ffi, lib, new_call
from ..shm import runtime as _shm
from ..shm.runtime import CLOSE_FLUSH_TIMEOUT, SegmentRuntime
from .tvar import TVar
from .tx import _current

__all__ = ["Runtime", "open", "unlink"]


class Runtime(SegmentRuntime):
    """A shmstm runtime attached in this process.  Create with ``shmstm.open``.

    Use as a context manager or call ``close()``; closing detaches this
    process only (the segment stays until ``shmstm.unlink``)."""

    def _in_transaction(self):
        return _current() is not None

    def __reduce__(self):
        return (_runtime_from_pickle, (self.name,))

    def tvar(self, name, default=None):
        """The TVar named ``name``, created with ``default`` if it does not exist
        (atomic across processes: exactly one creator wins).  ``lookup(name)``
        finds one without creating it."""
        b = _name_bytes(name)
        ctx = self._ctx()
        oi = ffi.new("uint32_t[2]")
        rc = lib.shmstm_tvar_lookup(ctx.ptr, b, len(b), oi, oi + 1)
        if rc == lib.SHMSTM_ENOTFOUND:
            tag, payload = encode(default, self._max_value_size)
            rc = new_call(lib.shmstm_tvar_named, ctx.ptr, (b, len(b)), tag, payload, oi)
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

    def new_tvar(self, value=None):
        """A new anonymous TVar holding ``value``.  Inside a transaction it
        exists only if the transaction commits."""
        tag, payload = encode(value, self._max_value_size)
        tx = _current()
        if tx is not None:
            tx._bind(self)              # raises before anything is created
        ctx = self._ctx()
        oi = ffi.new("uint32_t[2]")
        rc = new_call(lib.shmstm_tvar_new, ctx.ptr, (), tag, payload, oi)
        if rc < 0:
            raise self._error(rc, "new TVar")
        tv = TVar(self, oi[0], oi[1], None)
        if tx is not None:
            tx.created.append(tv)
        return tv

    def free(self, tv):
        """Free an anonymous TVar (effective when the transaction commits)."""
        tv.free()


def _runtime_from_pickle(name):
    return _shm.runtime_from_pickle(Runtime, name)


def _name_bytes(name):
    if not isinstance(name, str):
        raise TypeError("TVar name must be a str, not %s" % type(name).__name__)
    b = name.encode("utf-8", "surrogatepass")
    if not 0 < len(b) <= lib.SHMSTM_MAX_NAME:
        raise ValueError("TVar name must be 1-%d bytes of UTF-8" % lib.SHMSTM_MAX_NAME)
    return b


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
    return _shm.open_runtime(Runtime, name, path, create=create, durability=durability,
                             ring_slots=ring_slots, map_size=map_size, **limits)


def unlink(name, *, discard=False, timeout=CLOSE_FLUSH_TIMEOUT):
    """Remove the runtime's shared-memory segment.  Processes still attached
    keep their mapping until they close.  Returns False if it did not exist.

    A durable runtime's segment may hold commits its flusher has not yet
    written to LMDB (acknowledged ``async`` commits): unlink first has them
    written (waiting at most ``timeout`` seconds), and refuses with
    ``DurabilityError`` if that fails; ``discard=True`` removes the segment
    with them, on purpose."""
    return _shm.unlink(name, discard=discard, timeout=timeout)
