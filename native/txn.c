/* txn.c -- transactions: TL2 with snapshot extension (brief section 5) and
 * the commit protocol with its commit record (section 6).
 *
 * Invariants:
 *  - Opacity: every read is validated against the snapshot rv; a read that
 *    finds a newer version extends the snapshot (re-validating every earlier
 *    read at the current clock) or dooms the attempt.  A doomed attempt returns
 *    SHMSTM_ECONFLICT from every later call, so user code never sees a mix
 *    of two snapshots.
 *  - Reads never write shared memory.  A read-only attempt commits with no
 *    shared write at all; it serialises at its final rv.
 *  - Writers serialise in wv order.  The commit is one C call: no Python code,
 *    signal handler or allocation by Python can run between taking the first
 *    lock and releasing the last, so a live process never leaks a lock.
 *  - Locks are taken in ascending TVar index order with bounded waiting, so
 *    two commits never wait on each other in a cycle; a lock held too long is
 *    either an owner the kernel says is dead (recovered, see proc.c) or a
 *    conflict (abort and re-run).
 *  - The commit record lists every entry before its lock is taken, and
 *    old_lock is stored before the CAS that takes it: whenever a lock word
 *    names this slot, the record says how to undo or finish it.
 *
 * Which operations may run concurrently: everything, across processes and
 * threads, except that one context (shmstm_ctx) belongs to one thread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "core.h"

#define READ_SPIN_LIMIT    400u     /* lock_wait rounds before a read gives up */
#define COMMIT_SPIN_LIMIT  2000u    /* ... before a commit gives up on a lock */

void ctx_reset(shmstm_ctx *c)
{
    c->active = 0;
    c->doomed = 0;
    c->rs_n = 0;
}

void release_token(shmstm_ctx *c)
{
    if (!c->has_token)
        return;
    c->has_token = 0;
    /* Pairs with the load_acquire of token in wait_token(). */
    store_release(&c->seg->h->token, 0);
    faa_seq_cst(&c->seg->h->token_futex, 1);
    futex_wake(&c->seg->h->token_futex);
}

/* One round of waiting for a lock word to change.  Spin first, then yield
 * (two cores: the holder may need ours), and every 64 yields ask the kernel
 * whether the holder still exists; a dead holder is recovered here.
 * Returns 0 when the caller should give up (limit reached). */
static int lock_wait(shmstm_ctx *c, struct shmstm_seg *s, a64 *lk, uint64_t w,
                     uint32_t *spins, uint32_t limit)
{
    uint32_t n = (*spins)++;
    if (n < 64) {
        cpu_relax();
        return 1;
    }
    if (limit && n >= limit)
        return 0;
    /* A yield can give up a whole time slice (the holder may be stopped or
     * descheduled): from here on without the GIL (fast.h). */
    ctx_gil_release(c);
    sched_yield();
    if (n % 64 == 63) {
        if (lock_owner_gone(s, w))
            slot_recover(s, lk_owner(w));
        else
            lock_repair_orphan(s, lk, w);   /* a corrupt word: no owner can hold it */
    }
    return 1;
}

static int rs_push(shmstm_ctx *c, uint32_t idx, uint32_t gen, uint64_t ver)
{
    if (c->rs_n == c->rs_cap) {
        uint32_t cap = c->rs_cap * 2;
        struct rentry *n = realloc(c->rs, cap * sizeof *n);
        if (!n)
            return SHMSTM_ENOMEM;
        c->rs = n;
        c->rs_cap = cap;
    }
    c->rs[c->rs_n++] = (struct rentry){idx, gen, ver};
    return 0;
}

/* The write entry for idx in a sorted entry array, or NULL. */
static struct shm_wentry *find_entry(struct shm_wentry *e, uint32_t n, uint32_t idx)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (e[mid].idx < idx)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && e[lo].idx == idx ? &e[lo] : NULL;
}

/* Is every read still current?  During commit (e != NULL) a TVar locked by
 * this slot is checked against the version it had when we locked it. */
static int validate_reads(shmstm_ctx *c, struct shm_wentry *e, uint32_t n)
{
    struct shmstm_seg *s = c->seg;
    uint64_t mine = lk_make_locked(c->slot);
    for (uint32_t i = 0; i < c->rs_n; i++) {
        struct rentry *r = &c->rs[i];
        /* Pairs with the store_release that unlocked it. */
        uint64_t w = load_acquire(&s->tvars[r->idx].lock);
        if (w == mine && e) {
            struct shm_wentry *we = find_entry(e, n, r->idx);
            w = we ? we->old_lock : w;
        }
        if (lk_locked(w) || lk_version(w) != r->ver || FAULT_SHAKE()) {
            c->failed_idx = r->idx;
            return 0;
        }
    }
    return 1;
}

static int extend(shmstm_ctx *c)
{
    /* Pairs with the clock faa of every commit whose unlock we must see. */
    uint64_t now = load_acquire(&c->seg->h->clock);
    if (!validate_reads(c, NULL, 0))
        return 0;
    c->rv = c->rv_hint = now;
    return 1;
}

#define CONFLICTS_MAX (UINT32_MAX - (1u << 24))   /* margin: one increment per thread */

