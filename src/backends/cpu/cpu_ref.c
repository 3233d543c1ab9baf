/*
 * The reference CPU backend: every op of ops.h as plain single-threaded
 * loops that follow the formulas in ops.h line by line. It is the yardstick
 * the tests hold the fast backends against, so clarity beats speed here.
 * Sums are accumulated in double so the reference is the more accurate side.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cpu/cpu_internal.h"
#include "ops/ops.h"
#include "util/common.h"

/* ---- dense algebra ------------------------------------------------------ */

static void ref_matmul(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                       int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    (void)o;
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            double acc = 0;
            for (int k = 0; k < K; k++) {
                float a = transA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = transB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += (double)a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            /* BLAS semantics: with beta == 0, C is not read (may hold NaN). */
            *c = beta == 0.0f ? (float)(alpha * acc) : (float)(alpha * acc + (double)beta * *c);
        }
    }
}

static void ref_add_inplace(tlm_ops *o, float *y, const float *x, size_t n) {
    (void)o;
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* ---- embedding ---------------------------------------------------------- */

static void ref_embed_fwd(tlm_ops *o, float *out, const int32_t *tok, const float *wte, int N, int D) {
    (void)o;
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) out[(size_t)n * D + d] = wte[(size_t)tok[n] * D + d];
}

static void ref_embed_bwd(tlm_ops *o, float *dwte, const int32_t *tok, const float *dout, int N, int D) {
    (void)o;
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) dwte[(size_t)tok[n] * D + d] += dout[(size_t)n * D + d];
}

/* ---- RMSNorm ------------------------------------------------------------ */

static void ref_rmsnorm_fwd(tlm_ops *o, void *out_, float *rstd, const float *x, const float *w, int N, int D,
                            float eps) {
    (void)o;
    /* act_dtype is TLM_ACT_F32 here: activations are floats */
    float *out = out_;
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        double ss = 0;
        for (int d = 0; d < D; d++) ss += (double)xr[d] * xr[d];
        double r = 1.0 / sqrt(ss / D + eps);
        for (int d = 0; d < D; d++) out[(size_t)n * D + d] = (float)(xr[d] * r * w[d]);
        if (rstd) rstd[n] = (float)r;
    }
}

/* With y_i = x_i r w_i and r = (mean(x^2)+eps)^(-1/2), dr/dx_j = -r^3 x_j / D, so
 * dx_j = r w_j g_j - x_j r^3 / D * sum_i g_i w_i x_i. */
static void ref_rmsnorm_bwd(tlm_ops *o, float *dx, float *dw, const void *dout_, const float *x, const float *w,
                            const float *rstd, int N, int D) {
    (void)o;
    const float *dout = dout_;
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *g = dout + (size_t)n * D;
        double r = rstd[n];
        double dot = 0;
        for (int d = 0; d < D; d++) dot += (double)g[d] * w[d] * xr[d];
        for (int d = 0; d < D; d++) {
            dx[(size_t)n * D + d] = (float)(r * w[d] * g[d] - xr[d] * r * r * r * dot / D);
            dw[d] += (float)(g[d] * xr[d] * r);
        }
    }
}

/* ---- RoPE --------------------------------------------------------------- */

/* Rotate pairs (i, i+hd/2) of the q and k heads of qkv[B,T,3D] by +angle
 * (dir = 1) or -angle (dir = -1, the transpose, i.e. the backward). */
static void ref_rope(float *qkv, int B, int T, int H, int hd, int pos0, float theta, int dir) {
    int D = H * hd, half = hd / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int part = 0; part < 2; part++) /* q, then k */
                for (int h = 0; h < H; h++) {
                    float *v = qkv + ((size_t)b * T + t) * 3 * D + (size_t)part * D + (size_t)h * hd;
                    for (int i = 0; i < half; i++) {
                        double freq = pow((double)theta, -2.0 * i / hd);
                        double ang = (double)(pos0 + t) * freq;
                        double c = cos(ang), s = dir * sin(ang);
                        double x0 = v[i], x1 = v[i + half];
                        v[i] = (float)(x0 * c - x1 * s);
                        v[i + half] = (float)(x0 * s + x1 * c);
                    }
                }
}

