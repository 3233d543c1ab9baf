/*
 * The generation ops of ops.h (pack, matmul_packed, attn_decode): the fast
 * CPU backend against the reference loops and against hand-computed bf16
 * rounding and int8 quantisation; int8 products against an independent
 * double-precision computation of the same quantised maths and against
 * the fp32 product; the fast backend's portable path (built here without
 * SIMD, tests/infer_portable.c) against its SIMD path; the promise that a
 * row's result depends on nothing but that row (not the batch size, not
 * the thread count), checked bit for bit; and attn_decode against the
 * three ops it fuses.
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops/ops.h"
#include "util/common.h"

static tlm_ops *g_fast, *g_fast1, *g_ref;
/* "cpu" with the generation block of cpu_infer.c compiled without SIMD */
static tlm_ops *g_port;
void cpu_infer_install_portable(tlm_ops *o); /* tests/infer_portable.c */

static void fill_normal(float *x, size_t n, uint64_t seed, float scale) {
    tlm_rng r;
    tlm_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) x[i] = scale * tlm_rng_normal(&r);
}

/* max |a-b| / rms(b): an error relative to the typical output size, so
 * outputs that happen to be near zero do not inflate it. *rms_err (may be
 * NULL) receives rms(a-b) / rms(b). */
static double err_vs_rms2(const float *a, const float *b, size_t n, double *rms_err) {
    double ss = 0, se = 0, mx = 0;
    for (size_t i = 0; i < n; i++) ss += (double)b[i] * b[i];
    double rms = sqrt(ss / (double)n);
    if (!(rms > 0)) rms = 1.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        se += d * d;
        if (!(d <= mx)) mx = d; /* NaN propagates */
    }
    if (rms_err) *rms_err = sqrt(se / (double)n) / rms;
    return mx / rms;
}

static double err_vs_rms(const float *a, const float *b, size_t n) { return err_vs_rms2(a, b, n, NULL); }

/* y = op(x) through o: pack w, one matmul_packed, free. y is pre-filled
 * with y0 (for accumulate). */
static void run_packed(tlm_ops *o, float *y, const float *y0, const float *x, int M, const float *w, int N, int K,
                       int dtype, int kind, const float *nw, int accumulate) {
    tlm_packed *p = o->pack(o, w, N, K, dtype, kind);
    assert_non_null(p);
    int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N;
    memcpy(y, y0, (size_t)M * nout * sizeof *y);
    o->matmul_packed(o, y, x, M, p, nw, 1e-5f, accumulate);
    o->pack_free(o, p);
}

/* ---- bf16 rounding by hand ---------------------------------------------- */

static void test_bf16_rounding_by_hand(void **state) {
    (void)state;
    /* bf16 keeps 8 significant bits: at 1.0 the step is 2^-7, at 3.0 2^-6.
     * x0 = 1 + 2^-8 is a tie -> even (1.0); x1 = 1 + 2^-7 + 2^-8 is a tie
     * -> even (1 + 2^-6); w22 = 3 + 2^-7 is a tie -> even (3.0). */
    const float x[4] = {1.0f + 0x1p-8f, 1.0f + 0x1p-7f + 0x1p-8f, 2.0f, 0.0f};
    float w[3 * 4] = {0};
    w[0 * 4 + 0] = 1.0f;
    w[1 * 4 + 1] = 1.0f;
    w[2 * 4 + 2] = 3.0f + 0x1p-7f;
    const float want_bf16[3] = {1.0f, 1.0f + 0x1p-6f, 6.0f};
    const float want_f32[3] = {x[0], x[1], 2.0f * (3.0f + 0x1p-7f)};
    tlm_ops *ops[2] = {g_fast, g_ref};
    float y[3], zero[3] = {0};
    for (int i = 0; i < 2; i++) {
        run_packed(ops[i], y, zero, x, 1, w, 3, 4, TLM_PACK_BF16, TLM_PACK_LINEAR, NULL, 0);
        assert_memory_equal(y, want_bf16, sizeof y);
        run_packed(ops[i], y, zero, x, 1, w, 3, 4, TLM_PACK_F32, TLM_PACK_LINEAR, NULL, 0);
        assert_memory_equal(y, want_f32, sizeof y);
        /* accumulate adds to what y holds */
        float y0[3] = {10.0f, 20.0f, 30.0f};
        run_packed(ops[i], y, y0, x, 1, w, 3, 4, TLM_PACK_BF16, TLM_PACK_LINEAR, NULL, 1);
        for (int n = 0; n < 3; n++) assert_true(y[n] == y0[n] + want_bf16[n]);
    }
}

/* ---- fast against reference ----------------------------------------------- */

typedef struct {
    int M, N, K;
} shape;

static void check_against_ref(int dtype, int kind, int use_norm, int accumulate) {
    const shape shapes[] = {{1, 768, 256}, {3, 40, 17}, {13, 64, 33}, {5, 90, 704}, {64, 200, 64}, {2, 2, 1}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int M = shapes[si].M, N = shapes[si].N, K = shapes[si].K;
        if (kind == TLM_PACK_SWIGLU && accumulate) continue; /* not defined */
        int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N;
        float *w = malloc((size_t)N * K * sizeof *w), *x = malloc((size_t)M * K * sizeof *x);
        float *nw = malloc((size_t)K * sizeof *nw), *y0 = malloc((size_t)M * nout * sizeof *y0);
        float *yf = malloc((size_t)M * nout * sizeof *yf), *yr = malloc((size_t)M * nout * sizeof *yr);
        float *y32 = malloc((size_t)M * nout * sizeof *y32);
        uint64_t seed = 1000 * si + 10 * (uint64_t)dtype + 2 * (uint64_t)kind + (uint64_t)use_norm;
        fill_normal(w, (size_t)N * K, seed, 1.0f / sqrtf((float)K));
        fill_normal(x, (size_t)M * K, seed + 1, 3.0f);
        fill_normal(nw, (size_t)K, seed + 2, 0.3f);
        for (int k = 0; k < K; k++) nw[k] += 1.0f;
        fill_normal(y0, (size_t)M * nout, seed + 3, 1.0f);
        const float *norm = use_norm ? nw : NULL;
        run_packed(g_fast, yf, y0, x, M, w, N, K, dtype, kind, norm, accumulate);
        run_packed(g_ref, yr, y0, x, M, w, N, K, dtype, kind, norm, accumulate);
        /* the same format on both sides: fp32 sums against double sums,
         * plus (bf16) the odd input rounded the other way after a norm
         * computed in float instead of double */
        double e = err_vs_rms(yf, yr, (size_t)M * nout);
        double tol = dtype == TLM_PACK_F32 ? 3e-5 : 2e-3;
        if (!(e <= tol))
            fail_msg("dtype %d kind %d norm %d acc %d M=%d N=%d K=%d: fast vs ref error %g > %g", dtype, kind,
                     use_norm, accumulate, M, N, K, e, tol);
        if (dtype == TLM_PACK_BF16) {
            /* bf16 against exact fp32: each input carries a relative rounding
             * error of at most 2^-9 (uniform, sd 2^-9/sqrt(3)), so a product
             * is off by sd ~2^-9 sqrt(2/3) ~ 1.6e-3 and a sum of K random
             * products by about that fraction of its rms. Bounds: 3e-3 for
             * the rms error, 2e-2 (~12 sd) for the worst of up to 13k
             * outputs; and not 0, or nothing was rounded. SWIGLU multiplies
             * two such sums, whose errors add: twice the bounds. */
            run_packed(g_ref, y32, y0, x, M, w, N, K, TLM_PACK_F32, kind, norm, accumulate);
            double rms_e;
            double e32 = err_vs_rms2(yf, y32, (size_t)M * nout, &rms_e);
            size_t nres = (size_t)M * nout;
            double f = kind == TLM_PACK_SWIGLU ? 2.0 : 1.0;
            if (!(e32 <= 2e-2 * f && (nres < 256 || rms_e <= 3e-3 * f) && e32 > 0))
                fail_msg("kind %d M=%d N=%d K=%d: bf16 vs fp32 error max %g rms %g", kind, M, N, K, e32, rms_e);
        }
        free(w);
        free(x);
        free(nw);
        free(y0);
        free(yf);
        free(yr);
        free(y32);
    }
}

