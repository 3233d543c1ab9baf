/*
 * Internal header of the CUDA backend (src/backends/cuda): the backend
 * context, error handling, kernel launches, and device helpers shared by
 * cu_backend.cu, cu_kernels.cu and cu_attn.cu.
 *
 * The same sources also compile as plain C++ against cu_emu.h
 * (-DTLM_CUDA_EMU) so tests can run every kernel without a GPU; that is
 * why launches go through CU_LAUNCH and kernels use only the intrinsics
 * the emulator provides (__syncthreads, __syncwarp, __shfl_*_sync,
 * __ballot_sync, static __shared__ arrays).
 */
#ifndef TLM_BACKENDS_CUDA_INTERNAL_H
#define TLM_BACKENDS_CUDA_INTERNAL_H

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#ifdef TLM_CUDA_EMU
#include "backends/cuda/cu_emu.h"
#define CU_LAUNCH(kernel, grid, block, stream, ...)                                                            \
    emu::launch((stream), kernel, dim3(grid), dim3(block), __VA_ARGS__)
#else
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
/* `kernel` is a plain name or a function-pointer variable (templates are
 * bound to a variable first, so their commas never reach the macro). */
#define CU_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
/* The emulator fills these __shared__ arrays with garbage at each block
 * start (cu_emu.h); on a GPU they start as garbage anyway. */
#define CU_SHARED_POISON(...)
#endif

extern "C" {
#include "ops/ops.h"
}

#define CU_FULL 0xffffffffu
#define CU_LOG2E 1.4426950408889634f
#define CU_LN2 0.6931471805599453f

/* Matrix-product precision, chosen at start-up. */
enum { CU_DTYPE_FP32 = 0, CU_DTYPE_BF16 = 1, CU_DTYPE_TF32 = 2 };

/* cuBLAS is opened with dlopen once a GPU is known to be there: linking it
 * would make every tinylm start (even --device cpu on a machine without a
 * GPU, which still probes the module on auto) map ~600 MB of libraries. */
struct cu_blas_api {
    decltype(&cublasCreate_v2) create;
    decltype(&cublasDestroy_v2) destroy;
    decltype(&cublasSetStream_v2) set_stream;
    decltype(&cublasSetMathMode) set_math_mode;
    decltype(&cublasSetWorkspace_v2) set_workspace;
    decltype(&cublasGetVersion_v2) get_version;
    decltype(&cublasGetStatusString) status_string;
    decltype(&cublasSgemm_v2) sgemm;
    /* spelled out: C++ sees an overload of cublasGemmEx in cublas_api.h */
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *,
                              const void *, cudaDataType, int, const void *, cudaDataType, int, const void *, void *,
                              cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
};

/* A host buffer from host_alloc: copies from it are truly asynchronous. */
struct cu_pin {
    void *p;
    size_t n;
};

struct cu_ctx {
    int device;
    int dtype;             /* CU_DTYPE_* for matrix products */
    int act16;             /* activations are bf16 (o->act_dtype TLM_ACT_BF16): the bf16 mode */
    int sm_count;
    int sync_check;        /* TLM_CUDA_SYNC=1: synchronise after every op */
    cudaStream_t stream;   /* every op runs here, in order */
    cudaStream_t copy;     /* host-to-device copies out of pinned buffers */
    cudaEvent_t ev_compute, ev_copied;
    /* How often the host waited: for the compute stream (copy_d2h, sync,
     * growing scratch or the RoPE table), and for an upload's event
     * (event_done with wait, when it had not passed). Diagnostics: tests
     * hold a training step to its budget of host waits with them
     * (tlm_cuda_wait_counts). */
    long host_syncs, event_waits;

    void *blas_lib;
    cu_blas_api blas;
    cublasHandle_t blas_h;
    void *blas_ws;

    void *scratch;         /* per-op temporary device memory, grown on demand */
    size_t scratch_bytes;

    float2 *rope_tab;      /* [rope_len, hd/2] (cos, sin) */
    int rope_len, rope_hd;
    float rope_theta;

    pthread_mutex_t pin_mu;
    cu_pin *pins;
    int npins, cap_pins;

    /* Recording a graph (ops.h's graph block): ops enqueued on `stream`
     * are captured, not run. Whatever breaks a recording (an op that would
     * wait, allocate or grow memory, a CUDA call refused during capture)
     * goes to cap_err instead of the sticky `failed`: graph_end then
     * discards the recording and the backend carries on. */
    int capturing;
    int cap_failed;
    char cap_err[512];
    /* Bumped whenever memory whose address recorded ops hold is replaced
     * (scratch, the RoPE table): a graph recorded under another value is
     * stale and graph_launch refuses it. */
    unsigned long graph_gen;

