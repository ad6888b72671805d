/* proc.c -- process slots: liveness by the kernel, claiming, and recovery of
 * a dead owner's commit (brief section 6).
 *
 * Invariants:
 *  - A slot is ACTIVE only with the pid of a process that claimed it (one CAS
 *    publishes both).  Liveness is the kernel's answer: /proc/<pid>/stat exists,
 *    its starttime equals the slot's start_time (pids are reused), and it is not
 *    a zombie.  A stopped (SIGSTOP) process is alive: it keeps its slot and locks.
 *    Timeouts only decide *when* to ask the kernel, never the answer.
 *  - Recovery claims the slot by CAS ACTIVE|pid -> RECOVERING|recoverer_pid, so
 *    exactly one process recovers it; a recoverer that dies is itself replaced
 *    by the same check on its own pid.
 *  - Recovery is idempotent: every step tests the lock word for "still locked
 *    by the dead slot" before acting, so re-running a half-done recovery
 *    finishes it and never applies anything twice.
 *  - Order (pitfalls: "recover from truth, then mark free"): repair the TVars
 *    from the commit record first, then release the token, then mark FREE.
 *
 * Recovery steps (slot_recover), with the kill point (debug builds) after each:
 *  R1. claim the slot: CAS ACTIVE|dead pid (or RECOVERING|dead recoverer)
 *      -> CLAIMING|my pid, store my start time, then
 *      RECOVERING|my pid (store_release)                  recover.claimed
 *  R2. for each record entry whose lock word still names the dead slot:
 *      record COMMITTED (roll forward): store the new tag, value and
 *        generation                                       recover.published_one
 *        then release the lock with wv, push a freed TVar slot, wake waiters
 *      record LOCKING/VALIDATING (roll back): restore old_lock
 *                                                         recover.entry (both)
 *      (R2b) a record that cannot name all its entries (corrupt spill block
 *      or index), LOCKING/VALIDATING: every lock word still naming the dead
 *      slot is released at the current clock, value untouched; COMMITTED:
 *      handed to LK_LOST_OWNER (held for good, SHMSTM_ELOST to its users)
 *                                                         recover.entry
 *  R3. release the irrevocable token if the dead slot held it
 *                                                         recover.token
 *  R4. clear the record (n, spill, state IDLE), sleeping, the slot's waiter
 *      bits (wait.c: clear_waiter_bits), start_time       recover.before_free
 *  R5. owner := FREE (store_release)
 * A recoverer killed anywhere in R1-R5 leaves the slot RECOVERING with its own
 * (dead) pid; the next process that meets one of the slot's locks claims it
 * again and re-runs R2-R5, which skip whatever is already done: R2 tests each
 * lock word, and every store it makes writes the same value again (the
 * generation is set to e.gen + 1 from the record, never incremented).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "core.h"

/* starttime (field 22 of /proc/<pid>/stat, clock ticks since boot); 0 when
 * the kernel says the process does not exist or is a zombie (dead, not yet
 * reaped); PROC_UNKNOWN when /proc could not be read for another reason
 * (EMFILE, ENFILE, ENOMEM, ...).  Only the kernel's "no such process" is
 * death: a process out of file descriptors must never take a live owner for
 * dead and recover its commit under it. */
uint64_t proc_start_time(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? 0 : PROC_UNKNOWN;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int err = errno;
    close(fd);
    if (n < 0)
        return err == ESRCH ? 0 : PROC_UNKNOWN;   /* ESRCH: exited while we read */
    if (n == 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');      /* comm may contain spaces and ')' */
    if (!p)
        return PROC_UNKNOWN;
    p++;
    /* tokens after ')': [0]=state (field 3) ... [19]=starttime (field 22) */
    char *save = NULL, *tok = strtok_r(p, " ", &save);
    for (int i = 0; tok; i++, tok = strtok_r(NULL, " ", &save)) {
        if (i == 0 && (tok[0] == 'Z' || tok[0] == 'X'))
            return 0;
        if (i == 19) {
            uint64_t v = strtoull(tok, NULL, 10);
            return v && v != PROC_UNKNOWN ? v : PROC_UNKNOWN;
        }
    }
    return PROC_UNKNOWN;
}

