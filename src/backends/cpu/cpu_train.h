/*
 * Our own fp32 matrix-product and attention kernels for the fast CPU
 * backend (AVX-512 builds), and the vectorisable exp shared with cpu.c.
 * Internal to src/backends/cpu.
 *
 * Why not only BLAS: the Debian OpenBLAS (0.3.21) does not know AMD Zen 4/5
 * and picks its AVX2 "Haswell" kernels there: 97 GFLOP/s on one Zen 5 core
 * against 181 with its AVX-512 kernels (forced by OPENBLAS_CORETYPE, which
 * the library reads when it loads, before any of our code runs, so a
 * library cannot set it). Our kernel runs at the core's FMA peak (~205
 * GFLOP/s) with operands in cache and at 160-185 on the model's products.
 * And the attention products per (sequence, head) are too small and oddly
 * shaped (causal blocks, strided q/k/v columns) for a BLAS call each. Both
 * use one register-blocked micro-kernel, in two addressings of A
 * (cpu_kern_14x32, cpu_kern_14x32_rows below).
 */
#ifndef TLM_BACKENDS_CPU_TRAIN_H
#define TLM_BACKENDS_CPU_TRAIN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ops/ops.h"
#include "util/fastexp.h"

#if defined(__AVX512F__)
#define CPU_HAVE_KERNELS 1
#else
#define CPU_HAVE_KERNELS 0
#endif

/* Workspace of the matrix product on nt threads, in floats. */
size_t cpu_gemm_ws_floats(int nt);

/* C[M,N] = alpha op(A) op(B) + beta C with the semantics of ops->matmul
 * (row-major, BLAS strides; beta = 0 never reads C), on up to nt OpenMP
 * threads; ws holds cpu_gemm_ws_floats(nt) floats.
 * Requires CPU_HAVE_KERNELS; M, N, K > 0. Each element of C is computed by
 * one thread in a fixed order, so the result does not depend on nt. */
void cpu_gemm(float *ws, int nt, int transA, int transB, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* dst[c*ldd + r] = src[r*lds + c] for r < nrows, c < ncols; destination
 * entries nrows <= r < width are zeroed (nrows <= width). */
void cpu_transpose(const float *src, ptrdiff_t lds, int nrows, int ncols, float *dst, ptrdiff_t ldd, int width);

/* Fused causal attention of ops.h (attn_fwd / attn_bwd) on nt threads with
 * per-thread scratch of cpu_attn_ws_floats(T, hd) floats each (ws).
 * Requires CPU_HAVE_KERNELS. */
size_t cpu_attn_ws_floats(int T, int hd);
void cpu_attn_fwd_blocked(float *ws, int nt, float *out, float *lse, const float *qkv, int B, int T, int H, int hd);
void cpu_attn_bwd_blocked(float *ws, int nt, float *dqkv, const float *dout, const float *out, const float *lse,
                          const float *qkv, int B, int T, int H, int hd);

#if CPU_HAVE_KERNELS
#include <immintrin.h>

/* tlm_expf (util/fastexp.h) on 16 lanes, the same steps with fused multiply-adds (so not
 * bit-identical to it, but as accurate). */
static inline __m512 cpu_exp512(__m512 x) {
    /* x second: on NaN, max and min return their second operand, so a
     * NaN input stays NaN (a diverging run is still detected) */
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    /* 2^n by scaling (vscalefps): exact, and NaN n gives NaN */
    return _mm512_scalef_ps(p, n);
}

/* The micro-kernel: a 14 x 32 block of C held in 28 of the 32 vector
 * registers while the k loop streams A and B:
 *   C[r, 0..cols) = alpha * sum_{k<kc} A(r,k) * B(k, 0..cols) + beta * C
 * for r < rows (<= 14), cols <= 32, with A(r,k) = a[r*ars + k*aks] and row
 * k of B at b + k*bks. Rows of A at or beyond `rows` must still be readable
 * (callers pad); columns of B beyond `cols` are never read. beta = 0 never
 * reads C. Per k: two loads of B, 14 broadcasts of A, 28 multiply-adds, so
 * the FMA units, not the loads, set the pace (measured at the machine's
 * FMA peak with the operands in cache). Inlined so that constant strides
 * become constant address offsets. cpu_kern_14x32_rows below is the same
 * with A row-major (ars = lda, aks = 1), addressed so that 14 rows need
 * only 5 pointers. */
#define CPU_K_DECL(r) __m512 c##r##a = _mm512_setzero_ps(), c##r##b = _mm512_setzero_ps();
#define CPU_K_FMA(r, aval)                                                                                        \
    {                                                                                                             \
        const __m512 av = _mm512_set1_ps(aval);                                                                   \
        c##r##a = _mm512_fmadd_ps(av, b0, c##r##a);                                                               \
        c##r##b = _mm512_fmadd_ps(av, b1, c##r##b);                                                               \
    }
#define CPU_K_STORE(r)                                                                                            \
    if ((r) < rows) {                                                                                             \
        float *cr = c + (ptrdiff_t)(r) * ldc;                                                                     \
        __m512 o0 = _mm512_mul_ps(va, c##r##a), o1 = _mm512_mul_ps(va, c##r##b);                                  \
        if (beta != 0.0f) {                                                                                       \
            o0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, cr), o0);                                          \
            o1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, cr + 16), o1);                                     \
        }                                                                                                         \
        _mm512_mask_storeu_ps(cr, m0, o0);                                                                        \
        _mm512_mask_storeu_ps(cr + 16, m1, o1);                                                                   \
    }
