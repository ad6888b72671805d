/* ring.c -- the commit ring of a durable runtime (brief section 7).
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
#include "core.h"

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

#define ROOM_CHECK_ROUNDS 10u        /* futex slices between flusher liveness checks */
#define RELEASE_CHUNK 64u            /* records freed per chain push (shmstm_ring_release) */
#define COLLECT_AHEAD 8u             /* slots between a record's prefetch and its check */

/* ring_rec.sum: FNV-1a over the entries' 8-byte words (entries are whole
 * words; a forged length's tail bytes are hashed one by one), folded to 32
 * bits.  Word steps, not byte steps: every durable commit pays it once and
 * the flusher once more, and a byte loop's multiply chain was 24 steps for
 * a record of one inline value.  It catches corrupt records, not forged ones. */
static inline uint32_t rec_sum(const unsigned char *p, size_t n)
{
    uint64_t x = 1469598103934665603ull, w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        x = (x ^ w) * 1099511628211ull;
    }
    for (; i < n; i++)
        x = (x ^ p[i]) * 1099511628211ull;
    return (uint32_t)(x ^ (x >> 32));
}

/* Does write entry e go to LMDB?  A named TVar's, unless the commit frees
 * it.  The one test of ring_prepare (which builds the record) and of
 * inline_complete (which rebuilds a dead owner's inline record from its
 * commit record, hence the bound). */
static inline int durable_entry(struct shmstm_seg *s, const struct shm_wentry *e)
{
    return e->idx < s->max_tvars && !(e->flags & WE_FREE) &&
           (load_relaxed(&s->tvars[e->idx].flags) & TV_NAMED);
}

/* ring_mask: ring_slots - 1 when a power of two (the default sizes), else 0
 * and a division. */
static inline struct shm_ring_slot *slot_of(struct shmstm_seg *s, uint64_t wv)
{
    return &s->ring[s->ring_mask ? wv & s->ring_mask : wv % s->ring_slots];
}

/* Is the lease word o held by a live process?  PS_CLAIMING marks a claim in
 * progress (flusher_start not yet written): the pid alone decides, as for a
 * process slot being claimed for recovery (proc.c). */
static int lease_alive(struct shmstm_seg *s, uint64_t o)
{
    if (ps_state(o) == PS_FREE)
        return 0;
    if (ps_state(o) != PS_ACTIVE)
        return proc_alive(ps_pid(o), 0);
    /* The acquire load of o that the caller made pairs with the holder's
     * store_release of ACTIVE (shmstm_flusher_claim), so this reads the
     * holder's own start time, never its predecessor's. */
    return proc_alive(ps_pid(o), load_relaxed(&s->h->flusher_start));
}

static int flusher_alive(struct shmstm_seg *s)
{
    /* Dekker with a flusher's exit (shmstm_flusher_release): an opener has
     * claimed its slot, then looks at the lease; the flusher released the
     * lease, then looks at the slots.  One of the two sees the other. */
    fence_seq_cst();
    return lease_alive(s, load_acquire(&s->h->flusher_owner));
}

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

/* Chained wake-ups.  A release with sync waiters to wake ORs its bits into
 * flush_wake_bits and wakes one waiter (wake_released); every
 * waiter on flush_futex, when its wait returns for any reason, takes the
 * bits there and wakes their waiters.  The wake-ups of a batch's committers
 * (one per committer, ~1 us of kernel time each) then run on a committer's
 * vCPU, in parallel with the flusher's next write, instead of on the
 * flusher's critical path.  No wake-up is lost: if a waiter sleeps with a
 * bit of the release when the flusher wakes, one such waiter is woken and
 * passes the rest on; a waiter that read flush_futex before the release's
 * bump finds it changed when it sleeps, returns, and passes them on too.
 * Only a waiter killed between its wake-up and its pass leaves the rest to
 * their 50 ms re-check. */
static void pass_flush_wake(struct shm_header *h)
{
    if (!load_relaxed(&h->flush_wake_bits))
        return;
    uint32_t bits = xchg_acq_rel(&h->flush_wake_bits, 0);
    if (bits)
        futex_wake_bits(&h->flush_futex, bits);
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
        if (rounds % ROOM_CHECK_ROUNDS == ROOM_CHECK_ROUNDS - 1 && !flusher_alive(s))
            return SHMSTM_ENOFLUSHER;
        if (load_relaxed(&h->durable_error))
            return SHMSTM_EDURABLE;
        ctx_gil_release(c);
        rc = futex_wait(&h->flush_futex, f, 10000000);
        pass_flush_wake(h);
        if (rc == SHMSTM_EINTR)
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
        int rc = 0;
        if (rounds % ROOM_CHECK_ROUNDS == ROOM_CHECK_ROUNDS - 1 && !flusher_alive(s))
            rc = SHMSTM_ENOFLUSHER;
        else if (load_relaxed(&h->durable_error))
            rc = SHMSTM_EDURABLE;
        else {
            ctx_gil_release(c);
            rc = futex_wait(&h->flush_futex, f, 10000000) == SHMSTM_EINTR ? SHMSTM_EINTR : 0;
            pass_flush_wake(h);
        }
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

/* Write an inline record into claimed slot sl and publish it (claim ->
 * RING_INLINE_KIND, release: the entries are visible to the flusher's
 * acquire of rec). */
static void inline_publish(struct shm_ring_slot *sl, const struct ring_inl *in, uint32_t n, uint64_t claim)
{
    sl->in_n = n;
    memcpy(sl->in_e, in, n * sizeof *in);
    sl->in_sum = rec_sum((const unsigned char *)sl->in_e, n * sizeof *in);
    store_release(&sl->rec, (claim & ~15ull) | RING_INLINE_KIND);
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

/* The futex bit a wait for wv's flush sleeps with (futex_wait_bits): a
 * release wakes only the waits of the write versions it covers (plus those
 * that share their bits), not every sync committer, e.g. not the half of 16
 * whose commits are in the batch after it. */
#define CHAIN_MIN 2     /* a release of more commits chains its wake-ups */

static inline uint32_t flush_bit(uint64_t wv)
{
    return 1u << (wv & 31);
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

/* ---- for Python: the opener, the flusher and stats ---- */

int shmstm_ctx_set_sync(shmstm_ctx *c, int sync)
{
    c->dsync = sync ? 1 : 0;
    return 0;
}

uint64_t shmstm_ctx_last_wv(shmstm_ctx *c) { return c->last_wv; }

/* The largest wv any context of this attachment committed (0: none). */
uint64_t shmstm_seg_last_wv(shmstm_seg *s) { return load_acquire(&s->my_last_wv); }

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
 * after a batch of few sync commits (_flusher.py): their committers come back
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
 * poll sync_fills (sched_yield between looks) instead of sleeping.  Measured
 * on this VM with tools/probe_lmdb: while the hypervisor takes a share of the
 * vCPUs, an LMDB write transaction begun just after its process slept ~0.2 ms
 * took 1.0x-1.9x as long on average as one begun after the same wait spent
 * yielding (up to 3x in an ad-hoc run at 25-30% steal; no difference on a
 * quiet host; docs/benchmarks.md).  With one or two sync
 * committers the vCPUs are mostly idle, so the yields take CPU nobody needs;
 * with more, the stragglers need the CPU and the flusher sleeps instead
 * (_flusher.py).
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
 * as one LMDB log record in _durable.encode_log's format: per entry, u32 LE
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
