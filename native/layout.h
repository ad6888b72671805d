/* layout.h -- every structure that lives in the shared segment.
 *
 * Segment (one per runtime, POSIX shm "/shmstm.<name>", mode 0600):
 *
 *   offset 0        struct shm_header      magic, signature, limits, offsets,
 *                                          then one cache line each for the
 *                                          clock, the irrevocable token, the
 *                                          TVar allocator, the heap bump
 *                                          pointer and free lists, and the
 *                                          durability fields (flushed_wv, lease)
 *   off_procs       struct shm_proc[max_procs]       process (context) slots
 *   off_tvars       struct shm_tvar[max_tvars]       TVar table, 64 B a slot
 *   off_dir         struct shm_dirent[dir_slots]     name directory (open addressing)
 *   off_ring        ring slots (durable runtimes; ring_slots == 0 otherwise)
 *   off_heap        value heap, heap_size bytes, 16-byte units
 *   seg_size        end
 *
 * Every region starts on a 64-byte boundary.  Offsets are relative to the
 * segment base; no process pointer is ever stored in shared memory.
 *
 * Conventions in the field comments:
 *   W: who writes it and under what protocol.
 *   R: who reads it and which release the acquire pairs with.
 *   "advisory": used for statistics or as a hint; never trusted for safety.
 *   "authoritative": the truth the protocols depend on.
 */
#ifndef SHMSTM_LAYOUT_H
#define SHMSTM_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include "atomics.h"

#define SHMSTM_MAGIC          0x314d54534d4853ULL   /* "SHMSTM1" little endian */
#define SHMSTM_LAYOUT_VERSION 8u    /* 2: header checksum (hdr_sum); 3: sync_target;
                                       4: per-slot free lists of ring records, 24-byte
                                          ring records; 5: a tag in owner words;
                                       6: flush_wake_bits (chained sync wake-ups);
                                       7: ring records' checksum over words;
                                       8: inline records in ring slots */
#define SHMSTM_CACHELINE      64u
#define SHMSTM_UNIT           16u    /* heap allocation unit, bytes */

/* ---- init state (header.init_state) ---- */
#define INIT_CREATING 0u     /* creator is initialising; attachers wait (bounded) */
#define INIT_READY    1u     /* fully initialised; never changes afterwards */

/* ---- versioned lock word (shm_tvar.lock) ----
 *
 *   unlocked:  | version (63 bits)              | 0 |
 *   locked:    | 0 ...  | owner slot (16 bits)  | 1 |
 *
 * The version is the write version (wv) of the last commit that wrote the
 * TVar.  While locked the old word is kept in the owner's commit record
 * (wentry.old_lock), which is where rollback restores it from.
 */
#define LOCK_BIT            1ull
static inline int      lk_locked(uint64_t w)           { return (int)(w & LOCK_BIT); }
static inline uint64_t lk_version(uint64_t w)          { return w >> 1; }
static inline uint32_t lk_owner(uint64_t w)            { return (uint32_t)((w >> 1) & 0xffffu); }
static inline uint64_t lk_make_unlocked(uint64_t ver)  { return ver << 1; }
static inline uint64_t lk_make_locked(uint32_t owner)  { return ((uint64_t)owner << 1) | LOCK_BIT; }
#define SHMSTM_MAX_VERSION  ((1ull << 62) - 1)
/* The owner of a lock whose commit died past its commit point with a record
 * recovery cannot read (proc.c, R2b): held for good, never by a real slot
 * (max_procs <= 4096).  Readers and committers meeting it get SHMSTM_ELOST. */
#define LK_LOST_OWNER       0xffffu

/* ---- value tags (shm_tvar.tag) ----  tags >= TAG_HEAP_MIN: value is a heap offset */
#define TAG_EMPTY    0u      /* free slot */
#define TAG_NONE     1u
#define TAG_FALSE    2u
#define TAG_TRUE     3u
#define TAG_INT      4u      /* int64 in the value word */
#define TAG_FLOAT    5u      /* IEEE double bits in the value word */
#define TAG_HEAP_MIN 6u
#define TAG_BYTES    6u
#define TAG_STR      7u      /* UTF-8 (surrogatepass) */
#define TAG_PICKLE   8u      /* pickle protocol 5 */
#define TAG_MAX      8u

