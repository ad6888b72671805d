/* tvar.c -- the TVar table (allocation, generations) and the name directory.
 *
 * Invariants:
 *  - A handle is (index, generation).  gen is odd while the slot is live and
 *    even while free; allocation and freeing each add one, so a handle to a
 *    freed or reused slot never matches again (until 2^31 reuses of one slot).
 *  - Versions in the lock word only ever grow: freeing commits at wv, and a
 *    reallocated slot keeps that version, so a read-set entry recorded before
 *    the free can never validate after it.
 *  - A new TVar's first value is written before its handle can escape (the
 *    handle escapes only through a later commit or a pickle sent by this
 *    process), so it needs no lock.
 *  - The directory maps name -> index with open addressing; entries go
 *    EMPTY -> BUSY (creator's slot in val) -> READY and never back to EMPTY
 *    (a failed or dead creator leaves a TOMB, skipped by lookups), so a probe
 *    chain is never cut.  The create path is one C call: no Python code runs
 *    while an entry is BUSY.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"

#define DE_TOMB 3u

void tvar_push_free(struct shmstm_seg *s, uint32_t idx)
{
    a64 *head = &s->h->tvar_free;
    uint64_t h = load_relaxed(head);
    for (;;) {
        store_relaxed(&s->tvars[idx].next_free, h & 0xffffffffull);
        uint64_t nh = (((h >> 32) + 1) << 32) | (idx + 1ull);
        if (cas_acq_rel(head, &h, nh))    /* release: next_free visible to poppers */
            return;
    }
}

int tvar_alloc(struct shmstm_seg *s, uint32_t *idx, uint32_t *gen)
{
    a64 *head = &s->h->tvar_free;
    uint64_t h = load_acquire(head);    /* pairs with the release in tvar_push_free */
    uint32_t i = UINT32_MAX;
    while ((h & 0xffffffffull) != 0) {
        uint32_t cand = (uint32_t)(h & 0xffffffffull) - 1;
        if (cand >= s->max_tvars)
            break;                        /* corrupt head: fall back to the bump index */
        uint64_t next = load_relaxed(&s->tvars[cand].next_free);
        uint64_t nh = (((h >> 32) + 1) << 32) | (next & 0xffffffffull);
        if (cas_acq_rel(head, &h, nh)) {
            i = cand;
            break;
        }
    }
    if (i == UINT32_MAX) {
        uint32_t b = load_relaxed(&s->h->tvar_bump);
        do {
            if (b >= s->max_tvars)
                return SHMSTM_ETVARSFULL;
        } while (!cas_acq_rel(&s->h->tvar_bump, &b, b + 1));
        i = b;
    }
    uint32_t g = load_relaxed(&s->tvars[i].gen);
    *idx = i;
    *gen = (g | 1u) == g ? g + 2 : g + 1;  /* next odd value */
    return 0;
}

/* Encode a value into (tag, word): heap tags get a fresh block. */
static int make_value(shmstm_ctx *c, uint32_t tag, int64_t iv, double fv,
                      const char *buf, size_t len, uint64_t *word)
{
    if (tag == TAG_EMPTY || tag > TAG_MAX)
        return SHMSTM_EINVAL;
    if (tag_is_heap(tag)) {
        uint64_t off;
        int rc = heap_alloc(c->seg, c->proc, len, &off);
        if (rc)
            return rc;
        memcpy(heap_payload(c->seg, off), buf, len);
        *word = off;
    } else if (tag == TAG_FLOAT) {
        memcpy(word, &fv, 8);
    } else {
        *word = (uint64_t)iv;
    }
    return 0;
}

static int init_tvar(shmstm_ctx *c, uint32_t tag, int64_t iv, double fv, const char *buf,
                     size_t len, uint32_t flags, uint32_t *out_idx, uint32_t *out_gen)
{
    uint64_t word;
    int rc = make_value(c, tag, iv, fv, buf, len, &word);
    if (rc)
        return rc;
    uint32_t idx, gen;
    rc = tvar_alloc(c->seg, &idx, &gen);
    if (rc) {
        if (tag_is_heap(tag))
            heap_free(c->seg, c->proc, word);
        return rc;
    }
    struct shm_tvar *t = &c->seg->tvars[idx];
    store_relaxed(&t->tag, tag);
    store_relaxed(&t->value, word);
    store_relaxed(&t->flags, flags);
    store_relaxed(&t->conflicts, 0);
    store_relaxed(&t->waiters, 0);
    /* release: the value is complete before the slot reads as live */
    store_release(&t->gen, gen);
    *out_idx = idx;
    *out_gen = gen;
    return 0;
}