static void test_matmul_packed_f32_vs_ref(void **state) {
    (void)state;
    for (int kind = 0; kind < 2; kind++)
        for (int norm = 0; norm < 2; norm++)
            for (int acc = 0; acc < 2; acc++) check_against_ref(TLM_PACK_F32, kind, norm, acc);
}

static void test_matmul_packed_bf16_vs_ref(void **state) {
    (void)state;
    for (int kind = 0; kind < 2; kind++)
        for (int norm = 0; norm < 2; norm++)
            for (int acc = 0; acc < 2; acc++) check_against_ref(TLM_PACK_BF16, kind, norm, acc);
}

/* ---- a row depends on that row only ----------------------------------------- */

static void test_rows_independent_of_batch_and_threads(void **state) {
    (void)state;
    enum { M = 29, N = 136, K = 80 };
    float *w = malloc((size_t)N * K * sizeof *w), *x = malloc((size_t)M * K * sizeof *x), nw[K];
    float *yb = malloc((size_t)M * N * sizeof *yb), *y1 = malloc((size_t)N * sizeof *y1);
    float *yt = malloc((size_t)M * N * sizeof *yt), *y0 = malloc((size_t)M * N * sizeof *y0);
    fill_normal(w, (size_t)N * K, 5, 0.1f);
    fill_normal(x, (size_t)M * K, 6, 1.0f);
    fill_normal(nw, K, 7, 1.0f);
    fill_normal(y0, (size_t)M * N, 8, 1.0f);
    const int dtypes[3] = {TLM_PACK_F32, TLM_PACK_BF16, TLM_PACK_I8};
    for (int di = 0; di < 3; di++)
        for (int kind = 0; kind < 2; kind++) {
            const int dtype = dtypes[di];
            int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N, acc = kind == TLM_PACK_LINEAR;
            tlm_packed *p = g_fast->pack(g_fast, w, N, K, dtype, kind);
            tlm_packed *p1 = g_fast1->pack(g_fast1, w, N, K, dtype, kind);
            memcpy(yb, y0, (size_t)M * nout * sizeof *yb);
            memcpy(yt, y0, (size_t)M * nout * sizeof *yt);
            g_fast->matmul_packed(g_fast, yb, x, M, p, nw, 1e-5f, acc);
            g_fast1->matmul_packed(g_fast1, yt, x, M, p1, nw, 1e-5f, acc);
            assert_memory_equal(yb, yt, (size_t)M * nout * sizeof *yb);
            for (int m = 0; m < M; m++) {
                memcpy(y1, y0 + (size_t)m * nout, (size_t)nout * sizeof *y1);
                g_fast->matmul_packed(g_fast, y1, x + (size_t)m * K, 1, p, nw, 1e-5f, acc);
                if (memcmp(y1, yb + (size_t)m * nout, (size_t)nout * sizeof *y1) != 0)
                    fail_msg("dtype %d kind %d: row %d alone differs from the same row in a batch of %d", dtype,
                             kind, m, M);
            }
            if (dtype == TLM_PACK_I8) {
                /* the portable path: the same batch, the same bits */
                tlm_packed *pp = g_port->pack(g_port, w, N, K, dtype, kind);
                memcpy(yt, y0, (size_t)M * nout * sizeof *yt);
                g_port->matmul_packed(g_port, yt, x, M, pp, nw, 1e-5f, acc);
                if (kind == TLM_PACK_LINEAR) assert_memory_equal(yb, yt, (size_t)M * nout * sizeof *yb);
                g_port->pack_free(g_port, pp);
            }
            g_fast->pack_free(g_fast, p);
            g_fast1->pack_free(g_fast1, p1);
        }
    free(w);
    free(x);
    free(yb);
    free(y1);
    free(yt);
    free(y0);
}

/* ---- int8 ------------------------------------------------------------------- */

/* ops.h's int8 of one group v[0..n), n <= 32, written from the definition:
 * scale = max|v| / 127 in fp32, q = v / scale rounded to nearest even (rint
 * in the default rounding mode) and kept within +-127; q = 0 past n and
 * for a zero scale. Returns the scale. */
static float q8_group(const float *v, int n, int *q) {
    float mx = 0.0f;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, fabsf(v[i]));
    const float s = mx / 127.0f;
    for (int i = 0; i < 32; i++) {
        double t = i < n && s > 0.0f ? rint((double)(v[i] / s)) : 0.0;
        q[i] = (int)fmax(-127.0, fmin(127.0, t));
    }
    return s;
}

/* R rows of K values quantised group by group: q [R][G*32], s [R][G]. */
typedef struct {
    int R, K, G;
    int *q;
    float *s;
} q8mat;

static q8mat q8_quantise(const float *a, int R, int K) {
    q8mat m = {.R = R, .K = K, .G = (K + 31) / 32};
    m.q = malloc((size_t)R * m.G * 32 * sizeof *m.q);
    m.s = malloc((size_t)R * m.G * sizeof *m.s);
    for (int r = 0; r < R; r++)
        for (int g = 0; g < m.G; g++) {
            int n = K - 32 * g < 32 ? K - 32 * g : 32;
            m.s[(size_t)r * m.G + g] = q8_group(a + (size_t)r * K + 32 * g, n, m.q + ((size_t)r * m.G + g) * 32);
        }
    return m;
}

static void q8_free(q8mat *m) {
    free(m->q);
    free(m->s);
}

/* Row a of X times row b of W by the quantised maths, in double: *y the
 * value, *A = sum over groups of |sx sw d|, the size of the terms that
 * the fp32 chain adds (its rounding errors are relative to it). */
