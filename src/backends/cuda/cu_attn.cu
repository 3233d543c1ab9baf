/*
 * Causal self-attention on the GPU, fused: no T x T matrix is ever stored.
 *
 * Training (attn_fwd, attn_bwd), flash-attention style. A block of 128
 * threads owns a tile of rows of one (sequence, head); a row is handled by
 * TPR = ceil(hd/32) consecutive threads, each holding 32 of its head
 * dimensions in registers (4-float chunks sub, sub+TPR, ... so the TPR
 * threads of a row read adjacent 16-byte words of shared memory, free of
 * bank conflicts). The other operand streams through shared memory in
 * tiles that every row of the block reads as a broadcast.
 *  - forward: rows are queries; key/value tiles stream past; an online
 *    softmax per row (running max and sum in base 2) keeps one pass;
 *    the log-sum-exp of each row is saved for backward.
 *  - backward, two kernels and no atomics (so repeated runs are bitwise
 *    equal): bwd_q (rows = queries, streaming keys/values) makes dq and
 *    saves Di = dout_i . out_i; bwd_kv (rows = keys, streaming queries,
 *    dout, lse, Di) makes dk and dv. Each recomputes the probabilities
 *    from the saved log-sum-exp: p = exp(s - lse).
 *
 * Generation (attn_cached): one warp per (sequence, head, query row) over
 * the cached keys 0..pos0+t, with the loop that attn_decode (cu_infer.cu)
 * shares: see cu_attn_warp.cuh. Lanes score 32 keys at a time (one each),
 * the warp keeps a running max and sum, and the 32 probabilities are
 * broadcast by shuffles while every lane accumulates its own head
 * dimensions of the values (coalesced rows).
 *
 * Activations (qkv, out, dout, dqkv; ops.h) are float or bf16 in memory,
 * the storage type A of every kernel here: rows are widened to fp32 as
 * they are loaded into registers or shared tiles, all arithmetic is fp32,
 * and results are rounded once as they are stored. lse and Di stay fp32.
 *
 * Head sizes up to 128 (TPR <= 4); any T. Grids are (sequence x head, row
 * tile): blocks start in index order, so the tiles with the most work
 * (the last queries for dq, the first keys for dk/dv) get y = 0.
 *
 * In the bf16 mode, attn_fwd and attn_bwd run on the tensor cores instead
 * (cu_attn_tc.cu) for head sizes that are multiples of 16 up to 128.
 */
#include "backends/cuda/cu_attn_tc.h"
#include "backends/cuda/cu_attn_warp.cuh"
#include "backends/cuda/cu_internal.h"

#define ATT_THREADS 128

/* Tile geometry for TPR threads per row. */
template <int TPR> struct att_geo {
    static constexpr int RPB = ATT_THREADS / TPR;  /* rows per block */
    static constexpr int HDP = 32 * TPR;           /* head size padded */
    static constexpr int NC = HDP / 4;             /* float4 chunks per row */
    static constexpr int KT = HDP <= 64 ? 64 : 32; /* streamed rows per tile (<= 16 KB each) */
};

/* Chunk m (0..7) of this thread: head dimensions 4*(sub + TPR*m) .. +3. */
template <int TPR> static __device__ __forceinline__ int att_dim(int sub, int m) { return 4 * (sub + TPR * m); }

/* Load 4 floats of a row at dimension d0, zero past hd or when !ok. */
template <class A> static __device__ __forceinline__ float4 att_load4(const A *row, int d0, int hd, bool ok) {
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ok) {
        if (d0 + 0 < hd) r.x = cu_ld(row, d0 + 0);
        if (d0 + 1 < hd) r.y = cu_ld(row, d0 + 1);
        if (d0 + 2 < hd) r.z = cu_ld(row, d0 + 2);
        if (d0 + 3 < hd) r.w = cu_ld(row, d0 + 3);
    }
    return r;
}

template <class A> static __device__ __forceinline__ void att_store4(A *row, int d0, int hd, float4 v) {
    if (d0 + 0 < hd) cu_st(row, d0 + 0, v.x);
    if (d0 + 1 < hd) cu_st(row, d0 + 1, v.y);
    if (d0 + 2 < hd) cu_st(row, d0 + 2, v.z);
    if (d0 + 3 < hd) cu_st(row, d0 + 3, v.w);
}

