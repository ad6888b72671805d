"""Durable runtimes: opening with a path, the flusher's lease, the
durability modes, and reading LMDB without a segment.

LMDB layout (one environment per path, a directory):
  db b"vars": TVar name (UTF-8) -> one tag byte + payload (8 bytes little
              endian for inline tags, the encoded bytes otherwise)
  db b"meta": b"flushed_wv" -> u64 LE (the last write version applied by a
              write to "vars"; stored in the same write transaction as the
              data), b"runtime_id" -> 16 bytes, b"map_size" -> u64 LE,
              b"format" -> u32 LE (DATA_FORMAT; written by the flusher at
              its start; data without it predates the marker, 0.1.0's
              included, and is read as before; a larger one is refused:
              check_format)
  the main DB, besides the named DBs' own records: the log, b"\x00" + u64 BE
              (the last write version of a batch) -> the batch's (name, value)
              pairs, encode_log.  A small batch is written as one log record
              instead of one put per TVar into "vars", and its key is its
              flushed_wv: such a write transaction dirties the main DB's pages
              and nothing else (the fewest pages LMDB can write; each costs
              the fsync time), and the flusher folds the log into "vars"
              later (Flusher.fold).  The NUL byte keeps the records apart
              from DB names (LMDB's mdb_stat skips such keys too).
  The durable state is "vars" with the log's records applied in key order
  (durable_items), and its flushed_wv the larger of meta's and the last log
  record's key (stored_flushed): every reader merges.  0.1.0 kept the log in
  a db b"log" (with flushed_wv in meta on every write): readers merge such a
  log first, and a flusher folds it at its start (then empty; never dropped,
  so a reader's handle stays valid).

Each process opens an environment at most once (py-lmdb: never twice in one
process, never across fork): a process-wide cache, dropped in a fork child.
Only the flusher writes "vars"; an opener only reads (and never writes).
"""
import contextlib
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Dict

from . import errors
from ._binding import error_for, ffi, lib

MAP_SIZE = 1 << 34            # default; sparse; stored in the data, identical in every opener
MIN_MAP_SIZE = 1 << 16
MAX_MAP_SIZE = 1 << 44
MAX_DBS = 3
MODES = ("none", "async", "sync")
READY_WAIT = 10.0             # seconds an attacher waits for the creator to load LMDB
FLUSHER_START_TRIES = 3       # failed flusher starts in a row before committers get an error
FLUSHER_START_WAIT = 10.0     # seconds a start in flight holds up the next one

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")

T_NONE, T_FALSE, T_TRUE, T_INT, T_FLOAT = (lib.SHMSTM_TAG_NONE, lib.SHMSTM_TAG_FALSE,
                                          lib.SHMSTM_TAG_TRUE, lib.SHMSTM_TAG_INT,
                                          lib.SHMSTM_TAG_FLOAT)
T_BYTES, T_STR, T_PICKLE = lib.SHMSTM_TAG_BYTES, lib.SHMSTM_TAG_STR, lib.SHMSTM_TAG_PICKLE


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
        from .__about__ import __version__
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
            MAP_SIZE if read_meta(env) != (0, None) else None)
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


class LogDBs:
    """The DB handles the log lives in: the main DB, and 0.1.0's b"log" DB
    if this data has one (None otherwise; never created here)."""

    def __init__(self, env):
        lmdb = _lmdb()
        self.main = _shared(env, lambda: env.open_db(None))    # a transaction
        with begin(env, db=self.main) as txn:
            had = txn.get(b"log") is not None
        self.legacy = None
        if had:
            try:
                self.legacy = _shared(env, lambda: env.open_db(b"log", create=False))
            except lmdb.NotFoundError:    # pragma: no cover - never dropped once there
                pass


LOG_KEY = b"\x00"              # the main DB's log records: LOG_KEY + u64 BE
_BE64 = struct.Struct(">Q")
_LOG_KEY_LEN = len(LOG_KEY) + 8