/* ---- process slot owner word (shm_proc.owner; also the flusher lease) ----
 *   | pid (32 bits) | tag (24 bits) | state (8 bits) |
 * Packing pid with state lets a claimer take a FREE slot and publish its pid
 * in one CAS, so no slot is ever ACTIVE without a pid to check liveness by.
 * The tag goes up by one at every change of the word (ps_next): a CAS from a
 * value read before someone else recovered and freed the slot, and a process
 * with the same (reused) pid claimed it again, fails instead of taking the
 * look-alike (ABA).  It wraps after 2^24 changes, far more than any window
 * between a read and its CAS can hold.
 */
#define PS_FREE       0u
#define PS_ACTIVE     1u
#define PS_RECOVERING 2u     /* start_time is the recoverer's */
#define PS_CLAIMING   3u     /* a claim for recovery (or of the flusher lease):
                                the start time is not yet the claimer's, so
                                liveness is by pid alone for a few instructions */
static inline uint32_t ps_state(uint64_t o) { return (uint32_t)(o & 0xffu); }
static inline uint32_t ps_pid(uint64_t o)   { return (uint32_t)(o >> 32); }
static inline uint32_t ps_tag(uint64_t o)   { return (uint32_t)(o >> 8) & 0xffffffu; }
static inline uint64_t ps_make(uint32_t pid, uint32_t st) { return ((uint64_t)pid << 32) | st; }
/* The word after o: pid and state given, the tag one up. */
static inline uint64_t ps_next(uint64_t o, uint32_t pid, uint32_t st)
{
    return ps_make(pid, st) | ((uint64_t)((ps_tag(o) + 1u) & 0xffffffu) << 8);
}

/* ---- commit record state (shm_commit_rec.state) ---- */
#define CR_IDLE       0u     /* no locks held; entries may be staged */
#define CR_LOCKING    1u     /* taking locks; some may be held (owner == this slot) */
#define CR_VALIDATING 2u     /* all locks held, wv taken, validating: roll back on death */
#define CR_COMMITTED  3u     /* commit point passed: roll forward on death */

/* abort reasons (index into shm_proc.aborts) */
#define AB_LOCKED     0u     /* met a lock held by another commit */
#define AB_VALIDATE   1u     /* read set invalid (read or commit validation) */
#define AB_USER       2u     /* exception raised by the transaction body */
#define AB_STALE      3u     /* handle to a freed TVar */
#define AB_RESOURCE   4u     /* heap full, value too large, ... */
#define AB_NREASONS   5u

#define WE_FREE       1u     /* wentry.flags: this entry frees the TVar */

#define REC_INLINE    48u    /* write-set entries kept in the slot; more spill to the heap */
#define LAT_BUCKETS   32u    /* log2(ns) commit latency histogram */
#define HEAP_CLASSES  28u    /* block sizes 32 << c bytes, c < HEAP_CLASSES */
#define REC_CLASSES   8u     /* ring records up to 32 << 7 bytes use per-slot free lists */

/* One write-set entry of a commit record.
 * W: the owner only.  idx, gen, new_* and flags are written while staging
 *    (state CR_IDLE), before any lock is taken; old_lock is written just
 *    before the CAS that takes the lock (so it is right whenever the lock
 *    word names this slot); old_tag/old_val right after the lock is held.
 * R: a recoverer, only after the owner is dead (its stores are then all
 *    visible: process exit orders them), and the owner itself. */
struct shm_wentry {
    uint32_t idx;
    uint32_t gen;        /* generation the handle carried; checked under the lock */
    uint16_t new_tag;
    uint16_t old_tag;
    uint32_t flags;      /* WE_FREE */
    uint64_t new_val;    /* inline payload or heap offset of the staged block */
    uint64_t old_lock;   /* lock word before we locked it: what rollback restores */
    uint64_t old_val;    /* value replaced: freed after publish */
};

/* The commit record (crash recovery, section 6 of the brief).
 * W: owner only (state transitions numbered in txn.c), or a recoverer that
 *    holds the slot in PS_RECOVERING.  R: recoverers after the owner died. */
