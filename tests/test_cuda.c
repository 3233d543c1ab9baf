/*
 * The CUDA backend (src/backends/cuda) against the CPU reference backend.
 *
 * Which backend: with TLM_CUDA_MODULE=path the module at that path is
 * loaded directly (ctest's test_cuda_emu points it at the host emulator
 * build, libtinylm-cuda-emu.so, so every kernel runs here without a GPU);
 * otherwise the real one through ops_create("cuda"), and where that fails
 * (no module, no driver, no GPU) every test is skipped after one line
 * "SKIPPED: no CUDA GPU (reason)".
 *
 * What: every op of ops.h on random inputs and odd shapes against
 * cpu-ref (fp32, max relative error 1e-4 with a floor of a fraction of the
 * largest value, so elements near zero are held to an absolute bound);
 * the transfer ordering of pinned copies; bitwise determinism of repeated
 * runs; error reporting; the tiny model of tests/fixtures against the
 * PyTorch reference (forward, backward, five AdamW steps, cached decoding
 * equal to the full forward); training steps equal to the CPU backend's;
 * and the bf16 precision mode within bounds justified where they are set.
 */
#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fixture.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "model/model_infer.h"
#include "ops/ops.h"
#include "testutil.h"
#include "tinylm/tinylm.h"
#include "train/train.h"
#include "util/common.h"

#define TOL 1e-4
#define FB FIXTURE_B
#define FT FIXTURE_T

typedef tlm_ops *(*create_fn)(int device, char *note, size_t n);
typedef tlm_ops *(*create_ex_fn)(int device, const char *dtype, char *note, size_t n);

static tlm_ops *g_gpu, *g_ref;
static void *g_mod;      /* the module's handle (its entry points), when known */
static int g_emu;        /* the host emulator: keep shapes small */
static tlm_rng g_rng;

#define NEED_GPU()                                                                                                     \
    do {                                                                                                               \
        if (!g_gpu) skip();                                                                                            \
    } while (0)

/* ---- set-up ---------------------------------------------------------------- */

static void *open_module_beside_exe(void) {
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) return NULL;
    exe[len] = 0;
    char *slash = strrchr(exe, '/');
    if (!slash) return NULL;
    slash[1] = 0;
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%slibtinylm-cuda.so", exe);
    /* already loaded by ops_create: this only finds its handle */
    return dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
}

static int setup(void **state) {
    (void)state;
    unsetenv("TLM_CUDA_DTYPE"); /* these tests are about the fp32 path unless they ask */
    tlm_rng_seed(&g_rng, 4242);
    g_ref = cpu_ref_ops_create();
    if (!g_ref) return -1;
    char note[512] = "";
    const char *mod = getenv("TLM_CUDA_MODULE");
    if (mod && *mod) {
        g_mod = dlopen(mod, RTLD_NOW | RTLD_LOCAL);
        if (!g_mod) {
            fprintf(stderr, "test_cuda: TLM_CUDA_MODULE=%s cannot be loaded: %s\n", mod, dlerror());
            return -1;
        }
        create_fn cr = (create_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create");
        if (!cr) {
            fprintf(stderr, "test_cuda: %s has no tlm_cuda_ops_create\n", mod);
            return -1;
        }
        g_gpu = cr(0, note, sizeof note);
        if (!g_gpu) {
            fprintf(stderr, "test_cuda: %s did not start: %s\n", mod, note);
            return -1;
        }
    } else {
        g_gpu = ops_create("cuda", 0, note, sizeof note);
        if (!g_gpu) {
            printf("SKIPPED: no CUDA GPU (%s)\n", tlm_last_error());
            return 0;
        }
        g_mod = open_module_beside_exe();
    }
    g_emu = strstr(g_gpu->device_desc, "emulator") != NULL;
    printf("test_cuda: %s\n          %s\n", note, g_gpu->device_desc);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    ops_destroy(g_gpu);
    ops_destroy(g_ref);
    /* the module stays loaded: its code may run at exit (CUDA runtime) */
    return 0;
}

/* ---- helpers ---------------------------------------------------------------- */

static float *hrand(size_t n, float scale) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = scale * tlm_rng_normal(&g_rng);
    return p;
}

static void *up(tlm_ops *o, const void *h, size_t bytes) {
    void *d = o->alloc(o, bytes);
    if (!d) fail_msg("alloc of %zu bytes on %s: %s", bytes, o->name, tlm_last_error());
    if (h && bytes) o->copy_h2d(o, d, h, bytes);
    return d;
}

static float *down(tlm_ops *o, const void *d, size_t n) {
    float *h = malloc(sizeof(float) * (n ? n : 1));
    assert_non_null(h);
    if (n) o->copy_d2h(o, h, d, n * sizeof(float));
    return h;
}

/* |got - want| <= tol * max(|want|, floor_frac * max|want|) for every
 * element; NaN always fails. Names the worst element. */
static void check_close(const char *what, const float *got, const float *want, size_t n, double tol,
                        double floor_frac) {
    double maxref = 0;
    for (size_t i = 0; i < n; i++) maxref = fmax(maxref, fabs(want[i]));
    double floor = maxref * floor_frac;
    if (floor <= 0) floor = 1e-30;
    size_t worst = 0, bad = 0;
    double we = -1;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / fmax(fabs(want[i]), floor);
        if (!(e <= tol)) bad++;
        if (!(e <= we)) {
            we = e;
            worst = i;
        }
    }
    if (getenv("TLM_TEST_VERBOSE")) printf("  %-48s max rel err %.3g\n", what, we);
    if (bad)
        fail_msg("%s: %zu of %zu elements over rel err %.1g; worst at %zu: got %.8g want %.8g (floor %.3g)", what, bad,
                 n, tol, worst, (double)got[worst], (double)want[worst], floor);
}

/* ---- memory and transfers ---------------------------------------------------------- */

/* mem_usage counts exactly what alloc, pack and the backend's own buffers
 * hold: an allocation adds its bytes, a free takes them back, the peak
 * keeps the most. */
static void test_mem_usage(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o = g_gpu;
    if (!o->mem_usage) fail_msg("the CUDA backend has no mem_usage");
    size_t u0 = 0, p0 = 0, u = 0, p = 0;
    o->mem_usage(o, &u0, &p0);
    assert_true(p0 >= u0);
    void *a = o->alloc(o, 3 << 20), *b = o->alloc(o, 5000);
    assert_non_null(a);
    assert_non_null(b);
    o->mem_usage(o, &u, &p);
    assert_int_equal(u, u0 + (3 << 20) + 5000);
    assert_true(p >= u);
    o->free(o, a);
    o->mem_usage(o, &u, NULL);
    assert_int_equal(u, u0 + 5000);
    o->mem_usage(o, NULL, &p);
    assert_true(p >= u0 + (3 << 20) + 5000); /* the peak stays */
    /* packed weights count too (bf16: 2 bytes a weight) */
    float *w = up(o, NULL, (size_t)64 * 32 * 4);
    o->mem_usage(o, &u0, NULL);
    tlm_packed *pk = o->pack(o, w, 64, 32, TLM_PACK_BF16, TLM_PACK_LINEAR);
    assert_non_null(pk);
    o->mem_usage(o, &u, NULL);
    assert_int_equal(u, u0 + 64 * 32 * 2);
    o->pack_free(o, pk);
    o->mem_usage(o, &u, NULL);
    assert_int_equal(u, u0);
    o->free(o, w);
    o->free(o, b);
}

static void test_memory(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o = g_gpu;
    const size_t n = 1000;
    float *d = o->alloc(o, n * sizeof(float));
    assert_non_null(d);
    float *h = down(o, d, n);
    for (size_t i = 0; i < n; i++) assert_true(h[i] == 0.0f); /* zero-filled */
    free(h);

    float *x = hrand(n, 1.0f);
    o->copy_h2d(o, d, x, n * sizeof(float));
    h = down(o, d, n);
    assert_memory_equal(h, x, n * sizeof(float));
    free(h);

    float *e = o->alloc(o, n * sizeof(float));
    assert_non_null(e);
    o->copy_d2d(o, e + 7, d + 100, 300 * sizeof(float));
    o->zero(o, e + 50, 10 * sizeof(float));
    h = down(o, e, n);
    for (size_t i = 0; i < n; i++) {
        float want = i >= 50 && i < 60 ? 0.0f : i >= 7 && i < 307 ? x[i - 7 + 100] : 0.0f;
        if (h[i] != want) fail_msg("d2d/zero: element %zu is %g, want %g", i, h[i], want);
    }
    free(h);

    /* A page-locked source goes through the copy stream; the ops before and
     * after the copy must see the old and the new contents respectively. */
    int pinned = -1;
    float *ph = o->host_alloc(o, n * sizeof(float), &pinned);
    assert_non_null(ph);
    assert_true(pinned == 0 || pinned == 1);
    if (!pinned) printf("  note: host_alloc gave pageable memory (page-locked memory unavailable)\n");
    for (size_t i = 0; i < n; i++) assert_true(ph[i] == 0.0f);
    float *y = o->alloc(o, n * sizeof(float));
    assert_non_null(y);
    o->add_inplace(o, y, d, n); /* y = x */
    for (size_t i = 0; i < n; i++) ph[i] = (float)i;
    o->copy_h2d(o, d, ph, n * sizeof(float)); /* d = i */
    o->add_inplace(o, y, d, n);               /* y = x + i */
    h = down(o, y, n);
    for (size_t i = 0; i < n; i++)
        if (h[i] != x[i] + (float)i) fail_msg("pinned copy ordering: y[%zu] = %g, want %g", i, h[i], x[i] + (float)i);
    free(h);
    o->host_free(o, ph, pinned);

    o->sync(o);
    o->free(o, d);
    o->free(o, e);
    o->free(o, y);
    o->free(o, NULL); /* freeing NULL is a no-op */
    free(x);

#if !defined(__SANITIZE_ADDRESS__)
    /* Out of device memory: NULL and a message, and the backend still works. */
    void *huge = o->alloc(o, (size_t)1 << 50);
    assert_null(huge);
    assert_non_null(strstr(tlm_last_error(), "GPU memory"));
    float *small = o->alloc(o, 64);
    assert_non_null(small);
    o->free(o, small);
#endif
}

/* ---- matrix products ----------------------------------------------------------------- */

static void run_matmul(tlm_ops *o, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float beta, float *C, int ldc, size_t na, size_t nb, size_t nc) {
    float *dA = up(o, A, na * sizeof(float)), *dB = up(o, B, nb * sizeof(float)), *dC = up(o, C, nc * sizeof(float));
    o->matmul(o, ta, tb, M, N, K, alpha, dA, lda, dB, ldb, beta, dC, ldc);
    o->copy_d2h(o, C, dC, nc * sizeof(float));
    o->free(o, dA);
    o->free(o, dB);
    o->free(o, dC);
}

static void check_matmul(tlm_ops *o, double tol, double floor_frac) {
    const int shapes[][3] = {{1, 1, 1}, {5, 7, 3}, {33, 17, 65}, {64, 96, 128}, {128, 300, 64}, {4, 5, 0}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int bz = 0; bz < 2; bz++) {
                    int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                    int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 5;
                    size_t na = (size_t)(ta ? K : M) * lda + 1, nb = (size_t)(tb ? N : K) * ldb + 1;
                    size_t nc = (size_t)M * ldc;
                    float *A = hrand(na, 1.0f), *B = hrand(nb, 1.0f), *C0 = hrand(nc, 1.0f);
                    float beta = bz ? 0.0f : 1.3f, alpha = 0.7f;
                    if (bz) /* beta = 0: C is not read, even when it holds NaN */
                        for (int i = 0; i < M; i++)
                            for (int j = 0; j < N; j++) C0[(size_t)i * ldc + j] = NAN;
                    float *Cg = malloc(nc * sizeof(float)), *Cr = malloc(nc * sizeof(float));
                    memcpy(Cg, C0, nc * sizeof(float));
                    memcpy(Cr, C0, nc * sizeof(float));
                    run_matmul(o, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cg, ldc, na, nb, nc);
                    run_matmul(g_ref, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cr, ldc, na, nb, nc);
                    char what[96];
                    snprintf(what, sizeof what, "matmul %dx%dx%d tA%d tB%d beta %g", M, N, K, ta, tb, beta);
                    check_close(what, Cg, Cr, nc, tol, floor_frac);
                    for (int i = 0; i < M; i++) /* the columns past N are untouched */
                        for (int j = N; j < ldc; j++)
                            if (memcmp(&Cg[(size_t)i * ldc + j], &C0[(size_t)i * ldc + j], sizeof(float)))
                                fail_msg("%s wrote C[%d][%d] beyond N", what, i, j);
                    free(A);
                    free(B);
                    free(C0);
                    free(Cg);
                    free(Cr);
                }
}

static void test_matmul(void **state) {
    (void)state;
    NEED_GPU();
    check_matmul(g_gpu, TOL, 1e-3);
}

/* ---- element-wise and row-wise ops ------------------------------------------------------ */

static void test_add_swiglu(void **state) {
    (void)state;
    NEED_GPU();
    const int N = 37, F = 91;
    size_t n = (size_t)N * F;
    float *y = hrand(n, 1.0f), *x = hrand(n, 1.0f), *gu = hrand(2 * n, 2.0f), *da = hrand(n, 1.0f);
    float *out[2][3];
    tlm_ops *be[2] = {g_gpu, g_ref};
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        float *dy = up(o, y, n * 4), *dx = up(o, x, n * 4), *dgu = up(o, gu, 2 * n * 4), *dda = up(o, da, n * 4);
        float *a = up(o, NULL, n * 4), *dg = up(o, NULL, 2 * n * 4);
        o->add_inplace(o, dy, dx, n);
        o->swiglu_fwd(o, a, dgu, N, F);
        o->swiglu_bwd(o, dg, dda, dgu, N, F);
        out[k][0] = down(o, dy, n);
        out[k][1] = down(o, a, n);
        out[k][2] = down(o, dg, 2 * n);
        o->free(o, dy), o->free(o, dx), o->free(o, dgu), o->free(o, dda), o->free(o, a), o->free(o, dg);
    }
    check_close("add_inplace", out[0][0], out[1][0], n, TOL, 1e-3);
    check_close("swiglu_fwd", out[0][1], out[1][1], n, TOL, 1e-3);
    check_close("swiglu_bwd", out[0][2], out[1][2], 2 * n, TOL, 1e-3);
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 3; j++) free(out[k][j]);
    free(y), free(x), free(gu), free(da);
}

static void test_embed(void **state) {
    (void)state;
    NEED_GPU();
    const int V = 97, D = 70, N = g_emu ? 2500 : 20000; /* > one scan chunk of 2048 */
    int32_t *tok = malloc((size_t)N * sizeof(int32_t));
    for (int i = 0; i < N; i++) /* skewed: many repeats of a few tokens */
        tok[i] = (int32_t)(i % 3 == 0 ? 5 : tlm_rng_below(&g_rng, (uint64_t)V));
    float *wte = hrand((size_t)V * D, 1.0f), *dout = hrand((size_t)N * D, 1.0f), *dw0 = hrand((size_t)V * D, 1.0f);
    float *res[2][2];
    tlm_ops *be[2] = {g_gpu, g_ref};
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        int32_t *dt = up(o, tok, (size_t)N * 4);
        float *dwte = up(o, wte, (size_t)V * D * 4), *dd = up(o, dout, (size_t)N * D * 4);
        float *dw = up(o, dw0, (size_t)V * D * 4), *out = up(o, NULL, (size_t)N * D * 4);
        o->embed_fwd(o, out, dt, dwte, N, D);
        o->embed_bwd(o, dw, dt, dd, N, D); /* accumulates onto dw0 */
        res[k][0] = down(o, out, (size_t)N * D);
        res[k][1] = down(o, dw, (size_t)V * D);
        o->free(o, dt), o->free(o, dwte), o->free(o, dd), o->free(o, dw), o->free(o, out);
    }
    assert_memory_equal(res[0][0], res[1][0], (size_t)N * D * sizeof(float)); /* a gather is exact */
    /* each row summed in position order on both sides (fp32 adds, no FMA): the same bits */
    assert_memory_equal(res[0][1], res[1][1], (size_t)V * D * sizeof(float));
    for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]);
    free(tok), free(wte), free(dout), free(dw0);
}

static void test_rmsnorm(void **state) {
    (void)state;
    NEED_GPU();
    const int shapes[][2] = {{37, 96}, {1000, 64}, {5, 1100}, {3, 7}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], D = shapes[s][1];
        size_t n = (size_t)N * D;
        float *x = hrand(n, 1.5f), *w = hrand((size_t)D, 1.0f), *g = hrand(n, 1.0f), *dw0 = hrand((size_t)D, 1.0f);
        float *res[2][4];
        tlm_ops *be[2] = {g_gpu, g_ref};
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            float *dx_ = up(o, x, n * 4), *dw_ = up(o, w, (size_t)D * 4), *dg = up(o, g, n * 4);
            float *ddw = up(o, dw0, (size_t)D * 4), *out = up(o, NULL, n * 4), *rstd = up(o, NULL, (size_t)N * 4);
            float *dxo = up(o, NULL, n * 4), *out2 = up(o, NULL, n * 4);
            o->rmsnorm_fwd(o, out, rstd, dx_, dw_, N, D, 1e-5f);
            o->rmsnorm_fwd(o, out2, NULL, dx_, dw_, N, D, 1e-5f); /* rstd may be NULL */
            o->rmsnorm_bwd(o, dxo, ddw, dg, dx_, dw_, rstd, N, D);
            res[k][0] = down(o, out, n);
            res[k][1] = down(o, rstd, (size_t)N);
            res[k][2] = down(o, dxo, n);
            res[k][3] = down(o, ddw, (size_t)D);
            float *o2 = down(o, out2, n);
            assert_memory_equal(o2, res[k][0], n * sizeof(float));
            free(o2);
            o->free(o, dx_), o->free(o, dw_), o->free(o, dg), o->free(o, ddw), o->free(o, out), o->free(o, rstd);
            o->free(o, dxo), o->free(o, out2);
        }
        char what[64];
        snprintf(what, sizeof what, "rmsnorm_fwd %dx%d", N, D);
        check_close(what, res[0][0], res[1][0], n, TOL, 1e-3);
        check_close("rmsnorm rstd", res[0][1], res[1][1], (size_t)N, TOL, 1e-3);
        snprintf(what, sizeof what, "rmsnorm_bwd dx %dx%d", N, D);
        check_close(what, res[0][2], res[1][2], n, TOL, 1e-2);
        snprintf(what, sizeof what, "rmsnorm_bwd dw %dx%d", N, D);
        check_close(what, res[0][3], res[1][3], (size_t)D, TOL, 1e-2);
        for (int k = 0; k < 2; k++)
            for (int j = 0; j < 4; j++) free(res[k][j]);
        free(x), free(w), free(g), free(dw0);
    }
}

