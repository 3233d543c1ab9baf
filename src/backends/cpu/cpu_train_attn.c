/*
 * Causal attention for training as small matrix products on the 14 x 32
 * micro-kernel (cpu_train.h), one task per (sequence, head).
 *
 *   forward:  S = q k^T * scale, P = softmax(S) (causal), out = P v,
 *             lse = max + log(sum) per row;
 *   backward: P = exp(S - lse) recomputed, dP = dout v^T,
 *             dS = P (dP - D) * scale with D_i = dout_i . out_i,
 *             dv += P^T dout, dk += dS^T q, dq = dS k.
 *
 * Queries go in blocks of ATT_BQ rows; a block sees keys 0..i1-1 (i1 = its
 * last row + 1), so scores live in a scratch of ATT_BQ x T floats: nothing
 * T x T is stored, and key tiles past a tile's diagonal are skipped (they
 * would be masked anyway). The kernel reads its A operand 14 rows at a
 * time: rows of q, k, dout are read in place; the operand of the score
 * products' B side is transposed once per task to [hd][T]. The forward
 * keeps scores transposed ([key][query]), so the softmax runs down columns
 * (16 queries per vector) and P v reads P with unit stride across the 14
 * rows; the backward keeps them [query][key] for dv and dk, and transposes
 * dS once per block for dq. (Blocks of 56..168 queries measured; 112 best.)
 */
#include "backends/cpu/cpu_train.h"
#include "backends/cpu/cpu_team.h"

#include <math.h>
#include <string.h>

#if CPU_HAVE_KERNELS

#define ATT_BQ 112 /* query rows per block: 8 row tiles of the kernel */
#define ATT_LDT 112 /* row stride of the transposed blocks (>= ATT_BQ, whole vectors) */

typedef struct {
    int T32, ldS;
    float *S, *dP;   /* [ATT_BQ][ldS] scores / dP then dS (backward) */
    float *Pt;       /* [T32][ATT_LDT] transposed block: P (forward), dS (backward) */
    float *Qp, *Op;  /* tail panels [hd][14] of the rows read in place */
    float *Kt, *Vt;  /* [hd][T32]: k and v (backward), q (forward, in Kt) */
    float *Di;       /* [T32] D_i (backward), 1/sum per query (forward) */
} att_ws;

static int att_up(int x, int m) { return (x + m - 1) / m * m; }

/* Carve one thread's workspace; the sizes here define cpu_attn_ws_floats. */
static size_t att_layout(att_ws *w, float *base, int T, int hd) {
    w->T32 = att_up(T, 32);
    /* + 32: kernels reading P or dS as A touch up to 13 columns past the
     * last key, into zeros that are never stored */
    w->ldS = w->T32 + 32;
    size_t off = 0;
#define ATT_TAKE(ptr, n)                                                                                          \
    do {                                                                                                          \
        (ptr) = base ? base + off : NULL;                                                                         \
        off += ((size_t)(n) + 15) / 16 * 16;                                                                      \
    } while (0)
    ATT_TAKE(w->S, (size_t)ATT_BQ * w->ldS);
    ATT_TAKE(w->dP, (size_t)ATT_BQ * w->ldS);
    ATT_TAKE(w->Pt, (size_t)w->T32 * ATT_LDT);
    ATT_TAKE(w->Qp, (size_t)14 * hd); /* tail panels */
    ATT_TAKE(w->Op, (size_t)14 * hd);
    ATT_TAKE(w->Kt, (size_t)hd * w->T32);
    ATT_TAKE(w->Vt, (size_t)hd * w->T32);
    ATT_TAKE(w->Di, (size_t)w->T32);
#undef ATT_TAKE
    return off;
}

size_t cpu_attn_ws_floats(int T, int hd) {
    att_ws w;
    return att_layout(&w, NULL, T, hd);
}

/* Rows of q, k or dout are read in place by the kernel 14 at a time; the
 * last rows (T not a multiple of 14) go through a zero-padded panel
 * [hd][14], since the kernel reads 14 rows. */
