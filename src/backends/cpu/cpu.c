/*
 * The fast CPU backend: matrix products on our AVX-512 micro-kernel
 * (cpu_train_gemm.c; CBLAS where the build has no AVX-512, and for
 * products of a few rows), everything else as OpenMP loops over rows (or
 * heads) whose inner loops the compiler turns into SIMD (`omp simd`, -O3
 * -march=native).
 *
 * Attention is fused: training attention goes in blocks of queries through
 * the same micro-kernel (cpu_train_attn.c), generation attention row by row
 * into a per-thread scratch; nothing of size T x T is ever stored, and the
 * backward pass recomputes the probabilities from the saved log-sum-exp.
 * Work is split so that no two threads ever write the same output element,
 * which keeps every op deterministic and free of atomics; the training ops
 * (products, attention, norms) also give the same bits for any thread count.
 */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cpu/cpu_info.h"
#include "backends/cpu/cpu_internal.h"
#include "backends/cpu/cpu_train.h"
#include "ops/ops.h"
#include "util/common.h"

/* Below this many elements an op runs on one thread: waking the team costs
 * more than the work (matters for token-by-token generation). */
#define CPU_PAR_MIN 16384

typedef struct {
    float *scratch;        /* attention score rows, rmsnorm partial sums */
    size_t scratch_floats; /* capacity of scratch */
    float *gemm_ws;        /* per-thread packing buffers of cpu_gemm, allocated on first use */
    float *attn_ws;        /* per-thread scratch of the blocked attention */
    size_t attn_ws_floats; /* capacity of attn_ws */
} cpu_ctx;

/* Shared scratch of at least `bytes`, 64-byte aligned, grown on demand (the
 * first step allocates; later steps reuse). An op has no error path, so
 * failure here aborts. */
static void *cpu_scratch_bytes(tlm_ops *o, size_t bytes) {
    cpu_ctx *c = o->ctx;
    size_t need = (bytes + 63) / 64 * 16; /* in floats, whole cache lines */
    if (need > c->scratch_floats) {
        tlm_free(c->scratch);
        c->scratch = tlm_alloc(need * sizeof(float));
        if (!c->scratch) abort();
        c->scratch_floats = need;
    }
    return c->scratch;
}

/* per_thread floats for each of o->threads threads: thread i uses
 * base + i * stride. */
static float *cpu_scratch(tlm_ops *o, size_t per_thread, size_t *stride) {
    size_t s = (per_thread + 15) / 16 * 16; /* whole cache lines per thread */
    *stride = s;
    return cpu_scratch_bytes(o, s * (size_t)o->threads * sizeof(float));
}

/* ---- dense algebra ------------------------------------------------------ */

/* Below this many multiply-adds a product runs on one thread. */
#define CPU_MATMUL_PAR_MIN (1 << 21)

/* Products with fewer rows than this go to BLAS: packing all of B for a
 * handful of rows (token-by-token generation) costs more than it saves. */
#define CPU_GEMM_MIN_ROWS 32

/* Matrix products run on our AVX-512 kernels where the build has them
 * (cpu_train_gemm.c: the Debian OpenBLAS uses its AVX2 kernels on AMD Zen
 * 4/5, half the speed), otherwise through BLAS. Either way the OpenMP team
 * splits the product and BLAS runs single-threaded inside it: a pthreads
 * OpenBLAS keeps its own workers spinning after every call, which on a
 * machine with as many cores as threads steals the cores from the OpenMP
 * loops that follow (and vice versa). The larger of M and N is cut, so the
 * operand each thread packs whole is the smaller one; each C element is
 * still computed by one thread with the same k order, so results do not
 * depend on the cut. */
static void cpu_matmul(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                       int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* C = beta C; BLAS would reject the degenerate strides */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float *c = &C[(size_t)i * ldc + j];
                *c = beta == 0.0f ? 0.0f : beta * *c;
            }
        return;
    }
    int nt = o->threads;
    if ((double)M * N * K < CPU_MATMUL_PAR_MIN) nt = 1;