static __device__ __forceinline__ float att_dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

static __device__ __forceinline__ void att_axpy4(float4 &y, float a, float4 x) {
    y.x += a * x.x;
    y.y += a * x.y;
    y.z += a * x.z;
    y.w += a * x.w;
}

/* Sum over the TPR threads of a row (adjacent lanes, aligned groups). */
template <int TPR> static __device__ __forceinline__ float att_row_sum(float v) {
    for (int o = 1; o < TPR; o <<= 1) v += __shfl_xor_sync(CU_FULL, v, o);
    return v;
}

/* Stage rows r0..r0+KT-1 of two row-major operands (row stride rs, only
 * the first hd of HDP columns are real) into shared tiles; zero elsewhere. */
template <int TPR, class E>
static __device__ __forceinline__ void att_stage(float4 (*At)[att_geo<TPR>::NC], float4 (*Bt)[att_geo<TPR>::NC],
                                                 const E *a, const E *b, size_t rs, int r0, int nrows, int hd) {
    typedef att_geo<TPR> G;
    float *af = &At[0][0].x, *bf = &Bt[0][0].x;
    for (int e = threadIdx.x; e < G::KT * G::HDP; e += ATT_THREADS) {
        int j = e / G::HDP, d = e - j * G::HDP;
        bool ok = r0 + j < nrows && d < hd;
        size_t off = (size_t)(r0 + j) * rs + d;
        af[e] = ok ? cu_ld(a, off) : 0.f;
        bf[e] = ok ? cu_ld(b, off) : 0.f;
    }
}

/* ---- forward --------------------------------------------------------------- */

