/*
 * The CUDA backend's element-wise and row-wise ops: residual add, embedding
 * (gather and a deterministic scatter), RMSNorm, RoPE, SwiGLU, softmax +
 * cross-entropy and the batch's mean loss, the global squared norm and
 * AdamW, and the KV-cache store.
 *
 * Determinism: no op here uses floating-point atomics. Every reduction
 * (RMSNorm's weight gradient, sumsq, the embedding gradient) adds in an
 * order fixed by the shapes and the grid, so a run repeats bit for bit on
 * the same GPU, which exact resume relies on.
 *
 * Precision: fp32 arithmetic throughout with the accurate expf/logf/sqrtf
 * (the `--dtype fp32` path is compared with the CPU reference at 1e-4);
 * sums of squares over the whole model are accumulated in double. In the
 * bf16 mode the activation operands (ops.h) are bf16 in memory: the
 * kernels that touch them are templated on the storage type and only
 * their loads and stores differ (widen, compute in fp32, round once).
 */
#include "backends/cuda/cu_internal.h"

#include <string.h>

#define CU_THREADS 256

/* ---- residual add ------------------------------------------------------- */

static __global__ void k_add(float *y, const float *x, size_t n) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] += x[i];
}

static void cu_add_inplace(tlm_ops *o, float *y, const float *x, size_t n) {
    cu_ctx *c = cu_of(o);
    if (c->failed || n == 0) return;
    CU_LAUNCH(k_add, cu_grid(c, n, CU_THREADS), CU_THREADS, c->stream, y, x, n);
    cu_after(c, "add_inplace");
}

/* ---- embedding ------------------------------------------------------------ */

/* Blocks stride over rows, threads over columns: no division per element. */
static __global__ void k_embed_fwd(float *out, const int32_t *tok, const float *wte, int N, int D) {
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const float *src = wte + (size_t)tok[n] * D;
        float *dst = out + (size_t)n * D;
        for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
    }
}

static void cu_embed_fwd(tlm_ops *o, float *out, const int32_t *tok, const float *wte, int N, int D) {
    cu_ctx *c = cu_of(o);
    if (c->failed || N <= 0 || D <= 0) return;
    CU_LAUNCH(k_embed_fwd, cu_grid(c, (size_t)N, 1), CU_THREADS, c->stream, out, tok, wte, N, D);
    cu_after(c, "embed_fwd");
}

/* Deterministic scatter-add without knowing the vocabulary size: block g
 * owns every vocabulary row v with v % G == g. It scans all N tokens in
 * order, in chunks of EMB_CHUNK, compacts the positions whose token it
 * owns into a list (a block-wide prefix sum keeps them in position order),
 * and adds their rows of dout into dwte. Each row is written by one block
 * only and receives its tokens in increasing position order, so the sums
 * are the same whatever G is, run after run, with no atomics. Within a
 * block thread t always owns columns t, t+256, ..., so consecutive
 * additions into the same row need no barrier.
 * A chunk's list is sorted by (token, position) before the additions, so
 * each token's rows are summed in a register and its dwte row is read and
 * written once per chunk: a frequent token (a few % of all positions, all
 * in one block) is then a run of independent loads instead of thousands of
 * dependent read-modify-writes through memory. Each row's sum is the same
 * chain of additions in position order as before, so the bits are too. */
