"""Reading a segment's counters without taking a slot or a lock."""
from ._binding import ffi, lib

ABORT_REASONS = ("locked", "validate", "user", "stale", "resource")
PROC_STATES = ("free", "active", "recovering")


def runtime_stats(seg, name, hot=10):
    """A dict of everything the segment says about itself (see docs/api.md)."""
    info = ffi.new("shmstm_seg_info *")
    lib.shmstm_seg_info_get(seg, info)
    procs = []
    pi = ffi.new("shmstm_proc_info *")
    for slot in range(info.max_procs):
        lib.shmstm_seg_proc_info(seg, slot, pi)
        if pi.state == 0:
            continue
        procs.append({
            "slot": slot,
            "pid": pi.pid,
            "tid": pi.tid,
            "state": PROC_STATES[pi.state] if pi.state < 3 else str(pi.state),
            "alive": bool(pi.alive),
            "waiting": bool(pi.waiting),
            "commits": pi.commits,
            "ro_commits": pi.ro_commits,
            "aborts": {r: pi.aborts[i] for i, r in enumerate(ABORT_REASONS)},
            "retries": pi.retries,
            "wakeups": pi.wakeups,
            "bytes_committed": pi.bytes_committed,
            "irrevocable": pi.irrevocable,
            "commit_latency_log2_ns": [pi.lat_hist[i] for i in range(32)],
            "attach_ns": pi.attach_ns,
        })
    idx = ffi.new("uint32_t[]", hot)
    conf = ffi.new("uint32_t[]", hot)
    n = lib.shmstm_seg_hot_tvars(seg, idx, conf, hot)
    namebuf = ffi.new("char[]", 512)
    hottest = []
    for i in range(n):
        r = lib.shmstm_seg_name_of(seg, idx[i], namebuf, 512)
        hottest.append({
            "index": idx[i],
            "name": ffi.string(namebuf).decode("utf-8", "surrogateescape") if r >= 0 else None,
            "conflicts": conf[i],
        })
    classes = [
        {"block_size": info.class_size[c], "blocks": info.class_blocks[c]}
        for c in range(lib.SHMSTM_HEAP_CLASSES) if info.class_blocks[c]
    ]
    return {
        "name": name,
        "layout_version": info.layout_version,
        "runtime_id": bytes(ffi.buffer(info.runtime_id, 16)).hex(),
        "created_ns": info.created_ns,
        "creator_pid": info.creator_pid,
        "segment_size": info.seg_size,
        "clock": info.clock,
        "limits": {
            "max_tvars": info.max_tvars, "max_procs": info.max_procs,
            "heap_size": info.heap_size, "max_value_size": info.max_value_size,
        },
        "tvars": {"live": info.tvars_live, "slots_used": info.tvar_bump, "named": info.names},
        "heap": {"bump": info.heap_bump, "size": info.heap_size, "classes": classes},
        "irrevocable_holder_slot": info.token - 1 if info.token else None,
        "processes": procs,
        "hottest_tvars": hottest,
    }
