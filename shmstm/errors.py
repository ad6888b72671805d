"""shmstm's exceptions.  Every error the library raises is a ``shmstm.Error``;
many are also the matching builtin (``ValueError``, ``TimeoutError``, ...) so
that generic handlers keep working."""


class Error(Exception):
    """Base class of all shmstm errors."""


class StaleTVarError(Error):
    """The handle names a TVar that was freed (or never existed: a forged or
    out-of-range handle)."""


class EncodeError(Error, TypeError):
    """A value could not be encoded (it is not picklable)."""


class ValueTooLargeError(Error, ValueError):
    """An encoded value is larger than the runtime's ``max_value_size``."""


class HeapFullError(Error, MemoryError):
    """The shared value heap has no room for the value."""


class TVarTableFullError(Error):
    """The TVar table (``max_tvars``) or the name directory is full."""


class TooManyProcessesError(Error):
    """Every process slot (``max_procs``) is taken by a live process or thread."""


class LayoutMismatchError(Error):
    """The segment was made by a build with another layout version, or is not
    a shmstm segment."""


class CorruptSegmentError(Error):
    """The segment header or a structure in it is inconsistent; also raised on
    reading or writing a TVar that a dead commit with a corrupt record left
    locked for good (docs/reliability.md)."""


class SegmentInitError(Error):
    """The segment's creator never finished initialising it (it may have been
    killed half-way); remove it with ``shmstm.unlink(name)``."""


class LimitMismatchError(Error, ValueError):
    """``open()`` was given limits that differ from the existing segment's."""


class RuntimeClosedError(Error):
    """The runtime was closed in this process."""


class SegmentNotFoundError(Error, FileNotFoundError):
    """No segment with that name exists."""


class RuntimeExistsError(Error, FileExistsError):
    """``open(name, create=True)``: the runtime exists already."""


class PermissionDeniedError(Error, PermissionError):
    """The segment belongs to another user or has a mode other than 0600."""


class NoSpaceError(Error, OSError):
    """/dev/shm has no room for a segment of this size."""


class CrossRuntimeError(Error):
    """One transaction touched TVars of two runtimes."""


class NotInTransactionError(Error):
    """retry(), check() or or_else() was called outside a transaction."""


class RetryTimeout(Error, TimeoutError):
    """A blocking transaction waited longer than its timeout."""


class BlockedForeverError(Error):
    """retry() was called by a transaction that read nothing: no commit could
    ever wake it."""


class ForkedContextError(Error):
    """A transaction context was used in a forked child (internal misuse)."""


class DurabilityError(Error):
    """A durable runtime cannot write its LMDB data (map full, I/O error), or
    its data and segment do not belong together."""


class DurabilityMismatchError(DurabilityError):
    """The segment and the durable data at the path belong to different
    runtimes (runtime id or path differ), or the segment is not durable."""


class DurableFormatError(DurabilityError):
    """The durable data at the path is in a format this version of shmstm does
    not read (a newer version wrote it); nothing was written to it."""
