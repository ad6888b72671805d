/* shmstm.h -- everything Python sees.  native/build_shmstm.py reads the part
 * between the CDEF markers as the cffi cdef, so this file is the one source of
 * truth for the C/Python boundary.  Inside the markers: only what cffi's
 * parser accepts (integer #defines, structs, prototypes).
 *
 * Conventions: functions are shmstm_<object>_<verb>; they return 0 (or a
 * non-negative result documented per function) on success and a negative
 * SHMSTM_E* code on failure.  Python maps codes to exceptions in one table
 * (shmstm/_core.py).
 */
#ifndef SHMSTM_H
#define SHMSTM_H
#include <stdint.h>
#include <stddef.h>

typedef struct shmstm_ctx shmstm_ctx;

/* The int64 that shmstm_peek / shmstm_tx_readv return for "not answered
 * here" (a TVar holding exactly this int takes the general path too). */
#define SHMSTM_READ_MISS INT64_MIN

/* CDEF BEGIN */
#define SHMSTM_OK            0
#define SHMSTM_ECONFLICT    -1   /* transaction must re-run */
#define SHMSTM_ESTALE       -2   /* handle names a freed or reused TVar */
#define SHMSTM_EBADHANDLE   -3   /* index out of range: a forged handle */
#define SHMSTM_ETOOLARGE    -4   /* value larger than max_value_size */
#define SHMSTM_EHEAPFULL    -5   /* value heap exhausted */
#define SHMSTM_ETVARSFULL   -6   /* TVar table exhausted */
#define SHMSTM_EPROCSFULL   -7   /* no free process slot */
#define SHMSTM_ELAYOUT      -8   /* segment of another layout version / bad magic */
#define SHMSTM_ECORRUPT     -9   /* header inconsistent (sizes, offsets) */
#define SHMSTM_EPERM        -10  /* segment owned by another user or mode not 0600 */
#define SHMSTM_EINIT        -11  /* segment never finished initialisation */
#define SHMSTM_ENOMEM       -12  /* process-local allocation failed */
#define SHMSTM_ETIMEOUT     -13  /* blocking wait timed out */
#define SHMSTM_EINTR        -14  /* blocking wait interrupted by a signal */
#define SHMSTM_EINVAL       -15  /* bad argument (size, tag, name length) */
#define SHMSTM_ESYS         -16  /* system call failed; errno kept */
#define SHMSTM_EFORKED      -17  /* context belongs to the parent of a fork */
#define SHMSTM_ENOSPC       -18  /* no room in /dev/shm at creation */
#define SHMSTM_EDIRFULL     -19  /* name directory full */
#define SHMSTM_ENOTFOUND    -20  /* lookup found nothing */
#define SHMSTM_EDUP         -21  /* a TVar staged twice in one commit */
#define SHMSTM_ENOFLUSHER   -22  /* durable: ring full and the flusher is dead (restart it) */
#define SHMSTM_EDURABLE     -23  /* durable: the flusher cannot write LMDB; commit refused */
#define SHMSTM_ELOST        -24  /* the TVar is locked for good: its commit died past its
                                    commit point with an unreadable record (proc.c R2b) */
#define SHMSTM_ECLOSED      -25  /* retry() wait ended: another thread closed the runtime */
#define SHMSTM_ENAMED       -26  /* a named TVar cannot be freed */
#define SHMSTM_EFOREIGN     -27  /* durable: another runtime writes (or wrote) the LMDB data */
#define SHMSTM_PENDING       1   /* durable sync commit: committed, durability wait unfinished */

#define SHMSTM_TAG_EMPTY   0
#define SHMSTM_TAG_NONE    1
#define SHMSTM_TAG_FALSE   2
#define SHMSTM_TAG_TRUE    3
#define SHMSTM_TAG_INT     4
#define SHMSTM_TAG_FLOAT   5
#define SHMSTM_TAG_BYTES   6
#define SHMSTM_TAG_STR     7
#define SHMSTM_TAG_PICKLE  8

