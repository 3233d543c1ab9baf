/*
 * The op table (src/ops/ops.h) of every CPU backend against expectations
 * written independently here:
 *  - forwards against double-precision loops of this file;
 *  - backwards against central finite differences of those double forwards,
 *    for the loss L = sum(out * R) with a random R (dout = R);
 *  - the fast backend against the reference on larger, odd shapes that
 *    also take the multi-threaded paths;
 *  - KV-cache attention against full causal attention, hand-computed
 *    AdamW steps, cross-entropy with ignored targets, sumsq accumulation,
 *    and the accumulate/overwrite contract of the backward ops.
 * Buffers go through alloc/copy_h2d/copy_d2h so the checks do not assume
 * host memory.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "ops/ops.h"
#include "util/common.h"

#define NBE 2
static tlm_ops *g_be[NBE];
static tlm_rng g_rng;

static int setup(void **state) {
    (void)state;
    g_be[0] = cpu_ref_ops_create();
    g_be[1] = cpu_ops_create(2);
    tlm_rng_seed(&g_rng, 1234);
    return g_be[0] && g_be[1] ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    for (int i = 0; i < NBE; i++) ops_destroy(g_be[i]);
    return 0;
}

/* ---- helpers ------------------------------------------------------------ */

static float *hrand(size_t n, float scale) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = scale * tlm_rng_normal(&g_rng);
    return p;
}

static double *hdbl(const float *x, size_t n) {
    double *p = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = x[i];
    return p;
}

static void *up(tlm_ops *o, const void *h, size_t bytes) {
    void *d = o->alloc(o, bytes);
    assert_non_null(d);
    if (h) o->copy_h2d(o, d, h, bytes);
    return d;
}

static float *upf(tlm_ops *o, const float *h, size_t n) { return up(o, h, n * sizeof(float)); }

static float *down(tlm_ops *o, const float *d, size_t n) {
    float *h = malloc(sizeof(float) * (n ? n : 1));
    o->copy_d2h(o, h, d, n * sizeof(float));
    return h;
}

static double maxabs(const double *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(x[i]) > m) m = fabs(x[i]);
    return m;
}

/* max |got - want| / max(|want|, 0.1 max|want|): relative error, compared
 * absolutely for entries much smaller than the largest (outputs that are
 * sums with cancellation carry float rounding of the size of their terms,
 * not of their own size). */
static double rel_err(const float *got, const double *want, size_t n) {
    double fl = 0.1 * maxabs(want, n);
    if (fl < 1e-30) fl = 1e-30;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / (fabs(want[i]) > fl ? fabs(want[i]) : fl);
        if (!(e <= worst)) worst = e; /* NaN is the worst */
    }
    return worst;
}

static void check(const char *what, const char *be, const float *got, const double *want, size_t n, double tol) {
    double e = rel_err(got, want, n);
    if (!(e <= tol)) fail_msg("%s [%s]: relative error %.3g > %.3g", what, be, e, tol);
}

static void check_ff(const char *what, const char *be, const float *got, const float *want, size_t n, double tol) {
    double *w = hdbl(want, n);
    check(what, be, got, w, n, tol);
    free(w);
}

/* Central differences of L() with respect to each x[i] (x lives in the
 * context L reads). Double precision throughout, so h can be small. */
static void fd_grad(double (*L)(void *), void *ctx, double *x, size_t n, double *g) {
    for (size_t i = 0; i < n; i++) {
        double xi = x[i], h = 1e-5 * (fabs(xi) > 1 ? fabs(xi) : 1);
        x[i] = xi + h;
        double lp = L(ctx);
        x[i] = xi - h;
        double lm = L(ctx);
        x[i] = xi;
        g[i] = (lp - lm) / (2 * h);
    }
}

static double dot_d(const double *a, const double *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

#define FWD_TOL 1e-5
#define BWD_TOL 1e-4

/* ---- double-precision forwards (the independent expectations) ---------- */

static void d_matmul(int ta, int tb, int M, int N, int K, double alpha, const double *A, int lda, const double *B,
                     int ldb, double beta, double *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = 0; k < K; k++)
                s += (ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
            C[i * ldc + j] = alpha * s + (beta != 0 ? beta * C[i * ldc + j] : 0);
        }
}

static void d_rmsnorm(double *out, double *rstd, const double *x, const double *w, int N, int D, double eps) {
    for (int n = 0; n < N; n++) {
        double ms = dot_d(x + n * D, x + n * D, D) / D;
        double r = 1 / sqrt(ms + eps);
        for (int d = 0; d < D; d++) out[n * D + d] = x[n * D + d] * r * w[d];
        if (rstd) rstd[n] = r;
    }
}

/* RoPE as multiplication by e^{i angle} of the complex number
 * x[i] + i x[i + hd/2] (the rotate-half pairing). */
static void d_rope(double *qkv, int B, int T, int H, int hd, int pos0, double theta) {
    int D = H * hd, half = hd / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < 2 * H; c++) {
                double *v = qkv + ((size_t)(b * T + t) * 3 * D) + (size_t)c * hd;
                for (int i = 0; i < half; i++) {
                    double ang = (pos0 + t) * exp(-(2.0 * i / hd) * log(theta));
                    double re = v[i], im = v[i + half];
                    v[i] = re * cos(ang) - im * sin(ang);
                    v[i + half] = re * sin(ang) + im * cos(ang);
                }
            }
}

/* Full masked score matrix per (b, h): the textbook formulation. */
static void d_attn(double *out, double *lse, const double *qkv, int B, int T, int H, int hd) {
    int D = H * hd;
    double *S = malloc(sizeof(double) * T * T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            for (int t = 0; t < T; t++)
                for (int j = 0; j < T; j++)
                    S[t * T + j] = j > t ? -INFINITY
                                         : dot_d(qkv + (size_t)(b * T + t) * 3 * D + h * hd,
                                                 qkv + (size_t)(b * T + j) * 3 * D + D + h * hd, hd) /
                                               sqrt(hd);
            for (int t = 0; t < T; t++) {
                double mx = -INFINITY, z = 0;
                for (int j = 0; j < T; j++) mx = S[t * T + j] > mx ? S[t * T + j] : mx;
                for (int j = 0; j < T; j++) z += exp(S[t * T + j] - mx);
                if (lse) lse[(b * H + h) * T + t] = mx + log(z);
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = 0; j < T; j++)
                        acc += exp(S[t * T + j] - mx) / z * qkv[(size_t)(b * T + j) * 3 * D + 2 * D + h * hd + d];
                    out[(size_t)(b * T + t) * D + h * hd + d] = acc;
                }
            }
        }
    free(S);
}

static void d_swiglu(double *a, const double *gu, int N, int F) {
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) {
            double g = gu[n * 2 * F + f];
            a[n * F + f] = g / (1 + exp(-g)) * gu[n * 2 * F + F + f];
        }
}

static void d_xent(double *loss, const double *logits, const int32_t *tgt, int N, int V) {
    for (int n = 0; n < N; n++) {
        if (tgt[n] < 0) {
            loss[n] = 0;
            continue;
        }
        double mx = -INFINITY, z = 0;
        for (int i = 0; i < V; i++) mx = logits[n * V + i] > mx ? logits[n * V + i] : mx;
        for (int i = 0; i < V; i++) z += exp(logits[n * V + i] - mx);
        loss[n] = log(z) + mx - logits[n * V + tgt[n]];
    }
}