static void ref_rope_fwd(tlm_ops *o, void *qkv, int B, int T, int H, int hd, int pos0, float theta) {
    (void)o;
    ref_rope(qkv, B, T, H, hd, pos0, theta, 1);
}

static void ref_rope_bwd(tlm_ops *o, void *dqkv, int B, int T, int H, int hd, int pos0, float theta) {
    (void)o;
    ref_rope(dqkv, B, T, H, hd, pos0, theta, -1);
}

/* ---- causal attention --------------------------------------------------- */

/* Row t of head h: softmax over keys 0..nk-1 of scale * q . k_j, then the
 * weighted sum of values. q, keys and values are addressed by row strides so
 * the same loop serves qkv (stride 3D) and the KV cache (stride D).
 * p is scratch of nk doubles. Returns the log-sum-exp of the scores. */
static double ref_attn_row(float *out, const float *q, const float *k, const float *v, size_t kvstride, int nk,
                           int hd, double *p) {
    double scale = 1.0 / sqrt((double)hd);
    double mx = -INFINITY;
    for (int j = 0; j < nk; j++) {
        double s = 0;
        for (int d = 0; d < hd; d++) s += (double)q[d] * k[(size_t)j * kvstride + d];
        p[j] = s * scale;
        if (p[j] > mx) mx = p[j];
    }
    double sum = 0;
    for (int j = 0; j < nk; j++) sum += exp(p[j] - mx);
    for (int d = 0; d < hd; d++) {
        double acc = 0;
        for (int j = 0; j < nk; j++) acc += exp(p[j] - mx) / sum * v[(size_t)j * kvstride + d];
        out[d] = (float)acc;
    }
    return mx + log(sum);
}

static void ref_attn_fwd(tlm_ops *o, void *out_, float *lse, const void *qkv_, int B, int T, int H, int hd) {
    (void)o;
    float *out = out_;
    const float *qkv = qkv_;
    int D = H * hd;
    double *p = malloc(sizeof(double) * (size_t)(T > 0 ? T : 1));
    if (!p) abort(); /* T doubles; an op has no error path and this cannot happen in practice */
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *base = qkv + (size_t)b * T * 3 * D;
                const float *q = base + (size_t)t * 3 * D + (size_t)h * hd;
                const float *k = base + D + (size_t)h * hd;
                const float *v = base + 2 * D + (size_t)h * hd;
                double l = ref_attn_row(out + ((size_t)b * T + t) * D + (size_t)h * hd, q, k, v, (size_t)3 * D,
                                        t + 1, hd, p);
                lse[((size_t)b * H + h) * T + t] = (float)l;
            }
    free(p);
}

/* P_tj = exp(s_tj - lse_t); dP_tj = dout_t . v_j; dS = P (dP - dout_t . out_t);
 * dq_t = scale sum_j dS_tj k_j; dk_j = scale sum_t dS_tj q_t; dv_j = sum_t P_tj dout_t. */
