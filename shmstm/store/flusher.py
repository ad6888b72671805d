"""The flusher: one process per durable runtime (``python -m shmstm._flusher NAME``).

Started fresh (never forked from a process that uses LMDB) by the first
opener, or by any process that finds the lease holder dead.  It:
  1. attaches the segment (no process slot: it does not count as attached),
     waits until it is READY, takes the lease (exits if a live flusher has it);
  2. opens LMDB itself (map size set once, reader_check at open), refuses data
     of another runtime id (sets durable_error: committers are refused);
  3. finishes a predecessor's work: slots up to LMDB's flushed_wv are already
     applied, so they are only recycled (never applied twice);
  4. loops: collect the processed slots after flushed_wv in wv order, write
     them (coalesced: last value per TVar) in ONE LMDB write transaction that
     also stores flushed_wv and the runtime id (a batch of 3-64 TVars as one
     log record in the main DB, keyed by its flushed_wv, folded into "vars"
     after LOG_FOLD records and when idle; see schema.py), then free the
     records, recycle
     the slots, advance flushed_wv and wake sync waiters.  A slot left EMPTY
     for GRACE seconds (its committer died before its commit point, or is
     stopped there) is voided;
  5. exits when no process slot is held (dead ones are reclaimed) and the
     ring is drained.

Kill points for the tests: SHMSTM_FLUSHER_FAULT=<point>:<n> SIGKILLs the
flusher the n-th time it reaches <point> (before_txn, in_txn, after_commit,
after_advance).
"""
import os
import signal
import struct
import sys
import time

import posix_ipc

from .._core import error_for, ffi, lib
from .env import DATA_FORMAT, _U32, _lmdb, adopt_map_size, lmdb_open, stored_format
from .schema import (LOG_KEY, _WRITER, LogDBs, describe_writer, last_log_wv, log_items, log_key,
                     log_records, stored_flushed)

GRACE = float(os.environ.get("SHMSTM_FLUSH_GRACE", "1.0"))
MAX_COMMITS = 65536
NAP_NS = 1_000_000            # a busy flusher's nap between batches (async commits wait it out)
ASYNC_NAP_NS = 5_000_000      # its nap after a batch without sync commits
IDLE_NAPS = 4                 # naps without a batch before it sleeps until woken
GROUP_WAIT_NS = 300_000       # group commit: the longest wait for a batch's stragglers
OWNER_YIELDS = 8              # yields for a preempted committer before a batch is cut at it
POLL_NS = int(os.environ.get("SHMSTM_FLUSH_POLL_NS", "1000000"))
POLL_MAX_SYNC = 2             # poll (not sleep) after a batch of at most this many sync commits
GROUP_MODE = os.environ.get("SHMSTM_FLUSH_GROUP", "auto")   # auto, wait, nowait
LOG = os.environ.get("SHMSTM_FLUSH_LOG", "1") == "1"   # small batches as log records
LOG_MIN_ITEMS = 3             # a batch of at least this many TVars, at most ...
LOG_ITEMS = 64                # ... this many ...
LOG_BYTES = 2048              # ... and bytes goes to the log as one record
LOG_FOLD = 64                 # log records before the next write folds them into "vars"
BUF = 8 << 20
# The collect's stop reasons and entry header (shmstm.h).
C_CLOCK, C_EMPTY, C_OWNER, C_FULL = (lib.SHMSTM_COLLECT_CLOCK, lib.SHMSTM_COLLECT_EMPTY,
                                     lib.SHMSTM_COLLECT_OWNER, lib.SHMSTM_COLLECT_FULL)
ENT_SIZE = ffi.sizeof("shmstm_collect_entry")
_fault = os.environ.get("SHMSTM_FLUSHER_FAULT", "")
_fault_point, _, _n = _fault.partition(":")
_fault_left = int(_n or 1) if _fault else 0


def fault(name):
    global _fault_left
    if _fault_left and name == _fault_point:
        _fault_left -= 1
        if _fault_left == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def attach(name):
    shm = posix_ipc.SharedMemory("/shmstm." + name, 0)
    params = ffi.new("shmstm_params *")
    segp = ffi.new("shmstm_seg **")
    try:
        rc = lib.shmstm_seg_attach(shm.fd, 0, 5_000_000_000, params, segp)
    finally:
        shm.close_fd()
    if rc < 0:
        raise SystemExit("flusher: cannot attach %r (%d)" % (name, rc))
    return segp[0], params