struct shm_commit_rec {
    a32 state;           /* CR_*; store_release by owner at each step */
    a32 n;               /* entries staged; owner only */
    a64 wv;              /* write version, valid from CR_VALIDATING on */
    a64 spill_off;       /* heap offset of an entry array when n > REC_INLINE, else 0 */
    a64 spill_cap;       /* entries that the spill block holds */
    a64 ring_rec;        /* durable runtimes: heap offset of this commit's ring record
                            while the committer owns it (0 once the fill CAS hands it
                            to the flusher); a recoverer frees it on rollback */
    uint8_t pad_[24];
    struct shm_wentry e[REC_INLINE];
};

/* A process slot.  One per transaction context: a process takes one slot per
 * thread that runs transactions.  Groups of fields written by different
 * parties sit on different cache lines. */
struct shm_proc {
    /* line 0: identity.  W: claimer (CAS FREE->ACTIVE|pid), recoverer
     * (CAS ACTIVE or dead RECOVERING -> CLAIMING|pid, store start_time, then
     * store_release RECOVERING|pid; finally store_release FREE).  R: anyone
     * checking liveness (load_acquire, pairs with those releases). */
    _Alignas(64) a64 owner;  /* owner word (pid, tag, state; ps_*): authoritative */
    a64 start_time;          /* /proc/pid/stat starttime of the owner (ACTIVE) or of
                                the recoverer (RECOVERING); 0 until the claimer
                                writes it right after its CAS, and 0 means "trust
                                the pid"; liveness check input.  W: relaxed, by the
                                claimer; published by the state's release */
    a64 tid;                 /* owner's thread id (advisory, stats) */
    a64 attach_ns;           /* CLOCK_REALTIME at claim (advisory, stats) */
    /* line 1: wake-ups.  futex: W: committers (faa_seq_cst) that wrote a TVar
     * this slot waits on, and a thread of the owner's process that closes the
     * runtime (shmstm_ctx_interrupt, faa_seq_cst); R: owner before
     * futex_wait.  sleeping: W owner
     * (store_seq_cst) around futex_wait; R committers (load_seq_cst) to skip
     * the wake syscall when nobody sleeps. */
    _Alignas(64) a32 futex;
    a32 sleeping;
    /* lines 2..: counters.  W: owner only (counter_add, relaxed).  R: the
     * stats reader (relaxed; advisory). */
    _Alignas(64) a64 commits;      /* writer commits */
    a64 ro_commits;                /* read-only commits */
    a64 aborts[AB_NREASONS];
    a64 retries;                   /* blocking waits entered */
    a64 wakeups;                   /* waits ended by a change */
    a64 bytes_committed;
    a64 irrevocable;               /* transactions run with the token */
    a64 ring_waits;                /* durable commits that waited for ring room;
                                      kept across owners (ring_full_waits sums
                                      every slot's: a counter that never drops) */
    a64 late_wakeups;              /* sync waits whose commit was flushed but that
                                      saw it only at their 50 ms re-check (a
                                      wake-up lost or late); kept like ring_waits */
    a64 heap_allocs[HEAP_CLASSES]; /* blocks allocated / freed by this slot */
    a64 heap_frees[HEAP_CLASSES];
    a64 lat_hist[LAT_BUCKETS];     /* commit-call latency, bucket = floor(log2(ns)) */
    /* next line: free blocks for this slot's commit-ring records (durable
     * runtimes), one list per size class below REC_CLASSES, heads in the
     * heap's tagged format (heap.c).  A record's block comes back to its
     * committer's slot instead of the shared lists, so that committers in
     * different processes do not contend on one list head per commit.
     * W: the flusher pushes the blocks of a released range as one chain per
     * class (CAS acq_rel: the chain's links are visible to the popper);
     * the slot's threads pop (CAS acq_rel), and so does a committer of any
     * slot that finds the rest of the heap full.  Kept across owners (the
     * blocks are free; whoever holds the slot next uses them). */
    _Alignas(64) a64 rec_free[REC_CLASSES];
    /* the commit record, written only by the owner (or its recoverer) */
    _Alignas(64) struct shm_commit_rec rec;
};

