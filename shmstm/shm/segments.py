"""Segments on this machine: crash-safe creation, listing and cleanup.

* ``create_segment``: a runtime's segment is initialised under a private temporary
  name (``/shmstm.<name>.init-<pid>-<random>``) and then hard-linked to its real
  name, so the real name never refers to a half-initialised segment: a creator
  killed half-way leaves only its temporary name behind (Boost.Interprocess #128
  hung every later opener in that case; here the next opener just creates the
  runtime).  ``link(2)`` fails if the name exists, so of two concurrent creators
  exactly one wins and the other attaches to the winner's segment.
* ``list_segments``: every ``/dev/shm/shmstm.*`` object with its attached processes,
  read through a read-only mapping: no process slot, no TVar lock, no write.
* ``cleanup_segments``: removes the segments no live process uses (no live slot
  owner, no process mapping it), never another user's.
"""
import os
import re
import stat
from typing import Any, Dict, Iterable, List, Optional

import posix_ipc

from .. import errors
from .._core import PREFIX, SHM_DIR, _fast, address, error_for, ffi, lib, shm_name
# Temporary name of a segment being initialised: <name>.init-<creator pid>-<8 hex>.
_TMP_RE = re.compile(r"^(?P<base>.+)\.init-(?P<pid>[0-9]+)-[0-9a-f]{8}$")

__all__ = ["list_segments", "cleanup_segments"]


def _path(shmname):
    return SHM_DIR + shmname


def create_segment(name, lim, params, segp, fill=None):
    """Create runtime ``name``'s segment with limits ``lim`` (and ``fill(params)``
    called to set the other creation parameters, if given).

    Returns True if this call created it (``segp[0]`` is the mapped segment, and
    ``params`` its parameters), False if the name already exists (nothing is left
    mapped).  ``segp`` (a ``shmstm_seg *[1]``) is the caller's box: the core
    writes it, and shmstm._fast.detach empties it, so no bytecode runs with a
    mapping that no box holds.  Raises on errors; never leaves the temporary name behind unless
    killed."""
    tmp = "%s.init-%d-%s" % (shm_name(name), os.getpid(), os.urandom(4).hex())
    try:
        shm = posix_ipc.SharedMemory(tmp, posix_ipc.O_CREX, mode=0o600, size=0)
    except posix_ipc.PermissionsError as e:
        raise errors.PermissionDeniedError("cannot create %s: %s" % (tmp, e)) from None
    try:
        if not os.path.exists(_path(tmp)):       # pragma: no cover - shm not in /dev/shm
            raise errors.Error("POSIX shared memory is not in %s on this system" % SHM_DIR)
        params.max_tvars = lim["max_tvars"]
        params.max_procs = lim["max_procs"]
        params.max_value_size = lim["max_value_size"]
        params.heap_size = lim["heap_size"]
        if fill is not None:
            fill(params)
        rc = lib.shmstm_seg_create(shm.fd, params, segp)
        if rc < 0:
            raise error_for(rc, "creating runtime %r" % name)
        try:
            os.link(_path(tmp), _path(shm_name(name)))
        except FileExistsError:
            _fast.detach(address(segp))        # takes it out of segp and unmaps, in one call
            return False
        except BaseException:
            _fast.detach(address(segp))
            raise
        return True
    finally:
        shm.close_fd()
        try:
            shm.unlink()                          # the temporary name only
        except posix_ipc.ExistentialError:
            pass


# ---------------------------------------------------------------- liveness

def _pid_alive(pid):
    """The kernel's answer: /proc/<pid> exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True         # cannot tell (EMFILE, ...): never take it for dead
    state = data[data.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"")


def _mapping_pids():
    """{inode: set of live pids} for every file in /dev/shm some process maps
    (/proc/<pid>/maps; processes we may not read are skipped).  By inode, not by
    path: a creator maps its segment under the temporary name, which the maps file
    keeps showing (as deleted) after the segment was linked to its real name."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/maps" % entry) as f:
                for line in f:
                    if SHM_DIR + "/" not in line:
                        continue
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[4].isdigit():
                        found.setdefault(int(fields[4]), set()).add(int(entry))
        except OSError:
            pass
    me = os.getpid()
    return {ino: {q for q in pids if q == me or _pid_alive(q)} for ino, pids in found.items()}


# ---------------------------------------------------------------- reading a segment

def _error_text(rc):
    e = error_for(rc)
    return "%s: %s" % (type(e).__name__, e)


