/*
 * Causal self-attention for training on the tensor cores: bf16 operands,
 * fp32 accumulation, through the WMMA API (nvcuda::wmma, 16x16x16 tiles).
 * Same results as cu_attn.cu's fp32 kernels up to bf16 rounding of q, k,
 * v, dout and the probability tiles; used in the backend's bf16 mode only
 * (see cu_attn_tc_ok), so fp32 and tf32 keep the exact fp32 attention.
 *
 * Why: on the FP32 cores attention takes most of a bf16 training step's
 * budget (review finding 4); on the tensor cores it is a few percent.
 *
 * Layout. A block has 4 warps; each warp owns 16 rows of the block's 64
 * (queries in forward and bwd_q, keys in bwd_kv) and keeps that operand as
 * bf16 matrix_a fragments and its results as fp32 accumulator fragments
 * in registers for the whole kernel. The other operand streams through
 * shared memory in tiles of BK rows, loaded from global memory (fp32 or
 * bf16, the template parameter E) and rounded to bf16 there; rows past T
 * and columns past hd are zeros, so the products need no bounds. Head
 * sizes are padded to HDP = 32, 64 or 128 for the tile shapes, but chunks
 * of 16 columns past hd are skipped, not multiplied.
 *
 * WMMA fragments are opaque (which lane holds which element is
 * unspecified), so all per-row work goes through shared memory: a warp
 * stores its score tile S [16 x BK] as fp32, lanes 2r and 2r+1 process row
 * r (each half of the columns, combined by one shuffle), and write the
 * probabilities as bf16 for the next product.
 *
 * Forward: online softmax with a lazily moved reference max per row: p =
 * exp2(s - m) with m moved only when a score exceeds it by more than
 * TC_RESCALE (log2 units), so p <= 2^8 meanwhile (harmless in fp32 sums
 * and bf16 tiles, which keep fp32's exponent range). When a row's m moves,
 * the warp rescales its output accumulators through shared memory, one
 * 16x16 fragment at a time; with causal masking that is about the first
 * tile or two, so the rescale is rare instead of once per tile.
 *
 * Backward, two kernels and no atomics (deterministic), as in cu_attn.cu:
 * bwd_q (rows = queries, streaming keys and values) computes Di = dout_i .
 * out_i in fp32 from memory, S = Q K^T and dP = dO V^T, dS = P (dP - Di)
 * with P = exp(S - lse) recomputed, and dQ = scale dS K. bwd_kv (rows =
 * keys, streaming queries and dout) computes S^T = K Q^T and dP^T = V dO^T
 * and accumulates dV = P^T dO and dK = scale dS^T Q.
 *
 * Static shared memory <= 48 KB per block in every configuration (checked
 * by static_assert below).
 */
#include "backends/cuda/cu_attn_tc.h"

/* TC_UNROLL: full unrolling, so fragment arrays are indexed by constants
 * and stay in registers; TC_UNROLL4: per-row loops, partly unrolled (a full
 * unroll hoists all their loads and exp2s and costs registers) */
#ifdef TLM_CUDA_EMU
#define TC_UNROLL
#define TC_UNROLL4
#else
#include <mma.h>
#define TC_UNROLL _Pragma("unroll")
#define TC_UNROLL4 _Pragma("unroll 4")
#endif

namespace wmma = nvcuda::wmma;

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> tc_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> tc_brow;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> tc_bcol;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> tc_acc;

#define TC_WARPS 4
#define TC_THREADS (TC_WARPS * 32)
#define TC_ROWS (TC_WARPS * 16) /* rows a block owns */
#define TC_RESCALE 8.0f         /* log2 units: p <= 256 between rescales */
#define TC_SMEM_MAX (48 * 1024)

/* Tile geometry for a head padded to HDP columns and BK streamed rows. */
template <int HDP, int BK> struct tc_geo {
    static constexpr int NC = HDP / 16;  /* 16-column chunks of the head */
    static constexpr int LD = HDP + 8;   /* bf16 pitch of head-wide tiles: 16 bytes of pad against bank
                                            conflicts, and a multiple of 8 elements as WMMA requires */
    static constexpr int LDS = BK + 4;   /* fp32 pitch of score tiles [16][BK] */
    static constexpr int LDP = BK + 8;   /* bf16 pitch of probability tiles [16][BK] */
};

