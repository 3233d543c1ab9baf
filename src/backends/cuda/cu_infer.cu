/*
 * Generation ops of the CUDA backend (ops.h, generation block): packed
 * weights, matmul_packed with the RMSNorm fused into its input and the
 * SwiGLU or the residual add into its output, and attn_decode (RoPE, the
 * store into head-major caches of fp32 or fp16, attention).
 *
 * Packed format: W^T, [K, N] row-major, fp32 or bf16, so the threads of a
 * warp read 32 adjacent outputs' weights for one k in one transaction.
 *
 * The promise of ops.h, that a row's result depends on that row alone and
 * never on the number of rows M: every output element y[m,n] is summed in
 * one order fixed by K. A block of 8 warps owns 32 outputs (one per lane)
 * of up to 16 rows; warp w sums k = c + 16w .. c + 16w + 15 of every
 * 128-wide chunk c in increasing k with fused multiply-adds, and the 8
 * partial sums are added in warp order. M only decides how many such
 * blocks there are (cuBLAS would pick its algorithm, and so its order, by
 * the shapes, so it is not used here). That is the FMA kernel, for fp32
 * weights; bf16 weights run on the tensor cores (k_matmul_packed_tc), whose
 * order is fixed by K in the same way (one mma chain per 16 k).
 *
 * With bf16 weights the inputs are rounded to bf16 too, so every product is
 * exact in fp32 and only the sums round, as the CPU backends do.
 */
#include "backends/cuda/cu_attn_warp.cuh"
#include "backends/cuda/cu_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* TM_UNROLL: full unrolling, so the fragment arrays are indexed by
 * constants and stay in registers */
#ifdef TLM_CUDA_EMU
#define TM_UNROLL
#else
#include <mma.h>
#define TM_UNROLL _Pragma("unroll")
#endif

typedef struct {
    int N, K, dtype, kind;
    void *wt; /* device [K, N], float or __nv_bfloat16 */
} cu_packed;

/* ---- number formats ------------------------------------------------------------ */

/* float -> IEEE half bits, round to nearest even, saturated to +-65504
 * (as the reference: a key or value never turns into an infinity). */