static void test_rope(void **state) {
    (void)state;
    NEED_GPU();
    const int hds[] = {16, 32, 64, 10};
    const int pos0s[] = {0, 13, 1500}; /* 1500: beyond the first table of 1024 positions */
    const float thetas[] = {10000.0f, 500000.0f};
    for (size_t a = 0; a < sizeof hds / sizeof hds[0]; a++)
        for (size_t b = 0; b < sizeof pos0s / sizeof pos0s[0]; b++)
            for (size_t c = 0; c < 2; c++) {
                const int B = 2, T = 9, H = 3, hd = hds[a], D = H * hd;
                size_t n = (size_t)B * T * 3 * D;
                float *x = hrand(n, 1.0f), *res[2][2];
                tlm_ops *be[2] = {g_gpu, g_ref};
                for (int k = 0; k < 2; k++) {
                    tlm_ops *o = be[k];
                    float *d1 = up(o, x, n * 4), *d2 = up(o, x, n * 4);
                    o->rope_fwd(o, d1, B, T, H, hd, pos0s[b], thetas[c]);
                    o->rope_bwd(o, d2, B, T, H, hd, pos0s[b], thetas[c]);
                    res[k][0] = down(o, d1, n);
                    res[k][1] = down(o, d2, n);
                    o->free(o, d1), o->free(o, d2);
                }
                char what[96];
                snprintf(what, sizeof what, "rope hd %d pos0 %d theta %g", hd, pos0s[b], thetas[c]);
                check_close(what, res[0][0], res[1][0], n, TOL, 1e-3);
                check_close(what, res[0][1], res[1][1], n, TOL, 1e-3);
                /* v is never touched */
                for (int r = 0; r < B * T; r++)
                    assert_memory_equal(res[0][0] + (size_t)r * 3 * D + 2 * D, x + (size_t)r * 3 * D + 2 * D,
                                        (size_t)D * sizeof(float));
                for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]);
                free(x);
            }
}

/* ---- attention --------------------------------------------------------------------------- */

static void attn_case(int B, int T, int H, int hd) {
    const int D = H * hd;
    size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, nl = (size_t)B * H * T;
    float *qkv = hrand(nq, 1.0f), *dout = hrand(no, 1.0f);
    float *res[2][3];
    tlm_ops *be[2] = {g_gpu, g_ref};
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        float *dq = up(o, qkv, nq * 4), *dd = up(o, dout, no * 4), *out = up(o, NULL, no * 4);
        float *lse = up(o, NULL, nl * 4), *dqkv = up(o, NULL, nq * 4);
        o->attn_fwd(o, out, lse, dq, B, T, H, hd);
        o->attn_bwd(o, dqkv, dd, out, lse, dq, B, T, H, hd);
        res[k][0] = down(o, out, no);
        res[k][1] = down(o, lse, nl);
        res[k][2] = down(o, dqkv, nq);
        o->free(o, dq), o->free(o, dd), o->free(o, out), o->free(o, lse), o->free(o, dqkv);
    }
    char what[96];
    snprintf(what, sizeof what, "attn_fwd out B%d T%d H%d hd%d", B, T, H, hd);
    check_close(what, res[0][0], res[1][0], no, TOL, 1e-2);
    snprintf(what, sizeof what, "attn_fwd lse B%d T%d H%d hd%d", B, T, H, hd);
    check_close(what, res[0][1], res[1][1], nl, TOL, 1e-2);
    snprintf(what, sizeof what, "attn_bwd dqkv B%d T%d H%d hd%d", B, T, H, hd);
    check_close(what, res[0][2], res[1][2], nq, TOL, 1e-2);
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 3; j++) free(res[k][j]);
    free(qkv), free(dout);
}

static void test_attention(void **state) {
    (void)state;
    NEED_GPU();
    /* every head-size class (<=32, <=64, <=128, odd), tails of the tiles */
    attn_case(2, 37, 3, 16);
    attn_case(1, 70, 2, 32);
    attn_case(2, 65, 2, 64);
    attn_case(1, 40, 1, 128);
    attn_case(1, 33, 2, 80);
    attn_case(1, 1, 1, 32);
    attn_case(1, 130, 1, 12);
    if (!g_emu) { /* the sizes the issue names: T up to 1024, hd up to 128 */
        attn_case(1, 1024, 2, 64);
        attn_case(2, 300, 2, 128);
        attn_case(4, 256, 8, 32);
    }
}

static void cached_case(int B, int H, int hd, int Tmax, int P) {
    const int D = H * hd;
    float *res[2][3];
    tlm_ops *be[2] = {g_gpu, g_ref};
    const int steps = 5;
    /* the same random rows for both backends */
    float *pre = hrand((size_t)B * P * 3 * D, 1.0f), *dec = hrand((size_t)steps * B * 3 * D, 1.0f);
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        size_t nc = (size_t)B * Tmax * D;
        float *kc = up(o, NULL, nc * 4), *vc = up(o, NULL, nc * 4);
        float *qp = up(o, pre, (size_t)B * P * 3 * D * 4), *op = up(o, NULL, (size_t)B * P * D * 4);
        float *qd = up(o, NULL, (size_t)B * 3 * D * 4), *od = up(o, NULL, (size_t)steps * B * D * 4);
        o->kv_store(o, kc, vc, qp, B, P, Tmax, D, 0);
        o->attn_cached(o, op, qp, kc, vc, B, P, Tmax, H, hd, 0);
        for (int s = 0; s < steps; s++) {
            o->copy_h2d(o, qd, dec + (size_t)s * B * 3 * D, (size_t)B * 3 * D * 4);
            o->kv_store(o, kc, vc, qd, B, 1, Tmax, D, P + s);
            o->attn_cached(o, od + (size_t)s * B * D, qd, kc, vc, B, 1, Tmax, H, hd, P + s);
        }
        res[k][0] = down(o, op, (size_t)B * P * D);
        res[k][1] = down(o, od, (size_t)steps * B * D);
        res[k][2] = down(o, kc, nc);
        o->free(o, kc), o->free(o, vc), o->free(o, qp), o->free(o, op), o->free(o, qd), o->free(o, od);
    }
    char what[96];
    snprintf(what, sizeof what, "attn_cached prompt B%d H%d hd%d P%d", B, H, hd, P);
    check_close(what, res[0][0], res[1][0], (size_t)B * P * D, TOL, 1e-2);
    snprintf(what, sizeof what, "attn_cached decode B%d H%d hd%d", B, H, hd);
    check_close(what, res[0][1], res[1][1], (size_t)steps * B * D, TOL, 1e-2);
    assert_memory_equal(res[0][2], res[1][2], (size_t)B * Tmax * D * sizeof(float)); /* kv_store copies */
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 3; j++) free(res[k][j]);
    free(pre), free(dec);
}

static void test_attn_cached(void **state) {
    (void)state;
    NEED_GPU();
    cached_case(3, 2, 32, 40, 20);
    cached_case(2, 4, 16, 30, 7);
    cached_case(1, 2, 64, 80, 70); /* more than two chunks of 32 keys */
    cached_case(2, 1, 128, 12, 3);
    cached_case(1, 1, 80, 12, 1);
}

/* ---- cross-entropy and the optimizer ------------------------------------------------------- */

static void test_xent(void **state) {
    (void)state;
    NEED_GPU();
    const int sizes[][2] = {{50, 300}, {7, 3001}};
    for (size_t s = 0; s < 2; s++)
        for (int want_grad = 0; want_grad < 2; want_grad++) {
            const int N = sizes[s][0], V = sizes[s][1];
            size_t n = (size_t)N * V;
            float *x = hrand(n, 3.0f);
            int32_t *tg = malloc((size_t)N * sizeof(int32_t));
            for (int i = 0; i < N; i++) tg[i] = (int32_t)tlm_rng_below(&g_rng, (uint64_t)V);
            tg[1] = -1; /* ignored */
            tg[3] = V;  /* out of range: ignored too */
            float *res[2][2];
            tlm_ops *be[2] = {g_gpu, g_ref};
            for (int k = 0; k < 2; k++) {
                tlm_ops *o = be[k];
                float *dx = up(o, x, n * 4), *dl = up(o, NULL, (size_t)N * 4);
                int32_t *dt = up(o, tg, (size_t)N * 4);
                o->xent(o, dx, dl, dt, N, V, 1.0f / 37.0f, want_grad);
                res[k][0] = down(o, dl, (size_t)N);
                res[k][1] = down(o, dx, n);
                o->free(o, dx), o->free(o, dl), o->free(o, dt);
            }
            check_close("xent losses", res[0][0], res[1][0], (size_t)N, TOL, 1e-3);
            if (want_grad)
                check_close("xent dlogits", res[0][1], res[1][1], n, TOL, 1e-3);
            else /* logits untouched */
                assert_memory_equal(res[0][1], x, n * sizeof(float));
            assert_true(res[0][0][1] == 0.0f && res[0][0][3] == 0.0f);
            for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]);
            free(x), free(tg);
        }
}

static void test_sumsq_adamw(void **state) {
    (void)state;
    NEED_GPU();
    const size_t sizes[] = {0, 1, 1000, 100003};
    for (size_t s = 0; s < 4; s++)
        for (int acc = 0; acc < 2; acc++) {
            size_t n = sizes[s];
            float *x = hrand(n, 1.0f), init = 2.5f, r[2];
            tlm_ops *be[2] = {g_gpu, g_ref};
            for (int k = 0; k < 2; k++) {
                tlm_ops *o = be[k];
                float *dx = up(o, x, n * 4), *out = up(o, &init, 4);
                o->sumsq(o, out, dx, n, acc);
                o->copy_d2h(o, &r[k], out, 4);
                o->free(o, dx), o->free(o, out);
            }
            check_close("sumsq", &r[0], &r[1], 1, 1e-5, 0);
            free(x);
        }

    const size_t n = 1000;
    const float gns[] = {25.0f, 0.25f};
    for (int t = 1; t <= 7; t += 6)
        for (int c = 0; c < 3; c++) {
            float *p = hrand(n, 1.0f), *g = hrand(n, 1.0f), *m = hrand(n, 0.1f), *v = hrand(n, 0.1f);
            for (size_t i = 0; i < n; i++) v[i] = v[i] * v[i];
            float gn = gns[c % 2];
            float *res[2][3];
            tlm_ops *be[2] = {g_gpu, g_ref};
            for (int k = 0; k < 2; k++) {
                tlm_ops *o = be[k];
                float *dp = up(o, p, n * 4), *dg = up(o, g, n * 4), *dm = up(o, m, n * 4), *dv = up(o, v, n * 4);
                float *dgn = up(o, &gn, 4);
                /* c = 0: clipping active (norm 5 > 1); 1: inactive (0.5 < 1);
                 * 2: no clipping at all (NULL scalar) */
                o->adamw(o, dp, dg, dm, dv, n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, c == 2 ? NULL : dgn, 1.0f);
                res[k][0] = down(o, dp, n);
                res[k][1] = down(o, dm, n);
                res[k][2] = down(o, dv, n);
                o->free(o, dp), o->free(o, dg), o->free(o, dm), o->free(o, dv), o->free(o, dgn);
            }
            check_close("adamw p", res[0][0], res[1][0], n, TOL, 1e-2);
            check_close("adamw m", res[0][1], res[1][1], n, TOL, 1e-2);
            check_close("adamw v", res[0][2], res[1][2], n, TOL, 1e-2);
            for (int k = 0; k < 2; k++)
                for (int j = 0; j < 3; j++) free(res[k][j]);
            free(p), free(g), free(m), free(v);
        }
}

/* ---- determinism: the same call twice gives the same bits ---------------------------------- */

static void test_determinism(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o = g_gpu;
    const int B = 2, T = g_emu ? 40 : 200, H = 2, hd = 32, D = H * hd, V = 50, N = B * T;
    size_t nq = (size_t)N * 3 * D, no = (size_t)N * D;
    float *qkv = hrand(nq, 1.0f), *dout = hrand(no, 1.0f);
    int32_t *tok = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++) tok[i] = (int32_t)tlm_rng_below(&g_rng, 7); /* many repeats */
    float *dq = up(o, qkv, nq * 4), *dd = up(o, dout, no * 4), *out = up(o, NULL, no * 4);
    float *lse = up(o, NULL, (size_t)B * H * T * 4), *dqkv = up(o, NULL, nq * 4);
    float *dw = up(o, NULL, (size_t)V * D * 4), *w = up(o, NULL, (size_t)D * 4), *rstd = up(o, NULL, (size_t)N * 4);
    float *dx = up(o, NULL, no * 4), *s = up(o, NULL, 4);
    int32_t *dt = up(o, tok, (size_t)N * 4);
    float *first[4] = {0};
    for (int rep = 0; rep < 2; rep++) {
        o->zero(o, dw, (size_t)V * D * 4);
        o->zero(o, w, (size_t)D * 4);
        o->attn_fwd(o, out, lse, dq, B, T, H, hd);
        o->attn_bwd(o, dqkv, dd, out, lse, dq, B, T, H, hd);
        o->embed_bwd(o, dw, dt, dd, N, D);
        o->rmsnorm_fwd(o, dx, rstd, dd, dd, N, D, 1e-5f);
        o->rmsnorm_bwd(o, dx, w, dd, out, dd, rstd, N, D);
        o->sumsq(o, s, dqkv, nq, 0);
        float *got[4] = {down(o, dqkv, nq), down(o, dw, (size_t)V * D), down(o, w, (size_t)D), down(o, s, 1)};
        size_t sz[4] = {nq, (size_t)V * D, (size_t)D, 1};
        const char *names[4] = {"attn_bwd", "embed_bwd", "rmsnorm_bwd dw", "sumsq"};
        for (int i = 0; i < 4; i++) {
            if (rep == 0) {
                first[i] = got[i];
            } else {
                if (memcmp(first[i], got[i], sz[i] * sizeof(float))) fail_msg("%s differs between two runs", names[i]);
                free(got[i]);
                free(first[i]);
            }
        }
    }
    o->free(o, dq), o->free(o, dd), o->free(o, out), o->free(o, lse), o->free(o, dqkv), o->free(o, dw);
    o->free(o, w), o->free(o, rstd), o->free(o, dx), o->free(o, s), o->free(o, dt);
    free(qkv), free(dout), free(tok);
}

/* ---- errors ---------------------------------------------------------------------------------- */

static void test_errors(void **state) {
    (void)state;
    NEED_GPU();
    create_fn cr = g_mod ? (create_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create") : NULL;
    if (!cr) skip();
    char note[512];
    assert_null(cr(99, note, sizeof note));
    if (!strstr(note, "cuda:99")) fail_msg("bad device index note: %s", note);

    setenv("TLM_CUDA_DTYPE", "fp16", 1);
    assert_null(cr(0, note, sizeof note));
    unsetenv("TLM_CUDA_DTYPE");
    if (!strstr(note, "fp32, tf32 or bf16")) fail_msg("bad dtype note: %s", note);

    if (g_emu) {
        setenv("TLM_CUDA_EMU_NODEV", "1", 1);
        assert_null(cr(0, note, sizeof note));
        unsetenv("TLM_CUDA_EMU_NODEV");
        if (!strstr(note, "no CUDA GPU")) fail_msg("bad no-device note: %s", note);
    }

    /* An op that cannot run marks the backend failed: the message names the
     * op, later reads come back as NaN. A second instance, not g_gpu. */
    tlm_ops *o = cr(0, note, sizeof note);
    assert_non_null(o);
    float *q = up(o, NULL, 3 * 256 * 4), *out = up(o, NULL, 256 * 4), *lse = up(o, NULL, 4);
    o->attn_fwd(o, out, lse, q, 1, 1, 1, 256);
    if (!strstr(tlm_last_error(), "head size 256")) fail_msg("error message: %s", tlm_last_error());
    float h = 0;
    o->copy_d2h(o, &h, out, sizeof h);
    assert_true(isnan(h));
    assert_null(o->alloc(o, 16)); /* a failed backend hands out nothing more */
    o->free(o, q), o->free(o, out), o->free(o, lse);
    o->destroy(o);
}

/* ---- the model: fixture, cached decoding, training steps ----------------------------------- */

/* Opened by the first test that needs it: without a GPU every test skips
 * before that. */
static test_fixture g_fx;

static void fx_open(void) {
    if (!g_fx.f && fixture_open(&g_fx) != 0) fail_msg("cannot open %s: %s", FIXTURE_PATH, tlm_last_error());
}

static void fx_model(tlm_model *m, tlm_ops *o) {
    fx_open();
    fixture_model(&g_fx, m, o);
}

static size_t tsize(const tlm_tensor *t) { return (size_t)t->rows * (size_t)t->cols; }

/* Like check_close, but up to max_out elements may exceed tol as long as
 * none is off by more than abs_cap (AdamW: see tests/test_model.c). */
static void check_close_out(const char *what, const float *got, const float *want, size_t n, double tol,
                            size_t max_out, double abs_cap) {
    double maxref = 0;
    for (size_t i = 0; i < n; i++) maxref = fmax(maxref, fabs(want[i]));
    double floor = fmax(maxref * 1e-2, 1e-30);
    size_t out = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= abs_cap)) fail_msg("%s: element %zu off by %.3g (cap %.3g)", what, i, d, abs_cap);
        if (!(d / fmax(fabs(want[i]), floor) <= tol)) out++;
    }
    if (out > max_out) fail_msg("%s: %zu of %zu elements over rel err %.1g (%zu allowed)", what, out, n, tol, max_out);
}

