/* liveness_cases.c -- liveness decisions of the C core that a Python test
 * cannot stage: each case forges a slot state in a private segment and checks
 * what recovery decides.  Built and run by tests/native/test_native_liveness.py;
 * prints one "ok <case>" line per case, exits non-zero at the first failure.
 *
 *  recovering_reused_pid  a slot RECOVERING by a pid that now belongs to a live
 *                         process with another start time (a dead recoverer's
 *                         pid reused) is dead: it is recovered and its lock
 *                         released (it used to be taken for alive: stuck for good)
 *  recovering_live        a slot RECOVERING by a live recoverer (pid + its start
 *                         time) is left alone
 *  emfile_is_not_death    with no file descriptor left, /proc cannot be read:
 *                         a live owner is not taken for dead
 *  gone_is_death          a reaped child's pid is dead
 *  corrupt_spill_rolls_back   a dead slot's record whose spill block is not a
 *                         block, before its commit point: every lock still
 *                         naming the slot is released, values as they were,
 *                         versions not lower (they used to stay locked, and
 *                         go to the slot's next owner)
 *  corrupt_index_rolls_back   one entry's index is out of range: the others
 *                         roll back from the record, the lock it stood for is
 *                         released by the sweep
 *  committed_corrupt_is_lost  past the commit point, a record that cannot be
 *                         read is never half undone: its locks stay held, by
 *                         LK_LOST_OWNER instead of the slot (whose next owner
 *                         took them for its own), and a read or a commit of
 *                         such a TVar is SHMSTM_ELOST, not an endless wait
 *  reclaimed_slot_aba     a recoverer's CAS from an owner word read before the
 *                         slot was recovered, freed and claimed again by the
 *                         same pid fails (the tag moved): it used to succeed on
 *                         the look-alike word and take a live owner's slot */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include "cases.h"