static __device__ __forceinline__ uint16_t cu_f32_to_f16(float f) {
    uint32_t x = __float_as_uint(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (x >= 0x477fe000u) return (uint16_t)(sign | 0x7bffu); /* >= 65504 */
    if (x < 0x38800000u) /* below 2^-14: subnormal steps of 2^-24, exact scaling */
        return (uint16_t)(sign | (uint16_t)rintf(__uint_as_float(x) * 16777216.0f));
    uint32_t h = ((x >> 23) - 112u) << 10 | ((x >> 13) & 0x3ffu);
    uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* a carry moves into the exponent */
    return (uint16_t)(sign | h);
}

/* Stores into the caches; reads go through cu_kv_get (cu_attn_warp.cuh). */
template <class T> struct kv_io;
template <> struct kv_io<float> {
    static __device__ __forceinline__ void put(float *p, size_t i, float v) { p[i] = v; }
};
template <> struct kv_io<uint16_t> {
    static __device__ __forceinline__ void put(uint16_t *p, size_t i, float v) { p[i] = cu_f32_to_f16(v); }
};

/* ---- pack -------------------------------------------------------------------------- */

static __device__ __forceinline__ void w_put(float *d, size_t i, float v) { d[i] = v; }
static __device__ __forceinline__ void w_put(__nv_bfloat16 *d, size_t i, float v) { d[i] = __float2bfloat16(v); }

/* dst[k, n] = w[n, k] (once per matrix: the simple loop will do) */
template <class WT> static __global__ void k_pack_t(WT *dst, const float *w, int N, int K) {
    for (int n = blockIdx.x; n < N; n += gridDim.x)
        for (int k = threadIdx.x; k < K; k += blockDim.x) w_put(dst, (size_t)k * N + n, w[(size_t)n * K + k]);
}

static tlm_packed *cu_pack(tlm_ops *o, const float *w, int N, int K, int dtype, int kind) {
    cu_ctx *c = cu_of(o);
    char msg[160];
    if (c->failed) {
        cu_report(c->err);
        return NULL;
    }
    if (N <= 0 || K <= 0 || (dtype != TLM_PACK_F32 && dtype != TLM_PACK_BF16) ||
        (kind != TLM_PACK_LINEAR && kind != TLM_PACK_SWIGLU) || (kind == TLM_PACK_SWIGLU && N % 2)) {
        snprintf(msg, sizeof msg, "pack: invalid matrix %d x %d (dtype %d, kind %d)", N, K, dtype, kind);
        cu_report(msg);
        return NULL;
    }
    if (c->capturing) {
        cu_fail(c, "pack: cannot allocate while recording a graph");
        return NULL;
    }
    cu_packed *p = (cu_packed *)calloc(1, sizeof *p);
    size_t es = dtype == TLM_PACK_BF16 ? 2 : 4;
    if (!p || cu_dmalloc(c, &p->wt, (size_t)N * K * es) != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(msg, sizeof msg, "out of GPU memory packing a %d x %d weight matrix: use a smaller model", N, K);
        cu_report(msg);
        free(p);
        return NULL;
    }
    p->N = N;
    p->K = K;
    p->dtype = dtype;
    p->kind = kind;
    if (dtype == TLM_PACK_BF16) {
        auto kern = k_pack_t<__nv_bfloat16>;
        CU_LAUNCH(kern, cu_grid(c, (size_t)N, 1), 256, c->stream, (__nv_bfloat16 *)p->wt, w, N, K);
    } else {
        auto kern = k_pack_t<float>;
        CU_LAUNCH(kern, cu_grid(c, (size_t)N, 1), 256, c->stream, (float *)p->wt, w, N, K);
    }
    cu_after(c, "pack");
    if (c->failed) {
        cu_dfree(c, p->wt);
        free(p);
        cu_report(c->err);
        return NULL;
    }
    return (tlm_packed *)p;
}

static void cu_pack_free(tlm_ops *o, tlm_packed *h) {
    cu_ctx *c = cu_of(o);
    cu_packed *p = (cu_packed *)h;
    if (!p) return;
    /* ops queued on the stream may still read it */
    if (!c->failed) CU_OK(c, cudaStreamSynchronize(c->stream));
    cu_dfree(c, p->wt);
    free(p);
}

/* ---- matmul_packed --------------------------------------------------------------- */

/* xn[m,:] = x[m,:] * r * nw (r in double, as the reference) or x itself,
 * stored as XT (a bf16 XT rounds to nearest even). One warp per row. */
template <class XT>
static __global__ void k_prep_rows(XT *xn, const float *x, const float *nw, int M, int K, float eps) {
    const int lane = threadIdx.x & 31;
    const int nwarps = (gridDim.x * blockDim.x) >> 5;
    for (int m = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; m < M; m += nwarps) {
        const float *xr = x + (size_t)m * K;
        double r = 1.0;
        if (nw) {
            double ss = 0;
            for (int k = lane; k < K; k += 32) ss += (double)xr[k] * xr[k];
            ss = cu_warp_sum(ss);
            r = 1.0 / sqrt(ss / K + eps);
        }
        for (int k = lane; k < K; k += 32) {
            float v = nw ? (float)(xr[k] * r * nw[k]) : xr[k];
            w_put(xn, (size_t)m * K + k, v);
        }
    }
}

#define MP_ROWS 16   /* rows of x per block */
#define MP_WARPS 8   /* warps per block, each a slice of every K chunk */
#define MP_KC 128    /* K chunk staged in shared memory */
#define MP_KW (MP_KC / MP_WARPS)

/* y[m, n] = sum_k xn[m,k] wt[k,n] in the fixed order described above;
 * SWIGLU: y[m, f] = silu(g) * u with g from column f, u from column F + f. */
template <int SWIGLU>
static __global__ void __launch_bounds__(MP_WARPS * 32)
    k_matmul_packed(float *y, const float *xn, const float *wt, int M, int N, int K, int accumulate) {
    __shared__ float4 xs[MP_ROWS][MP_KC / 4];
    __shared__ float part[SWIGLU ? 2 : 1][MP_WARPS][MP_ROWS][33];
    CU_SHARED_POISON(xs, part);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nout = SWIGLU ? N / 2 : N;
    const int n = blockIdx.x * 32 + lane, m0 = blockIdx.y * MP_ROWS;
    const bool col_ok = n < nout;
    float acc[MP_ROWS], accu[SWIGLU ? MP_ROWS : 1];
    for (int i = 0; i < MP_ROWS; i++) acc[i] = 0.f;
    for (int i = 0; i < (SWIGLU ? MP_ROWS : 1); i++) accu[i] = 0.f;
    for (int c0 = 0; c0 < K; c0 += MP_KC) {
        __syncthreads();
        float *xf = &xs[0][0].x;
        for (int e = threadIdx.x; e < MP_ROWS * MP_KC; e += MP_WARPS * 32) {
            int i = e / MP_KC, k = e - i * MP_KC;
            xf[e] = m0 + i < M && c0 + k < K ? xn[(size_t)(m0 + i) * K + c0 + k] : 0.f;
        }
        __syncthreads();
        for (int q = 0; q < MP_KW / 4; q++) { /* 4 k at a time, in order */
            const int kk = w * MP_KW + 4 * q, k = c0 + kk;
            float w0 = 0.f, w1 = 0.f, w2 = 0.f, w3 = 0.f, u0 = 0.f, u1 = 0.f, u2 = 0.f, u3 = 0.f;
            if (col_ok) {
                if (k + 0 < K) w0 = wt[(size_t)(k + 0) * N + n];
                if (k + 1 < K) w1 = wt[(size_t)(k + 1) * N + n];
                if (k + 2 < K) w2 = wt[(size_t)(k + 2) * N + n];
                if (k + 3 < K) w3 = wt[(size_t)(k + 3) * N + n];
                if (SWIGLU) {
                    if (k + 0 < K) u0 = wt[(size_t)(k + 0) * N + nout + n];
                    if (k + 1 < K) u1 = wt[(size_t)(k + 1) * N + nout + n];
                    if (k + 2 < K) u2 = wt[(size_t)(k + 2) * N + nout + n];
                    if (k + 3 < K) u3 = wt[(size_t)(k + 3) * N + nout + n];
                }
            }
            for (int i = 0; i < MP_ROWS; i++) {
                float4 xv = xs[i][kk / 4];
                acc[i] = fmaf(xv.x, w0, acc[i]);
                acc[i] = fmaf(xv.y, w1, acc[i]);
                acc[i] = fmaf(xv.z, w2, acc[i]);
                acc[i] = fmaf(xv.w, w3, acc[i]);
                if (SWIGLU) {
                    accu[i] = fmaf(xv.x, u0, accu[i]);
                    accu[i] = fmaf(xv.y, u1, accu[i]);
                    accu[i] = fmaf(xv.z, u2, accu[i]);
                    accu[i] = fmaf(xv.w, u3, accu[i]);
                }
            }
        }
    }
    for (int i = 0; i < MP_ROWS; i++) {
        part[0][w][i][lane] = acc[i];
        if (SWIGLU) part[SWIGLU ? 1 : 0][w][i][lane] = accu[i];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < MP_ROWS * 32; e += MP_WARPS * 32) {
        int i = e >> 5, l = e & 31, nn = blockIdx.x * 32 + l, m = m0 + i;
        if (nn >= nout || m >= M) continue;
        float g = 0.f, u = 0.f;
        for (int ww = 0; ww < MP_WARPS; ww++) {
            g += part[0][ww][i][l];
            if (SWIGLU) u += part[SWIGLU ? 1 : 0][ww][i][l];
        }
        float *yo = y + (size_t)m * nout + nn;
        if (SWIGLU)
            *yo = g / (1.0f + expf(-g)) * u;
        else
            *yo = accumulate ? *yo + g : g;
    }
}

/* ---- matmul_packed on the tensor cores (bf16 weights) ----------------------------
 *
 * y[m, n] for TLM_PACK_BF16 with WMMA m16n16k16 bf16 products (exact in
 * fp32) and fp32 accumulators. Batch invariance: every output element lives
 * in exactly one accumulator fragment, which starts at zero and takes one
 * mma_sync per 16-wide k step, k = 0, 16, 32, ... in increasing order, over
 * zero-padded rows and k; the tile a row falls in, and the rows beside it
 * (real or zero padding), never enter its sums. So M = 1 runs the same
 * kernel, its one row padded with 63 zero rows of its 64-row tile in shared
 * memory, and a row alone equals the same row in any batch bit for bit.
 * (The number of k steps is fixed by K alone: a step past K multiplies
 * zeros, the same for every M.)
 *
 * A block: 4 warps, TM_BM = 64 rows by TM_BN = 64 staged weight columns,
 * warp (wm, wn) owning rows 32wm.. and columns 32wn.. as 2 x 2 fragments.
 * LINEAR stages 64 output columns; SWIGLU stages 32 gate columns [n0, n0+32)
 * then the 32 matching up columns [F+n0, F+n0+32), so a gate and its up
 * value meet in the same block's epilogue. Accumulators go through fp32
 * shared memory to an element-wise epilogue (accumulate, silu(g)*u). */
#define TM_WARPS 4
#define TM_BM 64
#define TM_BN 64
#define TM_BK 32
#define TM_LDA (TM_BK + 8) /* bf16 pitches: a multiple of 8 elements (16 bytes) as WMMA requires; */
#define TM_LDB (TM_BN + 8) /* the 16-byte pad staggers rows across shared-memory banks */
#define TM_LDC (TM_BN + 4) /* fp32 pitch of the epilogue tile, a multiple of 4 (16 bytes) */

#define TM_CH (TM_BM * TM_BK / 8 / (TM_WARPS * 32)) /* 8-element chunks per thread and operand */
static_assert(TM_BM * TM_BK == TM_BK * TM_BN, "A and B tiles share the chunk count");
static_assert(TM_CH * 8 * TM_WARPS * 32 == TM_BM * TM_BK, "whole chunks per thread");

/* 8 bf16, 16 bytes: one vector load or store */
struct alignas(16) tm_bf8 {
    __nv_bfloat16 h[8];
};

/* This thread's chunks of the A tile (rows m0.., k k0..) and the B tile
 * (k k0.., the block's staged columns) into registers, zero outside the
 * matrices. `vec`: rows of xn and wt start 16-byte aligned (K and the
 * column counts multiples of 8), so a chunk inside the matrix is one load;
 * chunks over an edge go element by element. */
template <int SWIGLU>
static __device__ __forceinline__ void tm_fetch(tm_bf8 (&ra)[TM_CH], tm_bf8 (&rb)[TM_CH], const __nv_bfloat16 *xn,
                                                const __nv_bfloat16 *wt, int M, int N, int K, int m0, int n0, int k0,
                                                int vec) {
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    const int nout = SWIGLU ? N / 2 : N, bno = SWIGLU ? TM_BN / 2 : TM_BN;
    TM_UNROLL for (int q = 0; q < TM_CH; q++) {
        const int c = threadIdx.x + q * TM_WARPS * 32;
        {
            const int m = m0 + c / (TM_BK / 8), k = k0 + 8 * (c % (TM_BK / 8));
            const __nv_bfloat16 *src = xn + (size_t)m * K + k;
            if (vec && m < M && k + 8 <= K)
                ra[q] = *(const tm_bf8 *)src;
            else
                for (int t = 0; t < 8; t++) ra[q].h[t] = m < M && k + t < K ? src[t] : zero;
        }
        {
            const int k = k0 + c / (TM_BN / 8), j = 8 * (c % (TM_BN / 8));
            /* staged column j -> weight column: SWIGLU pairs gate f with up F + f */
            const int f = n0 + (SWIGLU && j >= bno ? j - bno : j);
            const int col = SWIGLU && j >= bno ? nout + f : f;
            const __nv_bfloat16 *src = wt + (size_t)k * N + col;
            if (vec && k < K && f + 8 <= nout)
                rb[q] = *(const tm_bf8 *)src;
            else
                for (int t = 0; t < 8; t++) rb[q].h[t] = k < K && f + t < nout ? src[t] : zero;
        }
    }
}

template <int SWIGLU>
static __global__ void __launch_bounds__(TM_WARPS * 32)
    k_matmul_packed_tc(float *y, const __nv_bfloat16 *xn, const __nv_bfloat16 *wt, int M, int N, int K, int accumulate,
                       int vec) {
    namespace wmma = nvcuda::wmma;
    /* every fragment pointer below is a multiple of 16 rows or 16 columns
     * from these bases: 32-byte aligned given the pitches above */
    alignas(32) __shared__ __nv_bfloat16 As[TM_BM][TM_LDA];
    alignas(32) __shared__ __nv_bfloat16 Bs[TM_BK][TM_LDB];
    alignas(32) __shared__ float Cs[TM_BM][TM_LDC];
    CU_SHARED_POISON(As, Bs, Cs);
    const int w = threadIdx.x >> 5, wm = w >> 1, wn = w & 1;
    const int nout = SWIGLU ? N / 2 : N;
    const int bno = SWIGLU ? TM_BN / 2 : TM_BN; /* output columns per block */
    const int m0 = blockIdx.y * TM_BM, n0 = blockIdx.x * bno;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    TM_UNROLL for (int i = 0; i < 2; i++) {
        TM_UNROLL for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.f);
    }
    /* Staging: each thread moves TM_CH 8-element chunks of A and of B per k
     * step, fetched into registers one step ahead, so the global loads of
     * step k0 + TM_BK are in flight while the warps multiply step k0. */
    tm_bf8 ra[TM_CH], rb[TM_CH];
    tm_fetch<SWIGLU>(ra, rb, xn, wt, M, N, K, m0, n0, 0, vec);
    for (int k0 = 0; k0 < K; k0 += TM_BK) {
        __syncthreads(); /* the previous step's fragments are loaded */
        TM_UNROLL for (int q = 0; q < TM_CH; q++) {
            const int ca = threadIdx.x + q * TM_WARPS * 32;
            *(tm_bf8 *)&As[ca / (TM_BK / 8)][8 * (ca % (TM_BK / 8))] = ra[q];
            *(tm_bf8 *)&Bs[ca / (TM_BN / 8)][8 * (ca % (TM_BN / 8))] = rb[q];
        }
        __syncthreads();
        if (k0 + TM_BK < K) tm_fetch<SWIGLU>(ra, rb, xn, wt, M, N, K, m0, n0, k0 + TM_BK, vec);
        TM_UNROLL for (int kk = 0; kk < TM_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b[2];
            TM_UNROLL for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], &As[32 * wm + 16 * i][kk], TM_LDA);
            TM_UNROLL for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], &Bs[kk][32 * wn + 16 * j], TM_LDB);
            TM_UNROLL for (int i = 0; i < 2; i++) {
                TM_UNROLL for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
            }
        }
    }
    TM_UNROLL for (int i = 0; i < 2; i++) {
        TM_UNROLL for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(&Cs[32 * wm + 16 * i][32 * wn + 16 * j], acc[i][j], TM_LDC, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < TM_BM * bno; e += TM_WARPS * 32) {
        const int i = e / bno, j = e - i * bno, m = m0 + i, n = n0 + j;
        if (m >= M || n >= nout) continue;
        const float g = Cs[i][j];
        float *yo = y + (size_t)m * nout + n;
        if (SWIGLU)
            *yo = g / (1.0f + expf(-g)) * Cs[i][bno + j];
        else
            *yo = accumulate ? *yo + g : g;
    }
}