/* A TVar slot: one cache line, so disjoint TVars never share a line. */
struct shm_tvar {
    a64 lock;       /* versioned lock (see above).  W: committers by CAS (acq_rel)
                       and store_release on unlock; recoverers likewise.
                       R: readers load_acquire, pairs with the unlock release. */
    a64 value;      /* payload.  W: lock holder, relaxed, between lock and unlock
                       (ordered by fence_release after locking and the unlock
                       release).  R: readers between two lock loads (seqlock). */
    a32 tag;        /* TAG_*; same protocol as value */
    a32 gen;        /* generation, odd while live.  W: allocator (free slot, not
                       reachable) and the lock holder of a freeing commit.
                       R: readers, inside the seqlock window */
    a64 waiters;    /* waiter bitmap, bit (slot % 64).  W: waiters fetch_or (acq_rel),
                       committers exchange to 0 (acq_rel), a slot's releaser or
                       recoverer fetch_and its own bit out (acq_rel, only when
                       max_procs <= 64).  See wait.c. */
    a32 flags;      /* TV_NAMED.  W: creator before the handle escapes. advisory */
    a32 conflicts;  /* aborts caused by this TVar (relaxed faa, saturating just below
                       UINT32_MAX: txn.c; advisory, stats) */
    a64 next_free;  /* free-list link (index + 1) while the slot is free.
                       W: freer before the push CAS (release) */
    uint8_t pad_[16];
};
#define TV_NAMED 1u

/* A name directory entry (open addressing, linear probing).
 * key:  | hash (62 bits) | state (2 bits) |   state: DE_EMPTY, DE_BUSY, DE_READY
 * W: a creator CASes EMPTY->BUSY (acq_rel), fills val, then store_release READY.
 * R: lookups load_acquire key (pairs with that release), then read val. */
#define DE_EMPTY 0u
#define DE_BUSY  1u
#define DE_READY 2u
struct shm_dirent {
    a64 key;
    a64 val;        /* READY: (tvar index << 32) | (name block heap offset / 16).
                       BUSY: creator's slot index (for recovery) */
};

/* A heap block header (16 bytes); the payload follows. */
struct shm_block {
    a32 cls;        /* size class; W: allocator.  R: readers bounds-check it */
    a32 len;        /* payload bytes; W: allocator before publish; R: bounds-checked */
    a64 next;       /* free-list link (unit offset) while free */
};

struct shm_header {
    /* line 0..1: identity and geometry.  W: creator only, before init_state
     * becomes INIT_READY (store_release).  R: attachers after load_acquire of
     * init_state == INIT_READY (pairs with that release).  Read-only after. */
    uint64_t magic;
    uint64_t signature;      /* layout_signature(): version, struct sizes, line width */
    a32 init_state;          /* INIT_CREATING -> INIT_READY */
    uint32_t creator_pid;
    uint64_t creator_start;
    uint64_t seg_size;
    uint8_t runtime_id[16];  /* random; also stored with durable data */
    uint64_t created_ns;
    uint32_t max_tvars;
    uint32_t max_procs;
    uint32_t max_value_size;
    uint32_t dir_slots;      /* power of two */
    uint64_t heap_size;
    uint32_t ring_slots;     /* 0: not durable */
    uint32_t flags_;
    uint64_t off_procs, off_tvars, off_dir, off_ring, off_heap;
    uint64_t hdr_sum;        /* FNV-1a of the fields above and itself, init_state
                                and hdr_sum taken as 0 (header_sum(), segment.c): a flipped
                                byte of identity or geometry is a corrupt header,
                                never a segment opened with it.  W: creator, last,
                                before INIT_READY.  R: attach, header check */
    uint8_t pad0_[16];

    /* the global clock: W: committers faa_acq_rel; R: begin (load_acquire,
     * pairs with the faa of the commit whose unlock it must see). */
    _Alignas(64) a64 clock;

    /* irrevocable token: 0 or (slot + 1).  W: CAS by a transaction that has
     * aborted too often; store_release 0 by its holder (or a recoverer).
     * R: committers before locking (load_acquire).  token_futex: bumped on
     * release so waiting committers sleep instead of spinning. */
    _Alignas(64) a64 token;
    a32 token_futex;
    a32 token_waiters;

    /* TVar allocator.  tvar_free: ABA-tagged stack head
     * (tag << 32 | index + 1).  tvar_bump: next never-used index.
     * W: allocators/freers by CAS (acq_rel). */
    _Alignas(64) a64 tvar_free;
    a32 tvar_bump;
    a32 tvar_live_;          /* reserved */

    /* heap bump pointer (bytes into the heap).  W: allocators by CAS. */
    _Alignas(64) a64 heap_bump;