template <int TPR, class A>
static __global__ void __launch_bounds__(ATT_THREADS)
    k_attn_fwd(A *out, float *lse, const A *qkv, int T, int H, int hd, float scale_log2) {
    typedef att_geo<TPR> G;
    __shared__ float4 Ks[G::KT][G::NC], Vs[G::KT][G::NC];
    CU_SHARED_POISON(Ks, Vs);
    const int D = H * hd;
    const size_t rs = (size_t)3 * D;
    const int b = blockIdx.x / H, h = blockIdx.x - (blockIdx.x / H) * H;
    const int qt = gridDim.y - 1 - blockIdx.y; /* the longest tiles first */
    const int tid = threadIdx.x, r = tid / TPR, sub = tid - (tid / TPR) * TPR;
    const int t = qt * G::RPB + r;
    const A *base = qkv + (size_t)b * T * rs + (size_t)h * hd;
    const bool row_ok = t < T;

    float4 q[8], o[8];
    for (int m = 0; m < 8; m++) {
        q[m] = att_load4(base + (size_t)t * rs, att_dim<TPR>(sub, m), hd, row_ok);
        o[m] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float mrun = -INFINITY, l = 0.f;
    const int kend = cu_imin(T, qt * G::RPB + G::RPB);
    for (int k0 = 0; k0 < kend; k0 += G::KT) {
        __syncthreads(); /* the previous tile is consumed */
        att_stage<TPR>(Ks, Vs, base + D, base + 2 * D, rs, k0, T, hd);
        __syncthreads();
        const int kn = cu_imin(G::KT, kend - k0);
        for (int j = 0; j < kn; j++) {
            float s = 0.f;
            for (int m = 0; m < 8; m++) s += att_dot4(q[m], Ks[j][sub + TPR * m]);
            s = att_row_sum<TPR>(s) * scale_log2;
            if (k0 + j <= t) { /* causal; uniform over the row's threads */
                if (s > mrun) {
                    float corr = exp2f(mrun - s);
                    l *= corr;
                    for (int m = 0; m < 8; m++) {
                        o[m].x *= corr;
                        o[m].y *= corr;
                        o[m].z *= corr;
                        o[m].w *= corr;
                    }
                    mrun = s;
                }
                float p = exp2f(s - mrun);
                l += p;
                for (int m = 0; m < 8; m++) att_axpy4(o[m], p, Vs[j][sub + TPR * m]);
            }
        }
    }
    if (row_ok) {
        float inv = 1.0f / l;
        A *orow = out + ((size_t)b * T + t) * D + (size_t)h * hd;
        for (int m = 0; m < 8; m++)
            att_store4(orow, att_dim<TPR>(sub, m), hd, make_float4(o[m].x * inv, o[m].y * inv, o[m].z * inv, o[m].w * inv));
        if (sub == 0) lse[((size_t)b * H + h) * T + t] = (mrun + log2f(l)) * CU_LN2;
    }
}

/* ---- backward: dq (and Di) ------------------------------------------------- */

template <int TPR, class A>
static __global__ void __launch_bounds__(ATT_THREADS)
    k_attn_bwd_q(A *dqkv, float *di_out, const A *dout, const A *out, const float *lse, const A *qkv, int T, int H,
                 int hd, float scale, float scale_log2) {
    typedef att_geo<TPR> G;
    __shared__ float4 Ks[G::KT][G::NC], Vs[G::KT][G::NC];
    CU_SHARED_POISON(Ks, Vs);
    const int D = H * hd;
    const size_t rs = (size_t)3 * D;
    const int b = blockIdx.x / H, h = blockIdx.x - (blockIdx.x / H) * H;
    const int qt = gridDim.y - 1 - blockIdx.y;
    const int tid = threadIdx.x, r = tid / TPR, sub = tid - (tid / TPR) * TPR;
    const int t = qt * G::RPB + r;
    const A *base = qkv + (size_t)b * T * rs + (size_t)h * hd;
    const size_t orow = ((size_t)b * T + t) * D + (size_t)h * hd;
    const bool row_ok = t < T;

    float4 q[8], go[8], dq[8];
    float di = 0.f;
    for (int m = 0; m < 8; m++) {
        int d0 = att_dim<TPR>(sub, m);
        q[m] = att_load4(base + (size_t)t * rs, d0, hd, row_ok);
        go[m] = att_load4(dout + orow, d0, hd, row_ok);
        di += att_dot4(go[m], att_load4(out + orow, d0, hd, row_ok));
        dq[m] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    di = att_row_sum<TPR>(di);
    const float lse2 = row_ok ? lse[((size_t)b * H + h) * T + t] * CU_LOG2E : 0.f;
    const int kend = cu_imin(T, qt * G::RPB + G::RPB);
    for (int k0 = 0; k0 < kend; k0 += G::KT) {
        __syncthreads();
        att_stage<TPR>(Ks, Vs, base + D, base + 2 * D, rs, k0, T, hd);
        __syncthreads();
        const int kn = cu_imin(G::KT, kend - k0);
        for (int j = 0; j < kn; j++) {
            float s = 0.f, dp = 0.f;
            for (int m = 0; m < 8; m++) {
                s += att_dot4(q[m], Ks[j][sub + TPR * m]);
                dp += att_dot4(go[m], Vs[j][sub + TPR * m]);
            }
            s = att_row_sum<TPR>(s) * scale_log2;
            dp = att_row_sum<TPR>(dp);
            if (k0 + j <= t) {
                float p = exp2f(s - lse2);
                float ds = p * (dp - di);
                for (int m = 0; m < 8; m++) att_axpy4(dq[m], ds, Ks[j][sub + TPR * m]);
            }
        }
    }
    if (row_ok) {
        A *dst = dqkv + ((size_t)b * T + t) * rs + (size_t)h * hd;
        for (int m = 0; m < 8; m++)
            att_store4(dst, att_dim<TPR>(sub, m), hd,
                       make_float4(dq[m].x * scale, dq[m].y * scale, dq[m].z * scale, dq[m].w * scale));
        if (sub == 0) di_out[((size_t)b * H + h) * T + t] = di;
    }
}

/* ---- backward: dk, dv ------------------------------------------------------- */

template <int TPR, class A>
static __global__ void __launch_bounds__(ATT_THREADS)
    k_attn_bwd_kv(A *dqkv, const A *dout, const float *lse, const float *di_in, const A *qkv, int T, int H, int hd,
                  float scale, float scale_log2) {
    typedef att_geo<TPR> G;
    __shared__ float4 Qs[G::KT][G::NC], Gs[G::KT][G::NC];
    __shared__ float Ls[G::KT], Ds[G::KT];
    CU_SHARED_POISON(Qs, Gs, Ls, Ds);
    const int D = H * hd;
    const size_t rs = (size_t)3 * D;
    const int b = blockIdx.x / H, h = blockIdx.x - (blockIdx.x / H) * H;
    const int kt = blockIdx.y; /* low key tiles see the most queries: first */
    const int tid = threadIdx.x, r = tid / TPR, sub = tid - (tid / TPR) * TPR;
    const int j = kt * G::RPB + r;
    const A *base = qkv + (size_t)b * T * rs + (size_t)h * hd;
    const A *gbase = dout + (size_t)b * T * D + (size_t)h * hd;
    const size_t lrow = ((size_t)b * H + h) * T;
    const bool row_ok = j < T;

    float4 k[8], v[8], dk[8], dv[8];
    for (int m = 0; m < 8; m++) {
        int d0 = att_dim<TPR>(sub, m);
        k[m] = att_load4(base + (size_t)j * rs + D, d0, hd, row_ok);
        v[m] = att_load4(base + (size_t)j * rs + 2 * D, d0, hd, row_ok);
        dk[m] = make_float4(0.f, 0.f, 0.f, 0.f);
        dv[m] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int q0 = kt * G::RPB; q0 < T; q0 += G::KT) {
        __syncthreads();
        /* queries and their output gradients: different row strides */
        {
            float *qf = &Qs[0][0].x, *gf = &Gs[0][0].x;
            for (int e = threadIdx.x; e < G::KT * G::HDP; e += ATT_THREADS) {
                int i = e / G::HDP, d = e - i * G::HDP;
                bool ok = q0 + i < T && d < hd;
                qf[e] = ok ? cu_ld(base, (size_t)(q0 + i) * rs + d) : 0.f;
                gf[e] = ok ? cu_ld(gbase, (size_t)(q0 + i) * D + d) : 0.f;
            }
            for (int i = threadIdx.x; i < G::KT; i += ATT_THREADS) {
                bool ok = q0 + i < T;
                Ls[i] = ok ? lse[lrow + q0 + i] * CU_LOG2E : 0.f;
                Ds[i] = ok ? di_in[lrow + q0 + i] : 0.f;
            }
        }
        __syncthreads();
        const int qn = cu_imin(G::KT, T - q0);
        for (int i = 0; i < qn; i++) {
            float s = 0.f, dp = 0.f;
            for (int m = 0; m < 8; m++) {
                s += att_dot4(k[m], Qs[i][sub + TPR * m]);
                dp += att_dot4(v[m], Gs[i][sub + TPR * m]);
            }
            s = att_row_sum<TPR>(s) * scale_log2;
            dp = att_row_sum<TPR>(dp);
            if (q0 + i >= j) {
                float p = exp2f(s - Ls[i]);
                float ds = p * (dp - Ds[i]);
                for (int m = 0; m < 8; m++) {
                    att_axpy4(dv[m], p, Gs[i][sub + TPR * m]);
                    att_axpy4(dk[m], ds, Qs[i][sub + TPR * m]);
                }
            }
        }
    }
    if (row_ok) {
        A *dst = dqkv + ((size_t)b * T + j) * rs + (size_t)h * hd;
        for (int m = 0; m < 8; m++) {
            int d0 = att_dim<TPR>(sub, m);
            att_store4(dst + D, d0, hd, make_float4(dk[m].x * scale, dk[m].y * scale, dk[m].z * scale, dk[m].w * scale));
            att_store4(dst + 2 * D, d0, hd, dv[m]);
        }
    }
}

/* ---- cached attention (generation) ------------------------------------------ */

/* One warp per (sequence, head, query row), the loop of cu_attn_warp.cuh;
 * key j of sequence b, head h is row j of the cache [B,Tmax,D] at column
 * h * hd, so rows are D apart. */
#define DEC_WARPS 4
template <int NCH, class A>
static __global__ void __launch_bounds__(DEC_WARPS * 32)
    k_attn_cached(A *out, const A *qkv, const float *kc, const float *vc, int B, int T, int Tmax, int H, int hd,
                  int pos0, float scale_log2) {
    __shared__ float sq[DEC_WARPS][32 * NCH];
    CU_SHARED_POISON(sq);
    /* the query row widened to fp32, then the output row before rounding:
     * the shared loop reads and writes fp32 rows (each lane the same
     * dimensions lane + 32 c of both, so they can share the slot) */
    __shared__ float srow[DEC_WARPS][32 * NCH];
    CU_SHARED_POISON(srow);
    const int w = threadIdx.x >> 5;
    const int task = blockIdx.x * DEC_WARPS + w;
    if (task >= B * H * T) return; /* a whole warp; no block barrier below */
    const int t = task % T, bh = task / T, h = bh % H, b = bh / H;
    const int D = H * hd;
    const size_t at = (size_t)b * Tmax * D + (size_t)h * hd;
    const cu_kv_rows<float> rows = {kc + at, vc + at, (size_t)D};
    const int lane = threadIdx.x & 31;
    const A *qrow = qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd;
    A *orow = out + ((size_t)b * T + t) * D + (size_t)h * hd;
    for (int d = lane; d < hd; d += 32) srow[w][d] = cu_ld(qrow, d);
    cu_attn_warp_query<float, NCH>(srow[w], srow[w], sq[w], rows, pos0 + t + 1, hd, scale_log2);
    for (int d = lane; d < hd; d += 32) cu_st(orow, d, srow[w][d]);
}

/* ---- host side ---------------------------------------------------------------- */

static int att_check(cu_ctx *c, const char *op, int hd) {
    if (hd >= 1 && hd <= 128) return 0;
    cu_fail(c, "%s: head size %d is not supported by the CUDA backend (1..128): use more --heads or --device cpu", op,
            hd);
    return -1;
}

template <int TPR, class A>
static void att_fwd_launch(cu_ctx *c, A *out, float *lse, const A *qkv, int B, int T, int H, int hd) {
    typedef att_geo<TPR> G;
    dim3 grid((unsigned)(B * H), (unsigned)((T + G::RPB - 1) / G::RPB));
    float scale_log2 = (1.0f / sqrtf((float)hd)) * CU_LOG2E;
    auto kern = k_attn_fwd<TPR, A>;
    CU_LAUNCH(kern, grid, ATT_THREADS, c->stream, out, lse, qkv, T, H, hd, scale_log2);
}

template <int TPR, class A>
static void att_bwd_launch(cu_ctx *c, A *dqkv, float *di, const A *dout, const A *out, const float *lse, const A *qkv,
                           int B, int T, int H, int hd) {
    typedef att_geo<TPR> G;
    dim3 grid((unsigned)(B * H), (unsigned)((T + G::RPB - 1) / G::RPB));
    float scale = 1.0f / sqrtf((float)hd), scale_log2 = scale * CU_LOG2E;
    auto kq = k_attn_bwd_q<TPR, A>;
    CU_LAUNCH(kq, grid, ATT_THREADS, c->stream, dqkv, di, dout, out, lse, qkv, T, H, hd, scale, scale_log2);
    cu_after(c, "attn_bwd");
    auto kkv = k_attn_bwd_kv<TPR, A>;
    CU_LAUNCH(kkv, grid, ATT_THREADS, c->stream, dqkv, dout, lse, (const float *)di, qkv, T, H, hd, scale,
              scale_log2);
}

template <class A> static void att_fwd_any(cu_ctx *c, A *out, float *lse, const A *qkv, int B, int T, int H, int hd) {
    if (cu_attn_tc_ok(c, hd)) cu_attn_tc_fwd<A>(c, out, lse, qkv, B, T, H, hd); /* bf16 mode: tensor cores */
    else if (hd <= 32) att_fwd_launch<1>(c, out, lse, qkv, B, T, H, hd);
    else if (hd <= 64) att_fwd_launch<2>(c, out, lse, qkv, B, T, H, hd);
    else att_fwd_launch<4>(c, out, lse, qkv, B, T, H, hd);
}

static void cu_attn_fwd(tlm_ops *o, void *out, float *lse, const void *qkv, int B, int T, int H, int hd) {
    cu_ctx *c = cu_of(o);
    if (c->failed || B <= 0 || T <= 0 || H <= 0 || att_check(c, "attn_fwd", hd)) return;
    CU_ACT_DISPATCH(c, att_fwd_any(c, (act_t *)out, lse, (const act_t *)qkv, B, T, H, hd));
    cu_after(c, "attn_fwd");
}

template <class A>
static void att_bwd_any(cu_ctx *c, A *dqkv, float *di, const A *dout, const A *out, const float *lse, const A *qkv,
                        int B, int T, int H, int hd) {
    if (cu_attn_tc_ok(c, hd)) cu_attn_tc_bwd<A>(c, dqkv, di, dout, out, lse, qkv, B, T, H, hd); /* tensor cores */
    else if (hd <= 32) att_bwd_launch<1>(c, dqkv, di, dout, out, lse, qkv, B, T, H, hd);
    else if (hd <= 64) att_bwd_launch<2>(c, dqkv, di, dout, out, lse, qkv, B, T, H, hd);
    else att_bwd_launch<4>(c, dqkv, di, dout, out, lse, qkv, B, T, H, hd);
}

static void cu_attn_bwd(tlm_ops *o, void *dqkv, const void *dout, const void *out, const float *lse, const void *qkv,
                        int B, int T, int H, int hd) {
    cu_ctx *c = cu_of(o);
    if (c->failed || B <= 0 || T <= 0 || H <= 0 || att_check(c, "attn_bwd", hd)) return;
    float *di = (float *)cu_scratch(c, (size_t)B * H * T * sizeof(float));
    if (!di) return;
    CU_ACT_DISPATCH(c, att_bwd_any(c, (act_t *)dqkv, di, (const act_t *)dout, (const act_t *)out, lse,
                                   (const act_t *)qkv, B, T, H, hd));
    cu_after(c, "attn_bwd");
}

template <int NCH, class A>
static void att_cached_launch(cu_ctx *c, A *out, const A *qkv, const float *kc, const float *vc, int B, int T, int Tmax,
                              int H, int hd, int pos0) {
    size_t tasks = (size_t)B * H * T;
    unsigned blocks = (unsigned)((tasks + DEC_WARPS - 1) / DEC_WARPS);
    float scale_log2 = (1.0f / sqrtf((float)hd)) * CU_LOG2E;
    auto kern = k_attn_cached<NCH, A>;
    CU_LAUNCH(kern, blocks, DEC_WARPS * 32, c->stream, out, qkv, kc, vc, B, T, Tmax, H, hd, pos0, scale_log2);
}

template <class A>
static void att_cached_any(cu_ctx *c, A *out, const A *qkv, const float *kc, const float *vc, int B, int T, int Tmax,
                           int H, int hd, int pos0) {
    if (hd <= 32) att_cached_launch<1>(c, out, qkv, kc, vc, B, T, Tmax, H, hd, pos0);
    else if (hd <= 64) att_cached_launch<2>(c, out, qkv, kc, vc, B, T, Tmax, H, hd, pos0);
    else if (hd <= 96) att_cached_launch<3>(c, out, qkv, kc, vc, B, T, Tmax, H, hd, pos0);
    else att_cached_launch<4>(c, out, qkv, kc, vc, B, T, Tmax, H, hd, pos0);
}

static void cu_attn_cached(tlm_ops *o, void *out, const void *qkv, const float *kc, const float *vc, int B, int T,
                           int Tmax, int H, int hd, int pos0) {
    cu_ctx *c = cu_of(o);
    if (c->failed || B <= 0 || T <= 0 || H <= 0 || att_check(c, "attn_cached", hd)) return;
    CU_ACT_DISPATCH(c, att_cached_any(c, (act_t *)out, (const act_t *)qkv, kc, vc, B, T, Tmax, H, hd, pos0));
    cu_after(c, "attn_cached");
}

void cu_attn_install(tlm_ops *o) {
    o->attn_fwd = cu_attn_fwd;
    o->attn_bwd = cu_attn_bwd;
    o->attn_cached = cu_attn_cached;
}
