/* ring_commit.c -- the commit ring of a durable runtime, the committers'
 * side: records, room, the fill (the commit point), sync waits and the
 * recovery decisions (the flusher's side is ring_flush.c; shared: ring.h).
 *
 * Slot wv % N (N = ring_slots) serves write version wv.  Its sequence stamp
 * `seq` says which wv the slot serves now; `rec` goes ring_empty(wv) ->
 * (record | NOOP marker | VOID) exactly once per round, by CAS from the
 * round's own empty value, so no stalled party can fill or void a later round.
 *
 * Invariants:
 *  - The commit point of a durable writer is its CAS of slot wv from EMPTY
 *    to its record (or NOOP marker).  A committer whose CAS fails found the
 *    slot VOID (the flusher's grace passed, or a recoverer voided it): it
 *    rolls back.  Recovery decides by the slot (ring_recover_decide).
 *  - Room: a committer passes the room check (before taking any lock) only if
 *    clock + M - flushed_wv <= N, with M = max_procs + 1.  At most max_procs
 *    commits are between their check and their fetch_add of the clock (one
 *    per process slot), so every wv taken satisfies wv - flushed_wv <= N:
 *    round wv - N is recycled and seq == wv when the committer reaches its
 *    fill.  A committer never waits for a slot while holding locks.
 *  - The flusher processes slots strictly in wv order: it recycles slot wv
 *    (rec := EMPTY, then seq := wv + N, release) only after slot wv's round
 *    is in LMDB or void, then advances flushed_wv (release).  It never
 *    recycles a filled slot while its owner's record still says
 *    CR_VALIDATING for that wv (it waits, or recovers a dead owner first), so
 *    a recoverer that finds seq != wv knows the slot was voided, not filled.
 *  - Records carry their wv, owner and an FNV-1a checksum of the entries; the
 *    flusher refuses (SHMSTM_ECORRUPT) a record that does not check out.
 *
 * Concurrency: committers (any process) fill distinct slots; one flusher
 * (lease) collects, voids and recycles; recoverers void.  Every contended
 * transition is a CAS on `rec` from EMPTY, so exactly one of fill/void wins.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#include "ring.h"

/* Creation (segment.c, before INIT_READY): clock and flushed_wv start at the
 * LMDB's flushed_wv so versions stay monotonic across restarts; slot i serves
 * the first wv > clock_start that is congruent to i. */
void ring_init(struct shmstm_seg *s, const shmstm_params *p)
{
    struct shm_header *h = s->h;
    uint64_t c0 = p->clock_start, n = s->ring_slots;
    store_relaxed(&h->clock, c0);
    store_relaxed(&h->flushed_wv, c0);
    for (uint64_t w = c0 + 1; w <= c0 + n; w++) {
        store_relaxed(&slot_of(s, w)->rec, ring_empty(w));
        store_relaxed(&slot_of(s, w)->seq, w);
    }
    if (p->use_runtime_id)
        memcpy(h->runtime_id, p->runtime_id, 16);
    store_relaxed(&h->durable_state, DS_LOADING);
}

/* One round of waiting for the flusher to make room (ring slots, or heap
 * blocks held by unflushed records), holding no lock and without the GIL
 * (ctx_gil_release).  f: flush_futex as read before the caller's check.
 * 0: look again; SHMSTM_ENOFLUSHER (the flusher is dead, checked every
 * ROOM_CHECK_ROUNDS rounds), SHMSTM_EDURABLE (it cannot write LMDB) or
 * SHMSTM_EINTR (a signal: Python runs its handlers and re-runs). */
static int room_wait(shmstm_ctx *c, uint32_t rounds, uint32_t f)
{
    struct shm_header *h = c->seg->h;
    if (rounds % ROOM_CHECK_ROUNDS == ROOM_CHECK_ROUNDS - 1 && !flusher_alive(c->seg))
        return SHMSTM_ENOFLUSHER;
    if (load_relaxed(&h->durable_error))
        return SHMSTM_EDURABLE;
    ctx_gil_release(c);
    int rc = futex_wait(&h->flush_futex, f, 10000000);
    pass_flush_wake(h);
    return rc == SHMSTM_EINTR ? rc : 0;
}