def _attach_ro(path):
    """(seg, None) with ``seg`` mapped read-only, or (None, error text)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, "FileNotFoundError: removed while listing"
    except OSError as e:
        return None, "%s: %s" % (type(e).__name__, e)
    try:
        params = ffi.new("shmstm_params *")
        segp = ffi.new("shmstm_seg **")
        rc = lib.shmstm_seg_attach(fd, 1, 0, params, segp)
    finally:
        os.close(fd)
    if rc < 0:
        return None, _error_text(rc)
    return segp[0], None


def _slot_table(seg):
    info = ffi.new("shmstm_seg_info *")
    lib.shmstm_seg_info_get(seg, info)
    pi = ffi.new("shmstm_proc_info *")
    procs = []
    for slot in range(info.max_procs):
        lib.shmstm_seg_proc_info(seg, slot, pi)
        if pi.state != 0:
            procs.append({"slot": slot, "pid": pi.pid, "alive": bool(pi.alive)})
    return procs


def _locked(seg, cap=4096):
    idx = ffi.new("uint32_t[]", cap)
    own = ffi.new("uint32_t[]", cap)
    n = lib.shmstm_seg_locked(seg, idx, own, cap)
    return [(idx[i], own[i]) for i in range(min(n, cap))], n


def _describe(fn, maps):
    path = os.path.join(SHM_DIR, fn)
    d = {
        "name": fn[len(PREFIX):], "shm_path": path, "size": None, "uid": None, "mode": None,
        "layout_ok": False, "error": None, "processes": [], "live_processes": 0,
        "stale": False, "mapped_by": [], "locked_tvars": 0,
        "dead_locks": 0, "orphan_locks": 0, "lost_locks": 0, "creating": None, "unflushed": 0,
    }
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        d["error"] = "FileNotFoundError: removed while listing"
        return d
    d["size"], d["uid"], d["mode"] = st.st_size, st.st_uid, stat.S_IMODE(st.st_mode)
    d["mapped_by"] = sorted(maps.get(st.st_ino, ()))
    m = _TMP_RE.match(d["name"])
    if m:
        # A temporary name: a creator is (or was) initialising runtime <base>.
        pid = int(m.group("pid"))
        d["creating"] = {"runtime": m.group("base"), "pid": pid, "alive": _pid_alive(pid)}
    if st.st_uid != os.geteuid():
        d["error"] = ("PermissionDeniedError: owned by another user (uid %d); never "
                      "opened or removed" % st.st_uid)
        return d
    if not stat.S_ISREG(st.st_mode):
        d["error"] = "not a regular file"
        return d
    seg, err = _attach_ro(path)
    if seg is None:
        d["error"] = err
    else:
        try:
            d["layout_ok"] = True
            d["processes"] = _slot_table(seg)
            owners = {p["slot"]: p["alive"] for p in d["processes"]}
            locked, n = _locked(seg)
            d["locked_tvars"] = n
            # Locks of a dead owner (recovered with its slot), locks naming no
            # owner at all (a FREE or impossible slot: corrupt words, released),
            # both at the next attach; and locks a lost record left (for good).
            d["dead_locks"] = sum(1 for _, slot in locked if owners.get(slot) is False)
            d["lost_locks"] = sum(1 for _, slot in locked if slot == lib.SHMSTM_LOST_OWNER)
            d["orphan_locks"] = n - d["dead_locks"] - d["lost_locks"] - sum(
                1 for _, slot in locked if owners.get(slot) is True)
            ri = ffi.new("shmstm_ring_info *")
            lib.shmstm_ring_info_get(seg, ri)
            if ri.ring_slots and ri.committed_wv > ri.flushed_wv:
                # Commits only this segment's ring holds (its flusher could not
                # write them, or was killed with everyone): never stale.
                d["unflushed"] = ri.committed_wv - ri.flushed_wv
        finally:
            lib.shmstm_seg_detach(seg)
    d["live_processes"] = sum(1 for p in d["processes"] if p["alive"])
    if d["creating"] is not None:
        # Nobody but its creator ever opens a temporary name, and once linked the
        # segment lives on under the real name: removable as soon as the creator
        # is dead, whatever the slot table (shared with the real name) says.
        d["stale"] = not d["creating"]["alive"]
    else:
        d["stale"] = not d["live_processes"] and not d["mapped_by"] and not d["unflushed"]
    return d


def list_segments() -> List[Dict[str, Any]]:
    """Every shmstm segment in /dev/shm, as a list of dicts (see docs/api.md):
    ``name``, ``shm_path``, ``size``, ``uid``, ``mode``, ``layout_ok``, ``error``,
    ``processes`` (``[{slot, pid, alive}]``), ``live_processes``, ``stale``, plus
    ``mapped_by`` (pids mapping it), ``locked_tvars``, ``dead_locks`` (held by
    dead processes: recovered at the next attach), ``orphan_locks`` (corrupt
    lock words naming no process: released at the next attach), ``lost_locks``
    (held for good after a lost commit record: docs/reliability.md),
    ``creating`` (for a temporary name: ``{runtime, pid, alive}`` of its creator)
    and ``unflushed`` (commits of a durable runtime not yet in LMDB: such a
    segment is never stale; opening the runtime lets its flusher write them).

    Reads each segment through a read-only mapping: takes no process slot and no
    TVar lock.  Another user's segments are listed but never opened."""
    try:
        names = sorted(fn for fn in os.listdir(SHM_DIR) if fn.startswith(PREFIX))
    except FileNotFoundError:                   # pragma: no cover - no /dev/shm
        return []
    maps = _mapping_pids()
    return [_describe(fn, maps) for fn in names]


