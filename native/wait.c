/* wait.c -- blocking retry: futex waits on shared memory, woken only by the
 * committers of TVars the waiter read.
 *
 * Protocol (no lost wake-up):
 *   waiter W                               committer C (txn.c, steps 8-9)
 *   a. for each TVar read: fetch_or bit    1. store_release(lock, new version)
 *   b. fence_seq_cst                       2. fence_seq_cst
 *   c. f := futex word (seq_cst)           3. if waiters: bits := exchange(0)
 *   d. every read still current? if not,   4. for each bit: futex += 1 (seq_cst),
 *      return: something changed              wake if the slot sleeps
 *   e. sleeping := 1; futex_wait(f)
 * The fences make (a, d) and (1, 3) a Dekker pair: either C sees W's bit and
 * bumps W's futex word (then W's futex_wait(f) returns at once, or W's check
 * (d) already saw the change), or W's check (d) sees C's new version.
 * Committers clear whole bitmaps (exchange), waiters never clear bits while
 * they run: a bit is shared by slots s, s+64, ... so clearing one's own could
 * drop another's.  A stale bit costs one spurious futex bump, after which the
 * woken waiter re-validates and sleeps again: spurious wake-ups never reach
 * Python.  When a slot is given up (released, or recovered after its owner
 * died, e.g. killed while blocked in retry) and no other slot shares its bit
 * (max_procs <= 64, the default), clear_waiter_bits() removes the bit from
 * every TVar, so the next owner of the slot inherits none.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include "core.h"

int futex_wait(a32 *addr, uint32_t val, int64_t timeout_ns)
{
    /* FUTEX_WAIT is FUTEX_WAIT_BITSET with every bit (and a relative timeout). */
    return futex_wait_bits(addr, val, timeout_ns, UINT32_MAX);
}

void futex_wake(a32 *addr)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* futex_wait woken only by futex_wake_bits with a mask that shares a bit
 * with ``bits`` (futex_wake wakes it too: its mask is all ones). */
int futex_wait_bits(a32 *addr, uint32_t val, int64_t timeout_ns, uint32_t bits)
{
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline. */
        uint64_t end = now_ns() + (uint64_t)timeout_ns;
        ts.tv_sec = (time_t)(end / 1000000000);
        ts.tv_nsec = (long)(end % 1000000000);
        tp = &ts;
    }
    /* Not FUTEX_PRIVATE: the word is in a mapping shared across processes. */
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_BITSET, val, tp, NULL, bits);
    if (rc == 0)
        return 0;
    if (errno == ETIMEDOUT)
        return SHMSTM_ETIMEOUT;
    if (errno == EINTR)
        return SHMSTM_EINTR;
    return 0;     /* EAGAIN: the word changed before we slept */
}

/* Wake the waiters of addr whose bits (futex_wait_bits) share one with
 * ``bits``, and every futex_wait waiter. */
void futex_wake_bits(a32 *addr, uint32_t bits)
{
    futex_wake_bits_n(addr, bits, INT_MAX);
}

/* The same, waking at most n of them. */
void futex_wake_bits_n(a32 *addr, uint32_t bits, int n)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_BITSET, n, NULL, NULL, bits);
}

/* Called by committers after fence_seq_cst (step 9). */
void wake_waiters(struct shmstm_seg *s, struct shm_tvar *t)
{
    if (!load_relaxed(&t->waiters))
        return;
    uint64_t bits = xchg_acq_rel(&t->waiters, 0);
    while (bits) {
        uint32_t b = (uint32_t)__builtin_ctzll(bits);
        bits &= bits - 1;
        for (uint32_t slot = b; slot < s->max_procs; slot += 64) {
            struct shm_proc *p = &s->procs[slot];
            faa_seq_cst(&p->futex, 1);
            if (load_seq_cst(&p->sleeping))
                futex_wake(&p->futex);
        }
    }
}

/* Remove slot's bit from every TVar's waiter bitmap.  Only when no other
 * slot shares the bit (max_procs <= 64) and the slot is not FREE (ours, or
 * RECOVERING by us): then nobody can set the bit concurrently, and clearing it
 * drops no one's wake-up.  O(TVars used), once per slot release. */