static __device__ __forceinline__ float tc_ld(const float *p) { return *p; }
static __device__ __forceinline__ float tc_ld(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
static __device__ __forceinline__ void tc_st(float *p, float v) { *p = v; }
static __device__ __forceinline__ void tc_st(__nv_bfloat16 *p, float v) { *p = __float2bfloat16(v); }

/* Rows r0..r0+n-1 of a [*, hd] slice (row stride rs) into dst[n][LD] as
 * bf16, HDP columns, zero past row nrows or column hd. All threads. */
template <int HDP, int LD, class E>
static __device__ __forceinline__ void tc_stage(__nv_bfloat16 *dst, const E *src, size_t rs, int r0, int n, int nrows,
                                                int hd) {
    for (int e = threadIdx.x; e < n * HDP; e += TC_THREADS) {
        const int i = e / HDP, d = e - (e / HDP) * HDP;
        float v = 0.f;
        if (r0 + i < nrows && d < hd) v = tc_ld(src + (size_t)(r0 + i) * rs + d);
        dst[i * LD + d] = __float2bfloat16(v);
    }
}

/* Column of step i (0..BK/2-1) for the lane doing half lh of row r in the
 * per-row loops: the two lanes of a row take alternate columns, and rows
 * 8..15 run one pair ahead, so with an fp32 pitch of 4 (mod 32) words the
 * 32 lanes read 32 different banks at every step. */
template <int BK> static __device__ __forceinline__ int tc_col(int i, int r, int lh) {
    return 2 * ((i + (r >> 3)) & (BK / 2 - 1)) + lh;
}

/* The warp's accumulators acc[c] (rows row0..row0+15, 16 columns each)
 * times `mul` (this lane's row's factor) to dst (row stride rs), rows < T,
 * through the warp's fp32 scratch scr [16][ld]: lanes 2r, 2r+1 write row r. */
template <int NC, class E>
static __device__ __forceinline__ void tc_store_rows(E *dst, size_t rs, int row0, int T, int hd, tc_acc (&acc)[NC],
                                                     float *scr, int ld, float mul) {
    const int lane = threadIdx.x & 31, r = lane >> 1, lh = lane & 1;
    TC_UNROLL for (int c = 0; c < NC; c++) {
        if (16 * c < hd) {
            wmma::store_matrix_sync(scr, acc[c], ld, wmma::mem_row_major);
            __syncwarp();
            if (row0 + r < T)
                for (int i = 0; i < 8; i++)
                    tc_st(dst + (size_t)(row0 + r) * rs + 16 * c + 8 * lh + i, scr[r * ld + 8 * lh + i] * mul);
            __syncwarp();
        }
    }
}

/* ---- forward ------------------------------------------------------------------ */

template <int HDP> struct tc_fwd_cfg {
    static constexpr int BK = HDP <= 64 ? 64 : 32; /* keys per streamed tile */
    typedef tc_geo<HDP, BK> G;
    static constexpr size_t SMEM = sizeof(__nv_bfloat16) * 2 * BK * G::LD + sizeof(float) * TC_WARPS * 16 * G::LDS +
                                   sizeof(__nv_bfloat16) * TC_WARPS * 16 * G::LDP + sizeof(float) * TC_WARPS * 16;
    static_assert(SMEM <= TC_SMEM_MAX, "forward tiles exceed 48 KB of static shared memory");
    static_assert(2 * BK >= TC_ROWS, "the query tile is staged in the key/value buffer");
};

/* grid (B*H, ceil(T/64)), 128 threads. out [B,T,D], lse [B,H,T]. */
template <int HDP, class E>
static __global__ void __launch_bounds__(TC_THREADS)
    k_attn_tc_fwd(E *out, float *lse, const E *qkv, int T, int H, int hd, float scale_log2) {
    typedef tc_fwd_cfg<HDP> C;
    typedef typename C::G G;
    constexpr int BK = C::BK;
    alignas(32) __shared__ __nv_bfloat16 KV[2 * BK][G::LD]; /* keys [0,BK), values [BK,2BK); first the queries */
    alignas(32) __shared__ float Ss[TC_WARPS][16][G::LDS];  /* each warp's scores, and its rescale scratch */
    alignas(32) __shared__ __nv_bfloat16 Ps[TC_WARPS][16][G::LDP];
    __shared__ float Cs[TC_WARPS][16]; /* each row's rescale factor */
    CU_SHARED_POISON(KV, Ss, Ps, Cs);
    const int D = H * hd, nc = hd / 16;
    const size_t rs = (size_t)3 * D;
    const int b = blockIdx.x / H, h = blockIdx.x - (blockIdx.x / H) * H;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * TC_ROWS; /* the longest tiles first */
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 1, lh = lane & 1;
    const int qw = q0 + 16 * w; /* the warp's first query */
    const int t = qw + lr;      /* this lane's query in per-row work */
    const E *base = qkv + (size_t)b * T * rs + (size_t)h * hd;

    tc_stage<HDP, G::LD>(&KV[0][0], base, rs, q0, TC_ROWS, T, hd);
    __syncthreads();
    tc_a qf[G::NC];
    tc_acc of[G::NC];
    TC_UNROLL for (int c = 0; c < G::NC; c++) {
        if (c < nc) wmma::load_matrix_sync(qf[c], &KV[16 * w][16 * c], G::LD);
        wmma::fill_fragment(of[c], 0.f);
    }
    float m = -INFINITY, l = 0.f; /* row t: reference max (log2 units) and sum; lanes 2r, 2r+1 agree */
    const int kend = cu_imin(T, q0 + TC_ROWS);
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads(); /* the queries are in fragments, or the previous tile is consumed */
        tc_stage<HDP, G::LD>(&KV[0][0], base + D, rs, k0, BK, T, hd);
        tc_stage<HDP, G::LD>(&KV[BK][0], base + 2 * D, rs, k0, BK, T, hd);
        __syncthreads();
        /* keys of this tile that some query of the warp sees (uniform over the warp) */
        const int ncol = cu_imin(BK, cu_imin(T, qw + 16) - k0);
        if (ncol <= 0) continue;
        const int nkb = (ncol + 15) >> 4;
        /* S [16 x 16 nkb] = Q K^T: K row-major [key][dim] is K^T column-major */
        TC_UNROLL for (int n = 0; n < BK / 16; n++) {
            if (n < nkb) {
                tc_acc s;
                wmma::fill_fragment(s, 0.f);
                TC_UNROLL for (int c = 0; c < G::NC; c++) {
                    if (c < nc) {
                        tc_bcol kf;
                        wmma::load_matrix_sync(kf, &KV[16 * n][16 * c], G::LD);
                        wmma::mma_sync(s, qf[c], kf, s);
                    }
                }
                wmma::store_matrix_sync(&Ss[w][0][16 * n], s, G::LDS, wmma::mem_row_major);
            }
        }
        __syncwarp();
        /* row t, this lane's half of the columns; masked keys (future, or
         * past T) get p = 0 and never reach the max. Columns past ncol are
         * masked by the same test (they are keys > t or >= T). */
        float tmax = -INFINITY;
        TC_UNROLL4 for (int i = 0; i < BK / 2; i++) {
            const int j = tc_col<BK>(i, lr, lh);
            if (k0 + j <= t && k0 + j < T) tmax = fmaxf(tmax, Ss[w][lr][j]);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(CU_FULL, tmax, 1)) * scale_log2;
        const float mnew = tmax > m + TC_RESCALE ? tmax : m; /* m = -inf: the first keys set it */
        const float corr = mnew == m ? 1.f : exp2f(m - mnew); /* 0 while m = -inf (nothing summed yet) */
        float psum = 0.f;
        TC_UNROLL4 for (int i = 0; i < BK / 2; i++) {
            const int j = tc_col<BK>(i, lr, lh);
            float p = 0.f;
            if (k0 + j <= t && k0 + j < T) p = exp2f(Ss[w][lr][j] * scale_log2 - mnew);
            psum += p;
            Ps[w][lr][j] = __float2bfloat16(p);
        }
        /* both lanes of the row add the same two halves: same bits */
        l = l * corr + (psum + __shfl_xor_sync(CU_FULL, psum, 1));
        const bool resc = m != -INFINITY && mnew != m;
        m = mnew;
        if (lh == 0) Cs[w][lr] = corr;
        const unsigned any = __ballot_sync(CU_FULL, resc);
        __syncwarp();
        if (any) { /* O *= corr per row, a fragment at a time through the (consumed) score scratch */
            TC_UNROLL for (int c = 0; c < G::NC; c++) {
                if (c < nc) {
                    wmma::store_matrix_sync(&Ss[w][0][0], of[c], G::LDS, wmma::mem_row_major);
                    __syncwarp();
                    for (int i = 0; i < 8; i++) Ss[w][lr][8 * lh + i] *= Cs[w][lr];
                    __syncwarp();
                    wmma::load_matrix_sync(of[c], &Ss[w][0][0], G::LDS, wmma::mem_row_major);
                    __syncwarp();
                }
            }
        }
        /* O [16 x hd] += P V: V row-major [key][dim] */
        TC_UNROLL for (int n = 0; n < BK / 16; n++) {
            if (n < nkb) {
                tc_a pf;
                wmma::load_matrix_sync(pf, &Ps[w][0][16 * n], G::LDP);
                TC_UNROLL for (int c = 0; c < G::NC; c++) {
                    if (c < nc) {
                        tc_brow vf;
                        wmma::load_matrix_sync(vf, &KV[BK + 16 * n][16 * c], G::LD);
                        wmma::mma_sync(of[c], pf, vf, of[c]);
                    }
                }
            }
        }
    }
    /* every row saw key 0, so l >= 1 (the max key has p >= 1) */
    tc_store_rows<G::NC>(out + (size_t)b * T * D + (size_t)h * hd, (size_t)D, qw, T, hd, of, &Ss[w][0][0], G::LDS,
                         1.0f / l);
    if (lh == 0 && t < T) lse[((size_t)b * H + h) * T + t] = (m + log2f(l)) * CU_LN2;
}