def cleanup_segments(dry_run: bool = False, names: Optional[Iterable[str]] = None) -> List[str]:
    """Remove every segment of this user that no live process uses: no slot owned
    by a live process (the kernel's answer: pid + start time), no process
    mapping it, and no durable commit that only its ring holds; a temporary
    name only once its creator is dead.  ``names``
    (iterable of runtime names) limits it to those runtimes (and their temporary
    names).  Returns the names removed (or, with ``dry_run``, that would be).

    Each candidate is examined again right before it is unlinked.  A process that
    opens a segment in the instant between that check and the unlink attaches to
    a removed segment: run cleanup when no process is starting on it."""
    wanted = None if names is None else set(names)
    removed = []
    for d in list_segments():
        if wanted is not None:
            base = d["creating"]["runtime"] if d["creating"] else d["name"]
            if d["name"] not in wanted and base not in wanted:
                continue
        if not d["stale"] or d["uid"] != os.geteuid():
            continue
        fn = os.path.basename(d["shm_path"])
        again = _describe(fn, _mapping_pids())
        if not again["stale"] or again["uid"] != os.geteuid():
            continue
        if not dry_run:
            try:
                os.unlink(d["shm_path"])
            except FileNotFoundError:
                continue
        removed.append(d["name"])
    return removed


def users(name):
    """The live pids that use runtime ``name``'s segment (own a slot of it or
    map it), for error messages; [] if it cannot be read."""
    fn = PREFIX + name
    try:
        d = _describe(fn, _mapping_pids())
    except OSError:
        return []
    pids = {p["pid"] for p in d["processes"] if p["alive"]} | set(d["mapped_by"])
    pids.discard(os.getpid())
    return sorted(pids)


def lock_note(d):
    """What happens to a listed segment's held locks, in words ("" if none)."""
    parts = []
    if d.get("dead_locks"):
        parts.append("%d lock(s) of dead processes (recovered at the next attach)" % d["dead_locks"])
    if d.get("orphan_locks"):
        parts.append("%d corrupt lock word(s) naming no process (released at the next attach)"
                     % d["orphan_locks"])
    if d.get("lost_locks"):
        parts.append("%d lock(s) held for good by a commit whose record was lost "
                     "(re-create the runtime; docs/reliability.md)" % d["lost_locks"])
    return "; ".join(parts)


def lock_report(name):
    """Locked TVars of runtime ``name`` right now: ``[{index, slot, pid, alive}]``
    (read-only mapping; for tests and diagnosis).  Exact only at quiescence."""
    seg, err = _attach_ro(_path(shm_name(name)))
    if seg is None:
        raise errors.Error("cannot read runtime %r: %s" % (name, err))
    try:
        procs = {p["slot"]: p for p in _slot_table(seg)}
        locked, _ = _locked(seg)
        return [{"index": i, "slot": s, "pid": procs.get(s, {}).get("pid"),
                 "alive": procs.get(s, {}).get("alive", False)} for i, s in locked]
    finally:
        lib.shmstm_seg_detach(seg)


def check_writer(writer, path, opening):
    """Refuse to open runtime ``opening`` on data another live runtime
    writes: ``writer`` (schema.parse_writer: created_ns, pid, name) names the
    runtime whose flusher writes the data at ``path``; refused if it has
    another name and its segment still exists under it, with that creation
    time and a live process attached.  (Two segments of one name: the
    flusher's own check.)"""
    if writer is None:
        return
    created_ns, _, name = writer
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