#define EMB_PER 8
#define EMB_CHUNK (CU_THREADS * EMB_PER)
static __global__ void __launch_bounds__(CU_THREADS) k_embed_bwd(float *dwte, const int32_t *tok, const float *dout,
                                                                  int N, int D) {
    /* (token << 32 | position) of the chunk's positions this block owns */
    __shared__ unsigned long long key[EMB_CHUNK];
    __shared__ int warp_off[CU_THREADS / 32];
    __shared__ int total;
    CU_SHARED_POISON(key, warp_off, total);
    const int G = gridDim.x, g = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    for (int c0 = 0; c0 < N; c0 += EMB_CHUNK) {
        int mine[EMB_PER];
        int cnt = 0;
        for (int k = 0; k < EMB_PER; k++) {
            int n = c0 + tid * EMB_PER + k;
            int t = n < N ? tok[n] : -1;
            int hit = t >= 0 && t % G == g;
            mine[k] = hit ? n : -1;
            cnt += hit;
        }
        /* exclusive prefix sum of cnt over the block, in thread order */
        int incl = cnt;
        for (int o = 1; o < 32; o <<= 1) {
            int v = __shfl_up_sync(CU_FULL, incl, o);
            if (lane >= o) incl += v;
        }
        if (lane == 31) warp_off[w] = incl;
        __syncthreads();
        if (w == 0) {
            const int nw = CU_THREADS / 32;
            int v = lane < nw ? warp_off[lane] : 0, inc = v;
            for (int o = 1; o < 32; o <<= 1) {
                int u = __shfl_up_sync(CU_FULL, inc, o);
                if (lane >= o) inc += u;
            }
            if (lane < nw) warp_off[lane] = inc - v;
            if (lane == nw - 1) total = inc;
        }
        __syncthreads();
        int pos = warp_off[w] + incl - cnt;
        for (int k = 0; k < EMB_PER; k++)
            if (mine[k] >= 0) key[pos++] = (unsigned long long)(uint32_t)tok[mine[k]] << 32 | (uint32_t)mine[k];
        __syncthreads();
        const int nlist = total;
        /* bitonic sort of the list, padded to a power of two with keys that
         * sort last (block-uniform loop bounds: every thread reaches each
         * barrier) */
        int P = 1;
        while (P < nlist) P <<= 1;
        for (int i = nlist + tid; i < P; i += CU_THREADS) key[i] = ~0ull;
        __syncthreads();
        for (int k = 2; k <= P; k <<= 1)
            for (int j = k >> 1; j > 0; j >>= 1) {
                for (int i = tid; i < P; i += CU_THREADS) {
                    const int ixj = i ^ j;
                    if (ixj > i) {
                        const unsigned long long a = key[i], b = key[ixj];
                        if ((a > b) == ((i & k) == 0)) {
                            key[i] = b;
                            key[ixj] = a;
                        }
                    }
                }
                __syncthreads();
            }
        for (int d = tid; d < D; d += CU_THREADS)
            for (int i = 0; i < nlist;) {
                const uint32_t t = (uint32_t)(key[i] >> 32);
                float *dst = dwte + (size_t)t * D + d;
                float acc = *dst;
                for (; i < nlist && (uint32_t)(key[i] >> 32) == t; i++)
                    acc += dout[(size_t)(uint32_t)key[i] * D + d];
                *dst = acc;
            }
        __syncthreads(); /* key, warp_off and total are reused */
    }
}

static void cu_embed_bwd(tlm_ops *o, float *dwte, const int32_t *tok, const float *dout, int N, int D) {
    cu_ctx *c = cu_of(o);
    if (c->failed || N <= 0 || D <= 0) return;
    unsigned G = (unsigned)c->sm_count * 4;
    CU_LAUNCH(k_embed_bwd, G, CU_THREADS, c->stream, dwte, tok, dout, N, D);
    cu_after(c, "embed_bwd");
}

/* ---- RMSNorm -------------------------------------------------------------- */

/* One warp per row. */
template <class A>
static __global__ void k_rmsnorm_fwd(A *out, float *rstd, const float *x, const float *w, int N, int D, float eps) {
    const int lane = threadIdx.x & 31;
    const int nwarps = (gridDim.x * blockDim.x) >> 5;
    for (int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; n < N; n += nwarps) {
        const float *xr = x + (size_t)n * D;
        float ss = 0;
        for (int d = lane; d < D; d += 32) ss += xr[d] * xr[d];
        ss = cu_warp_sum(ss);
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        A *yr = out + (size_t)n * D;
        for (int d = lane; d < D; d += 32) cu_st(yr, d, xr[d] * r * w[d]);
        if (rstd && lane == 0) rstd[n] = r;
    }
}