/* A heap block for a commit record.  A full heap may be full of the records
 * of commits the flusher has not written yet (it frees them after the LMDB
 * commit): then wait for it, as for ring room, holding no lock, until every
 * commit made before the first failure is flushed; only a heap still full
 * after that is SHMSTM_EHEAPFULL. */
static int alloc_record(shmstm_ctx *c, size_t size, uint64_t *off)
{
    struct shmstm_seg *s = c->seg;
    struct shm_header *h = s->h;
    uint64_t until = 0;
    for (uint32_t rounds = 0;; rounds++) {
        int rc = heap_alloc_rec(s, c->proc, size, off);
        if (rc != SHMSTM_EHEAPFULL)
            return rc;
        uint32_t f = load_seq_cst(&h->flush_futex);
        /* Pairs with the flusher's store_release of flushed_wv. */
        uint64_t fl = load_acquire(&h->flushed_wv);
        if (!until) {
            until = load_acquire(&h->clock);
            counter_add(&c->proc->ring_waits, 1);
        }
        if (fl >= until)
            return rc;                   /* nothing of that time left to free */
        rc = room_wait(c, rounds, f);
        if (rc)
            return rc;
    }
}

/* Before locking (commit step 2b): build the record of the durable (named)
 * TVars written and wait for room.  On error nothing is allocated. */
int ring_prepare(shmstm_ctx *c, struct shm_wentry *e, uint32_t n, uint64_t *recp)
{
    struct shmstm_seg *s = c->seg;
    struct shm_header *h = s->h;
    int32_t derr = (int32_t)load_relaxed(&h->durable_error);
    if (derr)
        return SHMSTM_EDURABLE;
    size_t bytes = 0;
    uint32_t m = 0, heap_vals = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (!durable_entry(s, &e[i]))
            continue;
        uint32_t len = 8;
        if (tag_is_heap(e[i].new_tag)) {
            if (!heap_block_ok(s, e[i].new_val, &len))
                return SHMSTM_ECORRUPT;
            heap_vals++;
        } else if (m < RING_INL) {
            c->inl_e[m] = (struct ring_inl){.idx = e[i].idx, .tag = e[i].new_tag, .val = e[i].new_val};
        }
        bytes += sizeof(struct ring_ent) + ((len + 7u) & ~7u);
        m++;
    }
    if (bytes > UINT32_MAX - sizeof(struct ring_rec))
        return SHMSTM_ETOOLARGE;           /* ring_rec.bytes; nothing allocated yet */
    uint64_t rec = ring_noop(c->slot, c->dsync);
    if (m && m <= RING_INL && !heap_vals) {
        c->inl_n = m;                      /* written to the slot after the claim */
        rec = ring_claim(c->slot, c->dsync);
    } else if (m) {
        uint64_t off;
        int rc = alloc_record(c, sizeof(struct ring_rec) + bytes, &off);
        if (rc)
            return rc;
        unsigned char *base = heap_payload(s, off);
        unsigned char *q = base + sizeof(struct ring_rec);
        for (uint32_t i = 0; i < n; i++) {
            if (e[i].flags & WE_FREE || !(load_relaxed(&s->tvars[e[i].idx].flags) & TV_NAMED))
                continue;
            struct ring_ent en = {.idx = e[i].idx, .tag = e[i].new_tag, .len = 8};
            const void *src = &e[i].new_val;
            if (tag_is_heap(e[i].new_tag)) {
                heap_block_ok(s, e[i].new_val, &en.len);
                src = heap_payload(s, e[i].new_val);
            }
            memcpy(q, &en, sizeof en);
            memcpy(q + sizeof en, src, en.len);
            size_t padded = (en.len + 7u) & ~7u;
            memset(q + sizeof en + en.len, 0, padded - en.len);
            q += sizeof en + padded;
        }
        struct ring_rec rh = {.wv = 0, .n = m,
                              .owner = c->slot | (c->dsync ? RING_OWNER_SYNC : 0), .bytes = (uint32_t)bytes,
                              .sum = rec_sum(base + sizeof(struct ring_rec), bytes)};
        memcpy(base, &rh, sizeof rh);
        rec = off;
    }
    /* Room check: see the invariants.  Wait holding no lock. */
    uint64_t margin = (uint64_t)s->max_procs + 1;
    int waited = 0;
    for (uint32_t rounds = 0;; rounds++) {
        uint32_t f = load_seq_cst(&h->flush_futex);
        /* Pairs with the flusher's store_release of flushed_wv. */
        uint64_t fl = load_acquire(&h->flushed_wv);
        uint64_t now = load_acquire(&h->clock);
        if (now + margin - fl <= s->ring_slots)
            break;
        if (!waited) {
            waited = 1;
            counter_add(&c->proc->ring_waits, 1);
        }
        int rc = room_wait(c, rounds, f);
        if (rc) {
            if (ring_kind(rec) == RING_HEAP_KIND)
                heap_free(s, NULL, rec);
            return rc;
        }
    }
    struct shm_commit_rec *r = &c->proc->rec;
    store_relaxed(&r->wv, 0);                /* recovery: no wv yet */
    store_relaxed(&r->ring_rec, ring_kind(rec) == RING_HEAP_KIND ? rec : 0);
    *recp = rec;
    return 0;
}