uint64_t proc_self_start(void)
{
    uint64_t st = proc_start_time(getpid());
    return st == PROC_UNKNOWN ? 0 : st;
}

int proc_alive(uint32_t pid, uint64_t start)
{
    if (pid == 0)
        return 0;
    uint64_t st = proc_start_time((pid_t)pid);
    if (st == 0)
        return 0;
    if (st == PROC_UNKNOWN)
        return 1;           /* cannot tell: alive (asked again at the next check) */
    /* start == 0: the owner died (or is) between its claim CAS and writing
     * start_time; the pid alone is all we know, so trust it (a leak at worst). */
    return start == 0 || st == start;
}

/* 1 if the slot's owner (or its recoverer) is gone, 0 if alive or slot FREE. */
int slot_owner_dead(struct shmstm_seg *s, uint32_t slot)
{
    if (slot >= s->max_procs)
        return 0;
    struct shm_proc *p = &s->procs[slot];
    uint64_t o = load_acquire(&p->owner);   /* pairs with the claim CAS */
    uint32_t st = ps_state(o);
    if (st == PS_FREE)
        return 0;
    if (st == PS_CLAIMING)
        return !proc_alive(ps_pid(o), 0);
    /* ACTIVE or RECOVERING: start_time is the owner's or the recoverer's
     * (published by the release of that state, which the acquire above
     * pairs with), so a reused pid is not taken for the owner. */
    return !proc_alive(ps_pid(o), load_relaxed(&p->start_time));
}

int lock_owner_gone(struct shmstm_seg *s, uint64_t w)
{
    return lk_locked(w) && slot_owner_dead(s, lk_owner(w));
}

/* Finish or undo the dead owner's commit, then free the slot.
 * Returns 1 if this call recovered it (or found it FREE), 0 if the owner is
 * alive or someone else is recovering it now. */
