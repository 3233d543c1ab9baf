/*
 * The fast CPU backend: matrix products on our AVX-512 micro-kernel
 * (cpu_train_gemm.c; CBLAS where the build has no AVX-512, and for
 * products of a few rows), everything else as loops over rows (or heads)
 * shared out by the backend's claim-based thread team (cpu_team.h), whose
 * inner loops the compiler turns into SIMD (`omp simd`, -O3 -march=native).
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
#include "backends/cpu/cpu_team.h"
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
/* Part t of nt of a BLAS product: whole 16-row (or column) blocks of the
 * dimension being cut. */
typedef struct {
    CBLAS_TRANSPOSE ta, tb;
    int split_m, len, nt, M, N, K;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int lda, ldb, ldc;
} blas_job;

static void blas_part(void *arg, int t) {
    const blas_job *j = arg;
    int chunks = (j->len + 15) / 16;
    int c0 = (int)((long)chunks * t / j->nt), c1 = (int)((long)chunks * (t + 1) / j->nt);
    int i0 = c0 * 16, i1 = c1 * 16 < j->len ? c1 * 16 : j->len;
    if (i1 <= i0) return;
    if (j->split_m) {
        const float *a = j->ta == CblasTrans ? j->A + i0 : j->A + (size_t)i0 * j->lda;
        cblas_sgemm(CblasRowMajor, j->ta, j->tb, i1 - i0, j->N, j->K, j->alpha, a, j->lda, j->B, j->ldb, j->beta,
                    j->C + (size_t)i0 * j->ldc, j->ldc);
    } else {
        const float *b = j->tb == CblasTrans ? j->B + (size_t)i0 * j->ldb : j->B + i0;
        cblas_sgemm(CblasRowMajor, j->ta, j->tb, j->M, i1 - i0, j->K, j->alpha, j->A, j->lda, b, j->ldb, j->beta,
                    j->C + i0, j->ldc);
    }
}

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
    blas_job j = {.ta = ta, .tb = tb, .split_m = split_m, .len = len, .nt = nt, .M = M, .N = N, .K = K,
                  .alpha = alpha, .beta = beta, .A = A, .B = B, .C = C, .lda = lda, .ldb = ldb, .ldc = ldc};
    cpu_team_run(nt, nt, blas_part, &j);
}

typedef struct {
    float *y;
    const float *x;
} add_job;

static void add_part(void *arg, long i0, long i1) {
    const add_job *j = arg;
#pragma omp simd
    for (long i = i0; i < i1; i++) j->y[i] += j->x[i];
}

static void cpu_add_inplace(tlm_ops *o, float *y, const float *x, size_t n) {
    add_job j = {y, x};
    cpu_team_range(o->threads, (long)n, CPU_PAR_MIN, 1, add_part, &j);
}

/* ---- embedding ---------------------------------------------------------- */

typedef struct {
    float *out;
    const float *w, *g;
    const int32_t *tok;
    int N, D;
} embed_job;

static void embed_fwd_part(void *arg, long n0, long n1) {
    const embed_job *j = arg;
    for (long n = n0; n < n1; n++)
        memcpy(j->out + (size_t)n * j->D, j->w + (size_t)j->tok[n] * j->D, sizeof(float) * (size_t)j->D);
}

static void cpu_embed_fwd(tlm_ops *o, float *out, const int32_t *tok, const float *wte, int N, int D) {
    embed_job j = {.out = out, .w = wte, .tok = tok, .N = N, .D = D};
    cpu_team_range(o->threads, N, CPU_PAR_MIN, D, embed_fwd_part, &j);
}

/* Repeated tokens add into the same row, so threads split the columns, not
 * the tokens: each owns 16-column stripes (a cache line) of every row. */
static void embed_bwd_part(void *arg, long s0, long s1) {
    const embed_job *j = arg;
    for (long s = s0; s < s1; s++) {
        int d0 = (int)s * 16, d1 = d0 + 16 < j->D ? d0 + 16 : j->D;
        for (int n = 0; n < j->N; n++) {
            float *w = j->out + (size_t)j->tok[n] * j->D;
            const float *g = j->g + (size_t)n * j->D;
#pragma omp simd
            for (int d = d0; d < d1; d++) w[d] += g[d];
        }
    }
}