/* The commit point (step 6): CAS slot wv EMPTY -> rec.  1: filled (committed),
 * 0: the slot was voided (roll back). */
int ring_fill(shmstm_ctx *c, uint64_t wv, uint64_t rec)
{
    struct shmstm_seg *s = c->seg;
    struct shm_ring_slot *sl = slot_of(s, wv);
    if (ring_kind(rec) == RING_HEAP_KIND)
        ((struct ring_rec *)heap_payload(s, rec))->wv = wv;   /* private until the CAS */
    /* Pairs with the flusher's store_release of seq when it recycled round
     * wv - N.  By the room invariant seq < wv never happens; the loop is a
     * guard.  seq > wv: this committer stalled (preempted, SIGSTOPped) past
     * the grace period, the flusher voided slot wv and recycled it for round
     * wv + N: roll back (spinning for seq == wv would never end, holding
     * locks). */
    uint64_t q;
    while ((q = load_acquire(&sl->seq)) < wv)
        cpu_relax();
    if (q != wv)
        return 0;
    /* From the empty value of round wv only: if the slot was voided and
     * recycled while we stalled here, the CAS fails and we roll back. */
    uint64_t exp = ring_empty(wv);
    FAULT_POINT("ring.before_fill");
    /* acq_rel: the record bytes and r->wv are visible to whoever reads rec. */
    if (!cas_acq_rel(&sl->rec, &exp, rec))
        return 0;
    if (ring_kind(rec) == RING_CLAIM_KIND) {
        /* Claimed: committed, and the slot is ours until the release below
         * (the flusher waits for it; a recoverer completes it from our
         * commit record if we die here). */
        FAULT_POINT("ring.claimed");
        inline_publish(sl, c->inl_e, c->inl_n, rec);
    }
    /* Committed, the record still VALIDATING: recovery rolls forward by the slot. */
    FAULT_POINT("ring.filled");
    store_relaxed(&c->proc->rec.ring_rec, 0);      /* the flusher owns it now */
    c->last_wv = wv;
    uint64_t mine = load_relaxed(&s->my_last_wv);
    while (mine < wv && !cas_acq_rel(&s->my_last_wv, &mine, wv))
        ;                                   /* another thread of ours raised it */
    return 1;
}

/* After the commit record says COMMITTED (txn.c, just after the fill): wake
 * the flusher if it sleeps.  Not from ring_fill: a flusher woken there, on
 * the other vCPU, collected while this committer was still in the futex
 * syscall with its record VALIDATING, and had to stop at the commit (the
 * slot may not be recycled under a VALIDATING owner: see the collect), look
 * at the owner's /proc entry, yield and collect again; measured, about two
 * such empty collects per LMDB write with 16 sync committers.
 * A committer killed between the fill and this call leaves the flusher to
 * its nap's timeout. */