int slot_recover(struct shmstm_seg *s, uint32_t slot)
{
    if (s->read_only || slot >= s->max_procs)
        return 0;
    struct shm_proc *p = &s->procs[slot];
    uint32_t me = (uint32_t)getpid();
    uint64_t mystart = proc_self_start();
    uint64_t o = load_acquire(&p->owner), claimed;
    for (;;) {
        uint32_t st = ps_state(o);
        if (st == PS_FREE)
            return 1;
        if (st == PS_CLAIMING) {
            if (proc_alive(ps_pid(o), 0))
                return 0;       /* a live recoverer is claiming it */
        } else {
            uint64_t t = load_relaxed(&p->start_time);
            if (st == PS_RECOVERING && ps_pid(o) == me && t == mystart)
                return 0;       /* we are recovering it (re-entrantly) */
            if (proc_alive(ps_pid(o), t))
                return 0;       /* the owner, or a live recoverer */
        }
        /* R1. Claim in two steps, because the owner is two words (owner,
         * start_time): CAS to CLAIMING|me, store our start time, release
         * RECOVERING|me.  Checking a recoverer by pid alone would take a
         * dead recoverer whose pid was reused for a live one, and the slot
         * (and its locks) would never be recovered.  acq_rel: the dead
         * owner's record (visible since it exited) is read after the claim. */
        claimed = ps_next(o, me, PS_CLAIMING);
        if (cas_acq_rel(&p->owner, &o, claimed))
            break;
    }
    /* The word is ours from here until we free it: nobody else changes it. */
    uint64_t recovering = ps_next(claimed, me, PS_RECOVERING);
    store_relaxed(&p->start_time, mystart);
    /* Pairs with the load_acquire of owner in slot_owner_dead(). */
    store_release(&p->owner, recovering);
    FAULT_POINT("recover.claimed");

    /* R2 */
    struct shm_commit_rec *r = &p->rec;
    uint32_t rst = load_acquire(&r->state);
    if (s->ring_slots)
        rst = ring_recover_decide(s, r, rst);   /* durable: slot wv decides (ring_commit.c) */
    uint32_t n = load_relaxed(&r->n);
    struct shm_wentry *e = rec_entries(s, r);
    uint64_t mine = lk_make_locked(slot);
    int lost = 0;                               /* entries the record cannot name */
    if (n && !e)
        lost = 1;                               /* its spill block is not a block */
    if (e && n && (rst == CR_LOCKING || rst == CR_VALIDATING || rst == CR_COMMITTED)) {
        uint64_t wv = load_relaxed(&r->wv);
        for (uint32_t i = 0; i < n; i++) {
            if (e[i].idx >= s->max_tvars) {
                lost = 1;                       /* corrupt entry: skip, never write */
                continue;
            }
            struct shm_tvar *t = &s->tvars[e[i].idx];
            if (load_acquire(&t->lock) != mine)
                continue;                       /* not (or no longer) held by the dead slot */
            if (rst == CR_COMMITTED) {
                /* roll forward: the commit point was reached.  Every store is
                 * idempotent: a recoverer killed after it re-runs it. */
                store_relaxed(&t->tag, (uint32_t)e[i].new_tag);
                store_relaxed(&t->value, e[i].new_val);
                if (e[i].flags & WE_FREE)
                    store_relaxed(&t->gen, e[i].gen + 1);   /* never t->gen + 1: see R2 */
                FAULT_POINT("recover.published_one");
                /* Pairs with readers' load_acquire of the lock word. */
                store_release(&t->lock, lk_make_unlocked(wv));
                if (e[i].flags & WE_FREE)
                    tvar_push_free(s, e[i].idx);
                fence_seq_cst();                /* see wait.c: Dekker with waiters */
                wake_waiters(s, t);
            } else {
                /* roll back: restore the word we replaced */
                store_release(&t->lock, e[i].old_lock);
            }
            FAULT_POINT("recover.entry");
        }
    }
    /* R2b.  Locks the record could not name (its spill block or an entry is
     * corrupt) would stay with this slot, and so with its next owner, for
     * good.  Before the commit point no value was published, so each such
     * lock is released with its value as it is, at the clock's current value:
     * no lower than the version it replaced (that came from the clock), and a
     * new version on an unchanged value only makes readers validate.  A commit
     * that passed its commit point cannot be finished without its record, and
     * is never half undone: its locks stay held, by LK_LOST_OWNER rather than
     * this slot (whose next owner must not find them its own), so that readers
     * and committers get SHMSTM_ELOST instead of waiting (docs/reliability.md). */
    if (lost && (rst == CR_LOCKING || rst == CR_VALIDATING || rst == CR_COMMITTED)) {
        uint64_t ver = load_acquire(&s->h->clock);
        uint64_t to = rst == CR_COMMITTED ? lk_make_locked(LK_LOST_OWNER) : lk_make_unlocked(ver);
        for (uint32_t i = 0; i < s->max_tvars; i++) {
            struct shm_tvar *t = &s->tvars[i];
            /* relaxed: only compared with the dead slot's lock word; no
             * process but a recoverer of this slot can change such a word.
             * The release pairs with readers' load_acquire of it, as in R2. */
            if (load_relaxed(&t->lock) == mine) {
                store_release(&t->lock, to);
                FAULT_POINT("recover.entry");
            }
        }
    }
    /* R3. release the irrevocable token if the dead slot held it */
    uint64_t tok = slot + 1ull;
    if (cas_acq_rel(&s->h->token, &tok, 0)) {
        faa_seq_cst(&s->h->token_futex, 1);
        futex_wake(&s->h->token_futex);
    }
    FAULT_POINT("recover.token");
    /* R4 */
    if (s->ring_slots)
        ring_recover_cleanup(s, r, rst);       /* free an unpublished ring record */
    store_relaxed(&r->n, 0);
    store_relaxed(&r->spill_off, 0);     /* the spill block leaks: acceptable */
    store_release(&r->state, CR_IDLE);
    store_relaxed(&p->sleeping, 0);
    clear_waiter_bits(s, slot);          /* e.g. killed while blocked in retry */
    store_relaxed(&p->start_time, 0);
    FAULT_POINT("recover.before_free");
    /* R5. Pairs with the load_acquire in claimers: all repairs above happen-before
     * anyone reuses the slot. */
    store_release(&p->owner, ps_next(recovering, 0, PS_FREE));
    return 1;
}

