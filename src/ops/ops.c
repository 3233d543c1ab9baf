/*
 * Device selection (--device): builds the op table of the chosen backend.
 *
 * The CPU backends are linked in. The CUDA backend is a separate shared
 * module (libtinylm-cuda.so) loaded at run time, so one tinylm binary runs
 * on machines with and without a GPU and needs no CUDA libraries to start.
 */
#include "ops/ops.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/common.h"

#define OPS_CUDA_MODULE "libtinylm-cuda.so"
#define OPS_CUDA_ENTRY "tlm_cuda_ops_create"
#define OPS_CUDA_ENTRY_EX "tlm_cuda_ops_create_ex"

/* Entry point every CUDA module exports: device index, a buffer for one line
 * (a banner on success, the reason on failure). NULL when it cannot start. */
typedef tlm_ops *(*ops_cuda_create_fn)(int device, char *note, size_t n);
/* The same with the precision of matrix products ("fp32" or "bf16"). */
typedef tlm_ops *(*ops_cuda_create_ex_fn)(int device, const char *dtype, char *note, size_t n);

/* snprintf that truncates quietly: paths and loader messages can be long,
 * and a cut-off one-line note is fine. */
__attribute__((format(printf, 3, 4))) static void ops_fmt(char *buf, size_t n, const char *fmt, ...) {
    if (!buf || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, n, fmt, ap);
    va_end(ap);
}

/* Open the CUDA module: first beside the executable (an installed or built
 * tree keeps them together), then through the default library path.
 * On failure *why says whether it was absent or present but unloadable. */
static void *ops_cuda_open(char *why, size_t n) {
    why[0] = 0;
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            char path[PATH_MAX + 32];
            slash[1] = 0;
            ops_fmt(path, sizeof path, "%s%s", exe, OPS_CUDA_MODULE);
            if (access(path, F_OK) == 0) {
                void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
                if (h) return h;
                const char *e = dlerror();
                ops_fmt(why, n, "%s could not be loaded: %s", path, e ? e : "unknown dlopen error");
                return NULL;
            }
        }
    }
    void *h = dlopen(OPS_CUDA_MODULE, RTLD_NOW | RTLD_LOCAL);
    if (h) return h;
    /* dlopen cannot tell "not found" from "found but broken" by code; the
     * message is only worth showing in the second case. */
    const char *e = dlerror();
    if (e && !strstr(e, "No such file")) ops_fmt(why, n, "%s could not be loaded: %s", OPS_CUDA_MODULE, e);
    return NULL;
}

/* Try to start CUDA device `dev` with matrix products in cuda_dtype ("fp32",
 * "bf16", or NULL for the module's default). Returns the op table, or NULL
 * with `why` holding the reason ("" when the module is simply not
 * installed). */
static tlm_ops *ops_cuda_try(int dev, const char *cuda_dtype, char *banner, size_t bn, char *why, size_t wn) {
    void *h = ops_cuda_open(why, wn);
    if (!h) return NULL;
    const char *entry = cuda_dtype ? OPS_CUDA_ENTRY_EX : OPS_CUDA_ENTRY;
    void *sym = dlsym(h, entry);
    if (!sym) {
        ops_fmt(why, wn, "%s has no %s entry point (mismatched build)", OPS_CUDA_MODULE, entry);
        dlclose(h);
        return NULL;
    }
    char mnote[256] = "";
    tlm_ops *o = cuda_dtype ? ((ops_cuda_create_ex_fn)(uintptr_t)sym)(dev, cuda_dtype, mnote, sizeof mnote)
                            : ((ops_cuda_create_fn)(uintptr_t)sym)(dev, mnote, sizeof mnote);
    if (!o) {
        ops_fmt(why, wn, "%s", mnote[0] ? mnote : "the CUDA backend could not start (no usable GPU?)");
        dlclose(h);
        return NULL;
    }
    /* The module stays loaded for the life of the process: o->destroy and
     * every op live in it. */
    ops_fmt(banner, bn, "%s", mnote[0] ? mnote : "cuda");
    return o;
}

/* Parse "cuda" or "cuda:N". Returns the device index, or -1 if malformed. */
static int ops_parse_cuda(const char *spec) {
    if (strcmp(spec, "cuda") == 0) return 0;
    if (strncmp(spec, "cuda:", 5) != 0 || !spec[5]) return -1;
    char *end;
    errno = 0;
    long v = strtol(spec + 5, &end, 10);
    if (*end || errno || v < 0 || v > 1024) return -1;
    return (int)v;
}

int ops_check_dtype(const char *dtype) {
    if (!dtype || !strcmp(dtype, "auto") || !strcmp(dtype, "fp32") || !strcmp(dtype, "bf16") ||
        !strcmp(dtype, "tf32"))
        return 0;
    return tlm_errorf("--dtype %s: unknown precision, expected fp32, bf16, tf32 or auto", dtype);
}

/* A CPU backend for dtype: the CPU trains in fp32 only, so bf16 and tf32
 * (tensor-core formats) are refused (`why`, when not empty, says why CUDA
 * was not used). */
static tlm_ops *ops_cpu_for(const char *dtype, int ref, int threads, const char *why) {
    if (dtype && (!strcmp(dtype, "bf16") || !strcmp(dtype, "tf32"))) {
        if (why && why[0])
            tlm_errorf("--dtype %s needs the CUDA backend, which is unavailable (%s): use --dtype fp32 or auto",
                       dtype, why);
        else
            tlm_errorf("--dtype %s needs the CUDA backend: the CPU trains in fp32 only; use --dtype fp32 or auto, "
                       "or --device cuda", dtype);
        return NULL;
    }
    return ref ? cpu_ref_ops_create() : cpu_ops_create(threads);
}