void ring_notify(shmstm_ctx *c)
{
    struct shmstm_seg *s = c->seg;
    /* Dekker with the flusher's sleep: fill (and COMMITTED), fence, read
     * flusher_sleeping.
     * FS_ANY: wake it; FS_SYNC (a busy flusher napping between batches):
     * only a sync commit, which waits for it, wakes it.  The exchange makes
     * the wake-up one-shot: of the commits that find the flusher asleep, one
     * pays the syscall (every one did, ~1 us each, while it was being
     * scheduled).  FS_GROUP (the flusher gathers a group commit): only the
     * sync commit whose fill completes the group wakes it, not each of the
     * group (a context switch each, ~15 per LMDB write with 16 committers). */
    uint32_t n = c->dsync ? faa_seq_cst(&s->h->sync_fills, 1) + 1u : 0;
    fence_seq_cst();
    uint32_t fs = load_seq_cst(&s->h->flusher_sleeping);
    int wake = fs == FS_ANY || (c->dsync && fs == FS_SYNC) ||
               (c->dsync && fs == FS_GROUP &&
                (int32_t)(n - load_seq_cst(&s->h->sync_target)) >= 0);
    if (wake && xchg_seq_cst(&s->h->flusher_sleeping, FS_AWAKE) != FS_AWAKE) {
        faa_seq_cst(&s->h->ring_futex, 1);
        futex_wake(&s->h->ring_futex);
    }
}

/* A failed commit: void slot wv if we took one, free the record. */
void ring_unwind(shmstm_ctx *c, uint64_t wv, uint64_t rec)
{
    struct shmstm_seg *s = c->seg;
    if (wv) {
        struct shm_ring_slot *sl = slot_of(s, wv);
        uint64_t exp = ring_empty(wv);
        cas_acq_rel(&sl->rec, &exp, RING_VOID);   /* fails if void, or recycled */
    }
    store_relaxed(&c->proc->rec.ring_rec, 0);
    if (rec && ring_kind(rec) == RING_HEAP_KIND)
        heap_free(s, NULL, rec);
}

/* Wait until flushed_wv >= wv (holding no lock).  *late: set when the wait
 * saw its wv flushed only after a futex wait that timed out (no wake-up
 * came for the release: lost, or late past the re-check). */
static int ring_wait(struct shmstm_seg *s, uint64_t wv, int64_t timeout_ns, int *late)
{
    struct shm_header *h = s->h;
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    int timed_out = 0;
    for (;;) {
        uint32_t f = load_seq_cst(&h->flush_futex);
        if (load_acquire(&h->flushed_wv) >= wv) {  /* pairs with ring_release */
            *late = timed_out;
            return 0;
        }
        uint64_t now = now_ns();
        if (now >= deadline)
            return SHMSTM_ETIMEOUT;
        int64_t left = (int64_t)(deadline - now);
        int rc = futex_wait_bits(&h->flush_futex, f, left < 50000000 ? left : 50000000,
                                 flush_bit(wv));
        pass_flush_wake(h);
        if (rc == SHMSTM_EINTR)
            return SHMSTM_EINTR;
        timed_out = rc == SHMSTM_ETIMEOUT;
    }
}

int shmstm_ring_wait(shmstm_seg *s, uint64_t wv, int64_t timeout_ns)
{
    if (!s->ring_slots)
        return SHMSTM_EINVAL;
    int late;
    return ring_wait(s, wv, timeout_ns, &late);
}

/* After step 10 of a sync commit: wait for the flusher.  0: durable;
 * SHMSTM_PENDING: committed but the wait was cut short (signal, flusher
 * dead, LMDB error): Python finishes it. */
int ring_after_commit(shmstm_ctx *c, uint64_t wv)
{
    struct shmstm_seg *s = c->seg;
    int ret = SHMSTM_PENDING;
    ctx_gil_release(c);
    for (uint32_t i = 0; i < 40; i++) {          /* 2 s, then Python takes over */
        /* Runtime.close() from another thread (shmstm_ctx_interrupt): hand
         * over to Python, which raises.  Seen within one 50 ms wait. */
        if (load_seq_cst(&c->interrupted))
            break;
        int late = 0;
        int rc = ring_wait(s, wv, 50000000, &late);
        if (rc == 0) {
            /* Owner-written counter; a timeout of the previous round that
             * left the wv unflushed does not count (the flusher was slow). */
            if (late)
                counter_add(&c->proc->late_wakeups, 1);
            ret = 0;
            break;
        }
        if (rc != SHMSTM_ETIMEOUT || load_relaxed(&s->h->durable_error) || !flusher_alive(s))
            break;
    }
    return ret;
}