static void cu_rmsnorm_fwd(tlm_ops *o, void *out, float *rstd, const float *x, const float *w, int N, int D,
                           float eps) {
    cu_ctx *c = cu_of(o);
    if (c->failed || N <= 0 || D <= 0) return;
    CU_ACT_DISPATCH(c, auto kern = k_rmsnorm_fwd<act_t>;
                    CU_LAUNCH(kern, cu_grid(c, (size_t)N, CU_THREADS / 32), CU_THREADS, c->stream, (act_t *)out,
                              rstd, x, w, N, D, eps));
    cu_after(c, "rmsnorm_fwd");
}

/* dx_j = r w_j g_j - x_j r^3 / D * sum_i g_i w_i x_i (as the CPU backends). */
template <class A>
static __global__ void k_rmsnorm_bwd_dx(float *dx, const A *dout, const float *x, const float *w, const float *rstd,
                                        int N, int D) {
    const int lane = threadIdx.x & 31;
    const int nwarps = (gridDim.x * blockDim.x) >> 5;
    for (int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; n < N; n += nwarps) {
        const float *xr = x + (size_t)n * D;
        const A *g = dout + (size_t)n * D;
        float dot = 0;
        for (int d = lane; d < D; d += 32) dot += cu_ld(g, d) * w[d] * xr[d];
        dot = cu_warp_sum(dot);
        float r = rstd[n];
        float cc = r * r * r * dot / (float)D;
        float *dxr = dx + (size_t)n * D;
        for (int d = lane; d < D; d += 32) dxr[d] = r * w[d] * cu_ld(g, d) - xr[d] * cc;
    }
}

/* dw partial sums: block (x, p) sums columns x*32.. over rows
 * [p*rows, (p+1)*rows) into part[p, :], in a fixed order. */
template <class A>
static __global__ void k_rmsnorm_bwd_dw_part(float *part, const A *dout, const float *x, const float *rstd, int N,
                                             int D, int rows) {
    __shared__ float s[8][33];
    CU_SHARED_POISON(s);
    const int col = blockIdx.x * 32 + threadIdx.x, p = blockIdx.y;
    const int r0 = p * rows, r1 = cu_imin(N, r0 + rows);
    float acc = 0;
    if (col < D)
        for (int n = r0 + (int)threadIdx.y; n < r1; n += 8) {
            size_t i = (size_t)n * D + col;
            acc += cu_ld(dout, i) * x[i] * rstd[n];
        }
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < D) {
        float t = 0;
        for (int k = 0; k < 8; k++) t += s[k][threadIdx.x];
        part[(size_t)p * D + col] = t;
    }
}

static __global__ void k_rmsnorm_bwd_dw_sum(float *dw, const float *part, int P, int D) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= D) return;
    float t = 0;
    for (int p = 0; p < P; p++) t += part[(size_t)p * D + col];
    dw[col] += t;
}

static void cu_rmsnorm_bwd(tlm_ops *o, float *dx, float *dw, const void *dout, const float *x, const float *w,
                           const float *rstd, int N, int D) {
    cu_ctx *c = cu_of(o);
    if (c->failed || N <= 0 || D <= 0) return;
    CU_ACT_DISPATCH(c, auto kern = k_rmsnorm_bwd_dx<act_t>;
                    CU_LAUNCH(kern, cu_grid(c, (size_t)N, CU_THREADS / 32), CU_THREADS, c->stream, dx,
                              (const act_t *)dout, x, w, rstd, N, D));
    cu_after(c, "rmsnorm_bwd");
    /* Row groups of at least 64 rows, at most 256 groups: enough blocks to
     * fill the GPU, few partials to add up. Depends on N only. */
    int rows = (N + 255) / 256;
    if (rows < 64) rows = 64;
    int P = (N + rows - 1) / rows;
    float *part = (float *)cu_scratch(c, (size_t)P * D * sizeof(float));
    if (!part) return;
    CU_ACT_DISPATCH(c, auto kern = k_rmsnorm_bwd_dw_part<act_t>;
                    CU_LAUNCH(kern, dim3((unsigned)(D + 31) / 32, (unsigned)P), dim3(32, 8), c->stream, part,
                              (const act_t *)dout, x, rstd, N, D, rows));
    cu_after(c, "rmsnorm_bwd");
    CU_LAUNCH(k_rmsnorm_bwd_dw_sum, (unsigned)(D + CU_THREADS - 1) / CU_THREADS, CU_THREADS, c->stream, dw, part, P,
              D);
    cu_after(c, "rmsnorm_bwd");
}