    /* per-class free-list heads (tag << 32 | unit offset).  W: allocators
     * and freers by CAS (acq_rel).  One line for all: frees are rare next
     * to reads, and a per-class line would cost 1.7 KiB per segment. */
    _Alignas(64) a64 heap_free[HEAP_CLASSES];

    /* durability (native/ring_commit.c, native/ring_flush.c).  Meaningful only when
     * ring_slots != 0.  All on one line: the flusher writes most of it, and
     * committers touch it once per commit (room check) at most. */
    _Alignas(64) a64 flushed_wv; /* every wv <= flushed_wv is in LMDB (or was void).
                                    W: flusher, store_release after recycling the
                                    slots (ring_release).  R: committers' room check
                                    and sync wait, load_acquire (pairs with it).
                                    authoritative */
    a64 flusher_owner;       /* lease, an owner word (ps_*, tag included): ACTIVE|pid,
                                CLAIMING|pid while being claimed, or FREE.  W: a
                                flusher by CAS (acq_rel) from FREE or a dead holder to
                                CLAIMING|pid, then store_release ACTIVE|pid after
                                writing flusher_start; the holder CASes it to FREE on
                                exit.  R: anyone (load_acquire), liveness by pid +
                                flusher_start from /proc (pid alone while
                                CLAIMING), never a timeout */
    a64 flusher_start;       /* /proc starttime of the lease holder.  W: the
                                claimer (relaxed) between its claim CAS and its
                                release of ACTIVE, which publishes it */
    a64 path_off;            /* heap offset of the LMDB path (NUL-terminated).
                                W: creator, before durable_state := DS_READY */
    a32 flush_futex;         /* W: flusher faa_seq_cst after advancing flushed_wv,
                                then a wake of one waiter with the bits of the
                                wvs it released, which wakes the rest
                                (flush_wake_bits).  R: sync waits (futex_wait_bits with
                                flush_bit(wv), ring.h) and ring-full waiters
                                (plain futex_wait: every wake reaches them) */
    a32 ring_futex;          /* W: committers faa_seq_cst after filling a slot when
                                flusher_sleeping.  R: the flusher's futex_wait */
    a32 flusher_sleeping;    /* FS_AWAKE, FS_ANY (asleep, any fill wakes it),
                                FS_SYNC (napping, only a sync commit's fill wakes
                                it) or FS_GROUP (group commit: only the sync fill
                                that brings sync_fills to sync_target wakes it).
                                W: flusher store_seq_cst around its sleep; the
                                committer that wakes it exchanges it to FS_AWAKE
                                (seq_cst, one wake-up per sleep).  R:
                                committers load_seq_cst after the fill (Dekker) */
    a32 durable_state;       /* DS_LOADING until the creator loaded LMDB, then
                                DS_READY.  W: creator store_release.  R: attachers
                                load_acquire (pairs with it) */
    a32 durable_error;       /* 0, or an SHMSTM_E* code the flusher met writing
                                LMDB (map full, I/O).  W: flusher (relaxed): set
                                on a failed write, back to 0 when a retry
                                succeeds.  R: committers before their commit
                                point: refuse while set.  advisory */
    a32 sync_fills;          /* fills by sync commits (wraps).  W: a sync committer
                                faa_seq_cst after its fill, before reading
                                flusher_sleeping.  R: the flusher (group commit:
                                shmstm_flusher_wait_sync), seq_cst.  advisory */
    a32 sync_target;         /* the sync_fills count the flusher waits for while
                                FS_GROUP.  W: flusher store_seq_cst before it
                                stores FS_GROUP.  R: sync committers load_seq_cst
                                after seeing FS_GROUP.  advisory */
    a32 flusher_group;       /* the flusher's group-commit choice (GroupTuner,
                                store/flusher.py): 0 not stated yet, else FG_WAIT or
                                FG_NOWAIT, plus FG_FIXED when set by
                                SHMSTM_FLUSH_GROUP rather than measured.  W: the
                                lease holder (relaxed) when it changes.  R: the
                                stats (relaxed).  advisory */
    _Alignas(64) a32 flush_wake_bits;
                             /* chained wake-ups (ring.h, pass_flush_wake): the
                                futex bits of releases whose waiters may not all
                                be woken yet.  W: the flusher fetch_or (acq_rel)
                                before its faa of flush_futex and the wake of ONE
                                waiter; every flush_futex waiter that returns from
                                its wait exchanges it to 0 (acq_rel) and wakes the
                                waiters of the bits it took.  Its own line: the
                                waiters' exchange would otherwise bounce the line
                                the committers' room check reads.  advisory (a
                                chain cut by a SIGKILL costs the rest one 50 ms
                                re-check) */
};

