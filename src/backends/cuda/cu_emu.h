/*
 * A host emulation of the small part of CUDA and cuBLAS that the CUDA
 * backend uses, so that its kernels run (slowly) on a machine without a GPU.
 *
 * Why: the backend is written and compiled on machines that have nvcc but
 * no GPU, and a GPU is lent only for short sessions. Compiling the very
 * same kernel sources as C++ against this header (-DTLM_CUDA_EMU) lets
 * tests/test_cuda.c check every kernel's indexing, reductions, warp
 * shuffles and barriers against the CPU reference here, and under
 * AddressSanitizer every out-of-bounds access too; the GPU session then
 * only has to confirm what cannot be emulated (real concurrency, the real
 * cuBLAS, speed).
 *
 * How: each CUDA thread of a block is a fiber (ucontext) on the calling OS
 * thread; blocks run one after the other. __syncthreads and the warp
 * intrinsics are scheduling points: a barrier opens when every thread of
 * the block waits at it, a warp operation when all 32 lanes of the warp
 * wait at it. Stricter than the hardware on purpose: a barrier or a
 * full-mask warp operation that some threads can never reach (they
 * exited, or wait elsewhere) aborts with a message instead of hanging.
 * `__shared__` becomes `static`, which is exactly block-shared storage when
 * blocks run one at a time. Device memory is host memory; streams and
 * events are no-ops because everything runs in order.
 *
 * Environment (tests): TLM_CUDA_EMU_NODEV=1 makes cudaGetDeviceCount
 * report no device, to exercise the "no GPU" path.
 */
#ifndef TLM_BACKENDS_CUDA_EMU_H
#define TLM_BACKENDS_CUDA_EMU_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

/* ---- language ---------------------------------------------------------- */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float2 make_float2(float a, float b) { return float2{a, b}; }
static inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* Round-to-nearest products and sums that nvcc never fuses into an FMA
 * (host C++ here is built without contraction, so plain operators do). */
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }

/* bfloat16: the top half of a float, rounded to nearest even. */
struct __nv_bfloat16 {
    uint16_t bits;
};
static inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (uint16_t)(u >> 16);
    }
    return r;
}
static inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- the fiber scheduler ----------------------------------------------- */

/* On x86-64 fibers switch with a few instructions (callee-saved registers,
 * the SSE and x87 control words, the stack pointer); swapcontext would make
 * two system calls per switch (it saves the signal mask), which dominated
 * the emulator's run time. Elsewhere ucontext does the job. */
#if defined(__x86_64__)
#define EMU_FAST_SWITCH 1
__attribute__((naked, noinline)) static void emu_switch([[maybe_unused]] void **save_sp, [[maybe_unused]] void *load_sp) {
    __asm__ volatile("pushq %rbp\n\t"
                     "pushq %rbx\n\t"
                     "pushq %r12\n\t"
                     "pushq %r13\n\t"
                     "pushq %r14\n\t"
                     "pushq %r15\n\t"
                     "subq $8, %rsp\n\t"
                     "stmxcsr (%rsp)\n\t"
                     "fnstcw 4(%rsp)\n\t"
                     "movq %rsp, (%rdi)\n\t"
                     "movq %rsi, %rsp\n\t"
                     "ldmxcsr (%rsp)\n\t"
                     "fldcw 4(%rsp)\n\t"
                     "addq $8, %rsp\n\t"
                     "popq %r15\n\t"
                     "popq %r14\n\t"
                     "popq %r13\n\t"
                     "popq %r12\n\t"
                     "popq %rbx\n\t"
                     "popq %rbp\n\t"
                     "ret\n\t");
}
#else
#define EMU_FAST_SWITCH 0
#endif

