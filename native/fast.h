/* fast.h -- the core entry points that native/pyfast.c (the shmstm._fast
 * CPython module) calls while holding the GIL.
 *
 * Why a second module: a cffi call costs ~1,000 to 3,000 instructions (it
 * unpacks an argument tuple and releases and re-takes the GIL), while the C
 * work of a TVar read is ~30 ns.  The hot calls (peek, transactional read,
 * commit) therefore go through a few METH_FASTCALL functions that keep the
 * GIL.  The core itself is still compiled once, by cffi, into
 * shmstm._native; shmstm._fast holds no core code, only this table of
 * pointers into it (so there is one copy of every global of the core).
 *
 * Holding the GIL is safe only if the core never waits with it: every wait
 * that can block or take long (the irrevocable token, ring room, a heap full
 * of unflushed records, sync durability, and lock waits once they start
 * yielding: the holder may be another process that is stopped or
 * descheduled) first calls ctx_gil_release (core.h), which drops the GIL
 * through the hooks below, once per call (sticky); the entry point re-takes
 * it when the core returns.  The fast entry points set c->gil for the length
 * of the call; cffi calls leave it NULL (cffi has released the GIL already).
 * What runs with the GIL held is bounded and short: the C work of a read or a
 * commit and at most 64 cpu_relax spins per lock.
 */
#ifndef SHMSTM_FAST_H
#define SHMSTM_FAST_H
#include "shmstm.h"

/* Hooks that drop and re-take the caller's interpreter lock.  Process-local;
 * owned by the thread that makes the call (lives on its stack). */
struct shmstm_gil {
    void (*release)(struct shmstm_gil *g);
    void (*acquire)(struct shmstm_gil *g);
    void *state;                /* pyfast.c: the saved PyThreadState */
    int released;               /* the core dropped the GIL; the entry point re-takes it */
};

#define SHMSTM_FAST_ABI 3

struct shmstm_fast_table {
    uint32_t abi;               /* SHMSTM_FAST_ABI */
    uint32_t size;              /* sizeof(struct shmstm_fast_table) */
    uint32_t gil_size;          /* sizeof(struct shmstm_gil) */
    int64_t (*peek)(const shmstm_ref *r);
    int64_t (*readv)(shmstm_ctx *c, const shmstm_ref *r, struct shmstm_gil *g);
    /* Stage n (handle, value) int pairs, then commit (as shmstm_tx_commit_ints). */
    int (*commit_ints)(shmstm_ctx *c, const int64_t *pairs, uint32_t n, struct shmstm_gil *g);
    /* Owned resources (pyfast.c's Ctx and detach): taken and given back in one
     * call each, so that no Python code runs between the C call and the
     * bookkeeping that says whether the resource is held. */
    int (*ctx_new)(shmstm_seg *s, shmstm_ctx **out);
    int (*ctx_free)(shmstm_ctx *c);
    int (*seg_detach)(shmstm_seg *s);
};

#endif