typedef struct {
    const float *x;    /* rows [T, hd] */
    ptrdiff_t rs;      /* their stride */
    int t0;            /* T rounded down to a multiple of 14 */
    const float *tail; /* rows t0 .. T - 1, padded */
} att_rows;

static att_rows att_rows_make(const float *x, ptrdiff_t rs, int T, int hd, float *tailbuf) {
    att_rows r = {x, rs, T / 14 * 14, tailbuf};
    if (r.t0 < T) cpu_transpose(x + (ptrdiff_t)r.t0 * rs, rs, T - r.t0, hd, tailbuf, 14, 14);
    return r;
}

/* C rows 0..rows-1 (rows <= 14) = alpha x_{R+r} . b_j for the 32 (or cols)
 * columns of b, transposed [hd][ldb]; R a multiple of 14. */
static inline void att_rows_kernel(const att_rows *a, int R, int rows, int hd, const float *b, ptrdiff_t ldb,
                                   float *C, ptrdiff_t ldc, int cols, float alpha) {
    if (R < a->t0) /* 14 real rows to read, whatever `rows` stores */
        cpu_kern_14x32_rows(hd, a->x + (ptrdiff_t)R * a->rs, a->rs, b, ldb, C, ldc, rows, cols, alpha, 0.0f);
    else
        cpu_kern_14x32(hd, a->tail, 1, 14, b, ldb, C, ldc, rows, cols, alpha, 0.0f);
}

/* S[i - i0][j] = alpha * a_i . b_j for rows i0..i1-1, keys j < i + 1 (at
 * least; whole 32-column panels): a rows of q or dout, b transposed [hd][T32]. */
static void att_scores(const att_ws *w, const att_rows *a, const float *bt, int hd, int i0, int i1, float alpha,
                       float *S) {
    for (int r0 = 0; r0 < i1 - i0; r0 += 14) {
        int rows = i1 - i0 - r0 < 14 ? i1 - i0 - r0 : 14;
        int jend = att_up(i0 + r0 + rows, 32);
        for (int j0 = 0; j0 < jend; j0 += 32)
            att_rows_kernel(a, i0 + r0, rows, hd, bt + j0, w->T32, S + (ptrdiff_t)r0 * w->ldS + j0, w->ldS, 32, alpha);
    }
}

/* C rows i0..i1-1 (stride ldc) = sum over keys j <= i of At[j][i - i0] x[j]
 * with At transposed [key][query] (stride ATT_LDT), x rows at stride rs;
 * then row i is multiplied by rowscale[i - i0] when rowscale is given. */
static void att_reduce_keys(const float *At, const float *x, ptrdiff_t rs, int hd, int i0, int i1, float *C,
                            ptrdiff_t ldc, const float *rowscale) {
    for (int r0 = 0; r0 < i1 - i0; r0 += 14) {
        int rows = i1 - i0 - r0 < 14 ? i1 - i0 - r0 : 14;
        int nk = i0 + r0 + rows; /* keys past the tile's last row have weight 0 */
        for (int d0 = 0; d0 < hd; d0 += 32)
            cpu_kern_14x32(nk, At + r0, 1, ATT_LDT, x + d0, rs, C + (ptrdiff_t)r0 * ldc + d0, ldc, rows,
                           hd - d0 < 32 ? hd - d0 : 32, 1.0f, 0.0f);
        if (rowscale)
            for (int r = r0; r < r0 + rows; r++) {
                float *c = C + (ptrdiff_t)r * ldc, sc = rowscale[r];
                for (int d = 0; d < hd; d++) c[d] *= sc;
            }
    }
}

/* C rows j (keys 0..i1-1, stride ldc) += sum over queries i in i0..i1-1,
 * i >= j, of A[i - i0][j] x[i], A row-major [query][key] (stride ldS). */
static void att_reduce_queries(const att_ws *w, const float *A, const float *x, ptrdiff_t rs, int hd, int i0,
                               int i1, float *C, ptrdiff_t ldc) {
    for (int j0 = 0; j0 < i1; j0 += 14) {
        int rows = i1 - j0 < 14 ? i1 - j0 : 14;
        int s = j0 > i0 ? j0 : i0; /* queries before key j0 give 0 */
        for (int d0 = 0; d0 < hd; d0 += 32)
            cpu_kern_14x32(i1 - s, A + (ptrdiff_t)(s - i0) * w->ldS + j0, 1, w->ldS, x + (ptrdiff_t)s * rs + d0, rs,
                           C + (ptrdiff_t)j0 * ldc + d0, ldc, rows, hd - d0 < 32 ? hd - d0 : 32, 1.0f, 1.0f);
    }
}