/* ---- RoPE ----------------------------------------------------------------- */

/* (cos, sin) of pos * theta^(-2i/hd), formed in double and rounded once,
 * as the CPU backends do: the angle in float would lose ~pos * 6e-8 rad. */
static __global__ void k_rope_table(float2 *tab, int len, int half, int hd, float theta) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len * half) return;
    int pos = i / half, k = i - pos * half;
    double ang = (double)pos * pow((double)theta, -2.0 * k / hd);
    tab[i] = make_float2((float)cos(ang), (float)sin(ang));
}

/* One thread per rotated pair: (b, t, head of q or k, i < hd/2). The first
 * position is *pos_dev when given (read as the kernel runs: a recorded
 * step replays at later positions), else pos0; positions past the table's
 * npos rows leave qkv as it is (attn_decode then writes NaN). */
template <class A>
static __global__ void k_rope(A *qkv, const float2 *tab, int B, int T, int H, int hd, int pos0,
                              const int32_t *pos_dev, int npos, float dir) {
    if (pos_dev) pos0 = *pos_dev;
    if (pos0 < 0 || pos0 > npos - T) return;
    const int half = hd / 2, D = H * hd;
    const size_t total = (size_t)B * T * 2 * H * half;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        int i = (int)(idx % half);
        size_t rest = idx / half;
        int hh = (int)(rest % (2 * H)); /* q heads, then k heads: contiguous */
        size_t n = rest / (2 * H);
        int t = (int)(n % T);
        A *v = qkv + n * 3 * D + (size_t)hh * hd;
        float2 cs = tab[(size_t)(pos0 + t) * half + i];
        float co = cs.x, si = dir * cs.y;
        float x0 = cu_ld(v, i), x1 = cu_ld(v, i + half);
        cu_st(v, i, x0 * co - x1 * si);
        cu_st(v, i + half, x0 * si + x1 * co);
    }
}

/* The table is a pure function of (theta, hd) and grows to the longest
 * position asked for; generation reaches it in the first call of a run. */
static int cu_rope_prepare(cu_ctx *c, int hd, float theta, int npos) {
    if (c->rope_tab && c->rope_hd == hd && c->rope_theta == theta && c->rope_len >= npos) return 0;
    int len = 1024;
    while (len < npos) len *= 2;
    int half = hd / 2;
    if (c->capturing) {
        /* a recording cannot allocate or wait: ops.h's graph block */
        cu_fail(c, "the RoPE table must grow to %d positions while recording a graph: run the step once "
                   "un-recorded first", npos);
        return -1;
    }
    c->graph_gen++; /* recorded steps hold the old table's address */
    if (c->rope_tab) {
        cu_host_wait(c, c->stream, "cudaStreamSynchronize (growing the RoPE table)");
        cu_dfree(c, c->rope_tab);
        c->rope_tab = NULL;
    }
    if (!CU_OK(c, cu_dmalloc(c, (void **)&c->rope_tab, (size_t)len * half * sizeof(float2)))) {
        c->rope_tab = NULL;
        return -1;
    }
    c->rope_len = len;
    c->rope_hd = hd;
    c->rope_theta = theta;
    unsigned n = (unsigned)(len * half);
    CU_LAUNCH(k_rope_table, (n + CU_THREADS - 1) / CU_THREADS, CU_THREADS, c->stream, c->rope_tab, len, half, hd,
              theta);
    cu_after(c, "rope (table)");
    return c->failed ? -1 : 0;
}

template <class A>
static void cu_rope_launch(cu_ctx *c, A *qkv, int B, int T, int H, int hd, int pos0, const int32_t *pos_dev,
                           int npos, float theta, float dir) {
    if (c->failed || B <= 0 || T <= 0 || hd < 2) return;
    if (cu_rope_prepare(c, hd, theta, npos)) return;
    size_t total = (size_t)B * T * 2 * H * (hd / 2);
    auto kern = k_rope<A>;
    CU_LAUNCH(kern, cu_grid(c, total, CU_THREADS), CU_THREADS, c->stream, qkv, c->rope_tab, B, T, H, hd, pos0,
              pos_dev, c->rope_len, dir);
    cu_after(c, "rope");
}

