"""The durable data's layout in LMDB, its one encoder and decoder of log
records, and reading it without a segment.

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
              pairs (shmstm_ring_encode_log).  A small batch is written as one log record
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
import struct
from typing import Any, Dict

from .. import errors
from .._codec import decode_record
from .env import _U64, _dbs, _lmdb, _shared, begin, open_env, stored_format

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


def decode_log(rec):
    """The (name, value) pairs of a log record (shmstm_ring_encode_log's format:
    u32 LE name length, name, u32 LE value length, value, for each)."""
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


def read_meta(env):
    """(flushed_wv, runtime id or None) of the durable data."""
    _, meta = _dbs(env)
    logs = LogDBs(env)
    with begin(env) as txn:
        fw = stored_flushed(txn, meta, logs)
        rid = txn.get(b"runtime_id", db=meta)
    return fw, (bytes(rid) if rid else None)


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
    values = {k.decode("utf-8", "surrogatepass"): decode_record(v) for k, v in raw}
    return {"flushed_wv": fw, "runtime_id": bytes(rid).hex() if rid else None,
            "format": fmt, "values": values}


# meta b"writer": the segment whose flusher writes the data (_flusher.Flusher).
_WRITER = struct.Struct("<QI")          # created_ns, creator pid; then the runtime's name


def read_writer(env):
    """meta b"writer" of the data (None: no flusher wrote it yet)."""
    _, meta = _dbs(env)
    with begin(env, db=meta) as txn:
        w = txn.get(b"writer")
    return bytes(w) if w is not None else None


def parse_writer(w):
    """(created_ns, creator pid, runtime name) of a writer value, or None."""
    if w is None or len(w) < _WRITER.size:
        return None
    created_ns, pid = _WRITER.unpack_from(w)
    return created_ns, pid, w[_WRITER.size:].decode("utf-8", "surrogatepass")


def describe_writer(w):
    """A meta b"writer" value in words."""
    if w is None:
        return "unknown"
    w = bytes(w)
    if len(w) < _WRITER.size:
        return "unreadable"
    created_ns, pid = _WRITER.unpack_from(w)
    return "runtime %r created by pid %d" % (w[_WRITER.size:].decode("utf-8", "replace"), pid)
