"""A durable runtime's side in the processes that use it: the durability
modes (and the per-thread override), loading the named TVars at creation,
starting the flusher and holding its place, waiting for commits to reach
LMDB, and the ring's facts for the statistics."""
import os
import subprocess
import sys
import threading
import time

from .. import errors
from .._codec import from_record
from .._core import error_for, ffi, lib, new_call
from .env import _check_map_size, _dbs, begin, open_env  # noqa: F401 (_check_map_size: open())
from .schema import LogDBs, durable_items, read_meta, read_writer

READY_WAIT = 10.0             # seconds an attacher waits for the creator to load LMDB
FLUSHER_START_TRIES = 3       # failed flusher starts in a row before committers get an error
FLUSHER_START_WAIT = 10.0     # seconds a start in flight holds up the next one


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
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    def prepare(path, limits, map_size=None):
        """Before create: the LMDB's runtime id and flushed_wv go into the new
        segment's parameters; ``writer``: the runtime whose flusher writes the
        data (schema.read_writer), for the opener to check."""
        env = open_env(path, map_size=map_size)
        fw, rid = read_meta(env)
        return {"ring_slots": limits.get("ring_slots") or default_ring_slots(limits["max_procs"]),
                "clock_start": fw, "runtime_id": rid, "writer": read_writer(env)}

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
        rt = self.rt
        env = open_env(self.path)
        vars_db, _ = _dbs(env)
        logs = LogDBs(env)
        ctx = rt._ctx()
        oi = ffi.new("uint32_t[2]")
        with begin(env) as txn:
            items = durable_items(txn, vars_db, logs)
        for name, v in items.items():
            tag, payload = from_record(v)
            rc = new_call(lib.shmstm_tvar_named, ctx.ptr, (name, len(name)), tag, payload, oi)
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
        if not self.rt._name_is_ours():
            # A flusher attaches by name: none can start for a segment whose
            # name was unlinked (or now names another segment).
            raise errors.DurabilityError(
                "the flusher of durable runtime %r is not running and cannot be started: the "
                "runtime's name was unlinked while it was open, so its commits not yet in LMDB "
                "cannot be written (unlink only runtimes that are closed everywhere)" % self.rt.name)
        with _children_lock:
            return self._start_flusher(key)

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
        pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # cwd: python -m puts the working directory first on sys.path, and a
        # source checkout there (shmstm/ without the compiled core) must not
        # shadow this package.
        p = subprocess.Popen(
            [sys.executable, "-m", "shmstm.store.flusher", self.rt.name], env=_flusher_env(),
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


def _forget_children():
    # A fork child's parent's flusher children are not its own.
    global _children_lock
    _children.clear()
    _children_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_children)
