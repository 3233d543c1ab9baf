/* The data loader. Token i of the test files has value i (mod the vocab),
 * so every input row tells which window it came from: window w starts at
 * token w*T. The expected batches come from loader_fill, which is checked
 * separately against those direct expectations. */
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/loader.h"
#include "data/tokfile.h"
#include "io/fileio.h"
#include "ops/ops.h"
#include "util/common.h"

static char *g_dir;
static tlm_tokfile g_f; /* T=8: 50 windows */
enum { T = 8, NWIN = 50 };

static int setup(void **state) {
    (void)state;
    g_dir = test_tmpdir();
    if (!g_dir) return -1;
    char path[1024];
    path_join(path, sizeof path, g_dir, "train.bin");
    uint64_t n = NWIN * T + 1 + 5; /* 5 spare tokens: not enough for a 51st window */
    int32_t *tok = malloc(n * sizeof *tok);
    for (uint64_t i = 0; i < n; i++) tok[i] = (int32_t)i;
    int rc = tokfile_write(path, tok, n, 1000, 1);
    free(tok);
    if (rc != 0 || tokfile_open(&g_f, path) != 0) return -1;
    return 0;
}

static int teardown(void **state) {
    (void)state;
    tokfile_close(&g_f);
    test_rmtree(g_dir);
    free(g_dir);
    return 0;
}

/* Checks rows are whole windows with targets shifted by one; returns the
 * window index of row b. */
static int row_window(const int32_t *in, const int32_t *tg, int b) {
    const int32_t *x = in + b * T, *y = tg + b * T;
    assert_int_equal(x[0] % T, 0);
    for (int t = 0; t < T; t++) {
        assert_int_equal(x[t], x[0] + t);
        assert_int_equal(y[t], x[0] + t + 1);
    }
    return x[0] / T;
}

static void test_counts_and_small_file(void **state) {
    (void)state;
    tlm_loader *l = loader_create(&g_f, 4, T, 1, 0, 1, NULL);
    assert_non_null(l);
    assert_int_equal(loader_windows(l), NWIN);
    assert_int_equal(loader_batches_per_epoch(l), NWIN / 4);
    assert_int_equal(loader_pinned(l), 0);
    loader_destroy(l);
    /* Exactly enough windows for one batch works; one more row does not. */
    l = loader_create(&g_f, NWIN, T, 1, 1, 2, NULL);
    assert_non_null(l);
    assert_int_equal(loader_batches_per_epoch(l), 1);
    loader_destroy(l);
    assert_null(loader_create(&g_f, NWIN + 1, T, 1, 1, 2, NULL));
    assert_non_null(strstr(tlm_last_error(), g_f.path));
    assert_non_null(strstr(tlm_last_error(), "--batch/--context"));
    /* Longer context: (count-1)/T windows. */
    assert_null(loader_create(&g_f, 2, (int)g_f.count, 1, 0, 1, NULL));
    l = loader_create(&g_f, 1, (int)g_f.count - 1, 1, 0, 1, NULL);
    assert_non_null(l);
    assert_int_equal(loader_windows(l), 1);
    loader_destroy(l);
    assert_null(loader_create(&g_f, 0, T, 1, 0, 1, NULL));
    assert_null(loader_create(&g_f, 1, T, 1, 0, 0, NULL));
}

static void test_fill_in_order(void **state) {
    (void)state;
    int32_t in[5 * T], tg[5 * T];
    for (uint64_t k = 0; k < NWIN / 5; k++) {
        loader_fill(&g_f, 5, T, 99, 3, k, 0, in, tg);
        for (int b = 0; b < 5; b++) assert_int_equal(row_window(in, tg, b), (int)(k * 5 + b));
    }
}

