/*
 * Generation ops of the reference CPU backend (ops.h, generation block) as
 * plain loops that follow the definitions in ops.h: the yardstick for the
 * fast versions in cpu_infer.c. A packed matrix is simply the [N,K] weights
 * (rounded to bf16 for TLM_PACK_BF16, kept as floats); sums are in double.
 * TLM_PACK_I8 keeps [N][G*32] int8 values and [N][G] fp32 scales; each
 * product quantises its input rows the same way (ops.h) and sums the
 * exact integer dot products of the groups, scaled, in double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops/ops.h"
#include "util/common.h"

#define REF_GK 32 /* int8 group of k */

typedef struct {
    int N, K, dtype, kind;
    float *w;     /* [N,K], values representable in dtype (F32, BF16) */
    int G;        /* I8: groups of REF_GK k, the last zero padded */
    int8_t *q;    /* I8: [N][G*REF_GK] */
    float *scale; /* I8: [N][G] */
} ref_packed;

/* ops.h's int8 of one group: v[0..n), zero past n, into q[REF_GK]; returns
 * the scale max|v| / 127 (fp32). q = v / scale rounded to nearest even,
 * within [-127, 127]; all 0 for a zero scale. */
static float ref_quant_group(const float *v, int n, int8_t *q) {
    float mx = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(v[i]) > mx) mx = fabsf(v[i]);
    float s = mx / 127.0f;
    for (int i = 0; i < REF_GK; i++) {
        float t = (i < n && s > 0.0f) ? v[i] / s : 0.0f;
        if (t > 127.0f) t = 127.0f;
        if (t < -127.0f) t = -127.0f;
        q[i] = (int8_t)nearbyintf(t);
    }
    return s;
}

/* Round to the nearest bf16 (ties to even), returned as a float. */
static float ref_round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static tlm_packed *ref_pack(tlm_ops *o, const float *W, int N, int K, int dtype, int kind) {
    (void)o;
    if (N <= 0 || K <= 0 || (dtype != TLM_PACK_F32 && dtype != TLM_PACK_BF16 && dtype != TLM_PACK_I8) ||
        (kind != TLM_PACK_LINEAR && kind != TLM_PACK_SWIGLU) || (kind == TLM_PACK_SWIGLU && N % 2)) {
        tlm_errorf("pack: invalid matrix %d x %d (dtype %d, kind %d)", N, K, dtype, kind);
        return NULL;
    }
    if (dtype == TLM_PACK_I8) {
        ref_packed *p = calloc(1, sizeof *p);
        const int G = (K + REF_GK - 1) / REF_GK;
        int8_t *q = p ? malloc((size_t)N * G * REF_GK) : NULL;
        float *sc = q ? malloc((size_t)N * G * sizeof *sc) : NULL;
        if (!sc) {
            free(p);
            free(q);
            tlm_errorf("out of memory packing a %d x %d weight matrix", N, K);
            return NULL;
        }
        for (int n = 0; n < N; n++)
            for (int g = 0; g < G; g++) {
                int len = K - g * REF_GK < REF_GK ? K - g * REF_GK : REF_GK;
                sc[(size_t)n * G + g] =
                    ref_quant_group(W + (size_t)n * K + (size_t)g * REF_GK, len, q + ((size_t)n * G + g) * REF_GK);
            }
        p->N = N;
        p->K = K;
        p->dtype = dtype;
        p->kind = kind;
        p->G = G;
        p->q = q;
        p->scale = sc;
        return (tlm_packed *)p;
    }
    ref_packed *p = calloc(1, sizeof *p);
    float *w = malloc((size_t)N * K * sizeof *w);
    if (!p || !w) {
        free(p);
        free(w);
        tlm_errorf("out of memory packing a %d x %d weight matrix", N, K);
        return NULL;
    }
    for (size_t i = 0; i < (size_t)N * K; i++) w[i] = dtype == TLM_PACK_BF16 ? ref_round_bf16(W[i]) : W[i];
    p->N = N;
    p->K = K;
    p->dtype = dtype;
    p->kind = kind;
    p->w = w;
    return (tlm_packed *)p;
}

static void ref_pack_free(tlm_ops *o, tlm_packed *h) {
    (void)o;
    ref_packed *p = (ref_packed *)h;
    if (!p) return;
    free(p->w);
    free(p->q);
    free(p->scale);
    free(p);
}