/* fp32 rows (attn_decode's, whatever the activation type) */
void cu_rope_run(cu_ctx *c, float *qkv, int B, int T, int H, int hd, int pos0, const int32_t *pos_dev, int npos,
                 float theta, float dir) {
    cu_rope_launch<float>(c, qkv, B, T, H, hd, pos0, pos_dev, npos, theta, dir);
}

static void cu_rope(tlm_ops *o, void *qkv, int B, int T, int H, int hd, int pos0, float theta, float dir) {
    cu_ctx *c = cu_of(o);
    CU_ACT_DISPATCH(c, cu_rope_launch<act_t>(c, (act_t *)qkv, B, T, H, hd, pos0, NULL, pos0 + T, theta, dir));
}

static void cu_rope_fwd(tlm_ops *o, void *qkv, int B, int T, int H, int hd, int pos0, float theta) {
    cu_rope(o, qkv, B, T, H, hd, pos0, theta, 1.0f);
}

static void cu_rope_bwd(tlm_ops *o, void *dqkv, int B, int T, int H, int hd, int pos0, float theta) {
    cu_rope(o, dqkv, B, T, H, hd, pos0, theta, -1.0f);
}

/* ---- KV cache ------------------------------------------------------------- */

template <class A>
static __global__ void k_kv_store(float *kc, float *vc, const A *qkv, int B, int T, int Tmax, int D, int pos0) {
    for (int n = blockIdx.x; n < B * T; n += gridDim.x) {
        int b = n / T, t = n - b * T;
        const A *src = qkv + (size_t)n * 3 * D;
        size_t dst = ((size_t)b * Tmax + pos0 + t) * D;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            kc[dst + d] = cu_ld(src, (size_t)D + d);
            vc[dst + d] = cu_ld(src, (size_t)2 * D + d);
        }
    }
}

static void cu_kv_store(tlm_ops *o, float *kc, float *vc, const void *qkv, int B, int T, int Tmax, int D, int pos0) {
    cu_ctx *c = cu_of(o);
    if (c->failed || B <= 0 || T <= 0 || D <= 0) return;
    CU_ACT_DISPATCH(c, auto kern = k_kv_store<act_t>;
                    CU_LAUNCH(kern, cu_grid(c, (size_t)B * T, 1), CU_THREADS, c->stream, kc, vc, (const act_t *)qkv,
                              B, T, Tmax, D, pos0));
    cu_after(c, "kv_store");
}

/* ---- SwiGLU --------------------------------------------------------------- */

template <class A> static __global__ void k_swiglu_fwd(A *a, const A *gu, int N, int F) {
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const A *g = gu + (size_t)n * 2 * F, *u = g + F;
        A *ar = a + (size_t)n * F;
        for (int f = threadIdx.x; f < F; f += blockDim.x) {
            float gf = cu_ld(g, f);
            cu_st(ar, f, gf / (1.0f + expf(-gf)) * cu_ld(u, f));
        }
    }
}

template <class A> static __global__ void k_swiglu_bwd(A *dgu, const A *da, const A *gu, int N, int F) {
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const A *g = gu + (size_t)n * 2 * F, *u = g + F, *d = da + (size_t)n * F;
        A *dg = dgu + (size_t)n * 2 * F, *du = dg + F;
        for (int f = threadIdx.x; f < F; f += blockDim.x) {
            float gf = cu_ld(g, f), uf = cu_ld(u, f), df = cu_ld(d, f);
            float sig = 1.0f / (1.0f + expf(-gf));
            cu_st(dg, f, df * uf * sig * (1.0f + gf * (1.0f - sig)));
            cu_st(du, f, df * gf * sig);
        }
    }
}