static void ref_attn_bwd(tlm_ops *o, void *dqkv_, const void *dout_, const void *out_, const float *lse,
                         const void *qkv_, int B, int T, int H, int hd) {
    (void)o;
    float *dqkv = dqkv_;
    const float *dout = dout_, *out = out_, *qkv = qkv_;
    int D = H * hd;
    double scale = 1.0 / sqrt((double)hd);
    memset(dqkv, 0, sizeof(float) * (size_t)B * T * 3 * D);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                size_t row = (size_t)b * T;
                const float *q = qkv + (row + t) * 3 * D + (size_t)h * hd;
                const float *go = dout + (row + t) * D + (size_t)h * hd;
                const float *ot = out + (row + t) * D + (size_t)h * hd;
                float *dq = dqkv + (row + t) * 3 * D + (size_t)h * hd;
                double l = lse[((size_t)b * H + h) * T + t];
                double di = 0;
                for (int d = 0; d < hd; d++) di += (double)go[d] * ot[d];
                for (int j = 0; j <= t; j++) {
                    const float *k = qkv + (row + j) * 3 * D + D + (size_t)h * hd;
                    const float *v = qkv + (row + j) * 3 * D + 2 * D + (size_t)h * hd;
                    float *dk = dqkv + (row + j) * 3 * D + D + (size_t)h * hd;
                    float *dv = dqkv + (row + j) * 3 * D + 2 * D + (size_t)h * hd;
                    double s = 0, dp = 0;
                    for (int d = 0; d < hd; d++) {
                        s += (double)q[d] * k[d];
                        dp += (double)go[d] * v[d];
                    }
                    double p = exp(s * scale - l);
                    double ds = p * (dp - di);
                    for (int d = 0; d < hd; d++) {
                        dq[d] += (float)(scale * ds * k[d]);
                        dk[d] += (float)(scale * ds * q[d]);
                        dv[d] += (float)(p * go[d]);
                    }
                }
            }
}

/* ---- KV cache ----------------------------------------------------------- */

static void ref_kv_store(tlm_ops *o, float *kc, float *vc, const void *qkv_, int B, int T, int Tmax, int D,
                         int pos0) {
    (void)o;
    const float *qkv = qkv_;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++) {
                size_t src = ((size_t)b * T + t) * 3 * D, dst = ((size_t)b * Tmax + pos0 + t) * D;
                kc[dst + d] = qkv[src + D + d];
                vc[dst + d] = qkv[src + 2 * D + d];
            }
}

static void ref_attn_cached(tlm_ops *o, void *out_, const void *qkv_, const float *kc, const float *vc, int B,
                            int T, int Tmax, int H, int hd, int pos0) {
    (void)o;
    float *out = out_;
    const float *qkv = qkv_;
    int D = H * hd;
    double *p = malloc(sizeof(double) * (size_t)(pos0 + T > 0 ? pos0 + T : 1));
    if (!p) abort();
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd;
                const float *k = kc + (size_t)b * Tmax * D + (size_t)h * hd;
                const float *v = vc + (size_t)b * Tmax * D + (size_t)h * hd;
                ref_attn_row(out + ((size_t)b * T + t) * D + (size_t)h * hd, q, k, v, (size_t)D, pos0 + t + 1, hd,
                             p);
            }
    free(p);
}

/* ---- SwiGLU ------------------------------------------------------------- */

static void ref_swiglu_fwd(tlm_ops *o, void *a_, const void *gu_, int N, int F) {
    (void)o;
    float *a = a_;
    const float *gu = gu_;
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) {
            double g = gu[(size_t)n * 2 * F + f], u = gu[(size_t)n * 2 * F + F + f];
            double sig = 1.0 / (1.0 + exp(-g));
            a[(size_t)n * F + f] = (float)(g * sig * u);
        }
}

/* d silu(g)/dg = sig(g) (1 + g (1 - sig(g))). */
static void ref_swiglu_bwd(tlm_ops *o, void *dgu_, const void *da_, const void *gu_, int N, int F) {
    (void)o;
    float *dgu = dgu_;
    const float *da = da_, *gu = gu_;
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) {
            double g = gu[(size_t)n * 2 * F + f], u = gu[(size_t)n * 2 * F + F + f];
            double d = da[(size_t)n * F + f];
            double sig = 1.0 / (1.0 + exp(-g));
            dgu[(size_t)n * 2 * F + f] = (float)(d * u * sig * (1.0 + g * (1.0 - sig)));
            dgu[(size_t)n * 2 * F + F + f] = (float)(d * g * sig);
        }
}

/* ---- softmax + cross-entropy -------------------------------------------- */

