"""The compiled core as Python sees it: the one import of shmstm._native (cffi)
and shmstm._fast (the hot calls), the table that maps the core's return codes
to exceptions, and the conventions every layer shares (segment names, the
call that creates a TVar)."""
import os

from . import errors
from .__about__ import __version__

try:
    from ._native import ffi, lib
    from . import _fast
except ImportError as e:
    _pkg = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(os.path.dirname(_pkg), "setup.py")):
        # Python found the source tree first (the current directory, or the
        # directory of the script, comes first on sys.path).
        raise ImportError(
            "shmstm was imported from its source tree %s, which has no compiled modules, "
            "instead of the installed package: run Python from another directory, or "
            "build it in place with 'pip install -e .' (%s)" % (_pkg, e)) from e
    raise ImportError(  # pragma: no cover - a broken install
        "shmstm's compiled modules (shmstm._native, shmstm._fast) are missing: install "
        "the package with 'pip install .' so that setup.py builds them (%s)" % e
    ) from e

_build = ffi.string(lib.shmstm_build_info()).decode()
if not _build.startswith(__version__ + " "):
    raise ImportError(
        "shmstm._native was built for %r but the Python package is %s: rebuild "
        "with 'pip install .'" % (_build, __version__)
    )


def address(cdata):
    """A cffi pointer as the int that shmstm._fast takes."""
    return int(ffi.cast("uintptr_t", cdata))


# shmstm._fast calls the core through this table (native/fast.h); bind()
# refuses a table of another ABI.
_fast.bind(address(lib.shmstm_fast_table()))


_ERRORS = {
    lib.SHMSTM_ESTALE: (errors.StaleTVarError, "the TVar was freed; this handle is stale"),
    lib.SHMSTM_EBADHANDLE: (errors.StaleTVarError, "the handle names no TVar of this runtime (forged or out of range)"),
    lib.SHMSTM_ETOOLARGE: (errors.ValueTooLargeError, "the value is larger than max_value_size"),
    lib.SHMSTM_EHEAPFULL: (errors.HeapFullError, "the shared value heap is full"),
    lib.SHMSTM_ETVARSFULL: (errors.TVarTableFullError, "the TVar table is full (max_tvars)"),
    lib.SHMSTM_EDIRFULL: (errors.TVarTableFullError, "the name directory is full"),
    lib.SHMSTM_EPROCSFULL: (errors.TooManyProcessesError, "every process slot is in use (max_procs)"),
    lib.SHMSTM_ELAYOUT: (errors.LayoutMismatchError, "the segment is not a shmstm segment of this layout version"),
    lib.SHMSTM_ECORRUPT: (errors.CorruptSegmentError, "the segment is corrupt"),
    lib.SHMSTM_EPERM: (errors.PermissionDeniedError, "the segment belongs to another user or is not mode 0600"),
    lib.SHMSTM_EINIT: (errors.SegmentInitError, "the segment's creator never finished initialising it"),
    lib.SHMSTM_ENOMEM: (MemoryError, "out of process memory"),
    lib.SHMSTM_ETIMEOUT: (errors.RetryTimeout, "timed out"),
    lib.SHMSTM_EINVAL: (errors.Error, "invalid argument"),
    lib.SHMSTM_EFORKED: (errors.ForkedContextError, "context inherited across fork"),
    lib.SHMSTM_ENOSPC: (errors.NoSpaceError, "no room in /dev/shm for the segment"),
    lib.SHMSTM_ENOTFOUND: (KeyError, "not found"),
    lib.SHMSTM_EDUP: (errors.Error, "internal error: a TVar staged twice"),
    lib.SHMSTM_ENOFLUSHER: (errors.DurabilityError, "the commit ring is full and its flusher is not running"),
    lib.SHMSTM_EDURABLE: (errors.DurabilityError, "the flusher cannot write the durable data (LMDB); commit refused"),
    lib.SHMSTM_ECLOSED: (errors.RuntimeClosedError, "the runtime was closed"),
    lib.SHMSTM_ENAMED: (errors.Error, "a named TVar cannot be freed"),
    lib.SHMSTM_EFOREIGN: (errors.DurabilityMismatchError,
                          "another runtime writes the same durable data (two runtimes opened "
                          "with one path)"),
    lib.SHMSTM_ELOST: (errors.CorruptSegmentError,
                       "the TVar is locked for good: a process died past the commit point of a commit "
                       "on it whose record in shared memory was corrupt, so that commit can be neither "
                       "finished nor undone; re-create the runtime (its other TVars still work)"),
}


def error_for(rc, what=None):
    """The exception for return code ``rc`` (a negative SHMSTM_E* value)."""
    if rc == lib.SHMSTM_ESYS:
        err = ffi.errno
        return OSError(err, "%s: %s" % (what or "system call failed", os.strerror(err)))
    cls, msg = _ERRORS.get(rc, (errors.Error, "error %d" % rc))
    return cls("%s: %s" % (what, msg) if what else msg)


def check(rc, what=None):
    if rc < 0:
        raise error_for(rc, what)
    return rc


# ---------------------------------------------------------------- segment names

SHM_DIR = "/dev/shm"
PREFIX = "shmstm."


def shm_name(name):
    """The POSIX shm name of runtime ``name``."""
    return "/" + PREFIX + name


def check_name(name):
    if not isinstance(name, str):
        raise TypeError("runtime name must be a str, not %s" % type(name).__name__)
    if not name or len(name) > 200 or "/" in name or "\0" in name:
        raise ValueError("runtime name must be 1-200 characters without '/' or NUL: %r" % (name,))


def new_call(fn, cptr, name_args, tag, payload, oi):
    """Call shmstm_tvar_new or shmstm_tvar_named (fn) with an encoded value
    (tag, payload: _codec.encode); oi receives (index, generation)."""
    if tag == lib.SHMSTM_TAG_FLOAT:
        return fn(cptr, *name_args, tag, 0, payload, ffi.NULL, 0, oi, oi + 1)
    if tag >= lib.SHMSTM_TAG_BYTES:
        return fn(cptr, *name_args, tag, 0, 0.0, payload, len(payload), oi, oi + 1)
    return fn(cptr, *name_args, tag, payload, 0.0, ffi.NULL, 0, oi, oi + 1)