int shmstm_tvar_new(shmstm_ctx *c, uint32_t tag, int64_t iv, double fv, const char *buf,
                    size_t len, uint32_t *out_idx, uint32_t *out_gen)
{
    if (c->gone)
        return c->gone;
    return init_tvar(c, tag, iv, fv, buf, len, 0, out_idx, out_gen);
}

int shmstm_tvar_check(shmstm_ctx *c, uint32_t idx, uint32_t gen)
{
    if (c->gone)
        return c->gone;
    if (idx >= c->seg->max_tvars)
        return SHMSTM_EBADHANDLE;
    return load_acquire(&c->seg->tvars[idx].gen) == gen && (gen & 1u) ? 0 : SHMSTM_ESTALE;
}

/* Free a TVar created by a transaction attempt that did not commit.  Nobody
 * else can hold its handle, so no lock is needed beyond the generation check. */
int shmstm_tvar_discard(shmstm_ctx *c, uint32_t idx, uint32_t gen)
{
    int rc = shmstm_tvar_check(c, idx, gen);
    if (rc)
        return rc;
    struct shm_tvar *t = &c->seg->tvars[idx];
    uint32_t tag = load_relaxed(&t->tag);
    uint64_t val = load_relaxed(&t->value);
    store_relaxed(&t->tag, TAG_EMPTY);
    store_release(&t->gen, gen + 1);
    if (tag_is_heap(tag))
        heap_free(c->seg, c->proc, val);
    tvar_push_free(c->seg, idx);
    return 0;
}

/* ---- name directory ---- */

static uint64_t name_hash(const char *n, size_t len)
{
    uint64_t h = 1469598103934665603ull;      /* FNV-1a: deterministic across processes */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)n[i];
        h *= 1099511628211ull;
    }
    h ^= h >> 29;
    return h & ((1ull << 62) - 1);
}

static int name_matches(struct shmstm_seg *s, uint64_t val, const char *name, size_t nlen)
{
    uint64_t off = (val & 0xffffffffull) * SHMSTM_UNIT;
    uint32_t len;
    if (!heap_block_ok(s, off, &len) || len != nlen)
        return 0;
    return memcmp(heap_payload(s, off), name, nlen) == 0;
}

/* Wait for a BUSY entry to settle.  The creator holds it for one C call; if
 * it died there, turn the entry into a tombstone.  Returns the new key. */
static uint64_t settle_busy(struct shmstm_seg *s, struct shm_dirent *d, uint64_t k)
{
    for (uint32_t spins = 0; (k & 3u) == DE_BUSY; spins++) {
        if (spins < 1000)
            cpu_relax();
        else {
            sched_yield();
            if (spins % 1000 == 999 && slot_owner_dead(s, (uint32_t)load_relaxed(&d->val))) {
                uint64_t tomb = (k & ~3ull) | DE_TOMB;
                cas_acq_rel(&d->key, &k, tomb);
            }
        }
        k = load_acquire(&d->key);   /* pairs with the store_release of READY */
    }
    return k;
}

static int dir_find(shmstm_ctx *c, const char *name, size_t nlen, int create,
                    uint32_t tag, int64_t iv, double fv, const char *buf, size_t len,
                    uint32_t *out_idx, uint32_t *out_gen)
{
    struct shmstm_seg *s = c->seg;
    if (nlen == 0 || nlen > 400)
        return SHMSTM_EINVAL;
    uint64_t h = name_hash(name, nlen);
    uint32_t mask = s->dir_slots - 1;
    uint32_t i = (uint32_t)h & mask;
    for (uint32_t probe = 0; probe < s->dir_slots; probe++, i = (i + 1) & mask) {
        struct shm_dirent *d = &s->dir[i];
        uint64_t k = load_acquire(&d->key);
        if ((k & 3u) == DE_EMPTY) {
            if (!create)
                return SHMSTM_ENOTFOUND;
            uint64_t busy = (h << 2) | DE_BUSY;
            if (!cas_acq_rel(&d->key, &k, busy)) {
                probe--;                        /* re-examine this entry */
                i = (i - 1) & mask;
                continue;
            }
            /* Our slot, for a waiter's liveness check.  Waiters look only
             * after ~1000 yields, long after this store. */
            store_relaxed(&d->val, c->slot);
            FAULT_POINT("dir.busy");
            uint64_t noff;
            int rc = heap_alloc(s, c->proc, nlen, &noff);
            if (rc == 0) {
                memcpy(heap_payload(s, noff), name, nlen);
                uint32_t idx, gen;
                rc = init_tvar(c, tag, iv, fv, buf, len, TV_NAMED, &idx, &gen);
                if (rc == 0) {
                    store_relaxed(&d->val, ((uint64_t)idx << 32) | (noff / SHMSTM_UNIT));
                    /* Pairs with the load_acquire of key in lookups. */
                    store_release(&d->key, (h << 2) | DE_READY);
                    *out_idx = idx;
                    *out_gen = gen;
                    return 1;
                }
                heap_free(s, c->proc, noff);
            }
            store_release(&d->key, (h << 2) | DE_TOMB);
            return rc;
        }
        if ((k >> 2) != h)
            continue;
        if ((k & 3u) == DE_BUSY)
            k = settle_busy(s, d, k);
        if ((k & 3u) != DE_READY)
            continue;
        uint64_t v = load_relaxed(&d->val);
        if (!name_matches(s, v, name, nlen))
            continue;
        uint32_t idx = (uint32_t)(v >> 32);
        if (idx >= s->max_tvars)
            return SHMSTM_ECORRUPT;
        *out_idx = idx;
        *out_gen = load_acquire(&s->tvars[idx].gen);
        return 0;
    }
    return create ? SHMSTM_EDIRFULL : SHMSTM_ENOTFOUND;
}

