/* txn_cases.c -- transaction-level cases that need forged shared state.
 * Built and run by tests/native/test_native_liveness.py (same harness);
 * prints one "ok <case>" line per case, exits non-zero at the first failure.
 *
 *  conflicts_saturate  a TVar's advisory conflict counter counts a validation
 *                      abort, and one forged near UINT32_MAX stops below it
 *                      instead of wrapping to a small number */
#define _GNU_SOURCE
#include "cases.h"

/* ctx a reads the TVar, ctx b commits to it, then a's commit fails validation. */
static void one_conflict(shmstm_ctx *a, shmstm_ctx *b, uint32_t idx, uint32_t gen)
{
    int64_t v[2], w[2];                 /* read: out[0] the value, out[1] a heap length */
    CHECK(shmstm_tx_read(a, idx, gen, v) == SHMSTM_TAG_INT, "a reads");
    CHECK(shmstm_tx_read(b, idx, gen, w) == SHMSTM_TAG_INT, "b reads");
    CHECK(shmstm_tx_stage_i(b, idx, gen, SHMSTM_TAG_INT, w[0] + 1) == 0, "b stages");
    CHECK(shmstm_tx_commit(b) == 0, "b commits");
    CHECK(shmstm_tx_stage_i(a, idx, gen, SHMSTM_TAG_INT, v[0] + 1) == 0, "a stages");
    CHECK(shmstm_tx_commit(a) == SHMSTM_ECONFLICT, "a conflicts");
}

int main(void)
{
    shmstm_seg *s = case_segment("txncases");
    shmstm_ctx *a, *b;
    CHECK(shmstm_ctx_new(s, &a) == 0 && shmstm_ctx_new(s, &b) == 0, "contexts");
    uint32_t idx, gen;
    CHECK(shmstm_tvar_new(a, SHMSTM_TAG_INT, 0, 0, NULL, 0, &idx, &gen) == 0, "tvar");
    a32 *n = &s->tvars[idx].conflicts;

    one_conflict(a, b, idx, gen);
    CHECK(load_relaxed(n) == 1, "a validation abort counts one conflict");
    store_relaxed(n, UINT32_MAX - 1);
    for (int i = 0; i < 3; i++)
        one_conflict(a, b, idx, gen);
    CHECK(load_relaxed(n) == UINT32_MAX - 1, "a saturated counter stays, it does not wrap");
    printf("ok conflicts_saturate\n");

    shmstm_ctx_free(a);
    shmstm_ctx_free(b);
    case_done(s);
    return 0;
}