/* ---- backward: dq (and Di) --------------------------------------------------- */

#define TC_BK_BWD 32 /* streamed rows per tile in both backward kernels */

template <int HDP> struct tc_bwd_cfg {
    static constexpr int BK = TC_BK_BWD;
    typedef tc_geo<HDP, BK> G;
    static constexpr size_t SMEM_Q = sizeof(__nv_bfloat16) * 2 * BK * G::LD +
                                     2 * sizeof(float) * TC_WARPS * 16 * G::LDS +
                                     sizeof(__nv_bfloat16) * TC_WARPS * 16 * G::LDP;
    static constexpr size_t SMEM_KV = sizeof(__nv_bfloat16) * 2 * BK * G::LD +
                                      2 * sizeof(float) * TC_WARPS * 16 * G::LDS +
                                      2 * sizeof(__nv_bfloat16) * TC_WARPS * 16 * G::LDP + 2 * sizeof(float) * BK;
    static_assert(SMEM_Q <= TC_SMEM_MAX && SMEM_KV <= TC_SMEM_MAX, "backward tiles exceed 48 KB of shared memory");
    static_assert(2 * BK == TC_ROWS, "the block's own rows are staged in the streaming buffer");
};

/* grid (B*H, ceil(T/64)), 128 threads. Writes the q columns of dqkv and
 * di [B,H,T]. */