void clear_waiter_bits(struct shmstm_seg *s, uint32_t slot)
{
    if (s->max_procs > 64 || s->read_only)
        return;
    uint64_t bit = 1ull << (slot % 64);
    uint32_t bump = load_relaxed(&s->h->tvar_bump);     /* advisory bound */
    if (bump > s->max_tvars)
        bump = s->max_tvars;
    for (uint32_t i = 0; i < bump; i++) {
        a64 *w = &s->tvars[i].waiters;
        if (load_relaxed(w) & bit)
            fand_acq_rel(w, ~bit);
    }
}

int shmstm_tvar_waiters(shmstm_seg *s, uint32_t idx, uint64_t *out)
{
    if (idx >= s->max_tvars)
        return SHMSTM_EINVAL;
    *out = load_relaxed(&s->tvars[idx].waiters);     /* advisory snapshot */
    return 0;
}

static int reads_current(shmstm_ctx *c)
{
    for (uint32_t i = 0; i < c->rs_n; i++) {
        struct rentry *r = &c->rs[i];
        uint64_t w = load_acquire(&c->seg->tvars[r->idx].lock);
        if (lk_locked(w) || lk_version(w) != r->ver)
            return 0;
    }
    return 1;
}

/* retry(): block until a TVar read by this attempt changes.
 * Returns 0 when something changed (re-run the transaction), SHMSTM_ETIMEOUT,
 * SHMSTM_EINTR (a signal arrived: Python runs its handlers and calls again
 * with the time left; the read set is kept), or SHMSTM_EINVAL (nothing read:
 * the wait could never end). */
int shmstm_tx_wait(shmstm_ctx *c, int64_t timeout_ns)
{
    if (c->gone)
        return c->gone;
    struct shmstm_seg *s = c->seg;
    struct shm_proc *p = c->proc;
    free_staged(c);            /* drop the attempt's writes, keep its reads */
    release_token(c);          /* a blocked transaction must not hold up every writer */
    if (c->doomed) {           /* inconsistent view: re-run at once */
        ctx_reset(c);
        return 0;
    }
    if (c->rs_n == 0)
        return SHMSTM_EINVAL;
    counter_add(&p->retries, 1);
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    uint64_t bit = 1ull << (c->slot % 64);
    for (;;) {
        for (uint32_t i = 0; i < c->rs_n; i++)
            for_acq_rel(&s->tvars[c->rs[i].idx].waiters, bit);      /* a */
        fence_seq_cst();                                            /* b */
        uint32_t f = load_seq_cst(&p->futex);                       /* c */
        /* After c: an interrupt that bumped the futex after c makes the
         * wait below return at once; one before c is seen here. */
        if (load_seq_cst(&c->interrupted)) {
            ctx_reset(c);
            return SHMSTM_ECLOSED;
        }
        if (!reads_current(c)) {                                    /* d */
            counter_add(&p->wakeups, 1);
            ctx_reset(c);
            return 0;
        }
        int64_t left = -1;
        if (deadline != UINT64_MAX) {
            uint64_t now = now_ns();
            if (now >= deadline) {
                ctx_reset(c);
                return SHMSTM_ETIMEOUT;
            }
            left = (int64_t)(deadline - now);
        }
        store_seq_cst(&p->sleeping, 1);                              /* e */
        int rc = futex_wait(&p->futex, f, left);
        store_seq_cst(&p->sleeping, 0);
        if (rc == SHMSTM_EINTR)
            return rc;
        /* woken, timed out or raced: loop re-checks (and re-sets cleared bits) */
    }
}

/* Runtime.close() from another thread: end c's retry() wait with
 * SHMSTM_ECLOSED.  The flag first, then the futex bump and wake: a waiter
 * that read the futex word before the bump returns from futex_wait at once
 * (the word changed) and then sees the flag; one that reads it after the bump
 * sees the flag (seq_cst, both sides).  Touches only c (process-local) and its
 * slot's futex word, which only this slot's waits use. */
int shmstm_ctx_interrupt(shmstm_ctx *c)
{
    if (c->gone)
        return c->gone;
    store_seq_cst(&c->interrupted, 1u);
    faa_seq_cst(&c->proc->futex, 1u);
    futex_wake(&c->proc->futex);
    return 0;
}