/* A dead owner's claimed slot: write the inline record its commit record
 * names (the named, not freed entries: the ones ring_prepare took) and
 * publish it.  Idempotent: a recoverer killed here leaves the claim for the
 * next.  A commit record whose entries cannot be read (a corrupt spill
 * block; recovery then marks its locks lost) publishes an empty record. */
static void inline_complete(struct shmstm_seg *s, struct shm_ring_slot *sl,
                            struct shm_commit_rec *r, uint64_t claim)
{
    struct ring_inl in[RING_INL];
    uint32_t m = 0, n = load_relaxed(&r->n);
    struct shm_wentry *e = rec_entries(s, r);
    for (uint32_t i = 0; e && i < n && m < RING_INL; i++) {
        if (!durable_entry(s, &e[i]) || tag_is_heap(e[i].new_tag))
            continue;
        in[m++] = (struct ring_inl){.idx = e[i].idx, .tag = e[i].new_tag, .val = e[i].new_val};
    }
    inline_publish(sl, in, m, claim);
}

/* Recovery of a dead owner in CR_VALIDATING: did it pass its commit point?
 * Returns CR_COMMITTED (slot wv holds its fill: roll forward) or
 * CR_VALIDATING (roll back; the slot is void or voided here). */
uint32_t ring_recover_decide(struct shmstm_seg *s, struct shm_commit_rec *r, uint32_t rst)
{
    if (rst != CR_VALIDATING)
        return rst;
    uint64_t wv = load_relaxed(&r->wv);
    if (!wv)
        return rst;          /* died before storing wv: never filled; the flusher voids it */
    struct shm_ring_slot *sl = slot_of(s, wv);
    if (load_acquire(&sl->seq) != wv)
        return rst;          /* recycled: it was voided (see invariants) */
    uint64_t v = load_acquire(&sl->rec);
    for (;;) {
        if (v == ring_empty(wv)) {
            if (cas_acq_rel(&sl->rec, &v, RING_VOID))
                return rst;
            continue;
        }
        if (ring_kind(v) == RING_EMPTY_KIND || ring_kind(v) == RING_VOID_KIND)
            return rst;      /* void, or voided and recycled for a later round */
        /* A fill: ours, unless the slot was voided and recycled since our
         * look at seq and a later round's committer filled it.  That
         * committer's CAS came after its acquire of seq == wv + N, and our
         * acquire of its record orders this load after it. */
        if (load_acquire(&sl->seq) != wv)
            return rst;
        if (ring_kind(v) == RING_CLAIM_KIND)
            inline_complete(s, sl, r, v);   /* it died between claim and publish */
        return CR_COMMITTED;
    }
}

void ring_recover_cleanup(struct shmstm_seg *s, struct shm_commit_rec *r, uint32_t rst)
{
    uint64_t off = load_relaxed(&r->ring_rec);
    store_relaxed(&r->ring_rec, 0);
    if (off && rst != CR_COMMITTED)
        heap_free(s, NULL, off);
}

/* ---- for Python: the committers' settings ---- */

/* The default ring size of a new durable segment: a large ring, and at least
 * four times the room margin (max_procs + 1, see the invariants) that
 * segment.c requires twice of. */
uint32_t shmstm_ring_default_slots(uint32_t max_procs)
{
    uint32_t margin = max_procs + 1u;
    return margin * 4u > RING_DEFAULT_SLOTS ? margin * 4u : RING_DEFAULT_SLOTS;
}

int shmstm_ctx_set_sync(shmstm_ctx *c, int sync)
{
    c->dsync = sync ? 1 : 0;
    return 0;
}

uint64_t shmstm_ctx_last_wv(shmstm_ctx *c) { return c->last_wv; }

/* The largest wv any context of this attachment committed (0: none). */
uint64_t shmstm_seg_last_wv(shmstm_seg *s) { return load_acquire(&s->my_last_wv); }