/* Window order of one epoch through loader_fill with batch B. */
static void epoch_order(int B, uint64_t seed, uint64_t epoch, int *order) {
    int32_t in[NWIN * T], tg[NWIN * T];
    for (int k = 0; k < NWIN / B; k++) {
        loader_fill(&g_f, B, T, seed, epoch, (uint64_t)k, 1, in, tg);
        for (int b = 0; b < B; b++) order[k * B + b] = row_window(in, tg, b);
    }
}

static void test_each_window_once(void **state) {
    (void)state;
    int order[NWIN], seen[NWIN];
    for (uint64_t e = 0; e < 4; e++) {
        epoch_order(5, 1234, e, order); /* 10 batches cover all 50 */
        memset(seen, 0, sizeof seen);
        for (int i = 0; i < NWIN; i++) seen[order[i]]++;
        for (int w = 0; w < NWIN; w++) assert_int_equal(seen[w], 1);
        /* A partial last batch is dropped: 48 of 50 visited, none twice. */
        epoch_order(4, 1234, e, order);
        memset(seen, 0, sizeof seen);
        for (int i = 0; i < 48; i++) seen[order[i]]++;
        for (int w = 0; w < NWIN; w++) assert_true(seen[w] <= 1);
    }
}

static void test_orders_differ(void **state) {
    (void)state;
    int a[NWIN], b[NWIN], c[NWIN], d[NWIN];
    epoch_order(5, 7, 0, a);
    epoch_order(5, 7, 1, b);
    epoch_order(5, 8, 0, c);
    epoch_order(5, 7, 0, d);
    assert_memory_equal(a, d, sizeof a); /* deterministic */
    int same_ab = 0, same_ac = 0, fixed = 0;
    for (int i = 0; i < NWIN; i++) {
        same_ab += a[i] == b[i];
        same_ac += a[i] == c[i];
        fixed += a[i] == i;
    }
    /* A random permutation agrees with another in ~1 place; allow slack. */
    assert_true(same_ab < NWIN / 2);
    assert_true(same_ac < NWIN / 2);
    assert_true(fixed < NWIN / 2);
}

/* The permutation is a bijection for awkward window counts (domains that
 * are and are not powers of four), including 1. */
static void test_bijection_sizes(void **state) {
    (void)state;
    const uint64_t sizes[] = {1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1000, 4097};
    uint16_t *toks = malloc(4098 * sizeof *toks);
    for (int i = 0; i < 4098; i++) toks[i] = (uint16_t)i;
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        uint64_t W = sizes[s];
        tlm_tokfile f = {.vocab = 65536, .token_bytes = 2, .count = W + 1, .tokens = toks};
        int32_t *in = malloc(W * sizeof *in), *tg = malloc(W * sizeof *tg);
        char *seen = calloc(W, 1);
        loader_fill(&f, (int)W, 1, 42, 5, 0, 1, in, tg); /* the whole epoch as one batch */
        for (uint64_t i = 0; i < W; i++) {
            assert_true(in[i] >= 0 && (uint64_t)in[i] < W);
            assert_int_equal(tg[i], in[i] + 1);
            assert_int_equal(seen[in[i]], 0);
            seen[in[i]] = 1;
        }
        free(in);
        free(tg);
        free(seen);
    }
    /* 4-byte tokens take the other copy path. */
    uint32_t wide[9];
    for (int i = 0; i < 9; i++) wide[i] = 100000u + (uint32_t)i;
    tlm_tokfile f = {.vocab = 200000, .token_bytes = 4, .count = 9, .tokens = wide};
    int32_t in[8], tg[8];
    loader_fill(&f, 2, 4, 0, 0, 0, 0, in, tg);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(in[i], 100000 + i);
        assert_int_equal(tg[i], 100001 + i);
    }
    free(toks);
}

/* A host allocator that counts live blocks and claims page-locked memory,
 * to check the ring records `pinned` and frees everything it takes. */
