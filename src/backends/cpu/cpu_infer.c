/*
 * Generation ops of the fast CPU backend (ops.h, generation block): weight
 * matrices packed once into SIMD-friendly panels, a register-tiled kernel
 * over them, and attention over the KV cache fused with RoPE and the cache
 * store.
 *
 * Packed format. The output columns of y = x W^T are cut into panels of
 * CI_NR = 32 columns; a panel holds those 32 weight rows for every k, k
 * outermost, so the kernel reads each panel front to back exactly once per
 * row tile:
 *   bf16: [Kp/2][32][2]  (pairs (k, k+1) of one column side by side: the
 *                        operand layout of the AVX-512 BF16 and Arm BF16 dot
 *                        products; Kp = K rounded up to even, zero padded)
 *   fp32: [K][32]
 *   int8: [G][1152 bytes] for G = ceil(K/32) groups of 32 k, each group
 *         [8 quads of k][32 columns][4 k] as u8 (q + 128), 1024 bytes,
 *         then [32] fp32 column scales, 128 bytes: 1.125 bytes a weight.
 *         A quad of 16 columns is one 64-byte load, the u8 operand of the
 *         AVX-512 VNNI dot product (vpdpbusd: u8 x s8 -> i32, 4 k a lane);
 *         the scales follow their group's weights, so a panel is still
 *         read front to back once.
 * Columns past N are zero (int8: q 0, scale 0). A SWIGLU matrix (gate
 * rows, then up rows) packs 16 gate rows and the 16 matching up rows into
 * each panel, so one tile yields silu(gate) * up for 16 hidden units
 * without storing gate or up.
 *
 * Every output element is one chain of multiply-adds over k in increasing
 * order, started from zero, whatever the tile shape or thread: results do
 * not depend on M or on the thread count (ops.h promises it).
 *
 * int8 (ops.h): activations are quantised per row and group of 32 k when
 * staged, xq = round(xn / sx) in [-127, 127] kept SIGNED, and the weights
 * are the u8 side of vpdpbusd (q + 128). So the dot product of a group is
 * sum (wq + 128) xq = sum wq xq + 128 sum xq, and the correction 128 sum xq
 * belongs to the (row, group): it is computed once when the row is staged,
 * instead of a per-(column, group) term stored beside the weights (which
 * would cost another 128 bytes a group of a panel to stream, 1.25 bytes a
 * weight instead of 1.125). Per group the exact integer sum wq xq (at most
 * 32 * 127 * 127 < 2^24, so exact in fp32 too) is scaled and added as
 *   acc = fma(sx[g] * sw[n][g], (float)(dot - corr[g]), acc)
 * (the SIMD kernel starts its i32 sums at -corr[g] instead of subtracting)
 * over g in increasing order: the one chain of an output element, the same
 * on every path (the portable one uses fmaf).
 *
 * Instruction sets: AVX-512 BF16 (vdpbf16ps), AVX-512 VNNI (vpdpbusd, int8)
 * and AVX-512F, Arm NEON (BF16 dot products where the compiler targets
 * them), and a portable C path (int8 everywhere without AVX-512 VNNI); the
 * choice is made at compile time (-march=native by default).
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(CI_PORTABLE_ONLY)
/* no SIMD path (tests build this file so, to hold the portable path to the
 * SIMD one's numbers on the same machine) */
#elif defined(__AVX512F__)
#include <immintrin.h>
#define CI_AVX512 1
#if defined(__AVX512BF16__)
#define CI_AVX512BF16 1
#endif
#if defined(__AVX512VNNI__)
#define CI_AVX512VNNI 1
#endif
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define CI_NEON 1
#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define CI_NEON_BF16 1
#endif
#endif

#include "backends/cpu/cpu_internal.h"
#include "backends/cpu/cpu_team.h"
#include "backends/cpu/cpu_train.h"
#include "ops/ops.h"
#include "util/common.h"

#define CI_NR 32 /* output columns per panel */
#define CI_MR 12 /* most rows per register tile */
/* int8: a group is 32 k; its bytes in a panel: 8 quads x 32 columns x 4 k
 * of u8 weights, then 32 fp32 scales */
#define CI_I8_GK 32
#define CI_I8_GB (8 * 128 + CI_NR * 4)
/* most rows of an int8 tile of one panel: each row holds 2 i32 and 2 fp32
 * accumulators, 6 rows 24 of the 32 zmm registers, plus 2 for the weights
 * and one for the broadcast activations */
#define CI_I8_MR 6
/* Below this many multiply-adds an op runs on one thread: at one token the
 * fork and join of the team would cost more than the product. */
#define CI_PAR_MIN 32768L
/* Attention of one stream is a few microseconds: shared from longer work on. */
#define CI_ATTN_PAR_MIN 131072L

struct tlm_packed {
    int N, K, dtype, kind;
    int Kp;             /* K rounded up to even (bf16 pairs) */
    int G;              /* int8: groups of 32 k */
    int npanels;
    int Nout;           /* result columns: N (LINEAR) or N/2 (SWIGLU) */
    size_t panel_elems; /* uint16 (bf16), float (fp32) or byte (int8) elements per panel */
    void *data;
};

/* ---- bf16 ------------------------------------------------------------------- */

/* Round to nearest even; NaN stays NaN (quiet). */
static inline uint16_t ci_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float ci_from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- packing ---------------------------------------------------------------- */

/* Weight row feeding column c of panel p, or -1 for padding. */
static inline int ci_panel_row(const tlm_packed *w, int p, int c) {
    if (w->kind == TLM_PACK_SWIGLU) {
        int F = w->N / 2, f = p * 16 + (c & 15);
        if (f >= F) return -1;
        return c < 16 ? f : F + f;
    }
    int n = p * CI_NR + c;
    return n < w->N ? n : -1;
}

/* Symmetric int8 of v[0..n) (n <= 32; the rest of the group is zero) into
 * q[32]: scale max|v| / 127, q = v / scale rounded to nearest even (the
 * current rounding mode, as vcvtps2dq), clamped (v / scale of the maximum
 * may land an ulp past 127). A zero scale gives q = 0. Returns the scale.
 * Weights at packing and activations on the portable path. */
static float ci_quant32(const float *v, int n, int8_t q[CI_I8_GK]) {
    float mx = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(v[i]);
        mx = a > mx ? a : mx;
    }
    const float s = mx / 127.0f;
    for (int i = 0; i < CI_I8_GK; i++) {
        float t = i < n && s > 0.0f ? v[i] / s : 0.0f;
        t = t > 127.0f ? 127.0f : t < -127.0f ? -127.0f : t;
        q[i] = (int8_t)nearbyintf(t);
    }
    return s;
}

/* int8 panels (layout at the top): column c of every group of panel p. */
static void ci_pack_i8_column(tlm_packed *w, const float *src, int p, int c) {
    uint8_t *panel = (uint8_t *)w->data + (size_t)p * w->panel_elems;
    for (int g = 0; g < w->G; g++) {
        int8_t q[CI_I8_GK];
        int n = w->K - g * CI_I8_GK < CI_I8_GK ? w->K - g * CI_I8_GK : CI_I8_GK;
        float s = src ? ci_quant32(src + (size_t)g * CI_I8_GK, n, q) : 0.0f;
        if (!src) memset(q, 0, sizeof q);
        uint8_t *grp = panel + (size_t)g * CI_I8_GB;
        for (int k = 0; k < CI_I8_GK; k++)
            grp[(k / 4) * 128 + (c / 16) * 64 + (c % 16) * 4 + (k % 4)] = (uint8_t)(q[k] + 128);
        memcpy(grp + 1024 + 4 * (size_t)c, &s, sizeof s);
    }
}