#define SHMSTM_AB_LOCKED   0
#define SHMSTM_AB_VALIDATE 1
#define SHMSTM_AB_USER     2
#define SHMSTM_AB_STALE    3
#define SHMSTM_AB_RESOURCE 4
#define SHMSTM_AB_NREASONS 5
#define SHMSTM_HEAP_CLASSES 28
#define SHMSTM_LAT_BUCKETS 32
#define SHMSTM_MAX_NAME    400
#define SHMSTM_MAX_TVARS   16777216      /* limits a segment may have (segment.c) */
#define SHMSTM_MAX_PROCS   4096
#define SHMSTM_MIN_HEAP    65536
#define SHMSTM_MAX_HEAP    68719476736
#define SHMSTM_MAX_VALUE   1073741824
#define SHMSTM_HEAP_UNIT   16
/* open()'s defaults for a new segment. */
#define SHMSTM_DEFAULT_MAX_TVARS  65536
#define SHMSTM_DEFAULT_HEAP       67108864
#define SHMSTM_DEFAULT_MAX_PROCS  64
#define SHMSTM_DEFAULT_MAX_VALUE  1048576
/* A TVar handle, as the fast paths take it: (int64_t)(gen << 32 | idx). */
#define SHMSTM_HANDLE_GEN_SHIFT   32
#define SHMSTM_HANDLE_IDX_MASK    4294967295
#define SHMSTM_LAYOUT_VERSION_ 8
#define SHMSTM_LOST_OWNER 65535   /* a lock word's owner after a lost record (layout.h LK_LOST_OWNER) */

typedef struct {
    uint32_t max_tvars;
    uint32_t max_procs;
    uint32_t max_value_size;
    uint32_t dir_slots;
    uint64_t heap_size;
    uint32_t ring_slots;
    uint64_t seg_size;        /* out: computed total size */
    uint64_t created_ns;      /* out */
    uint32_t creator_pid;     /* out */
    uint32_t layout_version;  /* out */
    unsigned char runtime_id[16];  /* out; in too when use_runtime_id (durable create) */
    uint32_t use_runtime_id;  /* durable create: keep the runtime id of the LMDB data */
    uint64_t clock_start;     /* durable create: the clock (and flushed_wv) to start at */
} shmstm_params;

/* process-local handle on a mapped segment (opaque to Python) */
typedef struct shmstm_seg shmstm_seg;

/* process-local, per-thread transaction context; claims one process slot.
 * C sees the full struct (core.h); Python sees the fields below only. */
/* CDEF-ONLY
typedef struct {
    char *buf;
    uint32_t slot;
    uint32_t rs_n;
    int64_t out[2];
    int32_t last;
    ...;
} shmstm_ctx;
#define SHMSTM_READ_MISS ...
CDEF-ONLY */

typedef struct {
    uint32_t slot;
    uint32_t state;           /* 0 free, 1 active, 2 recovering */
    uint32_t pid;
    uint32_t rec_state;
    uint64_t start_time;
    uint64_t tid;
    uint64_t attach_ns;
    uint64_t commits;
    uint64_t ro_commits;
    uint64_t aborts[5];
    uint64_t retries;
    uint64_t wakeups;
    uint64_t bytes_committed;
    uint64_t irrevocable;
    uint64_t lat_hist[32];
    uint32_t alive;           /* kernel's answer: pid exists, same start time, not a zombie */
    uint32_t waiting;         /* currently sleeping in retry */
} shmstm_proc_info;

typedef struct {
    uint64_t clock;
    uint64_t seg_size;
    uint64_t heap_size;
    uint64_t heap_bump;
    uint32_t max_tvars;
    uint32_t max_procs;
    uint32_t max_value_size;
    uint32_t dir_slots;
    uint32_t tvar_bump;       /* TVar slots ever used */
    uint32_t tvars_live;      /* live TVars (a scan; advisory) */
    uint32_t names;           /* named TVars */
    uint32_t procs_active;
    uint64_t token;           /* irrevocable token holder (slot+1) or 0 */
    uint64_t flushed_wv;
    uint64_t created_ns;
    uint32_t creator_pid;
    uint32_t layout_version;
    uint64_t signature;
    int64_t class_blocks[28]; /* live blocks per size class (sum over slots) */
    uint64_t class_size[28];
    unsigned char runtime_id[16];
} shmstm_seg_info;