#if CPU_HAVE_KERNELS
    if (M >= CPU_GEMM_MIN_ROWS && N >= 16) {
        cpu_ctx *c = o->ctx;
        if (!c->gemm_ws) {
            c->gemm_ws = tlm_alloc(cpu_gemm_ws_floats(o->threads) * sizeof(float));
            if (!c->gemm_ws) abort(); /* an op has no error path */
        }
        cpu_gemm(c->gemm_ws, nt, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
#endif
    const CBLAS_TRANSPOSE ta = transA ? CblasTrans : CblasNoTrans, tb = transB ? CblasTrans : CblasNoTrans;
    int split_m = M >= N;
    int len = split_m ? M : N;
    if (nt > (len + 15) / 16) nt = (len + 15) / 16;
    if (nt <= 1) {
        cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int chunks = (len + 15) / 16;
        int c0 = (int)((long)chunks * t / n), c1 = (int)((long)chunks * (t + 1) / n);
        int i0 = c0 * 16, i1 = c1 * 16 < len ? c1 * 16 : len;
        if (i1 > i0) {
            if (split_m) {
                const float *a = transA ? A + i0 : A + (size_t)i0 * lda;
                cblas_sgemm(CblasRowMajor, ta, tb, i1 - i0, N, K, alpha, a, lda, B, ldb, beta, C + (size_t)i0 * ldc,
                            ldc);
            } else {
                const float *b = transB ? B + (size_t)i0 * ldb : B + i0;
                cblas_sgemm(CblasRowMajor, ta, tb, M, i1 - i0, K, alpha, A, lda, b, ldb, beta, C + i0, ldc);
            }
        }
    }
}

static void cpu_add_inplace(tlm_ops *o, float *y, const float *x, size_t n) {
    long nn = (long)n;
#pragma omp parallel for simd num_threads(o->threads) if (nn >= CPU_PAR_MIN) schedule(static)
    for (long i = 0; i < nn; i++) y[i] += x[i];
}

/* ---- embedding ---------------------------------------------------------- */

static void cpu_embed_fwd(tlm_ops *o, float *out, const int32_t *tok, const float *wte, int N, int D) {
#pragma omp parallel for num_threads(o->threads) if ((long)N * D >= CPU_PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * D, wte + (size_t)tok[n] * D, sizeof(float) * (size_t)D);
}

/* Repeated tokens add into the same row, so threads split the columns, not
 * the tokens: each owns 16-column stripes (a cache line) of every row. */
static void cpu_embed_bwd(tlm_ops *o, float *dwte, const int32_t *tok, const float *dout, int N, int D) {
    int stripes = (D + 15) / 16;
#pragma omp parallel for num_threads(o->threads) if ((long)N * D >= CPU_PAR_MIN) schedule(static)
    for (int s = 0; s < stripes; s++) {
        int d0 = s * 16, d1 = d0 + 16 < D ? d0 + 16 : D;
        for (int n = 0; n < N; n++) {
            float *w = dwte + (size_t)tok[n] * D;
            const float *g = dout + (size_t)n * D;
#pragma omp simd
            for (int d = d0; d < d1; d++) w[d] += g[d];
        }
    }
}

/* ---- RMSNorm ------------------------------------------------------------ */

/* Row sums are accumulated in double (as the reference backend does): the
 * pass is memory bound, so it costs nothing, and it keeps the rounding of
 * these sums out of the comparison of whole training steps against the
 * float64 PyTorch reference (test_model), which is sensitive to it. */
static void cpu_rmsnorm_fwd(tlm_ops *o, float *out, float *rstd, const float *x, const float *w, int N, int D,
                            float eps) {
#pragma omp parallel for num_threads(o->threads) if ((long)N * D >= CPU_PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        float *yr = out + (size_t)n * D;
        double ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int d = 0; d < D; d++) ss += (double)xr[d] * xr[d];
        float r = (float)(1.0 / sqrt(ss / D + (double)eps));
#pragma omp simd
        for (int d = 0; d < D; d++) yr[d] = xr[d] * r * w[d];
        if (rstd) rstd[n] = r;
    }
}

/* Rows per partial sum of dw in rmsnorm_bwd: fixed, so that the result does
 * not depend on the thread count (exact resume on another machine). */
