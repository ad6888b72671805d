/* core.h -- process-local structures and the internal API shared by the
 * subsystem files (segment.c, heap.c, tvar.c, txn.c, wait.c, proc.c). */
#ifndef SHMSTM_CORE_H
#define SHMSTM_CORE_H

#include <pthread.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include "layout.h"
#include "shmstm.h"
#include "fast.h"

/* Debug builds (-DSHMSTM_DEBUG) check states at entry points and offer fault
 * injection; release builds compile all of it away. */
#ifdef SHMSTM_DEBUG
#include <assert.h>
#define DASSERT(x) assert(x)
#else
#define DASSERT(x) ((void)0)
#endif

/* A mapped segment.  Geometry is copied out of the header once, after
 * validation, and every bounds check uses these private copies: a corrupted or
 * hostile header cannot move them after attach. */
struct shmstm_seg {
    unsigned char *base;
    size_t size;
    int read_only;
    struct shm_header *h;
    struct shm_proc *procs;
    struct shm_tvar *tvars;
    struct shm_dirent *dir;
    unsigned char *heap;
    struct shm_ring_slot *ring;  /* NULL unless durable */
    uint32_t ring_slots;         /* 0: not durable (the one branch on the hot path) */
    uint64_t ring_mask;          /* ring_slots - 1 if a power of two, else 0 (slot_of) */
    uint64_t heap_size;
    uint32_t max_tvars, max_procs, max_value_size, dir_slots;
    /* The flusher's coalescing table (ring_flush.c, shmstm_ring_collect):
     * process-private, allocated at the first collect, freed at detach. */
    uint32_t *collect_seen;      /* [max_tvars]: stamp of the last batch that emitted it */
    uint32_t collect_stamp;
    uint32_t *collect_owners;    /* [2 * max_procs]: the batch's owners, then their stamps */
    /* Process-private cache of named TVars' name blocks (tvar.c, name_block):
     * heap offset, 0 = not looked up yet.  A READY directory entry and its
     * name block never change, so an entry, once found, stays true.
     * Allocated at the first lookup, freed at detach. */
    uint64_t *name_off;          /* [max_tvars] */
    /* Process-local: this attachment's contexts (txn.c, "contexts").  A
     * context claims a process slot; shmstm_seg_detach releases the slots of
     * every context still linked here, so a context that Python lost (an
     * asynchronous exception between two bytecodes) never keeps a slot past
     * close.  ctx_lock guards ctx_head, the links and each linked context's
     * `gone` word against other threads (frees may run in any thread).  refs:
     * one for the attachment plus one per context (the struct outlives the
     * mapping while a context still points here); the last to drop it frees
     * the struct (faa_acq_rel: the frees' writes happen before). */
    pthread_mutex_t ctx_lock;
    struct shmstm_ctx *ctx_head;
    a32 refs;
    int detached;                /* under ctx_lock: no new context */
    /* Process-local, durable runtimes: the largest wv a context of this
     * attachment committed (ring_fill: a CAS loop, acq_rel; any thread of
     * the process).  Runtime.flush() and close() wait for flushed_wv to reach
     * it (shmstm_seg_last_wv, acquire). */
    a64 my_last_wv;
};

void seg_unref(struct shmstm_seg *s);        /* segment.c: drop one of s->refs */
void seg_release_ctxs(struct shmstm_seg *s); /* txn.c: detach's give-back, ctx_lock held */

/* The name block of named TVar idx (tvar.c): 0, or SHMSTM_ENOTFOUND /
 * SHMSTM_ECORRUPT / SHMSTM_ENOMEM. */
int name_block(struct shmstm_seg *s, uint32_t idx, const unsigned char **name, uint32_t *len);

struct rentry { uint32_t idx; uint32_t gen; uint64_t ver; };

struct shmstm_ctx {
    /* The fields up to `last` are visible to Python (shmstm.h cdef). */
    char *buf;               /* copy-out buffer (Python reads it) */
    uint32_t slot;
    uint32_t rs_n;           /* read-set length */
    int64_t out[2];          /* tx_readv's payload on a miss: inline word, heap length */
    int32_t last;            /* tx_readv's tag (>= 0) or error code on a miss */
    size_t buf_cap;
    struct shmstm_seg *seg;
    struct shm_proc *proc;   /* == &seg->procs[slot] */
    pid_t pid;
    int gone;                /* 0 while the context owns its slot; else the code every
                              * entry point returns: SHMSTM_EFORKED in a fork child
                              * (the slot is the parent's), SHMSTM_ECLOSED once
                              * shmstm_seg_detach released it.  Written under
                              * seg->ctx_lock (or by the owner before it is linked) */
    struct shmstm_ctx *next, *prev;   /* seg->ctx_head's list, under seg->ctx_lock */
    int linked;              /* on that list (under seg->ctx_lock) */
    int active;              /* an attempt is under way (rv valid) */
    int doomed;              /* a read failed: the attempt can only abort */
    int has_token;
    uint32_t failed_idx;     /* TVar that caused the last conflict (stats, errors) */
    uint64_t rv;
    uint64_t rv_hint;        /* a clock value that was current once: the last extend's,
                              * or this context's last wv.  A transaction starts from it
                              * instead of reading the clock (a cache line every commit
                              * writes); a read of a newer TVar extends, which reads it */
    struct rentry *rs;
    uint32_t rs_cap;
    uint32_t n_staged;
    uint64_t bytes_staged;
    int dsync;               /* durable runtimes: commit waits for flushed_wv >= wv */
    uint64_t last_wv;        /* durable runtimes: wv of the last writer commit */
    uint32_t inl_n;          /* durable: this commit's inline record (ring_prepare -> ring_fill) */
    struct ring_inl inl_e[RING_INL];
    struct shmstm_gil *gil;  /* non-NULL for the length of a call from shmstm._fast,
                              * which holds the GIL (fast.h); owning thread only */
    a32 interrupted;         /* process-local; set (seq_cst) by another thread's
                              * shmstm_ctx_interrupt, read (seq_cst) by the owning
                              * thread's retry wait (a Dekker pair with the slot's
                              * futex word, wait.c) and sync flush wait (ring_commit.c,
                              * polled every 50 ms); never cleared */
};

