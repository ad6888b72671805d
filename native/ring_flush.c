/* ring_flush.c -- the commit ring of a durable runtime, the flusher's side:
 * its lease, its sleeps and polls, the collect of committed records, the log
 * record encoding, voiding and recycling slots, and what the opener and the
 * stats read (ring_info, the stored path, the error word).  The committers'
 * side and the ring's invariants are in ring_commit.c; shared: ring.h. */
#define _GNU_SOURCE
#include <limits.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#include "ring.h"

/* shmstm_ring_info.durable_state is reported with the boundary's names. */
_Static_assert(SHMSTM_FS_ANY == FS_ANY && SHMSTM_FS_SYNC == FS_SYNC,
               "flusher sleep modes differ between shmstm.h and layout.h");
_Static_assert(SHMSTM_DS_LOADING == DS_LOADING && SHMSTM_DS_READY == DS_READY,
               "durable_state names differ between shmstm.h and layout.h");

/* The collect's entries, as Python reads them (shmstm.h). */
_Static_assert(sizeof(shmstm_collect_entry) == sizeof(struct ring_ent) &&
               offsetof(shmstm_collect_entry, idx) == offsetof(struct ring_ent, idx) &&
               offsetof(shmstm_collect_entry, tag) == offsetof(struct ring_ent, tag) &&
               offsetof(shmstm_collect_entry, len) == offsetof(struct ring_ent, len),
               "shmstm_collect_entry is struct ring_ent");

#define RELEASE_CHUNK 64u            /* records freed per chain push (shmstm_ring_release) */
#define COLLECT_AHEAD 8u             /* slots between a record's prefetch and its check */

int shmstm_ring_info_get(shmstm_seg *s, shmstm_ring_info *o)
{
    struct shm_header *h = s->h;
    memset(o, 0, sizeof *o);
    o->ring_slots = s->ring_slots;
    o->committed_wv = load_relaxed(&h->clock);
    o->flushed_wv = load_relaxed(&h->flushed_wv);
    o->ring_fill = o->committed_wv > o->flushed_wv ? (uint32_t)(o->committed_wv - o->flushed_wv) : 0;
    o->flusher_pid = ps_pid(load_relaxed(&h->flusher_owner));
    o->flusher_alive = (uint32_t)flusher_alive(s);
    for (uint32_t i = 0; i < s->max_procs; i++) {
        o->ring_full_waits += load_relaxed(&s->procs[i].ring_waits);
        o->late_wakeups += load_relaxed(&s->procs[i].late_wakeups);
    }
    o->durable_state = load_relaxed(&h->durable_state);
    o->durable_error = (int32_t)load_relaxed(&h->durable_error);
    o->flusher_group = load_relaxed(&h->flusher_group);
    return 0;
}

int shmstm_flusher_set_group(shmstm_seg *s, uint32_t group)
{
    if (!s->ring_slots || s->read_only || group > (SHMSTM_FG_NOWAIT | SHMSTM_FG_FIXED))
        return SHMSTM_EINVAL;
    store_relaxed(&s->h->flusher_group, group);
    return 0;
}

int shmstm_ring_set_ready(shmstm_seg *s, const char *path, size_t len)
{
    if (!s->ring_slots || s->read_only)
        return SHMSTM_EINVAL;
    uint64_t off;
    int rc = heap_alloc_raw(s, NULL, len + 1, &off);
    if (rc)
        return rc;
    memcpy(heap_payload(s, off), path, len);
    heap_payload(s, off)[len] = '\0';
    store_relaxed(&s->h->path_off, off);
    /* Pairs with the load_acquire in shmstm_ring_ready(). */
    store_release(&s->h->durable_state, DS_READY);
    return 0;
}

int shmstm_ring_ready(shmstm_seg *s)
{
    if (!s->ring_slots)
        return 0;
    return load_acquire(&s->h->durable_state) == DS_READY;
}

