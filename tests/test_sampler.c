/* The sampler against hand-computed distributions: greedy, temperature,
 * top-k, top-p, their combination, and reproducibility. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "infer/infer.h"


static const float k_logits[10] = {2.0f, 1.5f, 1.0f, 0.5f, 0.0f, -0.5f, -1.0f, 1.2f, 0.3f, -2.0f};

/* ---- the reference: softmax(l/T), top-k, nucleus, in double ------------ */

typedef struct {
    double p;
    int id;
} ref_item;

static int ref_cmp(const void *a, const void *b) {
    const ref_item *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id - y->id;
}

/* expect[V] = the distribution the sampler should draw from. */
static void reference_dist(const float *lg, int V, double T, int top_k, double top_p, double *expect) {
    ref_item *it = malloc((size_t)V * sizeof *it);
    double mx = -INFINITY;
    for (int i = 0; i < V; i++) mx = fmax(mx, lg[i]);
    double z = 0;
    for (int i = 0; i < V; i++) {
        it[i].p = exp((lg[i] - mx) / T);
        it[i].id = i;
        z += it[i].p;
    }
    for (int i = 0; i < V; i++) it[i].p /= z;
    qsort(it, (size_t)V, sizeof *it, ref_cmp);
    int keep = (top_k > 0 && top_k < V) ? top_k : V;
    double zk = 0;
    for (int i = 0; i < keep; i++) zk += it[i].p;
    for (int i = 0; i < keep; i++) it[i].p /= zk;
    if (top_p < 1.0) {
        double cum = 0;
        int m = 0;
        while (m < keep) {
            cum += it[m++].p;
            if (cum >= top_p) break;
        }
        keep = m;
    }
    double zp = 0;
    for (int i = 0; i < keep; i++) zp += it[i].p;
    for (int i = 0; i < V; i++) expect[i] = 0;
    for (int i = 0; i < keep; i++) expect[it[i].id] = it[i].p / zp;
    free(it);
}

/* Draw n times; assert no draw outside the support and a chi-square
 * statistic within a generous bound for its degrees of freedom. */
static void check_distribution_n(const float *lg, int V, float T, int top_k, float top_p, uint64_t seed, int n) {
    double *expect = malloc((size_t)V * sizeof *expect);
    long *count = calloc((size_t)V, sizeof *count);
    reference_dist(lg, V, T, top_k, top_p, expect);
    tlm_sampler s;
    tlm_sampler_params p = {.temperature = T, .top_k = top_k, .top_p = top_p};
    assert_int_equal(sampler_init(&s, V, &p), 0);
    tlm_rng r;
    tlm_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        int32_t t = sampler_sample(&s, lg, &r);
        assert_true(t >= 0 && t < V);
        count[t]++;
    }
    double chi2 = 0;
    int support = 0;
    for (int i = 0; i < V; i++) {
        if (expect[i] == 0) {
            if (count[i] != 0)
                fail_msg("T=%g k=%d p=%g: token %d drawn %ld times but lies outside the kept set", T, top_k,
                         top_p, i, count[i]);
            continue;
        }
        support++;
        double e = expect[i] * n;
        chi2 += (count[i] - e) * (count[i] - e) / e;
    }
    int df = support - 1;
    /* mean df, sd sqrt(2 df): 6 sd plus slack keeps false alarms nil while
     * a wrong temperature or renormalisation lands far beyond it. */
    double bound = df + 6.0 * sqrt(2.0 * (df > 0 ? df : 1)) + 10.0;
    if (!(chi2 <= bound)) fail_msg("T=%g k=%d p=%g: chi2 %.1f over %d dof exceeds %.1f", T, top_k, top_p, chi2, df, bound);
    sampler_free(&s);
    free(expect);
    free(count);
}

/* 100k draws for small vocabularies; large ones cost O(V) per draw. */
static void check_distribution(const float *lg, int V, float T, int top_k, float top_p, uint64_t seed) {
    check_distribution_n(lg, V, T, top_k, top_p, seed, V > 100 ? 20000 : 100000);
}