/* The product's input rows in scratch as XT: x normalised by norm_w, or
 * x itself. NULL (the backend failed) if scratch cannot grow. */
template <class XT>
static const XT *mp_prep(cu_ctx *c, const float *x, const float *norm_w, int M, int K, float eps) {
    XT *s = (XT *)cu_scratch(c, (size_t)M * K * sizeof(XT));
    if (!s) return NULL;
    auto prep = k_prep_rows<XT>;
    CU_LAUNCH(prep, cu_grid(c, (size_t)M, 8), 256, c->stream, s, x, norm_w, M, K, eps);
    cu_after(c, "matmul_packed (input rows)");
    return s;
}

static void cu_matmul_packed(tlm_ops *o, float *y, const float *x, int M, const tlm_packed *h, const float *norm_w,
                             float eps, int accumulate) {
    cu_ctx *c = cu_of(o);
    const cu_packed *p = (const cu_packed *)h;
    if (c->failed || M <= 0 || !p) return;
    const int K = p->K, N = p->N, bf16 = p->dtype == TLM_PACK_BF16;
    const int nout = p->kind == TLM_PACK_SWIGLU ? N / 2 : N;
    if (bf16) {
        /* xn in bf16 (the WMMA A operand), then the tensor-core kernel for every M */
        const __nv_bfloat16 *s = mp_prep<__nv_bfloat16>(c, x, norm_w, M, K, eps);
        if (!s) return;
        const __nv_bfloat16 *wt = (const __nv_bfloat16 *)p->wt;
        const int bno = p->kind == TLM_PACK_SWIGLU ? TM_BN / 2 : TM_BN;
        dim3 tg((unsigned)((nout + bno - 1) / bno), (unsigned)((M + TM_BM - 1) / TM_BM));
        /* 16-byte chunk loads need every row of xn and wt 16-byte aligned:
         * K and the output column count (so N, and for SWIGLU the up
         * half's start) multiples of 8, both bases aligned */
        const int vec = K % 8 == 0 && nout % 8 == 0 && (uintptr_t)s % 16 == 0 && (uintptr_t)wt % 16 == 0;
        if (p->kind == TLM_PACK_SWIGLU) {
            auto k = k_matmul_packed_tc<1>;
            CU_LAUNCH(k, tg, TM_WARPS * 32, c->stream, y, s, wt, M, N, K, 0, vec);
        } else {
            auto k = k_matmul_packed_tc<0>;
            CU_LAUNCH(k, tg, TM_WARPS * 32, c->stream, y, s, wt, M, N, K, accumulate, vec);
        }
        cu_after(c, "matmul_packed");
        return;
    }
    const float *xn = norm_w ? mp_prep<float>(c, x, norm_w, M, K, eps) : x;
    if (!xn) return;
    dim3 grid((unsigned)((nout + 31) / 32), (unsigned)((M + MP_ROWS - 1) / MP_ROWS));
    const float *wt = (const float *)p->wt;
    if (p->kind == TLM_PACK_SWIGLU) {
        auto k = k_matmul_packed<1>;
        CU_LAUNCH(k, grid, MP_WARPS * 32, c->stream, y, xn, wt, M, N, K, 0);
    } else {
        auto k = k_matmul_packed<0>;
        CU_LAUNCH(k, grid, MP_WARPS * 32, c->stream, y, xn, wt, M, N, K, accumulate);
    }
    cu_after(c, "matmul_packed");
}