int shmstm_ring_path(shmstm_seg *s, char *buf, uint32_t cap)
{
    if (!shmstm_ring_ready(s))
        return SHMSTM_ENOTFOUND;
    uint64_t off = load_relaxed(&s->h->path_off);
    uint32_t len;
    if (!heap_block_ok(s, off, &len) || len == 0 || len > cap)
        return SHMSTM_ECORRUPT;
    memcpy(buf, heap_payload(s, off), len);
    buf[len - 1] = '\0';
    return (int)(len - 1);
}

/* Bump flush_futex and wake up to n of its waiters whose bits share one
 * with ``bits`` (ring-room waits match any).  seq_cst: pairs with the
 * waiters' load of the word before they re-check; a waiter that loaded it
 * before this bump finds it changed when it sleeps. */
static void wake_flush_waiters_bits(struct shm_header *h, uint32_t bits, int n)
{
    faa_seq_cst(&h->flush_futex, 1);
    futex_wake_bits_n(&h->flush_futex, bits, n);
}

/* Wake every waiter on flush_futex: durable_error changed. */
static void wake_flush_waiters(struct shm_header *h)
{
    wake_flush_waiters_bits(h, UINT32_MAX, INT_MAX);
}

/* A release's wake-up: the waiters on flush_futex whose bits share one with
 * ``bits`` (sync waits: flush_bit of their wv) and every ring-room wait
 * (plain futex_wait), chained (pass_flush_wake): one is woken here.  The
 * bits are in flush_wake_bits before the bump, so a waiter that returns for
 * the bump, or is woken here, finds them (the futex call orders the wake
 * before the woken waiter's exchange).  A waiter not woken whose bits are
 * not the release's had read flushed_wv before a release that does not
 * cover its wv. */
static void wake_released(struct shm_header *h, uint32_t bits, uint64_t commits)
{
    if (commits <= CHAIN_MIN) {
        /* One or two committers (P=1, P=2): a pass would cost the one
         * woken a system call that finds nobody to wake. */
        wake_flush_waiters_bits(h, bits, INT_MAX);
        return;
    }
    for_acq_rel(&h->flush_wake_bits, bits);
    wake_flush_waiters_bits(h, bits, 1);
}

int shmstm_ring_set_error(shmstm_seg *s, int32_t code)
{
    store_relaxed(&s->h->durable_error, (uint32_t)code);
    wake_flush_waiters(s->h);
    return 0;
}

/* After a successful LMDB write: clear a write error (SHMSTM_EDURABLE), whoever
 * set it (a predecessor killed while LMDB was failing included).  CAS: an
 * error of another kind stays. */
int shmstm_ring_clear_error(shmstm_seg *s)
{
    uint32_t e = (uint32_t)SHMSTM_EDURABLE;
    if (!cas_acq_rel(&s->h->durable_error, &e, 0u))
        return 0;
    wake_flush_waiters(s->h);
    return 1;
}

int shmstm_flusher_alive(shmstm_seg *s) { return s->ring_slots ? flusher_alive(s) : 0; }

/* Take the lease: 1 taken, 0 a live flusher holds it.
 *
 * Two steps, because the lease is two words (owner, start time): CAS the
 * owner from 0 or a dead holder to CLAIMING|me, store my start
 * time, then store_release ACTIVE|me.  A one-step claim (CAS to ACTIVE, then
 * the start time) let a second claimer read the new owner with the dead
 * predecessor's start time, judge the new holder dead and take the lease too:
 * two flushers, one of them spinning forever on slots the other recycled. */