int main(void)
{
    shmstm_seg *s = case_segment("liveness");
    shmstm_ctx *c;
    CHECK(shmstm_ctx_new(s, &c) == 0, "ctx");
    uint32_t idx, gen;
    CHECK(shmstm_tvar_new(c, SHMSTM_TAG_INT, 5, 0, NULL, 0, &idx, &gen) == 0, "tvar");

    /* A live process that is not us: a child waiting on a pipe. */
    int pfd[2];
    CHECK(pipe(pfd) == 0, "pipe");
    pid_t kid = fork();
    if (kid == 0) {
        char b;
        close(pfd[1]);
        if (read(pfd[0], &b, 1) < 0) { /* parent gone: exit anyway */ }
        _exit(0);
    }
    close(pfd[0]);
    uint64_t kid_start = proc_start_time(kid);
    CHECK(kid_start != 0 && kid_start != PROC_UNKNOWN, "child start time");

    /* Slot 3 "held" a lock on the TVar and died while a recoverer (whose pid
     * is now the child's) was recovering it: forge that state. */
    uint32_t victim = 3;
    struct shm_proc *vp = &s->procs[victim];
    struct shm_tvar *t = &s->tvars[idx];
    uint64_t unlocked = load_relaxed(&t->lock);
    struct shm_wentry *e = rec_entries(s, &vp->rec);
    CHECK(e != NULL, "entries");
    e[0].idx = idx;
    e[0].gen = gen;
    e[0].old_lock = unlocked;
    store_relaxed(&vp->rec.n, 1);
    store_relaxed(&vp->rec.state, CR_LOCKING);
    store_relaxed(&t->lock, lk_make_locked(victim));

    /* recovering_live: RECOVERING by the child with the child's start time. */
    store_relaxed(&vp->start_time, kid_start);
    store_release(&vp->owner, ps_make((uint32_t)kid, PS_RECOVERING));
    CHECK(!slot_owner_dead(s, victim), "recovering_live: taken for dead");
    CHECK(slot_recover(s, victim) == 0, "recovering_live: recovered under a live recoverer");
    CHECK(load_relaxed(&t->lock) == lk_make_locked(victim), "recovering_live: lock touched");
    printf("ok recovering_live\n");

    /* recovering_reused_pid: same pid, another start time (the recoverer died
     * and its pid went to the child). */
    store_relaxed(&vp->start_time, kid_start + 12345);
    CHECK(slot_owner_dead(s, victim), "recovering_reused_pid: taken for alive");
    CHECK(slot_recover(s, victim) == 1, "recovering_reused_pid: not recovered");
    CHECK(load_relaxed(&t->lock) == unlocked, "recovering_reused_pid: lock not rolled back");
    CHECK(ps_state(load_relaxed(&vp->owner)) == PS_FREE, "recovering_reused_pid: slot not freed");
    printf("ok recovering_reused_pid\n");

    /* emfile_is_not_death: use up every descriptor, then ask about the child. */
    struct rlimit rl;
    CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0, "getrlimit");
    struct rlimit low = {64, rl.rlim_max};
    CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0, "setrlimit");
    int fds[64], nf = 0;
    while (nf < 64 && (fds[nf] = open("/dev/null", O_RDONLY)) >= 0)
        nf++;
    CHECK(errno == EMFILE, "could not exhaust descriptors");
    int alive = proc_alive((uint32_t)kid, kid_start);
    uint64_t st = proc_start_time(kid);
    while (nf > 0)
        close(fds[--nf]);
    CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0, "restore rlimit");
    CHECK(st == PROC_UNKNOWN, "emfile_is_not_death: /proc read did not report unknown");
    CHECK(alive, "emfile_is_not_death: a live process taken for dead");
    printf("ok emfile_is_not_death\n");

    /* gone_is_death */
    close(pfd[1]);
    CHECK(waitpid(kid, NULL, 0) == kid, "waitpid");
    CHECK(!proc_alive((uint32_t)kid, kid_start), "gone_is_death: a reaped pid taken for alive");
    printf("ok gone_is_death\n");

    /* The reaped child is a dead owner from here on.  Two TVars with
     * versions and a clock above them: t = 7 (wv 1), t2 = 8 (wv 2), clock 3. */
    uint32_t idx2, gen2;
    CHECK(shmstm_tvar_new(c, SHMSTM_TAG_INT, 6, 0, NULL, 0, &idx2, &gen2) == 0, "tvar 2");
    struct shm_tvar *t2 = &s->tvars[idx2];
    CHECK(shmstm_tx_commit_1(c, ((int64_t)gen << 32) | idx, 7) == 0, "commit t");
    CHECK(shmstm_tx_commit_1(c, ((int64_t)gen2 << 32) | idx2, 8) == 0, "commit t2");
    CHECK(shmstm_tx_commit_1(c, ((int64_t)gen2 << 32) | idx2, 8) == 0, "commit t2 again");
    uint64_t w1 = load_relaxed(&t->lock), w2 = load_relaxed(&t2->lock);
    CHECK(!lk_locked(w1) && !lk_locked(w2) && lk_version(w2) == 3, "versions");
    uint32_t dv = 2;
    struct shm_proc *dp = &s->procs[dv];
    struct shm_commit_rec *dr = &dp->rec;

    /* corrupt_spill_rolls_back: a spilled write set, its spill offset not a
     * block (not a multiple of the heap unit), VALIDATING, both TVars locked. */
    store_relaxed(&dr->n, REC_INLINE + 1);
    store_relaxed(&dr->spill_off, 8);
    store_relaxed(&dr->spill_cap, REC_INLINE + 1);
    store_relaxed(&dr->state, CR_VALIDATING);
    store_relaxed(&t->lock, lk_make_locked(dv));
    store_relaxed(&t2->lock, lk_make_locked(dv));
    store_relaxed(&dp->start_time, kid_start);
    store_release(&dp->owner, ps_make((uint32_t)kid, PS_ACTIVE));
    CHECK(rec_entries(s, dr) == NULL, "corrupt_spill: the spill offset passes as a block");
    CHECK(slot_owner_dead(s, dv), "corrupt_spill: owner taken for alive");
    CHECK(slot_recover(s, dv) == 1, "corrupt_spill: not recovered");
    uint64_t a = load_relaxed(&t->lock), b = load_relaxed(&t2->lock);
    CHECK(!lk_locked(a) && !lk_locked(b), "corrupt_spill_rolls_back: a lock stays held");
    CHECK(lk_version(a) >= lk_version(w1) && lk_version(b) >= lk_version(w2),
          "corrupt_spill_rolls_back: a version went down");
    CHECK(load_relaxed(&t->value) == 7 && load_relaxed(&t2->value) == 8,
          "corrupt_spill_rolls_back: a value changed");
    CHECK(ps_state(load_relaxed(&dp->owner)) == PS_FREE, "corrupt_spill_rolls_back: slot not freed");
    printf("ok corrupt_spill_rolls_back\n");

    /* corrupt_index_rolls_back: two inline entries, the second's index out of
     * range; the first restores its old word exactly. */
    w1 = load_relaxed(&t->lock);
    w2 = load_relaxed(&t2->lock);
    struct shm_wentry *de = rec_entries(s, dr);
    CHECK(de == dr->e, "corrupt_index: inline entries");
    de[0].idx = idx;
    de[0].gen = gen;
    de[0].old_lock = w1;
    de[1].idx = 1000;                       /* max_tvars is 64 */
    de[1].gen = gen2;
    de[1].old_lock = w2;
    store_relaxed(&dr->n, 2);
    store_relaxed(&dr->state, CR_LOCKING);
    store_relaxed(&t->lock, lk_make_locked(dv));
    store_relaxed(&t2->lock, lk_make_locked(dv));
    store_relaxed(&dp->start_time, kid_start);
    store_release(&dp->owner, ps_make((uint32_t)kid, PS_ACTIVE));
    CHECK(slot_recover(s, dv) == 1, "corrupt_index: not recovered");
    CHECK(load_relaxed(&t->lock) == w1, "corrupt_index_rolls_back: entry 0 not restored from the record");
    b = load_relaxed(&t2->lock);
    CHECK(!lk_locked(b) && lk_version(b) >= lk_version(w2) && load_relaxed(&t2->value) == 8,
          "corrupt_index_rolls_back: the unnamed lock not released as it was");
    printf("ok corrupt_index_rolls_back\n");

    /* committed_corrupt_is_lost: as the first, but COMMITTED. */
    store_relaxed(&dr->n, REC_INLINE + 1);
    store_relaxed(&dr->spill_off, 8);
    store_relaxed(&dr->spill_cap, REC_INLINE + 1);
    store_relaxed(&dr->state, CR_COMMITTED);
    store_relaxed(&t->lock, lk_make_locked(dv));
    store_relaxed(&dp->start_time, kid_start);
    store_release(&dp->owner, ps_make((uint32_t)kid, PS_ACTIVE));
    CHECK(slot_recover(s, dv) == 1, "committed_corrupt: not recovered");
    CHECK(load_relaxed(&t->lock) == lk_make_locked(LK_LOST_OWNER),
          "committed_corrupt_is_lost: the lock not handed to LK_LOST_OWNER");
    CHECK(load_relaxed(&t->value) == 7, "committed_corrupt_is_lost: the value changed");
    int64_t got[2];
    CHECK(shmstm_read1(c, idx, gen, got) == SHMSTM_ELOST, "committed_corrupt_is_lost: read");
    CHECK(shmstm_tx_commit_1(c, ((int64_t)gen << 32) | idx, 9) == SHMSTM_ELOST,
          "committed_corrupt_is_lost: commit");
    CHECK(load_relaxed(&t->lock) == lk_make_locked(LK_LOST_OWNER) && load_relaxed(&t->value) == 7,
          "committed_corrupt_is_lost: the refused commit changed the TVar");
    CHECK(shmstm_tx_commit_1(c, ((int64_t)gen2 << 32) | idx2, 10) == 0,
          "committed_corrupt_is_lost: another TVar's commit");
    printf("ok committed_corrupt_is_lost\n");

    /* reclaimed_slot_aba: slot 1 is ACTIVE by the dead pid; a recoverer reads
     * that word, and before its CAS another recovers and frees the slot and a
     * process with the same pid (reused) claims it. */
    uint32_t av = 1;
    struct shm_proc *ap = &s->procs[av];
    store_relaxed(&ap->start_time, kid_start);
    store_release(&ap->owner, ps_make((uint32_t)kid, PS_ACTIVE));
    uint64_t stale = load_acquire(&ap->owner);
    CHECK(slot_recover(s, av) == 1, "aba: not recovered");
    uint64_t fw = load_acquire(&ap->owner);
    CHECK(ps_state(fw) == PS_FREE, "aba: not freed");
    CHECK(cas_acq_rel(&ap->owner, &fw, ps_next(fw, (uint32_t)kid, PS_ACTIVE)), "aba: reclaim");
    uint64_t now_w = load_acquire(&ap->owner);
    CHECK(ps_pid(now_w) == ps_pid(stale) && ps_state(now_w) == ps_state(stale),
          "aba: the reclaim is not a look-alike");
    uint64_t expect = stale;
    CHECK(!cas_acq_rel(&ap->owner, &expect, ps_next(stale, (uint32_t)getpid(), PS_CLAIMING)),
          "reclaimed_slot_aba: a CAS from the stale word took the reclaimed slot");
    CHECK(load_acquire(&ap->owner) == now_w, "reclaimed_slot_aba: owner word changed");
    store_release(&ap->owner, ps_next(now_w, 0, PS_FREE));
    printf("ok reclaimed_slot_aba\n");

    /* free_owner_lock_released: a lock word naming slot 3, which is FREE
     * (a corrupt word: no commit leaves one).  A read outside a transaction
     * used to wait for it forever; a commit gave up and re-ran forever. */
    int64_t h2 = ((int64_t)gen2 << 32) | idx2;
    uint64_t before = load_relaxed(&t2->lock);
    CHECK(ps_state(load_acquire(&s->procs[3].owner)) == PS_FREE, "free_owner: slot 3 not free");
    store_relaxed(&t2->lock, lk_make_locked(3));
    CHECK(shmstm_read1(c, idx2, gen2, got) == SHMSTM_TAG_INT && got[0] == 10,
          "free_owner_lock_released: read");
    uint64_t after = load_relaxed(&t2->lock);
    CHECK(!lk_locked(after) && lk_version(after) >= lk_version(before),
          "free_owner_lock_released: not released at a version as high");
    CHECK(ps_state(load_acquire(&s->procs[3].owner)) == PS_FREE,
          "free_owner_lock_released: the slot was left claimed");
    store_relaxed(&t2->lock, lk_make_locked(3));
    CHECK(shmstm_tx_commit_1(c, h2, 11) == 0, "free_owner_lock_released: commit");
    printf("ok free_owner_lock_released\n");

    /* impossible_owner_lock_released: an owner beyond max_procs (4). */
    store_relaxed(&t2->lock, lk_make_locked(100));
    CHECK(shmstm_read1(c, idx2, gen2, got) == SHMSTM_TAG_INT && got[0] == 11,
          "impossible_owner_lock_released: read");
    CHECK(!lk_locked(load_relaxed(&t2->lock)), "impossible_owner_lock_released: still locked");
    store_relaxed(&t2->lock, lk_make_locked(100));
    CHECK(shmstm_tx_commit_1(c, h2, 12) == 0, "impossible_owner_lock_released: commit");
    printf("ok impossible_owner_lock_released\n");

    /* attach_releases_orphans: both kinds, released by the next attach
     * (shmstm-cleanup says "released at the next attach"). */
    uint32_t idx3, gen3;
    CHECK(shmstm_tvar_new(c, SHMSTM_TAG_INT, 3, 0, NULL, 0, &idx3, &gen3) == 0, "tvar 3");
    store_relaxed(&t2->lock, lk_make_locked(3));
    store_relaxed(&s->tvars[idx3].lock, lk_make_locked(200));
    int fd = shm_open(case_name, O_RDWR, 0600);
    CHECK(fd >= 0, "attach_releases_orphans: shm_open");
    shmstm_params ap2;
    shmstm_seg *s2;
    CHECK(shmstm_seg_attach(fd, 0, 0, &ap2, &s2) == 0, "attach_releases_orphans: attach");
    close(fd);
    CHECK(!lk_locked(load_relaxed(&t2->lock)) && !lk_locked(load_relaxed(&s->tvars[idx3].lock)),
          "attach_releases_orphans: a lock left");
    CHECK(load_relaxed(&t->lock) == lk_make_locked(LK_LOST_OWNER),
          "attach_releases_orphans: a lost record's lock was released");
    shmstm_seg_detach(s2);
    printf("ok attach_releases_orphans\n");

    /* future_version_is_corrupt: an unlocked word with a version above the
     * clock used to make every transactional read extend and retry forever. */
    uint64_t clk = load_relaxed(&s->h->clock);
    store_relaxed(&t2->lock, lk_make_unlocked(clk + 1000));
    CHECK(shmstm_tx_read(c, idx2, gen2, got) == SHMSTM_ECORRUPT, "future_version_is_corrupt: read");
    CHECK(shmstm_tx_abort(c, SHMSTM_AB_USER) == 0, "future_version_is_corrupt: abort");
    store_relaxed(&t2->lock, lk_make_unlocked(clk));
    CHECK(shmstm_tx_read(c, idx2, gen2, got) == SHMSTM_TAG_INT && got[0] == 12,
          "future_version_is_corrupt: a sound word read");
    CHECK(shmstm_tx_end_ro(c) == 0, "future_version_is_corrupt: end");
    printf("ok future_version_is_corrupt\n");

    /* fork_child_free_skips_a_held_lock: a fork taken while ctx_lock is held
     * (by a thread in ctx_new's link step; here the forking thread itself):
     * in the child, freeing an inherited context must neither wait for the
     * lock (CPython frees other threads' contexts before its after-fork
     * hooks run) nor give back the parent's slot. */
    shmstm_ctx *c2;
    CHECK(shmstm_ctx_new(s, &c2) == 0, "fork_child_free: ctx");
    uint32_t slot2 = c2->slot;
    pthread_mutex_lock(&s->ctx_lock);
    pid_t k = fork();
    if (k == 0) {
        alarm(10);                          /* a hang fails the case */
        shmstm_ctx_free(c2);
        shmstm_seg_after_fork(s);
        _exit(0);
    }
    pthread_mutex_unlock(&s->ctx_lock);
    int wst = 0;
    CHECK(waitpid(k, &wst, 0) == k, "fork_child_free: waitpid");
    CHECK(WIFEXITED(wst) && WEXITSTATUS(wst) == 0, "fork_child_free_skips_a_held_lock: the child hung");
    CHECK(ps_state(load_acquire(&s->procs[slot2].owner)) == PS_ACTIVE &&
          ps_pid(load_acquire(&s->procs[slot2].owner)) == (uint32_t)getpid(),
          "fork_child_free_skips_a_held_lock: the parent's slot was given back");
    shmstm_ctx_free(c2);
    printf("ok fork_child_free_skips_a_held_lock\n");

    shmstm_ctx_free(c);
    case_done(s);
    return 0;
}