static double ref_dot(const float *a, const float *b, int K) {
    double s = 0;
    for (int k = 0; k < K; k++) s += (double)a[k] * b[k];
    return s;
}

/* Row n of an int8 matrix times the quantised row (xq, sx): the exact
 * integer dot product of every group, scaled by both scales, summed in
 * double. */
static double ref_dot_i8(const ref_packed *p, int n, const int8_t *xq, const float *sx) {
    double s = 0;
    for (int g = 0; g < p->G; g++) {
        const int8_t *wq = p->q + ((size_t)n * p->G + g) * REF_GK;
        long d = 0;
        for (int k = 0; k < REF_GK; k++) d += (long)wq[k] * xq[g * REF_GK + k];
        s += (double)sx[g] * (double)p->scale[(size_t)n * p->G + g] * (double)d;
    }
    return s;
}

static void ref_matmul_packed(tlm_ops *o, float *y, const float *x, int M, const tlm_packed *h, const float *nw,
                              float eps, int accumulate) {
    (void)o;
    const ref_packed *p = (const ref_packed *)h;
    const int K = p->K, N = p->N, i8 = p->dtype == TLM_PACK_I8;
    float *xn = malloc((size_t)K * sizeof *xn);
    int8_t *xq = i8 ? malloc((size_t)p->G * REF_GK) : NULL;
    float *sx = i8 ? malloc((size_t)p->G * sizeof *sx) : NULL;
    if (!xn || (i8 && (!xq || !sx))) abort(); /* an op has no error path */
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        double r = 1.0;
        if (nw) {
            double ss = 0;
            for (int k = 0; k < K; k++) ss += (double)xr[k] * xr[k];
            r = 1.0 / sqrt(ss / K + eps);
        }
        for (int k = 0; k < K; k++) {
            float v = nw ? (float)(xr[k] * r * nw[k]) : xr[k];
            xn[k] = p->dtype == TLM_PACK_BF16 ? ref_round_bf16(v) : v;
        }
        if (i8)
            for (int g = 0; g < p->G; g++)
                sx[g] = ref_quant_group(xn + (size_t)g * REF_GK, K - g * REF_GK < REF_GK ? K - g * REF_GK : REF_GK,
                                        xq + (size_t)g * REF_GK);
        if (p->kind == TLM_PACK_SWIGLU) {
            const int F = N / 2;
            for (int f = 0; f < F; f++) {
                double g = i8 ? ref_dot_i8(p, f, xq, sx) : ref_dot(xn, p->w + (size_t)f * K, K);
                double u = i8 ? ref_dot_i8(p, F + f, xq, sx) : ref_dot(xn, p->w + (size_t)(F + f) * K, K);
                y[(size_t)m * F + f] = (float)(g / (1.0 + exp(-g)) * u);
            }
        } else {
            for (int n = 0; n < N; n++) {
                float v = (float)(i8 ? ref_dot_i8(p, n, xq, sx) : ref_dot(xn, p->w + (size_t)n * K, K));
                float *yo = &y[(size_t)m * N + n];
                *yo = accumulate ? *yo + v : v;
            }
        }
    }
    free(xn);
    free(xq);
    free(sx);
}

/* float -> IEEE half by its definition: the nearest of the halves (ties to
 * even mantissa), saturated to +-65504; NaN stays NaN. Done in double
 * arithmetic rather than bit tricks, to be independent of the fast path. */
static uint16_t ref_to_f16(float f) {
    if (isnan(f)) return 0x7e00;
    uint16_t sign = signbit(f) ? 0x8000 : 0;
    double a = fabs((double)f);
    if (a >= 65504.0) return sign | 0x7bff;
    int e;
    frexp(a, &e);               /* a = m 2^e, m in [0.5, 1) */
    int ex = e - 1;             /* a in [2^ex, 2^(ex+1)) */
    if (ex < -14) ex = -14;     /* subnormal range: fixed step 2^-24 */
    double step = ldexp(1.0, ex - 10);
    double q = nearbyint(a / step); /* round to nearest, ties to even (default mode) */
    double v = q * step;
    if (v >= 65504.0) return sign | 0x7bff;
    /* encode v */
    if (v < ldexp(1.0, -14)) return sign | (uint16_t)nearbyint(v / ldexp(1.0, -24));
    frexp(v, &e);
    ex = e - 1;
    uint16_t mant = (uint16_t)nearbyint((v / ldexp(1.0, ex) - 1.0) * 1024.0);
    return sign | (uint16_t)((ex + 15) << 10) | mant;
}