namespace emu {

enum { RUN, AT_BAR, AT_WARP, DONE };
enum { W_SYNC = 1, W_XOR, W_IDX, W_UP, W_BALLOT };

struct fiber {
#if EMU_FAST_SWITCH
    void *sp; /* saved stack pointer while switched out */
#else
    ucontext_t uc;
#endif
    char *stack;
    dim3 tid;
    int state;
    int op, arg;
    uint64_t val, res;
    void *fake; /* ASan fake-stack handle while switched out */
};

struct state {
    fiber *f = nullptr;
    int nf = 0, cap = 0, cur = 0;
#if EMU_FAST_SWITCH
    void *sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    dim3 bidx, bdim, gdim;
    std::function<void()> body;
    const void *sched_bottom = nullptr;
    size_t sched_size = 0;
    void *sched_fake = nullptr;
};

inline state g;
constexpr size_t kStack = 256 * 1024;

[[noreturn]] inline void die(const char *msg) {
    fprintf(stderr, "cuda emulator: %s (block %u,%u,%u)\n", msg, g.bidx.x, g.bidx.y, g.bidx.z);
    abort();
}

/* Leave the current fiber for the scheduler; returns when resumed. */
inline void yield() {
    fiber &f = g.f[g.cur];
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&f.fake, g.sched_bottom, g.sched_size);
#endif
#if EMU_FAST_SWITCH
    emu_switch(&f.sp, g.sched_sp);
#else
    swapcontext(&f.uc, &g.sched);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake, &g.sched_bottom, &g.sched_size);
#endif
}

inline void entry() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g.sched_bottom, &g.sched_size);
#endif
    g.body();
    g.f[g.cur].state = DONE;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, g.sched_bottom, g.sched_size);
#endif
#if EMU_FAST_SWITCH
    emu_switch(&g.f[g.cur].sp, g.sched_sp); /* never resumed */
    __builtin_unreachable();
#endif
    /* returning switches to uc_link, the scheduler */
}

inline void syncthreads() {
    g.f[g.cur].state = AT_BAR;
    yield();
}

template <class T> T warp_op(int op, T v, int arg) {
    static_assert(sizeof(T) <= 8, "warp operand too large");
    fiber &f = g.f[g.cur];
    f.state = AT_WARP;
    f.op = op;
    f.arg = arg;
    f.val = 0;
    memcpy(&f.val, &v, sizeof v);
    yield();
    T r;
    memcpy(&r, &g.f[g.cur].res, sizeof r);
    return r;
}

/* All 32 lanes of warp w wait at a warp operation: compute every lane's
 * result. Returns 0 if the warp cannot proceed yet, 1 if it was released. */
inline int resolve_warp(int w) {
    fiber *L = g.f + 32 * w;
    int waiting = 0, done = 0;
    for (int i = 0; i < 32; i++) {
        waiting += L[i].state == AT_WARP;
        done += L[i].state == DONE;
    }
    if (waiting == 0) return 0;
    if (done) die("a full-mask warp operation with lanes that already exited");
    if (waiting < 32) return 0; /* some lanes wait at a barrier: deadlock check decides */
    int op = L[0].op;
    for (int i = 1; i < 32; i++)
        if (L[i].op != op) die("lanes of one warp wait at different warp operations (divergent shuffle)");
    uint64_t ballot = 0;
    if (op == W_BALLOT)
        for (int i = 0; i < 32; i++) ballot |= (uint64_t)(L[i].val != 0) << i;
    for (int i = 0; i < 32; i++) {
        int src = i;
        switch (op) {
        case W_XOR: src = i ^ (L[i].arg & 31); break;
        case W_IDX: src = L[i].arg & 31; break;
        case W_UP: src = i - L[i].arg >= 0 ? i - L[i].arg : i; break;
        default: break;
        }
        L[i].res = op == W_BALLOT ? ballot : L[src].val;
    }
    for (int i = 0; i < 32; i++) L[i].state = RUN;
    return 1;
}