def log_key(wv):
    return LOG_KEY + _BE64.pack(wv)


def _log_wv(key):
    if len(key) != _LOG_KEY_LEN:
        raise errors.CorruptSegmentError("a malformed log key in the durable data")
    return _BE64.unpack_from(key, len(LOG_KEY))[0]


def log_records(txn, logs):
    """(write version, record bytes) of the log, oldest first: 0.1.0's
    records (all older than the main DB's: a flusher folds them before it
    writes any of its own), then the main DB's."""
    if logs.legacy is not None:
        for k, rec in txn.cursor(db=logs.legacy):
            yield _BE64.unpack(k)[0], bytes(rec)
    cur = txn.cursor(db=logs.main)
    if cur.set_range(LOG_KEY):
        for k, rec in cur:
            if not k.startswith(LOG_KEY):
                break
            yield _log_wv(k), bytes(rec)


def last_log_wv(txn, logs):
    """The newest main-DB log record's write version (0: none)."""
    cur = txn.cursor(db=logs.main)
    # The log's keys sort first (NUL): the record before the first other key.
    if cur.set_range(b"\x01"):
        found = cur.prev()
    else:
        found = cur.last()
    if not found:
        return 0
    k = cur.key()
    return _log_wv(k) if k.startswith(LOG_KEY) else 0


def stored_flushed(txn, meta_db, logs):
    """The durable flushed_wv in ``txn``: meta's, or a later log record's."""
    fw = txn.get(b"flushed_wv", db=meta_db)
    return max(_U64.unpack(fw)[0] if fw else 0, last_log_wv(txn, logs))


_LOG_LEN = struct.Struct("<I")


def encode_log(items):
    """A log record of (name, value) byte pairs: u32 LE length, name, u32 LE
    length, value, for each."""
    parts = []
    for k, v in items:
        parts += (_LOG_LEN.pack(len(k)), k, _LOG_LEN.pack(len(v)), v)
    return b"".join(parts)


def decode_log(rec):
    """The (name, value) pairs of a log record (encode_log)."""
    out = []
    pos, n = 0, len(rec)
    try:
        while pos < n:
            (kl,) = _LOG_LEN.unpack_from(rec, pos)
            k = rec[pos + 4:pos + 4 + kl]
            pos += 4 + kl
            (vl,) = _LOG_LEN.unpack_from(rec, pos)
            v = rec[pos + 4:pos + 4 + vl]
            pos += 4 + vl
            out.append((k, v))
    except struct.error:
        pos = n + 1
    if pos != n or any(not v for _, v in out):
        raise errors.CorruptSegmentError("a malformed log record in the durable data")
    return out


def log_items(txn, logs, into=None):
    """The log's batches applied, oldest first, to the dict ``into`` (a new
    one by default): {name: latest value} (bytes)."""
    vals = {} if into is None else into
    for _, rec in log_records(txn, logs):
        for k, v in decode_log(rec):
            vals[k] = v
    return vals


def durable_items(txn, vars_db, logs):
    """{name: value} (bytes) of the durable state in ``txn``: "vars" with the
    log's batches applied (see the layout above)."""
    return log_items(txn, logs, {bytes(k): bytes(v) for k, v in txn.cursor(db=vars_db)})


def _forget_envs():
    # A fork child must never use its parent's environments (nor close them),
    # and the parent's flusher children are not its own (nor its locks' state).
    global _children_lock, _envs_lock, _gates_lock
    _envs.clear()
    _envs_lock = threading.Lock()       # another thread may have held it at the fork
    _gates.clear()
    _gates_lock = threading.Lock()
    _children.clear()
    _children_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_envs)


def read_meta(env):
    """(flushed_wv, runtime id or None) of the durable data."""
    _, meta = _dbs(env)
    logs = LogDBs(env)
    with begin(env) as txn:
        fw = stored_flushed(txn, meta, logs)
        rid = txn.get(b"runtime_id", db=meta)
    return fw, (bytes(rid) if rid else None)