/* The fixture's five clipped AdamW steps (as dev/make_fixtures.py ran
 * them) on model m of backend o: each step's loss and gradient norm, and
 * the fixture's own, wl and wn. */
static void fx_adamw_steps(tlm_ops *o, tlm_model *m, float losses[5], float norms[5], float wl[5], float wn[5]) {
    float *mom = up(o, NULL, m->nparams * 4), *var = up(o, NULL, m->nparams * 4), *gn = up(o, NULL, 4);
    assert_int_equal(safetensors_read_f32(g_fx.f, "adamw.losses", wl, 5), 0);
    assert_int_equal(safetensors_read_f32(g_fx.f, "adamw.gnorms", wn, 5), 0);
    for (int step = 1; step <= 5; step++) {
        model_zero_grad(m);
        losses[step - 1] = model_forward_backward(m, g_fx.inputs, g_fx.targets, FB, FT, 1.0f / (float)g_fx.nvalid, 0);
        o->sumsq(o, gn, m->grads, m->nparams, 0);
        float g2;
        o->copy_d2h(o, &g2, gn, 4);
        norms[step - 1] = sqrtf(g2);
        for (int i = 0; i < m->ntensors; i++) {
            const tlm_tensor *t = &m->tensors[i];
            o->adamw(o, m->params + t->offset, m->grads + t->offset, mom + t->offset, var + t->offset, tsize(t), 1e-3f,
                     0.9f, 0.95f, 1e-8f, t->decay ? 0.1f : 0.0f, step, gn, 1.0f);
        }
    }
    o->free(o, mom), o->free(o, var), o->free(o, gn);
}

static void test_model_fixture(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o = g_gpu;
    tlm_model m;
    fx_model(&m, o);
    const size_t NV = (size_t)FB * FT * g_fx.cfg.vocab;
    float want_loss;
    assert_int_equal(safetensors_read_f32(g_fx.f, "loss", &want_loss, 1), 0);

    float loss = model_forward_backward(&m, g_fx.inputs, g_fx.targets, FB, FT, 0.0f, 0);
    float *logits = down(o, m.logits, NV), *ref = fixture_read(&g_fx, "logits", NV);
    check_close("fixture logits", logits, ref, NV, TOL, 1e-2);
    check_close("fixture eval loss", &loss, &want_loss, 1, TOL, 0);
    free(logits), free(ref);

    model_zero_grad(&m);
    loss = model_forward_backward(&m, g_fx.inputs, g_fx.targets, FB, FT, 1.0f / (float)g_fx.nvalid, 0);
    check_close("fixture train loss", &loss, &want_loss, 1, TOL, 0);
    float *grads = down(o, m.grads, m.nparams);
    for (int i = 0; i < m.ntensors; i++) {
        const tlm_tensor *t = &m.tensors[i];
        char name[160];
        snprintf(name, sizeof name, "grad.%s", t->name);
        float *r = fixture_read(&g_fx, name, tsize(t));
        check_close(name, grads + t->offset, r, tsize(t), TOL, 1e-2);
        free(r);
    }
    free(grads);

    /* five AdamW steps with clipping, as dev/make_fixtures.py did */
    model_destroy(&m);
    fx_model(&m, o);
    float wl[5], wn[5], losses[5], norms[5];
    fx_adamw_steps(o, &m, losses, norms, wl, wn);
    check_close("fixture adamw losses", losses, wl, 5, TOL, 1e-2);
    check_close("fixture adamw grad norms", norms, wn, 5, TOL, 1e-2);
    float *params = down(o, m.params, m.nparams);
    for (int i = 0; i < m.ntensors; i++) {
        const tlm_tensor *t = &m.tensors[i];
        char name[160];
        snprintf(name, sizeof name, "adamw.%s", t->name);
        float *r = fixture_read(&g_fx, name, tsize(t));
        check_close_out(name, params + t->offset, r, tsize(t), TOL, tsize(t) / 1000, 0.05 * 1e-3);
        free(r);
    }
    free(params);
    model_destroy(&m);
}

/* Cached decoding (prompt in chunks, then one token at a time) gives the
 * logits of the full forward at every position. */
static void test_model_cached(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o = g_gpu;
    tlm_model m;
    fx_model(&m, o);
    const int V = g_fx.cfg.vocab, D = g_fx.cfg.dim, L = g_fx.cfg.layers, P = 20;
    model_forward_backward(&m, g_fx.inputs, g_fx.targets, FB, FT, 0.0f, 0);
    float *full = down(o, m.logits, (size_t)FB * FT * V);
    float *kc[2], *vc[2];
    for (int l = 0; l < L; l++) {
        kc[l] = up(o, NULL, (size_t)FB * FT * D * 4);
        vc[l] = up(o, NULL, (size_t)FB * FT * D * 4);
    }
    tlm_infer_scratch s;
    assert_int_equal(model_infer_scratch_alloc(&m, &s, FB, P), 0);
    float *od = up(o, NULL, (size_t)FB * V * 4), *got = malloc((size_t)FB * V * 4), *want = malloc((size_t)FB * V * 4);
    int32_t chunk[FB * FT];
    int pos = 0;
    while (pos < FT) {
        int T = pos == 0 ? 8 : pos < P ? P - pos : 1; /* chunks 8 and 12, then single tokens */
        for (int b = 0; b < FB; b++)
            for (int t = 0; t < T; t++) chunk[b * T + t] = g_fx.inputs[b * FT + pos + t];
        assert_int_equal(model_forward_cached(&m, &s, kc, vc, FT, chunk, FB, T, pos, od), 0);
        pos += T;
        o->copy_d2h(o, got, od, (size_t)FB * V * 4);
        for (int b = 0; b < FB; b++) memcpy(want + (size_t)b * V, full + ((size_t)b * FT + pos - 1) * V, (size_t)V * 4);
        char what[64];
        snprintf(what, sizeof what, "cached logits at position %d", pos - 1);
        check_close(what, got, want, (size_t)FB * V, TOL, 1e-2);
    }
    free(full), free(got), free(want);
    o->free(o, od);
    model_infer_scratch_free(&m, &s);
    for (int l = 0; l < L; l++) o->free(o, kc[l]), o->free(o, vc[l]);
    model_destroy(&m);
}

/* A few full training steps (tinylm train's loop: forward, backward,
 * global norm, clipped AdamW) on the GPU and on the fast CPU backend from
 * the same random initialisation: the same losses and norms. */
static void test_train_steps(void **state) {
    (void)state;
    NEED_GPU();
    fx_open();
    tlm_ops *cpu = cpu_ops_create(2);
    assert_non_null(cpu);
    tlm_ops *be[2] = {g_gpu, cpu};
    const int steps = 4;
    float loss[2][4];
    double norm[2][4];
    float *params[2];
    for (int k = 0; k < 2; k++) {
        tlm_model m;
        tlm_adamw a;
        assert_int_equal(model_create(&m, &g_fx.cfg, be[k]), 0);
        model_init_random(&m, 7);
        assert_int_equal(model_alloc_train(&m, FB, FT), 0);
        assert_int_equal(adamw_create(&a, be[k], m.nparams), 0);
        for (int s = 0; s < steps; s++) {
            model_zero_grad(&m);
            loss[k][s] = model_forward_backward(&m, g_fx.inputs, g_fx.targets, FB, FT, 1.0f / (FB * FT), 0);
            norm[k][s] = adamw_grad_norm(&a, &m);
            adamw_update(&a, &m, 3e-3, 0.1, 0.05, s + 1); /* clip 0.05: clipping active */
        }
        params[k] = down(be[k], m.params, m.nparams);
        adamw_destroy(&a, be[k]);
        model_destroy(&m);
    }
    for (int s = 0; s < steps; s++) {
        char what[64];
        snprintf(what, sizeof what, "train step %d loss", s + 1);
        check_close(what, &loss[0][s], &loss[1][s], 1, TOL, 0);
        float a = (float)norm[0][s], b = (float)norm[1][s];
        snprintf(what, sizeof what, "train step %d grad norm", s + 1);
        check_close(what, &a, &b, 1, TOL, 0);
    }
    tlm_model shape;
    assert_int_equal(model_create(&shape, &g_fx.cfg, g_ref), 0);
    check_close_out("params after training", params[0], params[1], shape.nparams, TOL, shape.nparams / 1000,
                    0.05 * 3e-3 * steps);
    model_destroy(&shape);
    free(params[0]), free(params[1]);
    cpu->destroy(cpu);
}


/* ---- generation block: packed weights, attn_decode -------------------------------------------- */

/* y = op(x) on o: pack w, one matmul_packed (y pre-filled with y0). */
static float *run_packed(tlm_ops *o, const float *x, int M, const float *w, int N, int K, int dtype, int kind,
                         const float *nw, int accumulate, const float *y0) {
    int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N;
    float *dx = up(o, x, (size_t)M * K * 4), *dw = up(o, w, (size_t)N * K * 4);
    float *dn = nw ? up(o, nw, (size_t)K * 4) : NULL, *dy = up(o, y0, (size_t)M * nout * 4);
    tlm_packed *p = o->pack(o, dw, N, K, dtype, kind);
    if (!p) fail_msg("pack on %s: %s", o->name, tlm_last_error());
    o->matmul_packed(o, dy, dx, M, p, dn, 1e-5f, accumulate);
    float *y = down(o, dy, (size_t)M * nout);
    o->pack_free(o, p);
    o->free(o, dx), o->free(o, dw), o->free(o, dy);
    if (dn) o->free(o, dn);
    return y;
}

static void test_packed(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->pack || !g_ref->pack) skip();
    assert_true(g_gpu->pack_dtype_fast == TLM_PACK_F32 || g_gpu->pack_dtype_fast == TLM_PACK_BF16);
    /* the last two: several 64-row tiles and column blocks; edges not a
     * multiple of 8 or 16 (K 150, F 100), then multiples of 8 (16-byte
     * chunk loads of bf16) with partial tiles (N 208, F 104) */
    const int shapes[][3] = {{1, 40, 64},    {37, 70, 200},   {5, 64, 300}, {20, 2 * 88, 129},
                             {70, 200, 150}, {70, 208, 160}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int dt = TLM_PACK_F32; dt <= TLM_PACK_BF16; dt++)
            for (int kind = 0; kind < 2; kind++)
                for (int norm = 0; norm < 2; norm++) {
                    const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                    const int nout = kind == TLM_PACK_SWIGLU ? N / 2 : N, acc = kind == TLM_PACK_LINEAR && !norm;
                    float *x = hrand((size_t)M * K, 1.0f), *w = hrand((size_t)N * K, 0.1f), *nw = hrand((size_t)K, 1.0f);
                    float *y0 = hrand((size_t)M * nout, 1.0f);
                    float *yg = run_packed(g_gpu, x, M, w, N, K, dt, kind, norm ? nw : NULL, acc, y0);
                    float *yr = run_packed(g_ref, x, M, w, N, K, dt, kind, norm ? nw : NULL, acc, y0);
                    char what[96];
                    snprintf(what, sizeof what, "matmul_packed M%d N%d K%d dtype %d kind %d norm %d", M, N, K, dt, kind,
                             norm);
                    /* the same bf16 inputs and weights on both sides: only the
                     * order of the fp32 sums differs */
                    check_close(what, yg, yr, (size_t)M * nout, TOL, 1e-2);
                    /* a row's result does not depend on the other rows */
                    float *y1 = run_packed(g_gpu, x + (size_t)(M - 1) * K, 1, w, N, K, dt, kind, norm ? nw : NULL, acc,
                                           y0 + (size_t)(M - 1) * nout);
                    if (memcmp(y1, yg + (size_t)(M - 1) * nout, (size_t)nout * sizeof(float)))
                        fail_msg("%s: the last row alone differs from the same row in the batch", what);
                    free(x), free(w), free(nw), free(y0), free(yg), free(yr), free(y1);
                }
    assert_null(g_gpu->pack(g_gpu, NULL, 3, 4, TLM_PACK_F32, TLM_PACK_SWIGLU)); /* odd N for SWIGLU */
    assert_non_null(strstr(tlm_last_error(), "pack"));
}

static float kv_value(const void *c, size_t i, int kvt) {
    if (kvt == TLM_KV_F32) return ((const float *)c)[i];
    uint16_t h = ((const uint16_t *)c)[i];
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1.0 + m / 1024.0, e - 15);
    return (float)((h & 0x8000) ? -v : v);
}

static void decode_case(int kvt, int B, int H, int hd, int P, int steps) {
    const int D = H * hd, Tmax = P + steps;
    const size_t es = kvt == TLM_KV_F16 ? 2 : 4, nc = (size_t)B * Tmax * D;
    float *pre = hrand((size_t)B * P * 3 * D, 1.5f), *dec = hrand((size_t)steps * B * 3 * D, 1.5f);
    float *res[2][3];
    void *caches[2];
    tlm_ops *be[2] = {g_gpu, g_ref};
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        void *kc = up(o, NULL, nc * es), *vc = up(o, NULL, nc * es);
        float *qp = up(o, pre, (size_t)B * P * 3 * D * 4), *op = up(o, NULL, (size_t)B * P * D * 4);
        float *qd = up(o, NULL, (size_t)B * 3 * D * 4), *od = up(o, NULL, (size_t)steps * B * D * 4);
        o->attn_decode(o, op, qp, kc, vc, kvt, NULL, NULL, 0, B, P, Tmax, H, hd, 0, NULL, 10000.0f);
        for (int s = 0; s < steps; s++) {
            o->copy_h2d(o, qd, dec + (size_t)s * B * 3 * D, (size_t)B * 3 * D * 4);
            o->attn_decode(o, od + (size_t)s * B * D, qd, kc, vc, kvt, NULL, NULL, 0, B, 1, Tmax, H, hd, P + s, NULL,
                10000.0f);
        }
        res[k][0] = down(o, op, (size_t)B * P * D);
        res[k][1] = down(o, od, (size_t)steps * B * D);
        res[k][2] = down(o, qp, (size_t)B * P * 3 * D); /* rotated in place */
        caches[k] = malloc(nc * es);
        o->copy_d2h(o, caches[k], kc, nc * es);
        o->free(o, kc), o->free(o, vc), o->free(o, qp), o->free(o, op), o->free(o, qd), o->free(o, od);
    }
    char what[96];
    snprintf(what, sizeof what, "attn_decode kv %d B%d H%d hd%d prompt", kvt, B, H, hd);
    check_close(what, res[0][0], res[1][0], (size_t)B * P * D, kvt == TLM_KV_F16 ? 2e-3 : TOL, 1e-2);
    snprintf(what, sizeof what, "attn_decode kv %d B%d H%d hd%d steps", kvt, B, H, hd);
    check_close(what, res[0][1], res[1][1], (size_t)steps * B * D, kvt == TLM_KV_F16 ? 2e-3 : TOL, 1e-2);
    check_close("attn_decode rotated qkv", res[0][2], res[1][2], (size_t)B * P * 3 * D, TOL, 1e-3);
    /* rotated keys agree to ~1e-7 (the reference rotates in double), so a
     * half can be one step apart; position 0 is not rotated: bit-exact */
    for (size_t i = 0; i < nc; i++) {
        float a = kv_value(caches[0], i, kvt), b = kv_value(caches[1], i, kvt);
        double tol = kvt == TLM_KV_F16 ? 1e-3 * fmax(fabs(b), 1e-2) : 1e-5 * fmax(fabs(b), 1.0);
        if (!(fabs(a - b) <= tol)) fail_msg("attn_decode cache element %zu: %g vs %g", i, a, b);
    }
    for (int b = 0; b < B; b++) /* position 0 of every (sequence, head) */
        for (int h = 0; h < H; h++) {
            size_t at = ((size_t)b * H + h) * Tmax * hd;
            if (memcmp((char *)caches[0] + at * es, (char *)caches[1] + at * es, (size_t)hd * es))
                fail_msg("attn_decode kv %d: position 0 of b %d h %d is not stored exactly", kvt, b, h);
        }
    for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]), free(res[k][2]), free(caches[k]);
    free(pre), free(dec);
}

/* The shared-prefix form (one prompt, B samples): the prompt into [H,P,hd]
 * caches as one sequence, then `steps` decode steps of B sequences over
 * it, on both backends. */
static void decode_case_shared(int kvt, int B, int H, int hd, int P, int steps) {
    const int D = H * hd;
    const size_t es = kvt == TLM_KV_F16 ? 2 : 4, np = (size_t)P * D, nc = (size_t)B * steps * D;
    float *pre = hrand((size_t)P * 3 * D, 1.5f), *dec = hrand((size_t)steps * B * 3 * D, 1.5f);
    float *res[2];
    void *own[2];
    tlm_ops *be[2] = {g_gpu, g_ref};
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        void *kp = up(o, NULL, np * es), *vp = up(o, NULL, np * es), *kc = up(o, NULL, nc * es),
             *vc = up(o, NULL, nc * es);
        float *qp = up(o, pre, (size_t)P * 3 * D * 4), *op = up(o, NULL, (size_t)P * D * 4);
        float *qd = up(o, NULL, (size_t)B * 3 * D * 4), *od = up(o, NULL, (size_t)steps * B * D * 4);
        o->attn_decode(o, op, qp, kp, vp, kvt, NULL, NULL, 0, 1, P, P, H, hd, 0, NULL, 10000.0f);
        for (int s = 0; s < steps; s++) {
            o->copy_h2d(o, qd, dec + (size_t)s * B * 3 * D, (size_t)B * 3 * D * 4);
            o->attn_decode(o, od + (size_t)s * B * D, qd, kc, vc, kvt, kp, vp, P, B, 1, steps, H, hd, P + s, NULL,
                10000.0f);
        }
        res[k] = down(o, od, (size_t)steps * B * D);
        own[k] = malloc(nc * es);
        o->copy_d2h(o, own[k], vc, nc * es); /* v is not rotated: identical on both */
        o->free(o, kp), o->free(o, vp), o->free(o, kc), o->free(o, vc);
        o->free(o, qp), o->free(o, op), o->free(o, qd), o->free(o, od);
    }
    char what[96];
    snprintf(what, sizeof what, "attn_decode shared prefix kv %d B%d H%d hd%d P%d", kvt, B, H, hd, P);
    check_close(what, res[0], res[1], (size_t)steps * B * D, kvt == TLM_KV_F16 ? 2e-3 : TOL, 1e-2);
    if (memcmp(own[0], own[1], nc * es)) fail_msg("%s: the sequences' own v rows differ", what);
    for (int k = 0; k < 2; k++) free(res[k]), free(own[k]);
    free(pre), free(dec);
}