static void fill_random_logits(float *lg, int V, uint64_t seed, float scale) {
    tlm_rng r;
    tlm_rng_seed(&r, seed);
    for (int i = 0; i < V; i++) lg[i] = scale * tlm_rng_normal(&r);
}

/* ---- tests ------------------------------------------------------------- */

static void test_greedy_is_argmax(void **state) {
    (void)state;
    enum { V = 1000 };
    float lg[V];
    tlm_sampler s;
    tlm_sampler_params greedy = {.temperature = 0.0f, .top_k = 0, .top_p = 0.9f};
    assert_int_equal(sampler_init(&s, V, &greedy), 0);
    for (int trial = 0; trial < 20; trial++) {
        fill_random_logits(lg, V, 100 + trial, 3.0f);
        int best = 0;
        for (int i = 1; i < V; i++)
            if (lg[i] > lg[best]) best = i;
        tlm_rng r, r0;
        tlm_rng_seed(&r, 7);
        r0 = r;
        assert_int_equal(sampler_sample(&s, lg, &r), best);
        assert_int_equal(sampler_argmax(lg, V), best);
        /* greedy consumes no randomness */
        assert_memory_equal(&r, &r0, sizeof r);
    }
    /* ties go to the lowest id */
    for (int i = 0; i < V; i++) lg[i] = 0.0f;
    lg[17] = lg[400] = 1.0f;
    tlm_rng r;
    tlm_rng_seed(&r, 1);
    assert_int_equal(sampler_sample(&s, lg, &r), 17);
    sampler_free(&s);
}

static void test_top_k_one_is_greedy(void **state) {
    (void)state;
    enum { V = 777 };
    float lg[V];
    tlm_sampler s;
    tlm_sampler_params p = {.temperature = 1.5f, .top_k = 1, .top_p = 1.0f};
    assert_int_equal(sampler_init(&s, V, &p), 0);
    tlm_rng r;
    tlm_rng_seed(&r, 3);
    for (int trial = 0; trial < 50; trial++) {
        fill_random_logits(lg, V, 900 + trial, 1.0f);
        assert_int_equal(sampler_sample(&s, lg, &r), sampler_argmax(lg, V));
    }
    sampler_free(&s);
}

static void test_plain_softmax_and_temperature(void **state) {
    (void)state;
    check_distribution(k_logits, 10, 1.0f, 0, 1.0f, 11);
    check_distribution(k_logits, 10, 0.5f, 0, 1.0f, 12);
    check_distribution(k_logits, 10, 2.0f, 0, 1.0f, 13);
    /* top_k >= V is off */
    check_distribution(k_logits, 10, 1.0f, 10, 1.0f, 14);
    check_distribution(k_logits, 10, 1.0f, 50, 1.0f, 15);
}

static void test_temperature_changes_the_distribution(void **state) {
    (void)state;
    /* The share of the best token rises as the temperature falls, as
     * softmax(l/T) says; 0.01 is effectively greedy. */
    double share[3];
    const float temps[3] = {2.0f, 1.0f, 0.01f};
    for (int k = 0; k < 3; k++) {
        tlm_sampler s;
        tlm_sampler_params p = {.temperature = temps[k], .top_k = 0, .top_p = 1.0f};
        assert_int_equal(sampler_init(&s, 10, &p), 0);
        tlm_rng r;
        tlm_rng_seed(&r, 5);
        long hits = 0;
        for (int i = 0; i < 20000; i++) hits += sampler_sample(&s, k_logits, &r) == 0;
        share[k] = hits / 20000.0;
        sampler_free(&s);
    }
    double e[10];
    reference_dist(k_logits, 10, 2.0, 0, 1.0, e);
    assert_true(fabs(share[0] - e[0]) < 0.02);
    reference_dist(k_logits, 10, 1.0, 0, 1.0, e);
    assert_true(fabs(share[1] - e[0]) < 0.02);
    assert_true(share[0] < share[1]);
    assert_true(share[2] == 1.0);
}