static void cpu_embed_bwd(tlm_ops *o, float *dwte, const int32_t *tok, const float *dout, int N, int D) {
    embed_job j = {.out = dwte, .g = dout, .tok = tok, .N = N, .D = D};
    cpu_team_range(o->threads, (D + 15) / 16, CPU_PAR_MIN, (long)N * 16, embed_bwd_part, &j);
}

/* ---- RMSNorm ------------------------------------------------------------ */

/* Row sums are accumulated in double (as the reference backend does): the
 * pass is memory bound, so it costs nothing, and it keeps the rounding of
 * these sums out of the comparison of whole training steps against the
 * float64 PyTorch reference (test_model), which is sensitive to it. */
typedef struct {
    float *out, *rstd, *dw;
    double *part;
    const float *x, *w, *g, *rs;
    int N, D, nchunks;
    float eps;
} rms_job;

static void rms_fwd_part(void *arg, long n0, long n1) {
    const rms_job *j = arg;
    const int D = j->D;
    for (long n = n0; n < n1; n++) {
        const float *xr = j->x + (size_t)n * D;
        float *yr = j->out + (size_t)n * D;
        double ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int d = 0; d < D; d++) ss += (double)xr[d] * xr[d];
        float r = (float)(1.0 / sqrt(ss / D + (double)j->eps));
#pragma omp simd
        for (int d = 0; d < D; d++) yr[d] = xr[d] * r * j->w[d];
        if (j->rstd) j->rstd[n] = r;
    }
}

static void cpu_rmsnorm_fwd(tlm_ops *o, void *out, float *rstd, const float *x, const float *w, int N, int D,
                            float eps) {
    rms_job j = {.out = out, .rstd = rstd, .x = x, .w = w, .N = N, .D = D, .eps = eps};
    cpu_team_range(o->threads, N, CPU_PAR_MIN, D, rms_fwd_part, &j);
}

/* Rows per partial sum of dw in rmsnorm_bwd: fixed, so that the result does
 * not depend on the thread count (exact resume on another machine). */
#define CPU_RMS_CHUNK 64

/* dx_j = r w_j g_j - x_j r^3 / D * sum_i g_i w_i x_i (see cpu_ref.c). dw sums
 * over all rows: each chunk of CPU_RMS_CHUNK rows sums into its own partial
 * (double), and the partials are added in chunk order, so the result is
 * deterministic and independent of the thread count. */