/* ---- commit ring (durable runtimes; native/ring_commit.c, ring_flush.c) ----
 * Slot wv % ring_slots serves write version wv in its round.
 *   seq: the wv the slot serves now (Vyukov's sequence stamp).  W: ring_init
 *        at creation; the flusher store_release(seq + ring_slots) when it
 *        recycles the slot.  R: committers load_acquire (pairs with it).
 *   rec: ring_empty(wv) for the round it serves, then exactly one CAS (acq_rel)
 *        from that value to a record offset or a
 *        marker by the owner of wv (the commit point), or to RING_VOID by the
 *        flusher (grace passed), a recoverer, or the owner after a failed
 *        validation; a CLAIM is then followed by one store_release to INLINE
 *        by the same owner (or, if it died, its recoverer).  The flusher
 *        stores ring_empty(wv + N) (release) when
 *        recycling, before the seq release.  The round in the empty value makes
 *        every CAS from "empty" round-specific: a committer (or recoverer) that
 *        stalled past a recycle can never fill (or void) a later round's slot.
 *   rec encoding: low 4 bits 3: empty, for round rec >> 4; 1: void; 2: a commit with no
 *   durable write, owner slot + 1 in bits 16.., bit 8 set for a sync commit;
 *   4: claimed for an inline record, 5: the inline record is in the slot (both
 *   with the owner and sync bits of 2: the claim is the commit point, the
 *   release of 5 follows it at once);
 *   otherwise (low 4 bits 0) the heap offset of a record (struct ring_rec). */
/* ring_kind(rec): the low 4 bits of a slot's rec word. */
#define RING_HEAP_KIND  0u     /* a heap record's offset (16-byte aligned: kind 0) */
#define RING_VOID_KIND  1u     /* RING_VOID */
#define RING_NOOP_KIND  2u     /* RING_NOOP marker: committed, no durable TVar written */
#define RING_EMPTY_KIND 3u
#define RING_CLAIM_KIND 4u     /* claimed for an inline record: owner as RING_NOOP's */
#define RING_INLINE_KIND 5u    /* the inline record is in the slot: owner as RING_NOOP's */
#define RING_VOID  1ull
#define RING_NOOP  2ull
#define RING_NOOP_SYNC (1ull << 8)
#define RING_OWNER_SYNC (1u << 31)     /* ring_rec.owner: a sync commit's record */
static inline uint64_t ring_noop(uint32_t owner, int sync)
{
    return ((uint64_t)(owner + 1) << 16) | (sync ? RING_NOOP_SYNC : 0) | RING_NOOP;
}
static inline uint32_t ring_kind(uint64_t rec)   { return (uint32_t)(rec & 15u); }
static inline uint64_t ring_claim(uint32_t owner, int sync)
{
    return (ring_noop(owner, sync) & ~15ull) | RING_CLAIM_KIND;
}
static inline uint32_t ring_owner(uint64_t rec)  { return (uint32_t)(rec >> 16) - 1u; }
static inline uint64_t ring_empty(uint64_t wv)   { return (wv << 4) | RING_EMPTY_KIND; }
#define RING_INL 2u       /* named TVars a commit may keep in its slot (RING_INLINE) */
struct ring_inl {
    uint32_t idx;
    uint32_t tag;       /* an inline tag (never a heap one) */
    uint64_t val;
};
struct shm_ring_slot {
    a64 seq;
    a64 rec;
    /* The inline record (rec kind RING_INLINE_KIND): a commit whose durable
     * writes are at most RING_INL named TVars with inline values keeps them
     * here, not in a heap record, so that the flusher reads one line per
     * commit and nobody allocates or frees.  W: the owner of wv between its
     * claim CAS (RING_CLAIM_KIND, the commit point) and its store_release of
     * RING_INLINE_KIND, or a recoverer completing a dead owner's claim
     * (ring_recover_decide).  Nobody else writes the slot while it is claimed
     * (the flusher waits for the inline kind), so plain fields.  R: the
     * flusher after its load_acquire of rec, which pairs with that release. */
    uint32_t in_n;      /* entries, 0..RING_INL */
    uint32_t in_sum;    /* rec_sum of in_e[0..in_n) */
    struct ring_inl in_e[RING_INL];
    uint8_t pad_[8];
};