static inline __mmask16 att_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* Backward of one row: p[j] = exp(p[j] - l) (p holds the scores), ds[j] =
 * p[j] (ds[j] - di) scale (ds holds dP); both zero from n to n32. */
__attribute__((noinline)) static void att_grad_row(float *p, float *ds, int n, int n32, float l, float di, float scale) {
    const __m512 vl = _mm512_set1_ps(l), vd = _mm512_set1_ps(di), vs = _mm512_set1_ps(scale);
    int j = 0;
    for (; j < n; j += 16) {
        const __mmask16 m = att_mask(n - j);
        __m512 e = _mm512_maskz_mov_ps(m, cpu_exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j), vl)));
        __m512 g = _mm512_mul_ps(_mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(ds + j), vd)), vs);
        _mm512_storeu_ps(p + j, e);
        _mm512_storeu_ps(ds + j, _mm512_maskz_mov_ps(m, g));
    }
    for (; j < n32; j += 16) {
        _mm512_storeu_ps(p + j, _mm512_setzero_ps());
        _mm512_storeu_ps(ds + j, _mm512_setzero_ps());
    }
}

/* Scores transposed, St[j][i - i0] = alpha * k_j . q_i for the queries
 * i0..i1-1 of a block and keys j < i1 (at least those with j <= i), from
 * k rows and q transposed [hd][T32] (Qt). */
static void att_scores_t(const att_ws *w, const att_rows *k, const float *qt, int hd, int i0, int i1, float alpha,
                         float *St) {
    for (int c0 = 0; c0 < i1 - i0; c0 += 32) {
        int cols = i1 - i0 - c0 < 32 ? i1 - i0 - c0 : 32;
        int jend = i0 + c0 + cols; /* keys past the last query of the panel are masked */
        for (int j0 = 0; j0 < jend; j0 += 14)
            att_rows_kernel(k, j0, jend - j0 < 14 ? jend - j0 : 14, hd, qt + i0 + c0, w->T32,
                            St + (ptrdiff_t)j0 * ATT_LDT + c0, ATT_LDT, cols, alpha);
    }
}

/* Causal softmax down the columns of St (one column per query i0 + c, rows
 * = keys j <= i0 + c, for j < i1): St becomes exp(St - max) with zeros at
 * masked entries (they are read as weights), inv[c] = 1 / sum and lse[c]
 * the log-sum-exp. Columns are independent, so 16 queries go per vector. */