/* ---- matmul, add -------------------------------------------------------- */

static void test_matmul(void **state) {
    (void)state;
    int M = 5, N = 7, K = 9;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int withbeta = 0; withbeta < 2; withbeta++) {
                /* padded strides: lda etc. exceed the logical row length */
                int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
                int lda = ac + 3, ldb = bc + 2, ldc = N + 1;
                float *A = hrand((size_t)ar * lda, 1), *B = hrand((size_t)br * ldb, 1), *C = hrand((size_t)M * ldc, 1);
                float beta = withbeta ? 0.5f : 0.0f;
                if (!withbeta)
                    for (int i = 0; i < M * ldc; i++) C[i] = NAN; /* beta = 0: C must not be read */
                double *Ad = hdbl(A, (size_t)ar * lda), *Bd = hdbl(B, (size_t)br * ldb), *Cd = hdbl(C, (size_t)M * ldc);
                d_matmul(ta, tb, M, N, K, 0.7, Ad, lda, Bd, ldb, beta, Cd, ldc);
                for (int bi = 0; bi < NBE; bi++) {
                    tlm_ops *o = g_be[bi];
                    float *dA = upf(o, A, (size_t)ar * lda), *dB = upf(o, B, (size_t)br * ldb),
                          *dC = upf(o, C, (size_t)M * ldc);
                    o->matmul(o, ta, tb, M, N, K, 0.7f, dA, lda, dB, ldb, beta, dC, ldc);
                    float *got = down(o, dC, (size_t)M * ldc);
                    /* compare only the logical columns; padding must be untouched */
                    for (int i = 0; i < M; i++) {
                        char what[64];
                        snprintf(what, sizeof what, "matmul ta=%d tb=%d beta=%g row %d", ta, tb, beta, i);
                        check(what, o->name, got + i * ldc, Cd + i * ldc, N, FWD_TOL);
                        if (withbeta) assert_true(got[i * ldc + N] == C[i * ldc + N]);
                    }
                    o->free(o, dA);
                    o->free(o, dB);
                    o->free(o, dC);
                    free(got);
                }
                free(A), free(B), free(C), free(Ad), free(Bd), free(Cd);
            }
}

static void test_add_inplace(void **state) {
    (void)state;
    size_t n = 37;
    float *x = hrand(n, 1), *y = hrand(n, 1);
    double *want = hdbl(y, n);
    for (size_t i = 0; i < n; i++) want[i] += x[i];
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float *dx = upf(o, x, n), *dy = upf(o, y, n);
        o->add_inplace(o, dy, dx, n);
        float *got = down(o, dy, n);
        check("add_inplace", o->name, got, want, n, 1e-7);
        o->free(o, dx), o->free(o, dy), free(got);
    }
    free(x), free(y), free(want);
}

/* ---- embedding ---------------------------------------------------------- */

typedef struct {
    const int32_t *tok;
    double *wte;
    const double *R;
    int N, D;
} embed_ctx;

static double embed_loss(void *c) {
    embed_ctx *e = c;
    double L = 0;
    for (int n = 0; n < e->N; n++)
        for (int d = 0; d < e->D; d++) L += e->wte[e->tok[n] * e->D + d] * e->R[n * e->D + d];
    return L;
}

static void test_embed(void **state) {
    (void)state;
    int N = 6, D = 5, V = 4;
    int32_t tok[6] = {3, 0, 3, 1, 3, 0}; /* repeats must sum; token 2 unused */
    float *wte = hrand((size_t)V * D, 1), *R = hrand((size_t)N * D, 1), *g0 = hrand((size_t)V * D, 1);
    double *wd = hdbl(wte, (size_t)V * D), *Rd = hdbl(R, (size_t)N * D);
    double *fwd = malloc(sizeof(double) * N * D), *fd = malloc(sizeof(double) * V * D);
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) fwd[n * D + d] = wd[tok[n] * D + d];
    embed_ctx ctx = {tok, wd, Rd, N, D};
    fd_grad(embed_loss, &ctx, wd, (size_t)V * D, fd);
    double *once = malloc(sizeof(double) * V * D), *twice = malloc(sizeof(double) * V * D);
    for (int i = 0; i < V * D; i++) once[i] = g0[i] + fd[i], twice[i] = g0[i] + 2 * fd[i];
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        int32_t *dtok = up(o, tok, sizeof tok);
        float *dw = upf(o, wte, (size_t)V * D), *dout = upf(o, NULL, (size_t)N * D), *dR = upf(o, R, (size_t)N * D);
        float *dg = upf(o, g0, (size_t)V * D);
        o->embed_fwd(o, dout, dtok, dw, N, D);
        float *got = down(o, dout, (size_t)N * D);
        check("embed_fwd", o->name, got, fwd, (size_t)N * D, 0);
        free(got);
        o->embed_bwd(o, dg, dtok, dR, N, D); /* accumulates onto g0 */
        got = down(o, dg, (size_t)V * D);
        check("embed_bwd (+= once)", o->name, got, once, (size_t)V * D, BWD_TOL);
        free(got);
        o->embed_bwd(o, dg, dtok, dR, N, D);
        got = down(o, dg, (size_t)V * D);
        check("embed_bwd (+= twice)", o->name, got, twice, (size_t)V * D, BWD_TOL);
        free(got);
        o->free(o, dtok), o->free(o, dw), o->free(o, dout), o->free(o, dR), o->free(o, dg);
    }
    free(wte), free(R), free(g0), free(wd), free(Rd), free(fwd), free(fd), free(once), free(twice);
}

/* ---- RMSNorm ------------------------------------------------------------ */

typedef struct {
    double *x, *w;
    const double *R;
    int N, D;
    double eps;
} rms_ctx;

static double rms_loss(void *c) {
    rms_ctx *r = c;
    double *out = malloc(sizeof(double) * r->N * r->D);
    d_rmsnorm(out, NULL, r->x, r->w, r->N, r->D, r->eps);
    double L = dot_d(out, r->R, (size_t)r->N * r->D);
    free(out);
    return L;
}