def main(argv):
    name = argv[1]
    try:
        seg, params = attach(name)
    except posix_ipc.ExistentialError:
        return 0
    end = time.monotonic() + 30
    while not lib.shmstm_ring_ready(seg):
        if time.monotonic() > end:
            return 1
        time.sleep(0.005)
    if lib.shmstm_flusher_claim(seg) != 1:
        return 0                        # a live flusher holds the lease
    flusher = None
    while True:
        try:
            if flusher is None:
                flusher = Flusher(seg, params, name)
            rc = flusher.run()
        finally:
            lib.shmstm_flusher_release(seg)
        # A process that attached between run()'s last look at the slots and
        # the release may have seen our lease and started no flusher: look
        # again after the release (the release and an opener's slot claim are
        # a Dekker pair with seq_cst fences, ring_flush.c), and carry on if so.
        if rc != 0 or not flusher.anyone_attached():
            return rc
        if lib.shmstm_flusher_claim(seg) != 1:
            return 0                    # an opener's flusher took over


class GroupTuner:
    """Whether the flusher waits for a group's stragglers, chosen by measured
    throughput.  Waiting makes one fsync serve the whole group, but nothing
    else happens meanwhile: the write starts only once the last straggler
    is back, and the committers run only while no write is going on.
    Writing at once lets the batches alternate between two halves of the
    committers, one half running while the other's write is in progress, at
    half the batch size.  Which is faster depends on the machine: with an
    fsync that is slow next to the committers' turnaround (a real disk), the
    wait is; where the turnaround is as long as the write (a fast virtual
    disk, 16 committers on 2 CPUs) writing at once was 1.2x-1.4x faster
    (docs/durability.md).  So the tuner measures both, in four EPOCH-long
    probes ordered wait, no wait, no wait, wait (a steady drift of the
    machine's speed counts the same for both), as sync commits acknowledged
    per second, and then keeps the faster for EXPLOIT epochs.  The wait stays
    unless not waiting was faster by MARGIN: it keeps P=2 groups of two
    together, and on a tie its fewer fsyncs are worth more.  Probes that saw
    the flusher idle, or too few sync batches, count for nothing: the round
    starts over.  SHMSTM_FLUSH_GROUP=wait or nowait fixes the choice."""
    EPOCH = 0.05
    EXPLOIT = 24
    MARGIN = 1.10
    MIN_BATCHES = 8          # a probe with fewer sync batches measures nothing
    PROBES = (True, False, False, True)

    def __init__(self, mode="auto", now=0.0):
        if mode not in ("auto", "wait", "nowait"):
            raise ValueError("SHMSTM_FLUSH_GROUP must be auto, wait or nowait, not %r" % mode)
        self.fixed = None if mode == "auto" else mode == "wait"
        self.decided = self.fixed if self.fixed is not None else True
        self.restart(now)

    def restart(self, now):
        """Begin a round of probes."""
        self.phase = 0           # < len(PROBES): probing; then keeping self.decided
        self.sums = {True: [0, 0.0], False: [0, 0.0]}   # commits, seconds
        self.wait = self.decided if self.fixed is not None else self.PROBES[0]
        self.start(now)

    def start(self, now):
        self.t0 = now
        self.n = self.batches = 0

    def word(self):
        """The choice for the stats (flusher_group in the segment)."""
        return ((lib.SHMSTM_FG_WAIT if self.decided else lib.SHMSTM_FG_NOWAIT)
                | (lib.SHMSTM_FG_FIXED if self.fixed is not None else 0))

    def idle(self, now):
        """The flusher slept without a batch: a probe would mix in the
        load's pauses."""
        if self.fixed is None and self.phase < len(self.PROBES):
            self.restart(now)
        else:
            self.start(now)

    def note(self, nsync, now):
        """A batch with ``nsync`` sync commits was acknowledged at ``now``."""
        if self.fixed is not None or not nsync:
            return
        self.n += nsync
        self.batches += 1
        if now - self.t0 < self.EPOCH:
            return
        probes = self.PROBES
        if self.phase < len(probes):
            if self.batches < self.MIN_BATCHES:
                self.restart(now)
                return
            acc = self.sums[probes[self.phase]]
            acc[0] += self.n
            acc[1] += now - self.t0
            self.phase += 1
            if self.phase == len(probes):
                (nw, tw), (nn, tn) = self.sums[True], self.sums[False]
                self.decided = not nn / tn > self.MARGIN * (nw / tw)
                self.wait = self.decided
            else:
                self.wait = probes[self.phase]
        else:
            self.phase += 1
            if self.phase >= len(probes) + self.EXPLOIT:
                self.restart(now)
                return
        self.start(now)