static void ref_xent(tlm_ops *o, void *logits_, float *losses, const int32_t *targets, int N, int V,
                     float dscale, int want_grad) {
    (void)o;
    float *logits = logits_;
    for (int n = 0; n < N; n++) {
        float *x = logits + (size_t)n * V;
        int tgt = targets[n];
        /* A target outside [0, V) cannot be scored; treat it as ignored rather
         * than read out of bounds. */
        if (tgt < 0 || tgt >= V) {
            losses[n] = 0;
            if (want_grad)
                for (int i = 0; i < V; i++) x[i] = 0;
            continue;
        }
        double mx = -INFINITY;
        for (int i = 0; i < V; i++)
            if (x[i] > mx) mx = x[i];
        double sum = 0;
        for (int i = 0; i < V; i++) sum += exp(x[i] - mx);
        double lse = mx + log(sum);
        losses[n] = (float)(lse - x[tgt]);
        if (want_grad)
            for (int i = 0; i < V; i++) {
                double p = exp(x[i] - lse);
                x[i] = (float)(dscale * (p - (i == tgt ? 1.0 : 0.0)));
            }
    }
}

/* The batch loss: the sum in double, in row order, then one division, so
 * it is the same number the host computed from copied-back losses. */
void cpu_loss_mean(tlm_ops *o, float *out, const float *losses, const int32_t *targets, int N) {
    (void)o;
    double sum = 0.0;
    long count = 0;
    for (int i = 0; i < N; i++) {
        if (targets[i] < 0) continue;
        sum += losses[i];
        count++;
    }
    out[0] = count ? (float)(sum / (double)count) : 0.0f;
}

/* ---- optimizer ---------------------------------------------------------- */

static void ref_sumsq(tlm_ops *o, float *out, const float *x, size_t n, int accumulate) {
    (void)o;
    double s = accumulate ? out[0] : 0.0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    out[0] = (float)s;
}

static void ref_adamw(tlm_ops *o, float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                      float b2, float eps, float wd, int t, const float *gnorm_sq, float clip) {
    (void)o;
    double scale = 1.0;
    if (clip > 0 && gnorm_sq) {
        double norm = sqrt((double)*gnorm_sq);
        if (norm > clip) scale = clip / norm;
    }
    double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
    for (size_t i = 0; i < n; i++) {
        double gi = g[i] * scale;
        double mi = b1 * (double)m[i] + (1.0 - b1) * gi;
        double vi = b2 * (double)v[i] + (1.0 - b2) * gi * gi;
        m[i] = (float)mi;
        v[i] = (float)vi;
        double upd = (mi / bc1) / (sqrt(vi / bc2) + eps) + wd * (double)p[i];
        p[i] = (float)(p[i] - lr * upd);
    }
}

static void ref_destroy(tlm_ops *o) { free(o); }

tlm_ops *cpu_ref_ops_create(void) {
    tlm_ops *o = calloc(1, sizeof *o);
    if (!o) {
        tlm_errorf("out of memory creating the cpu-ref backend");
        return NULL;
    }
    o->name = "cpu-ref";
    snprintf(o->device_desc, sizeof o->device_desc, "CPU reference loops, 1 thread");
    o->threads = 1;
    cpu_mem_install(o);
    o->matmul = ref_matmul;
    o->matmul_ex = ops_matmul_ex_f32;
    o->act_dtype = TLM_ACT_F32;
    o->add_inplace = ref_add_inplace;
    o->embed_fwd = ref_embed_fwd;
    o->embed_bwd = ref_embed_bwd;
    o->rmsnorm_fwd = ref_rmsnorm_fwd;
    o->rmsnorm_bwd = ref_rmsnorm_bwd;
    o->rope_fwd = ref_rope_fwd;
    o->rope_bwd = ref_rope_bwd;
    o->attn_fwd = ref_attn_fwd;
    o->attn_bwd = ref_attn_bwd;
    o->kv_store = ref_kv_store;
    o->attn_cached = ref_attn_cached;
    o->swiglu_fwd = ref_swiglu_fwd;
    o->swiglu_bwd = ref_swiglu_bwd;
    o->xent = ref_xent;
    o->loss_mean = cpu_loss_mean;
    o->sumsq = ref_sumsq;
    o->adamw = ref_adamw;
    o->destroy = ref_destroy;
    cpu_infer_ref_install(o); /* generation block of ops.h (cpu_infer_ref.c) */
    return o;
}