static void test_rmsnorm(void **state) {
    (void)state;
    int N = 3, D = 7;
    float eps = 1e-5f;
    size_t nd = (size_t)N * D;
    float *x = hrand(nd, 1.5f), *w = hrand(D, 1), *R = hrand(nd, 1), *dw0 = hrand(D, 1);
    double *xd = hdbl(x, nd), *wd = hdbl(w, D), *Rd = hdbl(R, nd);
    double *out = malloc(sizeof(double) * nd), *rstd = malloc(sizeof(double) * N);
    d_rmsnorm(out, rstd, xd, wd, N, D, eps);
    rms_ctx ctx = {xd, wd, Rd, N, D, eps};
    double *gx = malloc(sizeof(double) * nd), *gw = malloc(sizeof(double) * D);
    fd_grad(rms_loss, &ctx, xd, nd, gx);
    fd_grad(rms_loss, &ctx, wd, D, gw);
    double *gw1 = malloc(sizeof(double) * D), *gw2 = malloc(sizeof(double) * D);
    for (int d = 0; d < D; d++) gw1[d] = dw0[d] + gw[d], gw2[d] = dw0[d] + 2 * gw[d];
    float *junk = hrand(nd, 100);
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float *dx = upf(o, x, nd), *dwt = upf(o, w, D), *dout = upf(o, NULL, nd), *drs = upf(o, NULL, N);
        float *dR = upf(o, R, nd), *ddx = upf(o, junk, nd), *ddw = upf(o, dw0, D);
        o->rmsnorm_fwd(o, dout, drs, dx, dwt, N, D, eps);
        float *got = down(o, dout, nd), *grs = down(o, drs, N);
        check("rmsnorm_fwd out", o->name, got, out, nd, FWD_TOL);
        check("rmsnorm_fwd rstd", o->name, grs, rstd, N, FWD_TOL);
        free(got), free(grs);
        o->rmsnorm_fwd(o, dout, NULL, dx, dwt, N, D, eps); /* rstd may be NULL */
        for (int rep = 1; rep <= 2; rep++) {
            o->rmsnorm_bwd(o, ddx, ddw, dR, dx, dwt, drs, N, D);
            float *gdx = down(o, ddx, nd), *gdw = down(o, ddw, D);
            check("rmsnorm_bwd dx (overwritten)", o->name, gdx, gx, nd, BWD_TOL);
            check("rmsnorm_bwd dw (accumulated)", o->name, gdw, rep == 1 ? gw1 : gw2, D, BWD_TOL);
            free(gdx), free(gdw);
        }
        o->free(o, dx), o->free(o, dwt), o->free(o, dout), o->free(o, drs), o->free(o, dR), o->free(o, ddx);
        o->free(o, ddw);
    }
    free(x), free(w), free(R), free(dw0), free(xd), free(wd), free(Rd), free(out), free(rstd), free(gx), free(gw);
    free(gw1), free(gw2), free(junk);
}

/* ---- RoPE --------------------------------------------------------------- */

typedef struct {
    double *qkv;
    const double *R;
    int B, T, H, hd, pos0;
    double theta;
} rope_ctx;

static double rope_loss(void *c) {
    rope_ctx *r = c;
    size_t n = (size_t)r->B * r->T * 3 * r->H * r->hd;
    double *y = malloc(sizeof(double) * n);
    memcpy(y, r->qkv, sizeof(double) * n);
    d_rope(y, r->B, r->T, r->H, r->hd, r->pos0, r->theta);
    double L = dot_d(y, r->R, n);
    free(y);
    return L;
}

static void test_rope(void **state) {
    (void)state;
    int B = 2, T = 3, H = 2, hd = 8;
    float theta = 10000.0f;
    size_t n = (size_t)B * T * 3 * H * hd;
    int pos0s[2] = {0, 1000}; /* a large offset checks the angle precision */
    for (int pi = 0; pi < 2; pi++) {
        int pos0 = pos0s[pi];
        float *x = hrand(n, 1), *R = hrand(n, 1);
        double *xd = hdbl(x, n), *Rd = hdbl(R, n), *want = hdbl(x, n), *g = malloc(sizeof(double) * n);
        d_rope(want, B, T, H, hd, pos0, theta);
        rope_ctx ctx = {xd, Rd, B, T, H, hd, pos0, theta};
        fd_grad(rope_loss, &ctx, xd, n, g);
        for (int bi = 0; bi < NBE; bi++) {
            tlm_ops *o = g_be[bi];
            float *d = upf(o, x, n), *dR = upf(o, R, n);
            o->rope_fwd(o, d, B, T, H, hd, pos0, theta);
            float *got = down(o, d, n);
            check(pos0 ? "rope_fwd pos0=1000" : "rope_fwd", o->name, got, want, n, FWD_TOL);
            o->rope_bwd(o, dR, B, T, H, hd, pos0, theta);
            free(got);
            got = down(o, dR, n);
            check("rope_bwd", o->name, got, g, n, BWD_TOL);
            free(got);
            o->free(o, d), o->free(o, dR);
        }
        free(x), free(R), free(xd), free(Rd), free(want), free(g);
    }
}

/* ---- attention ---------------------------------------------------------- */

typedef struct {
    double *qkv;
    const double *R;
    int B, T, H, hd;
} attn_ctx;

static double attn_loss(void *c) {
    attn_ctx *a = c;
    size_t n = (size_t)a->B * a->T * a->H * a->hd;
    double *out = malloc(sizeof(double) * n);
    d_attn(out, NULL, a->qkv, a->B, a->T, a->H, a->hd);
    double L = dot_d(out, a->R, n);
    free(out);
    return L;
}

static void test_attention(void **state) {
    (void)state;
    int B = 2, T = 5, H = 2, hd = 4, D = H * hd;
    size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, nl = (size_t)B * H * T;
    float *qkv = hrand(nq, 1), *R = hrand(no, 1), *junk = hrand(nq, 100);
    double *qd = hdbl(qkv, nq), *Rd = hdbl(R, no);
    double *out = malloc(sizeof(double) * no), *lse = malloc(sizeof(double) * nl), *g = malloc(sizeof(double) * nq);
    d_attn(out, lse, qd, B, T, H, hd);
    attn_ctx ctx = {qd, Rd, B, T, H, hd};
    fd_grad(attn_loss, &ctx, qd, nq, g);
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float *dq = upf(o, qkv, nq), *dout = upf(o, NULL, no), *dlse = upf(o, NULL, nl), *dR = upf(o, R, no);
        float *dd = upf(o, junk, nq);
        o->attn_fwd(o, dout, dlse, dq, B, T, H, hd);
        float *got = down(o, dout, no), *gl = down(o, dlse, nl);
        check("attn_fwd out", o->name, got, out, no, FWD_TOL);
        check("attn_fwd lse", o->name, gl, lse, nl, FWD_TOL);
        free(got), free(gl);
        for (int rep = 0; rep < 2; rep++) { /* overwrites: same answer twice, junk ignored */
            o->attn_bwd(o, dd, dR, dout, dlse, dq, B, T, H, hd);
            got = down(o, dd, nq);
            check("attn_bwd dqkv", o->name, got, g, nq, BWD_TOL);
            free(got);
        }
        o->free(o, dq), o->free(o, dout), o->free(o, dlse), o->free(o, dR), o->free(o, dd);
    }
    free(qkv), free(R), free(junk), free(qd), free(Rd), free(out), free(lse), free(g);
}

/* Generation: chunks of a sequence go through kv_store + attn_cached at
 * increasing pos0; each chunk's outputs must equal the matching rows of
 * full causal attention over the whole sequence. Cache slots beyond the
 * current position hold NaN, so reading them would show. */