static tlm_packed *ci_pack(tlm_ops *o, const float *W, int N, int K, int dtype, int kind) {
    (void)o;
    if (N <= 0 || K <= 0 || (dtype != TLM_PACK_F32 && dtype != TLM_PACK_BF16 && dtype != TLM_PACK_I8) ||
        (kind != TLM_PACK_LINEAR && kind != TLM_PACK_SWIGLU) || (kind == TLM_PACK_SWIGLU && N % 2)) {
        tlm_errorf("pack: invalid matrix %d x %d (dtype %d, kind %d)", N, K, dtype, kind);
        return NULL;
    }
    tlm_packed *w = calloc(1, sizeof *w);
    if (!w) {
        tlm_errorf("out of memory packing a %d x %d weight matrix", N, K);
        return NULL;
    }
    w->N = N;
    w->K = K;
    w->dtype = dtype;
    w->kind = kind;
    w->Kp = (K + 1) & ~1;
    w->G = (K + CI_I8_GK - 1) / CI_I8_GK;
    w->Nout = kind == TLM_PACK_SWIGLU ? N / 2 : N;
    w->npanels = kind == TLM_PACK_SWIGLU ? (N / 2 + 15) / 16 : (N + CI_NR - 1) / CI_NR;
    size_t esize = dtype == TLM_PACK_BF16 ? sizeof(uint16_t) : dtype == TLM_PACK_I8 ? 1 : sizeof(float);
    w->panel_elems = dtype == TLM_PACK_I8 ? (size_t)w->G * CI_I8_GB
                                          : (size_t)(dtype == TLM_PACK_BF16 ? w->Kp : K) * CI_NR;
    w->data = tlm_alloc((size_t)w->npanels * w->panel_elems * esize); /* zero-filled: padding is 0 */
    if (!w->data) {
        free(w);
        return NULL;
    }
    for (int p = 0; p < w->npanels; p++) {
        for (int c = 0; c < CI_NR; c++) {
            int r = ci_panel_row(w, p, c);
            if (dtype == TLM_PACK_I8) {
                /* padding columns too: q 0 is the byte 128, not 0 */
                ci_pack_i8_column(w, r < 0 ? NULL : W + (size_t)r * K, p, c);
                continue;
            }
            if (r < 0) continue;
            const float *src = W + (size_t)r * K;
            if (dtype == TLM_PACK_BF16) {
                uint16_t *dst = (uint16_t *)w->data + (size_t)p * w->panel_elems;
                for (int k = 0; k < K; k++) dst[(size_t)(k / 2) * 2 * CI_NR + 2 * c + (k & 1)] = ci_to_bf16(src[k]);
            } else {
                float *dst = (float *)w->data + (size_t)p * w->panel_elems;
                for (int k = 0; k < K; k++) dst[(size_t)k * CI_NR + c] = src[k];
            }
        }
    }
    return w;
}

static void ci_pack_free(tlm_ops *o, tlm_packed *w) {
    (void)o;
    if (!w) return;
    tlm_free(w->data);
    free(w);
}

/* ---- activation staging: optional RMSNorm, then the kernel's input format ---- */

/* 1/rms of x[K] (float sums, as the fast rmsnorm_fwd). */
static inline float ci_rstd(const float *x, int K, float eps) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int k = 0; k < K; k++) ss += x[k] * x[k];
    return 1.0f / sqrtf(ss / (float)K + eps);
}

/* dst[Kpad] bf16 = round(x * r * nw) (nw NULL: x), zero past K. Kpad is a
 * multiple of 32. */
static void ci_stage_bf16(uint16_t *dst, int Kpad, const float *x, int K, const float *nw, float eps) {
    float r = nw ? ci_rstd(x, K, eps) : 1.0f;
#if defined(CI_AVX512BF16)
    const __m512 rv = _mm512_set1_ps(r);
    for (int k = 0; k < Kpad; k += 32) {
        __mmask16 m0 = k >= K ? 0 : (K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1));
        __mmask16 m1 = k + 16 >= K ? 0 : (K - k - 16 >= 16 ? 0xffff : (__mmask16)((1u << (K - k - 16)) - 1));
        __m512 a = _mm512_maskz_loadu_ps(m0, x + k), b = _mm512_maskz_loadu_ps(m1, x + k + 16);
        if (nw) {
            a = _mm512_mul_ps(_mm512_mul_ps(a, rv), _mm512_maskz_loadu_ps(m0, nw + k));
            b = _mm512_mul_ps(_mm512_mul_ps(b, rv), _mm512_maskz_loadu_ps(m1, nw + k + 16));
        }
        _mm512_storeu_si512((void *)(dst + k), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
#else
    for (int k = 0; k < K; k++) dst[k] = ci_to_bf16(nw ? x[k] * r * nw[k] : x[k]);
    for (int k = K; k < Kpad; k++) dst[k] = 0;
#endif
}

/* A staged int8 row of G groups (ops.h): [G][32] s8 xq, then [G] fp32 sx,
 * then [G] i32 corr = 128 * sum of the group's xq (what the u8 offset of
 * the weights adds to their dot product). Bytes of the row: */
static inline size_t ci_stage_i8_bytes(int G) { return (size_t)G * (CI_I8_GK + 8); }

/* Quantise xn = x * r * nw (nw NULL: x) group by group into dst (above).
 * The SIMD and portable branches compute the same bits: the maximum is
 * exact, x / s is one IEEE division, and both round to nearest even. */
static void ci_stage_i8(uint8_t *dst, int G, const float *x, int K, const float *nw, float eps) {
    const float r = nw ? ci_rstd(x, K, eps) : 1.0f;
    int8_t *xq = (int8_t *)dst;
    float *sx = (float *)(dst + (size_t)G * CI_I8_GK);
    int32_t *corr = (int32_t *)(sx + G);
    for (int g = 0; g < G; g++) {
        const int k = g * CI_I8_GK, n = K - k < CI_I8_GK ? K - k : CI_I8_GK;
        int32_t sum = 0;
        float s;
#if defined(CI_AVX512)
        const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
        const __mmask16 m1 = n <= 16 ? 0 : n >= 32 ? 0xffff : (__mmask16)((1u << (n - 16)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m0, x + k), b = _mm512_maskz_loadu_ps(m1, x + k + 16);
        if (nw) {
            const __m512 rv = _mm512_set1_ps(r);
            a = _mm512_mul_ps(_mm512_mul_ps(a, rv), _mm512_maskz_loadu_ps(m0, nw + k));
            b = _mm512_mul_ps(_mm512_mul_ps(b, rv), _mm512_maskz_loadu_ps(m1, nw + k + 16));
        }
        s = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.0f;
        __m512i qa = _mm512_setzero_si512(), qb = _mm512_setzero_si512();
        if (s > 0.0f) {
            const __m512 sv = _mm512_set1_ps(s), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
            qa = _mm512_cvtps_epi32(_mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_div_ps(a, sv))));
            qb = _mm512_cvtps_epi32(_mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_div_ps(b, sv))));
        }
        _mm_storeu_si128((__m128i *)(xq + k), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(xq + k + 16), _mm512_cvtepi32_epi8(qb));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
        float v[CI_I8_GK];
        for (int i = 0; i < n; i++) v[i] = nw ? x[k + i] * r * nw[k + i] : x[k + i];
        s = ci_quant32(v, n, xq + k);
        for (int i = 0; i < CI_I8_GK; i++) sum += xq[k + i];