tlm_ops *ops_create_ex(const char *spec, int threads, const char *dtype, char *note, size_t note_len) {
    if (note && note_len) note[0] = 0;
    if (!spec || !*spec) spec = "auto";
    if (ops_check_dtype(dtype)) return NULL;
    /* what the CUDA module is asked for: auto means the tensor cores */
    const char *cuda_dtype = !dtype ? NULL : !strcmp(dtype, "auto") ? "bf16" : dtype;
    tlm_ops *o = NULL;
    if (strcmp(spec, "cpu") == 0) {
        o = ops_cpu_for(dtype, 0, threads, NULL);
        if (o) ops_fmt(note, note_len, "%s", "cpu");
        return o;
    }
    if (strcmp(spec, "cpu-ref") == 0) {
        o = ops_cpu_for(dtype, 1, threads, NULL);
        if (o) ops_fmt(note, note_len, "%s", "cpu-ref (reference loops, single thread)");
        return o;
    }
    char banner[256] = "", why[512] = "";
    if (strcmp(spec, "auto") == 0) {
        o = ops_cuda_try(0, cuda_dtype, banner, sizeof banner, why, sizeof why);
        if (o) {
            ops_fmt(note, note_len, "%s", banner);
            return o;
        }
        o = ops_cpu_for(dtype, 0, threads, why[0] ? why : "no CUDA backend module found");
        if (!o) return NULL;
        if (why[0]) {
            ops_fmt(note, note_len, "cpu (CUDA unavailable: %s)", why);
        } else {
            ops_fmt(note, note_len, "%s", "cpu (no CUDA backend module found)");
        }
        return o;
    }
    if (strncmp(spec, "cuda", 4) == 0) {
        int dev = ops_parse_cuda(spec);
        if (dev < 0) {
            tlm_errorf("--device %s: malformed CUDA device, expected cuda or cuda:N (N = GPU index, e.g. cuda:0)",
                       spec);
            return NULL;
        }
        o = ops_cuda_try(dev, cuda_dtype, banner, sizeof banner, why, sizeof why);
        if (o) {
            ops_fmt(note, note_len, "%s", banner);
            return o;
        }
        if (why[0])
            tlm_errorf("--device %s: %s: use --device cpu", spec, why);
        else
            tlm_errorf("--device %s: no CUDA backend found (%s not installed or no GPU): use --device cpu", spec,
                       OPS_CUDA_MODULE);
        return NULL;
    }
    tlm_errorf("--device %s: unknown device, expected one of auto, cpu, cpu-ref, cuda, cuda:N", spec);
    return NULL;
}

tlm_ops *ops_create(const char *spec, int threads, char *note, size_t note_len) {
    return ops_create_ex(spec, threads, NULL, note, note_len);
}

int ops_status(tlm_ops *o) { return o && o->status ? o->status(o) : 0; }

void ops_destroy(tlm_ops *o) {
    if (o && o->destroy) o->destroy(o);
}

/* ---- matmul_ex for fp32 backends ------------------------------------------ */

/* The stored matrix of an operand (rows x cols with row stride ld) as fp32:
 * the pointer itself when it is fp32, else a dense widened copy in *tmp
 * (bf16 -> fp32 is exact: the bits move up by 16). */
static const float *ops_as_f32(const void *p, int dt, int rows, int cols, int *ld, float **tmp) {
    *tmp = NULL;
    if (dt != TLM_ACT_BF16) return p;
    size_t n = (size_t)rows * (size_t)cols;
    float *f = tlm_alloc((n ? n : 1) * sizeof(float));
    if (!f) return NULL;
    const uint16_t *b = p;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            uint32_t u = (uint32_t)b[(size_t)r * (size_t)*ld + (size_t)c] << 16;
            memcpy(&f[(size_t)r * (size_t)cols + (size_t)c], &u, sizeof u);
        }
    *ld = cols;
    *tmp = f;
    return f;
}

/* fp32 -> bf16, round to nearest even (NaN stays a quiet NaN). */
static uint16_t ops_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void ops_matmul_ex_f32(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const void *A, int adt,
                       int lda, const void *B, int bdt, int ldb, float beta, void *C, int cdt, int ldc) {
    if (adt != TLM_ACT_BF16 && bdt != TLM_ACT_BF16 && cdt != TLM_ACT_BF16) {
        o->matmul(o, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (M <= 0 || N <= 0) return;
    float *ta = NULL, *tb = NULL, *tc = NULL;
    int ldc32 = ldc;
    const float *a = ops_as_f32(A, adt, transA ? K : M, transA ? M : K, &lda, &ta);
    const float *b = ops_as_f32(B, bdt, transB ? N : K, transB ? K : N, &ldb, &tb);
    float *c = (float *)ops_as_f32(C, cdt, M, N, &ldc32, &tc);
    if (a && b && c) {
        o->matmul(o, transA, transB, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc32);
        if (cdt == TLM_ACT_BF16) {
            uint16_t *cb = C;
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++)
                    cb[(size_t)i * (size_t)ldc + (size_t)j] = ops_f32_to_bf16(c[(size_t)i * (size_t)N + (size_t)j]);
        }
    }
    tlm_free(ta);
    tlm_free(tb);
    tlm_free(tc);
}
