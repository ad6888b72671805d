"""The STM front: TVar, a transactional variable in a runtime's segment.

get() and set() are the measured hot path (tools/bench): they read module
globals (imported from tx.py) and call the compiled core directly."""
import types

from .. import errors
from .._codec import INT64_MAX, INT64_MIN, T_INT, encode as _encode
from .._core import _fast, address as _address, ffi, lib
from ..shm.runtime import SegmentRuntime
from .tx import (_FREED, _IDX_MASK, MISS, _Enc, _active, _current, _decode, _get_tx, _handle,
                 _readv, atomically)

__all__ = ["TVar"]

_read1 = lib.shmstm_read1
_peek = _fast.peek


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
    if not isinstance(rt, SegmentRuntime) or not all(isinstance(x, int) for x in (idx, gen)):
        raise errors.StaleTVarError("malformed TVar handle in pickle")
    if not (0 <= idx <= _IDX_MASK and 0 <= gen <= _IDX_MASK):
        raise errors.StaleTVarError("TVar handle out of range: (%d, %d)" % (idx, gen))
    return TVar(rt, idx, gen, name)
