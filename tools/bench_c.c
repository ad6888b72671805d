/* bench_c.c -- the C core's own cost per operation, without Python or cffi.
 *
 * Build and run from the repository root (one process, one segment
 * /shmstm-bench-c-<pid> created and removed):
 *
 *   gcc -std=c11 -O2 -Inative -DSHMSTM_PKG_VERSION='"bench"' tools/bench_c.c \
 *       $(find native -name '*.c' ! -name pyfast.c) -o /tmp/bench_c && /tmp/bench_c
 *
 * (every C file of the core: all of native's but the CPython module
 * pyfast.c; tests/test_tools_bench.py builds it the same way.)
 *
 * It calls the same entry points the Python hot path calls (shmstm_peek,
 * shmstm_tx_readv, shmstm_tx_commit_1/_2), so the difference between these
 * figures and tools/bench's is the interpreter's and cffi's share. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int64_t handle(uint32_t idx, uint32_t gen) { return (int64_t)((uint64_t)gen << 32 | idx); }

#define TIME(label, ...)                                                    \
    do {                                                                    \
        double best = 1e9;                                                  \
        for (int rep = 0; rep < 5; rep++) {                                 \
            double t0 = now();                                              \
            for (int i = 0; i < N; i++) { __VA_ARGS__; }                         \
            double t = (now() - t0) / N;                                    \
            if (t < best) best = t;                                         \
        }                                                                   \
        printf("%-40s %7.1f ns\n", label, best * 1e9);                      \
    } while (0)

int main(void)
{
    char name[64];
    snprintf(name, sizeof name, "/shmstm-bench-c-%d", (int)getpid());
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) { perror("shm_open"); return 1; }
    shmstm_params p = {0};
    p.max_tvars = 1024; p.max_procs = 8; p.max_value_size = 4096; p.heap_size = 1 << 20;
    shmstm_seg *s;
    shmstm_ctx *c;
    int rc = shmstm_seg_create(fd, &p, &s);
    close(fd);
    if (rc == 0)
        rc = shmstm_ctx_new(s, &c);
    if (rc) { fprintf(stderr, "setup failed: %d\n", rc); shm_unlink(name); return 1; }
    uint32_t idx[2], gen[2];
    for (int i = 0; i < 2; i++)
        if ((rc = shmstm_tvar_new(c, SHMSTM_TAG_INT, 1000, 0, NULL, 0, &idx[i], &gen[i]))) {
            fprintf(stderr, "tvar_new failed: %d\n", rc); shm_unlink(name); return 1;
        }
    shmstm_ref a = {&s, idx[0], gen[0]}, b = {&s, idx[1], gen[1]};
    int64_t ha = handle(idx[0], gen[0]), hb = handle(idx[1], gen[1]);
    const int N = 1000000;
    volatile int64_t sink = 0;
    TIME("peek (read outside a transaction)", sink += shmstm_peek(&a));
    TIME("read-only transaction, 1 read", { sink += shmstm_tx_readv(c, &a); shmstm_tx_commit(c); });
    TIME("increment (1 read, 1 write)", { int64_t v = shmstm_tx_readv(c, &a); shmstm_tx_commit_1(c, ha, v + 1); });
    TIME("bank transfer (2 reads, 2 writes)", {
        int64_t x = shmstm_tx_readv(c, &a);
        int64_t y = shmstm_tx_readv(c, &b);
        shmstm_tx_commit_2(c, ha, x - 1, hb, y + 1);
    });
    (void)sink;
    shmstm_ctx_free(c);
    shmstm_seg_detach(s);
    shm_unlink(name);
    return 0;
}