static int g_live;
static void *stub_host_alloc(tlm_ops *o, size_t bytes, int *pinned) {
    (void)o;
    g_live++;
    *pinned = 1;
    return tlm_alloc(bytes);
}
static void stub_host_free(tlm_ops *o, void *p, int pinned) {
    (void)o;
    assert_int_equal(pinned, 1);
    g_live--;
    tlm_free(p);
}

static tlm_ops *make_ops(void) {
    tlm_ops *o = cpu_ops_create(1);
    assert_non_null(o);
    return o;
}

static void test_same_batches_any_workers(void **state) {
    (void)state;
    enum { B = 4, NB = 30 }; /* 12 batches per epoch: crosses two epoch ends */
    static int32_t ref_in[NB][B * T], ref_tg[NB][B * T];
    for (int k = 0; k < NB; k++)
        loader_fill(&g_f, B, T, 77, (uint64_t)(k / 12), (uint64_t)(k % 12), 1, ref_in[k], ref_tg[k]);
    tlm_ops *ops = make_ops();
    const int workers[] = {0, 1, 2, 4};
    for (int wi = 0; wi < 4; wi++) {
        for (int p = 1; p <= 4; p++) {
            for (int hold = 1; hold <= p; hold += p - 1 > 0 ? p - 1 : 1) {
                tlm_loader *l = loader_create(&g_f, B, T, 77, workers[wi], p, ops);
                assert_non_null(l);
                tlm_batch held[4];
                int nheld = 0;
                for (int k = 0; k < NB; k++) {
                    uint64_t e, i;
                    loader_tell(l, &e, &i);
                    assert_int_equal(e, k / 12);
                    assert_int_equal(i, k % 12);
                    tlm_batch b;
                    assert_int_equal(loader_next(l, &b), 0);
                    assert_int_equal(b.epoch, k / 12);
                    assert_int_equal(b.index, k % 12);
                    assert_memory_equal(b.inputs, ref_in[k], sizeof ref_in[k]);
                    assert_memory_equal(b.targets, ref_tg[k], sizeof ref_tg[k]);
                    /* Keep up to `hold` batches at once, as a trainer with
                     * asynchronous copies would. */
                    held[nheld++] = b;
                    if (nheld == hold) {
                        for (int h = 0; h < nheld; h++) loader_release(l, &held[h]);
                        nheld = 0;
                    }
                }
                loader_destroy(l); /* with nheld batches outstanding */
            }
        }
    }
    ops_destroy(ops);
}

static void test_all_held_is_an_error(void **state) {
    (void)state;
    for (int w = 0; w <= 2; w += 2) {
        tlm_loader *l = loader_create(&g_f, 2, T, 5, w, 2, NULL);
        tlm_batch a, b, c;
        assert_int_equal(loader_next(l, &a), 0);
        assert_int_equal(loader_next(l, &b), 0);
        assert_int_equal(loader_next(l, &c), -1);
        assert_non_null(strstr(tlm_last_error(), "loader_release"));
        loader_release(l, &a);
        assert_int_equal(loader_next(l, &c), 0);
        assert_int_equal(c.index, 2);
        loader_release(l, &b);
        loader_release(l, &c);
        loader_destroy(l);
    }
}