static void q8_dot(const q8mat *X, int a, const q8mat *W, int b, double *y, double *A) {
    double v = 0, abs_sum = 0;
    for (int g = 0; g < X->G; g++) {
        long d = 0;
        for (int k = 0; k < 32; k++) d += (long)X->q[((size_t)a * X->G + g) * 32 + k] * W->q[((size_t)b * W->G + g) * 32 + k];
        double t = (double)X->s[(size_t)a * X->G + g] * W->s[(size_t)b * W->G + g] * (double)d;
        v += t;
        abs_sum += fabs(t);
    }
    *y = v;
    *A = abs_sum;
}

static float max_scale(const q8mat *m, int r) {
    float mx = 0;
    for (int g = 0; g < m->G; g++) mx = fmaxf(mx, m->s[(size_t)r * m->G + g]);
    return mx;
}

static void test_int8_by_hand(void **state) {
    (void)state;
    /* One row x of K = 36: group 0 holds 4 values (28 zeros after them),
     * group 1 holds 4 (the rest padding). Scales are powers of two, so
     * every result is exact in fp32:
     *   group 0: max 254 -> sx 2; x / 2 = 127, 1.5, -2.5, 0.5
     *            -> q 127, 2, -2, 0 (ties to even)
     *   group 1: max 508 -> sx 4; x / 4 = 127, 1.5, -2.5, 0.5 -> the same q
     * Weights:
     *   row 0, group 0: max 127 -> s 1; 127, -63.5, 32, 1 -> q 127, -64, 32, 1
     *          group 1: 63.5 (rest 0) -> s 0.5, q 127
     *   row 1, group 0: max 15.875 -> s 1/8; -15.875, 0.0625, 0.1875, -0.3125
     *                   -> q -127, 0, 2, -2 (0.5 -> 0, 1.5 -> 2, -2.5 -> -2)
     *          group 1: zero -> s 0, q 0
     *   row 2: zero
     * y0 = 2 * 1 * (127*127 - 2*64 - 2*32 + 0) + 4 * 0.5 * 127*127
     *    = 2 * 15937 + 2 * 16129 = 64132
     * y1 = 2 * (1/8) * (-127*127 + 0 - 4 + 0) = -16133 / 4 = -4033.25
     * The sum of xq of a group is 127, not 0: an offset of the u8 operand
     * left uncorrected (128 per unit) would show by thousands. */
    enum { K = 36, N = 3 };
    float x[K] = {0}, w[N * K] = {0};
    const float x0[4] = {254.0f, 3.0f, -5.0f, 1.0f}, x1[4] = {508.0f, 6.0f, -10.0f, 2.0f};
    const float w00[4] = {127.0f, -63.5f, 32.0f, 1.0f}, w10[4] = {-15.875f, 0.0625f, 0.1875f, -0.3125f};
    for (int i = 0; i < 4; i++) {
        x[i] = x0[i];
        x[32 + i] = x1[i];
        w[i] = w00[i];
        w[K + i] = w10[i];
    }
    w[32] = 63.5f;
    /* the test's own quantisation agrees with the hand */
    int q[32];
    assert_true(q8_group(x0, 4, q) == 2.0f);
    assert_true(q[0] == 127 && q[1] == 2 && q[2] == -2 && q[3] == 0 && q[4] == 0);
    assert_true(q8_group(w10, 4, q) == 0.125f);
    assert_true(q[0] == -127 && q[1] == 0 && q[2] == 2 && q[3] == -2);
    const float want[N] = {64132.0f, -4033.25f, 0.0f};
    tlm_ops *ops[4] = {g_fast, g_fast1, g_ref, g_port};
    float y[N], zero[N] = {0}, y0[N] = {0.5f, -1.0f, 3.0f};
    for (int i = 0; i < 4; i++) {
        run_packed(ops[i], y, zero, x, 1, w, N, K, TLM_PACK_I8, TLM_PACK_LINEAR, NULL, 0);
        if (memcmp(y, want, sizeof y))
            fail_msg("%s: int8 by hand: %.9g %.9g %.9g, want %.9g %.9g %.9g", ops[i]->name, y[0], y[1], y[2],
                     want[0], want[1], want[2]);
        run_packed(ops[i], y, y0, x, 1, w, N, K, TLM_PACK_I8, TLM_PACK_LINEAR, NULL, 1);
        for (int n = 0; n < N; n++) assert_true(y[n] == y0[n] + want[n]);
    }
}

/* int8 products through every backend against q8_dot (the same quantised
 * maths in double, from the definition) and against the fp32 product.
 *
 * Against q8_dot. Without a norm both sides quantise the very same floats,
 * so the integer parts are identical and exact; what differs is the fp32
 * scaling: s = sx * sw rounds once (relative u = 2^-24) and each of the G
 * fused multiply-adds rounds the running sum once (at most u times the
 * sum, itself at most A = sum |s d|), so |y - exact| <= (G + 1) u A, plus
 * u |y| for the final addition of accumulate. The reference sums in double
 * and rounds once. With a fused norm the fast path computes 1/rms in
 * float, the reference and q8_dot in double: xn may differ by an ulp,
 * which moves sx by an ulp (4 u A more) and, rarely, turns a value at a
 * rounding tie the other way: such a flip moves the output by
 * sx sw |wq| <= 127 sx sw; two per row are allowed.
 * SWIGLU applies silu(g) * u to two such sums: the errors propagate with
 * |silu'| <= 1.1, plus the fast kernel's exp (~1e-7 relative). */
static void check_int8_exact(tlm_ops *o, int M, int N, int K, int kind, int use_norm, int accumulate,
                             const float *w, const float *x, const float *nw, const float *y0, const float *y) {
    const double u = 0x1p-24;
    const int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N;
    /* the normalised input as ops.h defines it (1/rms in double) */
    float *xn = malloc((size_t)M * K * sizeof *xn);
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        double ss = 0;
        for (int k = 0; k < K; k++) ss += (double)xr[k] * xr[k];
        double r = use_norm ? 1.0 / sqrt(ss / K + 1e-5f) : 1.0;
        for (int k = 0; k < K; k++) xn[(size_t)m * K + k] = use_norm ? (float)(xr[k] * r * nw[k]) : xr[k];
    }
    q8mat X = q8_quantise(xn, M, K), W = q8_quantise(w, N, K);
    const int G = X.G;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < nout; n++) {
            double want, tol, e;
            if (kind == TLM_PACK_SWIGLU) {
                double g, ag, v, av;
                q8_dot(&X, m, &W, n, &g, &ag);
                q8_dot(&X, m, &W, nout + n, &v, &av);
                double eg = (G + 1) * u * ag, ev = (G + 1) * u * av;
                if (use_norm) {
                    eg += 4 * u * ag + 2 * 127.0 * max_scale(&X, m) * max_scale(&W, n);
                    ev += 4 * u * av + 2 * 127.0 * max_scale(&X, m) * max_scale(&W, nout + n);
                }
                double sg = g / (1.0 + exp(-g));
                want = sg * v;
                tol = 1.1 * eg * fabs(v) + fabs(sg) * ev + 1e-6 * fabs(want) + 1e-30;
            } else {
                double a;
                q8_dot(&X, m, &W, n, &want, &a);
                tol = (G + 1) * u * a + 1e-30;
                if (use_norm) tol += 4 * u * a + 2 * 127.0 * max_scale(&X, m) * max_scale(&W, n);
                if (accumulate) {
                    want += y0[(size_t)m * nout + n];
                    tol += u * fabs(want);
                }
            }
            e = fabs((double)y[(size_t)m * nout + n] - want);
            if (!(e <= tol))
                fail_msg("%s int8 kind %d norm %d acc %d M=%d N=%d K=%d: y[%d,%d] = %.9g, the quantised maths "
                         "%.9g (error %g > %g)",
                         o->name, kind, use_norm, accumulate, M, N, K, m, n, y[(size_t)m * nout + n], want, e, tol);
        }
    q8_free(&X);
    q8_free(&W);
    free(xn);
}