/* ---- attn_decode ------------------------------------------------------------------- */

/* Is [pos0, pos0 + T) inside a cache of P shared and Tmax own positions? */
static __device__ __forceinline__ bool cu_pos_ok(int pos0, int P, int T, int Tmax) {
    return pos0 >= P && pos0 - P <= Tmax - T;
}

/* k, v of qkv[B,T,3D] into the head-major caches [B,H,Tmax,hd], row
 * position - P (P: length of the shared prefix, 0 without one). The first
 * position is *pos_dev when given (read as the kernel runs), else pos0. */
template <class KV>
static __global__ void k_kv_store_hm(KV *kc, KV *vc, const float *qkv, int B, int T, int Tmax, int H, int hd,
                                     int pos0, const int32_t *pos_dev, int P) {
    if (pos_dev) pos0 = *pos_dev;
    if (!cu_pos_ok(pos0, P, T, Tmax)) return; /* the attention writes NaN */
    pos0 -= P;
    const int D = H * hd;
    for (int n = blockIdx.x; n < B * T; n += gridDim.x) {
        const int b = n / T, t = n - b * T;
        const float *row = qkv + (size_t)n * 3 * D;
        for (int e = threadIdx.x; e < D; e += blockDim.x) {
            int h = e / hd, d = e - h * hd;
            size_t at = (((size_t)b * H + h) * Tmax + (size_t)(pos0 + t)) * hd + d;
            kv_io<KV>::put(kc, at, row[D + e]);
            kv_io<KV>::put(vc, at, row[2 * D + e]);
        }
    }
}