#define CPU_RMS_CHUNK 64

/* dx_j = r w_j g_j - x_j r^3 / D * sum_i g_i w_i x_i (see cpu_ref.c). dw sums
 * over all rows: each chunk of CPU_RMS_CHUNK rows sums into its own partial
 * (double), and the partials are added in chunk order, so the result is
 * deterministic and independent of the thread count. */
static void cpu_rmsnorm_bwd(tlm_ops *o, float *dx, float *dw, const float *dout, const float *x, const float *w,
                            const float *rstd, int N, int D) {
    int nt = (long)N * D >= CPU_PAR_MIN ? o->threads : 1;
    int nchunks = (N + CPU_RMS_CHUNK - 1) / CPU_RMS_CHUNK;
    double *part = cpu_scratch_bytes(o, (size_t)nchunks * (size_t)D * sizeof(double));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int ch = 0; ch < nchunks; ch++) {
            double *pd = part + (size_t)ch * D;
            memset(pd, 0, sizeof(double) * (size_t)D);
            int n1 = (ch + 1) * CPU_RMS_CHUNK < N ? (ch + 1) * CPU_RMS_CHUNK : N;
            for (int n = ch * CPU_RMS_CHUNK; n < n1; n++) {
                const float *xr = x + (size_t)n * D, *g = dout + (size_t)n * D;
                float *dxr = dx + (size_t)n * D;
                float r = rstd[n];
                double dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += (double)g[d] * w[d] * xr[d];
                float c = (float)((double)r * r * r * dot / D);
#pragma omp simd
                for (int d = 0; d < D; d++) {
                    dxr[d] = r * w[d] * g[d] - xr[d] * c;
                    pd[d] += (double)(g[d] * xr[d] * r);
                }
            }
        }
        /* implicit barrier: every partial is complete; reduce by columns */
#pragma omp for schedule(static)
        for (int d = 0; d < D; d++) {
            double sm = 0;
            for (int ch = 0; ch < nchunks; ch++) sm += part[(size_t)ch * D + d];
            dw[d] += (float)sm;
        }
    }
}

/* ---- RoPE --------------------------------------------------------------- */

/* Angles are formed in double: pos * freq in float loses ~pos * 6e-8 rad,
 * which at positions of a few thousand is visible in the outputs. One set
 * of cos/sin per position serves all sequences and heads. */
static void cpu_rope(tlm_ops *o, float *qkv, int B, int T, int H, int hd, int pos0, float theta, float dir) {
    int D = H * hd, half = hd / 2;
    if (half <= 0) return;
#pragma omp parallel for num_threads(o->threads) if ((long)B * T * D >= CPU_PAR_MIN) schedule(static)
    for (int t = 0; t < T; t++) {
        float cs[half], sn[half];
        for (int i = 0; i < half; i++) {
            double ang = (double)(pos0 + t) * pow((double)theta, -2.0 * i / hd);
            cs[i] = (float)cos(ang);
            sn[i] = dir * (float)sin(ang);
        }
        for (int b = 0; b < B; b++) {
            float *row = qkv + ((size_t)b * T + t) * 3 * D;
            for (int hh = 0; hh < 2 * H; hh++) { /* q heads then k heads: contiguous */
                float *v = row + (size_t)hh * hd;
#pragma omp simd
                for (int i = 0; i < half; i++) {
                    float x0 = v[i], x1 = v[i + half];
                    v[i] = x0 * cs[i] - x1 * sn[i];
                    v[i + half] = x0 * sn[i] + x1 * cs[i];
                }
            }
        }
    }
}

static void cpu_rope_fwd(tlm_ops *o, float *qkv, int B, int T, int H, int hd, int pos0, float theta) {
    cpu_rope(o, qkv, B, T, H, hd, pos0, theta, 1.0f);
}

static void cpu_rope_bwd(tlm_ops *o, float *dqkv, int B, int T, int H, int hd, int pos0, float theta) {
    cpu_rope(o, dqkv, B, T, H, hd, pos0, theta, -1.0f);
}