/* int8 against the exact fp32 product. A quantised value is off by its
 * rounding error, uniform within +-step/2 (step = the group's scale), of
 * variance step^2 / 12; independent over k, so an output of a LINEAR
 * product is off by sum_k (w_k dx_k + xn_k dw_k), of variance
 *   V = sum_k (w_k^2 step_x^2 + xn_k^2 step_w^2) / 12.
 * (Relative to a factor's rms, step / sqrt(12) is max / (127 sqrt(12)):
 * ~5e-3 for normal groups of 32, whose max is ~2.1-2.5 rms; the "1/254"
 * of a value at the maximum.) SWIGLU's silu(g) u moves by
 * silu'(g) u dg + silu(g) du (+ dg du): V = (silu'(g) u)^2 Vg +
 * silu(g)^2 Vu + Vg Vu. Checked: the rms error over the outputs within
 * 0.6..1.4 of the predicted sqrt(mean V) where there are enough of them
 * (>= 1000 outputs, K >= 32: at K = 1 the single value IS the maximum and
 * rounds exactly), and no output off by more than 6 sqrt(V). */
static double q8_var(const q8mat *X, const float *xn, int m, const q8mat *W, const float *w, int n, int K) {
    double V = 0;
    for (int k = 0; k < K; k++) {
        double sx = X->s[(size_t)m * X->G + k / 32], sw = W->s[(size_t)n * W->G + k / 32];
        double wk = w[(size_t)n * K + k], xk = xn[(size_t)m * K + k];
        V += (wk * wk * sx * sx + xk * xk * sw * sw) / 12.0;
    }
    return V;
}

static double dot_d(const float *a, const float *b, int K) {
    double s = 0;
    for (int k = 0; k < K; k++) s += (double)a[k] * b[k];
    return s;
}

static void check_int8_vs_fp32(int M, int N, int K, int kind, int use_norm, int accumulate, const float *w,
                               const float *x, const float *nw, const float *y0, const float *y) {
    const int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N;
    float *y32 = malloc((size_t)M * nout * sizeof *y32);
    run_packed(g_ref, y32, y0, x, M, w, N, K, TLM_PACK_F32, kind, use_norm ? nw : NULL, accumulate);
    const size_t nres = (size_t)M * nout;
    float *xn = malloc((size_t)M * K * sizeof *xn);
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        double r = use_norm ? 1.0 / sqrt(dot_d(xr, xr, K) / K + 1e-5f) : 1.0;
        for (int k = 0; k < K; k++) xn[(size_t)m * K + k] = use_norm ? (float)(xr[k] * r * nw[k]) : xr[k];
    }
    q8mat X = q8_quantise(xn, M, K), W = q8_quantise(w, N, K);
    double se = 0, sv = 0, worst = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < nout; n++) {
            double V = q8_var(&X, xn, m, &W, w, n, K);
            if (kind == TLM_PACK_SWIGLU) {
                const float *xr = xn + (size_t)m * K;
                double g = dot_d(xr, w + (size_t)n * K, K), u = dot_d(xr, w + (size_t)(nout + n) * K, K);
                double sig = 1.0 / (1.0 + exp(-g)), dsilu = sig * (1.0 + g * (1.0 - sig));
                double Vu = q8_var(&X, xn, m, &W, w, nout + n, K);
                V = dsilu * dsilu * u * u * V + g * sig * g * sig * Vu + V * Vu;
            }
            double d = (double)y[(size_t)m * nout + n] - y32[(size_t)m * nout + n];
            se += d * d;
            sv += V;
            double z = fabs(d) / sqrt(V > 0 ? V : 1e-300);
            worst = z > worst ? z : worst;
        }
    double ratio = sqrt(se / sv);
    if (!(worst <= 6.0 && (nres < 1000 || K < 32 || (ratio >= 0.6 && ratio <= 1.4))))
        fail_msg("int8 kind %d M=%d N=%d K=%d norm %d acc %d: vs fp32 the rms error is %g of the predicted, the "
                 "worst %g predicted sd",
                 kind, M, N, K, use_norm, accumulate, ratio, worst);
    q8_free(&X);
    q8_free(&W);
    free(xn);
    free(y32);
}

static void test_matmul_packed_int8(void **state) {
    (void)state;
    /* M = 1 (four panels a tile), 2, 3 (two), 5, 7, 13 and 64 (tiles of up
     * to 6 rows, panel by panel); N and K multiples of 32 and not (K = 17:
     * one padded group, 33: one value in the last group) */
    const shape shapes[] = {{1, 768, 256}, {1, 100, 96}, {2, 96, 40}, {3, 40, 17}, {13, 64, 33},
                            {5, 90, 704},  {7, 64, 32},  {64, 200, 64}, {2, 2, 1}};
    tlm_ops *ops[4] = {g_fast, g_fast1, g_ref, g_port};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int kind = 0; kind < 2; kind++)
            for (int use_norm = 0; use_norm < 2; use_norm++)
                for (int accumulate = 0; accumulate < 2; accumulate++) {
                    if (kind == TLM_PACK_SWIGLU && accumulate) continue; /* not defined */
                    const int M = shapes[si].M, N = shapes[si].N, K = shapes[si].K;
                    const int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N;
                    float *w = malloc((size_t)N * K * sizeof *w), *x = malloc((size_t)M * K * sizeof *x);
                    float *nw = malloc((size_t)K * sizeof *nw), *y0 = malloc((size_t)M * nout * sizeof *y0);
                    float *y[4];
                    uint64_t seed = 5000 + 100 * si + 4 * (uint64_t)kind + 2 * (uint64_t)use_norm + (uint64_t)accumulate;
                    fill_normal(w, (size_t)N * K, seed, 1.0f / sqrtf((float)K));
                    fill_normal(x, (size_t)M * K, seed + 1, 3.0f);
                    fill_normal(nw, (size_t)K, seed + 2, 0.3f);
                    for (int k = 0; k < K; k++) nw[k] += 1.0f;
                    fill_normal(y0, (size_t)M * nout, seed + 3, 1.0f);
                    const float *norm = use_norm ? nw : NULL;
                    for (int i = 0; i < 4; i++) {
                        y[i] = malloc((size_t)M * nout * sizeof *y[i]);
                        run_packed(ops[i], y[i], y0, x, M, w, N, K, TLM_PACK_I8, kind, norm, accumulate);
                        check_int8_exact(ops[i], M, N, K, kind, use_norm, accumulate, w, x, nw, y0, y[i]);
                    }
                    /* the thread count and the portable path change no bit
                     * (SWIGLU: the portable path's silu uses expf, the SIMD
                     * one a polynomial: the sums are the same, the last bits
                     * of silu may not be) */
                    assert_memory_equal(y[0], y[1], (size_t)M * nout * sizeof *y[0]);
                    if (kind == TLM_PACK_LINEAR) assert_memory_equal(y[0], y[3], (size_t)M * nout * sizeof *y[0]);
                    else assert_true(test_max_rel_err(y[3], y[0], (size_t)M * nout, 1e-3) < 1e-6);
                    check_int8_vs_fp32(M, N, K, kind, use_norm, accumulate, w, x, nw, y0, y[0]);
                    for (int i = 0; i < 4; i++) free(y[i]);
                    free(w);
                    free(x);
                    free(nw);
                    free(y0);
                }
}