static void test_attn_decode(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->attn_decode || !g_ref->attn_decode) skip();
    for (int kvt = TLM_KV_F32; kvt <= TLM_KV_F16; kvt++) {
        decode_case(kvt, 3, 2, 32, 20, 4);
        decode_case(kvt, 2, 4, 16, 7, 3);
        decode_case(kvt, 1, 2, 64, 40, 2);
        decode_case(kvt, 2, 1, 128, 5, 2);
        decode_case_shared(kvt, 4, 2, 32, 20, 3);
        decode_case_shared(kvt, 3, 3, 24, 33, 2);
    }
    /* fp16 rounding of special values: ties to even, saturation, subnormals */
    const float vals[] = {1.0f + 0x1p-11f, 1.0f + 0x1p-10f + 0x1p-11f, 65504.0f, 65519.0f, 70000.0f, -1e9f,
                          0x1p-24f,        0x1p-25f,                   3e-6f,    -0x1p-14f, 0.0f,     -0.0f};
    const int n = sizeof vals / sizeof vals[0], H = 1, hd = n, D = H * hd;
    float qkv[3 * sizeof vals / sizeof vals[0]];
    for (int d = 0; d < n; d++) qkv[d] = 0, qkv[D + d] = vals[d], qkv[2 * D + d] = vals[n - 1 - d];
    uint16_t got[2][2][sizeof vals / sizeof vals[0]];
    tlm_ops *be[2] = {g_gpu, g_ref};
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        float *dq = up(o, qkv, sizeof qkv), *out = up(o, NULL, (size_t)D * 4);
        void *kc = up(o, NULL, sizeof got[0][0]), *vc = up(o, NULL, sizeof got[0][0]);
        o->attn_decode(o, out, dq, kc, vc, TLM_KV_F16, NULL, NULL, 0, 1, 1, 1, H, hd, 0, NULL, 10000.0f);
        o->copy_d2h(o, got[k][0], kc, sizeof got[0][0]);
        o->copy_d2h(o, got[k][1], vc, sizeof got[0][0]);
        o->free(o, dq), o->free(o, out), o->free(o, kc), o->free(o, vc);
    }
    for (int d = 0; d < n; d++)
        if (got[0][0][d] != got[1][0][d] || got[0][1][d] != got[1][1][d])
            fail_msg("fp16 of %g: 0x%04x, reference 0x%04x", (double)vals[d], got[0][0][d], got[1][0][d]);
}

/* The packed generation path of the model against the unpacked one. */
static void test_model_packed(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->pack) skip();
    tlm_ops *o = g_gpu;
    tlm_model m;
    fx_model(&m, o);
    const int V = g_fx.cfg.vocab, D = g_fx.cfg.dim, L = g_fx.cfg.layers, H = g_fx.cfg.heads, hd = D / H;
    for (int dt = TLM_GEN_F32; dt <= TLM_GEN_BF16; dt++) {
        tlm_infer_weights w;
        if (model_infer_pack(&m, &w, dt)) fail_msg("model_infer_pack: %s", tlm_last_error());
        const int kvt = model_infer_kv_dtype(&w);
        const size_t es = kvt == TLM_KV_F16 ? 2 : 4;
        float *kp[2], *vp[2], *kr[2], *vr[2];
        for (int l = 0; l < L; l++) {
            kp[l] = up(o, NULL, (size_t)FB * H * FT * hd * es);
            vp[l] = up(o, NULL, (size_t)FB * H * FT * hd * es);
            kr[l] = up(o, NULL, (size_t)FB * FT * D * 4);
            vr[l] = up(o, NULL, (size_t)FB * FT * D * 4);
        }
        tlm_infer_scratch s;
        assert_int_equal(model_infer_scratch_alloc(&m, &s, FB, 12), 0);
        float *od = up(o, NULL, (size_t)FB * V * 4);
        int32_t chunk[FB * FT];
        for (int pos = 0; pos < FT;) {
            int T = pos == 0 ? 12 : 1;
            for (int b = 0; b < FB; b++)
                for (int t = 0; t < T; t++) chunk[b * T + t] = g_fx.inputs[b * FT + pos + t];
            assert_int_equal(model_forward_packed(&m, &w, &s, kp, vp, FT, NULL, chunk, FB, T, pos, od), 0);
            float *got = down(o, od, (size_t)FB * V);
            assert_int_equal(model_forward_cached(&m, &s, kr, vr, FT, chunk, FB, T, pos, od), 0);
            float *want = down(o, od, (size_t)FB * V);
            char what[64];
            snprintf(what, sizeof what, "packed %s logits at position %d", model_infer_dtype_name(dt), pos + T - 1);
            /* bf16: inputs and weights rounded to 8 bits (0.4%), fp16 keys */
            check_close(what, got, want, (size_t)FB * V, dt == TLM_GEN_BF16 ? 3e-2 : TOL, dt == TLM_GEN_BF16 ? 1.0 : 1e-2);
            free(got), free(want);
            pos += T;
        }
        o->free(o, od);
        model_infer_scratch_free(&m, &s);
        for (int l = 0; l < L; l++) o->free(o, kp[l]), o->free(o, vp[l]), o->free(o, kr[l]), o->free(o, vr[l]);
        model_infer_unpack(&m, &w);
    }
    model_destroy(&m);
}

/* ---- bf16 matrix products ------------------------------------------------------------------ */

/* Bounds: bf16 keeps 8 significant bits, so each operand is off by at most
 * 2^-9 relative and each product term by ~2^-8; over K random-sign terms
 * the error of a dot product grows like sqrt(K) * 2^-8 * |term| while the
 * result grows like sqrt(K) * |term|, i.e. ~0.4% of the typical |C|: 2% of
 * the largest |C| leaves a wide margin without admitting a wrong product.
 * For the model: the loss moves by ~1e-3 relative (measured on CPU with
 * bf16-rounded operands); 1e-2 is the bound, and gradients must point the
 * same way (cosine > 0.99 per tensor). */
/* A reduced-precision mode (dtype "bf16" or "tf32") against the fp32
 * fixture: products within mm_tol of the largest |C|, the fixture loss
 * within loss_tol relative, every parameter gradient with cosine > cos_min. */
static void check_precision_mode(const char *dtype, double mm_tol, double loss_tol, double cos_min) {
    create_ex_fn cx = g_mod ? (create_ex_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create_ex") : NULL;
    if (!cx) skip();
    char note[512];
    tlm_ops *o = cx(0, dtype, note, sizeof note);
    if (!o) fail_msg("%s backend: %s", dtype, note);
    assert_non_null(strstr(note, dtype));
    check_matmul(o, mm_tol, 1.0);

    fx_open();
    tlm_model m;
    fx_model(&m, o);
    float want_loss;
    assert_int_equal(safetensors_read_f32(g_fx.f, "loss", &want_loss, 1), 0);
    model_zero_grad(&m);
    float loss = model_forward_backward(&m, g_fx.inputs, g_fx.targets, FB, FT, 1.0f / (float)g_fx.nvalid, 0);
    char what[64];
    snprintf(what, sizeof what, "%s fixture loss", dtype);
    check_close(what, &loss, &want_loss, 1, loss_tol, 0);
    float *grads = down(o, m.grads, m.nparams);
    for (int i = 0; i < m.ntensors; i++) {
        const tlm_tensor *t = &m.tensors[i];
        char name[160];
        snprintf(name, sizeof name, "grad.%s", t->name);
        float *r = fixture_read(&g_fx, name, tsize(t));
        double dot = 0, na = 0, nb = 0;
        for (size_t j = 0; j < tsize(t); j++) {
            dot += (double)grads[t->offset + j] * r[j];
            na += (double)grads[t->offset + j] * grads[t->offset + j];
            nb += (double)r[j] * r[j];
        }
        double cosv = dot / sqrt(na * nb + 1e-300);
        if (getenv("TLM_TEST_VERBOSE")) printf("  %s %-44s cosine %.6f\n", dtype, name, cosv);
        if (!(cosv > cos_min)) fail_msg("%s %s: cosine %.6f with the fp32 reference", dtype, name, cosv);
        free(r);
    }
    free(grads);
    model_destroy(&m);
    o->destroy(o);
}

static void test_bf16(void **state) {
    (void)state;
    NEED_GPU();
    check_precision_mode("bf16", 2e-2, 1e-2, 0.99);
}

/* ---- bf16 activations (ops.h act_dtype) ---------------------------------------------------- */

/* fp32 -> bf16 bits, round to nearest even; and back (exact). */
static uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf16_val(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* Random values that bf16 holds exactly: both backends then start from the
 * same inputs, and only what an op rounds itself is compared. */
static float *hrand16(size_t n, float scale) {
    float *p = hrand(n, scale);
    for (size_t i = 0; i < n; i++) p[i] = bf16_val(bf16_bits(p[i]));
    return p;
}
/* n activations of backend o from / to host floats (bf16 on a bf16 backend) */
static void *up_act(tlm_ops *o, const float *h, size_t n) {
    if (o->act_dtype != TLM_ACT_BF16) return up(o, h, n * 4);
    uint16_t *b = calloc(n ? n : 1, 2);
    assert_non_null(b);
    for (size_t i = 0; h && i < n; i++) b[i] = bf16_bits(h[i]);
    void *d = up(o, b, n * 2);
    free(b);
    return d;
}
static float *down_act(tlm_ops *o, const void *d, size_t n) {
    if (o->act_dtype != TLM_ACT_BF16) return down(o, d, n);
    uint16_t *b = calloc(n ? n : 1, 2);
    float *f = malloc(sizeof(float) * (n ? n : 1));
    assert_non_null(b);
    assert_non_null(f);
    if (n) o->copy_d2h(o, b, d, n * 2);
    for (size_t i = 0; i < n; i++) f[i] = bf16_val(b[i]);
    free(b);
    return f;
}

/* Bound for an activation an op wrote in bf16 from inputs both sides share
 * exactly: bf16 keeps 8 significant bits, so rounding to nearest is off by
 * at most 2^-8 = 3.9e-3 of the value (at the bottom of a binade), plus the
 * fp32 differences the fp32 tests bound by TOL; 4.5e-3 admits that and
 * nothing coarser (a truncating store errs by up to 2^-7 = 7.8e-3). Floors
 * as in the fp32 tests of the same ops. */
#define ACT16_TOL 4.5e-3

static tlm_ops *bf16_backend(void) {
    create_ex_fn cx = g_mod ? (create_ex_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create_ex") : NULL;
    if (!cx) return NULL;
    char note[512];
    tlm_ops *o = cx(0, "bf16", note, sizeof note);
    if (!o) fail_msg("bf16 backend: %s", note);
    return o;
}

/* One matmul_ex on o and on the CPU reference from the same host operands
 * (bf16 operands bf16-exact); C starts as c0. */
static void mm_ex_case(tlm_ops *o16, int ta, int tb, int M, int N, int K, int adt, int bdt, int cdt, float beta,
                       double tol, double floor_frac) {
    const int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
    float *a = adt == TLM_ACT_BF16 ? hrand16((size_t)ar * ac, 1.0f) : hrand((size_t)ar * ac, 1.0f);
    float *b = bdt == TLM_ACT_BF16 ? hrand16((size_t)br * bc, 1.0f) : hrand((size_t)br * bc, 1.0f);
    float *c0 = cdt == TLM_ACT_BF16 ? hrand16((size_t)M * N, 1.0f) : hrand((size_t)M * N, 1.0f);
    float *res[2];
    tlm_ops *be[2] = {o16, g_ref};
    for (int k = 0; k < 2; k++) {
        tlm_ops *o = be[k];
        /* on the reference every operand is fp32 (act_dtype F32) */
        int at = k ? TLM_ACT_F32 : adt, bt = k ? TLM_ACT_F32 : bdt, ct = k ? TLM_ACT_F32 : cdt;
        void *da = at == TLM_ACT_BF16 ? up_act(o, a, (size_t)ar * ac) : up(o, a, (size_t)ar * ac * 4);
        void *db = bt == TLM_ACT_BF16 ? up_act(o, b, (size_t)br * bc) : up(o, b, (size_t)br * bc * 4);
        void *dc = ct == TLM_ACT_BF16 ? up_act(o, c0, (size_t)M * N) : up(o, c0, (size_t)M * N * 4);
        o->matmul_ex(o, ta, tb, M, N, K, 0.75f, da, at, ac, db, bt, bc, beta, dc, ct, N);
        res[k] = ct == TLM_ACT_BF16 ? down_act(o, dc, (size_t)M * N) : down(o, dc, (size_t)M * N);
        o->free(o, da), o->free(o, db), o->free(o, dc);
    }
    char what[128];
    snprintf(what, sizeof what, "matmul_ex %s%s %dx%dx%d types %d,%d->%d beta %g", ta ? "T" : "N", tb ? "T" : "N", M,
             N, K, adt, bdt, cdt, beta);
    check_close(what, res[0], res[1], (size_t)M * N, tol, floor_frac);
    free(res[0]), free(res[1]), free(a), free(b), free(c0);
}

/* Every op that reads or writes activations, on the bf16 backend against
 * the fp32 CPU reference. */
static void test_bf16_acts(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o16 = bf16_backend();
    if (!o16) skip();
    /* only the bf16 mode narrows activations: fp32 (and tf32) keep F32 so
     * they still match the CPU at TOL */
    assert_int_equal(o16->act_dtype, TLM_ACT_BF16);
    assert_int_equal(g_gpu->act_dtype, TLM_ACT_F32);
    assert_int_equal(g_ref->act_dtype, TLM_ACT_F32);
    tlm_ops *be[2] = {o16, g_ref};
    const int F32 = TLM_ACT_F32, BF = TLM_ACT_BF16;

    {   /* to_act rounds to nearest even, exactly as the host does; only the
         * bf16 mode has one (fp32 activations need no conversion) */
        assert_null(g_gpu->to_act);
        assert_null(g_ref->to_act);
        assert_non_null(o16->to_act);
        const size_t n = 2 * 4096 + 77; /* whole rows and a tail */
        float *x = hrand(n, 3.0f);
        x[0] = 1.0f + 1.0f / 256.0f; /* a tie: rounds to the even 1.0 */
        x[1] = 1.0f + 3.0f / 256.0f; /* a tie: rounds up to the even 1 + 2^-6 */
        float *dx = up(o16, x, n * 4);
        void *d16 = up_act(o16, NULL, n);
        o16->to_act(o16, d16, dx, n);
        float *got = down_act(o16, d16, n);
        for (size_t i = 0; i < n; i++)
            if (got[i] != bf16_val(bf16_bits(x[i])))
                fail_msg("to_act element %zu: %.9g, want %.9g", i, (double)got[i], (double)bf16_val(bf16_bits(x[i])));
        assert_true(got[0] == 1.0f && got[1] == 1.0f + 1.0f / 64.0f);
        o16->free(o16, dx), o16->free(o16, d16);
        free(x), free(got);
    }

    /* products: all-bf16 operands are exact products with fp32 sums, so only
     * the bf16 store of C is measured (ACT16_TOL); an fp32 operand (weight,
     * residual gradient) is rounded to bf16 first: test_bf16's 2% of the
     * largest |C| */
    mm_ex_case(o16, 0, 1, 37, 45, 70, BF, BF, BF, 0.0f, ACT16_TOL, 1e-3);
    mm_ex_case(o16, 0, 0, 29, 33, 64, BF, BF, BF, 0.5f, ACT16_TOL, 1e-3); /* beta reads a bf16 C */
    mm_ex_case(o16, 1, 0, 21, 40, 50, BF, BF, F32, 1.0f, TOL, 1e-3);
    mm_ex_case(o16, 0, 1, 37, 45, 70, BF, F32, BF, 0.0f, 2e-2, 1.0);   /* forward: x @ W^T */
    mm_ex_case(o16, 0, 1, 37, 45, 70, BF, F32, F32, 1.0f, 2e-2, 1.0);  /* into the residual */
    mm_ex_case(o16, 0, 0, 30, 50, 40, F32, F32, BF, 0.0f, 2e-2, 1.0);  /* dx = dy_resid @ W */
    mm_ex_case(o16, 1, 0, 40, 50, 30, F32, BF, F32, 1.0f, 2e-2, 1.0);  /* dW += dy_resid^T @ x */
    mm_ex_case(o16, 0, 0, 9, 11, 0, BF, BF, BF, 0.5f, ACT16_TOL, 1e-3); /* K = 0: C = beta C */

    {   /* RMSNorm: out is an activation, dout one; x, dx, rstd, dw fp32 */
        const int N = 37, D = 96;
        size_t n = (size_t)N * D;
        float *x = hrand(n, 1.5f), *w = hrand((size_t)D, 1.0f), *g = hrand16(n, 1.0f);
        float *res[2][4];
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            float *dx_ = up(o, x, n * 4), *dw_ = up(o, w, (size_t)D * 4), *ddw = up(o, NULL, (size_t)D * 4);
            float *rstd = up(o, NULL, (size_t)N * 4), *dxo = up(o, NULL, n * 4);
            void *out = up_act(o, NULL, n), *dg = up_act(o, g, n);
            o->rmsnorm_fwd(o, out, rstd, dx_, dw_, N, D, 1e-5f);
            o->rmsnorm_bwd(o, dxo, ddw, dg, dx_, dw_, rstd, N, D);
            res[k][0] = down_act(o, out, n);
            res[k][1] = down(o, rstd, (size_t)N);
            res[k][2] = down(o, dxo, n);
            res[k][3] = down(o, ddw, (size_t)D);
            o->free(o, dx_), o->free(o, dw_), o->free(o, ddw), o->free(o, rstd), o->free(o, dxo);
            o->free(o, out), o->free(o, dg);
        }
        check_close("bf16 rmsnorm_fwd out", res[0][0], res[1][0], n, ACT16_TOL, 1e-3);
        check_close("bf16 rmsnorm rstd", res[0][1], res[1][1], (size_t)N, TOL, 1e-3);
        check_close("bf16 rmsnorm_bwd dx", res[0][2], res[1][2], n, TOL, 1e-2);
        check_close("bf16 rmsnorm_bwd dw", res[0][3], res[1][3], (size_t)D, TOL, 1e-2);
        for (int k = 0; k < 2; k++)
            for (int j = 0; j < 4; j++) free(res[k][j]);
        free(x), free(w), free(g);
    }
    {   /* RoPE in place; v untouched bit for bit */
        const int B = 2, T = 9, H = 3, hd = 32, D = H * hd;
        size_t n = (size_t)B * T * 3 * D;
        float *x = hrand16(n, 1.0f), *res[2][2];
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            void *d1 = up_act(o, x, n), *d2 = up_act(o, x, n);
            o->rope_fwd(o, d1, B, T, H, hd, 13, 10000.0f);
            o->rope_bwd(o, d2, B, T, H, hd, 13, 10000.0f);
            res[k][0] = down_act(o, d1, n);
            res[k][1] = down_act(o, d2, n);
            o->free(o, d1), o->free(o, d2);
        }
        check_close("bf16 rope_fwd", res[0][0], res[1][0], n, ACT16_TOL, 1e-3);
        check_close("bf16 rope_bwd", res[0][1], res[1][1], n, ACT16_TOL, 1e-3);
        for (int r = 0; r < B * T; r++)
            assert_memory_equal(res[0][0] + (size_t)r * 3 * D + 2 * D, x + (size_t)r * 3 * D + 2 * D,
                                (size_t)D * sizeof(float));
        for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]);
        free(x);
    }
    {   /* SwiGLU */
        const int N = 37, F = 91;
        size_t n = (size_t)N * F;
        float *gu = hrand16(2 * n, 2.0f), *da = hrand16(n, 1.0f), *res[2][2];
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            void *dgu = up_act(o, gu, 2 * n), *dda = up_act(o, da, n), *a = up_act(o, NULL, n);
            void *dg = up_act(o, NULL, 2 * n);
            o->swiglu_fwd(o, a, dgu, N, F);
            o->swiglu_bwd(o, dg, dda, dgu, N, F);
            res[k][0] = down_act(o, a, n);
            res[k][1] = down_act(o, dg, 2 * n);
            o->free(o, dgu), o->free(o, dda), o->free(o, a), o->free(o, dg);
        }
        check_close("bf16 swiglu_fwd", res[0][0], res[1][0], n, ACT16_TOL, 1e-3);
        check_close("bf16 swiglu_bwd", res[0][1], res[1][1], 2 * n, ACT16_TOL, 1e-3);
        for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]);
        free(gu), free(da);
    }
    {   /* cross-entropy: the loss is fp32 from the bf16 logits (TOL); dlogits rounded */
        const int N = 50, V = 300;
        size_t n = (size_t)N * V;
        float *x = hrand16(n, 3.0f);
        int32_t *tg = malloc((size_t)N * sizeof(int32_t));
        for (int i = 0; i < N; i++) tg[i] = (int32_t)tlm_rng_below(&g_rng, (uint64_t)V);
        tg[1] = -1;
        float *res[2][2];
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            void *dx = up_act(o, x, n);
            float *dl = up(o, NULL, (size_t)N * 4);
            int32_t *dt = up(o, tg, (size_t)N * 4);
            o->xent(o, dx, dl, dt, N, V, 1.0f / 37.0f, 1);
            res[k][0] = down(o, dl, (size_t)N);
            res[k][1] = down_act(o, dx, n);
            o->free(o, dx), o->free(o, dl), o->free(o, dt);
        }
        check_close("bf16 xent losses", res[0][0], res[1][0], (size_t)N, TOL, 1e-3);
        check_close("bf16 xent dlogits", res[0][1], res[1][1], n, ACT16_TOL, 1e-3);
        for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]);
        free(x), free(tg);
    }
    /* attention with the fp32-core kernels, every head-size class (hd not a
     * multiple of 16: the tensor-core kernels, which take the rest, are
     * test_attn_tc's): out rounded once; backward from the GPU's own (bf16)
     * out on both sides, so Di = dout . out agrees */
    const int acases[][4] = {{2, 37, 3, 12}, {1, 70, 2, 24}, {2, 65, 2, 40}, {1, 33, 2, 72}};
    for (size_t ci = 0; ci < sizeof acases / sizeof acases[0]; ci++) {
        const int B = acases[ci][0], T = acases[ci][1], H = acases[ci][2], hd = acases[ci][3], D = H * hd;
        size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, nl = (size_t)B * H * T;
        float *qkv = hrand16(nq, 1.0f), *dout = hrand16(no, 1.0f), *out16 = NULL;
        float *res[2][3];
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            void *dq = up_act(o, qkv, nq), *dd = up_act(o, dout, no), *out = up_act(o, NULL, no);
            void *dqkv = up_act(o, NULL, nq);
            float *lse = up(o, NULL, nl * 4);
            o->attn_fwd(o, out, lse, dq, B, T, H, hd);
            res[k][0] = down_act(o, out, no);
            res[k][1] = down(o, lse, nl);
            if (k == 0) out16 = res[0][0];
            else o->copy_h2d(o, out, out16, no * 4);
            o->attn_bwd(o, dqkv, dd, out, lse, dq, B, T, H, hd);
            res[k][2] = down_act(o, dqkv, nq);
            o->free(o, dq), o->free(o, dd), o->free(o, out), o->free(o, lse), o->free(o, dqkv);
        }
        char what[96];
        snprintf(what, sizeof what, "bf16 attn_fwd out T%d hd%d", T, hd);
        check_close(what, res[0][0], res[1][0], no, ACT16_TOL, 1e-2);
        snprintf(what, sizeof what, "bf16 attn_fwd lse T%d hd%d", T, hd);
        check_close(what, res[0][1], res[1][1], nl, TOL, 1e-2);
        snprintf(what, sizeof what, "bf16 attn_bwd dqkv T%d hd%d", T, hd);
        check_close(what, res[0][2], res[1][2], nq, ACT16_TOL, 1e-2);
        for (int k = 0; k < 2; k++)
            for (int j = 0; j < 3; j++) free(res[k][j]);
        free(qkv), free(dout);
    }
    {   /* KV cache (fp32) from bf16 qkv: kv_store widens exactly */
        const int B = 2, H = 2, hd = 32, D = H * hd, Tmax = 24, P = 20;
        float *pre = hrand16((size_t)B * P * 3 * D, 1.0f), *res[2][2];
        size_t nc = (size_t)B * Tmax * D;
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            float *kc = up(o, NULL, nc * 4), *vc = up(o, NULL, nc * 4);
            void *qp = up_act(o, pre, (size_t)B * P * 3 * D), *op = up_act(o, NULL, (size_t)B * P * D);
            o->kv_store(o, kc, vc, qp, B, P, Tmax, D, 0);
            o->attn_cached(o, op, qp, kc, vc, B, P, Tmax, H, hd, 0);
            res[k][0] = down_act(o, op, (size_t)B * P * D);
            res[k][1] = down(o, kc, nc);
            o->free(o, kc), o->free(o, vc), o->free(o, qp), o->free(o, op);
        }
        check_close("bf16 attn_cached", res[0][0], res[1][0], (size_t)B * P * D, ACT16_TOL, 1e-2);
        assert_memory_equal(res[0][1], res[1][1], nc * sizeof(float));
        for (int k = 0; k < 2; k++) free(res[k][0]), free(res[k][1]);
        free(pre);
    }
    o16->destroy(o16);
}