/* ---- causal attention --------------------------------------------------- */

/* Row by row: for head sizes of 32..128 the dot product of a query with one
 * key is a few full-width SIMD multiply-adds, which measured faster than
 * sweeping transposed keys (that variant streams the score row through
 * L1 once per head dimension). */

static inline float cpu_dot(const float *a, const float *b, int n) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One query row against keys 0..nk-1 (rows kvstride floats apart): out[hd]
 * = softmax(scale q.k) v. s is scratch of nk floats. Returns the lse. */
static float cpu_attn_row(float *out, const float *q, const float *k, const float *v, size_t kvstride, int nk,
                          int hd, float scale, float *s) {
    float mx = -INFINITY;
    for (int j = 0; j < nk; j++) {
        s[j] = scale * cpu_dot(q, k + (size_t)j * kvstride, hd);
        mx = s[j] > mx ? s[j] : mx;
    }
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < nk; j++) {
        s[j] = cpu_expf(s[j] - mx);
        sum += s[j];
    }
    float inv = 1.0f / sum;
    for (int d = 0; d < hd; d++) out[d] = 0;
    for (int j = 0; j < nk; j++) {
        const float *vj = v + (size_t)j * kvstride;
        float p = s[j] * inv;
#pragma omp simd
        for (int d = 0; d < hd; d++) out[d] += p * vj[d];
    }
    return mx + logf(sum);
}

#if CPU_HAVE_KERNELS
/* Training attention runs as small matrix products on our micro-kernel
 * (cpu_train_attn.c), ~6x faster than the row-by-row loops below, which
 * remain for builds without AVX-512 (and serve attn_cached). */

/* Scratch of the blocked attention for every thread, grown on demand. */
static float *cpu_attn_ws(tlm_ops *o, int T, int hd) {
    cpu_ctx *c = o->ctx;
    size_t need = cpu_attn_ws_floats(T, hd) * (size_t)o->threads;
    if (need > c->attn_ws_floats) {
        tlm_free(c->attn_ws);
        c->attn_ws = tlm_alloc(need * sizeof(float)); /* zero-filled: padding reads see zeros */
        if (!c->attn_ws) abort();
        c->attn_ws_floats = need;
    }
    return c->attn_ws;
}

static void cpu_attn_fwd(tlm_ops *o, float *out, float *lse, const float *qkv, int B, int T, int H, int hd) {
    int nt = (long)B * T * T * H * hd >= CPU_PAR_MIN ? o->threads : 1;
    cpu_attn_fwd_blocked(cpu_attn_ws(o, T, hd), nt, out, lse, qkv, B, T, H, hd);
}

static void cpu_attn_bwd(tlm_ops *o, float *dqkv, const float *dout, const float *out, const float *lse,
                         const float *qkv, int B, int T, int H, int hd) {
    int nt = (long)B * T * T * H * hd >= CPU_PAR_MIN ? o->threads : 1;
    cpu_attn_bwd_blocked(cpu_attn_ws(o, T, hd), nt, dqkv, dout, out, lse, qkv, B, T, H, hd);
}

#else

/* Rows are independent, so the team splits (b, h, t); later rows see more
 * keys, hence the dynamic schedule. */
static void cpu_attn_fwd(tlm_ops *o, float *out, float *lse, const float *qkv, int B, int T, int H, int hd) {
    int D = H * hd;
    float scale = 1.0f / sqrtf((float)hd);
    size_t stride;
    float *scr = cpu_scratch(o, (size_t)T, &stride);
    int nt = (long)B * T * T * D >= CPU_PAR_MIN ? o->threads : 1;
#pragma omp parallel for collapse(3) num_threads(nt) schedule(dynamic, 8)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                float *s = scr + (size_t)omp_get_thread_num() * stride;
                const float *base = qkv + (size_t)b * T * 3 * D + (size_t)h * hd;
                lse[((size_t)b * H + h) * T + t] =
                    cpu_attn_row(out + ((size_t)b * T + t) * D + (size_t)h * hd, base + (size_t)t * 3 * D,
                                 base + D, base + 2 * D, (size_t)3 * D, t + 1, hd, scale, s);
            }
}