    /* Device memory this backend holds (cu_dmalloc), now and at most: sizes
     * by address in dev_sizes (a std::unordered_map, owned here). */
    void *dev_sizes;
    size_t dev_in_use, dev_peak;

    int started;           /* start-up is over (error messages then say what to do) */
    int failed;            /* sticky: after a device error every op is a no-op */
    char err[512];
};

static inline cu_ctx *cu_of(tlm_ops *o) { return (cu_ctx *)o->ctx; }

/* Record a failure: the first message sticks in c->err, and goes to
 * tlm_errorf when the host program exports it. */
void cu_fail(cu_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Check a runtime call; on error record "<what>: <CUDA message>". */
bool cu_ok_at(cu_ctx *c, cudaError_t e, const char *what, int line);
#define CU_OK(c, call) cu_ok_at((c), (call), #call, __LINE__)
/* After a kernel launch: launch errors (bad configuration) and, with
 * TLM_CUDA_SYNC=1, execution errors of this very op. */
void cu_after(cu_ctx *c, const char *op);
/* Block the host until stream s has run everything enqueued on it,
 * counted in c->host_syncs; false (and the backend failed) on an error. */
bool cu_host_wait(cu_ctx *c, cudaStream_t s, const char *what);
/* Scratch device memory of at least `bytes` for the op in progress
 * (valid until the next call). NULL and a recorded error on failure. */
void *cu_scratch(cu_ctx *c, size_t bytes);
/* RoPE over qkv[B,T,3D] (dir 1: forward, -1: inverse) with the angle table
 * grown to npos positions; the first position is *pos_dev (device) when
 * given, read as the kernel runs, else pos0 (cu_kernels.cu). */
void cu_rope_run(cu_ctx *c, float *qkv, int B, int T, int H, int hd, int pos0, const int32_t *pos_dev, int npos,
                 float theta, float dir);
/* cudaMalloc / cudaFree that keep count of the bytes held (ops.h
 * mem_usage). Every device allocation of the backend goes through them. */
cudaError_t cu_dmalloc(cu_ctx *c, void **p, size_t bytes);
void cu_dfree(cu_ctx *c, void *p);
/* Grid size for a grid-stride loop over n items with `per_block` items
 * handled per block and pass. */
unsigned cu_grid(const cu_ctx *c, size_t n, unsigned per_block);

/* A one-line error for the host program (tlm_errorf), without marking the
 * backend failed: for errors with a return path (allocation, packing). */
void cu_report(const char *msg);

void cu_kernels_install(tlm_ops *o);
void cu_attn_install(tlm_ops *o);
void cu_infer_install(tlm_ops *o);
void cu_sample_install(tlm_ops *o);

/* ---- device helpers ------------------------------------------------------ */

static __device__ __forceinline__ int cu_imin(int a, int b) { return a < b ? a : b; }

/* Activation elements (ops.h: act_dtype): kernels are templated on the
 * storage type A (float or __nv_bfloat16) and do their arithmetic in fp32,
 * widening on load and rounding (to nearest even) once on store. */
static __device__ __forceinline__ float cu_ld(const float *p, size_t i) { return p[i]; }
static __device__ __forceinline__ float cu_ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
static __device__ __forceinline__ void cu_st(float *p, size_t i, float v) { p[i] = v; }
static __device__ __forceinline__ void cu_st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }

/* Run the statements with act_t bound to the activation storage type of
 * c (bf16 in the bf16 mode, else float); they cast the op's void *
 * activation pointers to act_t *. One host op, two kernel instantiations. */
#define CU_ACT_DISPATCH(c, ...)                                                                               \
    do {                                                                                                     \
        if ((c)->act16) {                                                                                    \
            typedef __nv_bfloat16 act_t;                                                                     \
            __VA_ARGS__;                                                                                     \
        } else {                                                                                             \
            typedef float act_t;                                                                             \
            __VA_ARGS__;                                                                                     \
        }                                                                                                    \
    } while (0)
static __device__ __forceinline__ int cu_imax(int a, int b) { return a > b ? a : b; }

template <class T> static __device__ __forceinline__ T cu_warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(CU_FULL, v, o);
    return v;
}

static __device__ __forceinline__ float cu_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(CU_FULL, v, o));
    return v;
}

/* Sum over the block; every thread gets the total. red: >= 32 entries of
 * shared memory. Safe to call repeatedly with the same red. */
template <class T> static __device__ __forceinline__ T cu_block_sum(T v, T *red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cu_warp_sum(v);
    __syncthreads(); /* the previous use of red is over */
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : (T)0;
    return cu_warp_sum(v);
}

static __device__ __forceinline__ float cu_block_max(float v, float *red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cu_warp_max(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : -INFINITY;
    return cu_warp_max(v);
}

#endif