/* Chunk ch: rows [ch*CPU_RMS_CHUNK, ...) into dx and the partial part[ch]. */
static void rms_bwd_chunk(void *arg, int ch) {
    const rms_job *j = arg;
    const int D = j->D, N = j->N;
    double *pd = j->part + (size_t)ch * D;
    memset(pd, 0, sizeof(double) * (size_t)D);
    int n1 = (ch + 1) * CPU_RMS_CHUNK < N ? (ch + 1) * CPU_RMS_CHUNK : N;
    for (int n = ch * CPU_RMS_CHUNK; n < n1; n++) {
        const float *xr = j->x + (size_t)n * D, *g = j->g + (size_t)n * D, *w = j->w;
        float *dxr = j->out + (size_t)n * D;
        float r = j->rs[n];
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

/* Columns [d0, d1) of dw: the partials summed in chunk order. */
static void rms_bwd_reduce(void *arg, long d0, long d1) {
    const rms_job *j = arg;
    for (long d = d0; d < d1; d++) {
        double sm = 0;
        for (int ch = 0; ch < j->nchunks; ch++) sm += j->part[(size_t)ch * j->D + d];
        j->dw[d] += (float)sm;
    }
}

static void cpu_rmsnorm_bwd(tlm_ops *o, float *dx, float *dw, const void *dout, const float *x, const float *w,
                            const float *rstd, int N, int D) {
    int nt = (long)N * D >= CPU_PAR_MIN ? o->threads : 1;
    int nchunks = (N + CPU_RMS_CHUNK - 1) / CPU_RMS_CHUNK;
    rms_job j = {.out = dx, .dw = dw, .g = dout, .x = x, .w = w, .rs = rstd, .N = N, .D = D, .nchunks = nchunks,
                 .part = cpu_scratch_bytes(o, (size_t)nchunks * (size_t)D * sizeof(double))};
    cpu_team_run(nt, nchunks, rms_bwd_chunk, &j);
    /* every partial is complete; reduce by columns */
    cpu_team_range(nt, D, 0, 1, rms_bwd_reduce, &j);
}

/* ---- RoPE --------------------------------------------------------------- */

/* Angles are formed in double: pos * freq in float loses ~pos * 6e-8 rad,
 * which at positions of a few thousand is visible in the outputs. One set
 * of cos/sin per position serves all sequences and heads. */
typedef struct {
    float *qkv;
    int B, T, H, hd, pos0;
    float theta, dir;
} rope_job;

static void rope_part(void *arg, long t0, long t1) {
    const rope_job *j = arg;
    const int H = j->H, hd = j->hd, D = H * hd, half = hd / 2;
    for (long t = t0; t < t1; t++) {
        float cs[half], sn[half];
        for (int i = 0; i < half; i++) {
            double ang = (double)(j->pos0 + t) * pow((double)j->theta, -2.0 * i / hd);
            cs[i] = (float)cos(ang);
            sn[i] = j->dir * (float)sin(ang);
        }
        for (int b = 0; b < j->B; b++) {
            float *row = j->qkv + ((size_t)b * j->T + t) * 3 * D;
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

static void cpu_rope(tlm_ops *o, float *qkv, int B, int T, int H, int hd, int pos0, float theta, float dir) {
    if (hd / 2 <= 0) return;
    rope_job j = {.qkv = qkv, .B = B, .T = T, .H = H, .hd = hd, .pos0 = pos0, .theta = theta, .dir = dir};
    cpu_team_range(o->threads, T, CPU_PAR_MIN, (long)B * H * hd, rope_part, &j);
}

static void cpu_rope_fwd(tlm_ops *o, void *qkv, int B, int T, int H, int hd, int pos0, float theta) {
    cpu_rope(o, qkv, B, T, H, hd, pos0, theta, 1.0f);
}

static void cpu_rope_bwd(tlm_ops *o, void *dqkv, int B, int T, int H, int hd, int pos0, float theta) {
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
        s[j] = tlm_expf(s[j] - mx);
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

static void cpu_attn_fwd(tlm_ops *o, void *out, float *lse, const void *qkv, int B, int T, int H, int hd) {
    int nt = (long)B * T * T * H * hd >= CPU_PAR_MIN ? o->threads : 1;
    cpu_attn_fwd_blocked(cpu_attn_ws(o, T, hd), nt, out, lse, qkv, B, T, H, hd);
}

static void cpu_attn_bwd(tlm_ops *o, void *dqkv, const void *dout, const void *out, const float *lse,
                         const void *qkv, int B, int T, int H, int hd) {
    int nt = (long)B * T * T * H * hd >= CPU_PAR_MIN ? o->threads : 1;
    cpu_attn_bwd_blocked(cpu_attn_ws(o, T, hd), nt, dqkv, dout, out, lse, qkv, B, T, H, hd);
}

#else

/* Rows are independent; tasks are (b, h), claimed by the team. */
typedef struct {
    float *out, *lse, *scr;
    const float *qkv;
    size_t stride;
    int T, H, hd;
} attn_rows_job;

/* Task (b, h): every query row of head h of sequence b. */
static void attn_fwd_task(void *arg, int task) {
    const attn_rows_job *j = arg;
    const int T = j->T, H = j->H, hd = j->hd, D = H * hd, b = task / H, h = task % H;
    const float scale = 1.0f / sqrtf((float)hd);
    float *s = j->scr + (size_t)cpu_team_worker() * j->stride;
    const float *base = j->qkv + (size_t)b * T * 3 * D + (size_t)h * hd;
    for (int t = 0; t < T; t++)
        j->lse[((size_t)b * H + h) * T + t] =
            cpu_attn_row(j->out + ((size_t)b * T + t) * D + (size_t)h * hd, base + (size_t)t * 3 * D, base + D,
                         base + 2 * D, (size_t)3 * D, t + 1, hd, scale, s);
}

static void cpu_attn_fwd(tlm_ops *o, void *out, float *lse, const void *qkv, int B, int T, int H, int hd) {
    int D = H * hd;
    attn_rows_job j = {.out = out, .lse = lse, .qkv = qkv, .T = T, .H = H, .hd = hd};
    j.scr = cpu_scratch(o, (size_t)T, &j.stride);
    int nt = (long)B * T * T * D >= CPU_PAR_MIN ? o->threads : 1;
    cpu_team_run(nt, B * H, attn_fwd_task, &j);
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
typedef struct {
    float *dqkv;
    const float *dout, *out, *lse, *qkv;
    int T, H, hd;
} attn_bwd_job;

static void attn_bwd_task(void *arg, int task) {
    const attn_bwd_job *j = arg;
    const int T = j->T, H = j->H, hd = j->hd, D = H * hd, b = task / H, h = task % H;
    size_t r3 = (size_t)b * T * 3 * D + (size_t)h * hd, r1 = (size_t)b * T * D + (size_t)h * hd;
    float *dq = j->dqkv + r3;
    const float *go = j->dout + r1, *ot = j->out + r1, *l = j->lse + ((size_t)b * H + h) * T, *q = j->qkv + r3;
    size_t rs = (size_t)3 * D, os = (size_t)D;
    switch (hd) {
    case 32: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, 32); break;
    case 64: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, 64); break;
    case 128: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, 128); break;
    default: cpu_attn_bwd_head(dq, go, ot, l, q, rs, os, T, D, hd); break;
    }
}

static void cpu_attn_bwd(tlm_ops *o, void *dqkv, const void *dout, const void *out, const float *lse,
                         const void *qkv, int B, int T, int H, int hd) {
    int D = H * hd;
    int nt = (long)B * T * T * D >= CPU_PAR_MIN ? o->threads : 1;
    attn_bwd_job j = {.dqkv = dqkv, .dout = dout, .out = out, .lse = lse, .qkv = qkv, .T = T, .H = H, .hd = hd};
    cpu_team_run(nt, B * H, attn_bwd_task, &j);
}
#endif

/* ---- KV cache ----------------------------------------------------------- */

static void cpu_kv_store(tlm_ops *o, float *kc, float *vc, const void *qkv, int B, int T, int Tmax, int D,
                         int pos0) {
    (void)o;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *src = (const float *)qkv + ((size_t)b * T + t) * 3 * D; /* act_dtype F32 */
            size_t dst = ((size_t)b * Tmax + pos0 + t) * D;
            memcpy(kc + dst, src + D, sizeof(float) * (size_t)D);
            memcpy(vc + dst, src + 2 * D, sizeof(float) * (size_t)D);
        }
}

/* Like the forward, over keys in the cache (row stride D); tasks are
 * (b, h), every query row of the chunk. */
typedef struct {
    float *out, *scr;
    const float *qkv, *kc, *vc;
    size_t stride;
    int T, Tmax, H, hd, pos0;
} attn_cached_job;

static void attn_cached_task(void *arg, int task) {
    const attn_cached_job *j = arg;
    const int T = j->T, H = j->H, hd = j->hd, D = H * hd, b = task / H, h = task % H;
    const float scale = 1.0f / sqrtf((float)hd);
    float *s = j->scr + (size_t)cpu_team_worker() * j->stride;
    size_t cache = (size_t)b * j->Tmax * D + (size_t)h * hd;
    for (int t = 0; t < T; t++)
        cpu_attn_row(j->out + ((size_t)b * T + t) * D + (size_t)h * hd,
                     j->qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd, j->kc + cache, j->vc + cache, (size_t)D,
                     j->pos0 + t + 1, hd, scale, s);
}

static void cpu_attn_cached(tlm_ops *o, void *out, const void *qkv, const float *kc, const float *vc, int B,
                            int T, int Tmax, int H, int hd, int pos0) {
    int D = H * hd;
    attn_cached_job j = {.out = out, .qkv = qkv, .kc = kc, .vc = vc, .T = T, .Tmax = Tmax, .H = H, .hd = hd,
                         .pos0 = pos0};
    j.scr = cpu_scratch(o, (size_t)(pos0 + T), &j.stride);
    int nt = (long)B * T * (pos0 + T) * D >= CPU_PAR_MIN ? o->threads : 1;
    cpu_team_run(nt, B * H, attn_cached_task, &j);
}

/* ---- SwiGLU ------------------------------------------------------------- */

typedef struct {
    float *a, *dgu;
    const float *gu, *da;
    int F;
} swiglu_job;

static void swiglu_fwd_part(void *arg, long n0, long n1) {
    const swiglu_job *j = arg;
    const int F = j->F;
    for (long n = n0; n < n1; n++) {
        const float *g = j->gu + (size_t)n * 2 * F, *u = g + F;
        float *ar = j->a + (size_t)n * F;
#pragma omp simd
        for (int f = 0; f < F; f++) ar[f] = g[f] / (1.0f + tlm_expf(-g[f])) * u[f];
    }
}

static void cpu_swiglu_fwd(tlm_ops *o, void *a, const void *gu, int N, int F) {
    swiglu_job j = {.a = a, .gu = gu, .F = F};
    cpu_team_range(o->threads, N, CPU_PAR_MIN, F, swiglu_fwd_part, &j);
}

static void swiglu_bwd_part(void *arg, long n0, long n1) {
    const swiglu_job *j = arg;
    const int F = j->F;
    for (long n = n0; n < n1; n++) {
        const float *g = j->gu + (size_t)n * 2 * F, *u = g + F, *d = j->da + (size_t)n * F;
        float *dg = j->dgu + (size_t)n * 2 * F, *du = dg + F;
#pragma omp simd
        for (int f = 0; f < F; f++) {
            float sig = 1.0f / (1.0f + tlm_expf(-g[f]));
            dg[f] = d[f] * u[f] * sig * (1.0f + g[f] * (1.0f - sig));
            du[f] = d[f] * g[f] * sig;
        }
    }
}

static void cpu_swiglu_bwd(tlm_ops *o, void *dgu, const void *da, const void *gu, int N, int F) {
    swiglu_job j = {.dgu = dgu, .da = da, .gu = gu, .F = F};
    cpu_team_range(o->threads, N, CPU_PAR_MIN, F, swiglu_bwd_part, &j);
}

/* ---- softmax + cross-entropy -------------------------------------------- */

typedef struct {
    float *logits, *losses;
    const int32_t *targets;
    int V, want_grad;
    float dscale;
} xent_job;

static void xent_part(void *arg, long n0, long n1) {
    const xent_job *j = arg;
    const int V = j->V, want_grad = j->want_grad;
    const float dscale = j->dscale;
    float *losses = j->losses;
    for (long n = n0; n < n1; n++) {
        float *x = j->logits + (size_t)n * V;
        int tgt = j->targets[n];
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
                x[i] = tlm_expf(x[i] - mx);
                sum += x[i];
            }
            float c = (float)(dscale / sum);
#pragma omp simd
            for (int i = 0; i < V; i++) x[i] *= c;
            x[tgt] -= dscale;
        } else {
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < V; i++) sum += tlm_expf(x[i] - mx);
        }
        /* (mx - xt) first: exact for nearby values, where adding log(sum)
         * to a large mx first would round away the loss's low digits */
        losses[n] = (float)((double)(mx - xt) + log(sum));
    }
}