static void note_abort(shmstm_ctx *c, uint32_t reason, uint32_t idx)
{
    counter_add(&c->proc->aborts[reason], 1);
    if (idx >= c->seg->max_tvars || (reason != AB_LOCKED && reason != AB_VALIDATE))
        return;
    /* Advisory; saturates instead of wrapping (a wrapped count would make the
     * stats tool's conflicts per second negative).  Concurrent increments
     * overshoot the test by at most one per thread. */
    a32 *n = &c->seg->tvars[idx].conflicts;
    if (load_relaxed(n) < CONFLICTS_MAX)
        faa_relaxed(n, 1);
}

/* The seqlock read shared by transactional and snapshot reads.
 * record: 1 inside a transaction (validate against rv, add to the read set). */
static int read_tvar(shmstm_ctx *c, uint32_t idx, uint32_t gen, int64_t *out, int record)
{
    struct shmstm_seg *s = c->seg;
    if (c->gone)
        return c->gone;
    if (idx >= s->max_tvars)
        return SHMSTM_EBADHANDLE;
    if (record) {
        if (c->doomed)
            return SHMSTM_ECONFLICT;
        if (!c->active) {
            /* Begin at a clock value that was current once, not the clock
             * itself: any rv is safe (every read must have a version <= rv;
             * a newer one extends, reading the clock then, and validates),
             * and a commit's "rv + 1 == wv" still means nobody committed
             * since the clock was rv.  Disjoint workloads then read the
             * shared clock line only in their commit's fetch_add. */
            c->rv = c->rv_hint;
            c->active = 1;
        }
    }
    struct shm_tvar *t = &s->tvars[idx];
    uint32_t spins = 0;
    for (;;) {
        /* Pairs with the store_release that unlocked it (commit step 8). */
        uint64_t v1 = load_acquire(&t->lock);
        if (lk_locked(v1)) {
            if (lk_owner(v1) == LK_LOST_OWNER) {     /* never released: proc.c R2b */
                if (record)
                    c->doomed = 1;
                c->failed_idx = idx;
                return SHMSTM_ELOST;
            }
            if (!lock_wait(c, s, &t->lock, v1, &spins, record ? READ_SPIN_LIMIT : 0)) {
                c->doomed = 1;
                c->failed_idx = idx;
                note_abort(c, AB_LOCKED, idx);
                return SHMSTM_ECONFLICT;
            }
            continue;
        }
        if (record && lk_version(v1) > c->rv) {
            if (!extend(c)) {
                c->doomed = 1;
                note_abort(c, AB_VALIDATE, c->failed_idx);
                return SHMSTM_ECONFLICT;
            }
            /* extend read the clock after v1 (acquire, both): every commit
             * raises the clock before it stores its version, so a version
             * above it was never written by a commit.  Extending again would
             * never end (a livelock). */
            if (lk_version(v1) > c->rv) {
                c->doomed = 1;
                c->failed_idx = idx;
                return SHMSTM_ECORRUPT;
            }
            continue;
        }
        uint32_t g = load_relaxed(&t->gen);
        uint32_t tag = load_relaxed(&t->tag);
        uint64_t w = load_relaxed(&t->value);
        uint32_t len = 0;
        int torn = 0;
        if (tag_is_heap(tag)) {
            if (!heap_block_ok(s, w, &len) || len > s->max_value_size) {
                torn = 1;
            } else {
                if (len > c->buf_cap) {
                    char *nb = realloc(c->buf, len);   /* bounded by max_value_size */
                    if (!nb)
                        return SHMSTM_ENOMEM;
                    c->buf = nb;
                    c->buf_cap = len;
                }
                /* May copy a block being reused: the re-check below rejects it. */
                memcpy(c->buf, heap_payload(s, w), len);
            }
        }
        fence_acquire();      /* seqlock: the copies above happen before the re-check */
        uint64_t v2 = load_relaxed(&t->lock);
        if (v1 != v2)
            continue;
        if (torn)
            return SHMSTM_ECORRUPT;
        if (g != gen || tag == TAG_EMPTY)
            return SHMSTM_ESTALE;
        if (record) {
            int rc = rs_push(c, idx, gen, lk_version(v1));
            if (rc)
                return rc;
        }
        out[0] = (int64_t)w;
        out[1] = len;
        return (int)tag;
    }
}

int shmstm_tx_read(shmstm_ctx *c, uint32_t idx, uint32_t gen, int64_t *out)
{
    return read_tvar(c, idx, gen, out, 1);
}

int shmstm_read1(shmstm_ctx *c, uint32_t idx, uint32_t gen, int64_t *out)
{
    return read_tvar(c, idx, gen, out, 0);
}

/* ---- fast paths (the Python hot path) ----
 *
 * Python calls these through shmstm._fast (fast.h: without cffi's per-call
 * cost, holding the GIL).  Reading back an out-parameter costs Python as
 * much as a call, so the fast reads take the TVar as one pointer to a
 * process-local shmstm_ref and return an int value directly.  Anything else
 * returns SHMSTM_READ_MISS and Python falls back to the general functions
 * above; a miss is never an answer, so the fast paths add no behaviour of
 * their own.  commit_1 and commit_2 are kept for tools/bench_c.c (the C
 * core's own cost) and callers without shmstm._fast. */