static void test_attn_cached(void **state) {
    (void)state;
    int B = 2, Tt = 11, Tmax = 16, H = 2, hd = 8, D = H * hd;
    int chunks[][2] = {{0, 4}, {4, 1}, {5, 6}}; /* (pos0, T) */
    size_t nq = (size_t)B * Tt * 3 * D;
    float *qkv = hrand(nq, 1);
    double *qd = hdbl(qkv, nq), *full = malloc(sizeof(double) * B * Tt * D);
    d_attn(full, NULL, qd, B, Tt, H, hd);
    float *nan = malloc(sizeof(float) * B * Tmax * D);
    for (int i = 0; i < B * Tmax * D; i++) nan[i] = NAN;
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float *kc = upf(o, nan, (size_t)B * Tmax * D), *vc = upf(o, nan, (size_t)B * Tmax * D);
        for (int c = 0; c < 3; c++) {
            int pos0 = chunks[c][0], T = chunks[c][1];
            float *cq = malloc(sizeof(float) * B * T * 3 * D);
            double *want = malloc(sizeof(double) * B * T * D);
            for (int b = 0; b < B; b++)
                for (int t = 0; t < T; t++) {
                    memcpy(cq + (size_t)(b * T + t) * 3 * D, qkv + (size_t)(b * Tt + pos0 + t) * 3 * D,
                           sizeof(float) * 3 * D);
                    memcpy(want + (size_t)(b * T + t) * D, full + (size_t)(b * Tt + pos0 + t) * D,
                           sizeof(double) * D);
                }
            float *dcq = upf(o, cq, (size_t)B * T * 3 * D), *dout = upf(o, NULL, (size_t)B * T * D);
            o->kv_store(o, kc, vc, dcq, B, T, Tmax, D, pos0);
            o->attn_cached(o, dout, dcq, kc, vc, B, T, Tmax, H, hd, pos0);
            float *got = down(o, dout, (size_t)B * T * D);
            char what[64];
            snprintf(what, sizeof what, "attn_cached pos0=%d T=%d", pos0, T);
            check(what, o->name, got, want, (size_t)B * T * D, FWD_TOL);
            free(got), free(cq), free(want);
            o->free(o, dcq), o->free(o, dout);
        }
        /* the caches now hold exactly the k and v parts of rows 0..Tt-1 */
        float *k = down(o, kc, (size_t)B * Tmax * D), *v = down(o, vc, (size_t)B * Tmax * D);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < Tt; t++)
                for (int d = 0; d < D; d++) {
                    assert_true(k[(size_t)(b * Tmax + t) * D + d] == qkv[(size_t)(b * Tt + t) * 3 * D + D + d]);
                    assert_true(v[(size_t)(b * Tmax + t) * D + d] == qkv[(size_t)(b * Tt + t) * 3 * D + 2 * D + d]);
                }
        assert_true(isnan(k[(size_t)Tt * D])); /* untouched beyond the last position */
        free(k), free(v);
        o->free(o, kc), o->free(o, vc);
    }
    free(qkv), free(qd), free(full), free(nan);
}

/* ---- SwiGLU ------------------------------------------------------------- */

typedef struct {
    double *gu;
    const double *R;
    int N, F;
} swiglu_ctx;

static double swiglu_loss(void *c) {
    swiglu_ctx *s = c;
    double *a = malloc(sizeof(double) * s->N * s->F);
    d_swiglu(a, s->gu, s->N, s->F);
    double L = dot_d(a, s->R, (size_t)s->N * s->F);
    free(a);
    return L;
}

static void test_swiglu(void **state) {
    (void)state;
    int N = 3, F = 5;
    size_t na = (size_t)N * F, ng = 2 * na;
    float *gu = hrand(ng, 2), *R = hrand(na, 1), *junk = hrand(ng, 100);
    gu[0] = -30.0f, gu[1] = 30.0f; /* saturated sigmoid on both sides */
    double *gd = hdbl(gu, ng), *Rd = hdbl(R, na), *a = malloc(sizeof(double) * na), *g = malloc(sizeof(double) * ng);
    d_swiglu(a, gd, N, F);
    swiglu_ctx ctx = {gd, Rd, N, F};
    fd_grad(swiglu_loss, &ctx, gd, ng, g);
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float *dgu = upf(o, gu, ng), *da = upf(o, NULL, na), *dR = upf(o, R, na), *dd = upf(o, junk, ng);
        o->swiglu_fwd(o, da, dgu, N, F);
        float *got = down(o, da, na);
        check("swiglu_fwd", o->name, got, a, na, FWD_TOL);
        free(got);
        for (int rep = 0; rep < 2; rep++) {
            o->swiglu_bwd(o, dd, dR, dgu, N, F);
            got = down(o, dd, ng);
            check("swiglu_bwd", o->name, got, g, ng, BWD_TOL);
            free(got);
        }
        o->free(o, dgu), o->free(o, da), o->free(o, dR), o->free(o, dd);
    }
    free(gu), free(R), free(junk), free(gd), free(Rd), free(a), free(g);
}

/* ---- cross-entropy ------------------------------------------------------ */

typedef struct {
    double *logits;
    const int32_t *tgt;
    int N, V;
    double dscale;
} xent_ctx;

static double xent_loss(void *c) {
    xent_ctx *x = c;
    double *l = malloc(sizeof(double) * x->N);
    d_xent(l, x->logits, x->tgt, x->N, x->V);
    double L = 0;
    for (int n = 0; n < x->N; n++) L += x->dscale * l[n];
    free(l);
    return L;
}

static void test_xent(void **state) {
    (void)state;
    int N = 4, V = 9;
    size_t nv = (size_t)N * V;
    int32_t tgt[4] = {3, -1, 8, 0}; /* row 1 ignored */
    float *lg = hrand(nv, 2);
    for (int i = 0; i < V; i++) lg[2 * V + i] += 1000.0f; /* must not overflow */
    double *ld = hdbl(lg, nv), *loss = malloc(sizeof(double) * N), *g = malloc(sizeof(double) * nv);
    d_xent(loss, ld, tgt, N, V);
    float dscale = 0.37f;
    xent_ctx ctx = {ld, tgt, N, V, dscale};
    fd_grad(xent_loss, &ctx, ld, nv, g);
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        int32_t *dt = up(o, tgt, sizeof tgt);
        float *dl = upf(o, lg, nv), *dloss = upf(o, NULL, N);
        o->xent(o, dl, dloss, dt, N, V, dscale, 0);
        float *got = down(o, dloss, N), *kept = down(o, dl, nv);
        check("xent loss", o->name, got, loss, N, FWD_TOL);
        check_ff("xent without grad leaves logits", o->name, kept, lg, nv, 0);
        free(got), free(kept);
        o->xent(o, dl, dloss, dt, N, V, dscale, 1);
        got = down(o, dloss, N);
        check("xent loss (want_grad)", o->name, got, loss, N, FWD_TOL);
        assert_true(got[1] == 0.0f);
        free(got);
        got = down(o, dl, nv);
        check("xent grad", o->name, got, g, nv, BWD_TOL);
        for (int i = 0; i < V; i++) assert_true(got[V + i] == 0.0f); /* ignored row */
        free(got);
        o->free(o, dt), o->free(o, dl), o->free(o, dloss);
    }
    /* by hand: logits (0, 0, ln 2) -> softmax (1/4, 1/4, 1/2); target 2 */
    float row[3] = {0, 0, (float)log(2.0)};
    int32_t t2 = 2;
    double hand_loss = log(2.0), hand_grad[3] = {0.25, 0.25, -0.5};
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float *dl = upf(o, row, 3), *dloss = upf(o, NULL, 1);
        int32_t *dt = up(o, &t2, sizeof t2);
        o->xent(o, dl, dloss, dt, 1, 3, 1.0f, 1);
        float *gl = down(o, dloss, 1), *gg = down(o, dl, 3);
        check("xent by hand: loss", o->name, gl, &hand_loss, 1, FWD_TOL);
        check("xent by hand: grad", o->name, gg, hand_grad, 3, FWD_TOL);
        free(gl), free(gg);
        o->free(o, dl), o->free(o, dloss), o->free(o, dt);
    }
    free(lg), free(ld), free(loss), free(g);
}