int shmstm_flusher_claim(shmstm_seg *s)
{
    if (!s->ring_slots || s->read_only)
        return SHMSTM_EINVAL;
    struct shm_header *h = s->h;
    uint32_t me = (uint32_t)getpid();
    uint64_t mystart = proc_self_start();
    uint64_t o = load_acquire(&h->flusher_owner), claimed;   /* pairs with the ACTIVE release */
    for (;;) {
        if (lease_alive(s, o))
            return ps_pid(o) == me ? 1 : 0;
        claimed = ps_next(o, me, PS_CLAIMING);
        if (cas_acq_rel(&h->flusher_owner, &o, claimed))
            break;
    }
    FAULT_POINT("lease.claimed");           /* the window the two steps close */
    store_relaxed(&h->flusher_start, mystart);
    /* Pairs with the load_acquire in lease_alive()'s callers. */
    store_release(&h->flusher_owner, ps_next(claimed, me, PS_ACTIVE));
    return 1;
}

/* 1 while this process holds the lease (the flusher checks before each LMDB
 * write: a flusher that lost its lease must stop, never write beside another). */
int shmstm_flusher_holds(shmstm_seg *s)
{
    if (!s->ring_slots)
        return 0;
    uint64_t o = load_acquire(&s->h->flusher_owner);
    return ps_state(o) == PS_ACTIVE && ps_pid(o) == (uint32_t)getpid();
}

int shmstm_flusher_release(shmstm_seg *s)
{
    struct shm_header *h = s->h;
    uint64_t o = load_acquire(&h->flusher_owner);
    if (ps_state(o) != PS_ACTIVE || ps_pid(o) != (uint32_t)getpid() ||
        !cas_acq_rel(&h->flusher_owner, &o, ps_next(o, 0, PS_FREE)))
        return SHMSTM_EINVAL;
    fence_seq_cst();        /* see flusher_alive(): the flusher then re-reads the slots */
    return 0;
}

/* The flusher's wait: sleep unless slot next_wv is already filled.  wake_on:
 * FS_ANY (idle: any fill wakes it) or FS_SYNC (busy, napping between batches:
 * only sync commits wake it; async ones are collected after the nap). */
int shmstm_flusher_sleep(shmstm_seg *s, uint64_t next_wv, int64_t timeout_ns, uint32_t wake_on)
{
    struct shm_header *h = s->h;
    if (wake_on != FS_SYNC)
        wake_on = FS_ANY;
    /* The futex word first, then the flag: a commit that consumes the flag
     * (one-shot) bumps the word after we read it, so the wait below returns
     * at once; read the other way round, a wake-up that landed between the
     * two would be lost and the next filler would find the flag consumed. */
    uint32_t f = load_seq_cst(&h->ring_futex);
    store_seq_cst(&h->flusher_sleeping, wake_on);
    struct shm_ring_slot *sl = slot_of(s, next_wv);
    int rc = 0;
    if (!(load_seq_cst(&sl->seq) == next_wv && ring_kind(load_seq_cst(&sl->rec)) != RING_EMPTY_KIND))
        rc = futex_wait(&h->ring_futex, f, timeout_ns);
    store_seq_cst(&h->flusher_sleeping, FS_AWAKE);
    return rc == SHMSTM_EINTR ? rc : 0;
}

/* Poll slot next_wv for up to poll_ns without sleeping: 1 once it is filled
 * (or voided), 0 at the deadline.  Reads only; flusher_sleeping stays
 * FS_AWAKE, so committers make no wake-up call meanwhile.  For the flusher
 * after a batch of few sync commits (store/flusher.py): their committers come back
 * within microseconds, and a flusher asleep on an idle vCPU takes far longer
 * than that to be woken on some hosts (docs/durability.md).  It yields the CPU
 * every 64 rounds, so a committer waiting for this vCPU gets it. */
int shmstm_flusher_poll(shmstm_seg *s, uint64_t next_wv, int64_t poll_ns)
{
    struct shm_ring_slot *sl = slot_of(s, next_wv);
    uint64_t end = now_ns() + (uint64_t)(poll_ns > 0 ? poll_ns : 0);
    for (uint32_t i = 1;; i++) {
        /* Pairs with the fill's CAS (acq_rel) in ring_fill. */
        if (load_acquire(&sl->seq) == next_wv && ring_kind(load_acquire(&sl->rec)) != RING_EMPTY_KIND)
            return 1;
        if (i % 64 == 0) {
            if (now_ns() >= end)
                return 0;
            sched_yield();
        } else {
            cpu_relax();
        }
    }
}