static void cpu_xent(tlm_ops *o, void *logits, float *losses, const int32_t *targets, int N, int V, float dscale,
                     int want_grad) {
    xent_job j = {.logits = logits, .losses = losses, .targets = targets, .V = V, .want_grad = want_grad,
                  .dscale = dscale};
    cpu_team_range(o->threads, N, CPU_PAR_MIN, V, xent_part, &j);
}

/* ---- optimizer ---------------------------------------------------------- */

/* Elements per partial sum: fixed, so the result does not depend on the
 * thread count (the gradient norm decides clipping, hence every weight). */
#define CPU_SUMSQ_CHUNK 65536

typedef struct {
    const float *x;
    size_t n;
    double *part;
} sumsq_job;

/* Fixed chunks c0..c1 of CPU_SUMSQ_CHUNK elements, each into part[c]. */
static void sumsq_part(void *arg, long c0, long c1) {
    const sumsq_job *j = arg;
    for (long c = c0; c < c1; c++) {
        size_t i0 = (size_t)c * CPU_SUMSQ_CHUNK, i1 = i0 + CPU_SUMSQ_CHUNK < j->n ? i0 + CPU_SUMSQ_CHUNK : j->n;
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (size_t i = i0; i < i1; i++) s += (double)j->x[i] * j->x[i];
        j->part[c] = s;
    }
}