/* ---- optimizer ---------------------------------------------------------- */

static void test_sumsq(void **state) {
    (void)state;
    float x3[3] = {1, 2, 3}, five = 5;
    size_t n = 1001;
    float *x = hrand(n, 1);
    double want = 0;
    for (size_t i = 0; i < n; i++) want += (double)x[i] * x[i];
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float *dx = upf(o, x3, 3), *dout = upf(o, &five, 1), got;
        o->sumsq(o, dout, dx, 3, 1); /* 5 + 14 */
        o->copy_d2h(o, &got, dout, sizeof got);
        assert_true(got == 19.0f);
        o->sumsq(o, dout, dx, 3, 0); /* overwrite: 14 */
        o->copy_d2h(o, &got, dout, sizeof got);
        assert_true(got == 14.0f);
        o->free(o, dx);
        dx = upf(o, x, n);
        o->sumsq(o, dout, dx, n, 1);
        o->copy_d2h(o, &got, dout, sizeof got);
        double w2 = want + 14;
        check("sumsq random", o->name, &got, &w2, 1, 1e-6);
        o->free(o, dx), o->free(o, dout);
    }
    free(x);
}

/* Two AdamW steps on two parameters, worked out by hand:
 * lr 0.1, b1 0.9, b2 0.999, eps 1e-8, wd 0.1.
 * Step 1: gnorm^2 = 16, clip 2 -> g scaled by 0.5: g = (1, 0).
 *   p0: m = 0.1, v = 0.001, mhat = vhat = 1 -> p = 1 - 0.1 (1 + 0.1 * 1) = 0.89
 *   p1: m = v = 0 -> p = -0.5 - 0.1 (0.1 * -0.5) = -0.495
 * Step 2: gnorm^2 = 16 but clip 10 > 4: no scaling; g = (-1, 3).
 *   p0: m = -0.01, v = 0.001999, mhat = -0.01/0.19, vhat = 1
 *       -> p = 0.89 - 0.1 (-0.0526316 + 0.089) = 0.8863632
 *   p1: m = 0.3, v = 0.009, mhat = 0.3/0.19, vhat = 0.009/0.001999
 *       -> p = -0.495 - 0.1 (1.5789474/2.1218509 - 0.0495) = -0.5644637 */
static void test_adamw(void **state) {
    (void)state;
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        float p0[2] = {1.0f, -0.5f}, g1[2] = {2.0f, 0.0f}, g2[2] = {-1.0f, 3.0f}, gn = 16.0f;
        float *p = upf(o, p0, 2), *g = upf(o, g1, 2), *m = upf(o, NULL, 2), *v = upf(o, NULL, 2);
        float *dgn = upf(o, &gn, 1);
        o->adamw(o, p, g, m, v, 2, 0.1f, 0.9f, 0.999f, 1e-8f, 0.1f, 1, dgn, 2.0f);
        float *got = down(o, p, 2), *gm = down(o, m, 2), *gv = down(o, v, 2);
        double w1[2] = {0.89, -0.495}, m1[2] = {0.1, 0}, v1[2] = {0.001, 0};
        check("adamw step 1 p", o->name, got, w1, 2, 1e-6);
        check("adamw step 1 m", o->name, gm, m1, 2, 1e-6);
        /* 1 - 0.999f is 0.001 only to 1.3e-5: the float b2 is not 0.999 */
        check("adamw step 1 v", o->name, gv, v1, 2, 2e-5);
        free(got), free(gm), free(gv);
        o->copy_h2d(o, g, g2, sizeof g2);
        o->adamw(o, p, g, m, v, 2, 0.1f, 0.9f, 0.999f, 1e-8f, 0.1f, 2, dgn, 10.0f);
        got = down(o, p, 2);
        double w2[2] = {0.8863631588, -0.5644636820};
        check("adamw step 2 p", o->name, got, w2, 2, 1e-6);
        free(got);
        /* clip 0: no clipping, gnorm_sq may be NULL */
        o->adamw(o, p, g, m, v, 2, 0.0f, 0.9f, 0.999f, 1e-8f, 0.1f, 3, NULL, 0.0f);
        got = down(o, p, 2);
        check("adamw lr 0 keeps p", o->name, got, w2, 2, 1e-6);
        free(got);
        o->free(o, p), o->free(o, g), o->free(o, m), o->free(o, v), o->free(o, dgn);
    }
}

/* ---- fast against reference on larger, odd shapes ----------------------- */

static tlm_ops *REF(void) { return g_be[0]; }
static tlm_ops *FAST(void) { return g_be[1]; }

/* Run the same op on both backends from the same host inputs and compare one
 * output buffer; the macros keep each case to its essentials. */
static void cmp_out(const char *what, tlm_ops *r, float *rd, tlm_ops *f, float *fd, size_t n, double tol) {
    float *a = down(r, rd, n), *b = down(f, fd, n);
    double *ad = hdbl(a, n);
    check(what, "cpu vs cpu-ref", b, ad, n, tol);
    free(a), free(b), free(ad);
}

static void test_fast_vs_ref_dense(void **state) {
    (void)state;
    tlm_ops *r = REF(), *f = FAST();
    int shapes[][3] = {{67, 45, 129}, {1, 33, 70}, {37, 1, 16}, {3, 130, 1}};
    for (int s = 0; s < 4; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) {
                float *A = hrand((size_t)M * K, 1), *B = hrand((size_t)K * N, 1), *C = hrand((size_t)M * N, 1);
                float *rA = upf(r, A, (size_t)M * K), *rB = upf(r, B, (size_t)K * N), *rC = upf(r, C, (size_t)M * N);
                float *fA = upf(f, A, (size_t)M * K), *fB = upf(f, B, (size_t)K * N), *fC = upf(f, C, (size_t)M * N);
                int lda = ta ? M : K, ldb = tb ? K : N;
                r->matmul(r, ta, tb, M, N, K, 1.3f, rA, lda, rB, ldb, 1.0f, rC, N);
                f->matmul(f, ta, tb, M, N, K, 1.3f, fA, lda, fB, ldb, 1.0f, fC, N);
                cmp_out("matmul", r, rC, f, fC, (size_t)M * N, 1e-4);
                r->free(r, rA), r->free(r, rB), r->free(r, rC), f->free(f, fA), f->free(f, fB), f->free(f, fC);
                free(A), free(B), free(C);
            }
    }
    /* add, sumsq, adamw over sizes past the threading threshold */
    size_t n = 40007;
    float *x = hrand(n, 1), *y = hrand(n, 1), *m = hrand(n, 0.1f), *v = hrand(n, 0.1f);
    for (size_t i = 0; i < n; i++) v[i] = v[i] * v[i];
    float *rx = upf(r, x, n), *ry = upf(r, y, n), *fx = upf(f, x, n), *fy = upf(f, y, n);
    r->add_inplace(r, ry, rx, n), f->add_inplace(f, fy, fx, n);
    cmp_out("add_inplace", r, ry, f, fy, n, 1e-7);
    float *rs = upf(r, NULL, 1), *fs = upf(f, NULL, 1);
    r->sumsq(r, rs, rx, n, 0), f->sumsq(f, fs, fx, n, 0);
    cmp_out("sumsq", r, rs, f, fs, 1, 1e-6);
    float *rm = upf(r, m, n), *rv = upf(r, v, n), *fm = upf(f, m, n), *fv = upf(f, v, n);
    for (int t = 1; t <= 2; t++) {
        r->adamw(r, ry, rx, rm, rv, n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, rs, 1.0f);
        f->adamw(f, fy, fx, fm, fv, n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, fs, 1.0f);
    }
    cmp_out("adamw p", r, ry, f, fy, n, 1e-5);
    cmp_out("adamw m", r, rm, f, fm, n, 1e-5);
    cmp_out("adamw v", r, rv, f, fv, n, 1e-5);
    r->free(r, rx), r->free(r, ry), r->free(r, rs), r->free(r, rm), r->free(r, rv);
    f->free(f, fx), f->free(f, fy), f->free(f, fs), f->free(f, fm), f->free(f, fv);
    free(x), free(y), free(m), free(v);
}