int shmstm_noop(void);
uint64_t shmstm_layout_signature(void);
const char *shmstm_build_info(void);

/* segment: fd from posix_ipc; the segment is mapped, fd may be closed after */
int shmstm_seg_create(int fd, shmstm_params *p, shmstm_seg **out);
int shmstm_seg_attach(int fd, int read_only, int64_t wait_ns, shmstm_params *p, shmstm_seg **out);
int shmstm_seg_detach(shmstm_seg *seg);
int shmstm_seg_repair_locks(shmstm_seg *seg);   /* at attach: dead and impossible owners' locks */
int shmstm_seg_info_get(shmstm_seg *seg, shmstm_seg_info *out);
int shmstm_seg_proc_info(shmstm_seg *seg, uint32_t slot, shmstm_proc_info *out);
int shmstm_seg_hot_tvars(shmstm_seg *seg, uint32_t *idx, uint32_t *gen, uint32_t *conflicts,
                         uint32_t n);
int shmstm_seg_waited(shmstm_seg *seg, uint32_t *idx, uint64_t *bits, uint32_t cap);
int shmstm_seg_name_of(shmstm_seg *seg, uint32_t idx, char *buf, uint32_t cap);
int shmstm_seg_named(shmstm_seg *seg, uint32_t *idx, uint32_t cap);   /* named TVars' indices */
int shmstm_seg_reclaim_dead(shmstm_seg *seg);
int shmstm_header_check(const unsigned char *hdr, uint64_t len, uint64_t file_size);
/* Every TVar whose lock word is locked now: its index and owner slot (the
 * first `cap` of them); returns how many are locked.  Reads only: usable on a
 * read-only mapping, takes no slot and no lock (crash tests, cleanup). */
int shmstm_seg_locked(shmstm_seg *seg, uint32_t *idx, uint32_t *owner, uint32_t cap);
/* A TVar's waiter bitmap (bit slot % 64), a relaxed snapshot: tests, stats. */
int shmstm_tvar_waiters(shmstm_seg *seg, uint32_t idx, uint64_t *out);

/* Fault injection (native/fault.c).  Debug builds: arm the kill point `point`
 * (NULL or "" disarms) to fire at its `countdown`-th hit, and set the delay
 * and shake chances; returns 0.  Release builds: SHMSTM_EINVAL, nothing set. */
int shmstm_fault_set(const char *point, int64_t countdown, int32_t delay_permille,
                     int32_t delay_max_us, int32_t shake_permille);

/* contexts */
int shmstm_ctx_new(shmstm_seg *seg, shmstm_ctx **out);
int shmstm_ctx_free(shmstm_ctx *c);       /* gives the slot back (unless gone), frees it */
int shmstm_seg_after_fork(shmstm_seg *seg); /* in a fork child: the contexts' slots are the parent's */

/* TVars */
int shmstm_tvar_new(shmstm_ctx *c, uint32_t tag, int64_t iv, double fv,
                    const char *buf, size_t len, uint32_t *out_idx, uint32_t *out_gen);
int shmstm_tvar_discard(shmstm_ctx *c, uint32_t idx, uint32_t gen);
int shmstm_tvar_lookup(shmstm_ctx *c, const char *name, size_t nlen,
                       uint32_t *out_idx, uint32_t *out_gen);
int shmstm_tvar_named(shmstm_ctx *c, const char *name, size_t nlen, uint32_t tag,
                      int64_t iv, double fv, const char *buf, size_t len,
                      uint32_t *out_idx, uint32_t *out_gen);
int shmstm_tvar_check(shmstm_ctx *c, uint32_t idx, uint32_t gen);

/* transactions: read returns the tag (>= 0) or a negative code.
 * out[0]: the inline payload (int64 or double bits), out[1]: heap value length
 * (bytes copied to c->buf). */
