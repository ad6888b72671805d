/* heap.c -- the value heap: power-of-two size classes (32 B << c), one
 * lock-free free list per class, and a bump pointer for fresh memory.
 *
 * Invariants:
 *  - Offsets are bytes from the heap start, multiples of SHMSTM_UNIT (of the
 *    line width for blocks of 64 bytes and more); a
 *    free-list head packs (ABA tag << 32 | offset / UNIT), 0 meaning empty,
 *    so a pop that raced with pop+push of the same block fails its CAS.
 *  - Blocks are never unmapped or returned to the system: a reader holding a
 *    stale offset reads mapped memory, and its seqlock re-check rejects it.
 *    So every length read from a block is bounds-checked before use.
 *  - No coalescing: a freed block serves only its own class.  Heap full means
 *    the bump pointer is exhausted and the class's lists are empty: the
 *    shared one and, for classes below REC_CLASSES, every slot's record list.
 *
 * Concurrency: alloc and free may run concurrently in any processes.
 * A process killed inside alloc or free leaks at most the block in hand (a
 * flusher killed inside a release, at most one chunk of records: ring_flush.c).
 *
 * Commit-ring records (durable runtimes) have lists of their own per process
 * slot (shm_proc.rec_free): the flusher frees a released range's records to
 * their committers' slots, one chain per slot and class, and a committer
 * allocates from its own slot's list first.  The shared class heads are then
 * not a line that every durable commit of every process writes.
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

/* Pop a block from the free list at head (a shared class list or a slot's
 * record list: same format). */
static int pop_list(struct shmstm_seg *s, a64 *head, uint64_t *off)
{
    uint64_t h = load_acquire(head);     /* pairs with the release in push_chain */
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

/* Push the chain first..last (linked through their next fields, relaxed
 * stores by the caller) onto the list at head with one CAS. */
static void push_chain(struct shmstm_seg *s, a64 *head, uint64_t first, uint64_t last)
{
    struct shm_block *b = heap_block(s, last);
    uint64_t h = load_relaxed(head);
    for (;;) {
        store_relaxed(&b->next, h & 0xffffffffull);
        uint64_t nh = (((h >> 32) + 1) << 32) | (first / SHMSTM_UNIT);
        /* release: the links of the chain are visible to the popper's acquire */
        if (cas_acq_rel(head, &h, nh))
            return;
    }
}

/* A block just taken from a list or the bump pointer becomes class c, len. */
static void block_init(struct shmstm_seg *s, uint64_t o, uint32_t c, size_t len)
{
    struct shm_block *blk = heap_block(s, o);
    /* A reader with a stale offset may be reading this block: order our
     * writes after the pop/bump so its seqlock re-check sees the change that
     * made the block free (see txn.c, read). */
    fence_release();
    store_relaxed(&blk->cls, c);
    store_relaxed(&blk->len, (uint32_t)len);
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
    if (!pop_list(s, &s->h->heap_free[c], &o)) {
        uint64_t sz = heap_class_size(c);
        uint64_t b = load_relaxed(&s->h->heap_bump);
        for (;;) {
            /* Blocks of a line or more start on a line (the heap starts on
             * one): a 64-byte block, such as a ring record of one inline
             * value, is one cache line, not two.  The gap is never used. */
            uint64_t a = sz >= SHMSTM_CACHELINE ? (b + SHMSTM_CACHELINE - 1) & ~(uint64_t)(SHMSTM_CACHELINE - 1) : b;
            if (a < b || a > s->heap_size || sz > s->heap_size - a) {
                /* Fresh memory is used up: the free record blocks that the
                 * slots hold (see heap_alloc_rec) serve any allocation. */
                uint32_t i = 0;
                while (c < REC_CLASSES && i < s->max_procs && !pop_list(s, &s->procs[i].rec_free[c], &o))
                    i++;
                if (c >= REC_CLASSES || i == s->max_procs)
                    return SHMSTM_EHEAPFULL;
                break;
            }
            if (cas_acq_rel(&s->h->heap_bump, &b, a + sz)) {
                o = a;
                break;
            }
        }
    }
    block_init(s, o, c, len);
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
    push_chain(s, &s->h->heap_free[c], off, off);
}

/* A block for a commit-ring record of slot p: from p's record list first,
 * else as heap_alloc_raw (which, with the heap used up, also takes the free
 * record blocks of any slot). */
int heap_alloc_rec(struct shmstm_seg *s, struct shm_proc *p, size_t len, uint64_t *off)
{
    uint32_t c;
    uint64_t o;
    if (len > s->heap_size || size_class(len + sizeof(struct shm_block), &c) ||
        c >= REC_CLASSES || !pop_list(s, &p->rec_free[c], &o))
        return heap_alloc_raw(s, NULL, len, off);
    block_init(s, o, c, len);
    *off = o;
    return 0;
}

/* Free n record blocks, offs[i] made by slot owners[i] (the flusher, after a
 * range is in LMDB): one chain per (slot, class) onto that slot's record
 * list, one CAS each instead of one per block on a head every committer
 * uses.  Bad offsets leak (as heap_free); bad owners and large classes go to
 * the shared lists.  Overwrites offs. */
void heap_free_records(struct shmstm_seg *s, uint64_t *offs, const uint32_t *owners, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        uint32_t len;
        if (!offs[i] || !heap_block_ok(s, offs[i], &len))
            continue;
        uint32_t c = load_relaxed(&heap_block(s, offs[i])->cls);
        uint32_t who = owners[i];
        if (c >= REC_CLASSES || who >= s->max_procs) {
            push_chain(s, &s->h->heap_free[c], offs[i], offs[i]);
            continue;
        }
        uint64_t first = offs[i], last = first;
        for (uint32_t j = i + 1; j < n; j++) {
            if (!offs[j] || owners[j] != who || !heap_block_ok(s, offs[j], &len) ||
                load_relaxed(&heap_block(s, offs[j])->cls) != c)
                continue;
            store_relaxed(&heap_block(s, last)->next, offs[j] / SHMSTM_UNIT);
            last = offs[j];
            offs[j] = 0;
        }
        push_chain(s, &s->procs[who].rec_free[c], first, last);
    }
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

/* A commit record's write entries: inline, or in its spill block (NULL if
 * the spill offset is not a block of the right size: a corrupt record).
 * Here because it is a heap lookup; txn.c writes records, proc.c and
 * ring_commit.c read them. */
struct shm_wentry *rec_entries(struct shmstm_seg *s, struct shm_commit_rec *r)
{
    uint64_t off = load_relaxed(&r->spill_off);
    if (!off)
        return r->e;
    uint32_t len;
    if (!heap_block_ok(s, off, &len) || len < load_relaxed(&r->spill_cap) * sizeof(struct shm_wentry))
        return NULL;
    return (struct shm_wentry *)heap_payload(s, off);
}
