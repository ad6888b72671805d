"""LMDB environments: one per data directory and process (py-lmdb: never
twice in one process, never across fork; a process-wide cache, dropped in a
fork child), their map size (stored in the data, adopted when another
process raises it) and the data's format marker.  The data's layout is in
schema.py."""
import contextlib
import os
import struct
import threading

from .. import errors
from ..__about__ import __version__

MAP_SIZE = 1 << 34            # default; sparse; stored in the data, identical in every opener
MIN_MAP_SIZE = 1 << 16
MAX_MAP_SIZE = 1 << 44
MAX_DBS = 3

_U64 = struct.Struct("<Q")



def _lmdb():
    try:
        import lmdb
    except ImportError:  # pragma: no cover - a dependency (setup.py); removed by hand
        raise errors.DurabilityError(
            "durable runtimes need the 'lmdb' package (a dependency of shmstm): "
            "pip install lmdb") from None
    return lmdb


# ---------------------------------------------------------------- LMDB environments

_envs = {}
_envs_lock = threading.Lock()


class _TxnGate:
    """LMDB's set_mapsize may only be called while no transaction of the
    process is active on that environment.  LMDB itself does not check (a
    transaction begun before reads through the old map); py-lmdb 2.2 and
    later invalidate the other threads' transactions instead, which then fail.
    So in an opener's process every LMDB transaction of this module on an
    environment (opening a DB included) holds the environment's gate shared,
    and set_mapsize holds it alone.  A waiting set_mapsize keeps new
    transactions out, so a stream of readers cannot starve it; a thread's
    nested shared holds do not wait.  Nothing that holds the gate shared takes
    another lock (decoding pickles, which may import shmstm objects, happens
    after the transaction), so set_mapsize may wait for it under
    _registry_lock or _envs_lock.  The flusher is single-threaded: its
    transactions never overlap its own resizes.  ``waiting``: threads waiting
    to hold it alone (for the tests)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._alone = False
        self.waiting = 0
        self._mine = threading.local()

    @contextlib.contextmanager
    def shared(self):
        mine = self._mine
        if getattr(mine, "depth", 0):
            mine.depth += 1
        else:
            with self._cond:
                while self._alone or self.waiting:
                    self._cond.wait()
                self._shared += 1
                mine.depth = 1
        try:
            yield
        finally:
            mine.depth -= 1
            if not mine.depth:
                with self._cond:
                    self._shared -= 1
                    if not self._shared:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self):
        if getattr(self._mine, "depth", 0):
            raise RuntimeError("shmstm: LMDB map resize inside a transaction of the same thread")
        with self._cond:
            self.waiting += 1
            try:
                while self._alone or self._shared:
                    self._cond.wait()
            finally:
                self.waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


_gates = {}                  # env.path() -> _TxnGate
_gates_lock = threading.Lock()


def _gate(env):
    """The transaction gate of ``env`` (one per environment of the process)."""
    key = env.path()
    g = _gates.get(key)
    if g is None:
        with _gates_lock:
            g = _gates.setdefault(key, _TxnGate())
    return g


def _resize(env, size, grow_only=False):
    """set_mapsize(size) alone on env (0: adopt the size another process
    stored); with grow_only, only if the map is smaller.  The size is read
    under the gate too: info() reads the map's metadata."""
    with _gate(env).alone():
        if not grow_only or env.info()["map_size"] < size:
            env.set_mapsize(size)


def open_env(path, create=True, map_size=None):
    """This process's environment for ``path`` (opened once, reader_check at
    open), sized with the data's stored map size (see lmdb_open).  Each call
    checks the data's format first (check_format): another process may have
    written the data since this one opened it."""
    real = os.path.realpath(path)
    with _envs_lock:
        env = _envs.get(real)
        if env is None:
            if not create and not os.path.exists(os.path.join(real, "data.mdb")):
                raise FileNotFoundError("no durable shmstm data at %r" % path)
            os.makedirs(real, mode=0o700, exist_ok=True)
            env = lmdb_open(real, map_size if create else None)
            _envs[real] = env
        else:
            check_format(env, real)
            if map_size is not None:
                adopt_map_size(env, map_size, real)
        return env


DATA_FORMAT = 2              # what this version writes and reads (meta b"format")
_U32 = struct.Struct("<I")


def stored_format(txn, meta):
    """The data's format marker (None: data from before the marker)."""
    v = txn.get(b"format", db=meta)
    if v is None:
        return None
    if len(v) != _U32.size:
        raise errors.CorruptSegmentError("a malformed format marker in the durable data")
    return _U32.unpack(v)[0]


def check_format(env, real):
    """Refuse data in a format this version does not read (a newer shmstm
    wrote it), before anything is written to it."""
    _, meta = _dbs(env)
    with begin(env, db=meta) as txn:
        fmt = stored_format(txn, meta)
    if fmt is not None and fmt > DATA_FORMAT:
        raise errors.DurableFormatError(
            "the durable data at %r is in format %d; shmstm %s reads formats up to %d "
            "(open it with the shmstm version that wrote it)" % (real, fmt, __version__, DATA_FORMAT))
    return fmt