int shmstm_tvar_lookup(shmstm_ctx *c, const char *name, size_t nlen,
                       uint32_t *out_idx, uint32_t *out_gen)
{
    if (c->gone)
        return c->gone;
    return dir_find(c, name, nlen, 0, 0, 0, 0, NULL, 0, out_idx, out_gen);
}

/* Get-or-create.  Returns 1 if created, 0 if it existed, or a negative code. */
int shmstm_tvar_named(shmstm_ctx *c, const char *name, size_t nlen, uint32_t tag,
                      int64_t iv, double fv, const char *buf, size_t len,
                      uint32_t *out_idx, uint32_t *out_gen)
{
    if (c->gone)
        return c->gone;
    return dir_find(c, name, nlen, 1, tag, iv, fv, buf, len, out_idx, out_gen);
}

int name_block(struct shmstm_seg *s, uint32_t idx, const unsigned char **name, uint32_t *len)
{
    if (idx >= s->max_tvars)
        return SHMSTM_EINVAL;
    if (!s->name_off) {
        s->name_off = calloc(s->max_tvars, sizeof *s->name_off);
        if (!s->name_off)
            return SHMSTM_ENOMEM;
    }
    uint64_t off = s->name_off[idx];
    for (uint32_t i = 0; !off && i < s->dir_slots; i++) {
        /* Pairs with the creator's store_release of READY: val is set. */
        uint64_t k = load_acquire(&s->dir[i].key);
        if ((k & 3u) != DE_READY)
            continue;
        uint64_t v = load_relaxed(&s->dir[i].val);
        if ((uint32_t)(v >> 32) == idx)
            off = (v & 0xffffffffull) * SHMSTM_UNIT;
    }
    if (!off)
        return SHMSTM_ENOTFOUND;
    if (!heap_block_ok(s, off, len))
        return SHMSTM_ECORRUPT;
    s->name_off[idx] = off;
    *name = heap_payload(s, off);
    return 0;
}

/* The TVar indices of every named TVar (at most cap of them); returns how
 * many there are.  A snapshot of the directory: READY entries never change
 * (names are never removed), so each one found is true. */
int shmstm_seg_named(shmstm_seg *s, uint32_t *idx, uint32_t cap)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->dir_slots; i++) {
        /* Pairs with the creator's store_release of key (READY after val). */
        if ((load_acquire(&s->dir[i].key) & 3u) != DE_READY)
            continue;
        uint32_t t = (uint32_t)(load_relaxed(&s->dir[i].val) >> 32);
        if (t >= s->max_tvars)
            return SHMSTM_ECORRUPT;
        if (n < cap)
            idx[n] = t;
        n++;
    }
    return (int)n;
}

int shmstm_seg_name_of(shmstm_seg *s, uint32_t idx, char *buf, uint32_t cap)
{
    const unsigned char *name;
    uint32_t len;
    int rc = name_block(s, idx, &name, &len);
    if (rc == SHMSTM_EINVAL)
        return SHMSTM_ENOTFOUND;
    if (rc)
        return rc;
    if (len >= cap)
        return SHMSTM_ECORRUPT;
    memcpy(buf, name, len);
    buf[len] = '\0';
    return (int)len;
}