/* A ring record, in a heap block (payload).  Written by its committer only
 * before the CAS that publishes it; read-only afterwards; freed by the
 * flusher after the LMDB commit.  Entries follow: struct ring_ent then len
 * payload bytes padded to 8. */
struct ring_rec {
    uint64_t wv;        /* written after wv is taken, before the publishing CAS */
    uint32_t n;         /* entries */
    uint32_t owner;     /* committer's process slot | RING_OWNER_SYNC for sync */
    uint32_t bytes;     /* entry bytes after this header (ring_prepare: < 4 GiB) */
    uint32_t sum;       /* FNV-1a over the entry bytes, folded to 32 bits */
};
struct ring_ent {
    uint32_t idx;
    uint32_t tag;
    uint32_t len;       /* payload bytes (8 for inline tags) */
    uint32_t pad_;
};

#define FS_AWAKE 0u          /* shm_header.flusher_sleeping */
#define FS_ANY   1u
#define FS_SYNC  2u
#define FS_GROUP 3u

#define DS_LOADING 0u
#define DS_READY   1u

/* Compile-time checks: the layout is the contract between processes. */
_Static_assert(sizeof(struct shm_tvar) == 64, "TVar slot is one cache line");
_Static_assert(sizeof(struct shm_wentry) == 40, "wentry size");
_Static_assert(sizeof(struct shm_dirent) == 16, "dirent size");
_Static_assert(sizeof(struct shm_block) == SHMSTM_UNIT, "block header is one unit");
_Static_assert(offsetof(struct shm_header, clock) % 64 == 0, "clock on its own line");
_Static_assert(offsetof(struct shm_header, hdr_sum) + 8 <= offsetof(struct shm_header, clock),
               "hdr_sum covers the identity and geometry fields");
_Static_assert(offsetof(struct shm_proc, futex) % 64 == 0, "futex on its own line");
_Static_assert(offsetof(struct shm_proc, rec) % 64 == 0, "record on its own line");
_Static_assert(sizeof(struct shm_proc) % 64 == 0, "proc slot is whole lines");
_Static_assert(sizeof(struct shm_header) % 64 == 0, "header is whole lines");
_Static_assert(sizeof(struct shm_ring_slot) == 64, "ring slot is one cache line");
/* 24 + 16: a record of one inline value fills a 64-byte block with its
 * block header, one cache line (heap blocks of 64 bytes and more are
 * line-aligned: heap.c). */
_Static_assert(sizeof(struct ring_rec) == 24 && sizeof(struct ring_ent) == 16, "ring record");
_Static_assert((RING_VOID & 15u) == RING_VOID_KIND && (RING_NOOP & 15u) == RING_NOOP_KIND,
               "ring kinds");
_Static_assert(sizeof(a64) == 8 && sizeof(a32) == 4, "lock-free atomics");

/* The layout signature folds the layout version and every struct size and the
 * line width, as LMDB's MDB_LOCK_FORMAT does: any change that moves a field
 * changes the signature and an older or newer build refuses to attach. */
static inline uint64_t layout_signature(void)
{
    uint64_t s = 1469598103934665603ull;
    const uint64_t parts[] = {
        SHMSTM_LAYOUT_VERSION, SHMSTM_CACHELINE, SHMSTM_UNIT,
        sizeof(struct shm_header), sizeof(struct shm_proc),
        sizeof(struct shm_tvar), sizeof(struct shm_dirent),
        sizeof(struct shm_wentry), sizeof(struct shm_commit_rec),
        REC_INLINE, HEAP_CLASSES, REC_CLASSES, AB_NREASONS, LAT_BUCKETS, TAG_MAX,
        sizeof(struct shm_ring_slot), sizeof(struct ring_rec), RING_INL,
    };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        s ^= parts[i];
        s *= 1099511628211ull;
    }
    return s;
}

#endif