/* ---- attn_decode ------------------------------------------------------------- */

/* IEEE half -> double, from the definition (independent of both backends). */
static double half_value(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp((double)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1.0 + m / 1024.0, e - 15);
    return (h & 0x8000) ? -v : v;
}

/* Cache element i as a double. */
static double cache_at(const void *c, size_t i, int kvt) {
    return kvt == TLM_KV_F16 ? half_value(((const uint16_t *)c)[i]) : ((const float *)c)[i];
}

/* |stored - x| within half an ulp of fp16 (2^-11 relative, 2^-25 absolute
 * for subnormals), or saturated to 65504. */
static int half_ok(double stored, float x) {
    if (fabs(x) >= 65504.0) return fabs(stored) == 65504.0 && (stored > 0) == (x > 0);
    return fabs(stored - x) <= ldexp(fabs(x), -11) + ldexp(1.0, -25);
}

typedef struct {
    float *qkv, *out;
    void *kc, *vc;
} attn_bufs;

/* Run a prompt of pos0 positions (filling the caches), then T more at pos0,
 * through o; returns the buffers of the second call. */
static attn_bufs run_attn(tlm_ops *o, int kvt, int B, int T, int H, int hd, int pos0, int Tmax, uint64_t seed,
                          int edges) {
    const int D = H * hd;
    const size_t es = kvt == TLM_KV_F16 ? 2 : 4, nc = (size_t)B * Tmax * D;
    attn_bufs r;
    r.kc = calloc(nc, es);
    r.vc = calloc(nc, es);
    if (pos0 > 0) {
        float *q0 = malloc((size_t)B * pos0 * 3 * D * sizeof *q0), *o0 = malloc((size_t)B * pos0 * D * sizeof *o0);
        fill_normal(q0, (size_t)B * pos0 * 3 * D, seed, 1.5f);
        o->attn_decode(o, o0, q0, r.kc, r.vc, kvt, NULL, NULL, 0, B, pos0, Tmax, H, hd, 0, NULL, 10000.0f);
        free(q0);
        free(o0);
    }
    r.qkv = malloc((size_t)B * T * 3 * D * sizeof *r.qkv);
    r.out = malloc((size_t)B * T * D * sizeof *r.out);
    fill_normal(r.qkv, (size_t)B * T * 3 * D, seed + 1, 1.5f);
    /* v of the first new row: values that exercise the fp16 edges
     * (saturation, subnormals, a tie) */
    float *v0 = r.qkv + 2 * D;
    const float edge[6] = {70000.0f, -65519.0f, 3e-6f, -1e-7f, 1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f};
    for (int i = 0; i < 6 && i < D && edges; i++) v0[i] = edge[i];
    o->attn_decode(o, r.out, r.qkv, r.kc, r.vc, kvt, NULL, NULL, 0, B, T, Tmax, H, hd, pos0, NULL, 10000.0f);
    return r;
}

static void free_bufs(attn_bufs *r) {
    free(r->qkv);
    free(r->out);
    free(r->kc);
    free(r->vc);
}

/* attn_decode on o against the reference backend's (rope_fwd, then plain
 * loops over the head-major caches). */
static void check_attn_decode(tlm_ops *o, int kvt, int B, int T, int H, int hd, int pos0, uint64_t seed) {
    const int D = H * hd, Tmax = pos0 + T + 3;
    const size_t nq = (size_t)B * T * 3 * D, nc = (size_t)B * Tmax * D, no = (size_t)B * T * D;
    attn_bufs f = run_attn(o, kvt, B, T, H, hd, pos0, Tmax, seed, 1);
    attn_bufs r = run_attn(g_ref, kvt, B, T, H, hd, pos0, Tmax, seed, 1);
    /* floors of 0.1: the data are of order 1, so values near 0 compare
     * absolutely. fp32 sums over up to 300 keys in another order and exp by
     * a polynomial: a few 1e-6. */
    double eo = test_max_rel_err(f.out, r.out, no, 0.1), eq = test_max_rel_err(f.qkv, r.qkv, nq, 0.1);
    double ek = 0;
    int v_same = 1;
    for (size_t i = 0; i < nc; i++) {
        double a = cache_at(f.kc, i, kvt), b = cache_at(r.kc, i, kvt);
        double e = fabs(a - b) / fmax(fabs(b), 0.1);
        ek = e > ek ? e : ek;
        v_same &= cache_at(f.vc, i, kvt) == cache_at(r.vc, i, kvt);
    }
    /* k is rotated on both sides (float vs double angles): fp16 may round
     * a hair apart, by one half ulp (2^-11) */
    double tk = kvt == TLM_KV_F16 ? 1e-3 : 1e-5;
    if (!(eo < 1e-4 && eq < 1e-5 && ek < tk && v_same))
        fail_msg("%s kv %d B=%d T=%d H=%d hd=%d pos0=%d: errors out %g qkv %g k %g, v identical %d", o->name, kvt, B,
                 T, H, hd, pos0, eo, eq, ek, v_same);
    /* the new rows are stored exactly (fp32) or rounded to nearest (fp16) */
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++) {
                const float *row = f.qkv + ((size_t)b * T + t) * 3 * D;
                /* head-major [B,H,Tmax,hd] */
                size_t at = (((size_t)b * H + (size_t)(d / hd)) * Tmax + (size_t)(pos0 + t)) * hd + (size_t)(d % hd);
                double sk = cache_at(f.kc, at, kvt), sv = cache_at(f.vc, at, kvt);
                int ok = kvt == TLM_KV_F16 ? half_ok(sk, row[D + d]) && half_ok(sv, row[2 * D + d])
                                           : sk == row[D + d] && sv == row[2 * D + d];
                if (!ok)
                    fail_msg("%s kv %d: cache at b=%d t=%d d=%d holds %g, %g for %g, %g", o->name, kvt, b, t, d, sk,
                             sv, row[D + d], row[2 * D + d]);
            }
    if (kvt == TLM_KV_F16) {
        /* fp16 caches against exact fp32 attention: k carries 2^-11
         * relative rounding, so a score q.k/sqrt(hd) moves by up to
         * |q||k| 2^-11 / sqrt(hd) ~ 6e-3 here (|q|, |k| ~ 1.5 sqrt(32)), and
         * the probabilities and the output by about that fraction */
        attn_bufs h = run_attn(o, kvt, B, T, H, hd, pos0, Tmax, seed, 0);
        attn_bufs x = run_attn(g_ref, TLM_KV_F32, B, T, H, hd, pos0, Tmax, seed, 0);
        double rms_e, e32 = err_vs_rms2(h.out, x.out, no, &rms_e);
        free_bufs(&h);
        /* relative to the outputs' rms: worst 2e-2, typical 3e-3 */
        if (!(e32 < 2e-2 && rms_e < 3e-3 && e32 > 0))
            fail_msg("kv fp16 B=%d T=%d pos0=%d: output differs from fp32 caches by max %g rms %g", B, T, pos0, e32,
                     rms_e);
        free_bufs(&x);
    }
    free_bufs(&f);
    free_bufs(&r);
}