static void test_fast_vs_ref_rows(void **state) {
    (void)state;
    tlm_ops *r = REF(), *f = FAST();
    int shapes[][2] = {{1, 67}, {37, 520}, {5, 3}};
    for (int s = 0; s < 3; s++) {
        int N = shapes[s][0], D = shapes[s][1], V = 50;
        size_t nd = (size_t)N * D;
        /* embedding, with repeated tokens */
        int32_t *tok = malloc(sizeof(int32_t) * N);
        for (int i = 0; i < N; i++) tok[i] = (int32_t)tlm_rng_below(&g_rng, 7);
        float *wte = hrand((size_t)V * D, 1), *x = hrand(nd, 1), *w = hrand(D, 1), *R = hrand(nd, 1);
        int32_t *rt = up(r, tok, sizeof(int32_t) * N), *ft = up(f, tok, sizeof(int32_t) * N);
        float *rw = upf(r, wte, (size_t)V * D), *fw = upf(f, wte, (size_t)V * D);
        float *ro = upf(r, NULL, nd), *fo = upf(f, NULL, nd), *rR = upf(r, R, nd), *fR = upf(f, R, nd);
        r->embed_fwd(r, ro, rt, rw, N, D), f->embed_fwd(f, fo, ft, fw, N, D);
        cmp_out("embed_fwd", r, ro, f, fo, nd, 0);
        r->embed_bwd(r, rw, rt, rR, N, D), f->embed_bwd(f, fw, ft, fR, N, D);
        cmp_out("embed_bwd", r, rw, f, fw, (size_t)V * D, 1e-6);
        /* rmsnorm */
        float *rx = upf(r, x, nd), *fx = upf(f, x, nd), *rwt = upf(r, w, D), *fwt = upf(f, w, D);
        float *rrs = upf(r, NULL, N), *frs = upf(f, NULL, N), *rdw = upf(r, NULL, D), *fdw = upf(f, NULL, D);
        r->rmsnorm_fwd(r, ro, rrs, rx, rwt, N, D, 1e-6f), f->rmsnorm_fwd(f, fo, frs, fx, fwt, N, D, 1e-6f);
        cmp_out("rmsnorm_fwd", r, ro, f, fo, nd, 1e-5);
        cmp_out("rmsnorm_fwd rstd", r, rrs, f, frs, N, 1e-5);
        r->rmsnorm_bwd(r, ro, rdw, rR, rx, rwt, rrs, N, D), f->rmsnorm_bwd(f, fo, fdw, fR, fx, fwt, frs, N, D);
        cmp_out("rmsnorm_bwd dx", r, ro, f, fo, nd, 1e-4);
        cmp_out("rmsnorm_bwd dw", r, rdw, f, fdw, D, 1e-4);
        /* swiglu with F = D/2 (gu has 2F = D columns) */
        if (D % 2 == 0) {
            int F = D / 2;
            float *ra = upf(r, NULL, (size_t)N * F), *fa = upf(f, NULL, (size_t)N * F);
            r->swiglu_fwd(r, ra, rx, N, F), f->swiglu_fwd(f, fa, fx, N, F);
            cmp_out("swiglu_fwd", r, ra, f, fa, (size_t)N * F, 1e-5);
            r->swiglu_bwd(r, ro, rR, rx, N, F), f->swiglu_bwd(f, fo, fR, fx, N, F);
            cmp_out("swiglu_bwd", r, ro, f, fo, nd, 1e-5);
            r->free(r, ra), f->free(f, fa);
        }
        /* xent: row n of x as logits over V = D classes */
        int32_t *tg = malloc(sizeof(int32_t) * N);
        for (int i = 0; i < N; i++) tg[i] = i % 5 == 4 ? -1 : (int32_t)tlm_rng_below(&g_rng, (uint64_t)D);
        int32_t *rtg = up(r, tg, sizeof(int32_t) * N), *ftg = up(f, tg, sizeof(int32_t) * N);
        float *rl = upf(r, NULL, N), *fl = upf(f, NULL, N);
        r->xent(r, rx, rl, rtg, N, D, 0.01f, 1), f->xent(f, fx, fl, ftg, N, D, 0.01f, 1);
        cmp_out("xent losses", r, rl, f, fl, N, 1e-5);
        cmp_out("xent grad", r, rx, f, fx, nd, 1e-5);
        free(tok), free(tg), free(wte), free(x), free(w), free(R);
        r->free(r, rt), f->free(f, ft), r->free(r, rw), f->free(f, fw), r->free(r, ro), f->free(f, fo);
        r->free(r, rR), f->free(f, fR), r->free(r, rx), f->free(f, fx), r->free(r, rwt), f->free(f, fwt);
        r->free(r, rrs), f->free(f, frs), r->free(r, rdw), f->free(f, fdw), r->free(r, rtg), f->free(f, ftg);
        r->free(r, rl), f->free(f, fl);
    }
}