def encode_value(tag, payload):
    """LMDB bytes of a (tag, payload) as the ring record carries it."""
    return bytes((tag,)) + bytes(payload)


def decode_raw(val):
    """(tag, payload) from LMDB bytes: payload is an int, a float or bytes."""
    tag = val[0]
    if tag in (T_INT, T_NONE, T_FALSE, T_TRUE):
        return tag, _I64.unpack_from(val, 1)[0]
    if tag == T_FLOAT:
        return tag, _F64.unpack_from(val, 1)[0]
    return tag, bytes(val[1:])


def decode_value(val):
    import pickle
    tag, p = decode_raw(val)
    if tag == T_INT:
        return p
    if tag == T_NONE:
        return None
    if tag in (T_TRUE, T_FALSE):
        return tag == T_TRUE
    if tag == T_FLOAT:
        return p
    if tag == T_BYTES:
        return p
    try:
        if tag == T_STR:
            return p.decode("utf-8", "surrogatepass")
        if tag == T_PICKLE:
            return pickle.loads(p)
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        raise errors.CorruptSegmentError(
            "a value in LMDB cannot be decoded (%s: %s): the data is corrupt"
            % (type(e).__name__, e)) from e
    raise errors.CorruptSegmentError("unknown value tag %d in LMDB" % tag)


def read_durable(path: str) -> Dict[str, Any]:
    """The durable state at ``path`` without a segment (backup, inspection):
    ``{"flushed_wv": int, "runtime_id": hex or None, "format": int or None,
    "values": {name: value}}`` (format: the data's format marker, None for
    data from before it).  A consistent snapshot (one LMDB read transaction)."""
    env = open_env(path, create=False)
    vars_db, meta = _dbs(env)
    logs = LogDBs(env)
    with begin(env) as txn:
        fw = stored_flushed(txn, meta, logs)
        rid = txn.get(b"runtime_id", db=meta)
        fmt = stored_format(txn, meta)
        raw = list(durable_items(txn, vars_db, logs).items())
    # Decoded after the transaction: unpickling may take shmstm's locks (a
    # pickled TVar), which a resize waiting for the gate may hold (_TxnGate).
    values = {k.decode("utf-8", "surrogatepass"): decode_value(v) for k, v in raw}
    return {"flushed_wv": fw, "runtime_id": bytes(rid).hex() if rid else None,
            "format": fmt, "values": values}


# ---------------------------------------------------------------- per-thread override

class _Override(threading.local):
    mode = None


_override = _Override()
_runtimes = set()            # durable runtimes open in this process


def _apply_override():
    for d in list(_runtimes):
        d.refresh_ctx()


class durability:
    """Context manager: commits made in this thread inside the block use
    ``mode`` ("async" or "sync") on every durable runtime.  ``@atomic(durability=...)``
    uses it around each call.  Runtimes without a path ignore it."""

    def __init__(self, mode: str) -> None:
        if mode not in ("async", "sync"):
            raise ValueError("durability override must be 'async' or 'sync', not %r" % (mode,))
        self.mode = mode
        self._prev = None

    def __enter__(self) -> "durability":
        self._prev = _override.mode
        _override.mode = self.mode
        _apply_override()
        return self

    def __exit__(self, *exc: object) -> None:
        _override.mode = self._prev
        _apply_override()


# ---------------------------------------------------------------- the runtime's side

def default_ring_slots(max_procs):
    return lib.shmstm_ring_default_slots(max_procs)


def check_flusher_env(env):
    """The flusher's tuning switches (docs/durability.md): a bad value is the
    opener's error, not a flusher that dies at start."""
    group = env.get("SHMSTM_FLUSH_GROUP", "auto")
    if group not in ("auto", "wait", "nowait"):
        raise ValueError("SHMSTM_FLUSH_GROUP must be auto, wait or nowait, not %r" % group)
    log = env.get("SHMSTM_FLUSH_LOG", "1")
    if log not in ("0", "1"):
        raise ValueError("SHMSTM_FLUSH_LOG must be 0 or 1, not %r" % log)
    poll = env.get("SHMSTM_FLUSH_POLL_NS", "0")
    if not poll.isdigit():
        raise ValueError("SHMSTM_FLUSH_POLL_NS must be a whole number of nanoseconds, not %r" % poll)