static inline uint32_t h_idx(int64_t h) { return (uint32_t)((uint64_t)h & SHMSTM_HANDLE_IDX_MASK); }
static inline uint32_t h_gen(int64_t h) { return (uint32_t)((uint64_t)h >> SHMSTM_HANDLE_GEN_SHIFT); }

/* An atomic snapshot read of one TVar outside a transaction, without a
 * context: no process slot is needed.  Only an unlocked, live, int-valued
 * TVar of the ref's generation is answered; a locked TVar (whose owner may be
 * dead and need recovery) or any error goes to shmstm_read1. */
int64_t shmstm_peek(const shmstm_ref *r)
{
    struct shmstm_seg *s = *r->segp;
    if (!s)
        return SHMSTM_READ_MISS;            /* runtime closed or not attached */
    uint32_t idx = r->idx;
    if (idx >= s->max_tvars)
        return SHMSTM_READ_MISS;
    struct shm_tvar *t = &s->tvars[idx];
    /* Seqlock read, as in read_tvar().  Pairs with the store_release that
     * unlocked the TVar (commit step 8). */
    uint64_t v1 = load_acquire(&t->lock);
    if (lk_locked(v1))
        return SHMSTM_READ_MISS;
    uint32_t g = load_relaxed(&t->gen);
    uint32_t tag = load_relaxed(&t->tag);
    int64_t w = (int64_t)load_relaxed(&t->value);
    fence_acquire();    /* the loads above happen before the re-check */
    if (load_relaxed(&t->lock) != v1 || g != r->gen || tag != TAG_INT)
        return SHMSTM_READ_MISS;
    return w;           /* == SHMSTM_READ_MISS for that one int: general path */
}

/* A transactional read (as shmstm_tx_read).  On a miss the tag or error code
 * is in c->last and the payload in c->out (and c->buf for heap values). */
int64_t shmstm_tx_readv(shmstm_ctx *c, const shmstm_ref *r)
{
    /* gone first: after close() the box is empty too, and a closed runtime
     * is SHMSTM_ECLOSED, not a bad argument. */
    int rc = c->gone ? c->gone :
             *r->segp == c->seg ? read_tvar(c, r->idx, r->gen, c->out, 1) : SHMSTM_EINVAL;
    if (rc == TAG_INT && c->out[0] != SHMSTM_READ_MISS)
        return c->out[0];
    c->last = rc;
    return SHMSTM_READ_MISS;
}

/* ---- staging the write set into the commit record ---- */

static int stage(shmstm_ctx *c, uint32_t idx, uint32_t gen, uint32_t tag, uint64_t word,
                 uint32_t flags)
{
    struct shmstm_seg *s = c->seg;
    struct shm_commit_rec *r = &c->proc->rec;
    uint32_t n = c->n_staged;
    uint32_t cap = load_relaxed(&r->spill_off) ? (uint32_t)load_relaxed(&r->spill_cap) : REC_INLINE;
    struct shm_wentry *e = rec_entries(s, r);
    if (!e)
        return SHMSTM_ECORRUPT;
    if (n == cap) {
        /* Spill to a heap block twice as large; the record points to it
         * before any lock is taken, so recovery always finds the entries. */
        uint64_t ncap = (uint64_t)cap * 2, off;
        int rc = heap_alloc_raw(s, c->proc, ncap * sizeof *e, &off);
        if (rc)
            return rc;
        struct shm_wentry *ne = (struct shm_wentry *)heap_payload(s, off);
        memcpy(ne, e, n * sizeof *e);
        uint64_t old = load_relaxed(&r->spill_off);
        store_relaxed(&r->spill_cap, ncap);
        store_release(&r->spill_off, off);
        if (old)
            heap_free(s, c->proc, old);
        e = ne;
    }
    e[n] = (struct shm_wentry){.idx = idx, .gen = gen, .new_tag = (uint16_t)tag,
                               .flags = flags, .new_val = word};
    c->n_staged = n + 1;
    store_release(&r->n, n + 1);
    return 0;
}

static int stage_check(shmstm_ctx *c, uint32_t idx)
{
    if (c->gone)
        return c->gone;
    if (idx >= c->seg->max_tvars)
        return SHMSTM_EBADHANDLE;
    return 0;
}

int shmstm_tx_stage_i(shmstm_ctx *c, uint32_t idx, uint32_t gen, uint32_t tag, int64_t v)
{
    int rc = stage_check(c, idx);
    if (rc)
        return rc;
    if (tag != TAG_NONE && tag != TAG_FALSE && tag != TAG_TRUE && tag != TAG_INT)
        return SHMSTM_EINVAL;
    c->bytes_staged += 8;
    return stage(c, idx, gen, tag, (uint64_t)v, 0);
}

int shmstm_tx_stage_f(shmstm_ctx *c, uint32_t idx, uint32_t gen, double v)
{
    int rc = stage_check(c, idx);
    if (rc)
        return rc;
    uint64_t w;
    memcpy(&w, &v, 8);
    c->bytes_staged += 8;
    return stage(c, idx, gen, TAG_FLOAT, w, 0);
}