static void test_fast_vs_ref_attention(void **state) {
    (void)state;
    tlm_ops *r = REF(), *f = FAST();
    int shapes[][4] = {{2, 37, 2, 8}, {1, 29, 3, 16}, {2, 23, 1, 32}, {1, 19, 2, 64}, {3, 1, 2, 16}, {1, 9, 1, 128}};
    for (int s = 0; s < 6; s++) {
        int B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], hd = shapes[s][3], D = H * hd;
        size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, nl = (size_t)B * H * T;
        float *qkv = hrand(nq, 1), *R = hrand(no, 1);
        float *rq = upf(r, qkv, nq), *fq = upf(f, qkv, nq), *rR = upf(r, R, no), *fR = upf(f, R, no);
        int pos0 = 3 * s; /* rope at an offset */
        r->rope_fwd(r, rq, B, T, H, hd, pos0, 10000.0f), f->rope_fwd(f, fq, B, T, H, hd, pos0, 10000.0f);
        cmp_out("rope_fwd", r, rq, f, fq, nq, 1e-5);
        float *ro = upf(r, NULL, no), *fo = upf(f, NULL, no), *rl = upf(r, NULL, nl), *fl = upf(f, NULL, nl);
        r->attn_fwd(r, ro, rl, rq, B, T, H, hd), f->attn_fwd(f, fo, fl, fq, B, T, H, hd);
        cmp_out("attn_fwd out", r, ro, f, fo, no, 1e-5);
        cmp_out("attn_fwd lse", r, rl, f, fl, nl, 1e-5);
        float *rd = upf(r, NULL, nq), *fdq = upf(f, NULL, nq);
        r->attn_bwd(r, rd, rR, ro, rl, rq, B, T, H, hd), f->attn_bwd(f, fdq, fR, fo, fl, fq, B, T, H, hd);
        cmp_out("attn_bwd", r, rd, f, fdq, nq, 1e-4);
        r->rope_bwd(r, rd, B, T, H, hd, pos0, 10000.0f), f->rope_bwd(f, fdq, B, T, H, hd, pos0, 10000.0f);
        cmp_out("rope_bwd", r, rd, f, fdq, nq, 1e-4);
        /* cached attention of the last rows against the whole prefix */
        int Tmax = T + 5, p0 = T > 3 ? T - 3 : 0, Tc = T - p0;
        float *rk = upf(r, NULL, (size_t)B * Tmax * D), *rv = upf(r, NULL, (size_t)B * Tmax * D);
        float *fk = upf(f, NULL, (size_t)B * Tmax * D), *fv = upf(f, NULL, (size_t)B * Tmax * D);
        r->kv_store(r, rk, rv, rq, B, T, Tmax, D, 0), f->kv_store(f, fk, fv, fq, B, T, Tmax, D, 0);
        cmp_out("kv_store k", r, rk, f, fk, (size_t)B * Tmax * D, 1e-5);
        cmp_out("kv_store v", r, rv, f, fv, (size_t)B * Tmax * D, 1e-5);
        float *cq = malloc(sizeof(float) * B * Tc * 3 * D), *qh = down(f, fq, nq);
        for (int b = 0; b < B; b++)
            memcpy(cq + (size_t)b * Tc * 3 * D, qh + (size_t)(b * T + p0) * 3 * D, sizeof(float) * Tc * 3 * D);
        float *rc = upf(r, cq, (size_t)B * Tc * 3 * D), *fc = upf(f, cq, (size_t)B * Tc * 3 * D);
        r->attn_cached(r, ro, rc, rk, rv, B, Tc, Tmax, H, hd, p0);
        f->attn_cached(f, fo, fc, fk, fv, B, Tc, Tmax, H, hd, p0);
        cmp_out("attn_cached", r, ro, f, fo, (size_t)B * Tc * D, 1e-5);
        free(qkv), free(R), free(cq), free(qh);
        r->free(r, rq), f->free(f, fq), r->free(r, rR), f->free(f, fR), r->free(r, ro), f->free(f, fo);
        r->free(r, rl), f->free(f, fl), r->free(r, rd), f->free(f, fdq), r->free(r, rk), r->free(r, rv);
        f->free(f, fk), f->free(f, fv), r->free(r, rc), f->free(f, fc);
    }
}


/* ---- the fast backend's blocked kernels --------------------------------- */
/* Where the build has AVX-512, the fast backend multiplies with its own
 * packed micro-kernel (14 x 32 blocks of C, K in passes of 256, packed B in
 * blocks of N) and runs attention in blocks of 112 queries. The small
 * shapes above never cross those boundaries; these do: K over several
 * passes, N over several packed blocks, row tails of 14 and column tails of
 * 32, products large enough to be split over threads along M and along N,
 * attention with several query blocks and head sizes that take several or
 * partial 32-column passes. Also: the result must not depend on the thread
 * count (bit for bit), so that a run resumed with another --threads
 * continues exactly. */

static void test_matmul_blocked(void **state) {
    (void)state;
    tlm_ops *f = FAST(), *f1 = cpu_ops_create(1);
    assert_non_null(f1);
    /* {M, N, K}: split along N; split along M; N over two packed blocks;
     * single-threaded tails (below the threading threshold) */
    int shapes[][3] = {{60, 600, 300}, {300, 50, 300}, {40, 1100, 300}, {45, 33, 17}};
    for (int s = 0; s < 4; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int withbeta = 0; withbeta < 2; withbeta++) {
                    int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                    int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
                    int lda = ac + 3, ldb = bc + 5, ldc = N + 2;
                    float *A = hrand((size_t)ar * lda, 1), *B = hrand((size_t)br * ldb, 1);
                    float *C = hrand((size_t)M * ldc, 1);
                    float beta = withbeta ? 0.5f : 0.0f;
                    if (!withbeta)
                        for (int i = 0; i < M; i++)
                            for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] = NAN; /* must not be read */
                    double *Ad = hdbl(A, (size_t)ar * lda), *Bd = hdbl(B, (size_t)br * ldb);
                    double *Cd = hdbl(C, (size_t)M * ldc);
                    d_matmul(ta, tb, M, N, K, 0.7, Ad, lda, Bd, ldb, beta, Cd, ldc);
                    float *got[2];
                    tlm_ops *be[2] = {f, f1};
                    for (int bi = 0; bi < 2; bi++) {
                        tlm_ops *o = be[bi];
                        float *dA = upf(o, A, (size_t)ar * lda), *dB = upf(o, B, (size_t)br * ldb),
                              *dC = upf(o, C, (size_t)M * ldc);
                        o->matmul(o, ta, tb, M, N, K, 0.7f, dA, lda, dB, ldb, beta, dC, ldc);
                        got[bi] = down(o, dC, (size_t)M * ldc);
                        o->free(o, dA), o->free(o, dB), o->free(o, dC);
                    }
                    for (int i = 0; i < M; i++) {
                        char what[96];
                        snprintf(what, sizeof what, "matmul %dx%dx%d ta=%d tb=%d beta=%g row %d", M, N, K, ta, tb,
                                 beta, i);
                        check(what, f->name, got[0] + (size_t)i * ldc, Cd + (size_t)i * ldc, N, FWD_TOL);
                        /* the padding of C is never written */
                        for (int j = N; j < ldc; j++)
                            assert_memory_equal(&got[0][(size_t)i * ldc + j], &C[(size_t)i * ldc + j], sizeof(float));
                    }
#if defined(__AVX512F__)
                    /* 2 threads and 1 thread: the same bits (our kernels;
                     * builds without AVX-512 multiply through BLAS, which
                     * promises no such thing) */
                    assert_memory_equal(got[0], got[1], sizeof(float) * (size_t)M * ldc);
#endif
                    free(got[0]), free(got[1]);
                    free(A), free(B), free(C), free(Ad), free(Bd), free(Cd);
                }
    ops_destroy(f1);
}