/* Drop the caller's GIL before a wait that can block or take long (fast.h):
 * once per call (sticky); the fast entry point re-takes it when the core
 * returns, so no Python code ever runs in between.  A no-op for calls
 * through cffi, which released the GIL already. */
static inline void ctx_gil_release(shmstm_ctx *c)
{
    struct shmstm_gil *g = c->gil;
    if (g && !g->released) {
        g->release(g);
        g->released = 1;
    }
}

/* proc.c */
#define PROC_UNKNOWN UINT64_MAX                 /* /proc could not be read: not "dead" */
uint64_t proc_start_time(pid_t pid);            /* 0 if gone or a zombie */
uint64_t proc_self_start(void);                 /* ours, or 0 (= "trust the pid") */
int      proc_alive(uint32_t pid, uint64_t start);
int      slot_owner_dead(struct shmstm_seg *s, uint32_t slot);
int      slot_recover(struct shmstm_seg *s, uint32_t slot);
int      lock_owner_gone(struct shmstm_seg *s, uint64_t lockword);
int      lock_repair_orphan(struct shmstm_seg *s, a64 *lk, uint64_t lockword);
/* FNV-1a, 64 bits: ring record and header checksums (not a defence
 * against an attacker: segments are 0600, owner-only). */
static inline uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* clock.c */
uint64_t now_ns(void);
uint64_t realtime_ns(void);
pid_t    my_tid(void);

/* heap.c */
int      heap_alloc(struct shmstm_seg *s, struct shm_proc *p, size_t len, uint64_t *off);
int      heap_alloc_raw(struct shmstm_seg *s, struct shm_proc *p, size_t len, uint64_t *off);
void     heap_free(struct shmstm_seg *s, struct shm_proc *p, uint64_t off);
int      heap_alloc_rec(struct shmstm_seg *s, struct shm_proc *p, size_t len, uint64_t *off);
void     heap_free_records(struct shmstm_seg *s, uint64_t *offs, const uint32_t *owners, uint32_t n);
int      heap_block_ok(struct shmstm_seg *s, uint64_t off, uint32_t *len);
struct shm_wentry *rec_entries(struct shmstm_seg *s, struct shm_commit_rec *r);
static inline struct shm_block *heap_block(struct shmstm_seg *s, uint64_t off)
{
    return (struct shm_block *)(s->heap + off);
}
static inline unsigned char *heap_payload(struct shmstm_seg *s, uint64_t off)
{
    return s->heap + off + sizeof(struct shm_block);
}
static inline uint64_t heap_class_size(uint32_t c) { return 32ull << c; }

/* tvar.c */
int  tvar_alloc(struct shmstm_seg *s, uint32_t *idx, uint32_t *gen);
void tvar_push_free(struct shmstm_seg *s, uint32_t idx);
static inline int tag_is_heap(uint32_t tag) { return tag >= TAG_HEAP_MIN && tag <= TAG_MAX; }

/* txn.c */
void ctx_reset(shmstm_ctx *c);
void free_staged(shmstm_ctx *c);
void release_token(shmstm_ctx *c);

/* ring_commit.c (durable runtimes only; every call is behind `if (s->ring_slots)`) */
void     ring_init(struct shmstm_seg *s, const shmstm_params *p);
int      ring_prepare(shmstm_ctx *c, struct shm_wentry *e, uint32_t n, uint64_t *rec);
int      ring_fill(shmstm_ctx *c, uint64_t wv, uint64_t rec);
void     ring_notify(shmstm_ctx *c);
void     ring_unwind(shmstm_ctx *c, uint64_t wv, uint64_t rec);
int      ring_after_commit(shmstm_ctx *c, uint64_t wv);
uint32_t ring_recover_decide(struct shmstm_seg *s, struct shm_commit_rec *r, uint32_t rst);
void     ring_recover_cleanup(struct shmstm_seg *s, struct shm_commit_rec *r, uint32_t rst);

/* wait.c */
int  futex_wait(a32 *addr, uint32_t val, int64_t timeout_ns);
void futex_wake(a32 *addr);
int  futex_wait_bits(a32 *addr, uint32_t val, int64_t timeout_ns, uint32_t bits);
void futex_wake_bits(a32 *addr, uint32_t bits);
void futex_wake_bits_n(a32 *addr, uint32_t bits, int n);
void wake_waiters(struct shmstm_seg *s, struct shm_tvar *t);
void clear_waiter_bits(struct shmstm_seg *s, uint32_t slot);  /* slot given up (wait.c) */

/* fault injection (debug builds only) */
#ifdef SHMSTM_DEBUG
void fault_point(const char *name);
int  fault_shake(void);
#define FAULT_POINT(n) fault_point(n)
#define FAULT_SHAKE()  fault_shake()     /* spurious validation failure (GHC's SHAKE) */
#else
#define FAULT_POINT(n) ((void)0)
#define FAULT_SHAKE()  0
#endif

#endif