static void cu_swiglu_fwd(tlm_ops *o, void *a, const void *gu, int N, int F) {
    cu_ctx *c = cu_of(o);
    if (c->failed || N <= 0 || F <= 0) return;
    CU_ACT_DISPATCH(c, auto kern = k_swiglu_fwd<act_t>;
                    CU_LAUNCH(kern, cu_grid(c, (size_t)N, 1), CU_THREADS, c->stream, (act_t *)a, (const act_t *)gu,
                              N, F));
    cu_after(c, "swiglu_fwd");
}

static void cu_swiglu_bwd(tlm_ops *o, void *dgu, const void *da, const void *gu, int N, int F) {
    cu_ctx *c = cu_of(o);
    if (c->failed || N <= 0 || F <= 0) return;
    CU_ACT_DISPATCH(c, auto kern = k_swiglu_bwd<act_t>;
                    CU_LAUNCH(kern, cu_grid(c, (size_t)N, 1), CU_THREADS, c->stream, (act_t *)dgu, (const act_t *)da,
                              (const act_t *)gu, N, F));
    cu_after(c, "swiglu_bwd");
}

/* ---- softmax + cross-entropy ---------------------------------------------- */

/* One block per row (grid-stride). The branch on an ignored target is
 * uniform over the block, so no barrier is skipped by some threads only. */
template <class A>
static __global__ void __launch_bounds__(CU_THREADS) k_xent(A *logits, float *losses, const int32_t *targets, int N,
                                                             int V, float dscale, int want_grad) {
    __shared__ float red[32];
    CU_SHARED_POISON(red);
    const int tid = threadIdx.x;
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        A *x = logits + (size_t)n * V;
        const int tgt = targets[n];
        if (tgt < 0 || tgt >= V) {
            if (tid == 0) losses[n] = 0;
            if (want_grad)
                for (int i = tid; i < V; i += CU_THREADS) cu_st(x, i, 0.0f);
            continue;
        }
        const float xt = cu_ld(x, tgt); /* read before any thread overwrites the row */
        float mx = -INFINITY;
        for (int i = tid; i < V; i += CU_THREADS) mx = fmaxf(mx, cu_ld(x, i));
        mx = cu_block_max(mx, red);
        float sum = 0;
        for (int i = tid; i < V; i += CU_THREADS) sum += expf(cu_ld(x, i) - mx);
        sum = cu_block_sum(sum, red);
        /* (mx - xt) first: exact for nearby values (see the CPU backend) */
        if (tid == 0) losses[n] = (mx - xt) + logf(sum);
        if (want_grad) {
            const float cs = dscale / sum;
            for (int i = tid; i < V; i += CU_THREADS) {
                float p = expf(cu_ld(x, i) - mx) * cs;
                cu_st(x, i, i == tgt ? p - dscale : p);
            }
        }
    }
}

static void cu_xent(tlm_ops *o, void *logits, float *losses, const int32_t *targets, int N, int V, float dscale,
                    int want_grad) {
    cu_ctx *c = cu_of(o);
    if (c->failed || N <= 0 || V <= 0) return;
    CU_ACT_DISPATCH(c, auto kern = k_xent<act_t>;
                    CU_LAUNCH(kern, cu_grid(c, (size_t)N, 1), CU_THREADS, c->stream, (act_t *)logits, losses, targets,
                              N, V, dscale, want_grad));
    cu_after(c, "xent");
}

/* One block: the batch is B*T rows, a few thousand to a few hundred
 * thousand, so a single pass of 256 threads costs microseconds. Sums in
 * double in a fixed order (deterministic, and the count is exact). */
static __global__ void __launch_bounds__(CU_THREADS) k_loss_mean(float *out, const float *losses,
                                                                  const int32_t *targets, int N) {
    __shared__ double red[32];
    CU_SHARED_POISON(red);
    double s = 0, n = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x)
        if (targets[i] >= 0) {
            s += losses[i];
            n += 1;
        }
    s = cu_block_sum(s, red);
    n = cu_block_sum(n, red);
    if (threadIdx.x == 0) out[0] = n > 0 ? (float)(s / n) : 0.0f;
}