static void test_attention_blocked(void **state) {
    (void)state;
    tlm_ops *r = REF(), *f = FAST(), *f1 = cpu_ops_create(1);
    assert_non_null(f1);
    /* {B, T, H, hd, scale, tolerances}: 2 query blocks; 3 blocks with a
     * short last one; hd = 80 takes 32 + 32 + 16 columns; hd = 8 one partial
     * pass; a peaked softmax (q, k, v scaled by 4: scores of ~16), whose
     * float32 rounding is ~16x larger (the original row-by-row kernels
     * measured up to 2.8e-5 on it) */
    struct { int B, T, H, hd; float scale; double ftol, btol; } sh[] = {
        {1, 150, 2, 32, 1, 1e-5, 1e-4}, {1, 260, 1, 16, 1, 1e-5, 1e-4}, {2, 120, 1, 80, 1, 1e-5, 1e-4},
        {1, 113, 2, 8, 1, 1e-5, 1e-4},  {1, 130, 1, 32, 4, 2e-4, 1e-3}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int B = sh[s].B, T = sh[s].T, H = sh[s].H, hd = sh[s].hd, D = H * hd;
        size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, nl = (size_t)B * H * T;
        float *qkv = hrand(nq, sh[s].scale), *R = hrand(no, 1);
        float *rq = upf(r, qkv, nq), *rR = upf(r, R, no), *ro = upf(r, NULL, no), *rl = upf(r, NULL, nl);
        float *rd = upf(r, NULL, nq);
        r->attn_fwd(r, ro, rl, rq, B, T, H, hd);
        r->attn_bwd(r, rd, rR, ro, rl, rq, B, T, H, hd);
        float *out[2], *lse[2], *dq[2];
        tlm_ops *be[2] = {f, f1};
        for (int bi = 0; bi < 2; bi++) {
            tlm_ops *o = be[bi];
            float *fq = upf(o, qkv, nq), *fR = upf(o, R, no), *fo = upf(o, NULL, no), *fl = upf(o, NULL, nl);
            float *fd = upf(o, NULL, nq);
            o->attn_fwd(o, fo, fl, fq, B, T, H, hd);
            o->attn_bwd(o, fd, fR, fo, fl, fq, B, T, H, hd);
            out[bi] = down(o, fo, no), lse[bi] = down(o, fl, nl), dq[bi] = down(o, fd, nq);
            o->free(o, fq), o->free(o, fR), o->free(o, fo), o->free(o, fl), o->free(o, fd);
        }
        char what[96];
        snprintf(what, sizeof what, "attn_fwd out B%d T%d H%d hd%d", B, T, H, hd);
        float *ho = down(r, ro, no), *hl = down(r, rl, nl), *hd_ = down(r, rd, nq);
        check_ff(what, f->name, out[0], ho, no, sh[s].ftol);
        snprintf(what, sizeof what, "attn_fwd lse B%d T%d H%d hd%d", B, T, H, hd);
        check_ff(what, f->name, lse[0], hl, nl, sh[s].ftol);
        snprintf(what, sizeof what, "attn_bwd B%d T%d H%d hd%d", B, T, H, hd);
        check_ff(what, f->name, dq[0], hd_, nq, sh[s].btol);
        assert_memory_equal(out[0], out[1], sizeof(float) * no);
        assert_memory_equal(lse[0], lse[1], sizeof(float) * nl);
        assert_memory_equal(dq[0], dq[1], sizeof(float) * nq);
        for (int bi = 0; bi < 2; bi++) free(out[bi]), free(lse[bi]), free(dq[bi]);
        free(ho), free(hl), free(hd_), free(qkv), free(R);
        r->free(r, rq), r->free(r, rR), r->free(r, ro), r->free(r, rl), r->free(r, rd);
    }
    ops_destroy(f1);
}


/* rmsnorm_bwd's dw and sumsq reduce over rows / elements: they sum in fixed
 * chunks, so 1 and 2 threads give the same bits (as matmul and attention,
 * checked above). Sizes past the threading threshold and several chunks. */
static void test_thread_invariance(void **state) {
    (void)state;
    tlm_ops *f = FAST(), *f1 = cpu_ops_create(1);
    assert_non_null(f1);
    tlm_ops *be[2] = {f, f1};
    int N = 300, D = 100;
    size_t nd = (size_t)N * D, n = 200003;
    float *x = hrand(nd, 1), *w = hrand(D, 1), *g = hrand(nd, 1), *rs = hrand(N, 0.1f), *big = hrand(n, 1);
    for (int i = 0; i < N; i++) rs[i] = 1.0f + fabsf(rs[i]);
    float *dx[2], *dw[2], *ss[2];
    for (int bi = 0; bi < 2; bi++) {
        tlm_ops *o = be[bi];
        float *ox = upf(o, x, nd), *ow = upf(o, w, D), *og = upf(o, g, nd), *ors = upf(o, rs, N);
        float *odx = upf(o, NULL, nd), *odw = upf(o, NULL, D), *obig = upf(o, big, n), *oss = upf(o, NULL, 1);
        o->rmsnorm_bwd(o, odx, odw, og, ox, ow, ors, N, D);
        o->sumsq(o, oss, obig, n, 0);
        dx[bi] = down(o, odx, nd), dw[bi] = down(o, odw, D), ss[bi] = down(o, oss, 1);
        o->free(o, ox), o->free(o, ow), o->free(o, og), o->free(o, ors), o->free(o, odx), o->free(o, odw);
        o->free(o, obig), o->free(o, oss);
    }
    assert_memory_equal(dx[0], dx[1], sizeof(float) * nd);
    assert_memory_equal(dw[0], dw[1], sizeof(float) * D);
    assert_memory_equal(ss[0], ss[1], sizeof(float));
    /* and they are right: sumsq against a double sum */
    double want = 0;
    for (size_t i = 0; i < n; i++) want += (double)big[i] * big[i];
    check("sumsq large", f->name, ss[0], &want, 1, 1e-6);
    for (int bi = 0; bi < 2; bi++) free(dx[bi]), free(dw[bi]), free(ss[bi]);
    free(x), free(w), free(g), free(rs), free(big);
    ops_destroy(f1);
}

/* loss_mean is the host's old loss loop moved behind the op table: on the
 * CPU it must give that loop's float bit for bit (resumed runs and loss
 * curves compare exactly). The CPU backends run synchronously and cannot
 * fail, so they leave the upload block and status unset. */
static void test_loss_mean(void **state) {
    (void)state;
    const int N = 1001;
    float *l = hrand((size_t)N, 3);
    int32_t *tg = malloc((size_t)N * sizeof *tg);
    assert_non_null(tg);
    for (int i = 0; i < N; i++) {
        l[i] = fabsf(l[i]) + 0.5f;
        tg[i] = i % 7 == 2 ? -1 : i % 13;
    }
    double sum = 0;
    long count = 0;
    for (int i = 0; i < N; i++)
        if (tg[i] >= 0) sum += l[i], count++;
    const float want = (float)(sum / (double)count);
    for (int bi = 0; bi < NBE; bi++) {
        tlm_ops *o = g_be[bi];
        assert_null(o->status);
        assert_true(!o->event_create && !o->event_destroy && !o->event_record && !o->copy_h2d_async && !o->event_done);
        float *dl = upf(o, l, (size_t)N), *out = upf(o, NULL, 1);
        int32_t *dt = up(o, tg, (size_t)N * sizeof *tg);
        o->loss_mean(o, out, dl, dt, N);
        float *got = down(o, out, 1);
        if (memcmp(got, &want, sizeof want)) fail_msg("%s loss_mean %.9g, the host loop %.9g", o->name, *got, want);
        free(got);
        o->loss_mean(o, out, dl, dt, 0); /* no rows */
        got = down(o, out, 1);
        assert_true(got[0] == 0.0f);
        free(got);
        o->free(o, dl), o->free(o, out), o->free(o, dt);
    }
    free(l);
    free(tg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_add_inplace),
        cmocka_unit_test(test_embed),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attn_cached),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_xent),
        cmocka_unit_test(test_sumsq),
        cmocka_unit_test(test_adamw),
        cmocka_unit_test(test_fast_vs_ref_dense),
        cmocka_unit_test(test_fast_vs_ref_rows),
        cmocka_unit_test(test_fast_vs_ref_attention),
        cmocka_unit_test(test_matmul_blocked),
        cmocka_unit_test(test_attention_blocked),
        cmocka_unit_test(test_thread_invariance),
        cmocka_unit_test(test_loss_mean),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