int shmstm_tx_read(shmstm_ctx *c, uint32_t idx, uint32_t gen, int64_t *out);
int shmstm_read1(shmstm_ctx *c, uint32_t idx, uint32_t gen, int64_t *out);
int shmstm_tx_stage_i(shmstm_ctx *c, uint32_t idx, uint32_t gen, uint32_t tag, int64_t v);
int shmstm_tx_stage_f(shmstm_ctx *c, uint32_t idx, uint32_t gen, double v);
int shmstm_tx_stage_b(shmstm_ctx *c, uint32_t idx, uint32_t gen, uint32_t tag,
                      const char *buf, size_t len);
int shmstm_tx_stage_free(shmstm_ctx *c, uint32_t idx, uint32_t gen);
int shmstm_tx_commit(shmstm_ctx *c);
int shmstm_tx_end_ro(shmstm_ctx *c);
int shmstm_tx_abort(shmstm_ctx *c, uint32_t reason);
int shmstm_tx_wait(shmstm_ctx *c, int64_t timeout_ns);
/* From another thread of the process (Runtime.close): make c's retry() wait,
 * now or next, return SHMSTM_ECLOSED, and its sync flush wait hand over to
 * Python (wait.c, ring_commit.c). */
int shmstm_ctx_interrupt(shmstm_ctx *c);
int shmstm_tx_irrevocable(shmstm_ctx *c, int64_t timeout_ns);
uint32_t shmstm_tx_failed_idx(shmstm_ctx *c);

/* The hot path (see txn.c, "fast paths"): reads name a TVar by its shmstm_ref,
 * writes by its handle (int64_t)(gen << 32 | idx); an int value comes back as
 * the return value.
 * SHMSTM_READ_MISS means "not answered here": Python takes the general path
 * (for tx_readv, the result is left in c->last / c->out / c->buf). */
typedef struct {
    shmstm_seg **segp;        /* the runtime's segment box: *segp is NULL while detached */
    uint32_t idx;
    uint32_t gen;
} shmstm_ref;                 /* process-local; one per Python TVar object */
int64_t shmstm_peek(const shmstm_ref *r);
int64_t shmstm_tx_readv(shmstm_ctx *c, const shmstm_ref *r);
int shmstm_tx_commit_ints(shmstm_ctx *c, const int64_t *pairs, uint32_t n);
int shmstm_tx_commit_1(shmstm_ctx *c, int64_t h, int64_t v);
int shmstm_tx_commit_2(shmstm_ctx *c, int64_t h1, int64_t v1, int64_t h2, int64_t v2);
/* The table of entry points shmstm._fast calls holding the GIL (fast.h). */
const void *shmstm_fast_table(void);

/* durability (native/ring_commit.c, native/ring_flush.c) */
typedef struct {
    uint32_t ring_slots;
    uint32_t ring_fill;       /* clock - flushed_wv: commits not yet in LMDB */
    uint64_t committed_wv;    /* the clock */
    uint64_t flushed_wv;
    uint32_t flusher_pid;
    uint32_t flusher_alive;
    uint64_t ring_full_waits; /* sum over every slot, free ones too (never reset) */
    uint64_t late_wakeups;    /* sync waits that saw their flush only at a re-check (same) */
    uint32_t durable_state;   /* SHMSTM_DS_LOADING until the creator loaded LMDB */
    int32_t durable_error;    /* 0, or the code of the flusher's last LMDB failure */
    uint32_t flusher_group;   /* 0, or SHMSTM_FG_WAIT / SHMSTM_FG_NOWAIT | SHMSTM_FG_FIXED */
} shmstm_ring_info;
#define SHMSTM_FG_WAIT   1  /* group commit waits for a group's stragglers */
#define SHMSTM_FG_NOWAIT 2  /* it writes what is in the ring at once */
#define SHMSTM_FG_FIXED  4  /* chosen by SHMSTM_FLUSH_GROUP, not measured */
/* The flusher states its group-commit choice (stats only). */
int shmstm_flusher_set_group(shmstm_seg *seg, uint32_t group);
#define SHMSTM_DS_LOADING 0
#define SHMSTM_DS_READY   1
int shmstm_ring_info_get(shmstm_seg *seg, shmstm_ring_info *out);
int shmstm_ring_set_ready(shmstm_seg *seg, const char *path, size_t len);
int shmstm_ring_path(shmstm_seg *seg, char *buf, uint32_t cap);
int shmstm_ring_ready(shmstm_seg *seg);
int shmstm_ring_wait(shmstm_seg *seg, uint64_t wv, int64_t timeout_ns);
/* shmstm_ring_collect's result, read by field (the flusher). */
typedef struct {
    uint64_t next_wv;         /* the next wv not collected */
    uint64_t used;            /* bytes of buf used */
    uint64_t entries;         /* entries in buf (each TVar once, its latest value) */
    uint64_t syncs;           /* sync commits among those collected (group commit) */
    uint32_t stop;            /* why it stopped: SHMSTM_COLLECT_* */
    uint32_t pad_;
} shmstm_collect_out;
#define SHMSTM_COLLECT_CLOCK   0   /* reached the clock */
#define SHMSTM_COLLECT_EMPTY   1   /* slot next_wv is still EMPTY */
#define SHMSTM_COLLECT_OWNER   2   /* its owner is between its fill and COMMITTED */
#define SHMSTM_COLLECT_FULL    3   /* the buffer or max_commits is full */
#define SHMSTM_COLLECT_CORRUPT 4   /* slot next_wv fails its checks: the next collect
                                      returns SHMSTM_ECORRUPT */