/* The model on the bf16 backend against the fixture's fp32 logits: the
 * training forward (m.logits, bf16 here) and the unpacked generation path
 * (model_forward_cached: xn, qkv, att, gu, act in bf16, fp32 logits out),
 * prompt in chunks then single tokens. Every product and stored activation
 * rounds to bf16 (~0.4% each, test_bf16), compounding over the layers but
 * not growing systematically: 2e-2 of the largest |logit|, the bound of
 * test_bf16's products. */
static void test_bf16_model_paths(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o = bf16_backend();
    if (!o) skip();
    tlm_model m;
    fx_model(&m, o);
    const int V = g_fx.cfg.vocab, D = g_fx.cfg.dim, L = g_fx.cfg.layers, P = 20;
    const size_t NV = (size_t)FB * FT * V;
    float *ref = fixture_read(&g_fx, "logits", NV);
    model_forward_backward(&m, g_fx.inputs, g_fx.targets, FB, FT, 0.0f, 0);
    float *full = down_act(o, m.logits, NV);
    check_close("bf16 training-forward logits", full, ref, NV, 2e-2, 1.0);
    float *kc[2], *vc[2];
    for (int l = 0; l < L; l++) {
        kc[l] = up(o, NULL, (size_t)FB * FT * D * 4);
        vc[l] = up(o, NULL, (size_t)FB * FT * D * 4);
    }
    tlm_infer_scratch s;
    assert_int_equal(model_infer_scratch_alloc(&m, &s, FB, P), 0);
    float *od = up(o, NULL, (size_t)FB * V * 4), *got = malloc((size_t)FB * V * 4), *want = malloc((size_t)FB * V * 4);
    int32_t chunk[FB * FT];
    int pos = 0;
    while (pos < FT) {
        int T = pos == 0 ? 8 : pos < P ? P - pos : 1;
        for (int b = 0; b < FB; b++)
            for (int t = 0; t < T; t++) chunk[b * T + t] = g_fx.inputs[b * FT + pos + t];
        assert_int_equal(model_forward_cached(&m, &s, kc, vc, FT, chunk, FB, T, pos, od), 0);
        pos += T;
        o->copy_d2h(o, got, od, (size_t)FB * V * 4);
        for (int b = 0; b < FB; b++) memcpy(want + (size_t)b * V, ref + ((size_t)b * FT + pos - 1) * V, (size_t)V * 4);
        char what[64];
        snprintf(what, sizeof what, "bf16 cached logits at position %d", pos - 1);
        check_close(what, got, want, (size_t)FB * V, 2e-2, 1.0);
    }
    free(full), free(ref), free(got), free(want);
    o->free(o, od);
    model_infer_scratch_free(&m, &s);
    for (int l = 0; l < L; l++) o->free(o, kc[l]), o->free(o, vc[l]);
    model_destroy(&m);

    /* five clipped AdamW steps, as test_model_fixture: each step's loss
     * within test_bf16's 1e-2 of the fp32 run (the weights move by ~lr per
     * step, so the bf16 gradients' small differences cannot add up to more
     * in five steps), gradient norms within 2e-2 (a norm sums every
     * gradient's rounding; test_bf16 measures cosines with fp32 > 0.9999) */
    fx_model(&m, o);
    float wl[5], wn[5], losses[5], norms[5];
    fx_adamw_steps(o, &m, losses, norms, wl, wn);
    check_close("bf16 adamw losses", losses, wl, 5, 1e-2, 0);
    check_close("bf16 adamw grad norms", norms, wn, 5, 2e-2, 0);
    model_destroy(&m);
    o->destroy(o);
}

/* tf32: each operand read with 10 mantissa bits (relative error <= 2^-11,
 * a quarter of bf16's bound per operand before the sqrt(K) growth), so the
 * bf16 test's reasoning gives ~0.1% of the typical |C|: 5e-3 of the largest
 * is a wide margin; the fixture loss within 2e-3, gradients aligned with
 * cosine > 0.999. */
static void test_tf32(void **state) {
    (void)state;
    NEED_GPU();
    check_precision_mode("tf32", 5e-3, 2e-3, 0.999);
}

/* ---- attention on the tensor cores (bf16 mode) ---------------------------------------------- */

/* In bf16 mode attn_fwd/attn_bwd run on the tensor cores (cu_attn_tc.cu):
 * q, k, v, dout and the probability tiles P and dS are rounded to bf16
 * (relative error <= 2^-9 each), products and sums stay fp32. Expected
 * errors, for inputs ~N(0,1) and head size hd:
 *  - a score s = q.k/sqrt(hd) gets an absolute error of about
 *    2^-8 |s|-scale (two roundings per term, random signs, the sqrt(hd) of
 *    the sum cancels the scale): ~0.005 here, so each p moves by ~0.5%
 *    relative and lse by about the same absolute amount;
 *  - out = sum p v / l adds the roundings of v and P (2^-9 each): a few
 *    tenths of a percent of the typical |out|, random over elements;
 *  - the gradients compound one more rounded operand (dout, then dS) and
 *    the difference dP - Di, which cancels: ~1% of the typical value
 *    (dq and dk are held against at least max |dv|: see below).
 * So: max |error| <= 1.5% of max |reference| for out and 2.5% for each of
 * dq, dk, dv (the worst element of thousands, several sigma out; measured
 * on the emulator: 0.2-0.45%), cosine >= 0.9999 / 0.9995 (measured 1 -
 * cos <= 1e-5), and |lse error| <= 0.02 (measured <= 0.006). A wrong mask,
 * scale or a missing tile breaks these by far (one future key let in
 * moved out by 27% of max |out|, a skipped rescale by 57%). Keys ramped
 * up in size (kramp) make later scores exceed the early max by more than
 * 2^8 (log2 units) so the
 * kernel's lazy rescaling of its accumulators runs; their scores are up
 * to (1 + kramp) times larger and so are the absolute score errors, hence
 * the bounds grow by that factor. */
static void check_near(const char *what, const float *got, const float *want, size_t n, size_t stride, size_t off,
                       size_t len, double floor, double tol, double cmin) {
    double maxref = 0, maxerr = 0, dot = 0, ng = 0, nw = 0;
    size_t worst = 0, nan = 0;
    for (size_t i = 0; i < n; i++) {
        size_t c = i % stride;
        if (c < off || c >= off + len) continue;
        double g = got[i], w = want[i], e = fabs(g - w);
        if (isnan(e)) nan++;
        else if (e > maxerr) maxerr = e, worst = i;
        maxref = fmax(maxref, fabs(w));
        dot += g * w, ng += g * g, nw += w * w;
    }
    double rel = maxerr / fmax(fmax(maxref, floor), 1e-30), cosv = dot / sqrt(ng * nw + 1e-300);
    if (maxref < 1e-2 * floor) cosv = 1.0; /* a reference ~0 by cancellation (T = 1) has no direction to match */
    if (getenv("TLM_TEST_VERBOSE")) printf("  %-44s max err %.3g of max|ref|, cosine %.7f\n", what, rel, cosv);
    if (nan || !(rel <= tol) || !(cosv >= cmin))
        fail_msg("%s: max error %.3g of max|ref| %.3g (bound %.2g; worst at %zu: got %.6g want %.6g), cosine %.6f "
                 "(bound %.4f), %zu NaN",
                 what, rel, maxref, tol, worst, (double)got[worst], (double)want[worst], cosv, cmin, nan);
}

/* attn_fwd then attn_bwd on backend o; results downloaded */
static void tc_run(tlm_ops *o, const float *qkv, const float *dout, int B, int T, int H, int hd, float **out,
                   float **lse, float **dqkv) {
    const int D = H * hd;
    size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, nl = (size_t)B * H * T;
    /* activations in the backend's type (bf16 in the bf16 mode: inputs
     * rounded on upload, which the kernels would do anyway; outputs stored
     * rounded, 2^-9 relative, inside the bounds below) */
    void *dq = up_act(o, qkv, nq), *dd = up_act(o, dout, no), *dout_ = up_act(o, NULL, no);
    void *dg = up_act(o, NULL, nq);
    float *dl = up(o, NULL, nl * 4);
    o->attn_fwd(o, dout_, dl, dq, B, T, H, hd);
    o->attn_bwd(o, dg, dd, dout_, dl, dq, B, T, H, hd);
    *out = down_act(o, dout_, no);
    *lse = down(o, dl, nl);
    *dqkv = down_act(o, dg, nq);
    o->free(o, dq), o->free(o, dd), o->free(o, dout_), o->free(o, dl), o->free(o, dg);
    assert_int_equal(ops_status(o), 0);
}

static void attn_tc_case(tlm_ops *o, int B, int T, int H, int hd, float kramp) {
    const int D = H * hd;
    size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, nl = (size_t)B * H * T;
    float *qkv = hrand(nq, 1.0f), *dout = hrand(no, 1.0f);
    for (int bt = 0; bt < B * T; bt++)
        for (int d = 0; d < D; d++) qkv[(size_t)bt * 3 * D + D + d] *= 1.0f + kramp * (float)(bt % T) / (float)T;
    float *r[2][3];
    tc_run(o, qkv, dout, B, T, H, hd, &r[0][0], &r[0][1], &r[0][2]);
    tc_run(g_ref, qkv, dout, B, T, H, hd, &r[1][0], &r[1][1], &r[1][2]);
    const double grow = 1.0 + kramp;
    char what[96];
    snprintf(what, sizeof what, "tc attn out B%d T%d H%d hd%d ramp%g", B, T, H, hd, kramp);
    check_near(what, r[0][0], r[1][0], no, 1, 0, 1, 0, 1.5e-2 * grow, 1.0 - 1e-4 * grow);
    double lerr = 0;
    for (size_t i = 0; i < nl; i++) {
        double e = fabs((double)r[0][1][i] - r[1][1][i]);
        if (!(e <= lerr)) lerr = e; /* NaN sticks */
    }
    if (getenv("TLM_TEST_VERBOSE")) printf("  %-44s max abs err %.3g\n", "  lse", lerr);
    if (!(lerr <= 2e-2 * grow)) fail_msg("%s: lse max abs error %.3g (bound %.2g)", what, lerr, 2e-2 * grow);
    /* dq and dk are sums of p (dp - Di) terms where dp - Di cancels: with one
     * key (T = 1) they are exactly 0 while the rounding of dout and v leaves
     * errors of the size of dv's values (~|dout|) times 2^-8; so their
     * errors are measured against at least max |dv| */
    static const char *part[3] = {"dq", "dk", "dv"};
    double dvmax = 0;
    for (size_t i = 0; i < nq; i++)
        if (i % (3 * (size_t)D) >= 2 * (size_t)D) dvmax = fmax(dvmax, fabs(r[1][2][i]));
    for (int p = 0; p < 3; p++) {
        snprintf(what, sizeof what, "tc attn %s B%d T%d H%d hd%d ramp%g", part[p], B, T, H, hd, kramp);
        check_near(what, r[0][2], r[1][2], nq, (size_t)3 * D, (size_t)p * D, (size_t)D, p < 2 ? dvmax : 0,
                   2.5e-2 * grow, 1.0 - 5e-4 * grow);
    }
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 3; j++) free(r[k][j]);
    free(qkv), free(dout);
}

