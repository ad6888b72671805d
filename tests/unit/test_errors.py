"""Clear exceptions for bad input, and the segment stays usable after each."""
import os
import posix_ipc
import pytest

import shmstm
from shmstm import _core


def _still_works(rt):
    tv = rt.new_tvar(1)
    assert tv.modify(lambda v: v + 1) == 2


def test_wrong_types(runtime):
    with pytest.raises(TypeError):
        runtime.tvar(5)
    with pytest.raises(TypeError):
        shmstm.atomically(42)
    with pytest.raises(TypeError):
        shmstm.open(3)
    with pytest.raises(ValueError):
        shmstm.open("a/b")
    with pytest.raises(TypeError):
        shmstm.open("x", bogus_limit=3)
    with pytest.raises(ValueError):
        runtime.tvar("")
    _still_works(runtime)


def test_unpicklable_value_changes_nothing(runtime):
    tv = runtime.new_tvar("old")
    with pytest.raises(shmstm.EncodeError):
        tv.value = lambda: 1
    with pytest.raises(TypeError):              # EncodeError is a TypeError
        shmstm.atomically(lambda: setattr(tv, "value", posix_ipc))
    assert tv.value == "old"
    _still_works(runtime)


def test_oversized_value(runtime):
    tv = runtime.new_tvar(0)
    size = runtime.limits["max_value_size"]
    with pytest.raises(shmstm.ValueTooLargeError):
        tv.value = b"x" * (size + 1)
    with pytest.raises(ValueError):
        runtime.new_tvar("y" * (size + 1))
    tv.value = b"x" * size                      # exactly the limit is fine
    assert len(tv.value) == size
    _still_works(runtime)


def test_heap_full_then_room_again(segname):
    rt = shmstm.open(segname, max_tvars=4096, heap_size=1 << 16, max_value_size=4096)
    try:
        tvs = []
        with pytest.raises(shmstm.HeapFullError):
            for _ in range(100):
                tvs.append(rt.new_tvar(b"z" * 4000))
        assert len(tvs) >= 8
        keep = tvs[0].value
        for tv in tvs[1:]:
            tv.free()
        assert tvs[0].value == keep
        again = rt.new_tvar(b"w" * 4000)        # freed blocks are reused
        assert again.value == b"w" * 4000
        _still_works(rt)
    finally:
        rt.close()


def test_tvar_table_full(segname):
    rt = shmstm.open(segname, max_tvars=16, heap_size=1 << 16)
    try:
        tvs = [rt.new_tvar(i) for i in range(16)]
        with pytest.raises(shmstm.TVarTableFullError):
            rt.new_tvar(99)
        tvs[3].free()
        assert rt.new_tvar(7).value == 7
    finally:
        rt.close()


def test_forged_and_stale_handles(runtime):
    tv = runtime.new_tvar(1)
    idx, gen = tv._idx, tv._gen
    for forged_idx, forged_gen in [(idx, gen + 2), (10**6, 1), (2**32 - 1, 1), (idx, 0)]:
        f = shmstm.TVar(runtime, forged_idx, forged_gen, None)
        with pytest.raises(shmstm.StaleTVarError):
            f.value
        with pytest.raises(shmstm.StaleTVarError):
            f.value = 5
    with pytest.raises(shmstm.StaleTVarError):
        shmstm.stm.tvar._tvar_from_pickle(runtime, -1, 1, None)
    assert tv.value == 1
    _still_works(runtime)


def test_limit_mismatch(runtime, segname):
    with pytest.raises(shmstm.LimitMismatchError):
        shmstm.open(segname, max_tvars=runtime.limits["max_tvars"] + 1)
    _still_works(runtime)


def test_use_after_close(segname):
    rt = shmstm.open(segname, max_tvars=64, heap_size=1 << 16)
    tv = rt.new_tvar(1)
    rt.close()
    with pytest.raises(shmstm.RuntimeClosedError):
        tv.value
    with pytest.raises(shmstm.RuntimeClosedError):
        rt.new_tvar(1)