uint32_t shmstm_ring_sync_fills(shmstm_seg *s)
{
    return s->ring_slots ? load_seq_cst(&s->h->sync_fills) : 0;
}

/* Group commit: wait until sync_fills reaches target (wrapping compare) or
 * timeout_ns passes; only the sync fill that reaches target wakes the
 * flusher meanwhile (FS_GROUP).  Returns the count then.  Dekker with
 * ring_fill: the committer adds to sync_fills, fences, reads
 * flusher_sleeping (then sync_target); we store sync_target and
 * flusher_sleeping, read the futex word, then sync_fills.  A committer whose
 * count misses the target does not wake us, and the one that reaches it
 * added after our read of sync_fills (or we would not sleep), so it sees
 * FS_GROUP and this target. */
uint32_t shmstm_flusher_wait_sync(shmstm_seg *s, uint32_t target, int64_t timeout_ns)
{
    struct shm_header *h = s->h;
    uint64_t end = now_ns() + (uint64_t)(timeout_ns > 0 ? timeout_ns : 0);
    for (;;) {
        uint32_t f = load_seq_cst(&h->ring_futex);      /* before the flag: see flusher_sleep */
        store_seq_cst(&h->sync_target, target);
        store_seq_cst(&h->flusher_sleeping, FS_GROUP);
        uint32_t n = load_seq_cst(&h->sync_fills);
        uint64_t now = now_ns();
        if ((int32_t)(n - target) >= 0 || now >= end) {
            store_seq_cst(&h->flusher_sleeping, FS_AWAKE);
            return n;
        }
        futex_wait(&h->ring_futex, f, (int64_t)(end - now));
    }
}

/* Group commit for a batch of few sync commits: like flusher_wait_sync, but
 * poll sync_fills (sched_yield between looks) instead of sleeping.  On a
 * virtual machine whose hypervisor takes a share of the vCPUs, an LMDB write
 * transaction begun just after its process slept ~0.2 ms took 1.0x-1.9x as
 * long on average as one begun after the same wait spent yielding (no
 * difference on a quiet host; docs/design.md, "Measured decisions").  With one or two sync
 * committers the vCPUs are mostly idle, so the yields take CPU nobody needs;
 * with more, the stragglers need the CPU and the flusher sleeps instead
 * (store/flusher.py).
 * Reads only: flusher_sleeping stays FS_AWAKE, so no committer calls
 * futex_wake meanwhile.  Returns sync_fills as last read. */
uint32_t shmstm_flusher_poll_sync(shmstm_seg *s, uint32_t target, int64_t timeout_ns)
{
    uint64_t end = now_ns() + (uint64_t)(timeout_ns > 0 ? timeout_ns : 0);
    for (;;) {
        /* Acquire would pair with the fill's increment; seq_cst as in
         * flusher_wait_sync, whose Dekker pair needs it. */
        uint32_t n = load_seq_cst(&s->h->sync_fills);
        if ((int32_t)(n - target) >= 0 || now_ns() >= end)
            return n;
        sched_yield();
    }
}

/* Collect the processed slots from from_wv on, coalesced: buf receives the
 * latest value of every TVar written by the commits collected, each TVar once,
 * as ring_ent + payload padded to 8 (the flusher's LMDB batch).
 * out: shmstm_collect_out (shmstm.h), the stop reasons SHMSTM_COLLECT_*.
 * Returns the number of commits (void ones included) or an error.
 *
 * Two passes: forward, to check every slot (seq, checksum) and bound the
 * batch (the sum of the records' entry bytes fits cap, so the coalesced
 * output does too), then one look at each owner's commit record (the batch
 * ends before a commit whose owner is still VALIDATING); backward from the
 * newest, to emit each TVar's latest value once (collect_seen holds the batch
 * stamp of the TVars emitted) and count the sync commits.
 * Coalescing in C keeps the flusher's Python work per batch proportional to
 * the TVars written, not to the commits: the flusher shares two cores with
 * the committers. */