def lmdb_open(real, map_size=None):
    """Open the LMDB at ``real`` (reader_check at open) and size its map once:
    the map size is stored in the data (meta ``map_size``) by the first
    opener that gives one, and every opener (the flusher too) uses the stored
    one, or MAP_SIZE while none is stored.  ``map_size`` larger than the size
    in use raises it (a full map's remedy: the flusher adopts the new size at
    its next retry); smaller is refused, except for new, empty data."""
    lmdb = _lmdb()
    env = lmdb.open(real, map_size=MAP_SIZE, max_dbs=MAX_DBS, subdir=True)
    try:
        env.reader_check()              # readers left by SIGKILLed processes
        check_format(env, real)         # before adopt_map_size may write to it
        adopt_map_size(env, map_size, real)
    except BaseException:
        env.close()
        raise
    return env


@contextlib.contextmanager
def begin(env, **kw):
    """``with begin(env, **kw) as txn``: env.begin(**kw) inside the
    transaction gate (_TxnGate), committed at the end of the block (aborted on
    an exception), adopting a map size another process raised meanwhile
    (LMDB then refuses this process's next transaction once the data grew
    beyond its map: MDB_MAP_RESIZED; set_mapsize(0) takes the new size)."""
    lmdb = _lmdb()
    gate = _gate(env)
    for resized in (False, True):
        with gate.shared():
            try:
                txn = env.begin(**kw)
            except lmdb.MapResizedError:
                if resized:
                    raise
            else:
                with txn:
                    yield txn
                return
        _resize(env, 0)


def _u64(v):
    return _U64.unpack(v)[0] if v else None


def stored_map_size(env):
    _, meta = _dbs(env)
    with begin(env, db=meta) as txn:
        return _u64(txn.get(b"map_size"))


def adopt_map_size(env, map_size, real):
    """Size env's map with the stored map size, storing or raising it first
    when ``map_size`` asks (see lmdb_open)."""
    stored = stored_map_size(env)
    if map_size is not None:
        _check_map_size(map_size)
        # Data made without a stored size was sized with the default; only new,
        # empty data takes any size.
        in_use = stored if stored is not None else (
            MAP_SIZE if not _is_new(env) else None)
        if in_use is not None and map_size < in_use:
            raise errors.DurabilityMismatchError(
                "the durable data at %r has map_size %d; a map cannot shrink (asked for %d)"
                % (real, in_use, map_size))
        if in_use is None or map_size > in_use:
            _resize(env, map_size, grow_only=True)  # first: the write below needs room in a full map
            _, meta = _dbs(env)
            with begin(env, write=True, db=meta) as txn:
                cur = _u64(txn.get(b"map_size"))      # another opener may have raised it
                if cur is None or map_size > cur:
                    txn.put(b"map_size", _U64.pack(map_size))
                    cur = map_size
            stored = cur
    size = stored or MAP_SIZE
    current = _shared(env, lambda: env.info()["map_size"])
    if current != size:
        _resize(env, size)


def _is_new(env):
    """The data holds nothing yet: no flusher wrote it (a flusher stores the
    runtime id before anything else)."""
    _, meta = _dbs(env)
    with begin(env, db=meta) as txn:
        return txn.get(b"runtime_id") is None and txn.get(b"flushed_wv") is None


def _check_map_size(map_size):
    if not isinstance(map_size, int) or isinstance(map_size, bool):
        raise TypeError("map_size must be an int, not %s" % type(map_size).__name__)
    if not MIN_MAP_SIZE <= map_size <= MAX_MAP_SIZE or map_size % 4096:
        raise ValueError("map_size must be a multiple of 4096 from %d to %d bytes, got %r"
                         % (MIN_MAP_SIZE, MAX_MAP_SIZE, map_size))


def _shared(env, fn):
    """``fn()`` holding env's gate shared, adopting a map size another process
    raised (as begin() does: LMDB refuses any transaction, opening a DB
    included, once the data grew beyond this process's map)."""
    lmdb = _lmdb()
    for resized in (False, True):
        with _gate(env).shared():
            try:
                return fn()
            except lmdb.MapResizedError:
                if resized:
                    raise
        _resize(env, 0)


def _dbs(env):
    # Opening a DB is a transaction.
    return _shared(env, lambda: (env.open_db(b"vars"), env.open_db(b"meta")))


def _forget_envs():
    # A fork child must never use its parent's environments (nor close them),
    # nor its locks' state.
    global _envs_lock, _gates_lock
    _envs.clear()
    _envs_lock = threading.Lock()       # another thread may have held it at the fork
    _gates.clear()
    _gates_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_envs)