static void cu_loss_mean(tlm_ops *o, float *out, const float *losses, const int32_t *targets, int N) {
    cu_ctx *c = cu_of(o);
    if (c->failed) return;
    CU_LAUNCH(k_loss_mean, 1, CU_THREADS, c->stream, out, losses, targets, N);
    cu_after(c, "loss_mean");
}

/* ---- optimizer ------------------------------------------------------------ */

/* Two passes with a fixed grid: per-block partial sums in double, then one
 * block adds them in index order. The result stays on the device. */
#define SUMSQ_BLOCKS 512
static __global__ void __launch_bounds__(CU_THREADS) k_sumsq_part(double *part, const float *x, size_t n) {
    __shared__ double red[32];
    CU_SHARED_POISON(red);
    double s = 0;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) s += (double)x[i] * x[i];
    s = cu_block_sum(s, red);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

static __global__ void __launch_bounds__(CU_THREADS) k_sumsq_final(float *out, const double *part, int P,
                                                                    int accumulate) {
    __shared__ double red[32];
    CU_SHARED_POISON(red);
    double s = 0;
    for (int i = threadIdx.x; i < P; i += blockDim.x) s += part[i];
    s = cu_block_sum(s, red);
    if (threadIdx.x == 0) out[0] = (float)((accumulate ? (double)out[0] : 0.0) + s);
}

static void cu_sumsq(tlm_ops *o, float *out, const float *x, size_t n, int accumulate) {
    cu_ctx *c = cu_of(o);
    if (c->failed) return;
    unsigned P = n ? cu_grid(c, n, CU_THREADS) : 1;
    if (P > SUMSQ_BLOCKS) P = SUMSQ_BLOCKS;
    double *part = (double *)cu_scratch(c, (size_t)P * sizeof(double));
    if (!part) return;
    CU_LAUNCH(k_sumsq_part, P, CU_THREADS, c->stream, part, x, n);
    cu_after(c, "sumsq");
    CU_LAUNCH(k_sumsq_final, 1, CU_THREADS, c->stream, out, (const double *)part, (int)P, accumulate);
    cu_after(c, "sumsq");
}

/* The clipping factor is computed from the device scalar by every thread
 * (one cached load each): no host round trip. */
static __global__ void k_adamw(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2,
                               float eps, float wd, float bc1, float bc2, const float *gnorm_sq, float clip) {
    float s = 1.0f;
    if (clip > 0 && gnorm_sq) {
        double norm = sqrt((double)*gnorm_sq);
        if (norm > clip) s = (float)(clip / norm);
    }
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float gi = g[i] * s;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * bc1 / (sqrtf(vi * bc2) + eps) + wd * p[i]);
    }
}

static void cu_adamw(tlm_ops *o, float *p, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2,
                     float eps, float wd, int t, const float *gnorm_sq, float clip) {
    cu_ctx *c = cu_of(o);
    if (c->failed || n == 0) return;
    /* bias corrections as multipliers 1/(1-b^t), in double on the host */
    float bc1 = (float)(1.0 / (1.0 - pow(b1, t))), bc2 = (float)(1.0 / (1.0 - pow(b2, t)));
    CU_LAUNCH(k_adamw, cu_grid(c, n, CU_THREADS), CU_THREADS, c->stream, p, g, m, v, n, lr, b1, b2, eps, wd, bc1, bc2,
              gnorm_sq, clip);
    cu_after(c, "adamw");
}

void cu_kernels_install(tlm_ops *o) {
    o->add_inplace = cu_add_inplace;
    o->embed_fwd = cu_embed_fwd;
    o->embed_bwd = cu_embed_bwd;
    o->rmsnorm_fwd = cu_rmsnorm_fwd;
    o->rmsnorm_bwd = cu_rmsnorm_bwd;
    o->rope_fwd = cu_rope_fwd;
    o->rope_bwd = cu_rope_bwd;
    o->kv_store = cu_kv_store;
    o->swiglu_fwd = cu_swiglu_fwd;
    o->swiglu_bwd = cu_swiglu_bwd;
    o->xent = cu_xent;
    o->loss_mean = cu_loss_mean;
    o->sumsq = cu_sumsq;
    o->adamw = cu_adamw;
}