int shmstm_tx_stage_b(shmstm_ctx *c, uint32_t idx, uint32_t gen, uint32_t tag,
                      const char *buf, size_t len)
{
    int rc = stage_check(c, idx);
    if (rc)
        return rc;
    if (!tag_is_heap(tag))
        return SHMSTM_EINVAL;
    uint64_t off;
    rc = heap_alloc(c->seg, c->proc, len, &off);
    if (rc)
        return rc;
    memcpy(heap_payload(c->seg, off), buf, len);
    rc = stage(c, idx, gen, tag, off, 0);
    if (rc) {
        heap_free(c->seg, c->proc, off);
        return rc;
    }
    c->bytes_staged += len;
    return 0;
}

static int stage_int(shmstm_ctx *c, int64_t h, int64_t v)
{
    if (c->gone)
        return c->gone;         /* before note_abort: a gone slot is not ours */
    uint32_t idx = h_idx(h);
    int rc = stage_check(c, idx);
    if (rc == 0)
        rc = stage(c, idx, h_gen(h), TAG_INT, (uint64_t)v, 0);
    if (rc) {
        c->failed_idx = idx;
        note_abort(c, AB_RESOURCE, idx);   /* Python ends the attempt silently */
        return rc;
    }
    c->bytes_staged += 8;
    return 0;
}

/* Stage n int writes given as (handle, value) pairs, then commit: the common
 * write set in one call (shmstm._fast.commit builds the pairs from the write
 * dict).  Other values are staged before, one call each. */
int shmstm_tx_commit_ints(shmstm_ctx *c, const int64_t *pairs, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        int rc = stage_int(c, pairs[2 * i], pairs[2 * i + 1]);
        if (rc)
            return rc;
    }
    return shmstm_tx_commit(c);
}

int shmstm_tx_commit_1(shmstm_ctx *c, int64_t h, int64_t v)
{
    int rc = stage_int(c, h, v);
    return rc ? rc : shmstm_tx_commit(c);
}

int shmstm_tx_commit_2(shmstm_ctx *c, int64_t h1, int64_t v1, int64_t h2, int64_t v2)
{
    int rc = stage_int(c, h1, v1);
    if (rc == 0)
        rc = stage_int(c, h2, v2);
    return rc ? rc : shmstm_tx_commit(c);
}

/* ---- the GIL-holding entry points of shmstm._fast (fast.h) ---- */

/* Each sets c->gil for the call: the core's waits drop the GIL through it
 * (ctx_gil_release), and the GIL is taken back here, once, on the way out. */
static int64_t fast_readv(shmstm_ctx *c, const shmstm_ref *r, struct shmstm_gil *g)
{
    c->gil = g;
    int64_t v = shmstm_tx_readv(c, r);
    c->gil = NULL;
    if (g->released)
        g->acquire(g);
    return v;
}

static int fast_commit_ints(shmstm_ctx *c, const int64_t *pairs, uint32_t n,
                            struct shmstm_gil *g)
{
    c->gil = g;
    int rc = shmstm_tx_commit_ints(c, pairs, n);
    c->gil = NULL;
    if (g->released)
        g->acquire(g);
    return rc;
}

static const struct shmstm_fast_table fast_table = {
    SHMSTM_FAST_ABI, sizeof(struct shmstm_fast_table), sizeof(struct shmstm_gil),
    shmstm_peek, fast_readv, fast_commit_ints,
    shmstm_ctx_new, shmstm_ctx_free, shmstm_seg_detach,
};

const void *shmstm_fast_table(void) { return &fast_table; }

int shmstm_tx_stage_free(shmstm_ctx *c, uint32_t idx, uint32_t gen)
{
    int rc = stage_check(c, idx);
    if (rc)
        return rc;
    /* Early and advisory (the commit checks again under the lock).  Pairs
     * with the store_release of gen in init_tvar. */
    struct shm_tvar *t = &c->seg->tvars[idx];
    if (load_acquire(&t->gen) == gen && (load_relaxed(&t->flags) & TV_NAMED))
        return SHMSTM_ENAMED;
    return stage(c, idx, gen, TAG_EMPTY, 0, WE_FREE);
}

/* Forget the staged entries, freeing their new blocks.  Keeps the read set. */
void free_staged(shmstm_ctx *c)
{
    struct shm_commit_rec *r = &c->proc->rec;
    struct shm_wentry *e = rec_entries(c->seg, r);
    for (uint32_t i = 0; e && i < c->n_staged; i++)
        if (tag_is_heap(e[i].new_tag))
            heap_free(c->seg, c->proc, e[i].new_val);
    c->n_staged = 0;
    c->bytes_staged = 0;
    store_relaxed(&r->n, 0);     /* owner-only; the state stays CR_IDLE */
}

/* Drop the staged entries and end the attempt. */
static void drop_staged(shmstm_ctx *c)
{
    struct shm_commit_rec *r = &c->proc->rec;
    free_staged(c);
    /* Pairs with a recoverer's load_acquire of state. */
    store_release(&r->state, CR_IDLE);
    ctx_reset(c);
}

int shmstm_tx_abort(shmstm_ctx *c, uint32_t reason)
{
    if (c->gone)
        return c->gone;
    /* reason >= AB_NREASONS: end silently (cleanup after an error that was
     * already counted, or after a timed-out wait).  Conflicts were counted
     * where they were found; count the others here. */
    if (reason >= AB_NREASONS) {
        release_token(c);
    } else if (reason != AB_LOCKED && reason != AB_VALIDATE) {
        counter_add(&c->proc->aborts[reason], 1);
        release_token(c);      /* the transaction is over, not re-running */
    }
    drop_staged(c);
    return 0;
}