inline void run_block() {
    for (int i = 0; i < g.nf; i++) {
        fiber &f = g.f[i];
        unsigned x = g.bdim.x, y = g.bdim.y;
        f.tid = dim3(i % x, (i / x) % y, i / (x * y));
        f.state = RUN;
        f.fake = nullptr;
#if EMU_FAST_SWITCH
        /* a stack that emu_switch "returns" into entry() from: saved
         * registers (zero), default MXCSR and x87 control words, and the
         * return address in a 16-byte aligned slot, as after a call */
        uint64_t *sp = (uint64_t *)(((uintptr_t)f.stack + kStack) & ~(uintptr_t)15);
        *--sp = 0;
        *--sp = (uint64_t)(uintptr_t)&entry;
        for (int r = 0; r < 6; r++) *--sp = 0;
        *--sp = 0x1F80u | ((uint64_t)0x037Fu << 32);
        f.sp = sp;
#else
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = f.stack;
        f.uc.uc_stack.ss_size = kStack;
        f.uc.uc_link = &g.sched;
        makecontext(&f.uc, (void (*)())entry, 0);
#endif
    }
    for (;;) {
        for (int i = 0; i < g.nf; i++) {
            if (g.f[i].state != RUN) continue;
            g.cur = i;
#if EMU_ASAN
            __sanitizer_start_switch_fiber(&g.sched_fake, g.f[i].stack, kStack);
#endif
#if EMU_FAST_SWITCH
            emu_switch(&g.sched_sp, g.f[i].sp);
#else
            swapcontext(&g.sched, &g.f[i].uc);
#endif
#if EMU_ASAN
            __sanitizer_finish_switch_fiber(g.sched_fake, &g.sched_bottom, &g.sched_size);
#endif
        }
        int done = 0, bar = 0;
        for (int i = 0; i < g.nf; i++) {
            done += g.f[i].state == DONE;
            bar += g.f[i].state == AT_BAR;
        }
        if (done == g.nf) return;
        int progressed = 0;
        for (int w = 0; w < g.nf / 32; w++) progressed |= resolve_warp(w);
        if (progressed) continue;
        if (bar > 0 && bar + done == g.nf) {
            if (done) die("__syncthreads reached after some threads of the block exited");
            for (int i = 0; i < g.nf; i++) g.f[i].state = RUN;
            continue;
        }
        die("deadlock: threads wait at a barrier while others wait at a warp operation");
    }
}

template <class K, class... A> void launch(K kernel, dim3 grid, dim3 block, A... args) {
    int nt = (int)(block.x * block.y * block.z);
    if (nt <= 0 || nt > 1024 || nt % 32) die("block size must be a multiple of 32 up to 1024");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) die("empty grid");
    if (nt > g.cap) {
        for (int i = 0; i < g.cap; i++) free(g.f[i].stack);
        free(g.f);
        g.f = (fiber *)calloc((size_t)nt, sizeof(fiber));
        if (!g.f) die("out of memory for fibers");
        for (int i = 0; i < nt; i++) {
            g.f[i].stack = (char *)malloc(kStack);
            if (!g.f[i].stack) die("out of memory for fiber stacks");
        }
        g.cap = nt;
    }
    g.nf = nt;
    g.bdim = block;
    g.gdim = grid;
    g.body = [=]() { kernel(args...); };
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                g.bidx = dim3(x, y, z);
                run_block();
            }
    g.body = nullptr;
}

} // namespace emu

#define threadIdx (emu::g.f[emu::g.cur].tid)
#define blockIdx (emu::g.bidx)
#define blockDim (emu::g.bdim)
#define gridDim (emu::g.gdim)

static inline void __syncthreads() { emu::syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    (void)mask;
    emu::warp_op<int>(emu::W_SYNC, 0, 0);
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    (void)mask;
    if (width != 32) emu::die("only full-width shuffles are emulated");
    return emu::warp_op<T>(emu::W_XOR, v, lane_mask);
}
template <class T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    (void)mask;
    if (width != 32) emu::die("only full-width shuffles are emulated");
    return emu::warp_op<T>(emu::W_IDX, v, src);
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)mask;
    if (width != 32) emu::die("only full-width shuffles are emulated");
    return emu::warp_op<T>(emu::W_UP, v, (int)delta);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    (void)mask;
    return (unsigned)emu::warp_op<int>(emu::W_BALLOT, pred != 0, 0);
}
/* One OS thread runs every fiber and a fiber only yields at the intrinsics
 * above, so a read-modify-write is atomic here. */
static inline float atomicAdd(float *a, float v) {
    float old = *a;
    *a = old + v;
    return old;
}

/* ---- runtime API -------------------------------------------------------- */

typedef int cudaError_t;
enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidDevice = 101,
    cudaErrorNoDevice = 100,
    cudaErrorNotReady = 600,
};
typedef struct emu_stream *cudaStream_t;
typedef struct emu_event *cudaEvent_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
#define cudaStreamNonBlocking 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocPortable 0x01

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    int major, minor;
    int multiProcessorCount;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    int pciBusID;
};

static inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "unknown error";
    }
}
static inline const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaErrorUnknown";
    }
}
static inline int emu_device_count() {
    const char *e = getenv("TLM_CUDA_EMU_NODEV");
    return e && *e && strcmp(e, "0") != 0 ? 0 : 1;
}
static inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = emu_device_count();
    return *n ? cudaSuccess : cudaErrorNoDevice;
}
static inline cudaError_t cudaSetDevice(int d) { return d >= 0 && d < emu_device_count() ? cudaSuccess : cudaErrorInvalidDevice; }
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    if (d < 0 || d >= emu_device_count()) return cudaErrorInvalidDevice;
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "tinylm CUDA emulator");
    p->totalGlobalMem = (size_t)1 << 30;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 2;
    p->sharedMemPerBlock = 48 * 1024;
    p->sharedMemPerBlockOptin = 227 * 1024;
    return cudaSuccess;
}
static inline cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return cudaSuccess; }
static inline cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return cudaSuccess; }
static inline cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total) {
    *free_b = (size_t)1 << 30;
    *total = (size_t)1 << 30;
    return cudaSuccess;
}
static inline cudaError_t cudaGetLastError() { return cudaSuccess; }
static inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
/* Exactly the bytes asked for, so AddressSanitizer sees any overrun. */
static inline cudaError_t cudaMalloc(void **p, size_t bytes) {
    *p = nullptr;
    if (posix_memalign(p, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
    memset(*p, 0xA5, bytes); /* device memory starts as garbage */
    return cudaSuccess;
}
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t bytes) { return cudaMalloc((void **)p, bytes); }
static inline cudaError_t cudaFree(void *p) {
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned flags) {
    (void)flags;
    *p = nullptr;
    return posix_memalign(p, 4096, bytes ? bytes : 1) == 0 ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaFreeHost(void *p) {
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
    (void)k;
    (void)st;
    if (n) memmove(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st) {
    (void)st;
    if (n) memset(d, v, n);
    return cudaSuccess;
}
static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) {
    (void)f;
    static int token;
    *s = (cudaStream_t)(void *)&token;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamDestroy(cudaStream_t s) { (void)s; return cudaSuccess; }
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { (void)s; return cudaSuccess; }
/* Work runs when it is enqueued, so everything has always finished. */
static inline cudaError_t cudaStreamQuery(cudaStream_t s) { (void)s; return cudaSuccess; }
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f) {
    (void)f;
    static int token;
    *e = (cudaEvent_t)(void *)&token;
    return cudaSuccess;
}
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) { (void)e; return cudaSuccess; }
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) { (void)e; (void)s; return cudaSuccess; }
static inline cudaError_t cudaEventQuery(cudaEvent_t e) { (void)e; return cudaSuccess; }
static inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { (void)e; return cudaSuccess; }
static inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned f) {
    (void)s;
    (void)e;
    (void)f;
    return cudaSuccess;
}

/* ---- cuBLAS (column-major reference products) --------------------------- */

typedef struct emu_blas *cublasHandle_t;
typedef int cublasStatus_t;
#define CUBLAS_STATUS_SUCCESS 0
#define CUBLAS_STATUS_INVALID_VALUE 7
#define CUBLAS_VER_MAJOR 13
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_PEDANTIC_MATH = 2 } cublasMath_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;

static inline cublasStatus_t cublasCreate_v2(cublasHandle_t *h) {
    static int token;
    *h = (cublasHandle_t)(void *)&token;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasDestroy_v2(cublasHandle_t h) { (void)h; return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
    (void)h;
    (void)s;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    (void)h;
    (void)m;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void *w, size_t n) {
    (void)h;
    (void)w;
    (void)n;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasGetVersion_v2(cublasHandle_t h, int *v) {
    (void)h;
    *v = 130000;
    return CUBLAS_STATUS_SUCCESS;
}
static inline const char *cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_INVALID_VALUE";
}

/* C[m,n] = alpha op(A)[m,k] op(B)[k,n] + beta C, column-major; element
 * loaders abstract the data type. Argument checks follow cuBLAS's. */
template <class LA, class LB>
static inline cublasStatus_t emu_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha,
                                      LA la, int lda, LB lb, int ldb, float beta, float *C, int ldc) {
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (lda < (ta == CUBLAS_OP_N ? (m > 1 ? m : 1) : (k > 1 ? k : 1))) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldb < (tb == CUBLAS_OP_N ? (k > 1 ? k : 1) : (n > 1 ? n : 1))) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldc < (m > 1 ? m : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double acc = 0;
            for (int p = 0; p < k; p++) {
                double a = ta == CUBLAS_OP_N ? la((size_t)p * lda + i) : la((size_t)i * lda + p);
                double b = tb == CUBLAS_OP_N ? lb((size_t)j * ldb + p) : lb((size_t)p * ldb + j);
                acc += a * b;
            }
            float *c = &C[(size_t)j * ldc + i];
            *c = beta == 0.0f ? (float)(alpha * acc) : (float)(alpha * acc + (double)beta * *c);
        }
    return CUBLAS_STATUS_SUCCESS;
}