static void test_attn_tc(void **state) {
    (void)state;
    NEED_GPU();
    create_ex_fn cx = g_mod ? (create_ex_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create_ex") : NULL;
    if (!cx) skip();
    char note[512];
    tlm_ops *o = cx(0, "bf16", note, sizeof note);
    if (!o) fail_msg("bf16 backend: %s", note);

    /* each padded head class (16/32 -> 32, 48/64 -> 64, 128), T = 1, T
     * not a multiple of the 64-row blocks or of the 32/64-row streamed
     * tiles, several (sequence, head) pairs, and the rescaling path */
    attn_tc_case(o, 2, 37, 3, 32, 0.f);
    attn_tc_case(o, 1, 1, 2, 32, 0.f);
    attn_tc_case(o, 1, 70, 2, 64, 0.f);
    attn_tc_case(o, 2, 19, 1, 16, 0.f);
    attn_tc_case(o, 1, 33, 2, 48, 0.f);
    attn_tc_case(o, 1, 40, 1, 128, 0.f);
    attn_tc_case(o, 1, 150, 1, 32, 3.f);
    attn_tc_case(o, 2, 200, 2, 64, 3.f);
    attn_tc_case(o, 1, 256, 2, 128, 0.f);
    if (!g_emu) { /* training sizes: the seed model's and longer sequences */
        attn_tc_case(o, 4, 256, 8, 32, 0.f);
        attn_tc_case(o, 1, 1024, 2, 64, 0.f);
        attn_tc_case(o, 1, 2048, 2, 128, 0.f);
        attn_tc_case(o, 2, 300, 2, 96, 3.f);
    }

    /* head sizes the tensor-core kernels do not take run the fp32-core
     * kernels on bf16 activations: test_bf16_acts checks those */

    /* determinism (no atomics: same bits every run) and causality: keys and
     * values after t0 changed leave out, lse and dq of rows <= t0 bit for bit
     * (masked probabilities are exact zeros), while later rows do change */
    {
        const int B = 2, T = 90, H = 2, hd = 32, D = H * hd, t0 = 40;
        size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D;
        float *qkv = hrand(nq, 1.0f), *dout = hrand(no, 1.0f);
        float *a[3], *c[3], *f[3];
        tc_run(o, qkv, dout, B, T, H, hd, &a[0], &a[1], &a[2]);
        tc_run(o, qkv, dout, B, T, H, hd, &c[0], &c[1], &c[2]);
        assert_memory_equal(a[0], c[0], no * 4);
        assert_memory_equal(a[1], c[1], (size_t)B * H * T * 4);
        assert_memory_equal(a[2], c[2], nq * 4);
        for (int b = 0; b < B; b++)
            for (int t = t0 + 1; t < T; t++)
                for (int d = D; d < 3 * D; d++) qkv[((size_t)b * T + t) * 3 * D + d] = 3.0f * tlm_rng_normal(&g_rng);
        tc_run(o, qkv, dout, B, T, H, hd, &f[0], &f[1], &f[2]);
        int later = 0;
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                const size_t ro = ((size_t)b * T + t) * D, rq = ((size_t)b * T + t) * 3 * D;
                const int same = !memcmp(a[0] + ro, f[0] + ro, (size_t)D * 4) && !memcmp(a[2] + rq, f[2] + rq, (size_t)D * 4);
                if (t <= t0 && !same) fail_msg("causality: row %d of sequence %d changed with keys after %d", t, b, t0);
                later += t > t0 && !same;
            }
            for (int h = 0; h < H; h++)
                assert_memory_equal(a[1] + ((size_t)b * H + h) * T, f[1] + ((size_t)b * H + h) * T,
                                    (size_t)(t0 + 1) * 4);
        }
        assert_int_equal(later, B * (T - 1 - t0));
        for (int j = 0; j < 3; j++) free(a[j]), free(c[j]), free(f[j]);
        free(qkv), free(dout);
    }
    o->destroy(o);
}

/* ---- status, the batch loss, staged steps, the trainer's host waits ------------------------ */

/* (Included here, with the tests that need them, to keep the file's top as it is.) */
#include "io/fileio.h"
#include "text/tokenizer.h"

typedef void (*wait_counts_fn)(tlm_ops *o, long *stream_syncs, long *event_waits);

/* A device error surfaces through status(): -1 with one line naming the op
 * and what to do, and it stays failed. The CPU backends have no status:
 * they cannot fail after creation. */