/* attn_decode with fp32 caches is rope_fwd + kv_store + attn_cached (of the
 * reference backend), up to the caches' layout: a prompt of pos0 positions,
 * then T more, through both; outputs, rotated qkv and caches compared. */
static void check_fused_equals_ops(tlm_ops *o, int B, int T, int H, int hd, int pos0) {
    const int D = H * hd, Tmax = pos0 + T + 2;
    const size_t nc = (size_t)B * Tmax * D;
    float *kh = calloc(nc, sizeof *kh), *vh = calloc(nc, sizeof *vh), *kr = calloc(nc, sizeof *kr),
          *vr = calloc(nc, sizeof *vr);
    const int steps[2][2] = {{0, pos0}, {pos0, T}}; /* (start, count) */
    for (int s = 0; s < 2; s++) {
        int p0 = steps[s][0], n = steps[s][1];
        if (n == 0) continue;
        size_t nq = (size_t)B * n * 3 * D, no = (size_t)B * n * D;
        float *q1 = malloc(nq * sizeof *q1), *q2 = malloc(nq * sizeof *q2);
        float *o1 = malloc(no * sizeof *o1), *o2 = malloc(no * sizeof *o2);
        fill_normal(q1, nq, 40 + (uint64_t)s, 1.0f);
        memcpy(q2, q1, nq * sizeof *q1);
        o->attn_decode(o, o1, q1, kh, vh, TLM_KV_F32, NULL, NULL, 0, B, n, Tmax, H, hd, p0, NULL, 10000.0f);
        g_ref->rope_fwd(g_ref, q2, B, n, H, hd, p0, 10000.0f);
        g_ref->kv_store(g_ref, kr, vr, q2, B, n, Tmax, D, p0);
        g_ref->attn_cached(g_ref, o2, q2, kr, vr, B, n, Tmax, H, hd, p0);
        double eo = test_max_rel_err(o1, o2, no, 0.1), eq = test_max_rel_err(q1, q2, nq, 0.1);
        if (!(eo < 1e-4 && eq < 1e-5))
            fail_msg("%s B=%d T=%d pos0=%d: fused vs ops: out %g qkv %g", o->name, B, n, p0, eo, eq);
        free(q1);
        free(q2);
        free(o1);
        free(o2);
    }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < pos0 + T; t++)
            for (int d = 0; d < D; d++) {
                size_t hm = (((size_t)b * H + (size_t)(d / hd)) * Tmax + (size_t)t) * hd + (size_t)(d % hd);
                size_t rm = ((size_t)b * Tmax + (size_t)t) * D + (size_t)d;
                if (!(fabsf(kh[hm] - kr[rm]) <= 1e-5f * (1.0f + fabsf(kr[rm])) && vh[hm] == vr[rm]))
                    fail_msg("%s: cache b=%d t=%d d=%d: %g, %g vs %g, %g", o->name, b, t, d, kh[hm], vh[hm], kr[rm],
                             vr[rm]);
            }
    free(kh);
    free(vh);
    free(kr);
    free(vr);
}

static void test_attn_decode_is_the_ops_it_fuses(void **state) {
    (void)state;
    tlm_ops *ops[2] = {g_fast, g_ref};
    for (int i = 0; i < 2; i++) {
        check_fused_equals_ops(ops[i], 2, 1, 4, 32, 30);
        check_fused_equals_ops(ops[i], 1, 9, 2, 24, 4);
    }
}

static void test_attn_decode_vs_reference(void **state) {
    (void)state;
    tlm_ops *ops[3] = {g_fast, g_fast1, g_ref};
    for (int kvt = TLM_KV_F32; kvt <= TLM_KV_F16; kvt++)
        for (int i = 0; i < 3; i++) {
            check_attn_decode(ops[i], kvt, 1, 1, 8, 32, 0, 11);   /* the first token */
            check_attn_decode(ops[i], kvt, 1, 1, 8, 32, 200, 12); /* one step late in the context */
            check_attn_decode(ops[i], kvt, 3, 1, 4, 32, 37, 13);  /* a batch of streams */
            check_attn_decode(ops[i], kvt, 1, 19, 4, 32, 5, 14);  /* a prompt chunk after 5 positions */
            check_attn_decode(ops[i], kvt, 2, 7, 3, 24, 9, 15);   /* a head size without a SIMD kernel */
            check_attn_decode(ops[i], kvt, 2, 3, 2, 64, 17, 16);
        }
    /* more positions than the per-thread RoPE table holds */
    check_attn_decode(g_fast, TLM_KV_F16, 1, 300, 2, 32, 0, 17);
}

static void test_attn_decode_rows_independent_of_batch(void **state) {
    (void)state;
    enum { B = 5, T = 2, H = 4, hd = 32, D = H * hd, P0 = 40, TM = 48 };
    for (int kvt = TLM_KV_F32; kvt <= TLM_KV_F16; kvt++) {
        const size_t es = kvt == TLM_KV_F16 ? 2 : 4;
        size_t nq = (size_t)B * T * 3 * D, nc = (size_t)B * TM * D;
        float *qkv = malloc(nq * sizeof *qkv), *q1 = malloc(nq * sizeof *q1);
        char *kc = calloc(nc, es), *vc = calloc(nc, es), *k1 = calloc(nc, es), *v1 = calloc(nc, es);
        float *out = malloc((size_t)B * T * D * sizeof *out), *o1 = malloc((size_t)T * D * sizeof *o1);
        fill_normal(qkv, nq, 21, 1.0f);
        /* caches: the same random history for every sequence position */
        float *hist = malloc(nc * sizeof *hist);
        fill_normal(hist, nc, 22, 1.0f);
        for (size_t i = 0; i < nc; i++) {
            if (kvt == TLM_KV_F16) {
                ((uint16_t *)kc)[i] = (uint16_t)(0x3000 + (i * 7919) % 0x0c00); /* halves in [0.125, 1) */
                ((uint16_t *)vc)[i] = (uint16_t)(0xb000 + (i * 104729) % 0x0c00);
            } else {
                ((float *)kc)[i] = hist[i];
                ((float *)vc)[i] = -hist[nc - 1 - i];
            }
        }
        memcpy(q1, qkv, nq * sizeof *q1);
        memcpy(k1, kc, nc * es);
        memcpy(v1, vc, nc * es);
        g_fast->attn_decode(g_fast, out, qkv, kc, vc, kvt, NULL, NULL, 0, B, T, TM, H, hd, P0, NULL, 10000.0f);
        for (int b = 0; b < B; b++) {
            size_t sq = (size_t)b * T * 3 * D, sc = (size_t)b * TM * D * es;
            g_fast1->attn_decode(g_fast1, o1, q1 + sq, k1 + sc, v1 + sc, kvt, NULL, NULL, 0, 1, T, TM, H, hd, P0, NULL,
                10000.0f);
            assert_memory_equal(o1, out + (size_t)b * T * D, (size_t)T * D * sizeof *o1);
            assert_memory_equal(k1 + sc, kc + sc, (size_t)TM * D * es);
        }
        free(qkv);
        free(q1);
        free(kc);
        free(vc);
        free(k1);
        free(v1);
        free(out);
        free(o1);
        free(hist);
    }
}