static inline cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                            int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                                            const float *beta, float *C, int ldc) {
    (void)h;
    return emu_gemm(
        ta, tb, m, n, k, *alpha, [A](size_t i) { return A[i]; }, lda, [B](size_t i) { return B[i]; }, ldb, *beta, C,
        ldc);
}

static inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType at, int lda,
                                          const void *B, cudaDataType bt, int ldb, const void *beta, void *C,
                                          cudaDataType ct, int ldc, cublasComputeType_t comp, cublasGemmAlgo_t algo) {
    (void)h;
    (void)algo;
    /* the combinations tinylm uses, all listed by cuBLAS: fp32 A, B, C
     * (compute 32F or 32F_FAST_TF32); bf16 A, B with fp32 or bf16 C
     * (compute 32F). Anything else is refused, as cuBLAS would. */
    if (at != bt || (ct != CUDA_R_32F && !(ct == CUDA_R_16BF && at == CUDA_R_16BF)))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (comp != CUBLAS_COMPUTE_32F && !(comp == CUBLAS_COMPUTE_32F_FAST_TF32 && at == CUDA_R_32F))
        return CUBLAS_STATUS_INVALID_VALUE;
    float al = *(const float *)alpha, be = *(const float *)beta;
    if (ct == CUDA_R_16BF) {
        /* fp32 accumulation, C read (beta) and written as bf16: through a
         * widened copy of C, rounded once at the end */
        if (ldc < (m > 1 ? m : 1) || n < 0 || m < 0) return CUBLAS_STATUS_INVALID_VALUE;
        __nv_bfloat16 *cb = (__nv_bfloat16 *)C;
        std::vector<float> cf((size_t)ldc * (n > 0 ? n : 1));
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) cf[(size_t)j * ldc + i] = __bfloat162float(cb[(size_t)j * ldc + i]);
        cublasStatus_t st = cublasGemmEx(h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, cf.data(),
                                         CUDA_R_32F, ldc, comp, algo);
        if (st != CUBLAS_STATUS_SUCCESS) return st;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) cb[(size_t)j * ldc + i] = __float2bfloat16(cf[(size_t)j * ldc + i]);
        return st;
    }
    if (comp == CUBLAS_COMPUTE_32F_FAST_TF32) {
        /* the tensor cores read each fp32 operand with 10 mantissa bits:
         * rounded to nearest here (hardware may truncate: within the tests'
         * bounds either way) */
        auto tf32 = [](float f) {
            uint32_t u;
            memcpy(&u, &f, 4);
            if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
            memcpy(&f, &u, 4);
            return f;
        };
        const float *a = (const float *)A, *b = (const float *)B;
        return emu_gemm(
            ta, tb, m, n, k, al, [a, tf32](size_t i) { return tf32(a[i]); }, lda,
            [b, tf32](size_t i) { return tf32(b[i]); }, ldb, be, (float *)C, ldc);
    }
    if (at == CUDA_R_32F) {
        const float *a = (const float *)A, *b = (const float *)B;
        return emu_gemm(
            ta, tb, m, n, k, al, [a](size_t i) { return a[i]; }, lda, [b](size_t i) { return b[i]; }, ldb, be,
            (float *)C, ldc);
    }
    const __nv_bfloat16 *a = (const __nv_bfloat16 *)A, *b = (const __nv_bfloat16 *)B;
    return emu_gemm(
        ta, tb, m, n, k, al, [a](size_t i) { return __bfloat162float(a[i]); }, lda,
        [b](size_t i) { return __bfloat162float(b[i]); }, ldb, be, (float *)C, ldc);
}

#endif