int shmstm_tx_end_ro(shmstm_ctx *c)
{
    if (c->gone)
        return c->gone;
    if (c->doomed) {
        drop_staged(c);
        return SHMSTM_ECONFLICT;
    }
    counter_add(&c->proc->ro_commits, 1);
    release_token(c);
    drop_staged(c);
    return 0;
}

uint32_t shmstm_tx_failed_idx(shmstm_ctx *c) { return c->failed_idx; }

/* Wait (holding no lock) while another slot holds the irrevocable token. */
static int wait_token(shmstm_ctx *c, int64_t timeout_ns)
{
    struct shm_header *h = c->seg->h;
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    for (uint32_t rounds = 0;; rounds++) {
        uint32_t f = load_seq_cst(&h->token_futex);
        uint64_t tok = load_acquire(&h->token);   /* pairs with release_token() */
        if (tok == 0 || tok == c->slot + 1ull)
            return 0;
        if (tok > c->seg->max_procs) {
            /* Names no slot: a corrupted word (no holder could ever release it).
             * Clear it rather than wait forever; the CAS keeps a real token. */
            cas_acq_rel(&h->token, &tok, 0);
            continue;
        }
        if (rounds % 8 == 7 && slot_owner_dead(c->seg, (uint32_t)(tok - 1)))
            slot_recover(c->seg, (uint32_t)(tok - 1));
        uint64_t now = now_ns();
        if (now >= deadline)
            return SHMSTM_ETIMEOUT;
        int64_t left = (int64_t)(deadline - now);
        ctx_gil_release(c);
        int rc = futex_wait(&h->token_futex, f, left < 10000000 ? left : 10000000);
        if (rc == SHMSTM_EINTR)
            return rc;
    }
}

/* Make the running transaction irrevocable: take the global token, so that
 * other writers wait before locking until this transaction ends.  Used after
 * many aborts so that no transaction starves. */
int shmstm_tx_irrevocable(shmstm_ctx *c, int64_t timeout_ns)
{
    if (c->gone)
        return c->gone;
    if (c->has_token)
        return 0;
    struct shm_header *h = c->seg->h;
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    for (;;) {
        uint64_t z = 0;
        if (cas_acq_rel(&h->token, &z, c->slot + 1ull)) {
            c->has_token = 1;
            counter_add(&c->proc->irrevocable, 1);
            return 0;
        }
        uint64_t now = now_ns();
        if (now >= deadline)
            return SHMSTM_ETIMEOUT;
        int rc = wait_token(c, (int64_t)(deadline - now));
        if (rc)
            return rc;
    }
}

static int cmp_entry(const void *a, const void *b)
{
    uint32_t x = ((const struct shm_wentry *)a)->idx, y = ((const struct shm_wentry *)b)->idx;
    return x < y ? -1 : x > y;
}

static void sort_entries(struct shm_wentry *e, uint32_t n)
{
    if (n > 16) {
        qsort(e, n, sizeof *e, cmp_entry);
        return;
    }
    for (uint32_t i = 1; i < n; i++) {
        struct shm_wentry x = e[i];
        uint32_t j = i;
        while (j > 0 && e[j - 1].idx > x.idx) {
            e[j] = e[j - 1];
            j--;
        }
        e[j] = x;
    }
}

static void note_latency(struct shm_proc *p, uint64_t t0)
{
    uint64_t d = now_ns() - t0;
    uint32_t b = d ? 63u - (uint32_t)__builtin_clzll(d) : 0;
    counter_add(&p->lat_hist[b < LAT_BUCKETS ? b : LAT_BUCKETS - 1], 1);
}

/* Commit the attempt.  Returns 0, SHMSTM_ECONFLICT (re-run), SHMSTM_ESTALE
 * (a written TVar was freed), or another code (nothing was changed).
 *
 * Steps, with the kill point (FAULT_POINT, debug builds) that ends each:
 *  1. sort the staged entries by index; no lock held, state CR_IDLE
 *                                                      commit.sorted
 *  2. wait while another slot holds the irrevocable token (no lock held)
 *                                                      commit.token
 *  3. state := CR_LOCKING; lock each entry in index order, storing old_lock
 *     before its CAS; check the generation under the lock
 *                                                      commit.locking (none yet),
 *                                                      commit.locked_one (each)
 *  4. state := CR_VALIDATING; wv := clock + 1 (fetch_add)
 *                                                      commit.validating
 *  5. validate the read set unless rv + 1 == wv (nobody committed between)
 *                                                      commit.validated
 *  6. state := CR_COMMITTED            <-- commit point, point of no return
 *     (durable runtimes: the CAS of ring slot wv to the record comes first
 *     and is the commit point; ring_commit.c)
 *                                                      commit.committed
 *  7. publish each new value                           commit.published_one
 *  8. release each lock with version wv (store_release)
 *                                                      commit.released_one
 *  9. wake the waiters of every written TVar           commit.woken
 * 10. free old values and freed TVar slots; state := CR_IDLE
 *                                                      commit.freed (before IDLE)
 * Abort after locking (steps 3-5): restore each old lock word
 *                                                      commit.rollback_one (each)
 * A kill before step 6 is rolled back by recovery, a kill after it rolled
 * forward (proc.c); FAULT_SHAKE() makes step 5 fail spuriously.
 */
