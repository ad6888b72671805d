"""shmstm: software transactional memory shared by independent processes.

TVars live in a POSIX shared-memory segment and are updated by transactions
that run truly in parallel in several processes (GHC-STM semantics:
``atomically``, blocking ``retry``, ``or_else``, ``check``; opacity).

    import shmstm
    with shmstm.open("bank") as rt:
        a, b = rt.tvar("a", 100), rt.tvar("b", 0)
        @shmstm.atomic
        def transfer(n):
            shmstm.check(a.value >= n)
            a.value -= n
            b.value += n
        transfer(10)

See docs/api.md for the whole API.
"""
from .__about__ import __version__
from .shm.segments import cleanup_segments, list_segments
from .stm.aio import atomically_async
from .stm.runtime import Runtime, open, unlink
from .stm.tvar import TVar
from .stm.tx import atomic, atomically, check, in_transaction, or_else, retry
from .store.durable import durability
from .store.schema import read_durable
from .errors import (
    BlockedForeverError, CorruptSegmentError, CrossRuntimeError, EncodeError, Error,
    ForkedContextError, HeapFullError, LayoutMismatchError, LimitMismatchError,
    NoSpaceError, NotInTransactionError, PermissionDeniedError, RetryTimeout,
    RuntimeClosedError, SegmentInitError, DurabilityError, DurabilityMismatchError, DurableFormatError,
    RuntimeExistsError, SegmentNotFoundError, StaleTVarError,
    TooManyProcessesError, TVarTableFullError, ValueTooLargeError,
)

__all__ = [
    "__version__", "Runtime", "TVar", "open", "unlink", "atomically", "atomically_async",
    "atomic", "retry",
    "check", "or_else", "in_transaction", "list_segments", "cleanup_segments",
    "durability", "read_durable", "DurabilityError", "DurabilityMismatchError", "DurableFormatError",
    "Error", "StaleTVarError", "EncodeError", "ValueTooLargeError", "HeapFullError",
    "TVarTableFullError", "TooManyProcessesError", "LayoutMismatchError",
    "CorruptSegmentError", "SegmentInitError", "LimitMismatchError", "RuntimeClosedError",
    "SegmentNotFoundError", "RuntimeExistsError", "PermissionDeniedError", "NoSpaceError", "CrossRuntimeError",
    "NotInTransactionError", "RetryTimeout", "BlockedForeverError", "ForkedContextError",
]