/* As k_attn_cached (cu_attn.cu), the loop of cu_attn_warp.cuh: one warp
 * per (sequence, head, query); here over head-major caches, whose rows of
 * one head are contiguous (stride hd), with key j < P being row j of the
 * shared prefix [H,P,hd] and the others the sequence's own row j - P. */
#define DEC_WARPS 4
template <class KV, int NCH>
static __global__ void __launch_bounds__(DEC_WARPS * 32)
    k_attn_decode(float *out, const float *qkv, const KV *kc, const KV *vc, const KV *kp, const KV *vp, int P, int B,
                  int T, int Tmax, int H, int hd, int pos0, const int32_t *pos_dev, float scale_log2) {
    __shared__ float sq[DEC_WARPS][32 * NCH];
    CU_SHARED_POISON(sq);
    const int w = threadIdx.x >> 5;
    const int task = blockIdx.x * DEC_WARPS + w;
    if (task >= B * H * T) return; /* a whole warp; no block barrier below */
    const int h = task % H, bt = task / H, t = bt % T, b = bt / T;
    const int D = H * hd;
    if (pos_dev) pos0 = *pos_dev; /* as the kernel runs: a recorded step replays at later positions */
    if (!cu_pos_ok(pos0, P, T, Tmax)) {
        /* outside the cache (ops.h): NaN rather than reads past it */
        float *orow = out + ((size_t)b * T + t) * D + (size_t)h * hd;
        for (int d = threadIdx.x & 31; d < hd; d += 32) orow[d] = __uint_as_float(0x7fc00000u);
        return;
    }
    const size_t own = ((size_t)b * H + h) * Tmax * hd, pre = (size_t)h * P * hd;
    const cu_kv_rows_prefixed<KV> rows = {kp + pre, vp + pre, kc + own, vc + own, P, (size_t)hd};
    cu_attn_warp_query<KV, NCH>(out + ((size_t)b * T + t) * D + (size_t)h * hd,
                                qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd, sq[w], rows, pos0 + t + 1, hd,
                                scale_log2);
}

