/*
 * fp32 matrix product on the AVX-512 micro-kernels of cpu_train.h, in the
 * classic blocked layout: for each block of K (kc deep) and of N (nc wide),
 * op(B) is packed into 32-column panels [kc][32] that stay in L2; each
 * group of 14 rows of op(A) (kc deep, so it stays in L1) is then swept
 * against all the B panels. A is read in place (both of its layouts have a
 * kernel addressing), so only B is packed, with 16 x 16 register transposes
 * (cpu_transpose) when it is [N,K]. (Measured and dropped: packing A too,
 * software prefetch of the next panels, and reading B unpacked; the
 * hardware prefetchers already stream the operands.)
 *
 * Threads split the larger of M and N (never K), so each element of C is
 * summed by one thread in one fixed order whatever the thread count.
 */
#include "backends/cpu/cpu_train.h"

#include "backends/cpu/cpu_team.h"
#include <string.h>

#if CPU_HAVE_KERNELS

#define GEMM_MR 14
#define GEMM_NR 32
/* Depth of one pass over K. Besides blocking for L1/L2, it bounds the
 * length of each fp32 summation chain (C adds the partial sum of each
 * pass): 256 made the model's gradients measurably closer to the float64
 * reference than 384 (the tied head's dX sums over the vocabulary), at the
 * same speed. */
#define GEMM_KC_MAX 256
/* Floats of packed B per thread: 512 KB, half the L2 of current cores. */
#define GEMM_BP_FLOATS (128 * 1024)

/* An A panel (+16 floats of slack for the masked stores). */
#define GEMM_AP_FLOATS ((size_t)GEMM_MR * (GEMM_KC_MAX + 16) + 16)

size_t cpu_gemm_ws_floats(int nt) { return (size_t)(nt > 0 ? nt : 1) * (GEMM_BP_FLOATS + GEMM_AP_FLOATS); }

/* dst[c*ldd + r] = src[r*lds + c] for r < nrows, c < ncols; entries
 * nrows <= r < width of each destination row are zeroed (panel padding).
 * nrows <= width. 16 x 16 tiles: 16 loads, 64 shuffles, 16 stores. */
void cpu_transpose(const float *src, ptrdiff_t lds, int nrows, int ncols, float *dst, ptrdiff_t ldd, int width) {
    for (int r0 = 0; r0 < width; r0 += 16) {
        int nr = nrows - r0;
        nr = nr < 0 ? 0 : nr > 16 ? 16 : nr;
        int w = width - r0 > 16 ? 16 : width - r0;
        const __mmask16 smask = (__mmask16)((1u << w) - 1u);
        for (int c0 = 0; c0 < ncols; c0 += 16) {
            int nc = ncols - c0 > 16 ? 16 : ncols - c0;
            const __mmask16 lmask = (__mmask16)((1u << nc) - 1u);
            __m512 r[16], t[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < nr ? _mm512_maskz_loadu_ps(lmask, src + (ptrdiff_t)(r0 + i) * lds + c0) : _mm512_setzero_ps();
            for (int i = 0; i < 8; i++) {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            /* r[4i + c], 128-bit lane L: rows 4i..4i+3 of column 4L + c */
            for (int i = 0; i < 4; i++) {
                r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
                r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
                r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
                r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
            }
            for (int c = 0; c < 4; c++) {
                __m512 a = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), b = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
                __m512 e = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88),
                       f = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
                t[c] = _mm512_shuffle_f32x4(a, e, 0x88);
                t[8 + c] = _mm512_shuffle_f32x4(a, e, 0xDD);
                t[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
                t[12 + c] = _mm512_shuffle_f32x4(b, f, 0xDD);
            }
            for (int c = 0; c < nc; c++) _mm512_mask_storeu_ps(dst + (ptrdiff_t)(c0 + c) * ldd + r0, smask, t[c]);
        }
    }
}

/* Rows ic..ic+rows of op(A), columns pc..pc+kc, into ap[k*14 + r] (rows
 * padded with zeros to 14): the last row panel, when M is not a multiple
 * of 14. */
static void gemm_pack_a(int transA, const float *A, int lda, int ic, int rows, int pc, int kc, float *ap) {
    if (transA) { /* op(A)[r][k] = A[k][r]: 14 contiguous floats per k */
        const __mmask16 m = (__mmask16)((1u << rows) - 1u);
        for (int k = 0; k < kc; k++)
            _mm512_mask_storeu_ps(ap + (ptrdiff_t)k * GEMM_MR, 0x3FFF,
                                  _mm512_maskz_loadu_ps(m, A + (ptrdiff_t)(pc + k) * lda + ic));
    } else {
        cpu_transpose(A + (ptrdiff_t)ic * lda + pc, lda, rows, kc, ap, GEMM_MR, GEMM_MR);
    }
}

/* Panel q (columns jc+32q .. jc+32q+31, within jc..jc+nc) of op(B), rows
 * pc..pc+kc, into bp[q][k][32], padded with zeros past column jc+nc. */
static void gemm_pack_b(int transB, const float *B, int ldb, int jc, int nc, int pc, int kc, int q, float *bp) {
    int j0 = jc + q * GEMM_NR, w = nc - q * GEMM_NR > GEMM_NR ? GEMM_NR : nc - q * GEMM_NR;
    float *dst = bp + (ptrdiff_t)q * kc * GEMM_NR;
    if (transB) { /* op(B)[k][j] = B[j][k] */
        cpu_transpose(B + (ptrdiff_t)j0 * ldb + pc, ldb, w, kc, dst, GEMM_NR, GEMM_NR);
    } else {
        const __mmask16 m0 = w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << w) - 1u);
        const __mmask16 m1 = w >= 32 ? (__mmask16)0xFFFF : w > 16 ? (__mmask16)((1u << (w - 16)) - 1u) : 0;
        for (int k = 0; k < kc; k++) {
            const float *s = B + (ptrdiff_t)(pc + k) * ldb + j0;
            _mm512_store_ps(dst + (ptrdiff_t)k * GEMM_NR, _mm512_maskz_loadu_ps(m0, s));
            _mm512_store_ps(dst + (ptrdiff_t)k * GEMM_NR + 16, _mm512_maskz_loadu_ps(m1, s + 16));
        }
    }
}