/* A shared prefix (kp, vp, P) is the same attention as a copy of it at the
 * start of every sequence's cache: a prompt of P positions through B = 1
 * into [1,H,P,hd] caches, then for B sequences n0 own positions and a step
 * of T more, once over the prefix and once over full caches holding a
 * copy of it. Outputs within 1e-5 (the fast kernel sums the two segments
 * as two online-softmax chunks), stored rows identical, and each sequence
 * alone over the prefix gives the batch's bits. */
static void check_shared_prefix(tlm_ops *o, int kvt, int B, int T, int H, int hd, int P, int n0) {
    const int D = H * hd, own = n0 + T, full = P + own;
    const size_t es = kvt == TLM_KV_F16 ? 2 : 4;
    const size_t npre = (size_t)P * D, nown = (size_t)B * own * D, nfull = (size_t)B * full * D;
    char *kp = calloc(npre, es), *vp = calloc(npre, es);
    char *ko = calloc(nown, es), *vo = calloc(nown, es), *kf = calloc(nfull, es), *vf = calloc(nfull, es);
    float *qp = malloc((size_t)P * 3 * D * sizeof *qp), *op = malloc((size_t)P * D * sizeof *op);
    fill_normal(qp, (size_t)P * 3 * D, 41, 1.5f);
    o->attn_decode(o, op, qp, kp, vp, kvt, NULL, NULL, 0, 1, P, P, H, hd, 0, NULL, 10000.0f);
    /* the full caches: the prefix rows copied into every sequence */
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            memcpy(kf + (((size_t)b * H + h) * full) * hd * es, kp + (size_t)h * P * hd * es, (size_t)P * hd * es);
            memcpy(vf + (((size_t)b * H + h) * full) * hd * es, vp + (size_t)h * P * hd * es, (size_t)P * hd * es);
        }
    const int steps[2][2] = {{P, n0}, {P + n0, T}}; /* (pos0, count) */
    for (int s = 0; s < 2; s++) {
        const int p0 = steps[s][0], n = steps[s][1];
        if (n == 0) continue;
        const size_t nq = (size_t)B * n * 3 * D, no = (size_t)B * n * D;
        float *qa = malloc(nq * sizeof *qa), *qb = malloc(nq * sizeof *qb), *q1 = malloc(nq * sizeof *q1);
        float *oa = malloc(no * sizeof *oa), *ob = malloc(no * sizeof *ob), *o1 = malloc(no * sizeof *o1);
        fill_normal(qa, nq, 42 + (uint64_t)s, 1.5f);
        memcpy(qb, qa, nq * sizeof *qa);
        memcpy(q1, qa, nq * sizeof *qa);
        o->attn_decode(o, oa, qa, ko, vo, kvt, kp, vp, P, B, n, own, H, hd, p0, NULL, 10000.0f);
        o->attn_decode(o, ob, qb, kf, vf, kvt, NULL, NULL, 0, B, n, full, H, hd, p0, NULL, 10000.0f);
        double e = test_max_rel_err(oa, ob, no, 0.1);
        if (!(e < 1e-5))
            fail_msg("%s kv %d B=%d T=%d P=%d pos0=%d: shared prefix vs copied prefix differ by %g", o->name, kvt, B, n,
                     P, p0, e);
        assert_memory_equal(qa, qb, nq * sizeof *qa); /* the same rotation */
        /* each sequence alone over the prefix, into a copy of its own caches */
        char *k1 = malloc((size_t)own * D * es), *v1 = malloc((size_t)own * D * es);
        for (int b = 0; b < B; b++) {
            size_t so = (size_t)b * own * D * es;
            /* rows of this call are rewritten by it; the earlier ones are the batch's */
            memcpy(k1, ko + so, (size_t)own * D * es);
            memcpy(v1, vo + so, (size_t)own * D * es);
            o->attn_decode(o, o1, q1 + (size_t)b * n * 3 * D, k1, v1, kvt, kp, vp, P, 1, n, own, H, hd, p0, NULL,
                10000.0f);
            assert_memory_equal(o1, oa + (size_t)b * n * D, (size_t)n * D * sizeof *o1);
            assert_memory_equal(k1, ko + so, (size_t)own * D * es);
        }
        free(k1);
        free(v1);
        free(qa);
        free(qb);
        free(q1);
        free(oa);
        free(ob);
        free(o1);
    }
    /* own row r is position P + r of the full caches */
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t a = ((size_t)b * H + h) * own * hd * es, f = (((size_t)b * H + h) * full + (size_t)P) * hd * es;
            assert_memory_equal(ko + a, kf + f, (size_t)own * hd * es);
            assert_memory_equal(vo + a, vf + f, (size_t)own * hd * es);
        }
    free(kp);
    free(vp);
    free(ko);
    free(vo);
    free(kf);
    free(vf);
    free(qp);
    free(op);
}

static void test_attn_decode_shared_prefix(void **state) {
    (void)state;
    tlm_ops *ops[3] = {g_fast, g_fast1, g_ref};
    for (int kvt = TLM_KV_F32; kvt <= TLM_KV_F16; kvt++)
        for (int i = 0; i < 3; i++) {
            check_shared_prefix(ops[i], kvt, 5, 1, 4, 32, 37, 6); /* decode steps of a batch */
            check_shared_prefix(ops[i], kvt, 2, 3, 2, 64, 17, 0); /* right after the prompt, T > 1 */
            check_shared_prefix(ops[i], kvt, 3, 1, 3, 24, 9, 2);  /* a head size without a SIMD kernel */
        }
    /* a prefix longer than one score chunk of the fast kernel */
    check_shared_prefix(g_fast, TLM_KV_F16, 2, 1, 2, 32, 1100, 3);
}