int shmstm_ring_collect(shmstm_seg *s, uint64_t from_wv, uint32_t max_commits,
                        char *buf, uint64_t cap, shmstm_collect_out *out)
{
    if (!s->ring_slots)
        return SHMSTM_EINVAL;
    if (!s->collect_seen) {
        s->collect_seen = calloc(s->max_tvars, sizeof *s->collect_seen);
        if (!s->collect_seen)
            return SHMSTM_ENOMEM;
    }
    if (!s->collect_owners) {
        s->collect_owners = calloc(2 * (size_t)s->max_procs, sizeof *s->collect_owners);
        if (!s->collect_owners)
            return SHMSTM_ENOMEM;
    }
    uint32_t stamp = ++s->collect_stamp;
    if (stamp == 0) {                 /* wrapped: no stale stamp may match */
        memset(s->collect_seen, 0, s->max_tvars * sizeof *s->collect_seen);
        memset(s->collect_owners, 0, 2 * (size_t)s->max_procs * sizeof *s->collect_owners);
        stamp = s->collect_stamp = 1;
    }
    uint32_t *owners = s->collect_owners, *owner_stamp = owners + s->max_procs, n_owners = 0;
    struct shm_header *h = s->h;
    uint64_t wv = from_wv, bound = 0;
    uint32_t why = SHMSTM_COLLECT_CLOCK, corrupt = 0;
    uint64_t clock = load_acquire(&h->clock);
    for (; wv <= clock; wv++) {
        if (wv - from_wv >= max_commits) {
            why = SHMSTM_COLLECT_FULL;
            break;
        }
        if (wv + COLLECT_AHEAD <= clock) {
            /* The records are in blocks all over the heap, written on the
             * other vCPU: fetch the one COLLECT_AHEAD slots on while this
             * one is checked, so the misses overlap instead of each
             * stalling the loop.  A hint only: the value is checked when
             * its turn comes. */
            uint64_t ahead = load_relaxed(&slot_of(s, wv + COLLECT_AHEAD)->rec);
            if (ring_kind(ahead) == RING_HEAP_KIND && ahead < s->heap_size)
                __builtin_prefetch(s->heap + ahead);
        }
        struct shm_ring_slot *sl = slot_of(s, wv);
        if (load_acquire(&sl->seq) != wv) {
            why = SHMSTM_COLLECT_EMPTY;   /* not recycled yet: cannot happen past flushed_wv */
            break;
        }
        uint64_t rec = load_acquire(&sl->rec);   /* pairs with the fill CAS */
        if (ring_kind(rec) == RING_EMPTY_KIND) {
            why = SHMSTM_COLLECT_EMPTY;
            break;
        }
        if (ring_kind(rec) == RING_CLAIM_KIND) {
            /* Committed, its inline record not written yet: a few
             * instructions, unless its owner was preempted or died. */
            uint32_t o = ring_owner(rec);
            if (o >= s->max_procs) {
                corrupt = 1;                      /* would be waited for forever */
                break;
            }
            if (slot_owner_dead(s, o)) {
                slot_recover(s, o);               /* completes the claim */
                rec = load_acquire(&sl->rec);
            }
            if (ring_kind(rec) == RING_CLAIM_KIND) {
                why = SHMSTM_COLLECT_OWNER;
                break;
            }
        }
        uint32_t owner = UINT32_MAX;
        const struct ring_rec *rh = NULL;
        uint64_t need = 0;
        if (ring_kind(rec) == RING_NOOP_KIND) {
            owner = ring_owner(rec);
        } else if (ring_kind(rec) == RING_INLINE_KIND) {
            owner = ring_owner(rec);
            if (sl->in_n > RING_INL ||
                rec_sum((const unsigned char *)sl->in_e, sl->in_n * sizeof(struct ring_inl)) != sl->in_sum) {
                corrupt = 1;
                break;
            }
            for (uint32_t i = 0; i < sl->in_n; i++)
                corrupt |= sl->in_e[i].idx >= s->max_tvars || tag_is_heap(sl->in_e[i].tag);
            if (corrupt)
                break;
            need = sl->in_n * (sizeof(struct ring_ent) + 8);
        } else if (ring_kind(rec) == RING_HEAP_KIND) {
            uint32_t blen;
            if (!heap_block_ok(s, rec, &blen) || blen < sizeof(struct ring_rec)) {
                corrupt = 1;
                break;
            }
            rh = (const struct ring_rec *)heap_payload(s, rec);
            if (rh->wv != wv || rh->bytes > blen - sizeof *rh ||
                rec_sum((const unsigned char *)(rh + 1), rh->bytes) != rh->sum) {
                corrupt = 1;
                break;
            }
            owner = rh->owner & ~RING_OWNER_SYNC;
        } else if (ring_kind(rec) != RING_VOID_KIND) {
            corrupt = 1;
            break;
        }
        if (owner < s->max_procs && owner_stamp[owner] != stamp) {
            owner_stamp[owner] = stamp;
            owners[n_owners++] = owner;
        }
        if (rh)
            need = rh->bytes;
        if (bound + need > cap) {
            why = SHMSTM_COLLECT_FULL;
            break;
        }
        bound += need;
    }
    /* A record that fails its checks ends the batch before it, so that the
     * commits ahead of it still reach LMDB; the next collect, which starts
     * at it, reports the corruption (the flusher stops there). */
    if (corrupt) {
        if (wv == from_wv)
            return SHMSTM_ECORRUPT;
        why = SHMSTM_COLLECT_CORRUPT;
    }

    /* Do not let a slot be recycled while its owner still says VALIDATING
     * for its wv: recovery of that owner decides by the slot (see
     * ring_recover_decide).  One look per owner of the batch, not per commit:
     * an owner's commits are sequential, so all but the one its record names
     * (r->wv, stored before its fill, which our acquire of the slot saw) are
     * finished, and its record's line is not taken from its committer after
     * every commit.  r->wv read first, then state: a state of the owner's
     * next commit only cuts the batch early (conservative). */
    for (uint32_t i = 0; i < n_owners; i++) {
        struct shm_commit_rec *r = &s->procs[owners[i]].rec;
        uint64_t w = load_acquire(&r->wv);
        if (w < from_wv || w >= wv || load_acquire(&r->state) != CR_VALIDATING)
            continue;
        if (slot_owner_dead(s, owners[i]))
            slot_recover(s, owners[i]);       /* rolls forward: the slot is filled */
        w = load_acquire(&r->wv);
        if (w >= from_wv && w < wv && load_acquire(&r->state) == CR_VALIDATING) {
            wv = w;
            why = SHMSTM_COLLECT_OWNER;
        }
    }
    uint64_t used = 0, ents = 0, syncs = 0;
    for (uint64_t w = wv; w-- > from_wv;) {
        struct shm_ring_slot *sl = slot_of(s, w);
        uint64_t rec = load_acquire(&sl->rec);
        if (ring_kind(rec) == RING_NOOP_KIND || ring_kind(rec) == RING_INLINE_KIND)
            syncs += (rec & RING_NOOP_SYNC) != 0;
        if (ring_kind(rec) == RING_INLINE_KIND) {
            for (uint32_t i = 0; i < sl->in_n; i++) {
                const struct ring_inl *in = &sl->in_e[i];     /* checked in the first pass */
                if (s->collect_seen[in->idx] != stamp) {
                    s->collect_seen[in->idx] = stamp;
                    struct ring_ent en = {.idx = in->idx, .tag = in->tag, .len = 8};
                    memcpy(buf + used, &en, sizeof en);
                    memcpy(buf + used + sizeof en, &in->val, 8);
                    used += sizeof en + 8;
                    ents++;
                }
            }
            continue;
        }
        if (ring_kind(rec) != RING_HEAP_KIND)
            continue;                 /* void or no durable TVar written */
        const struct ring_rec *rh = (const struct ring_rec *)heap_payload(s, rec);
        syncs += (rh->owner & RING_OWNER_SYNC) != 0;
        const unsigned char *q = (const unsigned char *)(rh + 1), *end = q + rh->bytes;
        for (uint32_t i = 0; i < rh->n; i++) {
            struct ring_ent en;
            if ((size_t)(end - q) < sizeof en)
                return SHMSTM_ECORRUPT;
            memcpy(&en, q, sizeof en);
            size_t sz = sizeof en + ((en.len + 7u) & ~7u);
            if (sz > (size_t)(end - q) || en.idx >= s->max_tvars)
                return SHMSTM_ECORRUPT;
            if (s->collect_seen[en.idx] != stamp) {
                s->collect_seen[en.idx] = stamp;
                memcpy(buf + used, q, sz);
                used += sz;
                ents++;
            }
            q += sz;
        }
    }
    out->next_wv = wv;
    out->used = used;
    out->stop = why;
    out->entries = ents;
    out->syncs = syncs;
    return (int)(wv - from_wv);
}