def _flusher_env():
    env = dict(os.environ)
    check_flusher_env(env)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_children = []               # Popen objects of flushers we started (reaped by poll)
_children_lock = threading.Lock()   # committing threads may start flushers at once


class Durable:
    """A Runtime's durability state in this process (rt._durable)."""

    def __init__(self, rt, path, mode):
        self.rt = rt
        self.path = None if path is None else os.path.realpath(path)
        self.mode = mode
        self.lock = threading.Lock()
        self.start_failures = 0          # flushers of ours that exited with an error, in a row
        self.last_status = 0

    # -- open

    @staticmethod
    def prepare(name, path, limits, map_size=None):
        """Before create: the LMDB's runtime id and flushed_wv go into the new
        segment's parameters."""
        env = open_env(path, map_size=map_size)
        writer_in_use(env, path, name)
        fw, rid = read_meta(env)
        return {"ring_slots": limits.get("ring_slots") or default_ring_slots(limits["max_procs"]),
                "clock_start": fw, "runtime_id": rid}

    @staticmethod
    def fill_params(params, prep):
        params.ring_slots = prep["ring_slots"]
        params.clock_start = prep["clock_start"]
        if prep["runtime_id"]:
            params.use_runtime_id = 1
            ffi.memmove(params.runtime_id, prep["runtime_id"], 16)

    def after_attach(self, created):
        check_flusher_env(os.environ)
        rt = self.rt
        seg = rt._seg
        if rt._params.ring_slots == 0:
            raise errors.DurabilityMismatchError(
                "runtime %r exists without durability; it cannot be opened with a path "
                "(close every process and unlink it first)" % rt.name)
        if created:
            self._load()
        else:
            end = time.monotonic() + READY_WAIT
            while not lib.shmstm_ring_ready(seg):
                if time.monotonic() > end:
                    raise errors.SegmentInitError(
                        "durable runtime %r: its creator never finished loading LMDB; "
                        "unlink it with shmstm.unlink()" % rt.name)
                time.sleep(0.001)
            stored = self.stored_path()
            if self.path is None:
                self.path = stored
            elif os.path.realpath(self.path) != stored:
                raise errors.DurabilityMismatchError(
                    "runtime %r keeps its durable data at %r, not %r" % (rt.name, stored, self.path))
            env = open_env(self.path)
            _, rid = read_meta(env)
            info = ffi.new("shmstm_seg_info *")
            lib.shmstm_seg_info_get(seg, info)
            if rid is not None and rid != bytes(ffi.buffer(info.runtime_id, 16)):
                raise errors.DurabilityMismatchError(
                    "runtime %r (id %s) does not match the durable data at %r (id %s)" % (
                        rt.name, bytes(ffi.buffer(info.runtime_id, 16)).hex(), self.path, rid.hex()))
        _runtimes.add(self)
        rt._ctx()                      # hold a slot while open: the flusher waits for us
        self.ensure_flusher()

    def _load(self):
        """Creator only, before the segment is READY: named TVars from LMDB."""
        from ._stm import _new_call
        rt = self.rt
        env = open_env(self.path)
        vars_db, _ = _dbs(env)
        logs = LogDBs(env)
        ctx = rt._ctx()
        oi = ffi.new("uint32_t[2]")
        with begin(env) as txn:
            items = durable_items(txn, vars_db, logs)
        for name, v in items.items():
            tag, payload = decode_raw(v)
            rc = _new_call(lib.shmstm_tvar_named, ctx.ptr, (name, len(name)), tag, payload, oi)
            if rc < 0:
                raise error_for(rc, "loading TVar %r from %r" % (name, self.path))
        p = os.path.realpath(self.path).encode()
        rc = lib.shmstm_ring_set_ready(rt._seg, p, len(p))
        if rc < 0:
            raise error_for(rc, "durable runtime %r" % rt.name)

    def stored_path(self):
        buf = ffi.new("char[]", 4096)
        rc = lib.shmstm_ring_path(self.rt._seg, buf, 4096)
        if rc < 0:
            raise error_for(rc, "durable runtime %r: path" % self.rt.name)
        return ffi.string(buf).decode()

    # -- the flusher

    def ensure_flusher(self):
        """Start a flusher unless a live one holds the lease (liveness from /proc).

        At most one flusher we started for this segment is in flight at a time
        (it takes a moment to claim the lease, and every failed commit would
        otherwise start another).  A flusher that exits with an error before
        anyone holds the lease is counted; after FLUSHER_START_TRIES in a row
        this raises DurabilityError instead of waiting forever (its traceback
        went to this process's stderr)."""
        seg = self.rt._seg
        if seg is None:
            return False
        if lib.shmstm_flusher_alive(seg):
            self.start_failures = 0
            return False
        key = (self.rt.name, self.rt._params.created_ns)     # this segment, not a predecessor
        if not self._name_is_ours():
            # A flusher attaches by name: none can start for a segment whose
            # name was unlinked (or now names another segment).
            raise errors.DurabilityError(
                "the flusher of durable runtime %r is not running and cannot be started: the "
                "runtime's name was unlinked while it was open, so its commits not yet in LMDB "
                "cannot be written (unlink only runtimes that are closed everywhere)" % self.rt.name)
        with _children_lock:
            return self._start_flusher(key)

    def _name_is_ours(self):
        """The runtime's name still refers to this process's segment."""
        from ._segments import SHM_DIR, _attach_ro, shm_name
        seg, _ = _attach_ro(SHM_DIR + shm_name(self.rt.name))
        if seg is None:
            return False
        try:
            info = ffi.new("shmstm_seg_info *")
            lib.shmstm_seg_info_get(seg, info)
            return info.created_ns == self.rt._params.created_ns
        finally:
            lib.shmstm_seg_detach(seg)

    def _start_flusher(self, key):
        now = time.monotonic()
        for p in list(_children):
            rc = p.poll()
            if rc is None:
                # Ours, still starting (or waiting for READY); one that has
                # neither taken the lease nor exited in FLUSHER_START_WAIT s
                # (stopped, say) no longer holds up a new start.
                if p._shmstm_key == key and now - p._shmstm_t < FLUSHER_START_WAIT:
                    return False
                continue
            _children.remove(p)
            if p._shmstm_key == key:
                if rc > 0:               # exited with an error (a signal is < 0: restart)
                    self.start_failures += 1
                    self.last_status = rc
                else:
                    self.start_failures = 0
        if self.start_failures >= FLUSHER_START_TRIES:
            n, self.start_failures = self.start_failures, 0      # the next call tries afresh
            raise errors.DurabilityError(
                "the flusher of durable runtime %r failed to start %d times in a row "
                "(last exit status %d; its error output went to stderr)"
                % (self.rt.name, n, self.last_status))
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # cwd: python -m puts the working directory first on sys.path, and a
        # source checkout there (shmstm/ without the compiled core) must not
        # shadow this package.
        p = subprocess.Popen(
            [sys.executable, "-m", "shmstm._flusher", self.rt.name], env=_flusher_env(),
            cwd=pkg_parent, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, close_fds=True)
        p._shmstm_key = key
        p._shmstm_t = time.monotonic()
        _children.append(p)
        return True

    # -- modes

    def sync_for_thread(self):
        m = _override.mode or self.mode
        return 1 if m == "sync" else 0

    def on_new_ctx(self, ctx):
        ctx.sync = self.sync_for_thread()
        lib.shmstm_ctx_set_sync(ctx.ptr, ctx.sync)

    def refresh_ctx(self):
        ctx = self.rt._local.ctx
        if ctx is not None and ctx.ptr is not None:
            self.on_new_ctx(ctx)

    def retryable(self, rc):
        """After a failed commit (nothing changed): re-run the transaction?"""
        if rc == lib.SHMSTM_ENOFLUSHER:
            self.ensure_flusher()
            return True
        if rc == lib.SHMSTM_EDURABLE:
            self.ensure_flusher()       # a live flusher retries the write and clears it
        return rc == lib.SHMSTM_EINTR

    def finish_wait(self, ptr):
        """A sync commit came back SHMSTM_PENDING: it is committed; wait until
        it is in LMDB, restarting a dead flusher."""
        wv = lib.shmstm_ctx_last_wv(ptr)
        self.wait_flushed(wv, None, "committed (wv %d) but" % wv)

    def flush(self, timeout=None):
        """Wait until every commit this process made on the runtime is in
        LMDB (Runtime.flush, close)."""
        seg = self.rt._seg
        wv = lib.shmstm_seg_last_wv(seg) if seg is not None else 0
        if wv:
            deadline = None if timeout is None else time.monotonic() + timeout
            self.wait_flushed(wv, deadline, "the commits of this process up to wv %d are" % wv)

    def wait_flushed(self, wv, deadline, what):
        """Wait until the flusher has written commit ``wv`` to LMDB,
        restarting a dead flusher; DurabilityError (naming ``what``) if it
        cannot write, or at ``deadline`` (time.monotonic(); None: never)."""
        seg = self.rt._seg
        while True:
            if self.rt._closed:             # by another thread, which waits for us (close)
                raise errors.DurabilityError(
                    "%s not known durable: the runtime %r was closed by another thread; the "
                    "flusher still writes them to LMDB unless the machine goes down first"
                    % (what, self.rt.name))
            ns = 100_000_000
            if deadline is not None:
                ns = max(0, min(ns, int((deadline - time.monotonic()) * 1e9)))
            rc = lib.shmstm_ring_wait(seg, wv, ns)
            if rc == 0:
                return
            info = ffi.new("shmstm_ring_info *")
            lib.shmstm_ring_info_get(seg, info)
            if info.durable_error:
                cls = (errors.DurabilityMismatchError
                       if info.durable_error == lib.SHMSTM_EFOREIGN else errors.DurabilityError)
                raise cls(
                    "%s not yet durable: the flusher cannot write %r (%s); they stay in the "
                    "segment's commit ring until it can"
                    % (what, self.path, flusher_error_text(info.durable_error)))
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.DurabilityError(
                    "%s not yet durable: LMDB at %r has commits up to wv %d, and the flusher "
                    "(%s) did not write the rest in time; they stay in the segment's commit "
                    "ring, which the flusher drains while the segment exists"
                    % (what, self.path, info.flushed_wv,
                       "running, pid %d" % info.flusher_pid if info.flusher_alive else "not running"))
            if rc == lib.SHMSTM_ETIMEOUT:
                try:
                    self.ensure_flusher()
                except errors.DurabilityError as e:
                    raise errors.DurabilityError(
                        "%s not yet durable: %s; they stay in the segment's commit ring for "
                        "the next flusher" % (what, e)) from None

    def stats(self):
        info = ffi.new("shmstm_ring_info *")
        lib.shmstm_ring_info_get(self.rt._seg, info)
        return ring_stats_dict(info, self.mode, self.path)

    def close(self):
        _runtimes.discard(self)