/* Backward of one (sequence, head): q, k, v, dq, dk, dv are the head's
 * columns in rows of stride rs (qkv layout), go and o in rows of stride os.
 * p_j = exp(scale q.k_j - lse), ds_j = scale p_j (dout.v_j - dout.out),
 * dq = sum_j ds_j k_j, dk_j += ds_j q, dv_j += p_j dout.
 * Inlined into copies with a constant hd for the common head sizes: fixed
 * trip counts let the compiler unroll the hd loops fully (measured ~30%
 * faster at hd = 64). */
static inline __attribute__((always_inline)) void cpu_attn_bwd_head(float *dq0, const float *go0,
                                                                    const float *o0, const float *lse,
                                                                    const float *q0, size_t rs, size_t os, int T,
                                                                    int D, int hd) {
    float scale = 1.0f / sqrtf((float)hd);
    for (int t = 0; t < T; t++) { /* all three are accumulated below */
        float *dr = dq0 + (size_t)t * rs;
        memset(dr, 0, sizeof(float) * (size_t)hd);
        memset(dr + D, 0, sizeof(float) * (size_t)hd);
        memset(dr + 2 * D, 0, sizeof(float) * (size_t)hd);
    }
    for (int t = 0; t < T; t++) {
        const float *q = q0 + (size_t)t * rs, *go = go0 + (size_t)t * os;
        float *dq = dq0 + (size_t)t * rs;
        float l = lse[t];
        float di = cpu_dot(go, o0 + (size_t)t * os, hd);
        for (int j = 0; j <= t; j++) {
            const float *k = q0 + (size_t)j * rs + D, *v = k + D;
            float *dk = dq0 + (size_t)j * rs + D, *dv = dk + D;
            float p = expf(scale * cpu_dot(q, k, hd) - l);
            float ds = p * (cpu_dot(go, v, hd) - di) * scale;
#pragma omp simd
            for (int d = 0; d < hd; d++) {
                dq[d] += ds * k[d];
                dk[d] += ds * q[d];
                dv[d] += p * go[d];
            }
        }
    }
}

/* One task per (b, h): it alone owns the dk, dv columns of head h in
 * sequence b, so accumulating them over query rows needs no locks. */
static void cpu_attn_bwd(tlm_ops *o, float *dqkv, const float *dout, const float *out, const float *lse,
                         const float *qkv, int B, int T, int H, int hd) {
    int D = H * hd;
    int nt = (long)B * T * T * D >= CPU_PAR_MIN ? o->threads : 1;
#pragma omp parallel for collapse(2) num_threads(nt) schedule(dynamic, 1)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t r3 = (size_t)b * T * 3 * D + (size_t)h * hd, r1 = (size_t)b * T * D + (size_t)h * hd;
            float *dq = dqkv + r3;
            const float *go = dout + r1, *ot = out + r1, *l = lse + ((size_t)b * H + h) * T, *q = qkv + r3;
            size_t rs = (size_t)3 * D, os = (size_t)D;
            switch (hd) {
            case 32: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, 32); break;
            case 64: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, 64); break;
            case 128: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, 128); break;
            default: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, hd); break;
            }
        }
}
#endif

/* ---- KV cache ----------------------------------------------------------- */

static void cpu_kv_store(tlm_ops *o, float *kc, float *vc, const float *qkv, int B, int T, int Tmax, int D,
                         int pos0) {
    (void)o;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *src = qkv + ((size_t)b * T + t) * 3 * D;
            size_t dst = ((size_t)b * Tmax + pos0 + t) * D;
            memcpy(kc + dst, src + D, sizeof(float) * (size_t)D);
            memcpy(vc + dst, src + 2 * D, sizeof(float) * (size_t)D);
        }
}