static void cpu_sumsq(tlm_ops *o, float *out, const float *x, size_t n, int accumulate) {
    long nch = (long)((n + CPU_SUMSQ_CHUNK - 1) / CPU_SUMSQ_CHUNK);
    double *part = cpu_scratch_bytes(o, (size_t)(nch > 0 ? nch : 1) * sizeof(double));
    sumsq_job j = {.x = x, .n = n, .part = part};
    cpu_team_range(o->threads, nch, CPU_PAR_MIN, CPU_SUMSQ_CHUNK, sumsq_part, &j);
    double s = 0;
    for (long c = 0; c < nch; c++) s += part[c];
    out[0] = (float)((accumulate ? out[0] : 0.0) + s);
}

/* Memory bound (7 floats moved per parameter), so the scalar sqrtf that
 * GCC keeps for errno's sake costs little. */
typedef struct {
    float *p, *m, *v;
    const float *g;
    float s, lr, b1, b2, eps, wd, bc1, bc2;
} adamw_job;

static void adamw_part(void *arg, long i0, long i1) {
    const adamw_job *j = arg;
    float *p = j->p, *m = j->m, *v = j->v;
    const float *g = j->g;
    const float s = j->s, lr = j->lr, b1 = j->b1, b2 = j->b2, eps = j->eps, wd = j->wd, bc1 = j->bc1, bc2 = j->bc2;
#pragma omp simd
    for (long i = i0; i < i1; i++) {
        float gi = g[i] * s;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * bc1 / (sqrtf(vi * bc2) + eps) + wd * p[i]);
    }
}