static void test_embed_rows_equals_embed_fwd(void **state) {
    (void)state;
    enum { V = 50, D = 24, N = 7 };
    float wte[V * D], a[N * D], b[N * D];
    const int32_t tok[N] = {3, 0, 49, 3, 17, 8, 22};
    fill_normal(wte, V * D, 31, 1.0f);
    tlm_ops *ops[2] = {g_fast, g_ref};
    for (int i = 0; i < 2; i++) {
        assert_non_null(ops[i]->embed_rows);
        ops[i]->embed_rows(ops[i], a, tok, wte, N, D);
        ops[i]->embed_fwd(ops[i], b, tok, wte, N, D);
        assert_memory_equal(a, b, sizeof a);
        assert_memory_equal(a + 2 * D, wte + 49 * D, D * sizeof(float));
    }
}

static void test_pack_rejects_bad_shapes(void **state) {
    (void)state;
    float w[6] = {0};
    tlm_ops *ops[2] = {g_fast, g_ref};
    for (int i = 0; i < 2; i++) {
        assert_null(ops[i]->pack(ops[i], w, 3, 2, TLM_PACK_BF16, TLM_PACK_SWIGLU)); /* odd gate|up rows */
        assert_non_null(strstr(tlm_last_error(), "3 x 2"));
        assert_null(ops[i]->pack(ops[i], w, 2, 3, 7, TLM_PACK_LINEAR));
        assert_null(ops[i]->pack(ops[i], w, 2, 3, 3, TLM_PACK_LINEAR)); /* 3 is TLM_GEN_REF, no storage */
        assert_null(ops[i]->pack(ops[i], w, 3, 2, TLM_PACK_I8, TLM_PACK_SWIGLU));
        assert_true(ops[i]->pack_dtypes & 1u << TLM_PACK_I8);
        assert_null(ops[i]->pack(ops[i], w, 0, 3, TLM_PACK_F32, TLM_PACK_LINEAR));
    }
}

/* pos_dev (ops.h): attn_decode with the position in "device" memory (host
 * memory here) gives the bits of the same call with pos0, whatever pos0
 * then says; over a shared prefix and without one, at several steps. A
 * position outside the cache stores nothing and writes NaN. */
static void check_pos_dev(tlm_ops *o, int kvt, int B, int H, int hd, int P, int steps) {
    const int D = H * hd, Tmax = steps;
    const size_t es = kvt == TLM_KV_F16 ? 2 : 4, npre = (size_t)P * D, nc = (size_t)B * Tmax * D;
    char *kp = calloc(npre ? npre : 1, es), *vp = calloc(npre ? npre : 1, es);
    char *ka = calloc(nc, es), *va = calloc(nc, es), *kb = calloc(nc, es), *vb = calloc(nc, es);
    const size_t nq = (size_t)B * 3 * D, no = (size_t)B * D;
    float *qa = malloc(nq * sizeof *qa), *qb = malloc(nq * sizeof *qb);
    float *oa = malloc(no * sizeof *oa), *ob = malloc(no * sizeof *ob);
    if (P > 0) {
        float *qp = malloc((size_t)P * 3 * D * sizeof *qp), *op = malloc((size_t)P * D * sizeof *op);
        fill_normal(qp, (size_t)P * 3 * D, 51, 1.5f);
        o->attn_decode(o, op, qp, kp, vp, kvt, NULL, NULL, 0, 1, P, P, H, hd, 0, NULL, 10000.0f);
        free(qp);
        free(op);
    }
    for (int s = 0; s < steps; s++) {
        fill_normal(qa, nq, 60 + (uint64_t)s, 1.5f);
        memcpy(qb, qa, nq * sizeof *qa);
        const int32_t pos = P + s;
        o->attn_decode(o, oa, qa, ka, va, kvt, P ? kp : NULL, P ? vp : NULL, P, B, 1, Tmax, H, hd, P + s, NULL,
                       10000.0f);
        /* a wrong pos0 on purpose: pos_dev wins */
        o->attn_decode(o, ob, qb, kb, vb, kvt, P ? kp : NULL, P ? vp : NULL, P, B, 1, Tmax, H, hd, -777, &pos,
                       10000.0f);
        assert_memory_equal(oa, ob, no * sizeof *oa);
        assert_memory_equal(qa, qb, nq * sizeof *qa);
    }
    assert_memory_equal(ka, kb, nc * es);
    assert_memory_equal(va, vb, nc * es);
    /* outside the cache: before the prefix ends, and past the last row */
    const int32_t bad[2] = {P - 1, P + Tmax};
    for (int i = 0; i < 2; i++) {
        o->attn_decode(o, ob, qb, kb, vb, kvt, P ? kp : NULL, P ? vp : NULL, P, B, 1, Tmax, H, hd, P, &bad[i],
                       10000.0f);
        for (size_t j = 0; j < no; j++)
            if (!isnan(ob[j])) fail_msg("%s: position %d outside the cache gave %g, not NaN", o->name, bad[i], ob[j]);
        assert_memory_equal(ka, kb, nc * es); /* nothing stored */
        assert_memory_equal(va, vb, nc * es);
    }
    free(kp), free(vp), free(ka), free(va), free(kb), free(vb), free(qa), free(qb), free(oa), free(ob);
}

static void test_attn_decode_pos_dev(void **state) {
    (void)state;
    tlm_ops *ops[3] = {g_fast, g_fast1, g_ref};
    for (int kvt = TLM_KV_F32; kvt <= TLM_KV_F16; kvt++)
        for (int i = 0; i < 3; i++) {
            check_pos_dev(ops[i], kvt, 3, 4, 32, 7, 5); /* shared prefix */
            check_pos_dev(ops[i], kvt, 2, 2, 24, 0, 6); /* none */
        }
}

int main(void) {
    g_fast = ops_create("cpu", 2, NULL, 0);
    g_fast1 = ops_create("cpu", 1, NULL, 0);
    g_ref = ops_create("cpu-ref", 1, NULL, 0);
    g_port = ops_create("cpu", 2, NULL, 0);
    if (g_port) {
        cpu_infer_install_portable(g_port);
        g_port->name = "cpu-portable";
    }
    if (!g_fast || !g_fast1 || !g_ref || !g_port || !g_fast->pack || !g_ref->pack) {
        fprintf(stderr, "cannot create cpu ops with the generation block: %s\n", tlm_last_error());
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_rounding_by_hand),
        cmocka_unit_test(test_matmul_packed_f32_vs_ref),
        cmocka_unit_test(test_matmul_packed_bf16_vs_ref),
        cmocka_unit_test(test_int8_by_hand),
        cmocka_unit_test(test_matmul_packed_int8),
        cmocka_unit_test(test_rows_independent_of_batch_and_threads),
        cmocka_unit_test(test_attn_decode_is_the_ops_it_fuses),
        cmocka_unit_test(test_attn_decode_vs_reference),
        cmocka_unit_test(test_attn_decode_rows_independent_of_batch),
        cmocka_unit_test(test_attn_decode_shared_prefix),
        cmocka_unit_test(test_attn_decode_pos_dev),
        cmocka_unit_test(test_embed_rows_equals_embed_fwd),
        cmocka_unit_test(test_pack_rejects_bad_shapes),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    ops_destroy(g_fast);
    ops_destroy(g_fast1);
    ops_destroy(g_ref);
    ops_destroy(g_port);
    return rc;
}