/* Like the forward, over keys in the cache (row stride D). */
static void cpu_attn_cached(tlm_ops *o, float *out, const float *qkv, const float *kc, const float *vc, int B,
                            int T, int Tmax, int H, int hd, int pos0) {
    int D = H * hd;
    float scale = 1.0f / sqrtf((float)hd);
    size_t stride;
    float *scr = cpu_scratch(o, (size_t)(pos0 + T), &stride);
    int nt = (long)B * T * (pos0 + T) * D >= CPU_PAR_MIN ? o->threads : 1;
#pragma omp parallel for collapse(3) num_threads(nt) schedule(dynamic, 4)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                float *s = scr + (size_t)omp_get_thread_num() * stride;
                size_t cache = (size_t)b * Tmax * D + (size_t)h * hd;
                cpu_attn_row(out + ((size_t)b * T + t) * D + (size_t)h * hd,
                             qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd, kc + cache, vc + cache, (size_t)D,
                             pos0 + t + 1, hd, scale, s);
            }
}

/* ---- SwiGLU ------------------------------------------------------------- */

static void cpu_swiglu_fwd(tlm_ops *o, float *a, const float *gu, int N, int F) {
#pragma omp parallel for num_threads(o->threads) if ((long)N * F >= CPU_PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *g = gu + (size_t)n * 2 * F, *u = g + F;
        float *ar = a + (size_t)n * F;
#pragma omp simd
        for (int f = 0; f < F; f++) ar[f] = g[f] / (1.0f + cpu_expf(-g[f])) * u[f];
    }
}

static void cpu_swiglu_bwd(tlm_ops *o, float *dgu, const float *da, const float *gu, int N, int F) {
#pragma omp parallel for num_threads(o->threads) if ((long)N * F >= CPU_PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *g = gu + (size_t)n * 2 * F, *u = g + F, *d = da + (size_t)n * F;
        float *dg = dgu + (size_t)n * 2 * F, *du = dg + F;
#pragma omp simd
        for (int f = 0; f < F; f++) {
            float sig = 1.0f / (1.0f + cpu_expf(-g[f]));
            dg[f] = d[f] * u[f] * sig * (1.0f + g[f] * (1.0f - sig));
            du[f] = d[f] * g[f] * sig;
        }
    }
}

/* ---- softmax + cross-entropy -------------------------------------------- */

static void cpu_xent(tlm_ops *o, float *logits, float *losses, const int32_t *targets, int N, int V, float dscale,
                     int want_grad) {
#pragma omp parallel for num_threads(o->threads) if ((long)N * V >= CPU_PAR_MIN) schedule(static)
    for (int n = 0; n < N; n++) {
        float *x = logits + (size_t)n * V;
        int tgt = targets[n];
        if (tgt < 0 || tgt >= V) { /* ignored (out of range: cannot be scored) */
            losses[n] = 0;
            if (want_grad) memset(x, 0, sizeof(float) * (size_t)V);
            continue;
        }
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
        float xt = x[tgt];
        double sum = 0; /* in double, as in rmsnorm */
        if (want_grad) {
            /* keep the exponentials so they are computed once */
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < V; i++) {
                x[i] = cpu_expf(x[i] - mx);
                sum += x[i];
            }
            float c = (float)(dscale / sum);
#pragma omp simd
            for (int i = 0; i < V; i++) x[i] *= c;
            x[tgt] -= dscale;
        } else {
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < V; i++) sum += cpu_expf(x[i] - mx);
        }
        /* (mx - xt) first: exact for nearby values, where adding log(sum)
         * to a large mx first would round away the loss's low digits */
        losses[n] = (float)((double)(mx - xt) + log(sum));
    }
}

/* The batch loss: the sum in double, in row order, then one division, so
 * it is the same number the host computed from copied-back losses. */