int shmstm_tx_commit(shmstm_ctx *c)
{
    if (c->gone)
        return c->gone;
    uint32_t n = c->n_staged;
    if (n == 0)
        return shmstm_tx_end_ro(c);
    struct shmstm_seg *s = c->seg;
    struct shm_proc *p = c->proc;
    struct shm_commit_rec *r = &p->rec;
    if (c->doomed) {
        drop_staged(c);
        return SHMSTM_ECONFLICT;
    }
    uint64_t t0 = now_ns();
    struct shm_wentry *e = rec_entries(s, r);
    if (!e)
        return SHMSTM_ECORRUPT;
    /* 1 */
    sort_entries(e, n);
    for (uint32_t i = 1; i < n; i++)
        if (e[i].idx == e[i - 1].idx) {
            drop_staged(c);
            return SHMSTM_EDUP;
        }
    FAULT_POINT("commit.sorted");
    /* 2 */
    if (load_acquire(&s->h->token) && !c->has_token) {
        int rc = wait_token(c, -1);
        if (rc) {
            drop_staged(c);
            return rc;
        }
    }
    FAULT_POINT("commit.token");
    /* 2b (durable runtimes): record and ring room, before any lock */
    uint64_t rrec = 0, wv = 0;
    if (s->ring_slots) {
        int rc = ring_prepare(c, e, n, &rrec);
        if (rc) {
            drop_staged(c);
            return rc;
        }
    }
    /* 3 */
    store_release(&r->state, CR_LOCKING);
    FAULT_POINT("commit.locking");
    uint64_t mine = lk_make_locked(c->slot);
    uint32_t locked = 0, reason = AB_LOCKED, bad = 0, lost = 0, named = 0;
    for (; locked < n; locked++) {
        struct shm_tvar *t = &s->tvars[e[locked].idx];
        uint64_t w = load_relaxed(&t->lock);
        uint32_t spins = 0;
        for (;;) {
            if (lk_locked(w)) {
                if (lk_owner(w) == LK_LOST_OWNER) {  /* never released: proc.c R2b */
                    lost = 1;
                    bad = e[locked].idx;
                    goto fail;
                }
                if (!lock_wait(c, s, &t->lock, w, &spins, COMMIT_SPIN_LIMIT)) {
                    bad = e[locked].idx;
                    goto fail;
                }
                w = load_relaxed(&t->lock);
                continue;
            }
            e[locked].old_lock = w;          /* before the CAS: see invariants */
            if (cas_acq_rel(&t->lock, &w, mine))
                break;
        }
        /* Acquire: pairs with the store_release of gen in init_tvar (tvar.c),
         * so the creator's flags word is visible for the check below. */
        if (load_acquire(&t->gen) != e[locked].gen || !(e[locked].gen & 1u)) {
            locked++;
            reason = AB_STALE;
            bad = e[locked - 1].idx;
            goto fail;
        }
        /* A named TVar is never freed, whatever the handle claims (a forged
         * one, say): its name would then name a reused slot in every process.
         * Authoritative here, under the lock and for this generation. */
        if ((e[locked].flags & WE_FREE) && (load_relaxed(&t->flags) & TV_NAMED)) {
            locked++;
            reason = AB_USER;
            named = 1;
            bad = e[locked - 1].idx;
            goto fail;
        }
        e[locked].old_tag = (uint16_t)load_relaxed(&t->tag);
        e[locked].old_val = load_relaxed(&t->value);
        FAULT_POINT("commit.locked_one");
    }
    /* Seqlock writer: the value stores below are ordered after the lock CASes,
     * so a reader that sees a new value also sees the lock (fence pairs with
     * the fence_acquire in read_tvar). */
    fence_release();
    /* 4 */
    store_release(&r->state, CR_VALIDATING);
    wv = faa_acq_rel(&s->h->clock, 1) + 1;
    /* rv (from rv_hint) is a clock value this thread saw on this segment, so
     * it is below wv; a hint from anywhere else would break the shortcut of
     * step 5 and the reads' version checks (contexts start at 0: calloc). */
    DASSERT(!c->active || c->rv < wv);
    store_relaxed(&r->wv, wv);
    FAULT_POINT("commit.validating");
    /* 5 */
    if (c->rs_n && (FAULT_SHAKE() ||
                    (!(c->active && c->rv + 1 == wv) && !validate_reads(c, e, n)))) {
        reason = AB_VALIDATE;
        bad = c->failed_idx;
        goto fail;
    }
    FAULT_POINT("commit.validated");
    /* 6: the commit point.  Recovery rolls forward from here on.  In a
     * durable runtime the commit point is the fill of ring slot wv (ring_commit.c);
     * a slot voided by the flusher means roll back. */
    if (s->ring_slots && !ring_fill(c, wv, rrec)) {
        reason = AB_VALIDATE;
        bad = UINT32_MAX;
        goto fail;
    }
    store_release(&r->state, CR_COMMITTED);
    if (s->ring_slots)
        ring_notify(c);                 /* wake the flusher, now that it can collect us */
    FAULT_POINT("commit.committed");
    /* 7, 8 */
    for (uint32_t i = 0; i < n; i++) {
        struct shm_tvar *t = &s->tvars[e[i].idx];
        store_relaxed(&t->tag, (uint32_t)e[i].new_tag);
        store_relaxed(&t->value, e[i].new_val);
        if (e[i].flags & WE_FREE)
            store_relaxed(&t->gen, e[i].gen + 1);
        FAULT_POINT("commit.published_one");
        /* Pairs with readers' load_acquire of the lock word. */
        store_release(&t->lock, lk_make_unlocked(wv));
        FAULT_POINT("commit.released_one");
    }
    /* 9: Dekker with retry(): waiters set their bit, fence, then read lock
     * words; we wrote lock words, fence, then read their bits (wait.c). */
    fence_seq_cst();
    for (uint32_t i = 0; i < n; i++)
        wake_waiters(s, &s->tvars[e[i].idx]);
    FAULT_POINT("commit.woken");
    /* 10 */
    for (uint32_t i = 0; i < n; i++) {
        if (tag_is_heap(e[i].old_tag))
            heap_free(s, p, e[i].old_val);
        if (e[i].flags & WE_FREE)
            tvar_push_free(s, e[i].idx);
    }
    FAULT_POINT("commit.freed");
    store_relaxed(&r->n, 0);
    store_release(&r->state, CR_IDLE);
    c->n_staged = 0;
    c->rv_hint = wv;                    /* the clock was wv just after our fetch_add */
    counter_add(&p->commits, 1);
    counter_add(&p->bytes_committed, c->bytes_staged);
    c->bytes_staged = 0;
    note_latency(p, t0);
    release_token(c);
    ctx_reset(c);
    if (s->ring_slots && c->dsync)
        return ring_after_commit(c, wv);    /* sync durability: 0 or SHMSTM_PENDING */
    return 0;

fail:
    if (s->ring_slots)
        ring_unwind(c, wv, rrec);           /* void slot wv (if taken), free the record */
    for (uint32_t i = 0; i < locked; i++) {
        store_release(&s->tvars[e[i].idx].lock, e[i].old_lock);
        FAULT_POINT("commit.rollback_one");
    }
    c->failed_idx = bad;
    note_abort(c, reason, bad);
    drop_staged(c);
    if (lost)
        return SHMSTM_ELOST;
    if (named)
        return SHMSTM_ENAMED;
    return reason == AB_STALE ? SHMSTM_ESTALE : SHMSTM_ECONFLICT;
}