static inline void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* A collected batch (the collect's output: n_entries entries, used bytes)
 * as one LMDB log record (store/schema.py decodes it): per entry, u32 LE
 * name length, the name, u32 LE value length, the tag byte and the payload.
 * Process-private buffers only; the names come from the segment's directory
 * (name_block).  Returns the record's length, SHMSTM_ETOOLARGE if it is
 * longer than cap (nothing else is wrong: write the batch another way),
 * SHMSTM_ECORRUPT for a malformed batch, or name_block's error. */
int shmstm_ring_encode_log(shmstm_seg *s, const char *in, uint64_t used, uint64_t n_entries,
                           char *out, uint64_t cap)
{
    const unsigned char *q = (const unsigned char *)in, *end = q + used;
    unsigned char *o = (unsigned char *)out;
    uint64_t len = 0;
    for (uint64_t i = 0; i < n_entries; i++) {
        struct ring_ent en;
        if ((size_t)(end - q) < sizeof en)
            return SHMSTM_ECORRUPT;
        memcpy(&en, q, sizeof en);
        size_t sz = sizeof en + (((size_t)en.len + 7) & ~(size_t)7);
        if (sz > (size_t)(end - q))
            return SHMSTM_ECORRUPT;
        const unsigned char *name;
        uint32_t nlen;
        int rc = name_block(s, en.idx, &name, &nlen);
        if (rc)
            return rc == SHMSTM_EINVAL ? SHMSTM_ECORRUPT : rc;
        uint64_t need = 4 + (uint64_t)nlen + 4 + 1 + en.len;
        if (need > cap - len)
            return SHMSTM_ETOOLARGE;
        put_le32(o + len, nlen);
        memcpy(o + len + 4, name, nlen);
        len += 4 + nlen;
        put_le32(o + len, en.len + 1);
        o[len + 4] = (unsigned char)en.tag;
        memcpy(o + len + 5, q + sizeof en, en.len);
        len += 5 + en.len;
        q += sz;
    }
    if (q != end || len > INT32_MAX)
        return q != end ? SHMSTM_ECORRUPT : SHMSTM_ETOOLARGE;
    return (int)len;
}

/* Void slot wv if still EMPTY (grace passed).  1 voided or already void. */
int shmstm_ring_void(shmstm_seg *s, uint64_t wv)
{
    if (!s->ring_slots || wv > load_acquire(&s->h->clock))
        return SHMSTM_EINVAL;
    struct shm_ring_slot *sl = slot_of(s, wv);
    if (load_acquire(&sl->seq) != wv)
        return 0;
    uint64_t exp = ring_empty(wv);
    if (cas_acq_rel(&sl->rec, &exp, RING_VOID))
        return 1;
    return ring_kind(exp) == RING_VOID_KIND;
}

/* After the LMDB commit of (from_wv..to_wv): free the records, recycle the
 * slots, advance flushed_wv, wake waiters.  Idempotent (a restarted flusher
 * re-runs it for a range that LMDB already holds). */
int shmstm_ring_release(shmstm_seg *s, uint64_t from_wv, uint64_t to_wv)
{
    if (!s->ring_slots)
        return SHMSTM_EINVAL;
    struct shm_header *h = s->h;
    uint64_t offs[RELEASE_CHUNK];
    uint32_t owners[RELEASE_CHUNK];
    for (uint64_t wv = from_wv; wv <= to_wv;) {
        /* In chunks: take up to RELEASE_CHUNK records, free them (one chain
         * per owner and class, heap.c), then recycle their slots.  A flusher
         * killed between the take and the free leaks at most that chunk. */
        uint64_t first = wv;
        uint32_t n = 0;
        for (; wv <= to_wv && n < RELEASE_CHUNK; wv++) {
            struct shm_ring_slot *sl = slot_of(s, wv);
            if (load_acquire(&sl->seq) != wv)
                continue;                  /* already recycled by a dead predecessor */
            /* Only ranges already in LMDB come here, so every slot was
             * processed: an empty value means a predecessor died between
             * clearing and recycling it (it stored the next round's). */
            uint64_t rec = load_acquire(&sl->rec);
            /* Before the free (never freed twice); release: see
             * ring_recover_decide. */
            store_release(&sl->rec, ring_empty(wv + s->ring_slots));
            if (ring_kind(rec) == RING_HEAP_KIND) {
                /* The collect checked the record (a restarted flusher's
                 * predecessor did); still bounds-checked before its owner is
                 * read, and a bad owner only sends it to the shared lists. */
                uint32_t len, who = UINT32_MAX;
                if (heap_block_ok(s, rec, &len) && len >= sizeof(struct ring_rec))
                    who = ((struct ring_rec *)heap_payload(s, rec))->owner & ~RING_OWNER_SYNC;
                offs[n] = rec;
                owners[n++] = who;
            }
        }
        heap_free_records(s, offs, owners, n);
        FAULT_POINT("ring.release_one");
        /* No committer waits for these slots' next round yet: the room check
         * keeps every wv taken within ring_slots of flushed_wv, which moves
         * only below. */
        for (uint64_t w = first; w < wv; w++) {
            struct shm_ring_slot *sl = slot_of(s, w);
            /* Pairs with the committer's load_acquire of seq in ring_fill(). */
            if (load_relaxed(&sl->seq) == w)
                store_release(&sl->seq, w + s->ring_slots);
        }
    }
    uint64_t fl = load_relaxed(&h->flushed_wv);
    if (to_wv > fl)
        store_release(&h->flushed_wv, to_wv);    /* pairs with the room check and waits */
    /* The sync waits this release ends are those of from_wv..to_wv: a wait
     * for an earlier wv saw flushed_wv cover it, or was woken, when that was
     * released (or slept with a futex word this bump changes). */
    uint32_t bits = UINT32_MAX;
    if (to_wv >= from_wv && to_wv - from_wv < 31) {
        bits = 0;
        for (uint64_t w = from_wv; w <= to_wv; w++)
            bits |= flush_bit(w);
    }
    wake_released(h, bits, to_wv >= from_wv ? to_wv - from_wv + 1 : 0);
    return 0;
}