def flusher_error_text(code):
    """What stops the flusher, in words that do not speak of one commit."""
    if code == lib.SHMSTM_EDURABLE:
        return "LMDB could not take its write: a full map or an I/O error (the flusher's stderr says which)"
    if code == lib.SHMSTM_EFOREIGN:
        return ("another runtime writes (or wrote) the same LMDB data: two runtimes were opened "
                "with one path, and this one's flusher stopped (its stderr names the other)")
    return str(error_for(code))


# meta b"writer": the segment whose flusher writes the data (_flusher.Flusher).
_WRITER = struct.Struct("<QI")          # created_ns, creator pid; then the runtime's name


def describe_writer(w):
    """A meta b"writer" value in words."""
    if w is None:
        return "unknown"
    w = bytes(w)
    if len(w) < _WRITER.size:
        return "unreadable"
    created_ns, pid = _WRITER.unpack_from(w)
    return "runtime %r created by pid %d" % (w[_WRITER.size:].decode("utf-8", "replace"), pid)


def writer_in_use(env, path, opening):
    """Refuse to open runtime ``opening`` on data another live runtime
    writes: the runtime in meta b"writer", if it has another name and its
    segment still exists under its name with that creation time and a live
    process attached.  (Two segments of one name: the flusher's check.)"""
    from ._segments import SHM_DIR, _attach_ro, _slot_table, shm_name
    _, meta = _dbs(env)
    with begin(env, db=meta) as txn:
        w = txn.get(b"writer")
        w = bytes(w) if w is not None else None
    if w is None or len(w) < _WRITER.size:
        return
    created_ns, _ = _WRITER.unpack_from(w)
    name = w[_WRITER.size:].decode("utf-8", "surrogatepass")
    if name == opening:
        return
    seg, _ = _attach_ro(SHM_DIR + shm_name(name))
    if seg is None:
        return
    try:
        info = ffi.new("shmstm_seg_info *")
        lib.shmstm_seg_info_get(seg, info)
        pids = [p["pid"] for p in _slot_table(seg) if p["alive"]]
        same = info.created_ns == created_ns
    finally:
        lib.shmstm_seg_detach(seg)
    if same and pids:
        raise errors.DurabilityMismatchError(
            "the durable data at %r is in use by runtime %r (pid %s): one path holds one "
            "runtime's data; open that runtime by its name, or close it everywhere first"
            % (path, name, ", ".join(map(str, pids))))