/* One thread's product: its whole block of C. */
static void gemm_serial(float *bp, float *ap, int transA, int transB, int M, int N, int K, float alpha,
                        const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    int nkc = (K + GEMM_KC_MAX - 1) / GEMM_KC_MAX;
    int kc = (K + nkc - 1) / nkc;
    kc = (kc + 15) / 16 * 16 < GEMM_KC_MAX ? (kc + 15) / 16 * 16 : GEMM_KC_MAX;
    int ncmax = GEMM_BP_FLOATS / kc / GEMM_NR * GEMM_NR;
    /* equal nc blocks, so that no block is a thin remainder */
    int nnc = (N + ncmax - 1) / ncmax;
    int nc = ((N + nnc - 1) / nnc + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    /* A row stride that is a multiple of 4 KB maps the 14 rows of an
     * in-place A panel (or, for op(A) = A^T, its kc rows) to one L1 set,
     * which then evicts them on every pass over the B panels: such an A is
     * copied like the short last panel (2048 x 2048 x 2048 on 2 Zen 5
     * cores: 215 -> 341 GFLOP/s). */
    const int a_alias = lda % 1024 == 0;
    for (int jc = 0; jc < N; jc += nc) {
        const int ncur = N - jc < nc ? N - jc : nc;
        const int npan = (ncur + GEMM_NR - 1) / GEMM_NR;
        for (int pc = 0; pc < K; pc += kc) {
            const int kcur = K - pc < kc ? K - pc : kc;
            const float b_eff = pc == 0 ? beta : 1.0f;
            for (int q = 0; q < npan; q++) gemm_pack_b(transB, B, ldb, jc, ncur, pc, kcur, q, bp);
            for (int ic = 0; ic < M; ic += GEMM_MR) {
                const int rows = M - ic < GEMM_MR ? M - ic : GEMM_MR;
                /* whole panels read A in place; the last, short one from a
                 * zero-padded copy (the kernel reads all 14 rows) */
                const int copy_a = rows < GEMM_MR || a_alias;
                if (copy_a) gemm_pack_a(transA, A, lda, ic, rows, pc, kcur, ap);
                float *crow = C + (ptrdiff_t)ic * ldc + jc;
                for (int q = 0; q < npan; q++) {
                    const int cols = ncur - q * GEMM_NR < GEMM_NR ? ncur - q * GEMM_NR : GEMM_NR;
                    const float *b = bp + (ptrdiff_t)q * kcur * GEMM_NR;
                    float *c = crow + q * GEMM_NR;
                    if (copy_a)
                        cpu_kern_14x32(kcur, ap, 1, GEMM_MR, b, GEMM_NR, c, ldc, rows, cols, alpha, b_eff);
                    else if (transA) /* op(A)[r][k] = A[k][r]: 14 contiguous floats per k */
                        cpu_kern_14x32(kcur, A + (ptrdiff_t)pc * lda + ic, 1, lda, b, GEMM_NR, c, ldc, rows, cols,
                                       alpha, b_eff);
                    else
                        cpu_kern_14x32_rows(kcur, A + (ptrdiff_t)ic * lda + pc, lda, b, GEMM_NR, c, ldc, rows, cols,
                                            alpha, b_eff);
                }
            }
        }
    }
}

/* Part t of nt of a product cut along M or N (cpu_gemm). Part t packs
 * into workspace slot t: a part runs on one thread at a time. */
typedef struct {
    float *ws;
    int nt, split_m, len, unit, units;
    int transA, transB, M, N, K;
    float alpha, beta;
    const float *A, *B;
    int lda, ldb, ldc;
    float *C;
} gemm_job;

static void gemm_part(void *arg, int t) {
    const gemm_job *j = arg;
    const int u0 = (int)((long)j->units * t / j->nt), u1 = (int)((long)j->units * (t + 1) / j->nt);
    const int i0 = u0 * j->unit, i1 = u1 * j->unit < j->len ? u1 * j->unit : j->len;
    float *bp = j->ws + (size_t)t * (GEMM_BP_FLOATS + GEMM_AP_FLOATS), *ap = bp + GEMM_BP_FLOATS;
    if (i1 <= i0) return;
    if (j->split_m)
        gemm_serial(bp, ap, j->transA, j->transB, i1 - i0, j->N, j->K, j->alpha,
                    j->transA ? j->A + i0 : j->A + (ptrdiff_t)i0 * j->lda, j->lda, j->B, j->ldb, j->beta,
                    j->C + (ptrdiff_t)i0 * j->ldc, j->ldc);
    else
        gemm_serial(bp, ap, j->transA, j->transB, j->M, i1 - i0, j->K, j->alpha, j->A, j->lda,
                    j->transB ? j->B + (ptrdiff_t)i0 * j->ldb : j->B + i0, j->ldb, j->beta, j->C + i0, j->ldc);
}

/* Threads split M or N into contiguous parts and work independently, each
 * packing what it needs: one join per product, on the claim-based team
 * (cpu_team.h), so a part whose thread is not running is taken by the
 * caller instead of waited for. (A
 * team that packs each block of B together needs two barriers per block,
 * and on a busy machine every barrier waits for a descheduled thread; that
 * measured twice slower there, and no faster on an idle one.) */
void cpu_gemm(float *ws, int nt, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    /* Cut the dimension whose operand is cheaper to repeat: cutting M makes
     * every thread pack all of op(B) (K x N: a copy or a transpose), cutting
     * N makes every thread read all of op(A) (K x M, in place, about half
     * the cost per element). So M is cut when M >= 2N, or when N is too
     * narrow to share: the model's forward and input-gradient products (M =
     * tokens) and the wide weight gradients; N for the narrow weight
     * gradients (e.g. 256 x 704 over 4096 tokens) and few-row products. */
    const int split_m = M >= 2 * N || N < 2 * GEMM_NR * nt;
    const int len = split_m ? M : N, unit = split_m ? GEMM_MR : GEMM_NR;
    const int units = (len + unit - 1) / unit;
    if (nt > units) nt = units;
    if (nt <= 1) {
        gemm_serial(ws, ws + GEMM_BP_FLOATS, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    gemm_job j = {.ws = ws, .nt = nt, .split_m = split_m, .len = len, .unit = unit, .units = units,
                  .transA = transA, .transB = transB, .M = M, .N = N, .K = K, .alpha = alpha, .A = A, .lda = lda,
                  .B = B, .ldb = ldb, .beta = beta, .C = C, .ldc = ldc};
    cpu_team_run(nt, nt, gemm_part, &j);
}

#else /* no AVX-512: cpu.c uses BLAS and its own loops; these are never called */

size_t cpu_gemm_ws_floats(int nt) {
    (void)nt;
    return 0;
}
void cpu_gemm(float *ws, int nt, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    (void)ws, (void)nt, (void)transA, (void)transB, (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)lda;
    (void)B, (void)ldb, (void)beta, (void)C, (void)ldc;
}
void cpu_transpose(const float *src, ptrdiff_t lds, int nrows, int ncols, float *dst, ptrdiff_t ldd, int width) {
    (void)src, (void)lds, (void)nrows, (void)ncols, (void)dst, (void)ldd, (void)width;
}

#endif