/* Masks of the two 16-column halves; zeroed accumulators; C's lines
 * fetched now, since C is read (beta != 0) or written only after the k
 * loop and the C blocks of the large products are not in cache (hiding
 * those misses behind the loop measured ~10% on them). */
#define CPU_K_PROLOGUE                                                                                            \
    const __mmask16 m0 = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);                         \
    const __mmask16 m1 =                                                                                          \
        cols >= 32 ? (__mmask16)0xFFFF : cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1u) : (__mmask16)0;       \
    CPU_K_DECL(0) CPU_K_DECL(1) CPU_K_DECL(2) CPU_K_DECL(3) CPU_K_DECL(4) CPU_K_DECL(5) CPU_K_DECL(6)             \
    CPU_K_DECL(7) CPU_K_DECL(8) CPU_K_DECL(9) CPU_K_DECL(10) CPU_K_DECL(11) CPU_K_DECL(12) CPU_K_DECL(13)         \
    for (int r = 0; r < rows; r++) {                                                                              \
        _mm_prefetch((const char *)(c + (ptrdiff_t)r * ldc), _MM_HINT_T0);                                        \
        _mm_prefetch((const char *)(c + (ptrdiff_t)r * ldc + 31), _MM_HINT_T0);                                   \
    }
#define CPU_K_EPILOGUE                                                                                            \
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);                                           \
    CPU_K_STORE(0) CPU_K_STORE(1) CPU_K_STORE(2) CPU_K_STORE(3) CPU_K_STORE(4) CPU_K_STORE(5) CPU_K_STORE(6)      \
    CPU_K_STORE(7) CPU_K_STORE(8) CPU_K_STORE(9) CPU_K_STORE(10) CPU_K_STORE(11) CPU_K_STORE(12) CPU_K_STORE(13)

static inline __attribute__((always_inline)) void cpu_kern_14x32(int kc, const float *a, ptrdiff_t ars,
                                                                 ptrdiff_t aks, const float *b, ptrdiff_t bks,
                                                                 float *c, ptrdiff_t ldc, int rows, int cols,
                                                                 float alpha, float beta) {
    CPU_K_PROLOGUE
    for (int k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
        CPU_K_FMA(0, a[0]) CPU_K_FMA(1, a[ars]) CPU_K_FMA(2, a[2 * ars]) CPU_K_FMA(3, a[3 * ars])
        CPU_K_FMA(4, a[4 * ars]) CPU_K_FMA(5, a[5 * ars]) CPU_K_FMA(6, a[6 * ars]) CPU_K_FMA(7, a[7 * ars])
        CPU_K_FMA(8, a[8 * ars]) CPU_K_FMA(9, a[9 * ars]) CPU_K_FMA(10, a[10 * ars]) CPU_K_FMA(11, a[11 * ars])
        CPU_K_FMA(12, a[12 * ars]) CPU_K_FMA(13, a[13 * ars])
        a += aks;
        b += bks;
    }
    CPU_K_EPILOGUE
}

/* A(r,k) = a[r*lda + k] for all 14 rows (all must be readable). Row r is
 * read at p + m*s with s = lda in bytes, m in {0,1,2,4,8} (the x86 address
 * scales) and p one of 5 pointers (rows 0, 3, 6, 9, 12), so the loop needs
 * no per-row address registers. Reading A in place instead of packing it
 * measured 5-25% faster on the model's products: the 14 rows x kc block
 * stays in L1 across the kernel calls of a row panel anyway. */
static inline __attribute__((always_inline)) void cpu_kern_14x32_rows(int kc, const float *a, ptrdiff_t lda,
                                                                      const float *b, ptrdiff_t bks, float *c,
                                                                      ptrdiff_t ldc, int rows, int cols,
                                                                      float alpha, float beta) {
    CPU_K_PROLOGUE
    const ptrdiff_t s = lda * (ptrdiff_t)sizeof(float);
    const char *p0 = (const char *)a, *p3 = p0 + 3 * s, *p6 = p0 + 6 * s, *p9 = p0 + 9 * s, *p12 = p0 + 12 * s;
#define CPU_K_AT(p, m) (*(const float *)((p) + (m) * s))
    for (int k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
        CPU_K_FMA(0, CPU_K_AT(p0, 0)) CPU_K_FMA(1, CPU_K_AT(p0, 1)) CPU_K_FMA(2, CPU_K_AT(p0, 2))
        CPU_K_FMA(3, CPU_K_AT(p3, 0)) CPU_K_FMA(4, CPU_K_AT(p0, 4)) CPU_K_FMA(5, CPU_K_AT(p3, 2))
        CPU_K_FMA(6, CPU_K_AT(p6, 0)) CPU_K_FMA(7, CPU_K_AT(p3, 4)) CPU_K_FMA(8, CPU_K_AT(p0, 8))
        CPU_K_FMA(9, CPU_K_AT(p9, 0)) CPU_K_FMA(10, CPU_K_AT(p6, 4)) CPU_K_FMA(11, CPU_K_AT(p3, 8))
        CPU_K_FMA(12, CPU_K_AT(p12, 0)) CPU_K_FMA(13, CPU_K_AT(p9, 4))
        p0 += sizeof(float), p3 += sizeof(float), p6 += sizeof(float), p9 += sizeof(float), p12 += sizeof(float);
        b += bks;
    }
#undef CPU_K_AT
    CPU_K_EPILOGUE
}
#endif

#endif