_GROUP_NAMES = {lib.SHMSTM_FG_WAIT: "wait", lib.SHMSTM_FG_NOWAIT: "nowait"}


def ring_stats_dict(info, mode, path):
    """The ``durability`` object of the statistics document (docs/stats.md)."""
    committed, flushed = info.committed_wv, info.flushed_wv
    if info.flusher_alive:
        flusher_state = "running"
    elif info.flusher_pid:
        flusher_state = "dead"          # restarted by the next process that needs it
    else:
        flusher_state = "not running"   # not started yet, or exited (nothing attached)
    code = info.durable_error
    return {
        "mode": mode, "path": path, "ready": bool(lib.SHMSTM_DS_READY == info.durable_state),
        "ring_slots": info.ring_slots, "ring_fill": info.ring_fill,
        "committed_wv": committed, "flushed_wv": flushed,
        "lag": committed - flushed if committed > flushed else 0,
        "flusher_pid": info.flusher_pid or None, "flusher_alive": bool(info.flusher_alive),
        "flusher_state": flusher_state,
        "ring_full_waits": info.ring_full_waits, "late_wakeups": info.late_wakeups,
        "error": code or None,
        "group_commit": _GROUP_NAMES.get(info.flusher_group & ~lib.SHMSTM_FG_FIXED),
        "group_commit_fixed": bool(info.flusher_group & lib.SHMSTM_FG_FIXED),
        "error_message": flusher_error_text(code) if code else None,
    }


def ring_stats(seg):
    """The durability object of any mapped segment (the stats tool: no Runtime
    needed, read-only mapping), None for a segment without a commit ring.
    ``mode`` is None: it is a per-process choice, not a property of the
    segment."""
    info = ffi.new("shmstm_ring_info *")
    lib.shmstm_ring_info_get(seg, info)
    if not info.ring_slots:
        return None
    buf = ffi.new("char[]", 4096)
    n = lib.shmstm_ring_path(seg, buf, 4096)
    path = ffi.string(buf, n).decode("utf-8", "surrogateescape") if n >= 0 else None
    return ring_stats_dict(info, None, path)