#endif
        sx[g] = s;
        corr[g] = 128 * sum;
    }
}

static void ci_stage_f32(float *dst, const float *x, int K, const float *nw, float eps) {
    float r = ci_rstd(x, K, eps);
#pragma omp simd
    for (int k = 0; k < K; k++) dst[k] = x[k] * r * nw[k];
}

/* ---- vector exp and silu ---------------------------------------------------- */

/* silu(g) * u, scalar. */
static inline float ci_silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

#if defined(CI_AVX512)
/* e^x: cpu_exp512 of cpu_train.h, shared with the training kernels */
static inline __m512 ci_silu_mul512(__m512 g, __m512 u) {
    __m512 e = cpu_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

static inline __mmask16 ci_mask(int n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* Store the tile's accumulators: acc[m][2i], acc[m][2i+1] are the low and
 * high 16 columns of panel p0+i for row m. */
static inline __attribute__((always_inline)) void ci_store512(const int MR, const int NP, __m512 acc[CI_MR][8],
                                                              const tlm_packed *w, int p0, float *y, size_t ldy,
                                                              int accumulate) {
    for (int i = 0; i < NP; i++) {
        if (w->kind == TLM_PACK_SWIGLU) {
            int n0 = (p0 + i) * 16;
            __mmask16 mk = ci_mask(w->Nout - n0);
#pragma GCC unroll 12
            for (int m = 0; m < MR; m++)
                _mm512_mask_storeu_ps(y + (size_t)m * ldy + n0, mk, ci_silu_mul512(acc[m][2 * i], acc[m][2 * i + 1]));
        } else {
            int n0 = (p0 + i) * CI_NR;
            __mmask16 m0 = ci_mask(w->N - n0), m1 = ci_mask(w->N - n0 - 16);
#pragma GCC unroll 12
            for (int m = 0; m < MR; m++) {
                float *yr = y + (size_t)m * ldy + n0;
                __m512 a = acc[m][2 * i], b = acc[m][2 * i + 1];
                if (accumulate) {
                    a = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, yr), a);
                    b = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, yr + 16), b);
                }
                _mm512_mask_storeu_ps(yr, m0, a);
                _mm512_mask_storeu_ps(yr + 16, m1, b);
            }
        }
    }
}
#endif

/* ---- register tiles --------------------------------------------------------- *
 * A tile is MR rows x NP panels (MR * NP * 32 results); xa holds the MR
 * staged rows ldx elements apart. MR and NP are constants at every call
 * site, so the accumulators live in registers. */

#if defined(CI_AVX512BF16)
static inline __attribute__((always_inline)) void ci_tile_bf16(const int MR, const int NP, const tlm_packed *w, int p0,
                                                               const uint16_t *xa, size_t ldx, float *y, size_t ldy,
                                                               int accumulate) {
    __m512 acc[CI_MR][8];
#pragma GCC unroll 12
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NP; j++) acc[m][j] = _mm512_setzero_ps();
    const uint16_t *wp = (const uint16_t *)w->data + (size_t)p0 * w->panel_elems;
    const size_t pe = w->panel_elems;
    const int KP = w->Kp / 2;
    for (int kp = 0; kp < KP; kp++) {
        __m512i wv[8];
#pragma GCC unroll 4
        for (int i = 0; i < NP; i++) {
            wv[2 * i] = _mm512_loadu_si512((const void *)(wp + i * pe + (size_t)kp * 64));
            wv[2 * i + 1] = _mm512_loadu_si512((const void *)(wp + i * pe + (size_t)kp * 64 + 32));
        }
#pragma GCC unroll 12
        for (int m = 0; m < MR; m++) {
            int32_t pair;
            memcpy(&pair, xa + (size_t)m * ldx + 2 * (size_t)kp, sizeof pair);
            __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NP; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, (__m512bh)wv[j]);
        }
    }
    ci_store512(MR, NP, acc, w, p0, y, ldy, accumulate);
}
#endif

#if defined(CI_AVX512)
static inline __attribute__((always_inline)) void ci_tile_f32(const int MR, const int NP, const tlm_packed *w, int p0,
                                                              const float *xa, size_t ldx, float *y, size_t ldy,
                                                              int accumulate) {
    __m512 acc[CI_MR][8];
#pragma GCC unroll 12
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NP; j++) acc[m][j] = _mm512_setzero_ps();
    const float *wp = (const float *)w->data + (size_t)p0 * w->panel_elems;
    const size_t pe = w->panel_elems;
    const int K = w->K;
    for (int k = 0; k < K; k++) {
        __m512 wv[8];
#pragma GCC unroll 4
        for (int i = 0; i < NP; i++) {
            wv[2 * i] = _mm512_loadu_ps(wp + i * pe + (size_t)k * CI_NR);
            wv[2 * i + 1] = _mm512_loadu_ps(wp + i * pe + (size_t)k * CI_NR + 16);
        }
#pragma GCC unroll 12
        for (int m = 0; m < MR; m++) {
            __m512 xb = _mm512_set1_ps(xa[(size_t)m * ldx + k]);
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NP; j++) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
        }
    }
    ci_store512(MR, NP, acc, w, p0, y, ldy, accumulate);
}
#endif

#if defined(CI_AVX512VNNI)
/* int8 tile, MR rows x NP panels. Per group: 8 quads of k, each one 64-byte
 * load of u8 weights per 16 columns and one broadcast of the row's 4 s8
 * activations, summed exactly in i32 (di); then the group is scaled into
 * the fp32 accumulators (acc), as ops.h defines it. Registers: 4 MR NP
 * accumulators + 2 NP weights + 1 broadcast: (1, 4) 25, (2, 2) 21,
 * (3, 2) 29, (6, 1) 27 of the 32 zmm. */
static inline __attribute__((always_inline)) void ci_tile_i8(const int MR, const int NP, const tlm_packed *w, int p0,
                                                             const uint8_t *xa, size_t ldx, float *y, size_t ldy,
                                                             int accumulate) {
    __m512 acc[CI_MR][8];
#pragma GCC unroll 6
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NP; j++) acc[m][j] = _mm512_setzero_ps();
    const uint8_t *wp = (const uint8_t *)w->data + (size_t)p0 * w->panel_elems;
    const size_t pe = w->panel_elems;
    const int G = w->G;
    /* the row's scales and corrections follow its G groups of xq */
    const size_t sxo = (size_t)G * CI_I8_GK;
    for (int g = 0; g < G; g++) {
        const uint8_t *wg = wp + (size_t)g * CI_I8_GB;
        /* the integer sums start from -corr: what is left is sum wq xq */
        __m512i di[CI_I8_MR][8];
#pragma GCC unroll 6
        for (int m = 0; m < MR; m++) {
            int32_t corr;
            memcpy(&corr, xa + (size_t)m * ldx + sxo + 4 * (size_t)G + 4 * (size_t)g, sizeof corr);
            const __m512i cv = _mm512_set1_epi32(-corr);
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NP; j++) di[m][j] = cv;
        }
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++) {
            __m512i wv[8];
#pragma GCC unroll 4
            for (int i = 0; i < NP; i++) {
                wv[2 * i] = _mm512_loadu_si512((const void *)(wg + i * pe + (size_t)q * 128));
                wv[2 * i + 1] = _mm512_loadu_si512((const void *)(wg + i * pe + (size_t)q * 128 + 64));
            }
#pragma GCC unroll 6
            for (int m = 0; m < MR; m++) {
                int32_t quad;
                memcpy(&quad, xa + (size_t)m * ldx + (size_t)g * CI_I8_GK + 4 * (size_t)q, sizeof quad);
                const __m512i xb = _mm512_set1_epi32(quad);
#pragma GCC unroll 8
                for (int j = 0; j < 2 * NP; j++) di[m][j] = _mm512_dpbusd_epi32(di[m][j], wv[j], xb);
            }
        }
        __m512 sw[8];
