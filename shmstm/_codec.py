"""The value codec: one encoder and one decoder of TVar values, for the
segment (reads, commits), LMDB (the flusher's records, the durable data) and
everything else that stores a value.

A value is a tag and a payload: None, bool, int64 and float are inline (the
payload is an int or a float), bytes and str are their bytes (str as UTF-8
with surrogatepass), everything else is pickled (protocol 5).  Encoding
happens when a value is written, so a bad value raises there, before anything
shared changes.
"""
import pickle
import struct

from . import errors
from ._core import lib

T_NONE = lib.SHMSTM_TAG_NONE
T_FALSE = lib.SHMSTM_TAG_FALSE
T_TRUE = lib.SHMSTM_TAG_TRUE
T_INT = lib.SHMSTM_TAG_INT
T_FLOAT = lib.SHMSTM_TAG_FLOAT
T_BYTES = lib.SHMSTM_TAG_BYTES
T_STR = lib.SHMSTM_TAG_STR
T_PICKLE = lib.SHMSTM_TAG_PICKLE

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
PICKLE_PROTOCOL = 5

_dumps = pickle.dumps
_loads = pickle.loads
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")

_too_large = ("%s of %d bytes exceeds max_value_size=%d, which is fixed when the runtime is "
              "created (unlink it and open it again with a larger one)")


def encode(value, max_size):
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


def decode_heap(tag, data):
    """The value of a heap tag (bytes, str, pickle) from its bytes; a block
    that does not decode is CorruptSegmentError (values are encoded when
    written, so only corrupted data holds one)."""
    if tag == T_BYTES:
        return data
    try:
        if tag == T_STR:
            return data.decode("utf-8", "surrogatepass")
        if tag == T_PICKLE:
            return _loads(data)
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        what = "str" if tag == T_STR else "pickled value"
        raise errors.CorruptSegmentError(
            "a stored %s cannot be decoded (%s: %s): the data is corrupt"
            % (what, type(e).__name__, e)) from e
    raise errors.CorruptSegmentError("unknown value tag %d: the data is corrupt" % tag)


def decode(tag, payload):
    """The value of (tag, payload): an int or float payload for the inline
    tags, bytes for the others."""
    if tag == T_INT or tag == T_FLOAT:
        return payload
    if tag == T_NONE:
        return None
    if tag == T_TRUE or tag == T_FALSE:
        return tag == T_TRUE
    return decode_heap(tag, payload)


def to_record(tag, payload):
    """A value as LMDB and the ring carry it: the tag byte, then the payload
    (8 bytes little endian for inline tags, the encoded bytes otherwise)."""
    return bytes((tag,)) + bytes(payload)


def from_record(rec):
    """(tag, payload) of a record (to_record): payload is an int, a float or
    bytes."""
    tag = rec[0]
    if tag in (T_INT, T_NONE, T_FALSE, T_TRUE):
        return tag, _I64.unpack_from(rec, 1)[0]
    if tag == T_FLOAT:
        return tag, _F64.unpack_from(rec, 1)[0]
    return tag, bytes(rec[1:])


def decode_record(rec):
    """The value of a record (to_record)."""
    return decode(*from_record(rec))
