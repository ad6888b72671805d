/* ring.h -- what the two sides of the commit ring share (ring_commit.c, the
 * committers' side; ring_flush.c, the flusher's): the record checksum, the
 * slot of a write version, the flusher's liveness and the chained wake-ups
 * of waiters on flush_futex.  Internal to native/; the ring's invariants are
 * at the top of ring_commit.c. */
#ifndef SHMSTM_RING_H
#define SHMSTM_RING_H
#include <string.h>
#include "core.h"

#define RING_DEFAULT_SLOTS 65536u    /* shmstm_ring_default_slots */
#define ROOM_CHECK_ROUNDS 10u        /* futex slices between flusher liveness checks */

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
static inline int lease_alive(struct shmstm_seg *s, uint64_t o)
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

static inline int flusher_alive(struct shmstm_seg *s)
{
    /* Dekker with a flusher's exit (shmstm_flusher_release): an opener has
     * claimed its slot, then looks at the lease; the flusher released the
     * lease, then looks at the slots.  One of the two sees the other. */
    fence_seq_cst();
    return lease_alive(s, load_acquire(&s->h->flusher_owner));
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
static inline void pass_flush_wake(struct shm_header *h)
{
    if (!load_relaxed(&h->flush_wake_bits))
        return;
    uint32_t bits = xchg_acq_rel(&h->flush_wake_bits, 0);
    if (bits)
        futex_wake_bits(&h->flush_futex, bits);
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

/* Write an inline record into claimed slot sl and publish it (claim ->
 * RING_INLINE_KIND, release: the entries are visible to the flusher's
 * acquire of rec). */
static inline void inline_publish(struct shm_ring_slot *sl, const struct ring_inl *in, uint32_t n, uint64_t claim)
{
    sl->in_n = n;
    memcpy(sl->in_e, in, n * sizeof *in);
    sl->in_sum = rec_sum((const unsigned char *)sl->in_e, n * sizeof *in);
    store_release(&sl->rec, (claim & ~15ull) | RING_INLINE_KIND);
}

#endif