template <int HDP, class E>
static __global__ void __launch_bounds__(TC_THREADS)
    k_attn_tc_bwd_q(E *dqkv, float *di_out, const E *dout, const E *out, const float *lse, const E *qkv, int T, int H,
                    int hd, float scale, float scale_log2) {
    typedef tc_bwd_cfg<HDP> C;
    typedef typename C::G G;
    constexpr int BK = C::BK;
    alignas(32) __shared__ __nv_bfloat16 KV[2 * BK][G::LD]; /* keys, values; first Q, then dO */
    alignas(32) __shared__ float Ss[TC_WARPS][16][G::LDS], Dp[TC_WARPS][16][G::LDS];
    alignas(32) __shared__ __nv_bfloat16 Ps[TC_WARPS][16][G::LDP]; /* dS */
    CU_SHARED_POISON(KV, Ss, Dp, Ps);
    const int D = H * hd, nc = hd / 16;
    const size_t rs = (size_t)3 * D;
    const int b = blockIdx.x / H, h = blockIdx.x - (blockIdx.x / H) * H;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * TC_ROWS;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 1, lh = lane & 1;
    const int qw = q0 + 16 * w, t = qw + lr;
    const E *base = qkv + (size_t)b * T * rs + (size_t)h * hd;
    const E *gbase = dout + (size_t)b * T * D + (size_t)h * hd;
    const E *obase = out + (size_t)b * T * D + (size_t)h * hd;
    const size_t lrow = ((size_t)b * H + h) * T;

    /* Di = dout_t . out_t in fp32, from memory; lanes 2r, 2r+1 split the head */
    float di = 0.f;
    if (t < T)
        for (int d = lh; d < hd; d += 2) di += tc_ld(gbase + (size_t)t * D + d) * tc_ld(obase + (size_t)t * D + d);
    di += __shfl_xor_sync(CU_FULL, di, 1);
    if (lh == 0 && t < T) di_out[lrow + t] = di;
    const float lse2 = t < T ? lse[lrow + t] * CU_LOG2E : 0.f;

    tc_a qf[G::NC], gf[G::NC];
    tc_acc dq[G::NC];
    tc_stage<HDP, G::LD>(&KV[0][0], base, rs, q0, TC_ROWS, T, hd);
    __syncthreads();
    TC_UNROLL for (int c = 0; c < G::NC; c++) {
        if (c < nc) wmma::load_matrix_sync(qf[c], &KV[16 * w][16 * c], G::LD);
        wmma::fill_fragment(dq[c], 0.f);
    }
    __syncthreads();
    tc_stage<HDP, G::LD>(&KV[0][0], gbase, (size_t)D, q0, TC_ROWS, T, hd);
    __syncthreads();
    TC_UNROLL for (int c = 0; c < G::NC; c++)
        if (c < nc) wmma::load_matrix_sync(gf[c], &KV[16 * w][16 * c], G::LD);

    const int kend = cu_imin(T, q0 + TC_ROWS);
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        tc_stage<HDP, G::LD>(&KV[0][0], base + D, rs, k0, BK, T, hd);
        tc_stage<HDP, G::LD>(&KV[BK][0], base + 2 * D, rs, k0, BK, T, hd);
        __syncthreads();
        const int ncol = cu_imin(BK, cu_imin(T, qw + 16) - k0);
        if (ncol <= 0) continue;
        const int nkb = (ncol + 15) >> 4;
        /* S = Q K^T and dP = dO V^T, [16 x 16 nkb] each */
        TC_UNROLL for (int n = 0; n < BK / 16; n++) {
            if (n < nkb) {
                tc_acc s, dp;
                wmma::fill_fragment(s, 0.f);
                wmma::fill_fragment(dp, 0.f);
                TC_UNROLL for (int c = 0; c < G::NC; c++) {
                    if (c < nc) {
                        tc_bcol kf, vf;
                        wmma::load_matrix_sync(kf, &KV[16 * n][16 * c], G::LD);
                        wmma::mma_sync(s, qf[c], kf, s);
                        wmma::load_matrix_sync(vf, &KV[BK + 16 * n][16 * c], G::LD);
                        wmma::mma_sync(dp, gf[c], vf, dp);
                    }
                }
                wmma::store_matrix_sync(&Ss[w][0][16 * n], s, G::LDS, wmma::mem_row_major);
                wmma::store_matrix_sync(&Dp[w][0][16 * n], dp, G::LDS, wmma::mem_row_major);
            }
        }
        __syncwarp();
        /* dS = P (dP - Di), P = exp(S - lse) recomputed; 0 where masked */
        TC_UNROLL4 for (int i = 0; i < BK / 2; i++) {
            const int j = tc_col<BK>(i, lr, lh);
            float ds = 0.f;
            if (k0 + j <= t && k0 + j < T) {
                const float p = exp2f(Ss[w][lr][j] * scale_log2 - lse2);
                ds = p * (Dp[w][lr][j] - di);
            }
            Ps[w][lr][j] = __float2bfloat16(ds);
        }
        __syncwarp();
        /* dQ [16 x hd] += dS K: K row-major [key][dim] */
        TC_UNROLL for (int n = 0; n < BK / 16; n++) {
            if (n < nkb) {
                tc_a sf;
                wmma::load_matrix_sync(sf, &Ps[w][0][16 * n], G::LDP);
                TC_UNROLL for (int c = 0; c < G::NC; c++) {
                    if (c < nc) {
                        tc_brow kf;
                        wmma::load_matrix_sync(kf, &KV[16 * n][16 * c], G::LD);
                        wmma::mma_sync(dq[c], sf, kf, dq[c]);
                    }
                }
            }
        }
    }
    tc_store_rows<G::NC>(dqkv + (size_t)b * T * rs + (size_t)h * hd, rs, qw, T, hd, dq, &Ss[w][0][0], G::LDS, scale);
}