static void test_seek_resume(void **state) {
    (void)state;
    enum { B = 4 };
    tlm_ops *ops = make_ops();
    tlm_loader *a = loader_create(&g_f, B, T, 2024, 2, 3, ops);
    tlm_batch bt;
    for (int k = 0; k < 17; k++) {
        assert_int_equal(loader_next(a, &bt), 0);
        loader_release(a, &bt);
    }
    uint64_t e, i;
    loader_tell(a, &e, &i);
    assert_int_equal(e, 1);
    assert_int_equal(i, 5);
    /* A fresh loader (other worker count) resumed at the told position
     * continues exactly like the original. */
    tlm_loader *b = loader_create(&g_f, B, T, 2024, 1, 2, ops);
    assert_int_equal(loader_seek(b, e, i), 0);
    for (int k = 0; k < 15; k++) {
        tlm_batch x, y;
        assert_int_equal(loader_next(a, &x), 0);
        assert_int_equal(loader_next(b, &y), 0);
        assert_int_equal(x.epoch, y.epoch);
        assert_int_equal(x.index, y.index);
        assert_memory_equal(x.inputs, y.inputs, B * T * sizeof(int32_t));
        assert_memory_equal(x.targets, y.targets, B * T * sizeof(int32_t));
        loader_release(a, &x);
        loader_release(b, &y);
    }
    /* Seeking back drops prefetched batches and restarts deterministically. */
    int32_t in[B * T], tg[B * T];
    for (int rep = 0; rep < 3; rep++) {
        assert_int_equal(loader_seek(a, 0, 3), 0);
        loader_tell(a, &e, &i);
        assert_int_equal(e, 0);
        assert_int_equal(i, 3);
        for (int k = 3; k < 6; k++) {
            assert_int_equal(loader_next(a, &bt), 0);
            loader_fill(&g_f, B, T, 2024, 0, (uint64_t)k, 1, in, tg);
            assert_int_equal(bt.index, k);
            assert_memory_equal(bt.inputs, in, sizeof in);
            loader_release(a, &bt);
        }
    }
    /* An index past the end of the epoch carries into the next one. */
    assert_int_equal(loader_seek(a, 0, 13), 0);
    loader_tell(a, &e, &i);
    assert_int_equal(e, 1);
    assert_int_equal(i, 1);
    assert_int_equal(loader_next(a, &bt), 0);
    loader_fill(&g_f, B, T, 2024, 1, 1, 1, in, tg);
    assert_memory_equal(bt.inputs, in, sizeof in);
    /* Seeking while a batch is held, then releasing it, still works. */
    assert_int_equal(loader_seek(a, 2, 0), 0);
    loader_release(a, &bt);
    assert_int_equal(loader_next(a, &bt), 0);
    loader_fill(&g_f, B, T, 2024, 2, 0, 1, in, tg);
    assert_memory_equal(bt.inputs, in, sizeof in);
    loader_release(a, &bt);
    loader_destroy(a);
    loader_destroy(b);
    ops_destroy(ops);
}

static void test_ring_memory(void **state) {
    (void)state;
    tlm_ops stub;
    memset(&stub, 0, sizeof stub);
    stub.name = "stub";
    stub.host_alloc = stub_host_alloc;
    stub.host_free = stub_host_free;
    g_live = 0;
    tlm_loader *l = loader_create(&g_f, 3, T, 1, 3, 4, &stub);
    assert_non_null(l);
    assert_int_equal(g_live, 4);
    assert_int_equal(loader_pinned(l), 1);
    tlm_batch b;
    assert_int_equal(loader_next(l, &b), 0);
    loader_destroy(l); /* batch still held, workers busy prefetching */
    assert_int_equal(g_live, 0);
    /* Destroy right after create, before workers did anything. */
    l = loader_create(&g_f, 3, T, 1, 4, 1, &stub);
    loader_destroy(l);
    assert_int_equal(g_live, 0);
    /* The real CPU backend reports what it gave. */
    tlm_ops *ops = make_ops();
    l = loader_create(&g_f, 3, T, 1, 1, 2, ops);
    int pinned = -1;
    void *p = ops->host_alloc(ops, 64, &pinned);
    ops->host_free(ops, p, pinned);
    assert_int_equal(loader_pinned(l), pinned);
    loader_destroy(l);
    ops_destroy(ops);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counts_and_small_file),
        cmocka_unit_test(test_fill_in_order),
        cmocka_unit_test(test_each_window_once),
        cmocka_unit_test(test_orders_differ),
        cmocka_unit_test(test_bijection_sizes),
        cmocka_unit_test(test_same_batches_any_workers),
        cmocka_unit_test(test_all_held_is_an_error),
        cmocka_unit_test(test_seek_resume),
        cmocka_unit_test(test_ring_memory),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