def test_close_from_another_thread_wakes_its_retry_wait(segname):
    """close() while another thread of the process is blocked in retry() on
    the runtime: the waiter is woken and raises RuntimeClosedError (before,
    it slept for good on a freed context), close() returns, and the shared
    state is intact: another open sees and changes it."""
    import threading
    import time

    rt = shmstm.open(segname, max_tvars=64, heap_size=1 << 16)
    tv = rt.tvar("x", 0)
    got = []

    def waiter():
        try:
            shmstm.atomically(lambda: shmstm.check(tv.get() > 0))
            got.append("returned")
        except shmstm.RuntimeClosedError as e:
            got.append(e)

    def retries():
        return sum(p["retries"] for p in rt.stats()["processes"])

    t = threading.Thread(target=waiter, daemon=True)     # a failure must not hang pytest
    t.start()
    end = time.monotonic() + 30
    while retries() < 1:                    # the waiter is in the core's wait
        assert time.monotonic() < end, "the waiter never reached retry()"
        time.sleep(0.001)
    rt.close()
    t.join(30)
    assert not t.is_alive()
    assert len(got) == 1 and isinstance(got[0], shmstm.RuntimeClosedError), got
    assert "closed by another thread" in str(got[0])
    rt2 = shmstm.open(segname, max_tvars=64, heap_size=1 << 16)
    try:
        x = rt2.tvar("x", 0)
        assert x.value == 0
        x.value = 1
        assert x.value == 1
    finally:
        rt2.close()


def test_cross_runtime_transaction(runtime, segname):
    other_name = segname + "-2"
    other = shmstm.open(other_name, max_tvars=64, heap_size=1 << 16)
    try:
        a, b = runtime.new_tvar(1), other.new_tvar(2)
        with pytest.raises(shmstm.CrossRuntimeError):
            shmstm.atomically(lambda: a.value + b.value)
        assert a.value == 1 and b.value == 2
    finally:
        other.close()
        shmstm.unlink(other_name)


def test_layout_mismatch_and_garbage_segments(segname):
    """A segment of another layout, or not ours at all, is a clear error."""
    shm = posix_ipc.SharedMemory("/shmstm." + segname, posix_ipc.O_CREX, mode=0o600, size=1 << 16)
    try:
        import mmap
        m = mmap.mmap(shm.fd, 1 << 16)
        m[0:8] = b"NOTSHMST"
        m[16:20] = (1).to_bytes(4, "little")   # init_state READY
        m.close()
        with pytest.raises(shmstm.LayoutMismatchError):
            shmstm.open(segname)
    finally:
        shm.close_fd()
        shm.unlink()


def test_half_initialised_segment_times_out(segname, monkeypatch):
    shm = posix_ipc.SharedMemory("/shmstm." + segname, posix_ipc.O_CREX, mode=0o600, size=1 << 16)
    shm.close_fd()
    try:
        monkeypatch.setattr(shmstm.shm.runtime, "_WAIT_FOR_INIT_NS", 200_000_000)
        rt = shmstm.Runtime(segname)
        with pytest.raises(shmstm.SegmentInitError):
            rt._attach({}, wait_ns=200_000_000)
    finally:
        shm.unlink()


def test_durability_bad_mode(segname):
    with pytest.raises(ValueError, match="durability"):
        shmstm.open(segname, durability="fsync")
    with pytest.raises(ValueError, match="durability"):
        shmstm.open(segname, path="/tmp/x", durability="none")


def test_bad_map_size(segname, tmp_path):
    """A bad map_size is refused before anything is created: no segment, no
    LMDB data."""
    d = str(tmp_path / "data")
    with pytest.raises(ValueError, match="map_size needs a path"):
        shmstm.open(segname, map_size=1 << 20)
    with pytest.raises(TypeError, match="map_size must be an int"):
        shmstm.open(segname, path=d, map_size="1G")
    for bad in (1000, 1 << 12, (1 << 20) + 1, 1 << 50):
        with pytest.raises(ValueError, match="map_size must be a multiple of 4096"):
            shmstm.open(segname, path=d, map_size=bad)
    assert not os.path.exists(os.path.join(d, "data.mdb"))
    assert not os.path.exists("/dev/shm" + _core.shm_name(segname))