/* ---- backward: dk, dv ---------------------------------------------------------- */

/* grid (B*H, ceil(T/64)), 128 threads; block y owns keys 64y..64y+63 and
 * streams the queries from there on (causal). Writes the k and v columns. */
template <int HDP, class E>
static __global__ void __launch_bounds__(TC_THREADS)
    k_attn_tc_bwd_kv(E *dqkv, const E *dout, const float *lse, const float *di_in, const E *qkv, int T, int H, int hd,
                     float scale, float scale_log2) {
    typedef tc_bwd_cfg<HDP> C;
    typedef typename C::G G;
    constexpr int BQ = C::BK;
    alignas(32) __shared__ __nv_bfloat16 QG[2 * BQ][G::LD]; /* queries, dout; first K, then V */
    alignas(32) __shared__ float Ss[TC_WARPS][16][G::LDS], Dp[TC_WARPS][16][G::LDS]; /* S^T, dP^T */
    alignas(32) __shared__ __nv_bfloat16 Ps[TC_WARPS][16][G::LDP], Gs[TC_WARPS][16][G::LDP]; /* P^T, dS^T */
    __shared__ float Ls[BQ], Ds[BQ];
    CU_SHARED_POISON(QG, Ss, Dp, Ps, Gs, Ls, Ds);
    const int D = H * hd, nc = hd / 16;
    const size_t rs = (size_t)3 * D;
    const int b = blockIdx.x / H, h = blockIdx.x - (blockIdx.x / H) * H;
    const int k0 = blockIdx.y * TC_ROWS; /* low key tiles see the most queries: first */
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 1, lh = lane & 1;
    const int kw = k0 + 16 * w, j = kw + lr; /* the warp's first key; this lane's key */
    const E *base = qkv + (size_t)b * T * rs + (size_t)h * hd;
    const E *gbase = dout + (size_t)b * T * D + (size_t)h * hd;
    const size_t lrow = ((size_t)b * H + h) * T;

    tc_a kf[G::NC], vf[G::NC];
    tc_acc dk[G::NC], dv[G::NC];
    tc_stage<HDP, G::LD>(&QG[0][0], base + D, rs, k0, TC_ROWS, T, hd);
    __syncthreads();
    TC_UNROLL for (int c = 0; c < G::NC; c++) {
        if (c < nc) wmma::load_matrix_sync(kf[c], &QG[16 * w][16 * c], G::LD);
        wmma::fill_fragment(dk[c], 0.f);
        wmma::fill_fragment(dv[c], 0.f);
    }
    __syncthreads();
    tc_stage<HDP, G::LD>(&QG[0][0], base + 2 * D, rs, k0, TC_ROWS, T, hd);
    __syncthreads();
    TC_UNROLL for (int c = 0; c < G::NC; c++)
        if (c < nc) wmma::load_matrix_sync(vf[c], &QG[16 * w][16 * c], G::LD);

    for (int q0 = k0; q0 < T; q0 += BQ) {
        __syncthreads();
        tc_stage<HDP, G::LD>(&QG[0][0], base, rs, q0, BQ, T, hd);
        tc_stage<HDP, G::LD>(&QG[BQ][0], gbase, (size_t)D, q0, BQ, T, hd);
        for (int i = threadIdx.x; i < BQ; i += TC_THREADS) {
            const bool ok = q0 + i < T;
            Ls[i] = ok ? lse[lrow + q0 + i] * CU_LOG2E : 0.f;
            Ds[i] = ok ? di_in[lrow + q0 + i] : 0.f;
        }
        __syncthreads();
        /* 16-query blocks [nlo, nhi) that reach the warp's keys (query >= kw) and exist (< T) */
        const int x = kw - q0 - 15;
        const int nlo = x <= 0 ? 0 : (x + 15) >> 4;
        const int nhi = cu_imin(BQ / 16, (T - q0 + 15) >> 4);
        if (nlo >= nhi) continue;
        /* S^T = K Q^T and dP^T = V dO^T, [16 keys x BQ queries]: Q and dO row-major are their
         * transposes column-major */
        TC_UNROLL for (int n = 0; n < BQ / 16; n++) {
            if (n >= nlo && n < nhi) {
                tc_acc s, dp;
                wmma::fill_fragment(s, 0.f);
                wmma::fill_fragment(dp, 0.f);
                TC_UNROLL for (int c = 0; c < G::NC; c++) {
                    if (c < nc) {
                        tc_bcol qb, gb;
                        wmma::load_matrix_sync(qb, &QG[16 * n][16 * c], G::LD);
                        wmma::mma_sync(s, kf[c], qb, s);
                        wmma::load_matrix_sync(gb, &QG[BQ + 16 * n][16 * c], G::LD);
                        wmma::mma_sync(dp, vf[c], gb, dp);
                    }
                }
                wmma::store_matrix_sync(&Ss[w][0][16 * n], s, G::LDS, wmma::mem_row_major);
                wmma::store_matrix_sync(&Dp[w][0][16 * n], dp, G::LDS, wmma::mem_row_major);
            }
        }
        __syncwarp();
        /* key j, this lane's half of the queries; columns outside [nlo, nhi)
         * hold stale values but fail the mask (query < kw or >= T) */
        TC_UNROLL4 for (int ii = 0; ii < BQ / 2; ii++) {
            const int i = tc_col<BQ>(ii, lr, lh);
            float p = 0.f, ds = 0.f;
            if (q0 + i >= j && q0 + i < T) {
                p = exp2f(Ss[w][lr][i] * scale_log2 - Ls[i]);
                ds = p * (Dp[w][lr][i] - Ds[i]);
            }
            Ps[w][lr][i] = __float2bfloat16(p);
            Gs[w][lr][i] = __float2bfloat16(ds);
        }
        __syncwarp();
        /* dV [16 x hd] += P^T dO, dK += dS^T Q: Q and dO row-major [query][dim] */
        TC_UNROLL for (int n = 0; n < BQ / 16; n++) {
            if (n >= nlo && n < nhi) {
                tc_a pa, ga;
                wmma::load_matrix_sync(pa, &Ps[w][0][16 * n], G::LDP);
                wmma::load_matrix_sync(ga, &Gs[w][0][16 * n], G::LDP);
                TC_UNROLL for (int c = 0; c < G::NC; c++) {
                    if (c < nc) {
                        tc_brow ob, qb;
                        wmma::load_matrix_sync(ob, &QG[BQ + 16 * n][16 * c], G::LD);
                        wmma::mma_sync(dv[c], pa, ob, dv[c]);
                        wmma::load_matrix_sync(qb, &QG[16 * n][16 * c], G::LD);
                        wmma::mma_sync(dk[c], ga, qb, dk[c]);
                    }
                }
            }
        }
    }
    E *dst = dqkv + (size_t)b * T * rs + (size_t)h * hd;
    tc_store_rows<G::NC>(dst + D, rs, kw, T, hd, dk, &Ss[w][0][0], G::LDS, scale);
    tc_store_rows<G::NC>(dst + 2 * D, rs, kw, T, hd, dv, &Ss[w][0][0], G::LDS, 1.0f);
}