static void test_status(void **state) {
    (void)state;
    assert_null(g_ref->status);
    assert_int_equal(ops_status(g_ref), 0);
    NEED_GPU();
    create_fn cr = g_mod ? (create_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create") : NULL;
    if (!cr) skip();
    char note[512];
    tlm_ops *o = cr(0, note, sizeof note); /* its own instance: failure is sticky */
    assert_non_null(o);
    assert_non_null(o->status);
    const int H = 1, hd = 256, Tmax = 4;
    float *qkv = up(o, NULL, 3 * (size_t)hd * 4), *out = up(o, NULL, (size_t)hd * 4);
    float *kc = up(o, NULL, (size_t)Tmax * hd * 4), *vc = up(o, NULL, (size_t)Tmax * hd * 4);
    assert_int_equal(o->status(o), 0);
    /* head size 256 > 128: attn_decode refuses it and marks the backend failed */
    o->attn_decode(o, out, qkv, kc, vc, TLM_KV_F32, NULL, NULL, 0, 1, 1, Tmax, H, hd, 0, NULL, 10000.0f);
    tlm_errorf("unrelated"); /* the message checked below must come from status */
    assert_int_equal(o->status(o), -1);
    const char *e = tlm_last_error();
    if (!strstr(e, "attn_decode") || !strstr(e, "head size 256") || !strstr(e, "--device cpu") || strchr(e, '\n'))
        fail_msg("status message: %s", e);
    /* sticky: later ops change nothing, status keeps the first message */
    o->zero(o, out, 4);
    tlm_errorf("unrelated");
    assert_int_equal(ops_status(o), -1);
    assert_non_null(strstr(tlm_last_error(), "attn_decode"));
    float h = 0;
    o->copy_d2h(o, &h, out, sizeof h);
    assert_true(isnan(h));
    o->free(o, qkv), o->free(o, out), o->free(o, kc), o->free(o, vc);
    o->destroy(o);
}

/* loss_mean: the mean over non-ignored rows, against cpu-ref (which sums as
 * the host once did); no valid row gives 0. */
static void test_loss_mean(void **state) {
    (void)state;
    NEED_GPU();
    const int Ns[] = {1, 7, 300, 5000};
    for (size_t s = 0; s < sizeof Ns / sizeof Ns[0]; s++) {
        const int N = Ns[s];
        float *l = hrand((size_t)N, 2.0f);
        int32_t *tg = malloc((size_t)N * sizeof *tg);
        assert_non_null(tg);
        for (int i = 0; i < N; i++) {
            l[i] = fabsf(l[i]) + 1.0f;
            tg[i] = (i % 5 == 3) ? -1 : i % 11;
        }
        float res[2][2];
        tlm_ops *be[2] = {g_gpu, g_ref};
        for (int k = 0; k < 2; k++) {
            tlm_ops *o = be[k];
            float seven = 7.0f;
            float *dl = up(o, l, (size_t)N * 4), *out = up(o, &seven, 4);
            int32_t *dt = up(o, tg, (size_t)N * 4);
            o->loss_mean(o, out, dl, dt, N);
            o->copy_d2h(o, &res[k][0], out, 4);
            for (int i = 0; i < N; i++) tg[i] = -1 - i % 3; /* every row ignored */
            o->copy_h2d(o, dt, tg, (size_t)N * 4);
            o->loss_mean(o, out, dl, dt, N);
            o->copy_d2h(o, &res[k][1], out, 4);
            for (int i = 0; i < N; i++) tg[i] = (i % 5 == 3) ? -1 : i % 11;
            o->free(o, dl), o->free(o, out), o->free(o, dt);
        }
        char what[64];
        snprintf(what, sizeof what, "loss_mean N=%d", N);
        check_close(what, &res[0][0], &res[1][0], 1, 1e-6, 0);
        if (N == 1 && res[0][0] != l[0]) fail_msg("loss_mean of one row: %g, want %g", res[0][0], l[0]);
        if (res[0][1] != 0.0f || res[1][1] != 0.0f)
            fail_msg("loss_mean with every target ignored: %g (reference %g), want 0", res[0][1], res[1][1]);
        free(l);
        free(tg);
    }
}

/* The trainer's path through the model: model_stage (uploads on the copy
 * queue ordered by events, into alternating buffers) and model_step (the
 * loss left on the device) compute exactly what model_forward_backward
 * does, for batches staged back to back through both buffers; and the
 * event ops behave as ops.h says. */
static void test_staged_step(void **state) {
    (void)state;
    NEED_GPU();
    tlm_ops *o = g_gpu;
    if (!o->event_create || !o->event_destroy || !o->event_record || !o->copy_h2d_async || !o->event_done)
        fail_msg("the CUDA backend lacks part of the upload block");

    /* the event ops on their own */
    tlm_event *after = o->event_create(o), *done = o->event_create(o);
    assert_non_null(after);
    assert_non_null(done);
    assert_int_equal(o->event_done(o, done, 0), 1); /* never recorded: passed */
    int pinned = 0;
    const size_t n = 4096;
    float *ph = o->host_alloc(o, n * sizeof(float), &pinned);
    assert_non_null(ph);
    for (size_t i = 0; i < n; i++) ph[i] = (float)i - 100.0f;
    float *d = up(o, NULL, n * sizeof(float)), *y = up(o, NULL, n * sizeof(float));
    o->add_inplace(o, y, d, n); /* reads d before the copy: y stays 0 */
    o->event_record(o, after);
    o->copy_h2d_async(o, d, ph, n * sizeof(float), after, done);
    assert_int_equal(o->event_done(o, done, 1), 1);
    o->add_inplace(o, y, d, n); /* after the copy: y = ph */
    float *h = down(o, y, n);
    for (size_t i = 0; i < n; i++)
        if (h[i] != ph[i]) fail_msg("copy_h2d_async ordering: y[%zu] = %g, want %g", i, h[i], ph[i]);
    free(h);
    o->free(o, d), o->free(o, y);
    o->host_free(o, ph, pinned);
    o->event_destroy(o, after);
    o->event_destroy(o, done);

    tlm_model m;
    fx_model(&m, o);
    const size_t bn = (size_t)FB * FT;
    /* three different batches in page-locked memory, as the loader's */
    int32_t *hb = o->host_alloc(o, 3 * 2 * bn * sizeof(int32_t), &pinned);
    assert_non_null(hb);
    for (int k = 0; k < 3; k++)
        for (size_t i = 0; i < bn; i++) {
            hb[(2 * k) * bn + i] = (g_fx.inputs[i] + 37 * k) % g_fx.cfg.vocab;
            hb[(2 * k + 1) * bn + i] = g_fx.targets[i] < 0 ? -1 : (g_fx.targets[i] + 11 * k) % g_fx.cfg.vocab;
        }
    float want[3], got[3];
    for (int k = 0; k < 3; k++)
        want[k] = model_forward_backward(&m, hb + 2 * k * bn, hb + (2 * k + 1) * bn, FB, FT, 0.0f, 0);
    assert_true(want[0] != want[1] && want[1] != want[2]); /* the batches differ */
    float *ld = up(o, NULL, 3 * sizeof(float));
    int64_t tk[3];
    for (int k = 0; k < 3; k++) {
        tk[k] = model_stage(&m, hb + 2 * k * bn, hb + (2 * k + 1) * bn, FB, FT);
        assert_true(tk[k] >= 1);
        if (k) assert_true(tk[k] == tk[k - 1] + 1);
        assert_int_equal(model_step(&m, 0.0f, ld + k), 0);
    }
    assert_true(m.cur != (int)((tk[1] - 1) % 2) && m.cur == (int)((tk[2] - 1) % 2)); /* buffers alternate */
    o->copy_d2h(o, got, ld, sizeof got);
    for (int k = 0; k < 3; k++) {
        assert_int_equal(model_stage_done(&m, tk[k], 1), 1);
        if (memcmp(&got[k], &want[k], sizeof got[k]))
            fail_msg("staged batch %d: loss %.9g, model_forward_backward %.9g", k, got[k], want[k]);
    }
    /* a batch larger than the buffers is refused with the error */
    tlm_errorf("unrelated");
    assert_true(model_stage(&m, hb, hb + bn, FB + 1, FT) < 0);
    assert_non_null(strstr(tlm_last_error(), "does not fit"));
    o->free(o, ld);
    o->host_free(o, hb, pinned);
    model_destroy(&m);
}

/* A tiny data folder for the trainer: a tokenizer trained on a few words
 * and token files of a learnable sequence (next = 7 * prev + 3 mod V). */
static void make_train_data(const char *dir) {
    static const char *words[] = {"the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "a", "red", "ball"};
    tlm_rng r;
    tlm_rng_seed(&r, 99);
    size_t cap = 12000, len = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    while (len + 16 < cap)
        len += (size_t)snprintf(text + len, cap - len, "%s%s", words[tlm_rng_below(&r, 12)],
                                tlm_rng_below(&r, 8) == 0 ? ".\n" : " ");
    const char *docs[1] = {text};
    size_t lens[1] = {len};
    tlm_tokenizer *tok = tokenizer_train(docs, lens, 1, 280, NULL, NULL);
    free(text);
    if (!tok) fail_msg("tokenizer_train: %s", tlm_last_error());
    assert_int_equal(dir_create(dir), 0);
    char p[1200];
    assert_int_equal(tokenizer_save(tok, path_join(p, sizeof p, dir, "tokenizer.json")), 0);
    const int V = tokenizer_vocab_size(tok);
    tokenizer_free(tok);
    const uint64_t ntrain = 1500, nval = 400;
    int32_t *t = malloc((ntrain + nval) * sizeof *t);
    assert_non_null(t);
    t[0] = 1;
    for (uint64_t i = 1; i < ntrain + nval; i++)
        t[i] = tlm_rng_below(&r, 10) == 0 ? (int32_t)tlm_rng_below(&r, (uint64_t)V) : (int32_t)((7 * t[i - 1] + 3) % V);
    assert_int_equal(tokfile_write(path_join(p, sizeof p, dir, "train.bin"), t, ntrain, V, 1), 0);
    assert_int_equal(tokfile_write(path_join(p, sizeof p, dir, "val.bin"), t + ntrain, nval, V, 1), 0);
    free(t);
}

static void train_opts_tiny(tlm_train_opts *o, const char *data, const char *out) {
    train_opts_default(o);
    assert_true(strlen(data) < sizeof o->data && strlen(out) < sizeof o->out);
    memcpy(o->data, data, strlen(data) + 1);
    memcpy(o->out, out, strlen(out) + 1);
    o->cfg = (tlm_config){.dim = 32, .layers = 2, .heads = 2, .hidden = 64, .context = 16, .norm_eps = 1e-5f,
                          .rope_theta = 10000.0f};
    o->batch = 4;
    o->accum = 2;
    o->lr = 1e-2;
    o->warmup = 2;
    o->max_steps = 9;
    o->eval_every = 9;
    o->save_every = 9;
    o->eval_batches = 2;
    o->log_every = 4;
    o->workers = 2;
    o->prefetch = 4;
    o->threads = 1;
    o->seed = 5;
}

typedef struct {
    wait_counts_fn counts;
    tlm_ops *o;
    long syncs[16];
    int64_t loss_step[16];
    double loss[16], gnorm[16];
} waits_rec;

static int waits_cb(void *user, const tlm_train_progress *p) {
    waits_rec *r = user;
    if (p->event != TLM_TRAIN_STEP || p->step >= 16) return 0;
    if (r->counts) r->counts(r->o, &r->syncs[p->step], NULL);
    r->loss_step[p->step] = p->loss_step;
    r->loss[p->step] = p->loss;
    r->gnorm[p->step] = p->grad_norm;
    return 0;
}

/* tinylm train's loop on this backend: a step waits for the device (a
 * stream sync) only when it reads its loss, every --log-every steps, once;
 * the steps in between report the latest reading; and the losses it reads
 * are those of the same run on the CPU. A device error ends the run with
 * the device's message, not "diverged". */
static void test_trainer_host_waits(void **state) {
    (void)state;
    NEED_GPU();
    wait_counts_fn counts = g_mod ? (wait_counts_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_wait_counts") : NULL;
    if (!counts) fail_msg("the CUDA module exports no tlm_cuda_wait_counts");
    char *root = test_tmpdir();
    char data[1100], out_gpu[1100], out_cpu[1100], out_bad[1100];
    path_join(data, sizeof data, root, "data");
    path_join(out_gpu, sizeof out_gpu, root, "run_gpu");
    path_join(out_cpu, sizeof out_cpu, root, "run_cpu");
    path_join(out_bad, sizeof out_bad, root, "run_bad");
    make_train_data(data);

    tlm_train_opts opt;
    train_opts_tiny(&opt, data, out_gpu);
    opt.ops = g_gpu;
    waits_rec rg, rc;
    memset(&rg, 0, sizeof rg);
    memset(&rc, 0, sizeof rc);
    rg.counts = counts;
    rg.o = g_gpu;
    tlm_trainer t;
    if (trainer_open(&t, &opt)) fail_msg("trainer_open on the CUDA backend: %s", tlm_last_error());
    assert_true(t.ops == g_gpu);
    if (trainer_run(&t, waits_cb, &rg, NULL) != 0) fail_msg("trainer_run: %s", tlm_last_error());
    const double val_gpu = t.last_val;
    trainer_close(&t);
    assert_int_equal(ops_status(g_gpu), 0); /* still usable: the trainer did not destroy it */

    /* Step 1 also grows scratch memory; from step 2 on a step waits exactly
     * once when it reads (steps 4 and 8, and 9, the last) and never else. */
    for (int s = 2; s <= 9; s++) {
        const int reads = s % 4 == 0 || s == 9;
        if (rg.syncs[s] - rg.syncs[s - 1] != reads)
            fail_msg("step %d waited for the device %ld times, want %d", s, rg.syncs[s] - rg.syncs[s - 1], reads);
        const int64_t want_ls = reads ? s : s < 4 ? 1 : 4 * (s / 4);
        if (rg.loss_step[s] != want_ls)
            fail_msg("step %d reports the loss of step %lld, want %lld", s, (long long)rg.loss_step[s],
                     (long long)want_ls);
        if (!reads && (rg.loss[s] != rg.loss[want_ls] || rg.gnorm[s] != rg.gnorm[want_ls]))
            fail_msg("step %d does not repeat the reading of step %lld", s, (long long)want_ls);
    }

    /* the same run on the CPU reads the same losses */
    memcpy(opt.out, out_cpu, strlen(out_cpu) + 1);
    opt.ops = NULL;
    snprintf(opt.device, sizeof opt.device, "cpu");
    if (trainer_open(&t, &opt)) fail_msg("trainer_open on the CPU: %s", tlm_last_error());
    if (trainer_run(&t, waits_cb, &rc, NULL) != 0) fail_msg("trainer_run on the CPU: %s", tlm_last_error());
    const double val_cpu = t.last_val;
    trainer_close(&t);
    const int reads[] = {1, 4, 8, 9};
    for (int i = 0; i < 4; i++) {
        const int s = reads[i];
        assert_true(rc.loss_step[s] == s);
        float a = (float)rg.loss[s], b = (float)rc.loss[s], ga = (float)rg.gnorm[s], gb = (float)rc.gnorm[s];
        char what[64];
        snprintf(what, sizeof what, "trainer step %d loss", s);
        check_close(what, &a, &b, 1, TOL, 0);
        snprintf(what, sizeof what, "trainer step %d grad norm", s);
        check_close(what, &ga, &gb, 1, TOL, 0);
    }
    float va = (float)val_gpu, vb = (float)val_cpu;
    check_close("trainer validation loss", &va, &vb, 1, TOL, 0);

    /* head size 256: the CUDA attention refuses it, the device fails, and
     * the run stops with that message after the first step */
    create_fn cr = (create_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create");
    assert_non_null(cr);
    char note[512];
    tlm_ops *bad = cr(0, note, sizeof note);
    assert_non_null(bad);
    train_opts_tiny(&opt, data, out_bad);
    opt.cfg.dim = 256;
    opt.cfg.heads = 1;
    opt.ops = bad;
    if (trainer_open(&t, &opt)) fail_msg("trainer_open: %s", tlm_last_error());
    memset(&rg, 0, sizeof rg);
    assert_int_equal(trainer_run(&t, waits_cb, &rg, NULL), -1);
    const char *e = tlm_last_error();
    if (!strstr(e, "head size 256") || strstr(e, "diverged") || strchr(e, '\n')) fail_msg("device failure: %s", e);
    assert_int_equal(rg.loss_step[1], 0); /* no step was reported */
    assert_int_equal(t.saved_step, -1);
    trainer_close(&t);
    bad->destroy(bad);
    char p[1200];
    assert_false(path_exists(path_join(p, sizeof p, out_bad, "model.safetensors")));

    test_rmtree(root);
    free(root);
}

/* (Included here, with the test that needs it.) */
#include "infer/infer.h"

/* Generation stops at a device error with the device's message, instead
 * of sampling from the NaN logits a failed backend hands back. */
static void test_generate_status(void **state) {
    (void)state;
    NEED_GPU();
    create_fn cr = g_mod ? (create_fn)(uintptr_t)dlsym(g_mod, "tlm_cuda_ops_create") : NULL;
    if (!cr) skip();
    char note[512];
    tlm_ops *o = cr(0, note, sizeof note); /* its own instance: failure is sticky */
    assert_non_null(o);
    /* head size 256: the CUDA attention refuses it */
    tlm_config c = {.vocab = 300, .dim = 256, .layers = 1, .heads = 1, .hidden = 32, .context = 16,
                    .norm_eps = 1e-5f, .rope_theta = 10000.0f};
    tlm_model m;
    if (model_create(&m, &c, o)) fail_msg("model_create: %s", tlm_last_error());
    model_init_random(&m, 3);
    tlm_gen_params p;
    memset(&p, 0, sizeof p);
    p.samples = 2;
    p.max_tokens = 4;
    p.sampling.temperature = 1.0f;
    p.sampling.top_p = 1.0f;
    const int32_t prompt[3] = {1, 2, 3};
    int32_t out[2 * 4];
    int len[2] = {-1, -1};
    tlm_errorf("unrelated");
    assert_int_equal(generate_run(&m, prompt, 3, -1, &p, NULL, NULL, out, len, NULL), -1);
    const char *e = tlm_last_error();
    if (!strstr(e, "head size 256") || strchr(e, '\n')) fail_msg("generation on a failed device: %s", e);
    assert_true(len[0] == -1 && len[1] == -1); /* nothing was reported as generated */
    model_destroy(&m);
    o->destroy(o);
}

/* ---- sampling on the device (ops.h sample) ---------------------------------------- */

/* Is `tok` what the host sampler draws with u and top_p moved by a relative
 * 1e-5 either way? The device sums in another order (double block sums
 * where the host sums in float or in sequence), so a uniform within
 * rounding of a cumulative boundary, or a nucleus target within rounding
 * of a token's cumulative mass, may land on the neighbour. */
static int sample_near_boundary(const float *row, int V, tlm_sampler_params sp, float u, int32_t tok) {
    const float d = 1e-5f, below1 = nextafterf(1.0f, 0.0f);
    const float us[3] = {u, fminf(u * (1 + d) + d, below1), fmaxf(u * (1 - d) - d, 0.0f)};
    const float ps[3] = {sp.top_p, fminf(sp.top_p * (1 + d), 1.0f), sp.top_p * (1 - d)};
    for (int a = 0; a < 3; a++)
        for (int c = 0; c < 3; c++) {
            tlm_sampler_params q = sp;
            q.top_p = ps[c];
            tlm_sampler sm;
            if (sampler_init(&sm, V, &q)) fail_msg("sampler_init: %s", tlm_last_error());
            int32_t t = sampler_sample_u(&sm, row, us[a]);
            sampler_free(&sm);
            if (t == tok) return 1;
        }
    return 0;
}

/* Row b of a batch: plain, ties everywhere (logits on a coarse grid), one
 * dominant logit, or all equal. */
static void sample_row(float *row, int V, int b) {
    for (int i = 0; i < V; i++) {
        float x = 3.0f * tlm_rng_normal(&g_rng);
        switch (b % 4) {
        case 1: row[i] = roundf(x); break;
        case 2: row[i] = x; break;
        case 3: row[i] = 0.5f; break;
        default: row[i] = x;
        }
    }
    if (b % 4 == 2) row[tlm_rng_below(&g_rng, (uint64_t)V)] = 40.0f;
}

static void test_sample_rows(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->sample) fail_msg("the CUDA backend has no sample op");
    const int Vs[] = {1, 3, 64, 257, 1000};
    const float Ts[] = {0.0f, 0.7f, 1.0f, 2.0f};
    const int Ks[] = {0, 1, 5, 50};
    const float Ps[] = {1.0f, 0.9f, 0.5f};
    /* both kernels, whatever the device's SM count: the wide-digit one
     * (all rows, then 3), then the narrow one */
    enum { BMAX = 8 };
    const int Bs[] = {BMAX, 3, BMAX};
    const char *wide[] = {"1000000", "1000000", "0"};
    long rows = 0, near = 0;
    for (size_t ib = 0; ib < sizeof Bs / sizeof *Bs; ib++)
    for (size_t iv = 0; iv < sizeof Vs / sizeof *Vs; iv++) {
        const int B = Bs[ib];
        setenv("TLM_CUDA_SAMPLE_WIDE_ROWS", wide[ib], 1);
        const int V = Vs[iv];
        float *lg = malloc(sizeof(float) * B * V);
        assert_non_null(lg);
        float *d = (float *)up(g_gpu, NULL, sizeof(float) * B * V);
        for (size_t it = 0; it < sizeof Ts / sizeof *Ts; it++)
            for (size_t ik = 0; ik < sizeof Ks / sizeof *Ks; ik++)
                for (size_t ip = 0; ip < sizeof Ps / sizeof *Ps; ip++) {
                    tlm_sampler_params sp = {.temperature = Ts[it], .top_k = Ks[ik], .top_p = Ps[ip]};
                    for (int b = 0; b < B; b++) sample_row(lg + (size_t)b * V, V, b + (int)(it + ik + ip));
                    float u[BMAX];
                    for (int b = 0; b < B; b++)
                        u[b] = b == 0 ? 0.0f : b == 1 ? nextafterf(1.0f, 0.0f) : tlm_rng_uniform(&g_rng);
                    g_gpu->copy_h2d(g_gpu, d, lg, sizeof(float) * B * V);
                    int32_t got[BMAX];
                    g_gpu->sample(g_gpu, got, d, B, V, (size_t)V, u, sp.temperature, sp.top_k, sp.top_p);
                    assert_int_equal(ops_status(g_gpu), 0);
                    tlm_sampler sm;
                    if (sampler_init(&sm, V, &sp)) fail_msg("sampler_init: %s", tlm_last_error());
                    for (int b = 0; b < B; b++) {
                        const float *row = lg + (size_t)b * V;
                        const int32_t want = sampler_sample_u(&sm, row, u[b]);
                        rows++;
                        if (got[b] == want) continue;
                        if (got[b] < 0 || got[b] >= V)
                            fail_msg("V %d T %g k %d p %g row %d u %.9g: token %d out of range", V, sp.temperature,
                                     sp.top_k, sp.top_p, b, u[b], got[b]);
                        if (sampler_greedy(&sp) || !sample_near_boundary(row, V, sp, u[b], got[b]))
                            fail_msg("V %d T %g k %d p %g row %d u %.9g: device token %d, host %d", V,
                                     sp.temperature, sp.top_k, sp.top_p, b, u[b], got[b], want);
                        near++;
                    }
                    sampler_free(&sm);
                }
        /* ld 0: every row reads row 0 (the first step after a shared prompt) */
        tlm_sampler_params sp = {.temperature = 1.0f, .top_k = 0, .top_p = 0.9f};
        float u[BMAX];
        int32_t got[BMAX];
        for (int b = 0; b < B; b++) u[b] = tlm_rng_uniform(&g_rng);
        g_gpu->sample(g_gpu, got, d, B, V, 0, u, sp.temperature, sp.top_k, sp.top_p);
        tlm_sampler sm;
        if (sampler_init(&sm, V, &sp)) fail_msg("sampler_init: %s", tlm_last_error());
        for (int b = 0; b < B; b++) {
            const int32_t want = sampler_sample_u(&sm, lg, u[b]);
            rows++;
            if (got[b] != want) {
                if (!sample_near_boundary(lg, V, sp, u[b], got[b]))
                    fail_msg("V %d ld 0 row %d: device token %d, host %d", V, b, got[b], want);
                near++;
            }
        }
        sampler_free(&sm);
        g_gpu->free(g_gpu, d);
        free(lg);
    }
    unsetenv("TLM_CUDA_SAMPLE_WIDE_ROWS");
    printf("  sample: %ld rows, %ld within rounding of a boundary\n", rows, near);
    /* a handful at most: a boundary within 1e-5 of the uniform is rare */
    if (near * 100 > rows) fail_msg("%ld of %ld draws differ from the host's (at boundaries)", near, rows);
}

/* generate_run with the device sampler against the host sampler on the same
 * device (identical logits: only where sampling runs differs), and against
 * the CPU reference backend (logits equal within fp32 rounding; the random
 * model's margins are far wider than that at these few draws). */
static void gen_tokens_ex(tlm_ops *o, const tlm_sampler_params *sp, int dtype, int no_graph, int eot, int32_t *out,
                          int *len, int B, int maxt, tlm_token_fn cb, void *user, tlm_gen_stats *st) {
    tlm_config c = {.vocab = 300, .dim = 64, .layers = 2, .heads = 4, .hidden = 96, .context = 32,
                    .norm_eps = 1e-5f, .rope_theta = 10000.0f};
    tlm_model m;
    if (model_create(&m, &c, o)) fail_msg("model_create: %s", tlm_last_error());
    model_init_random(&m, 7);
    tlm_gen_params p;
    memset(&p, 0, sizeof p);
    p.samples = B;
    p.max_tokens = maxt;
    p.sampling = *sp;
    p.seed = 11;
    p.dtype = dtype;
    p.no_graph = no_graph;
    const int32_t prompt[4] = {5, 17, 42, 9};
    if (generate_run(&m, prompt, 4, eot, &p, cb, user, out, len, st))
        fail_msg("generate_run on %s: %s", o->name, tlm_last_error());
    model_destroy(&m);
}

static void gen_tokens(tlm_ops *o, const tlm_sampler_params *sp, int32_t *out, int *len, int B, int maxt) {
    gen_tokens_ex(o, sp, TLM_GEN_F32, 0, 299, out, len, B, maxt, NULL, NULL, NULL);
}

static void test_sample_generate(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->sample) fail_msg("the CUDA backend has no sample op");
    enum { B = 6, MAXT = 10 };
    const tlm_sampler_params cases[] = {
        {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f},
        {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f},
        {.temperature = 0.8f, .top_k = 20, .top_p = 0.9f},
        {.temperature = 1.2f, .top_k = 0, .top_p = 0.7f},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        int32_t dev[B * MAXT], host[B * MAXT], ref[B * MAXT];
        int ldev[B], lhost[B], lref[B];
        memset(dev, 0, sizeof dev);
        memset(host, 0, sizeof host);
        memset(ref, 0, sizeof ref);
        gen_tokens(g_gpu, &cases[ci], dev, ldev, B, MAXT);
        void (*sample)(tlm_ops *, int32_t *, const float *, int, int, size_t, const float *, float, int, float) =
            g_gpu->sample;
        g_gpu->sample = NULL; /* the host path on the same device */
        gen_tokens(g_gpu, &cases[ci], host, lhost, B, MAXT);
        g_gpu->sample = sample;
        gen_tokens(g_ref, &cases[ci], ref, lref, B, MAXT);
        /* the sampled cases really sample: streams of one prompt part ways */
        int differ = 0;
        for (int b = 1; b < B; b++)
            differ |= ldev[b] != ldev[0] || memcmp(dev + b * MAXT, dev, sizeof(int32_t) * MAXT);
        if (cases[ci].temperature > 0 && !differ) fail_msg("case %zu: every stream drew the same tokens", ci);
        for (int b = 0; b < B; b++) {
            if (ldev[b] != lhost[b] || memcmp(dev + b * MAXT, host + b * MAXT, sizeof(int32_t) * ldev[b]))
                fail_msg("case %zu stream %d: device sampling differs from host sampling of the same logits", ci, b);
            if (ldev[b] != lref[b] || memcmp(dev + b * MAXT, ref + b * MAXT, sizeof(int32_t) * ldev[b]))
                fail_msg("case %zu stream %d: device sampling differs from the CPU reference's tokens", ci, b);
        }
    }
}

/* ---- recorded steps (graph block) and attn_decode's pos_dev -------------------------- */

/* attn_decode over a shared prefix, step by step, three ways on the device:
 * (a) position as pos0, (b) read from device memory (pos_dev, with a wrong
 * pos0), (c) recorded ONCE as [copy the position up from a pinned buffer;
 * attn_decode(pos_dev)] and replayed at every later position. Identical
 * bits everywhere; a position outside the cache gives NaN and stores
 * nothing. */
static void pos_dev_case(int kvt) {
    tlm_ops *o = g_gpu;
    const int B = 3, H = 2, hd = 32, D = H * hd, P = 5, steps = 4;
    const size_t es = kvt == TLM_KV_F16 ? 2 : 4, np = (size_t)P * D, nc = (size_t)B * steps * D;
    const size_t nq = (size_t)B * 3 * D, no = (size_t)B * D;
    float *pre = hrand((size_t)P * 3 * D, 1.5f), *dec = hrand((size_t)steps * nq, 1.5f);
    void *kp = up(o, NULL, np * es), *vp = up(o, NULL, np * es);
    float *qp = up(o, pre, (size_t)P * 3 * D * 4), *op = up(o, NULL, (size_t)P * D * 4);
    /* also grows the RoPE table for hd 32 to >= P + steps: a recording cannot */
    o->attn_decode(o, op, qp, kp, vp, kvt, NULL, NULL, 0, 1, P, P, H, hd, 0, NULL, 10000.0f);
    void *kc[3], *vc[3];
    float *q[3], *out[3];
    for (int w = 0; w < 3; w++) {
        kc[w] = up(o, NULL, nc * es);
        vc[w] = up(o, NULL, nc * es);
        q[w] = up(o, NULL, nq * 4);
        out[w] = up(o, NULL, no * 4);
    }
    int32_t *pos_dev = up(o, NULL, sizeof(int32_t));
    int pinned = 0;
    int32_t *pos_host = o->host_alloc(o, sizeof(int32_t), &pinned);
    assert_non_null(pos_host);
    assert_true(pinned);
    *pos_host = P;
    assert_int_equal(o->graph_begin(o), 0);
    o->copy_h2d(o, pos_dev, pos_host, sizeof(int32_t));
    o->attn_decode(o, out[2], q[2], kc[2], vc[2], kvt, kp, vp, P, B, 1, steps, H, hd, 12345, pos_dev, 10000.0f);
    tlm_graph *g = o->graph_end(o);
    if (!g) fail_msg("recording attn_decode: %s", tlm_last_error());
    const int32_t *cpos = pos_dev; /* (b) reads the same device int */
    for (int s = 0; s < steps; s++) {
        for (int w = 0; w < 3; w++) o->copy_h2d(o, q[w], dec + (size_t)s * nq, nq * 4);
        o->attn_decode(o, out[0], q[0], kc[0], vc[0], kvt, kp, vp, P, B, 1, steps, H, hd, P + s, NULL, 10000.0f);
        *pos_host = P + s; /* read when the graph runs */
        if (o->graph_launch(o, g)) fail_msg("graph_launch at step %d: %s", s, tlm_last_error());
        o->sync(o);
        o->attn_decode(o, out[1], q[1], kc[1], vc[1], kvt, kp, vp, P, B, 1, steps, H, hd, -5, cpos, 10000.0f);
        float *r[3];
        for (int w = 0; w < 3; w++) r[w] = down(o, out[w], no);
        for (int w = 1; w < 3; w++)
            if (memcmp(r[0], r[w], no * 4))
                fail_msg("attn_decode kv %d step %d: %s differs from pos0", kvt, s, w == 1 ? "pos_dev" : "the replay");
        for (int w = 0; w < 3; w++) free(r[w]);
        for (int w = 0; w < 3; w++) r[w] = down(o, q[w], nq); /* rotated in place */
        if (memcmp(r[0], r[1], nq * 4) || memcmp(r[0], r[2], nq * 4))
            fail_msg("attn_decode kv %d step %d: rotated qkv differs", kvt, s);
        for (int w = 0; w < 3; w++) free(r[w]);
    }
    char *c[3];
    for (int w = 0; w < 3; w++) {
        c[w] = malloc(2 * nc * es);
        o->copy_d2h(o, c[w], kc[w], nc * es);
        o->copy_d2h(o, c[w] + nc * es, vc[w], nc * es);
    }
    if (memcmp(c[0], c[1], 2 * nc * es) || memcmp(c[0], c[2], 2 * nc * es))
        fail_msg("attn_decode kv %d: caches written through pos_dev or the replay differ", kvt);
    /* outside the cache (P - 1: inside the prefix; P + steps: past the end) */
    const int bad[2] = {P - 1, P + steps};
    for (int i = 0; i < 2; i++) {
        *pos_host = bad[i];
        assert_int_equal(o->graph_launch(o, g), 0);
        o->sync(o);
        float *r = down(o, out[2], no);
        for (size_t j = 0; j < no; j++)
            if (!isnan(r[j])) fail_msg("position %d outside the cache: out %g, not NaN", bad[i], r[j]);
        free(r);
        char *k2 = malloc(2 * nc * es);
        o->copy_d2h(o, k2, kc[2], nc * es);
        o->copy_d2h(o, k2 + nc * es, vc[2], nc * es);
        if (memcmp(k2, c[0], 2 * nc * es)) fail_msg("position %d outside the cache was stored", bad[i]);
        free(k2);
    }
    assert_int_equal(ops_status(o), 0);
    o->graph_destroy(o, g);
    for (int w = 0; w < 3; w++) {
        free(c[w]);
        o->free(o, kc[w]), o->free(o, vc[w]), o->free(o, q[w]), o->free(o, out[w]);
    }
    o->host_free(o, pos_host, pinned);
    o->free(o, pos_dev), o->free(o, kp), o->free(o, vp), o->free(o, qp), o->free(o, op);
    free(pre), free(dec);
}

static void test_attn_decode_pos_dev(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->graph_begin || !g_gpu->graph_end || !g_gpu->graph_launch || !g_gpu->graph_destroy)
        fail_msg("the CUDA backend has no graph block");
    pos_dev_case(TLM_KV_F32);
    pos_dev_case(TLM_KV_F16);
}

/* A packed product with a fused norm (it stages its input rows in the
 * backend's scratch memory): y[M,32] from x[M,K]. */
typedef struct {
    float *x, *nw, *y, *w;
    tlm_packed *p;
    int M, K;
} graph_mm;

static void graph_mm_open(graph_mm *g, int M, int K) {
    tlm_ops *o = g_gpu;
    float *x = hrand((size_t)M * K, 1.0f), *w = hrand((size_t)32 * K, 0.1f), *nw = hrand((size_t)K, 1.0f);
    g->M = M;
    g->K = K;
    g->x = up(o, x, (size_t)M * K * 4);
    g->w = up(o, w, (size_t)32 * K * 4);
    g->nw = up(o, nw, (size_t)K * 4);
    g->y = up(o, NULL, (size_t)M * 32 * 4);
    g->p = o->pack(o, g->w, 32, K, TLM_PACK_F32, TLM_PACK_LINEAR);
    if (!g->p) fail_msg("pack: %s", tlm_last_error());
    free(x), free(w), free(nw);
}

static void graph_mm_run(graph_mm *g) { g_gpu->matmul_packed(g_gpu, g->y, g->x, g->M, g->p, g->nw, 1e-5f, 0); }

static void graph_mm_close(graph_mm *g) {
    tlm_ops *o = g_gpu;
    o->pack_free(o, g->p);
    o->free(o, g->x), o->free(o, g->w), o->free(o, g->nw), o->free(o, g->y);
}

/* The rules of recording (ops.h's graph block): nothing runs while
 * recording and host buffers are read and written when the graph runs; a
 * graph whose scratch was reallocated since is refused (nothing enqueued)
 * until recorded again; a recording that would grow scratch or copy from
 * ordinary memory fails at graph_end without failing the backend. */
static void test_graph_rules(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->graph_begin) fail_msg("the CUDA backend has no graph block");
    tlm_ops *o = g_gpu;
    graph_mm a, big;
    graph_mm_open(&a, 3, 40);
    graph_mm_run(&a);
    float *want = down(o, a.y, 3 * 32);
    /* copies: h2d from pinned, the product, d2h into pinned */
    int pin = 0;
    float *hb = o->host_alloc(o, sizeof(float) * (3 * 40 + 3 * 32), &pin);
    assert_true(pin);
    float *xh = down(o, a.x, 3 * 40);
    memset(hb, 0, sizeof(float) * (3 * 40 + 3 * 32));
    float *yb = hb + 3 * 40;
    o->zero(o, a.x, sizeof(float) * 3 * 40);
    o->zero(o, a.y, sizeof(float) * 3 * 32);
    assert_int_equal(o->graph_begin(o), 0);
    o->copy_h2d(o, a.x, hb, sizeof(float) * 3 * 40);
    graph_mm_run(&a);
    o->copy_d2h(o, yb, a.y, sizeof(float) * 3 * 32);
    o->sync(o); /* does nothing while recording */
    tlm_graph *g = o->graph_end(o);
    if (!g) fail_msg("recording: %s", tlm_last_error());
    for (int i = 0; i < 3 * 32; i++)
        if (yb[i] != 0.0f) fail_msg("a recorded copy_d2h ran at record time");
    float *y0 = down(o, a.y, 3 * 32);
    for (int i = 0; i < 3 * 32; i++)
        if (y0[i] != 0.0f) fail_msg("a recorded product ran at record time");
    free(y0);
    memcpy(hb, xh, sizeof(float) * 3 * 40); /* the input, written after recording */
    assert_int_equal(o->graph_launch(o, g), 0);
    o->sync(o);
    if (memcmp(yb, want, sizeof(float) * 3 * 32)) fail_msg("the replayed step differs from the ops run directly");
    /* scratch grows for a larger product: the graph holds the old block */
    memset(yb, 0, sizeof(float) * 3 * 32);
    graph_mm_open(&big, 64, 2048);
    graph_mm_run(&big);
    tlm_errorf("unrelated");
    assert_int_equal(o->graph_launch(o, g), -1);
    if (!strstr(tlm_last_error(), "stale")) fail_msg("stale graph: %s", tlm_last_error());
    assert_int_equal(ops_status(o), 0); /* not a device failure */
    o->sync(o);
    for (int i = 0; i < 3 * 32; i++)
        if (yb[i] != 0.0f) fail_msg("a refused graph_launch still ran the step");
    o->graph_destroy(o, g);
    /* recorded again, it runs */
    assert_int_equal(o->graph_begin(o), 0);
    o->copy_h2d(o, a.x, hb, sizeof(float) * 3 * 40);
    graph_mm_run(&a);
    o->copy_d2h(o, yb, a.y, sizeof(float) * 3 * 32);
    g = o->graph_end(o);
    if (!g) fail_msg("recording again: %s", tlm_last_error());
    assert_int_equal(o->graph_launch(o, g), 0);
    o->sync(o);
    if (memcmp(yb, want, sizeof(float) * 3 * 32)) fail_msg("the re-recorded step differs");
    o->graph_destroy(o, g);
    /* a recording that would grow scratch: refused at graph_end, backend fine */
    graph_mm huge;
    graph_mm_open(&huge, 160, 2048); /* past the 1.5 x 64 rows that scratch grew to */
    assert_int_equal(o->graph_begin(o), 0);
    graph_mm_run(&huge);
    assert_null(o->graph_end(o));
    if (!strstr(tlm_last_error(), "scratch") || !strstr(tlm_last_error(), "un-recorded"))
        fail_msg("growing scratch while recording: %s", tlm_last_error());
    assert_int_equal(ops_status(o), 0);
    /* copies from ordinary memory cannot be recorded */
    assert_int_equal(o->graph_begin(o), 0);
    o->copy_h2d(o, a.x, xh, sizeof(float) * 3 * 40);
    assert_null(o->graph_end(o));
    if (!strstr(tlm_last_error(), "pinned")) fail_msg("pageable copy while recording: %s", tlm_last_error());
    /* graph_end without graph_begin */
    assert_null(o->graph_end(o));
    /* the backend still works */
    assert_int_equal(ops_status(o), 0);
    o->zero(o, a.y, sizeof(float) * 3 * 32);
    graph_mm_run(&a);
    float *y1 = down(o, a.y, 3 * 32);
    if (memcmp(y1, want, sizeof(float) * 3 * 32)) fail_msg("ops after a failed recording differ");
    free(y1);
    graph_mm_close(&huge);
    graph_mm_close(&big);
    graph_mm_close(&a);
    o->host_free(o, hb, pin);
    free(want), free(xh);
}