/* A lock word whose owner cannot hold it: an owner beyond max_procs (other
 * than LK_LOST_OWNER) or a FREE slot.  No commit leaves such a word (a slot
 * is freed only after its locks are released: txn.c, R5 here), so it is a
 * corrupted word, and no live process will ever release it.  It is released
 * at the clock's current value, as R2b releases the locks a record cannot
 * name before the commit point: the value stays as it is, and a new version
 * only makes readers validate.  A FREE owner slot is claimed for the length
 * of the repair, so that no new owner of it can take a lock meanwhile (its
 * lock word would be the same).  Returns 1 if w was such a word. */
int lock_repair_orphan(struct shmstm_seg *s, a64 *lk, uint64_t w)
{
    if (s->read_only || !lk_locked(w) || lk_owner(w) == LK_LOST_OWNER)
        return 0;
    uint32_t slot = lk_owner(w);
    if (slot >= s->max_procs) {
        uint64_t want = w;
        /* Pairs with readers' load_acquire of the lock word. */
        cas_acq_rel(lk, &want, lk_make_unlocked(load_acquire(&s->h->clock)));
        return 1;
    }
    struct shm_proc *p = &s->procs[slot];
    uint64_t o = load_acquire(&p->owner);       /* pairs with the FREE release */
    if (ps_state(o) != PS_FREE)
        return 0;
    uint64_t claimed = ps_next(o, (uint32_t)getpid(), PS_CLAIMING);
    if (!cas_acq_rel(&p->owner, &o, claimed))
        return 0;                               /* claimed meanwhile: not an orphan now */
    uint64_t want = w;
    cas_acq_rel(lk, &want, lk_make_unlocked(load_acquire(&s->h->clock)));
    /* Pairs with claimers' load_acquire of owner. */
    store_release(&p->owner, ps_next(claimed, 0, PS_FREE));
    return 1;
}

/* At attach: every lock of a dead owner is recovered (with its slot), and
 * every lock no owner can hold is released (lock_repair_orphan).  Returns the
 * number of locks repaired or recovered. */
int shmstm_seg_repair_locks(shmstm_seg *s)
{
    if (s->read_only)
        return 0;
    uint32_t bump = load_relaxed(&s->h->tvar_bump);   /* advisory bound */
    if (bump > s->max_tvars)
        bump = s->max_tvars;
    int n = 0;
    for (uint32_t i = 0; i < bump; i++) {
        a64 *lk = &s->tvars[i].lock;
        uint64_t w = load_acquire(lk);   /* pairs with the release that locked it */
        if (!lk_locked(w))
            continue;
        if (lock_repair_orphan(s, lk, w))
            n++;
        else if (lock_owner_gone(s, w) && slot_recover(s, lk_owner(w)))
            n++;
    }
    return n;
}

int shmstm_seg_reclaim_dead(shmstm_seg *s)
{
    int n = 0;
    for (uint32_t i = 0; i < s->max_procs; i++)
        if (slot_owner_dead(s, i) && slot_recover(s, i))
            n++;
    return n;
}

int shmstm_seg_locked(shmstm_seg *s, uint32_t *idx, uint32_t *owner, uint32_t cap)
{
    uint32_t bump = load_relaxed(&s->h->tvar_bump);   /* advisory bound */
    if (bump > s->max_tvars)
        bump = s->max_tvars;
    int n = 0;
    for (uint32_t i = 0; i < bump; i++) {
        /* acquire: pairs with the release that unlocked (or locked) it; the
         * answer is a snapshot per word, exact only at quiescence. */
        uint64_t w = load_acquire(&s->tvars[i].lock);
        if (!lk_locked(w))
            continue;
        if ((uint32_t)n < cap) {
            idx[n] = i;
            owner[n] = lk_owner(w);
        }
        n++;
    }
    return n;
}