__attribute__((noinline)) static void att_softmax_cols(float *St, int i0, int i1, float *inv, float *lse) {
    const int nq = i1 - i0;
    for (int c0 = 0; c0 < nq; c0 += 16) {
        const __mmask16 live = att_mask(nq - c0); /* columns inside the block */
        /* query i0 + c0 + l sees key j when l >= j - (i0 + c0): rows up to
         * jall see all 16 queries, rows jall..jend-1 some, later rows none */
        const int jall = i0 + c0 + 1 < i1 ? i0 + c0 + 1 : i1, jend = i0 + c0 + 16 < i1 ? i0 + c0 + 16 : i1;
        __m512 vmx = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < jall; j++)
            vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(St + (ptrdiff_t)j * ATT_LDT + c0));
        for (int j = jall; j < jend; j++) {
            const __mmask16 m = (__mmask16)(live & ~((1u << (j - i0 - c0)) - 1u));
            vmx = _mm512_mask_max_ps(vmx, m, vmx, _mm512_loadu_ps(St + (ptrdiff_t)j * ATT_LDT + c0));
        }
        /* four partial sums: a column sums up to T terms, and one running
         * sum would round T times in a chain */
        __m512 vs4[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int j = 0; j < jall; j++) {
            float *row = St + (ptrdiff_t)j * ATT_LDT + c0;
            const __m512 e = _mm512_maskz_mov_ps(live, cpu_exp512(_mm512_sub_ps(_mm512_loadu_ps(row), vmx)));
            _mm512_storeu_ps(row, e);
            vs4[j & 3] = _mm512_add_ps(vs4[j & 3], e);
        }
        __m512 vsum = _mm512_add_ps(_mm512_add_ps(vs4[0], vs4[1]), _mm512_add_ps(vs4[2], vs4[3]));
        for (int j = jall; j < jend; j++) {
            float *row = St + (ptrdiff_t)j * ATT_LDT + c0;
            const __mmask16 m = (__mmask16)(live & ~((1u << (j - i0 - c0)) - 1u));
            const __m512 e = _mm512_maskz_mov_ps(m, cpu_exp512(_mm512_sub_ps(_mm512_loadu_ps(row), vmx)));
            _mm512_storeu_ps(row, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        for (int j = jend; j < i1; j++) _mm512_storeu_ps(St + (ptrdiff_t)j * ATT_LDT + c0, _mm512_setzero_ps());
        float mx[16], sum[16];
        _mm512_storeu_ps(mx, vmx);
        _mm512_storeu_ps(sum, vsum);
        for (int l = 0; l < 16 && c0 + l < nq; l++) {
            inv[c0 + l] = 1.0f / sum[l];
            lse[c0 + l] = mx[l] + logf(sum[l]);
        }
    }
}

/* Forward of one head, scores kept transposed ([key][query]) so that the
 * softmax runs down columns and P v reads P with unit stride across the
 * kernel rows: no transpose per block. */
static void att_fwd_head(const att_ws *w, float *out, ptrdiff_t os, float *lse, const float *q, ptrdiff_t rs,
                         int T, int D, int hd) {
    const float *k = q + D, *v = q + 2 * D;
    const float scale = 1.0f / sqrtf((float)hd);
    const att_rows kr = att_rows_make(k, rs, T, hd, w->Qp);
    cpu_transpose(q, rs, T, hd, w->Kt, w->T32, w->T32); /* Qt */
    for (int i0 = 0; i0 < T; i0 += ATT_BQ) {
        int i1 = T - i0 < ATT_BQ ? T : i0 + ATT_BQ;
        att_scores_t(w, &kr, w->Kt, hd, i0, i1, scale, w->Pt);
        att_softmax_cols(w->Pt, i0, i1, w->Di, lse + i0);
        att_reduce_keys(w->Pt, v, rs, hd, i0, i1, out + (ptrdiff_t)i0 * os, os, w->Di);
    }
}

static void att_bwd_head(const att_ws *w, float *dq, const float *go, const float *o, ptrdiff_t os,
                         const float *lse, const float *q, ptrdiff_t rs, int T, int D, int hd) {
    const float *k = q + D, *v = q + 2 * D;
    float *dk = dq + D, *dv = dq + 2 * D;
    const float scale = 1.0f / sqrtf((float)hd);
    const att_rows qr = att_rows_make(q, rs, T, hd, w->Qp), gr = att_rows_make(go, os, T, hd, w->Op);
    cpu_transpose(k, rs, T, hd, w->Kt, w->T32, w->T32);
    cpu_transpose(v, rs, T, hd, w->Vt, w->T32, w->T32);
    for (int i = 0; i < T; i++) {
        const float *grow = go + (ptrdiff_t)i * os, *orow = o + (ptrdiff_t)i * os;
        float di = 0;
#pragma omp simd reduction(+ : di)
        for (int d = 0; d < hd; d++) di += grow[d] * orow[d];
        w->Di[i] = di;
        memset(dk + (ptrdiff_t)i * rs, 0, sizeof(float) * (size_t)hd);
        memset(dv + (ptrdiff_t)i * rs, 0, sizeof(float) * (size_t)hd);
    }
    for (int i0 = 0; i0 < T; i0 += ATT_BQ) {
        int i1 = T - i0 < ATT_BQ ? T : i0 + ATT_BQ;
        att_scores(w, &qr, w->Kt, hd, i0, i1, scale, w->S);
        att_scores(w, &gr, w->Vt, hd, i0, i1, 1.0f, w->dP);
        for (int i = i0; i < i1; i++)
            att_grad_row(w->S + (ptrdiff_t)(i - i0) * w->ldS, w->dP + (ptrdiff_t)(i - i0) * w->ldS, i + 1,
                         att_up(i1, 32), lse[i], w->Di[i], scale);
        att_reduce_queries(w, w->S, go, os, hd, i0, i1, dv, rs);
        att_reduce_queries(w, w->dP, q, rs, hd, i0, i1, dk, rs);
        cpu_transpose(w->dP, w->ldS, i1 - i0, i1, w->Pt, ATT_LDT, i1 - i0);
        att_reduce_keys(w->Pt, k, rs, hd, i0, i1, dq + (ptrdiff_t)i0 * rs, rs, NULL);
    }
}