/* Forces the backend's scratch to grow once, in the callback of the
 * (trigger)th token: the generator's recorded step then goes stale. */
typedef struct {
    int calls, trigger, fired;
    graph_mm *big;
} grow_cb;

static int grow_on_token(void *user, int seq, int32_t token) {
    (void)seq;
    (void)token;
    grow_cb *g = user;
    if (++g->calls == g->trigger) {
        graph_mm_run(g->big);
        g->fired = 1;
    }
    return 0;
}

/* generate_run with the decode step recorded and replayed (the default on
 * this backend) gives the tokens of the op-by-op path and of the CPU
 * reference: greedy and sampled, several streams over a shared prompt. */
static void test_graph_generate(void **state) {
    (void)state;
    NEED_GPU();
    if (!g_gpu->graph_begin || !g_gpu->sample_dev) fail_msg("the CUDA backend has no graph block or sample_dev");
    unsetenv("TLM_NO_GRAPH");
    enum { B = 4, MAXT = 8 };
    const tlm_sampler_params cases[] = {
        {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f},
        {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f},
        {.temperature = 0.8f, .top_k = 20, .top_p = 0.9f},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        int32_t gr[B * MAXT], op[B * MAXT], ref[B * MAXT];
        int lg[B], lo[B], lr[B];
        tlm_gen_stats sg, so;
        memset(gr, 0, sizeof gr), memset(op, 0, sizeof op), memset(ref, 0, sizeof ref);
        gen_tokens_ex(g_gpu, &cases[ci], TLM_GEN_F32, 0, 299, gr, lg, B, MAXT, NULL, NULL, &sg);
        gen_tokens_ex(g_gpu, &cases[ci], TLM_GEN_F32, 1, 299, op, lo, B, MAXT, NULL, NULL, &so);
        gen_tokens_ex(g_ref, &cases[ci], TLM_GEN_F32, 0, 299, ref, lr, B, MAXT, NULL, NULL, NULL);
        /* the graph really ran: recorded once at the second step, then replayed */
        if (sg.graph_records != 1 || sg.graph_launches != sg.steps - 1 || sg.steps < 3)
            fail_msg("case %zu: %d recordings, %d launches for %d steps", ci, sg.graph_records, sg.graph_launches,
                     sg.steps);
        if (so.graph_records || so.graph_launches) fail_msg("case %zu: no_graph still recorded", ci);
        assert_int_equal(sg.steps, so.steps);
        for (int b = 0; b < B; b++) {
            if (lg[b] != lo[b] || memcmp(gr + b * MAXT, op + b * MAXT, sizeof(int32_t) * lg[b]))
                fail_msg("case %zu stream %d: replayed steps differ from op-by-op steps", ci, b);
            if (lg[b] != lr[b] || memcmp(gr + b * MAXT, ref + b * MAXT, sizeof(int32_t) * lg[b]))
                fail_msg("case %zu stream %d: replayed steps differ from the CPU reference", ci, b);
        }
    }
    /* bf16 weights and fp16 caches: replay == op by op, bit for bit */
    {
        const tlm_sampler_params sp = {.temperature = 0.9f, .top_k = 0, .top_p = 0.95f};
        int32_t gr[B * MAXT], op[B * MAXT];
        int lg[B], lo[B];
        tlm_gen_stats sg;
        gen_tokens_ex(g_gpu, &sp, TLM_GEN_BF16, 0, -1, gr, lg, B, MAXT, NULL, NULL, &sg);
        gen_tokens_ex(g_gpu, &sp, TLM_GEN_BF16, 1, -1, op, lo, B, MAXT, NULL, NULL, NULL);
        assert_int_equal(sg.graph_launches, MAXT - 2);
        assert_memory_equal(lg, lo, sizeof lg);
        assert_memory_equal(gr, op, sizeof gr);
    }
    /* TLM_NO_GRAPH=1 (bench's comparison) turns it off */
    {
        const tlm_sampler_params sp = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f};
        int32_t t[B * MAXT];
        int l[B];
        tlm_gen_stats st;
        setenv("TLM_NO_GRAPH", "1", 1);
        gen_tokens_ex(g_gpu, &sp, TLM_GEN_F32, 0, -1, t, l, B, MAXT, NULL, NULL, &st);
        unsetenv("TLM_NO_GRAPH");
        if (st.graph_records || st.graph_launches) fail_msg("TLM_NO_GRAPH=1 still recorded");
    }
    /* scratch grows mid-run (the first token of the third step): the next
     * launch is refused as stale, the step is recorded again, and the
     * tokens are still the op-by-op path's */
    {
        const tlm_sampler_params sp = {.temperature = 1.0f, .top_k = 0, .top_p = 0.9f};
        int32_t gr[B * MAXT], op[B * MAXT];
        int lg[B], lo[B];
        tlm_gen_stats sg;
        graph_mm big;
        graph_mm_open(&big, 64, 4096);
        grow_cb cb = {.trigger = 2 * B + 1, .big = &big};
        gen_tokens_ex(g_gpu, &sp, TLM_GEN_F32, 0, -1, gr, lg, B, MAXT, grow_on_token, &cb, &sg);
        assert_true(cb.fired);
        if (sg.graph_records != 2) fail_msg("after scratch grew: %d recordings, want 2", sg.graph_records);
        assert_int_equal(sg.graph_launches, MAXT - 2);
        gen_tokens_ex(g_gpu, &sp, TLM_GEN_F32, 1, -1, op, lo, B, MAXT, NULL, NULL, NULL);
        assert_memory_equal(lg, lo, sizeof lg);
        assert_memory_equal(gr, op, sizeof gr);
        graph_mm_close(&big);
    }
    assert_int_equal(ops_status(g_gpu), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory),      cmocka_unit_test(test_mem_usage),   cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_add_swiglu),
        cmocka_unit_test(test_embed),       cmocka_unit_test(test_rmsnorm),     cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),   cmocka_unit_test(test_attn_cached), cmocka_unit_test(test_xent),
        cmocka_unit_test(test_sumsq_adamw), cmocka_unit_test(test_determinism), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_model_fixture), cmocka_unit_test(test_model_cached), cmocka_unit_test(test_train_steps),
        cmocka_unit_test(test_packed), cmocka_unit_test(test_attn_decode), cmocka_unit_test(test_model_packed),
        cmocka_unit_test(test_bf16), cmocka_unit_test(test_bf16_acts), cmocka_unit_test(test_bf16_model_paths),
        cmocka_unit_test(test_tf32),
        cmocka_unit_test(test_attn_tc),
        cmocka_unit_test(test_status), cmocka_unit_test(test_loss_mean), cmocka_unit_test(test_staged_step),
        cmocka_unit_test(test_trainer_host_waits), cmocka_unit_test(test_generate_status),
        cmocka_unit_test(test_sample_rows), cmocka_unit_test(test_sample_generate),
        cmocka_unit_test(test_attn_decode_pos_dev), cmocka_unit_test(test_graph_rules),
        cmocka_unit_test(test_graph_generate),
    };
    /* TLM_TEST_FILTER=test_attn* runs only the matching tests (slow emulator) */
    if (getenv("TLM_TEST_FILTER")) cmocka_set_test_filter(getenv("TLM_TEST_FILTER"));
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    fixture_close(&g_fx);
    return rc;
}