static float ref_from_f16(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v;
    if (e == 0) v = ldexp((double)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexp(1.0 + m / 1024.0, e - 15);
    return (float)((h & 0x8000) ? -v : v);
}

/* Element i of a cache of kv_dtype, as a double. */
static double ref_kv_get(const void *c, size_t i, int kv_dtype) {
    return kv_dtype == TLM_KV_F16 ? ref_from_f16(((const uint16_t *)c)[i]) : ((const float *)c)[i];
}

static void ref_kv_put(void *c, size_t i, float x, int kv_dtype) {
    if (kv_dtype == TLM_KV_F16)
        ((uint16_t *)c)[i] = ref_to_f16(x);
    else
        ((float *)c)[i] = x;
}

/* By definition: RoPE (rope_fwd), then the store into the head-major
 * caches [B,H,Tmax,hd] (row = position - P), then softmax attention over
 * the shared prefix [H,P,hd] and the sequence's own rows, in double. */
static void ref_attn_decode(tlm_ops *o, float *out, float *qkv, void *kc, void *vc, int kv_dtype, const void *kp,
                            const void *vp, int P, int B, int T, int Tmax, int H, int hd, int pos0,
                            const int32_t *pos_dev, float theta) {
    const int D = H * hd;
    if (!kp || !vp) P = 0;
    if (pos_dev) pos0 = *pos_dev; /* host memory, and the op runs now */
    if (pos0 < P || (long)pos0 - P + T > Tmax) { /* outside the cache: ops.h's NaN */
        for (size_t i = 0; i < (size_t)B * T * D; i++) out[i] = NAN;
        return;
    }
    o->rope_fwd(o, qkv, B, T, H, hd, pos0, theta);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < hd; d++) {
                    const float *row = qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd;
                    size_t at = (((size_t)b * H + h) * Tmax + (size_t)(pos0 - P + t)) * hd + (size_t)d;
                    ref_kv_put(kc, at, row[D + d], kv_dtype);
                    ref_kv_put(vc, at, row[2 * D + d], kv_dtype);
                }
    const double scale = 1.0 / sqrt((double)hd);
    double *s = malloc((size_t)(pos0 + T) * sizeof *s);
    if (!s) abort(); /* an op has no error path */
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd;
                const size_t head = ((size_t)b * H + h) * Tmax * hd, phead = (size_t)h * P * hd;
                const int nk = pos0 + t + 1;
                /* key j: prefix row j when j < P, else own row j - P */
#define REF_KEY(c, pc, j, d) ((j) < P ? ref_kv_get((pc), phead + (size_t)(j) * hd + (d), kv_dtype) \
                                      : ref_kv_get((c), head + (size_t)((j) - P) * hd + (d), kv_dtype))
                double mx = -INFINITY, z = 0;
                for (int j = 0; j < nk; j++) {
                    double a = 0;
                    for (int d = 0; d < hd; d++) a += (double)q[d] * REF_KEY(kc, kp, j, d);
                    s[j] = a * scale;
                    mx = s[j] > mx ? s[j] : mx;
                }
                for (int j = 0; j < nk; j++) z += (s[j] = exp(s[j] - mx));
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = 0; j < nk; j++) acc += s[j] * REF_KEY(vc, vp, j, d);
                    out[((size_t)b * T + t) * D + (size_t)h * hd + d] = (float)(acc / z);
                }
            }
#undef REF_KEY
    free(s);
}

static void ref_embed_rows(tlm_ops *o, float *out, const int32_t *tok, const float *wte, int N, int D) {
    (void)o;
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) out[(size_t)n * D + d] = wte[(size_t)tok[n] * D + d];
}

void cpu_infer_ref_install(tlm_ops *o) {
    o->pack_dtype_fast = TLM_PACK_F32;
    o->pack_dtypes = 1u << TLM_PACK_F32 | 1u << TLM_PACK_BF16 | 1u << TLM_PACK_I8;
    o->pack = ref_pack;
    o->pack_free = ref_pack_free;
    o->matmul_packed = ref_matmul_packed;
    o->attn_decode = ref_attn_decode;
    o->embed_rows = ref_embed_rows;
}
