/* atomics.h -- the only file that includes <stdatomic.h>.
 *
 * Every access to shared memory goes through these wrappers so that each one
 * names its memory order at the call site.  Never use `volatile` as
 * synchronisation.  Build with -DSHMSTM_SEQ_CST to make every order seq_cst
 * (TinySTM's SAFE mode): a debugging aid when an ordering bug is suspected.
 */
#ifndef SHMSTM_ATOMICS_H
#define SHMSTM_ATOMICS_H

#include <stdatomic.h>
#include <stdint.h>

#ifdef SHMSTM_SEQ_CST
#define SHMSTM_MO(o) memory_order_seq_cst
#else
#define SHMSTM_MO(o) (o)
#endif

typedef _Atomic uint64_t a64;
typedef _Atomic uint32_t a32;

#define load_relaxed(p)      atomic_load_explicit((p), SHMSTM_MO(memory_order_relaxed))
#define load_acquire(p)      atomic_load_explicit((p), SHMSTM_MO(memory_order_acquire))
#define load_seq_cst(p)      atomic_load_explicit((p), memory_order_seq_cst)
#define store_relaxed(p, v)  atomic_store_explicit((p), (v), SHMSTM_MO(memory_order_relaxed))
#define store_release(p, v)  atomic_store_explicit((p), (v), SHMSTM_MO(memory_order_release))
#define store_seq_cst(p, v)  atomic_store_explicit((p), (v), memory_order_seq_cst)
#define xchg_acq_rel(p, v)   atomic_exchange_explicit((p), (v), SHMSTM_MO(memory_order_acq_rel))
#define xchg_seq_cst(p, v)   atomic_exchange_explicit((p), (v), memory_order_seq_cst)
#define faa_relaxed(p, v)    atomic_fetch_add_explicit((p), (v), SHMSTM_MO(memory_order_relaxed))
#define faa_acq_rel(p, v)    atomic_fetch_add_explicit((p), (v), SHMSTM_MO(memory_order_acq_rel))
#define faa_seq_cst(p, v)    atomic_fetch_add_explicit((p), (v), memory_order_seq_cst)
#define for_acq_rel(p, v)    atomic_fetch_or_explicit((p), (v), SHMSTM_MO(memory_order_acq_rel))
#define fand_acq_rel(p, v)   atomic_fetch_and_explicit((p), (v), SHMSTM_MO(memory_order_acq_rel))
#define fence_acquire()      atomic_thread_fence(SHMSTM_MO(memory_order_acquire))
#define fence_release()      atomic_thread_fence(SHMSTM_MO(memory_order_release))
#define fence_seq_cst()      atomic_thread_fence(memory_order_seq_cst)

/* Strong CAS; on failure *expected is updated with the current value. */
#define cas_acq_rel(p, expected, desired)                                    \
    atomic_compare_exchange_strong_explicit((p), (expected), (desired),      \
        SHMSTM_MO(memory_order_acq_rel), SHMSTM_MO(memory_order_acquire))
#define cas_acquire(p, expected, desired)                                    \
    atomic_compare_exchange_strong_explicit((p), (expected), (desired),      \
        SHMSTM_MO(memory_order_acquire), SHMSTM_MO(memory_order_relaxed))

/* Owner-only counter bump: a single writer, so load+store is enough; relaxed
 * because readers (the stats tool) only need an eventually-current value. */
#define counter_add(p, v)    store_relaxed((p), load_relaxed(p) + (v))

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

#endif