/* ---- host side ---------------------------------------------------------------- */

template <int HDP, class E>
static void tc_fwd_launch(cu_ctx *c, E *out, float *lse, const E *qkv, int B, int T, int H, int hd) {
    dim3 grid((unsigned)(B * H), (unsigned)((T + TC_ROWS - 1) / TC_ROWS));
    const float scale_log2 = (1.0f / sqrtf((float)hd)) * CU_LOG2E;
    auto kern = k_attn_tc_fwd<HDP, E>;
    CU_LAUNCH(kern, grid, TC_THREADS, c->stream, out, lse, qkv, T, H, hd, scale_log2);
}

template <int HDP, class E>
static void tc_bwd_launch(cu_ctx *c, E *dqkv, float *di, const E *dout, const E *out, const float *lse, const E *qkv,
                          int B, int T, int H, int hd) {
    dim3 grid((unsigned)(B * H), (unsigned)((T + TC_ROWS - 1) / TC_ROWS));
    const float scale = 1.0f / sqrtf((float)hd), scale_log2 = scale * CU_LOG2E;
    auto kq = k_attn_tc_bwd_q<HDP, E>;
    CU_LAUNCH(kq, grid, TC_THREADS, c->stream, dqkv, di, dout, out, lse, qkv, T, H, hd, scale, scale_log2);
    cu_after(c, "attn_bwd");
    auto kkv = k_attn_tc_bwd_kv<HDP, E>;
    CU_LAUNCH(kkv, grid, TC_THREADS, c->stream, dqkv, dout, lse, (const float *)di, qkv, T, H, hd, scale, scale_log2);
}