#pragma GCC unroll 4
        for (int i = 0; i < NP; i++) {
            sw[2 * i] = _mm512_loadu_ps((const float *)(wg + i * pe + 1024));
            sw[2 * i + 1] = _mm512_loadu_ps((const float *)(wg + i * pe + 1024 + 64));
        }
#pragma GCC unroll 6
        for (int m = 0; m < MR; m++) {
            float sx;
            memcpy(&sx, xa + (size_t)m * ldx + sxo + 4 * (size_t)g, sizeof sx);
            const __m512 sv = _mm512_set1_ps(sx);
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NP; j++)
                acc[m][j] = _mm512_fmadd_ps(_mm512_mul_ps(sv, sw[j]), _mm512_cvtepi32_ps(di[m][j]), acc[m][j]);
        }
    }
    ci_store512(MR, NP, acc, w, p0, y, ldy, accumulate);
}
#endif

#if defined(CI_NEON_BF16)
/* 8 vectors of 4 columns per panel; MR <= 3 keeps 24 accumulators. */
static inline __attribute__((always_inline)) void ci_tile_bf16_neon(const int MR, const tlm_packed *w, int p0,
                                                                    const uint16_t *xa, size_t ldx, float acc_out[][CI_NR]) {
    float32x4_t acc[3][8];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < 8; j++) acc[m][j] = vdupq_n_f32(0.0f);
    const uint16_t *wp = (const uint16_t *)w->data + (size_t)p0 * w->panel_elems;
    const int KP = w->Kp / 2;
    for (int kp = 0; kp < KP; kp++) {
        bfloat16x8_t wv[8];
        for (int j = 0; j < 8; j++) wv[j] = vreinterpretq_bf16_u16(vld1q_u16(wp + (size_t)kp * 64 + 8 * j));
        for (int m = 0; m < MR; m++) {
            uint32_t pair;
            memcpy(&pair, xa + (size_t)m * ldx + 2 * (size_t)kp, sizeof pair);
            bfloat16x8_t xb = vreinterpretq_bf16_u32(vdupq_n_u32(pair));
            for (int j = 0; j < 8; j++) acc[m][j] = vbfdotq_f32(acc[m][j], xb, wv[j]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < 8; j++) vst1q_f32(acc_out[m] + 4 * j, acc[m][j]);
}
#endif

/* Portable tile of one panel: same sums, in the same k order. */
static void ci_tile_generic(int MR, const tlm_packed *w, int p, const void *xa, size_t ldx, float acc[][CI_NR]) {
    for (int m = 0; m < MR; m++)
        for (int c = 0; c < CI_NR; c++) acc[m][c] = 0.0f;
    if (w->dtype == TLM_PACK_BF16) {
        const uint16_t *wp = (const uint16_t *)w->data + (size_t)p * w->panel_elems;
        const uint16_t *xb = xa;
        for (int kp = 0; kp < w->Kp / 2; kp++) {
            const uint16_t *wk = wp + (size_t)kp * 2 * CI_NR;
            float wl[CI_NR], wh[CI_NR];
            for (int c = 0; c < CI_NR; c++) {
                wl[c] = ci_from_bf16(wk[2 * c]);
                wh[c] = ci_from_bf16(wk[2 * c + 1]);
            }
            for (int m = 0; m < MR; m++) {
                float a0 = ci_from_bf16(xb[(size_t)m * ldx + 2 * kp]), a1 = ci_from_bf16(xb[(size_t)m * ldx + 2 * kp + 1]);
#pragma omp simd
                for (int c = 0; c < CI_NR; c++) acc[m][c] += a0 * wl[c] + a1 * wh[c];
            }
        }
    } else {
        const float *wp = (const float *)w->data + (size_t)p * w->panel_elems;
        const float *xf = xa;
        for (int k = 0; k < w->K; k++) {
            const float *wk = wp + (size_t)k * CI_NR;
            for (int m = 0; m < MR; m++) {
                float a = xf[(size_t)m * ldx + k];
#pragma omp simd
                for (int c = 0; c < CI_NR; c++) acc[m][c] += a * wk[c];
            }
        }
    }
}

#if !defined(CI_AVX512VNNI)
/* Portable int8 tile of one panel: the integer sums and the fp32 chain of
 * ci_tile_i8, so the same bits (fmaf is the vector FMA's single rounding). */
static void ci_tile_generic_i8(int MR, const tlm_packed *w, int p, const uint8_t *xa, size_t ldx, float acc[][CI_NR]) {
    const uint8_t *wp = (const uint8_t *)w->data + (size_t)p * w->panel_elems;
    const int G = w->G;
    for (int m = 0; m < MR; m++)
        for (int c = 0; c < CI_NR; c++) acc[m][c] = 0.0f;
    for (int g = 0; g < G; g++) {
        const uint8_t *wg = wp + (size_t)g * CI_I8_GB;
        float sw[CI_NR];
        memcpy(sw, wg + 1024, sizeof sw);
        for (int m = 0; m < MR; m++) {
            const uint8_t *row = xa + (size_t)m * ldx;
            const int8_t *xq = (const int8_t *)row + (size_t)g * CI_I8_GK;
            float sx;
            int32_t corr, d[CI_NR] = {0};
            memcpy(&sx, row + (size_t)G * CI_I8_GK + 4 * (size_t)g, sizeof sx);
            memcpy(&corr, row + (size_t)G * CI_I8_GK + 4 * (size_t)G + 4 * (size_t)g, sizeof corr);
            for (int q = 0; q < 8; q++)
                for (int c = 0; c < CI_NR; c++) {
                    const uint8_t *b = wg + q * 128 + (c / 16) * 64 + (c % 16) * 4;
                    d[c] += b[0] * xq[4 * q] + b[1] * xq[4 * q + 1] + b[2] * xq[4 * q + 2] + b[3] * xq[4 * q + 3];
                }
            for (int c = 0; c < CI_NR; c++) acc[m][c] = fmaf(sx * sw[c], (float)(d[c] - corr), acc[m][c]);
        }
    }
}
#endif

/* Write a tile computed into acc[MR][32] (portable and NEON paths). */
static void ci_store_generic(int MR, const tlm_packed *w, int p, float acc[][CI_NR], float *y, size_t ldy,
                             int accumulate) {
    for (int m = 0; m < MR; m++) {
        float *yr = y + (size_t)m * ldy;
        if (w->kind == TLM_PACK_SWIGLU) {
            for (int c = 0; c < 16; c++) {
                int n = p * 16 + c;
                if (n < w->Nout) yr[n] = ci_silu_mul(acc[m][c], acc[m][c + 16]);
            }
        } else {
            for (int c = 0; c < CI_NR; c++) {
                int n = p * CI_NR + c;
                if (n < w->N) yr[n] = accumulate ? yr[n] + acc[m][c] : acc[m][c];
            }
        }
    }
}

/* ---- the product over a range of panels ------------------------------------- */

#if defined(CI_AVX512)
/* Dispatch a tile of `rows` (1..CI_MR) rows and NP panels to its constant
 * shape. */
#define CI_TILE_CASES(FN, NP, T)                                                                     \
    switch (rows) {                                                                                  \
    case 1: FN(1, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 2: FN(2, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 3: FN(3, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 4: FN(4, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 5: FN(5, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 6: FN(6, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 7: FN(7, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 8: FN(8, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 9: FN(9, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    case 10: FN(10, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                       \
    case 11: FN(11, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                       \
    default: FN(12, NP, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                       \
    }
#define CI_TILE_CASES_WIDE(FN, T)                                                                    \
    switch (rows) {                                                                                  \
    case 1: FN(1, 4, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                          \
    case 2: FN(2, 4, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                          \
    default: FN(3, 4, w, p, (const T *)xa, ldx, yb, ldy, accumulate); break;                         \
    }
#endif

/* int8: rows [0, rows) of a staged block (ldx bytes apart) times panels
 * [p0, p1). One row streams the weights: four panels at once for 8
 * independent i32 chains. Two or three rows: two panels. More: one panel
 * at a time for every tile of up to 6 rows, so the panel is read from
 * memory once and from cache by the following tiles. */
static void ci_block_i8(const tlm_packed *w, const uint8_t *xa, size_t ldx, int rows, int p0, int p1, float *yb,
                        size_t ldy, int accumulate) {
#if defined(CI_AVX512VNNI)
#define CI_I8_TILE(MR, NP) ci_tile_i8(MR, NP, w, p, xa + (size_t)m * ldx, ldx, yb + (size_t)m * ldy, ldy, accumulate)
    if (rows <= 3) {
        const int m = 0;
        int p = p0;
        if (rows == 1)
            for (; p + 4 <= p1; p += 4) CI_I8_TILE(1, 4);
        else if (rows == 2)
            for (; p + 2 <= p1; p += 2) CI_I8_TILE(2, 2);
        else
            for (; p + 2 <= p1; p += 2) CI_I8_TILE(3, 2);
        for (; p < p1; p++) {
            if (rows == 1) CI_I8_TILE(1, 1);
            else if (rows == 2) CI_I8_TILE(2, 1);
            else CI_I8_TILE(3, 1);
        }
        return;
    }
    for (int p = p0; p < p1; p++)
        for (int m = 0; m < rows;) {
            const int mr = rows - m < CI_I8_MR ? rows - m : CI_I8_MR;
            switch (mr) {
            case 1: CI_I8_TILE(1, 1); break;
            case 2: CI_I8_TILE(2, 1); break;
            case 3: CI_I8_TILE(3, 1); break;
            case 4: CI_I8_TILE(4, 1); break;
            case 5: CI_I8_TILE(5, 1); break;
            default: CI_I8_TILE(6, 1); break;
            }
            m += mr;
        }
#undef CI_I8_TILE
#else
    for (int p = p0; p < p1; p++) {
        float acc[CI_MR][CI_NR];
        for (int m = 0; m < rows; m += CI_MR) {
            const int mr = rows - m < CI_MR ? rows - m : CI_MR;
            ci_tile_generic_i8(mr, w, p, xa + (size_t)m * ldx, ldx, acc);
            ci_store_generic(mr, w, p, acc, yb + (size_t)m * ldy, ldy, accumulate);
        }
    }
#endif
}

/* Rows [0, rows) of a staged block times panels [p0, p1) into y (rows ldy
 * apart). xa: bf16 or fp32 rows ldx elements apart (int8: ci_block_i8). */
static void ci_block(const tlm_packed *w, const void *xa, size_t ldx, int rows, int p0, int p1, float *yb,
                     size_t ldy, int accumulate) {
    if (w->dtype == TLM_PACK_I8) {
        ci_block_i8(w, xa, ldx, rows, p0, p1, yb, ldy, accumulate);
        return;
    }
    int p = p0;
#if defined(CI_AVX512)
    /* Few rows: four panels at a time for independent accumulator chains
     * (at one row the product is a stream of weights; keep loads in flight). */
    if (rows <= 3) {
        for (; p + 4 <= p1; p += 4) {
#if defined(CI_AVX512BF16)
            if (w->dtype == TLM_PACK_BF16) {
                CI_TILE_CASES_WIDE(ci_tile_bf16, uint16_t)
                continue;
            }
#endif
            if (w->dtype == TLM_PACK_F32) CI_TILE_CASES_WIDE(ci_tile_f32, float)
            else break;
        }
    }
    for (; p < p1; p++) {
#if defined(CI_AVX512BF16)
        if (w->dtype == TLM_PACK_BF16) {
            CI_TILE_CASES(ci_tile_bf16, 1, uint16_t)
            continue;
        }
#endif
        if (w->dtype == TLM_PACK_F32) CI_TILE_CASES(ci_tile_f32, 1, float)
        else break;
    }
#endif
    /* Whatever no SIMD tile took: NEON or portable, one panel at a time. */
    for (; p < p1; p++) {
        float acc[CI_MR][CI_NR];
        int m = 0;
        while (m < rows) {
            int mr = rows - m;
#if defined(CI_NEON_BF16)
            if (w->dtype == TLM_PACK_BF16) {
                mr = mr > 3 ? 3 : mr;
                const uint16_t *x16 = (const uint16_t *)xa + (size_t)m * ldx;
                switch (mr) {
                case 1: ci_tile_bf16_neon(1, w, p, x16, ldx, acc); break;
                case 2: ci_tile_bf16_neon(2, w, p, x16, ldx, acc); break;
                default: ci_tile_bf16_neon(3, w, p, x16, ldx, acc); break;
                }
                ci_store_generic(mr, w, p, acc, yb + (size_t)m * ldy, ldy, accumulate);
                m += mr;
                continue;
            }
#endif
            mr = mr > CI_MR ? CI_MR : mr;
            size_t es = w->dtype == TLM_PACK_BF16 ? sizeof(uint16_t) : sizeof(float);
            ci_tile_generic(mr, w, p, (const char *)xa + (size_t)m * ldx * es, ldx, acc);
            ci_store_generic(mr, w, p, acc, yb + (size_t)m * ldy, ldy, accumulate);
            m += mr;
        }
    }
}

/* Staged activations of the calling thread, grown on demand and kept: the
 * rows are normalised and converted once per product, before the team
 * splits the panels (a thread-local buffer, so concurrent callers never
 * share one). */
static _Thread_local unsigned char *ci_stage_buf;
static _Thread_local size_t ci_stage_cap;

static void *ci_stage_space(size_t bytes) {
    if (bytes > ci_stage_cap) {
        tlm_free(ci_stage_buf);
        ci_stage_buf = tlm_alloc(bytes);
        if (!ci_stage_buf) abort(); /* an op has no error path */
        ci_stage_cap = bytes;
    }
    return ci_stage_buf;
}

typedef struct {
    const tlm_packed *w;
    const void *xa; /* staged rows (or x itself) */
    size_t ldx;
    int M, per_chunk, accumulate;
    float *y;
} ci_mm_job;

/* Chunk c: panels [c*per_chunk, ...) for every row, CI_MR rows at a time. */
static void ci_mm_chunk(void *arg, int c) {
    const ci_mm_job *j = arg;
    const tlm_packed *w = j->w;
    int p0 = c * j->per_chunk, p1 = p0 + j->per_chunk;
    if (p1 > w->npanels) p1 = w->npanels;
    /* (int8 rows are ldx bytes apart) */
    const size_t es = w->dtype == TLM_PACK_BF16 ? sizeof(uint16_t) : w->dtype == TLM_PACK_I8 ? 1 : sizeof(float);
    for (int m0 = 0; m0 < j->M; m0 += CI_MR) {
        int rows = j->M - m0 < CI_MR ? j->M - m0 : CI_MR;
        ci_block(w, (const char *)j->xa + (size_t)m0 * j->ldx * es, j->ldx, rows, p0, p1,
                 j->y + (size_t)m0 * w->Nout, (size_t)w->Nout, j->accumulate);
    }
}

static void ci_matmul_packed(tlm_ops *o, float *y, const float *x, int M, const tlm_packed *w, const float *nw,
                             float eps, int accumulate) {
    if (M <= 0) return;
    if (w->kind == TLM_PACK_SWIGLU) accumulate = 0;
    const int K = w->K, bf = w->dtype == TLM_PACK_BF16;
    ci_mm_job j = {.w = w, .M = M, .accumulate = accumulate, .y = y};
    if (w->dtype == TLM_PACK_I8) {
        /* rows 64-byte aligned (the stage buffer is) */
        j.ldx = (ci_stage_i8_bytes(w->G) + 63) & ~(size_t)63;
        uint8_t *buf = ci_stage_space((size_t)M * j.ldx);
        for (int m = 0; m < M; m++) ci_stage_i8(buf + (size_t)m * j.ldx, w->G, x + (size_t)m * K, K, nw, eps);
        j.xa = buf;
    } else if (bf || nw) {
        /* staged row length: a multiple of 32 elements (whole vectors) */
        j.ldx = bf ? (size_t)((w->Kp + 31) & ~31) : (size_t)((K + 15) & ~15);
        void *buf = ci_stage_space((size_t)M * j.ldx * (bf ? sizeof(uint16_t) : sizeof(float)));
        for (int m = 0; m < M; m++) {
            const float *xr = x + (size_t)m * K;
            if (bf)
                ci_stage_bf16((uint16_t *)buf + (size_t)m * j.ldx, (int)j.ldx, xr, K, nw, eps);
            else
                ci_stage_f32((float *)buf + (size_t)m * j.ldx, xr, K, nw, eps);
        }
        j.xa = buf;
    } else {
        j.xa = x; /* fp32 without a norm: read in place */
        j.ldx = (size_t)K;
    }
    /* chunks: four panels (one wide tile) for a few rows, else one panel;
     * alone when the product is too small to share */
    j.per_chunk = M <= 3 ? 4 : 1;
    int nchunks = (w->npanels + j.per_chunk - 1) / j.per_chunk;
    long work = (long)M * w->N * w->K;
    cpu_team_run(work >= CI_PAR_MIN ? o->threads : 1, nchunks, ci_mm_chunk, &j);
}

/* ---- attention over the cache, fused with RoPE and the cache store ---------- */

/* cos/sin of the RoPE angles of positions pos0 .. pos0+T-1, [T][half] each.
 * All layers of a step ask for the same positions, so the last table is
 * kept per thread and reused. Angles in double, as rope_fwd. */
#define CI_ROPE_CAP 4096
typedef struct {
    int pos0, T, hd;
    float theta;
    float cs[CI_ROPE_CAP], sn[CI_ROPE_CAP];
} ci_rope_table;
static _Thread_local ci_rope_table ci_rope_cache = {.T = -1};

static void ci_rope_fill(float *cs, float *sn, int pos0, int T, int hd, float theta) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        double freq = pow((double)theta, -2.0 * i / hd);
        for (int t = 0; t < T; t++) {
            double ang = (double)(pos0 + t) * freq;
            cs[(size_t)t * half + i] = (float)cos(ang);
            sn[(size_t)t * half + i] = (float)sin(ang);
        }
    }
}

static inline void ci_rotate(float *v, const float *cs, const float *sn, int half) {
#pragma omp simd
    for (int i = 0; i < half; i++) {
        float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * cs[i] - x1 * sn[i];
        v[i + half] = x0 * sn[i] + x1 * cs[i];
    }
}

/* ---- fp16 cache elements ------------------------------------------------------ */

/* float -> IEEE half, nearest even, saturated to +-65504 (NaN stays NaN). */
static inline uint16_t ci_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7bffu); /* would round to inf */
    if (a < 0x38800000u) {                                     /* half subnormal: m * 2^-24 */
        float af;
        memcpy(&af, &a, sizeof af);
        return (uint16_t)(sign | (uint32_t)lrintf(af * 16777216.0f));
    }
    uint32_t r = a - 0x38000000u; /* rebias the exponent by 127 - 15 */
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

static inline float ci_from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0) {
        float f = (float)m * 0x1p-24f;
        memcpy(&u, &f, sizeof u);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (m << 13);
    } else {
        u = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Store n floats as cache elements. */
static inline void ci_kv_put(void *dst, const float *src, int n, int f16) {
    if (!f16) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *d = dst;
    int i = 0;
#if defined(CI_AVX512)
    const __m512 big = _mm512_set1_ps(65504.0f), nbig = _mm512_set1_ps(-65504.0f);
    for (; i + 16 <= n; i += 16) {
        /* operand order keeps NaN: min/max return their second source on NaN */
        __m512 v = _mm512_max_ps(nbig, _mm512_min_ps(big, _mm512_loadu_ps(src + i)));
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    for (; i < n; i++) d[i] = ci_to_f16(src[i]);
}

/* ---- attention rows ------------------------------------------------------------ */

/* One query against cached rows (kvstride elements apart) in two segments,
 * np rows of a shared prefix (kp, vp) and then nk rows of the sequence's
 * own (k, v), with an online softmax carried across chunks and segments. */
#if defined(CI_AVX512)
static inline __attribute__((always_inline)) __m512 ci_kv_load(const void *base, size_t i, const int f16) {
    if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    return _mm512_loadu_ps((const float *)base + i);
}

/* Lane j of the result = the sum of the 16 lanes of a[j]: a transpose and
 * add in four rounds (45 shuffles and adds for 16 sums, against 16 full
 * horizontal reductions). */
static inline __attribute__((always_inline)) __m512 ci_hsum16(const __m512 *a) {
    __m512 s[8], r[4];
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        r[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of a chunk of keys are kept in a stack buffer of this many floats;
 * longer contexts go chunk by chunk, rescaling like an online softmax. */
#define CI_ATTN_CHUNK 1024

static inline __attribute__((always_inline)) void ci_attn_row512(const int HC, const int f16, float *out,
                                                                 const float *q, const void *kp, const void *vp,
                                                                 int np, const void *k, const void *v, int nk,
                                                                 size_t kvstride, float scale, const char *knext,
                                                                 const char *vnext) {
    /* knext, vnext (may be NULL): the next task's own keys and values,
     * fetched while this one computes its own; a task's rows span only a
     * few pages, too few for the hardware prefetcher to get going. The
     * prefix is shared by every task and is already in cache. */
    const size_t row_bytes = (size_t)HC * 16 * (f16 ? 2 : 4);
    __m512 qv[8], ov[4][8];
    for (int c = 0; c < HC; c++) {
        qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
        for (int u = 0; u < 4; u++) ov[u][c] = _mm512_setzero_ps();
    }
    _Alignas(64) float sc[CI_ATTN_CHUNK];
    float mx = -INFINITY;
    int started = 0;
    __m512 lsum = _mm512_setzero_ps();
    for (int seg = 0; seg < 2; seg++) {
        const void *ks = seg ? k : kp, *vs = seg ? v : vp;
        const int ns = seg ? nk : np;
        const char *kn = seg ? knext : NULL, *vn = seg ? vnext : NULL;
        for (int c0 = 0; c0 < ns; c0 += CI_ATTN_CHUNK) {
            const int n = ns - c0 < CI_ATTN_CHUNK ? ns - c0 : CI_ATTN_CHUNK;
            /* pass 1: scores, 16 keys per transposed sum, and their max */
            __m512 vmax = _mm512_set1_ps(-INFINITY);
            for (int j0 = 0; j0 < n; j0 += 16) {
                const int nb = n - j0 < 16 ? n - j0 : 16;
                __m512 a[16];
#pragma GCC unroll 16
                for (int j = 0; j < 16; j++) {
                    if (j >= nb) {
                        a[j] = _mm512_setzero_ps();
                        continue;
                    }
                    size_t base = (size_t)(c0 + j0 + j) * kvstride;
                    if (kn)
                        for (size_t off = 0; off < row_bytes; off += 64)
                            _mm_prefetch(kn + (size_t)(c0 + j0 + j) * row_bytes + off, _MM_HINT_T0);
                    __m512 acc = _mm512_mul_ps(qv[0], ci_kv_load(ks, base, f16));
                    for (int c = 1; c < HC; c++)
                        acc = _mm512_fmadd_ps(qv[c], ci_kv_load(ks, base + 16 * (size_t)c, f16), acc);
                    a[j] = acc;
                }
                __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ci_mask(nb), ci_hsum16(a));
                vmax = _mm512_max_ps(vmax, sv);
                _mm512_store_ps(sc + j0, sv);
            }
            /* a new maximum rescales what earlier chunks summed */
            float cm = _mm512_reduce_max_ps(vmax);
            if (cm > mx) {
                if (started) {
                    __m512 corr = _mm512_set1_ps(expf(mx - cm));
                    lsum = _mm512_mul_ps(lsum, corr);
                    for (int u = 0; u < 4; u++)
                        for (int c = 0; c < HC; c++) ov[u][c] = _mm512_mul_ps(ov[u][c], corr);
                }
                mx = cm;
            }
            started = 1;
            /* pass 2: probabilities (masked tail lanes hold -inf -> 0) */
            const __m512 mv = _mm512_set1_ps(mx);
            for (int j0 = 0; j0 < n; j0 += 16) {
                __m512 p = _mm512_maskz_mov_ps(ci_mask(n - j0), cpu_exp512(_mm512_sub_ps(_mm512_load_ps(sc + j0), mv)));
                lsum = _mm512_add_ps(lsum, p);
                _mm512_store_ps(sc + j0, p);
            }
            /* pass 3: p @ v, four independent accumulator sets so consecutive
             * keys do not wait on each other's multiply-add */
            int j = 0;
            for (; j + 4 <= n; j += 4) {
#pragma GCC unroll 4
                for (int u = 0; u < 4; u++) {
                    size_t base = (size_t)(c0 + j + u) * kvstride;
                    if (vn)
                        for (size_t off = 0; off < row_bytes; off += 64)
                            _mm_prefetch(vn + (size_t)(c0 + j + u) * row_bytes + off, _MM_HINT_T0);
                    __m512 pj = _mm512_set1_ps(sc[j + u]);
                    for (int c = 0; c < HC; c++)
                        ov[u][c] = _mm512_fmadd_ps(pj, ci_kv_load(vs, base + 16 * (size_t)c, f16), ov[u][c]);
                }
            }
            for (; j < n; j++) {
                size_t base = (size_t)(c0 + j) * kvstride;
                __m512 pj = _mm512_set1_ps(sc[j]);
                for (int c = 0; c < HC; c++)
                    ov[0][c] = _mm512_fmadd_ps(pj, ci_kv_load(vs, base + 16 * (size_t)c, f16), ov[0][c]);
            }
        }
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(lsum));
    for (int c = 0; c < HC; c++) {
        __m512 o = _mm512_add_ps(_mm512_add_ps(ov[0][c], ov[1][c]), _mm512_add_ps(ov[2][c], ov[3][c]));
        _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o, inv));
    }
}
#endif

static inline float ci_kv_get(const void *base, size_t i, int f16) {
    return f16 ? ci_from_f16(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static void ci_attn_row_generic(float *out, const float *q, const void *kp, const void *vp, int np, const void *k,
                                const void *v, int nk, size_t kvstride, int hd, float scale, int f16) {
    float mx = -INFINITY, l = 0.0f;
    for (int d = 0; d < hd; d++) out[d] = 0.0f;
    for (int seg = 0; seg < 2; seg++) {
        const void *ks = seg ? k : kp, *vs = seg ? v : vp;
        const int ns = seg ? nk : np;
        for (int j0 = 0; j0 < ns; j0 += 16) {
            int nb = ns - j0 < 16 ? ns - j0 : 16;
            float s[16], bm = -INFINITY;
            for (int j = 0; j < nb; j++) {
                size_t base = (size_t)(j0 + j) * kvstride;
                float a = 0.0f;
                for (int d = 0; d < hd; d++) a += q[d] * ci_kv_get(ks, base + (size_t)d, f16);
                s[j] = a * scale;
                bm = s[j] > bm ? s[j] : bm;
            }
            float mnew = bm > mx ? bm : mx, corr = expf(mx - mnew);
            l *= corr;
            for (int d = 0; d < hd; d++) out[d] *= corr;
            for (int j = 0; j < nb; j++) {
                float p = expf(s[j] - mnew);
                l += p;
                size_t base = (size_t)(j0 + j) * kvstride;
                for (int d = 0; d < hd; d++) out[d] += p * ci_kv_get(vs, base + (size_t)d, f16);
            }
            mx = mnew;
        }
    }
    float inv = 1.0f / l;
    for (int d = 0; d < hd; d++) out[d] *= inv;
}

static void ci_attn_row(float *out, const float *q, const void *kp, const void *vp, int np, const void *k,
                        const void *v, int nk, size_t kvstride, int hd, float scale, int f16, const char *knext,
                        const char *vnext) {
#if defined(CI_AVX512)
#define CI_ATTN_HD(HC)                                                                  \
    if (f16)                                                                            \
        ci_attn_row512(HC, 1, out, q, kp, vp, np, k, v, nk, kvstride, scale, knext, vnext); \
    else                                                                                \
        ci_attn_row512(HC, 0, out, q, kp, vp, np, k, v, nk, kvstride, scale, knext, vnext); \
    return;
    switch (hd) {
    case 16: CI_ATTN_HD(1)
    case 32: CI_ATTN_HD(2)
    case 64: CI_ATTN_HD(4)
    case 128: CI_ATTN_HD(8)
    default: break;
    }
#undef CI_ATTN_HD
#endif
    (void)knext;
    (void)vnext;
    ci_attn_row_generic(out, q, kp, vp, np, k, v, nk, kvstride, hd, scale, f16);
}

/* Tasks are (sequence, head) pairs: a task rotates, stores and attends for
 * its own head columns only, so the tasks never share a byte and need no
 * barrier between the store and the attention. */
typedef struct {
    float *out, *qkv;
    char *kc, *vc;
    const char *kp, *vp; /* shared prefix [H,P,hd], or NULL with P = 0 */
    const float *cs, *sn;
    int B, T, Tmax, H, hd, pos0, P, f16, per_chunk;
    float scale;
} ci_attn_job;

/* Task (b, h): rotate, store and attend for head h of sequence b. */
static void ci_attn_task(const ci_attn_job *j, int task) {
    const int H = j->H, hd = j->hd, T = j->T, D = H * hd, half = hd / 2, ntask = j->B * H;
    const int b = task / H, h = task % H;
    const size_t es = j->f16 ? sizeof(uint16_t) : sizeof(float);
    for (int t = 0; t < T; t++) {
        float *row = j->qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd;
        if (half > 0) {
            ci_rotate(row, j->cs + (size_t)t * half, j->sn + (size_t)t * half, half);
            ci_rotate(row + D, j->cs + (size_t)t * half, j->sn + (size_t)t * half, half);
        }
        size_t dst = (((size_t)task * j->Tmax + (size_t)(j->pos0 - j->P + t)) * hd) * es;
        ci_kv_put(j->kc + dst, row + D, hd, j->f16);
        ci_kv_put(j->vc + dst, row + 2 * D, hd, j->f16);
    }
    /* this (sequence, head)'s own keys: rows hd apart from task * Tmax * hd;
     * head h's prefix keys: P rows from h * P * hd */
    const size_t cache = (size_t)task * j->Tmax * hd * es, next = (size_t)j->Tmax * hd * es;
    const size_t pre = (size_t)h * j->P * hd * es;
    /* the next task's rows, for the prefetch of the first query row */
    const char *kn = task + 1 < ntask ? j->kc + cache + next : NULL;
    const char *vn = kn ? j->vc + cache + next : NULL;
    for (int t = 0; t < T; t++)
        ci_attn_row(j->out + ((size_t)b * T + t) * D + (size_t)h * hd, j->qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd,
                    j->kp ? j->kp + pre : NULL, j->vp ? j->vp + pre : NULL, j->P, j->kc + cache, j->vc + cache,
                    j->pos0 - j->P + t + 1, (size_t)hd, hd, j->scale, j->f16, t == 0 ? kn : NULL, t == 0 ? vn : NULL);
}

static void ci_attn_chunk(void *arg, int c) {
    const ci_attn_job *j = arg;
    int t1 = (c + 1) * j->per_chunk, ntask = j->B * j->H;
    for (int task = c * j->per_chunk; task < t1 && task < ntask; task++) ci_attn_task(j, task);
}

/* Tasks are (sequence, head) pairs: a task rotates, stores and attends for
 * its own head columns only, so the tasks never share a byte and need no
 * barrier between the store and the attention. */
static void ci_attn_decode(tlm_ops *o, float *out, float *qkv, void *kc, void *vc, int kv_dtype, const void *kp,
                           const void *vp, int P, int B, int T, int Tmax, int H, int hd, int pos0,
                           const int32_t *pos_dev, float theta) {
    const int half = hd / 2;
    if (!kp || !vp) P = 0;
    /* device memory is host memory here and ops run when called: "when the
     * op runs" is now */
    if (pos_dev) pos0 = *pos_dev;
    if (pos0 < P || (long)pos0 - P + T > Tmax) { /* outside the cache: ops.h's NaN */
        for (size_t i = 0; i < (size_t)B * T * H * hd; i++) out[i] = NAN;
        return;
    }
    ci_attn_job j = {.out = out, .qkv = qkv, .kc = kc, .vc = vc, .kp = P ? kp : NULL, .vp = P ? vp : NULL, .B = B,
                     .T = T, .Tmax = Tmax, .H = H, .hd = hd, .pos0 = pos0, .P = P, .f16 = kv_dtype == TLM_KV_F16,
                     .scale = 1.0f / sqrtf((float)hd)};
    ci_rope_table *rc = &ci_rope_cache;
    float *heap = NULL;
    if ((long)T * half <= CI_ROPE_CAP) {
        if (rc->pos0 != pos0 || rc->T != T || rc->hd != hd || rc->theta != theta) {
            ci_rope_fill(rc->cs, rc->sn, pos0, T, hd, theta);
            rc->pos0 = pos0;
            rc->T = T;
            rc->hd = hd;
            rc->theta = theta;
        }
        j.cs = rc->cs;
        j.sn = rc->sn;
    } else {
        heap = malloc(2 * (size_t)T * half * sizeof(float));
        if (!heap) abort(); /* an op has no error path */
        ci_rope_fill(heap, heap + (size_t)T * half, pos0, T, hd, theta);
        j.cs = heap;
        j.sn = heap + (size_t)T * half;
    }
    /* one sequence per chunk when there are many, else one head */
    j.per_chunk = B >= 4 ? H : 1;
    const int ntask = B * H, nchunks = (ntask + j.per_chunk - 1) / j.per_chunk;
    long work = (long)B * T * (pos0 + T) * H * hd;
    cpu_team_run(work >= CI_ATTN_PAR_MIN ? o->threads : 1, nchunks, ci_attn_chunk, &j);
    free(heap);
}

static void ci_embed_rows(tlm_ops *o, float *out, const int32_t *tok, const float *wte, int N, int D) {
    (void)o;
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * D, wte + (size_t)tok[n] * D, sizeof(float) * (size_t)D);
}

static void ci_host_for(tlm_ops *o, int n, void (*fn)(void *arg, int c), void *arg) { cpu_team_run(o->threads, n, fn, arg); }

void cpu_infer_install(tlm_ops *o) {
#if defined(CI_AVX512BF16) || defined(CI_NEON_BF16) || defined(__AVX2__) || defined(CI_AVX512)
    /* bf16 dot products, or a cheap bf16 -> fp32 widening: half the bytes
     * to stream wins at generation sizes */
    o->pack_dtype_fast = TLM_PACK_BF16;
#else
    o->pack_dtype_fast = TLM_PACK_F32;
#endif
    /* int8 on every CPU: the portable kernel where AVX-512 VNNI is missing */
    o->pack_dtypes = 1u << TLM_PACK_F32 | 1u << TLM_PACK_BF16 | 1u << TLM_PACK_I8;
    o->pack = ci_pack;
    o->pack_free = ci_pack_free;
    o->matmul_packed = ci_matmul_packed;
    o->attn_decode = ci_attn_decode;
    o->embed_rows = ci_embed_rows;
    o->host_for = ci_host_for;
}