/* One (sequence, head) per chunk of the thread team; each worker uses its
 * own workspace slot (cpu_team_worker() < nt). */
typedef struct {
    float *ws, *out, *lse, *dqkv;
    const float *qkv, *dout, *fout, *flse;
    int T, H, hd;
} att_job;

static void att_fwd_task(void *arg, int task) {
    const att_job *j = arg;
    const int H = j->H, hd = j->hd, T = j->T, D = H * hd, b = task / H, h = task % H;
    att_ws w;
    att_layout(&w, j->ws + (size_t)cpu_team_worker() * cpu_attn_ws_floats(T, hd), T, hd);
    att_fwd_head(&w, j->out + (size_t)b * T * D + (size_t)h * hd, D, j->lse + ((size_t)b * H + h) * T,
                 j->qkv + (size_t)b * T * 3 * D + (size_t)h * hd, (ptrdiff_t)3 * D, T, D, hd);
}

static void att_bwd_task(void *arg, int task) {
    const att_job *j = arg;
    const int H = j->H, hd = j->hd, T = j->T, D = H * hd, b = task / H, h = task % H;
    att_ws w;
    att_layout(&w, j->ws + (size_t)cpu_team_worker() * cpu_attn_ws_floats(T, hd), T, hd);
    size_t r1 = (size_t)b * T * D + (size_t)h * hd, r3 = (size_t)b * T * 3 * D + (size_t)h * hd;
    att_bwd_head(&w, j->dqkv + r3, j->dout + r1, j->fout + r1, D, j->flse + ((size_t)b * H + h) * T, j->qkv + r3,
                 (ptrdiff_t)3 * D, T, D, hd);
}

void cpu_attn_fwd_blocked(float *ws, int nt, float *out, float *lse, const float *qkv, int B, int T, int H,
                          int hd) {
    att_job j = {.ws = ws, .out = out, .lse = lse, .qkv = qkv, .T = T, .H = H, .hd = hd};
    cpu_team_run(nt, B * H, att_fwd_task, &j);
}

void cpu_attn_bwd_blocked(float *ws, int nt, float *dqkv, const float *dout, const float *out, const float *lse,
                          const float *qkv, int B, int T, int H, int hd) {
    att_job j = {.ws = ws, .dqkv = dqkv, .dout = dout, .fout = out, .flse = lse, .qkv = qkv, .T = T, .H = H,
                 .hd = hd};
    cpu_team_run(nt, B * H, att_bwd_task, &j);
}

#else

size_t cpu_attn_ws_floats(int T, int hd) {
    (void)T, (void)hd;
    return 0;
}
void cpu_attn_fwd_blocked(float *ws, int nt, float *out, float *lse, const float *qkv, int B, int T, int H,
                          int hd) {
    (void)ws, (void)nt, (void)out, (void)lse, (void)qkv, (void)B, (void)T, (void)H, (void)hd;
}
void cpu_attn_bwd_blocked(float *ws, int nt, float *dqkv, const float *dout, const float *out, const float *lse,
                          const float *qkv, int B, int T, int H, int hd) {
    (void)ws, (void)nt, (void)dqkv, (void)dout, (void)out, (void)lse, (void)qkv, (void)B, (void)T, (void)H, (void)hd;
}

#endif
