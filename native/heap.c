/* heap.c -- the value heap: power-of-two size classes (32 B << c), one
 * lock-free free list per class, and a bump pointer for fresh memory.
 *
 * Invariants:
 *  - Offsets are bytes from the heap start, multiples of SHMSTM_UNIT; a
 *    free-list head packs (ABA tag << 32 | offset / UNIT), 0 meaning empty,
 *    so a pop that raced with pop+push of the same block fails its CAS.
 *  - Blocks are never unmapped or returned to the system: a reader holding a
 *    stale offset reads mapped memory, and its seqlock re-check rejects it.
 *    So every length read from a block is bounds-checked before use.
 *  - No coalescing: a freed block serves only its own class.  Heap full means
 *    the bump pointer is exhausted and the class's list is empty.
 *
 * Concurrency: alloc and free may run concurrently in any processes.
 * A process killed inside alloc or free leaks at most the block in hand.
 */
#include <string.h>
#include "core.h"

static int size_class(size_t total, uint32_t *cls)
{
    for (uint32_t c = 0; c < HEAP_CLASSES; c++)
        if (heap_class_size(c) >= total) {
            *cls = c;
            return 0;
        }
    return SHMSTM_ETOOLARGE;
}

static int pop_free(struct shmstm_seg *s, uint32_t c, uint64_t *off)
{
    a64 *head = &s->h->heap_free[c];
    uint64_t h = load_acquire(head);     /* pairs with the release in push_free */
    for (;;) {
        uint64_t unit = h & 0xffffffffull;
        if (unit == 0)
            return 0;
        uint64_t o = unit * SHMSTM_UNIT;
        if (o + sizeof(struct shm_block) > s->heap_size)
            return 0;                     /* corrupt head: treat the list as empty */
        /* May read a block that another popper already took and reused: the
         * tag makes our CAS fail in that case, so the value read is unused. */
        uint64_t next = load_relaxed(&heap_block(s, o)->next);
        uint64_t nh = (((h >> 32) + 1) << 32) | (next & 0xffffffffull);
        if (cas_acq_rel(head, &h, nh)) {
            *off = o;
            return 1;
        }
    }
}

static void push_free(struct shmstm_seg *s, uint32_t c, uint64_t off)
{
    a64 *head = &s->h->heap_free[c];
    struct shm_block *b = heap_block(s, off);
    uint64_t h = load_relaxed(head);
    for (;;) {
        store_relaxed(&b->next, h & 0xffffffffull);
        uint64_t nh = (((h >> 32) + 1) << 32) | (off / SHMSTM_UNIT);
        /* release: the link above is visible to the popper's acquire */
        if (cas_acq_rel(head, &h, nh))
            return;
    }
}

int heap_alloc(struct shmstm_seg *s, struct shm_proc *p, size_t len, uint64_t *off)
{
    if (len > s->max_value_size)
        return SHMSTM_ETOOLARGE;
    return heap_alloc_raw(s, p, len, off);
}

/* As heap_alloc, without the max_value_size limit (commit-record spills). */
int heap_alloc_raw(struct shmstm_seg *s, struct shm_proc *p, size_t len, uint64_t *off)
{
    uint32_t c;
    if (len > s->heap_size)
        return SHMSTM_EHEAPFULL;
    if (size_class(len + sizeof(struct shm_block), &c))
        return SHMSTM_ETOOLARGE;
    uint64_t o;
    if (!pop_free(s, c, &o)) {
        uint64_t sz = heap_class_size(c);
        uint64_t b = load_relaxed(&s->h->heap_bump);
        do {
            if (b > s->heap_size || sz > s->heap_size - b)
                return SHMSTM_EHEAPFULL;
        } while (!cas_acq_rel(&s->h->heap_bump, &b, b + sz));
        o = b;
    }
    struct shm_block *blk = heap_block(s, o);
    /* A reader with a stale offset may be reading this block: order our
     * writes after the pop/bump so its seqlock re-check sees the change that
     * made the block free (see txn.c, read). */
    fence_release();
    store_relaxed(&blk->cls, c);
    store_relaxed(&blk->len, (uint32_t)len);
    if (p)
        counter_add(&p->heap_allocs[c], 1);
    *off = o;
    return 0;
}

void heap_free(struct shmstm_seg *s, struct shm_proc *p, uint64_t off)
{
    uint32_t len;
    if (!heap_block_ok(s, off, &len))
        return;                           /* never trust a bad offset: leak it */
    uint32_t c = load_relaxed(&heap_block(s, off)->cls);
    if (p)
        counter_add(&p->heap_frees[c], 1);
    push_free(s, c, off);
}

/* Bounds check of a block at `off`: header and payload inside the heap and
 * the length within the class.  Used on every read of a heap value. */
int heap_block_ok(struct shmstm_seg *s, uint64_t off, uint32_t *len)
{
    if (off % SHMSTM_UNIT || off > s->heap_size || s->heap_size - off < sizeof(struct shm_block))
        return 0;
    struct shm_block *b = heap_block(s, off);
    uint32_t c = load_relaxed(&b->cls);
    uint32_t l = load_relaxed(&b->len);
    if (c >= HEAP_CLASSES)
        return 0;
    uint64_t sz = heap_class_size(c);
    if (sz > s->heap_size - off || (uint64_t)l + sizeof(struct shm_block) > sz)
        return 0;
    *len = l;
    return 1;
}