template <class KV>
static void att_decode_launch(cu_ctx *c, float *out, const float *qkv, void *kc, void *vc, const void *kp,
                              const void *vp, int P, int B, int T, int Tmax, int H, int hd, int pos0,
                              const int32_t *pd) {
    auto ks = k_kv_store_hm<KV>;
    CU_LAUNCH(ks, cu_grid(c, (size_t)B * T, 1), 256, c->stream, (KV *)kc, (KV *)vc, qkv, B, T, Tmax, H, hd, pos0, pd,
              P);
    cu_after(c, "attn_decode (store)");
    unsigned blocks = (unsigned)(((size_t)B * H * T + DEC_WARPS - 1) / DEC_WARPS);
    float sl = (1.0f / sqrtf((float)hd)) * CU_LOG2E;
    const KV *k = (const KV *)kc, *v = (const KV *)vc, *pk = (const KV *)kp, *pv = (const KV *)vp;
    if (hd <= 32) {
        auto kern = k_attn_decode<KV, 1>;
        CU_LAUNCH(kern, blocks, DEC_WARPS * 32, c->stream, out, qkv, k, v, pk, pv, P, B, T, Tmax, H, hd, pos0, pd, sl);
    } else if (hd <= 64) {
        auto kern = k_attn_decode<KV, 2>;
        CU_LAUNCH(kern, blocks, DEC_WARPS * 32, c->stream, out, qkv, k, v, pk, pv, P, B, T, Tmax, H, hd, pos0, pd, sl);
    } else if (hd <= 96) {
        auto kern = k_attn_decode<KV, 3>;
        CU_LAUNCH(kern, blocks, DEC_WARPS * 32, c->stream, out, qkv, k, v, pk, pv, P, B, T, Tmax, H, hd, pos0, pd, sl);
    } else {
        auto kern = k_attn_decode<KV, 4>;
        CU_LAUNCH(kern, blocks, DEC_WARPS * 32, c->stream, out, qkv, k, v, pk, pv, P, B, T, Tmax, H, hd, pos0, pd, sl);
    }
    cu_after(c, "attn_decode");
}