/* ---- contexts ----
 *
 * A context is claimed by shmstm_ctx_new and given back exactly once: by
 * shmstm_ctx_free, or by shmstm_seg_detach for every context still linked to
 * the attachment (the Python object that owns a context may be lost to an
 * asynchronous exception, or outlive close() in a traceback).  Which of the
 * two may run concurrently (threads of one process; other processes never
 * see these structs):
 *
 *                   ctx_new   ctx_free(other)   seg_detach   seg_after_fork
 *   ctx_new          yes        yes              ctx_lock      (child only)
 *   ctx_free         yes        yes              ctx_lock      (child only)
 *
 * ctx_lock orders them; a context's own memory is freed only by
 * shmstm_ctx_free (its owner's call), never by detach, so a handle the owner
 * still holds stays valid and answers SHMSTM_ECLOSED (`gone`). */

/* Give the slot back (ctx_lock held, or the context not yet linked).  The
 * slot's shared words are written only while the context owns it. */
static void ctx_give_back(shmstm_ctx *c, int why)
{
    if (c->gone)
        return;
    c->gone = why;
    if (c->pid != getpid())
        return;                 /* a fork child: the slot is the parent's */
    drop_staged(c);
    release_token(c);
    struct shm_proc *p = c->proc;
    store_relaxed(&p->sleeping, 0);
    clear_waiter_bits(c->seg, c->slot);
    store_relaxed(&p->start_time, 0);
    /* Pairs with claimers' load_acquire of owner.  Relaxed load: only
     * this owner changes an ACTIVE word of a live process. */
    store_release(&p->owner, ps_next(load_relaxed(&p->owner), 0, PS_FREE));
}

static void ctx_unlink(shmstm_ctx *c)
{
    struct shmstm_seg *s = c->seg;
    if (!c->linked)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->ctx_head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = c->prev = NULL;
    c->linked = 0;
}