static void test_top_k(void **state) {
    (void)state;
    check_distribution(k_logits, 10, 1.0f, 3, 1.0f, 21);
    check_distribution(k_logits, 10, 2.0f, 4, 1.0f, 22);
    check_distribution(k_logits, 10, 0.7f, 9, 1.0f, 23);
    /* larger vocabulary: the heap selection on random logits */
    enum { V = 3000 };
    static float lg[V];
    fill_random_logits(lg, V, 24, 2.0f);
    check_distribution(lg, V, 1.0f, 20, 1.0f, 25);
}

static void test_top_k_ties_prefer_low_ids(void **state) {
    (void)state;
    float lg[8] = {0};
    /* all equal: the kept three are ids 0, 1, 2, each a third */
    check_distribution(lg, 8, 1.0f, 3, 1.0f, 31);
}

static void test_top_p(void **state) {
    (void)state;
    /* nucleus without top-k: the partial heap ordering */
    check_distribution(k_logits, 10, 1.0f, 0, 0.5f, 41);
    check_distribution(k_logits, 10, 1.0f, 0, 0.8f, 42);
    check_distribution(k_logits, 10, 0.6f, 0, 0.9f, 43);
    check_distribution(k_logits, 10, 1.0f, 0, 1e-6f, 44); /* just the best token */
    /* nucleus after top-k (renormalised over the top k) */
    check_distribution(k_logits, 10, 1.0f, 5, 0.7f, 45);
    check_distribution(k_logits, 10, 1.5f, 6, 0.95f, 46);
    enum { V = 2000 };
    static float lg[V];
    fill_random_logits(lg, V, 47, 3.0f);
    check_distribution(lg, V, 1.0f, 0, 0.6f, 48);
    check_distribution(lg, V, 0.8f, 40, 0.9f, 49);
}

static void test_determinism(void **state) {
    (void)state;
    enum { V = 500 };
    static float lg[V];
    fill_random_logits(lg, V, 51, 1.0f);
    tlm_sampler s;
    tlm_sampler_params p = {.temperature = 0.9f, .top_k = 0, .top_p = 0.95f};
    assert_int_equal(sampler_init(&s, V, &p), 0);
    int32_t a[300], b[300], c[300];
    tlm_rng r;
    tlm_rng_seed(&r, 99);
    for (int i = 0; i < 300; i++) a[i] = sampler_sample(&s, lg, &r);
    tlm_rng_seed(&r, 99);
    for (int i = 0; i < 300; i++) b[i] = sampler_sample(&s, lg, &r);
    tlm_rng_seed(&r, 100);
    for (int i = 0; i < 300; i++) c[i] = sampler_sample(&s, lg, &r);
    assert_memory_equal(a, b, sizeof a);
    int differ = 0;
    for (int i = 0; i < 300; i++) differ += a[i] != c[i];
    assert_true(differ > 100);
    /* per-sequence rngs: independent of the batch index scheme's neighbours */
    tlm_rng r0, r1, r0b;
    generate_seed_rng(&r0, 5, 0);
    generate_seed_rng(&r1, 5, 1);
    generate_seed_rng(&r0b, 5, 0);
    assert_memory_equal(&r0, &r0b, sizeof r0);
    assert_memory_not_equal(&r0, &r1, sizeof r0);
    sampler_free(&s);
}

static void test_bad_params(void **state) {
    (void)state;
    tlm_sampler s;
    tlm_sampler_params bad[] = {
        {.temperature = -0.1f, .top_k = 0, .top_p = 1.0f},
        {.temperature = NAN, .top_k = 0, .top_p = 1.0f},
        {.temperature = 1.0f, .top_k = -1, .top_p = 1.0f},
        {.temperature = 1.0f, .top_k = 0, .top_p = 0.0f},
        {.temperature = 1.0f, .top_k = 0, .top_p = 1.5f},
    };
    const char *flag[] = {"--temperature", "--temperature", "--top-k", "--top-p", "--top-p"};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(sampler_init(&s, 10, &bad[i]), -1);
        assert_non_null(strstr(tlm_last_error(), flag[i]));
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_is_argmax),
        cmocka_unit_test(test_top_k_one_is_greedy),
        cmocka_unit_test(test_plain_softmax_and_temperature),
        cmocka_unit_test(test_temperature_changes_the_distribution),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_k_ties_prefer_low_ids),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_bad_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