static void cu_attn_decode(tlm_ops *o, float *out, float *qkv, void *kc, void *vc, int kv_dtype, const void *kp,
                           const void *vp, int P, int B, int T, int Tmax, int H, int hd, int pos0,
                           const int32_t *pos_dev, float theta) {
    cu_ctx *c = cu_of(o);
    if (!kp || !vp) P = 0;
    if (c->failed || B <= 0 || T <= 0 || H <= 0) return;
    if (hd < 1 || hd > 128) {
        cu_fail(c, "attn_decode: head size %d is not supported by the CUDA backend (1..128): use --device cpu", hd);
        return;
    }
    if (kv_dtype != TLM_KV_F32 && kv_dtype != TLM_KV_F16) {
        cu_fail(c, "attn_decode: unknown cache element type %d", kv_dtype);
        return;
    }
    /* the table covers every position of the cache, P + Tmax, whatever
     * pos0 is now: a recorded step replayed later never needs it to grow */
    cu_rope_run(c, qkv, B, T, H, hd, pos0, pos_dev, P + Tmax, theta, 1.0f);
    if (kv_dtype == TLM_KV_F16)
        att_decode_launch<uint16_t>(c, out, qkv, kc, vc, kp, vp, P, B, T, Tmax, H, hd, pos0, pos_dev);
    else
        att_decode_launch<float>(c, out, qkv, kc, vc, kp, vp, P, B, T, Tmax, H, hd, pos0, pos_dev);
}

void cu_infer_install(tlm_ops *o) {
    /* bf16 weights: half the bytes to stream per token, products exact */
    o->pack_dtype_fast = TLM_PACK_BF16;
    o->pack = cu_pack;
    o->pack_free = cu_pack_free;
    o->matmul_packed = cu_matmul_packed;
    o->attn_decode = cu_attn_decode;
}