/* One entry of buf: then `len` payload bytes, padded to 8 (layout.h ring_ent). */
typedef struct {
    uint32_t idx;
    uint32_t tag;
    uint32_t len;
    uint32_t pad_;
} shmstm_collect_entry;
int shmstm_ring_collect(shmstm_seg *seg, uint64_t from_wv, uint32_t max_commits,
                        char *buf, uint64_t cap, shmstm_collect_out *out);
/* A collected batch as one LMDB log record (ring_flush.c): its length, or
 * SHMSTM_ETOOLARGE if longer than cap. */
int shmstm_ring_encode_log(shmstm_seg *seg, const char *in, uint64_t used, uint64_t n_entries,
                           char *out, uint64_t cap);
int shmstm_ring_void(shmstm_seg *seg, uint64_t wv);
int shmstm_ring_release(shmstm_seg *seg, uint64_t from_wv, uint64_t to_wv);
int shmstm_ring_set_error(shmstm_seg *seg, int32_t code);
int shmstm_ring_clear_error(shmstm_seg *seg);
int shmstm_flusher_claim(shmstm_seg *seg);
int shmstm_flusher_release(shmstm_seg *seg);
int shmstm_flusher_alive(shmstm_seg *seg);
int shmstm_flusher_holds(shmstm_seg *seg);
#define SHMSTM_FS_ANY  1    /* flusher_sleep: any commit wakes the flusher */
#define SHMSTM_FS_SYNC 2    /* only sync commits do (async ones wait for the nap) */
int shmstm_flusher_sleep(shmstm_seg *seg, uint64_t next_wv, int64_t timeout_ns, uint32_t wake_on);
/* Poll slot next_wv up to poll_ns without sleeping: 1 filled, 0 not (ring_flush.c). */
int shmstm_flusher_poll(shmstm_seg *seg, uint64_t next_wv, int64_t poll_ns);
uint32_t shmstm_ring_sync_fills(shmstm_seg *seg);
uint32_t shmstm_flusher_wait_sync(shmstm_seg *seg, uint32_t target, int64_t timeout_ns);
/* The same, polling (sched_yield) instead of sleeping (ring_flush.c). */
uint32_t shmstm_flusher_poll_sync(shmstm_seg *seg, uint32_t target, int64_t timeout_ns);
int shmstm_ctx_set_sync(shmstm_ctx *c, int sync);
uint64_t shmstm_ctx_last_wv(shmstm_ctx *c);
uint64_t shmstm_seg_last_wv(shmstm_seg *seg);   /* this process's last durable commit */
uint32_t shmstm_ring_default_slots(uint32_t max_procs);  /* ring_slots of a new durable segment */
/* CDEF END */

#endif