class Foreign(Exception):
    """Another runtime's flusher writes (or wrote) this LMDB data."""


class Flusher:
    def __init__(self, seg, params, name):
        self.seg = seg
        self.rid = bytes(ffi.buffer(params.runtime_id, 16))
        # meta b"writer": the segment whose flusher writes the data (creation
        # time, creator pid, name).  Runtimes made from the same data share
        # its runtime id, so the id alone cannot tell two of them apart.
        self.me = _WRITER.pack(params.created_ns, params.creator_pid) + name.encode()
        buf = ffi.new("char[]", 4096)
        n = lib.shmstm_ring_path(seg, buf, 4096)
        if n < 0:
            raise SystemExit("flusher: no path in the segment")
        self.path = ffi.string(buf).decode()
        lmdb = _lmdb()
        self.lmdb = lmdb
        self.env = lmdb_open(self.path)     # the stored map size; reader_check
        self.open_dbs()
        with self.env.begin() as txn:       # a predecessor's records, not folded yet
            self.log_n = sum(1 for _ in log_records(txn, self.logs))
        self.buf = ffi.new("char[]", BUF)
        self.mv = ffi.buffer(self.buf)
        self.out = ffi.new("shmstm_collect_out *")
        self.names = {}
        self.namebuf = ffi.new("char[]", 512)
        self.logbuf = ffi.new("char[]", LOG_BYTES)
        self.logmv = ffi.buffer(self.logbuf)
        self.info = ffi.new("shmstm_ring_info *")
        self.failing = False             # the last LMDB write failed
        self.tuner = GroupTuner(GROUP_MODE, time.monotonic())
        self.group_word = self.tuner.word()
        lib.shmstm_flusher_set_group(seg, self.group_word)
        self.rel_fills = 0               # sync_fills just before the last batch's release

    def open_dbs(self):
        self.vars = self.env.open_db(b"vars")
        self.meta = self.env.open_db(b"meta")
        self.logs = LogDBs(self.env)

    def seg_flushed(self):
        lib.shmstm_ring_info_get(self.seg, self.info)
        return self.info.flushed_wv, self.info.committed_wv

    def name_of(self, idx):
        k = self.names.get(idx)
        if k is None:
            n = lib.shmstm_seg_name_of(self.seg, idx, self.namebuf, 512)
            if n < 0:
                raise RuntimeError("flusher: TVar #%d has no name" % idx)
            k = self.names[idx] = ffi.buffer(self.namebuf, n)[:]
        return k

    def foreign(self, why):
        """Stop writing: committers are refused with DurabilityMismatchError."""
        print("flusher: %s; this runtime's commits stay in its segment's ring" % why,
              file=sys.stderr)
        lib.shmstm_ring_set_error(self.seg, lib.SHMSTM_EFOREIGN)
        return 2

    def check_writer(self, txn):
        """In every write transaction: the data is still ours to write."""
        w = txn.get(b"writer", db=self.meta)
        if w is None or bytes(w) != self.me:
            raise Foreign("another runtime (%s) took over the durable data at %r"
                          % (describe_writer(w), self.path))

    def run(self):
        try:
            return self._run()
        except Foreign as e:
            return self.foreign(str(e))

    def _run(self):
        # One write transaction decides whose the data is: LMDB serialises
        # writers, so two flushers never both take it.
        fs, _ = self.seg_flushed()
        with self.env.begin(write=True, db=self.meta) as txn:
            fl = stored_flushed(txn, self.meta, self.logs)
            rid = txn.get(b"runtime_id", db=self.meta)
            fmt = stored_format(txn, self.meta)     # lmdb_open refused a newer one
            writer = txn.get(b"writer", db=self.meta)
            writer = bytes(writer) if writer is not None else None
            if rid is not None and bytes(rid) != self.rid:
                raise Foreign("the durable data at %r belongs to another runtime (id %s, this "
                              "one's %s)" % (self.path, bytes(rid).hex(), self.rid.hex()))
            if writer is not None and writer != self.me and fl != fs:
                # Made from this data (at commit fs), and another runtime
                # wrote it since: two runtimes on one path.
                raise Foreign("another runtime (%s) wrote the durable data at %r since this "
                              "one was made from it (LMDB at commit %d, this runtime from %d)"
                              % (describe_writer(writer), self.path, fl, fs))
            if rid is None:
                txn.put(b"runtime_id", self.rid)
                txn.put(b"flushed_wv", struct.pack("<Q", max(fl, fs)))
            if fmt != DATA_FORMAT:
                txn.put(b"format", _U32.pack(DATA_FORMAT))
            if writer != self.me:
                txn.put(b"writer", self.me)
        if fl > fs:                      # a predecessor died after its LMDB commit
            lib.shmstm_ring_release(self.seg, fs + 1, fl)
        nxt = max(fl, fs) + 1
        empty_wv, empty_t = 0, 0.0
        idle = owner_waits = 0
        sync_last = 0                 # sync commits in the last batch
        while True:
            if not lib.shmstm_flusher_holds(self.seg):
                # Lost the lease (never expected: the claim is two-phase; see
                # shmstm_flusher_claim).  Two flushers must never write.
                print("flusher: lost the lease of the segment; exiting", file=sys.stderr)
                return 4
            fills = lib.shmstm_ring_sync_fills(self.seg)     # before the collect: group, async nap
            k = self.collect(nxt)
            if 0 < k and self.out.stop == C_OWNER and owner_waits < OWNER_YIELDS:
                # A committer is between its fill and its COMMITTED store (a
                # few instructions; it was preempted): let it finish rather
                # than cut the batch there, which would cost the commits
                # behind it, sync ones included, a whole LMDB write more.
                owner_waits += 1
                os.sched_yield()
                continue
            if 0 < k and self.out.stop in (C_CLOCK, C_EMPTY) and self.tuner.wait and \
                    (fills - self.rel_fills) & 0xFFFFFFFF < sync_last:
                k = self.group(nxt, sync_last)
            if k < 0:
                # Corrupt (the record of commit nxt fails its checks; every
                # commit before it is in LMDB) or out of memory: stop, with
                # the error for committers and the stats.
                print("flusher: cannot collect commit %d from the ring (%s); stopping with "
                      "LMDB at commit %d" % (nxt, error_for(k), nxt - 1), file=sys.stderr)
                lib.shmstm_ring_set_error(self.seg, k)
                return 3
            out = self.out
            stop, used, why = out.next_wv, out.used, out.stop
            if why != C_OWNER:
                owner_waits = 0
            if k == 0 and why == C_FULL:      # one commit's record is larger than the buffer
                self.grow()
                continue
            if k > 0:
                if not self.write(nxt, stop - 1, used, out.entries):
                    # LMDB error: committers are refused meanwhile.  With
                    # nobody attached, exit: the commits stay in the
                    # segment's ring, and the next opener's flusher retries.
                    if not self.anyone_attached():
                        print("flusher: no process attached; exiting with commits %d..%d "
                              "still in the segment's ring (not in LMDB)" % (nxt, self.seg_flushed()[1]),
                              file=sys.stderr)
                        return 0
                    time.sleep(1.0)
                    # A full map's remedy: an opener raised the stored map size.
                    adopt_map_size(self.env, None, self.path)
                    self.open_dbs()     # some py-lmdb versions drop DB handles on a resize
                    continue
                nxt = stop
                sync_last = out.syncs
                if sync_last:
                    self.tuner.note(sync_last, time.monotonic())
                    word = self.tuner.word()
                    if word != self.group_word:     # the stats' copy (flusher_group)
                        self.group_word = word
                        lib.shmstm_flusher_set_group(self.seg, word)
                idle = 0
                if not sync_last and why == C_CLOCK:
                    # An async-only batch: nap before the next one, so that
                    # batches grow with the commit rate (each TVar is written
                    # once per batch, however often it was committed).  Any
                    # sync fill since `fills` (read before this collect, which
                    # took every commit up to the clock and no sync one) ends
                    # the nap, also one made during the write.
                    lib.shmstm_flusher_wait_sync(self.seg, (fills + 1) & 0xFFFFFFFF, ASYNC_NAP_NS)
                continue
            if why == C_EMPTY:                # slot nxt still EMPTY
                now = time.monotonic()
                if empty_wv != nxt:
                    empty_wv, empty_t = nxt, now
                elif now - empty_t > GRACE:
                    lib.shmstm_ring_void(self.seg, nxt)
                    continue
                # Its committer is between its clock tick and its fill (a
                # few instructions): nap; only a sync commit wakes us early.
                lib.shmstm_flusher_sleep(self.seg, nxt, NAP_NS, lib.SHMSTM_FS_SYNC)
                continue
            if why == C_OWNER:                # owner between its fill and COMMITTED
                # A few instructions normally; long only if the owner is
                # preempted or stopped (SIGSTOP): then do not burn a core.
                owner_waits += 1
                if owner_waits < 64:
                    os.sched_yield()
                else:
                    time.sleep(0.001)
                continue
            # Caught up with the clock.  Busy (a batch in the last few naps):
            # nap, so that async commits are collected in batches instead of
            # each waking us (a syscall in the committer, a context switch
            # here); sync commits still wake us at once.  Idle: sleep until
            # any commit wakes us.
            idle += 1
            if idle == 1 and 0 < sync_last <= POLL_MAX_SYNC and POLL_NS > 0 and \
                    lib.shmstm_flusher_poll(self.seg, nxt, POLL_NS):
                # The last batch served one or two sync committers, which come
                # back within microseconds.  Waking a flusher asleep on an idle
                # vCPU can take far longer on a VM, and their vCPUs are idle
                # while they wait, so polling costs them nothing.  More sync
                # committers keep the flusher busy without it (group commit).
                continue
            if idle == 2:
                self.tuner.idle(time.monotonic())
            if idle < IDLE_NAPS:
                lib.shmstm_flusher_sleep(self.seg, nxt, NAP_NS, lib.SHMSTM_FS_SYNC)
                continue
            if self.log_n:
                self.fold_alone()             # idle: leave "vars" whole at rest
            if self.should_exit(nxt):
                return 0
            lib.shmstm_flusher_sleep(self.seg, nxt, 20_000_000, lib.SHMSTM_FS_ANY)

    def collect(self, nxt):
        return lib.shmstm_ring_collect(self.seg, nxt, MAX_COMMITS, self.buf, len(self.mv), self.out)

    def grow(self):
        """Double the batch buffer (a transaction wrote more than it holds)."""
        self.buf = ffi.new("char[]", 2 * len(self.mv))
        self.mv = ffi.buffer(self.buf)

    def group(self, nxt, last):
        """Group commit.  The ``last`` sync commits of the last batch were
        woken together by its release and come back about together; wait
        for them all (up to GROUP_WAIT_NS, woken only by sync fills), so that
        one fsync serves them all instead of each missing the LMDB commit
        just started and waiting a whole one.  They are counted from
        ``rel_fills``, sync_fills read just before the release: a sync commit
        that filled before it (it arrived during the write) is not one of
        them, so two committers whose commits went to alternate batches, each
        written alone, are waited for together again.  Async-only loads never
        wait here.  Returns the commits collected from nxt now.  After a
        batch of at most POLL_MAX_SYNC sync commits it polls instead of
        sleeping: an LMDB write begun just after a sleep is slower on a busy
        virtual machine (shmstm_flusher_poll_sync), and so few committers
        leave the CPU idle."""
        target = (self.rel_fills + last) & 0xFFFFFFFF
        if last <= POLL_MAX_SYNC and POLL_NS > 0:
            lib.shmstm_flusher_poll_sync(self.seg, target, GROUP_WAIT_NS)
        else:
            lib.shmstm_flusher_wait_sync(self.seg, target, GROUP_WAIT_NS)
        return self.collect(nxt)

    def fold(self, txn):
        """In ``txn``: apply the log's records to "vars", oldest first (each
        TVar written once, with its latest value), empty the log, and keep
        its flushed_wv (the last record's key) in meta."""
        if not self.log_n:
            return
        logs = self.logs
        last = last_log_wv(txn, logs)
        for k, v in log_items(txn, logs).items():
            txn.put(k, v, db=self.vars)
        cur = txn.cursor(db=logs.main)
        if cur.set_range(LOG_KEY):
            while cur.key().startswith(LOG_KEY) and cur.delete():
                pass                    # delete moves to the next record
        if logs.legacy is not None:
            txn.drop(logs.legacy, delete=False)     # 0.1.0's: emptied, never dropped
        fw = txn.get(b"flushed_wv", db=self.meta)
        if last > (struct.unpack("<Q", fw)[0] if fw else 0):
            txn.put(b"flushed_wv", struct.pack("<Q", last), db=self.meta)

    def fold_alone(self):
        """Fold the log in a transaction of its own (the flusher is idle).
        On an LMDB error the log stays (readers merge it), for the next try."""
        try:
            with self.env.begin(write=True) as txn:
                self.check_writer(txn)
                self.fold(txn)
        except self.lmdb.Error:
            return
        self.log_n = 0

    def seg_info(self):
        """The segment's facts after reclaiming dead slots."""
        lib.shmstm_seg_reclaim_dead(self.seg)
        info = ffi.new("shmstm_seg_info *")
        lib.shmstm_seg_info_get(self.seg, info)
        return info

    def anyone_attached(self):
        return self.seg_info().procs_active != 0

    def should_exit(self, nxt):
        info = self.seg_info()
        return info.procs_active == 0 and info.clock < nxt

    def items(self, used, n_entries):
        """The (name, value) pairs of the collected batch."""
        mv = self.mv
        pos = 0
        items = []
        for _ in range(n_entries):
            e = ffi.cast("shmstm_collect_entry *", self.buf + pos)
            ln = e.len
            pos += ENT_SIZE
            items.append((self.name_of(e.idx), bytes((e.tag,)) + mv[pos:pos + ln]))
            pos += (ln + 7) & ~7
        assert pos == used, "flusher: malformed batch (%d of %d bytes)" % (pos, used)
        return items

    def write(self, first, last, used, n_entries):
        """One LMDB write transaction for commits first..last: the collect
        coalesced them in C (each TVar once, with its latest value)."""
        rec = None
        if LOG and self.log_n < LOG_FOLD and LOG_MIN_ITEMS <= n_entries <= LOG_ITEMS:
            n = lib.shmstm_ring_encode_log(self.seg, self.buf, used, n_entries, self.logbuf, LOG_BYTES)
            if n >= 0:
                rec = self.logmv[:n]
            elif n != lib.SHMSTM_ETOOLARGE:
                raise RuntimeError("flusher: cannot encode a batch (%d)" % n)
        if rec is None:
            items = self.items(used, n_entries)
        fault("before_txn")
        try:
            with self.env.begin(write=True) as txn:
                self.check_writer(txn)
                if rec is not None:
                    # One record at the log's end, keyed by the batch's
                    # flushed_wv: only the main DB's pages change, where puts
                    # into "vars" dirty a leaf per TVar, and meta's and the
                    # main DB's (the named DBs' roots) more.
                    txn.put(log_key(last), rec, db=self.logs.main)
                    fault("in_txn")
                else:
                    self.fold(txn)
                    half = len(items) // 2
                    for j, (key, val) in enumerate(items):
                        if j == half:
                            fault("in_txn")
                        txn.put(key, val, db=self.vars)
                    txn.put(b"flushed_wv", struct.pack("<Q", last), db=self.meta)
                    txn.put(b"runtime_id", self.rid, db=self.meta)
            self.log_n = self.log_n + 1 if rec is not None else 0
        except self.lmdb.Error as e:
            # Committers are refused (before their commit point) until a
            # retry succeeds; the commits in the ring stay there.
            if not self.failing:
                print("flusher: LMDB write failed, retrying every second: %s" % e,
                      file=sys.stderr)
            self.failing = True
            lib.shmstm_ring_set_error(self.seg, lib.SHMSTM_EDURABLE)
            return False
        # The error was transient (disk full, ...): clear it, also when a
        # predecessor set it and was killed before it could retry.
        self.failing = False
        lib.shmstm_ring_clear_error(self.seg)
        fault("after_commit")
        # Before the release: every sync fill after this read is by a
        # committer this release woke, or one that arrived meanwhile (group).
        self.rel_fills = lib.shmstm_ring_sync_fills(self.seg)
        lib.shmstm_ring_release(self.seg, first, last)
        fault("after_advance")
        return True


if __name__ == "__main__":
    sys.exit(main(sys.argv))