static void cpu_loss_mean(tlm_ops *o, float *out, const float *losses, const int32_t *targets, int N) {
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

/* Elements per partial sum: fixed, so the result does not depend on the
 * thread count (the gradient norm decides clipping, hence every weight). */
#define CPU_SUMSQ_CHUNK 65536

static void cpu_sumsq(tlm_ops *o, float *out, const float *x, size_t n, int accumulate) {
    long nch = (long)((n + CPU_SUMSQ_CHUNK - 1) / CPU_SUMSQ_CHUNK);
    double *part = cpu_scratch_bytes(o, (size_t)(nch > 0 ? nch : 1) * sizeof(double));
#pragma omp parallel for num_threads(o->threads) if (n >= CPU_PAR_MIN) schedule(static)
    for (long c = 0; c < nch; c++) {
        size_t i0 = (size_t)c * CPU_SUMSQ_CHUNK, i1 = i0 + CPU_SUMSQ_CHUNK < n ? i0 + CPU_SUMSQ_CHUNK : n;
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (size_t i = i0; i < i1; i++) s += (double)x[i] * x[i];
        part[c] = s;
    }
    double s = 0;
    for (long c = 0; c < nch; c++) s += part[c];
    out[0] = (float)((accumulate ? out[0] : 0.0) + s);
}

/* Memory bound (7 floats moved per parameter), so the scalar sqrtf that
 * GCC keeps for errno's sake costs little. */
static void cpu_adamw(tlm_ops *o, float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                      float b2, float eps, float wd, int t, const float *gnorm_sq, float clip) {
    float s = 1.0f;
    if (clip > 0 && gnorm_sq) {
        double norm = sqrt((double)*gnorm_sq);
        if (norm > clip) s = (float)(clip / norm);
    }
    /* bias corrections as multipliers: 1/(1-b^t) */
    float bc1 = (float)(1.0 / (1.0 - pow(b1, t))), bc2 = (float)(1.0 / (1.0 - pow(b2, t)));
    long nn = (long)n;
#pragma omp parallel for simd num_threads(o->threads) if (nn >= CPU_PAR_MIN) schedule(static)
    for (long i = 0; i < nn; i++) {
        float gi = g[i] * s;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * bc1 / (sqrtf(vi * bc2) + eps) + wd * p[i]);
    }
}

static void cpu_destroy(tlm_ops *o) {
    if (!o) return;
    cpu_ctx *c = o->ctx;
    if (c) {
        tlm_free(c->scratch);
        tlm_free(c->gemm_ws);
        tlm_free(c->attn_ws);
    }
    free(c);
    free(o);
}

tlm_ops *cpu_ops_create(int threads) {
    tlm_ops *o = calloc(1, sizeof *o);
    cpu_ctx *c = calloc(1, sizeof *c);
    if (!o || !c) {
        free(o);
        free(c);
        tlm_errorf("out of memory creating the cpu backend");
        return NULL;
    }
    o->ctx = c;
    o->name = "cpu";
    o->threads = threads > 0 ? threads : cpu_count_available();
    /* One thread pool: OpenBLAS runs on the calling thread and cpu_matmul
     * splits products over the OpenMP team (see there). */
    omp_set_num_threads(o->threads);
#if defined(TLM_BLAS_OPENBLAS)
    openblas_set_num_threads(1);
#endif
    tlm_cpu_info ci;
    cpu_info_query(&ci);
    snprintf(o->device_desc, sizeof o->device_desc, "CPU: %.50s, %d thread%s, %.40s", ci.model, o->threads,
             o->threads == 1 ? "" : "s", ci.blas);

    cpu_mem_install(o);
    o->matmul = cpu_matmul;
    o->add_inplace = cpu_add_inplace;
    o->embed_fwd = cpu_embed_fwd;
    o->embed_bwd = cpu_embed_bwd;
    o->rmsnorm_fwd = cpu_rmsnorm_fwd;
    o->rmsnorm_bwd = cpu_rmsnorm_bwd;
    o->rope_fwd = cpu_rope_fwd;
    o->rope_bwd = cpu_rope_bwd;
    o->attn_fwd = cpu_attn_fwd;
    o->attn_bwd = cpu_attn_bwd;
    o->kv_store = cpu_kv_store;
    o->attn_cached = cpu_attn_cached;
    o->swiglu_fwd = cpu_swiglu_fwd;
    o->swiglu_bwd = cpu_swiglu_bwd;
    o->xent = cpu_xent;
    o->loss_mean = cpu_loss_mean;
    o->sumsq = cpu_sumsq;
    o->adamw = cpu_adamw;
    o->destroy = cpu_destroy;
    cpu_infer_install(o); /* generation block of ops.h (cpu_infer.c) */
    return o;
}