template <class E> void cu_attn_tc_fwd(cu_ctx *c, E *out, float *lse, const E *qkv, int B, int T, int H, int hd) {
    if (hd <= 32) tc_fwd_launch<32>(c, out, lse, qkv, B, T, H, hd);
    else if (hd <= 64) tc_fwd_launch<64>(c, out, lse, qkv, B, T, H, hd);
    else tc_fwd_launch<128>(c, out, lse, qkv, B, T, H, hd);
}

template <class E>
void cu_attn_tc_bwd(cu_ctx *c, E *dqkv, float *di, const E *dout, const E *out, const float *lse, const E *qkv, int B,
                    int T, int H, int hd) {
    if (hd <= 32) tc_bwd_launch<32>(c, dqkv, di, dout, out, lse, qkv, B, T, H, hd);
    else if (hd <= 64) tc_bwd_launch<64>(c, dqkv, di, dout, out, lse, qkv, B, T, H, hd);
    else tc_bwd_launch<128>(c, dqkv, di, dout, out, lse, qkv, B, T, H, hd);
}

/* fp32 activations today; bf16 ones compiled so the templates stay usable */
template void cu_attn_tc_fwd<float>(cu_ctx *, float *, float *, const float *, int, int, int, int);
template void cu_attn_tc_bwd<float>(cu_ctx *, float *, float *, const float *, const float *, const float *,
                                    const float *, int, int, int, int);
template void cu_attn_tc_fwd<__nv_bfloat16>(cu_ctx *, __nv_bfloat16 *, float *, const __nv_bfloat16 *, int, int, int,
                                            int);
template void cu_attn_tc_bwd<__nv_bfloat16>(cu_ctx *, __nv_bfloat16 *, float *, const __nv_bfloat16 *,
                                            const __nv_bfloat16 *, const float *, const __nv_bfloat16 *, int, int, int,
                                            int);