int shmstm_ctx_new(shmstm_seg *s, shmstm_ctx **out)
{
    if (s->read_only)
        return SHMSTM_EINVAL;
    /* The caller guarantees s is attached at entry; a detach racing with this
     * call (a caller's bug: Python serialises them) must not free s under
     * it.  This reference becomes the context's on success. */
    faa_relaxed(&s->refs, 1u);
    shmstm_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        seg_unref(s);
        return SHMSTM_ENOMEM;
    }
    c->rs_cap = 64;
    c->rs = malloc(c->rs_cap * sizeof *c->rs);
    c->buf_cap = 4096;
    c->buf = malloc(c->buf_cap);
    if (!c->rs || !c->buf) {
        free(c->rs);
        free(c->buf);
        free(c);
        seg_unref(s);
        return SHMSTM_ENOMEM;
    }
    uint32_t pid = (uint32_t)getpid();
    /* Eager reclamation (proc.c): recover every slot whose owner the kernel says
     * is dead before claiming one.  Recovery is otherwise lazy (on meeting a dead
     * owner's lock), so a lock on a TVar no live process touches would outlive
     * its owner; this bounds that to "until the next context is created". */
    shmstm_seg_reclaim_dead(s);
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < s->max_procs; i++) {
            struct shm_proc *p = &s->procs[i];
            uint64_t o = load_acquire(&p->owner);   /* pairs with the FREE release */
            if (ps_state(o) != PS_FREE)
                continue;
            if (!cas_acq_rel(&p->owner, &o, ps_next(o, pid, PS_ACTIVE)))
                continue;
            store_relaxed(&p->start_time, proc_self_start());
            store_relaxed(&p->tid, (uint64_t)my_tid());
            store_relaxed(&p->attach_ns, realtime_ns());
            /* Fresh counters for the new owner (owner-written, advisory). */
            store_relaxed(&p->commits, 0);
            store_relaxed(&p->ro_commits, 0);
            for (uint32_t k = 0; k < AB_NREASONS; k++)
                store_relaxed(&p->aborts[k], 0);
            store_relaxed(&p->retries, 0);
            store_relaxed(&p->wakeups, 0);
            store_relaxed(&p->bytes_committed, 0);
            store_relaxed(&p->irrevocable, 0);
            for (uint32_t k = 0; k < LAT_BUCKETS; k++)
                store_relaxed(&p->lat_hist[k], 0);
            /* heap_allocs/frees are kept: their difference is live blocks.
             * ring_waits and late_wakeups are kept: their sums over slots are
             * monotonic counters. */
            c->seg = s;
            c->slot = i;
            c->proc = p;
            c->pid = (pid_t)pid;
            /* Linked under ctx_lock, not claimed under it: a claim may recover
             * dead slots (slow), and frees wait for the lock holding the GIL. */
            pthread_mutex_lock(&s->ctx_lock);
            int closed = s->detached;
            if (!closed) {
                c->next = s->ctx_head;
                if (c->next)
                    c->next->prev = c;
                s->ctx_head = c;
                c->linked = 1;              /* the entry's reference is now the context's */
            }
            pthread_mutex_unlock(&s->ctx_lock);
            if (closed)
                break;      /* detached meanwhile (the caller's bug): give it back */
            *out = c;
            return 0;
        }
        if (c->proc || (pass == 0 && shmstm_seg_reclaim_dead(s) == 0))
            break;
    }
    if (c->proc) {
        /* Detached between the claim and the link: the mapping may be gone,
         * so the slot cannot be given back here; it stays this process's
         * until the process ends (then recovery frees it).  Unreachable
         * from Python, where Runtime._lock serialises claims and close. */
        free(c->rs);
        free(c->buf);
        free(c);
        seg_unref(s);
        return SHMSTM_ECLOSED;
    }
    free(c->rs);
    free(c->buf);
    free(c);
    seg_unref(s);
    return SHMSTM_EPROCSFULL;
}

/* Give back the slot (unless detach or a fork did) and free the context's
 * memory.  Call it once per context: the owner's handle (shmstm._fast.Ctx)
 * guarantees that. */
int shmstm_ctx_free(shmstm_ctx *c)
{
    if (!c)
        return 0;
    struct shmstm_seg *s = c->seg;
    if (c->pid != getpid()) {
        /* Inherited across fork: the slot is the parent's.  Before
         * shmstm_seg_after_fork the child has one thread (CPython frees the
         * other threads' states, and with them their contexts, before its
         * after-fork hooks run) and ctx_lock may be held by a parent thread
         * that does not exist here: unlink without it.  After it, the
         * context is no longer linked (ctx_unlink does nothing). */
        ctx_unlink(c);
        c->gone = SHMSTM_EFORKED;
    } else {
        pthread_mutex_lock(&s->ctx_lock);
        ctx_unlink(c);
        ctx_give_back(c, SHMSTM_ECLOSED);
        pthread_mutex_unlock(&s->ctx_lock);
    }
    free(c->rs);
    free(c->buf);
    free(c);
    seg_unref(s);
    return 0;
}

/* Release the slots of every context still linked (segment.c, detach). */
void seg_release_ctxs(struct shmstm_seg *s)
{
    for (shmstm_ctx *c = s->ctx_head; c; c = c->next)
        ctx_give_back(c, SHMSTM_ECLOSED);
}

/* In a fork child: every inherited context's slot is the parent's.  Only the
 * forking thread exists, so nobody holds ctx_lock but perhaps a thread of the
 * parent that is gone: it is re-initialised, not taken. */
int shmstm_seg_after_fork(shmstm_seg *s)
{
    pthread_mutex_init(&s->ctx_lock, NULL);
    shmstm_ctx *c = s->ctx_head;
    while (c) {
        shmstm_ctx *next = c->next;
        if (!c->gone)
            c->gone = SHMSTM_EFORKED;
        c->next = c->prev = NULL;       /* unlinked: their frees touch no list */
        c->linked = 0;
        c = next;
    }
    s->ctx_head = NULL;
    return 0;
}