static void cpu_adamw(tlm_ops *o, float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                      float b2, float eps, float wd, int t, const float *gnorm_sq, float clip) {
    float s = 1.0f;
    if (clip > 0 && gnorm_sq) {
        double norm = sqrt((double)*gnorm_sq);
        if (norm > clip) s = (float)(clip / norm);
    }
    /* bias corrections as multipliers: 1/(1-b^t) */
    float bc1 = (float)(1.0 / (1.0 - pow(b1, t))), bc2 = (float)(1.0 / (1.0 - pow(b2, t)));
    adamw_job j = {.p = p, .m = m, .v = v, .g = g, .s = s, .lr = lr, .b1 = b1, .b2 = b2, .eps = eps, .wd = wd,
                   .bc1 = bc1, .bc2 = bc2};
    cpu_team_range(o->threads, (long)n, CPU_PAR_MIN, 1, adamw_part, &j);
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
    /* One thread pool for the ops: OpenBLAS runs on the calling thread and
     * every parallel op goes through the thread team (cpu_team.h). OpenMP
     * is left to work outside the ops (the tokenizer), at the same count. */
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
    o->matmul_ex = ops_matmul_ex_f32;
    o->act_dtype = TLM_ACT_F32;
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
    o->loss_mean = cpu_loss_mean; /* cpu_ref.c: a serial sum either way */
    o->sumsq = cpu_sumsq;
    o->adamw = cpu_adamw;
    o->destroy = cpu_destroy;
    cpu_infer_install(o); /* generation block of ops.h (cpu_infer.c) */
    return o;
}