def test_full_dev_shm_is_a_clear_error_at_creation(segname):
    """A segment larger than /dev/shm has free is NoSpaceError at creation (no
    SIGBUS later), and nothing is left behind: neither the runtime's name nor a
    temporary one."""
    import glob
    vfs = os.statvfs("/dev/shm")
    free = vfs.f_bavail * vfs.f_frsize
    heap = min(((free + (1 << 30)) // (1 << 20)) << 20, 1 << 36)
    assert heap > free, "/dev/shm too large for this test (%d bytes free)" % free
    with pytest.raises(shmstm.NoSpaceError, match="/dev/shm"):
        shmstm.open(segname, heap_size=heap)
    assert glob.glob("/dev/shm/shmstm.%s*" % segname) == []
    with shmstm.open(segname, heap_size=1 << 20) as rt:     # the name is usable at once
        rt.tvar("x", 0).value = 1
    shmstm.unlink(segname)


def test_fault_injection_is_compiled_out_of_release_builds():
    """The kill points, delays and shake exist only in debug builds: a release
    build (what pip install . makes) refuses to arm them; a debug build
    (SHMSTM_DEBUG=1, the ASan runs) arms and disarms them."""
    from shmstm._core import ffi, lib
    debug = ffi.string(lib.shmstm_build_info()).decode().endswith(" debug")
    rc = lib.shmstm_fault_set(b"no.such.point", 1, 0, 0, 0)
    if debug:
        assert rc == 0 and lib.shmstm_fault_set(ffi.NULL, 0, 0, 0, 0) == 0
    else:
        assert rc == lib.SHMSTM_EINVAL


def test_build_info_names_the_version_and_the_layout():
    """The compiled core says which package version and segment layout it is
    (a stale build is refused at import by that version)."""
    from shmstm._core import ffi, lib

    info = ffi.string(lib.shmstm_build_info()).decode().split()
    assert info[0] == shmstm.__version__
    assert info[1] == "layout=%d" % lib.SHMSTM_LAYOUT_VERSION_
    assert info[2] in ("debug", "release")


def test_a_value_block_that_does_not_decode_is_corrupt_segment_error(runtime):
    """Regression: corrupt value bytes surfaced as a raw UnpicklingError or
    UnicodeDecodeError; they are CorruptSegmentError (the bytes were encoded
    when written, so only a corrupted segment holds such a block)."""
    import mmap

    import posix_ipc

    p = runtime.new_tvar(("PICKLE-MARKER-4f2a", 1))
    s = runtime.new_tvar("STR-MARKER-8c1d and more text")
    shm = posix_ipc.SharedMemory("/shmstm." + runtime.name, 0)
    try:
        m = mmap.mmap(shm.fd, 0)
    finally:
        shm.close_fd()
    try:
        i = m.find(b"PICKLE-MARKER-4f2a")
        j = m.find(b"STR-MARKER-8c1d")
        assert i > 0 and j > 0
        m[i - 2:i] = b"\xff\xff"          # the string's opcode and length: an invalid load key
        m[j:j + 2] = b"\xff\xfe"          # not UTF-8
    finally:
        m.close()
    for tv in (p, s):
        with pytest.raises(shmstm.CorruptSegmentError, match="cannot be decoded"):
            tv.value
        with pytest.raises(shmstm.CorruptSegmentError, match="cannot be decoded"):
            shmstm.atomically(lambda: tv.value)
    tv = runtime.new_tvar(5)              # the runtime still works
    assert tv.value == 5


def test_importing_from_the_source_tree_says_so(tmp_path):
    """Regression: Python run inside the repository imports its source tree
    (no compiled modules) instead of the installed package, and the error
    told the user to 'pip install .', which they had just done."""
    import shutil
    import subprocess
    import sys

    src = os.path.dirname(shmstm.__file__)
    shutil.copytree(src, str(tmp_path / "shmstm"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "setup.py").write_text("# a source checkout\n")
    # As a user of a regular install runs it; an in-place build (pip install
    # -e) adds a finder that would find the checkout first whatever the cwd.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in repr(f).lower()]; import shmstm")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "imported from its source tree" in r.stderr and "another directory" in r.stderr, \
        r.stderr[-2000:]


def test_durability_without_a_path_on_a_new_name_says_a_path_is_needed(segname):
    with pytest.raises(shmstm.SegmentNotFoundError, match="created by open.. with path="):
        shmstm.open(segname, durability="sync")
    with pytest.raises(ValueError, match="needs path="):
        shmstm.open(segname, durability="sync", create=True)
    assert not os.path.exists("/dev/shm/shmstm." + segname)
