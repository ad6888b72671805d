/* heap_cases.c -- the heap's invariants that a Python test cannot see.
 * Built and run by tests/native/test_native_liveness.py (same harness);
 * prints one "ok <case>" line per case, exits non-zero at the first failure.
 *
 *  line_aligned      blocks of 64 bytes and more start on a cache line, also
 *                    right after a 32-byte block; a ring record of one inline
 *                    value takes exactly one 64-byte block
 *  owner_lists       record blocks freed for slot 1 go to slot 1's list, come
 *                    back to slot 1's allocations (one chain, LIFO), and are
 *                    not taken by slot 2 while the heap has fresh memory
 *  full_heap_steals  with the bump pointer used up, any allocation (a record of
 *                    slot 2, a plain value) takes the free record blocks of
 *                    another slot; only then is the heap full */
#define _GNU_SOURCE
#include "cases.h"

/* A free-list head packs (ABA tag << 32 | unit offset): empty is offset 0. */
static int list_empty(a64 *head) { return (load_relaxed(head) & 0xffffffffull) == 0; }

/* The payload size that makes a block of exactly `block` bytes. */
static size_t payload_for(size_t block) { return block - sizeof(struct shm_block); }

int main(void)
{
    shmstm_seg *s = case_segment("heapcases");
    struct shm_proc *p1 = &s->procs[1], *p2 = &s->procs[2];

    /* line_aligned */
    uint64_t small, a, b;
    CHECK(heap_alloc_raw(s, NULL, payload_for(32), &small) == 0, "32-byte block");
    CHECK(heap_alloc_rec(s, p1, payload_for(64), &a) == 0, "64-byte record block");
    CHECK(heap_alloc_raw(s, NULL, payload_for(128), &b) == 0, "128-byte block");
    CHECK(a % 64 == 0 && b % 64 == 0, "blocks of a line or more start on a line");
    CHECK(sizeof(struct shm_block) + sizeof(struct ring_rec) + sizeof(struct ring_ent) + 8 == 64,
          "a record of one inline value is one 64-byte block");
    printf("ok line_aligned\n");

    /* owner_lists: three record blocks of slot 1, freed together */
    uint64_t r[3];
    uint32_t own[3] = {1, 1, 1};
    for (int i = 0; i < 3; i++)
        CHECK(heap_alloc_rec(s, p1, payload_for(64), &r[i]) == 0, "record block");
    uint64_t offs[3] = {r[0], r[1], r[2]};
    heap_free_records(s, offs, own, 3);
    CHECK(!list_empty(&p1->rec_free[1]) && list_empty(&p2->rec_free[1]),
          "freed to the owner's list");
    uint64_t other;
    CHECK(heap_alloc_rec(s, p2, payload_for(64), &other) == 0, "slot 2's record");
    CHECK(other != r[0] && other != r[1] && other != r[2], "slot 2 takes fresh memory, not slot 1's");
    uint64_t back[3];
    for (int i = 0; i < 3; i++)
        CHECK(heap_alloc_rec(s, p1, payload_for(64), &back[i]) == 0, "slot 1 again");
    CHECK(back[0] == r[0] && back[1] == r[1] && back[2] == r[2], "slot 1 gets its blocks back in order");
    CHECK(list_empty(&p1->rec_free[1]), "slot 1's list is empty again");
    printf("ok owner_lists\n");

    /* full_heap_steals: give slot 1 two free record blocks, use up the bump */
    own[0] = own[1] = 1;
    offs[0] = back[0];
    offs[1] = back[1];
    heap_free_records(s, offs, own, 2);
    uint64_t x;
    while (heap_alloc_raw(s, NULL, payload_for(4096), &x) == 0)
        ;
    while (heap_alloc_raw(s, NULL, payload_for(32), &x) == 0)
        ;
    uint64_t bump = load_relaxed(&s->h->heap_bump);
    CHECK(s->heap_size - bump < 64, "the bump pointer is used up");
    uint64_t got1, got2, none;
    CHECK(heap_alloc_rec(s, p2, payload_for(64), &got1) == 0, "slot 2's record from slot 1's list");
    CHECK(heap_alloc_raw(s, NULL, payload_for(64), &got2) == 0, "a plain block from slot 1's list");
    CHECK((got1 == back[0] || got1 == back[1]) && (got2 == back[0] || got2 == back[1]) && got1 != got2,
          "the blocks taken are slot 1's");
    CHECK(heap_alloc_raw(s, NULL, payload_for(64), &none) == SHMSTM_EHEAPFULL, "then the heap is full");
    printf("ok full_heap_steals\n");

    case_done(s);
    return 0;
}
