/*
 * The CUDA backend: start-up, errors, memory and transfers, and matrix
 * products through cuBLAS. The other ops are in cu_kernels.cu and
 * cu_attn.cu. Built as the module libtinylm-cuda.so, which src/ops/ops.c
 * opens at run time and enters through tlm_cuda_ops_create.
 *
 * Streams and ordering
 *   Every op is enqueued on one non-blocking compute stream, so ops run in
 *   the order the model calls them and none waits for the host. The host
 *   waits only in copy_d2h (it must hand back data), sync, event_done with
 *   wait, and when scratch memory or the RoPE table must grow (the first
 *   step of a shape).
 *   copy_h2d out of a buffer from host_alloc (page-locked, so the copy is
 *   a true DMA that does not block the host) goes on a second, copy
 *   stream: it first waits for an event recorded on the compute stream
 *   (earlier ops may still read the destination), and the compute stream
 *   then waits for an event recorded after the copy (later ops read it).
 *   Both waits happen on the GPU, but the copy waits for EVERY earlier op.
 *   Contract for the caller: a page-locked source must not be rewritten
 *   until the next copy_d2h or sync. A copy out of ordinary memory goes on
 *   the compute stream; CUDA stages it before returning, so that buffer is
 *   free again at once.
 *   copy_h2d_async is the overlapping form: the copy waits only for the
 *   caller's `after` event (recorded after the last op that read the
 *   destination), so with the destination double-buffered (src/model) the
 *   copy of batch k+1 runs while batch k computes; its `done` event tells
 *   the caller when the source may be rewritten (the trainer releases a
 *   loader slot then).
 *
 * Recorded steps (ops.h's graph block)
 *   graph_begin starts a stream capture of the compute stream; ops then
 *   enqueue into the capture instead of running. While capturing, copies
 *   out of or into pinned buffers stay on the compute stream (one chain of
 *   nodes, no event joins with the copy stream), nothing waits, and
 *   whatever would wait or allocate (scratch or RoPE table growth, sync,
 *   alloc) breaks the recording (cap_err), not the backend. graph_launch is
 *   one cudaGraphLaunch. Scratch and the RoPE table are the backend's own
 *   memory that a graph holds by address: replacing either bumps
 *   graph_gen, and a graph recorded under an older value is refused.
 *
 * Errors
 *   Ops have no error return. A failed CUDA or cuBLAS call records one
 *   message (naming the call and the CUDA error) and the backend turns
 *   "failed": later ops do nothing, and copy_d2h fills its destination
 *   with all-ones bytes (NaN as floats, -1 as ints). ops->status reports
 *   it (and finds errors of kernels still queued, without waiting), so the
 *   caller stops with this message instead of a NaN loss. Each message
 *   names the op or call and ends with what to do. It goes to tlm_errorf
 *   when the host program exports it (the tinylm executable and the tests
 *   link with ENABLE_EXPORTS); the reference is weak, so the module also
 *   loads into a program that does not. Allocation failures are not sticky: alloc
 *   returns NULL with the message, as the CPU backend does.
 *   TLM_CUDA_SYNC=1 synchronises after every op so an asynchronous fault
 *   is reported by the op that caused it (debugging only).
 *
 * Precision (TLM_CUDA_DTYPE, or tlm_cuda_ops_create_ex)
 *   fp32 (default): every product in fp32 on the CUDA cores (cuBLAS default
 *   math, which never uses TF32): matches the CPU reference to ~1e-6.
 *   bf16: products on the tensor cores with bf16 operands and fp32
 *   accumulation. Activations (ops.h: act_dtype TLM_ACT_BF16) are bf16 in
 *   memory: products read them as they are and write them directly in
 *   bf16, and the kernels widen them to fp32 for their arithmetic. The
 *   fp32 operands of a product (weights, the residual gradient) are
 *   rounded to bf16 copies just before it. Weights, their gradients, AdamW
 *   moments and the residual stream stay fp32 (fp32 master weights).
 *   tf32: products on the tensor cores straight from the fp32 operands,
 *   which they read with 10 mantissa bits (TF32), at half bf16's rate but
 *   with no conversion pass over either operand; fp32 accumulation.
 */
#include "backends/cuda/cu_internal.h"

#include <dlfcn.h>

#include <unordered_map>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CU_EXPORT extern "C" __attribute__((visibility("default")))

/* The host program's error setter (util/common.c), when it exports it. */
extern "C" int tlm_errorf(const char *fmt, ...) __attribute__((weak, visibility("default"), format(printf, 1, 2)));

#define CU_BLAS_WORKSPACE (32u << 20) /* what cuBLAS recommends for Hopper */

/* ---- errors -------------------------------------------------------------- */

void cu_report(const char *msg) {
    if (tlm_errorf) tlm_errorf("%s", msg);
}

void cu_fail(cu_ctx *c, const char *fmt, ...) {
    char msg[sizeof c->err];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c->capturing) {
        /* breaks the recording only: graph_end discards it and reports
         * this; a real device fault still shows in status afterwards */
        if (!c->cap_failed) {
            memcpy(c->cap_err, msg, sizeof msg);
            c->cap_failed = 1;
        }
        cu_report(c->cap_err);
        return;
    }
    if (!c->failed) {
        memcpy(c->err, msg, sizeof msg);
        c->failed = 1;
    }
    cu_report(c->err);
}

/* What to do about an error CUDA reported: a kernel's fault surfaces at a
 * later call unless every op is checked as it runs. */
static const char *cu_fix(const cu_ctx *c) {
    if (!c->started) return ""; /* ops.c's start-up message says what to do */
    return c->sync_check ? ": use --device cpu, and report it if it persists"
                         : ": rerun with TLM_CUDA_SYNC=1 to pin it on the op that caused it, or use --device cpu";
}

bool cu_ok_at(cu_ctx *c, cudaError_t e, const char *what, int line) {
    if (e == cudaSuccess) return true;
    cu_fail(c, "CUDA error on cuda:%d in %s (cu_backend line %d): %s (%s)%s", c->device, what, line,
            cudaGetErrorString(e), cudaGetErrorName(e), cu_fix(c));
    return false;
}

void cu_after(cu_ctx *c, const char *op) {
    cudaError_t e = cudaGetLastError();
    /* a recorded op does not run now: nothing to wait for (ops.h) */
    if (e == cudaSuccess && c->sync_check && !c->capturing) e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        cu_fail(c, "CUDA error on cuda:%d in op %s: %s (%s)%s", c->device, op, cudaGetErrorString(e),
                cudaGetErrorName(e), cu_fix(c));
}

bool cu_host_wait(cu_ctx *c, cudaStream_t s, const char *what) {
    if (c->capturing) {
        cu_fail(c, "%s while recording a graph: a recorded step cannot wait for the device (run it once "
                   "un-recorded first, so that nothing has to grow)", what);
        return false;
    }
    c->host_syncs++;
    return cu_ok_at(c, cudaStreamSynchronize(s), what, __LINE__);
}

static bool cu_blas_ok(cu_ctx *c, cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return true;
    cu_fail(c, "cuBLAS error on cuda:%d in %s: %s: use --device cpu, or --dtype fp32 if it happens with bf16",
            c->device, what, c->blas.status_string ? c->blas.status_string(s) : "unknown status");
    return false;
}

typedef std::unordered_map<void *, size_t> cu_size_map;

cudaError_t cu_dmalloc(cu_ctx *c, void **p, size_t bytes) {
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) return e;
    if (!c->dev_sizes) c->dev_sizes = new cu_size_map();
    (*(cu_size_map *)c->dev_sizes)[*p] = bytes;
    c->dev_in_use += bytes;
    if (c->dev_in_use > c->dev_peak) c->dev_peak = c->dev_in_use;
    return e;
}

void cu_dfree(cu_ctx *c, void *p) {
    if (!p) return;
    if (c->dev_sizes) {
        cu_size_map *m = (cu_size_map *)c->dev_sizes;
        auto it = m->find(p);
        if (it != m->end()) {
            c->dev_in_use -= it->second;
            m->erase(it);
        }
    }
    cudaError_t e = cudaFree(p);
    if (e != cudaSuccess && !c->failed) cu_ok_at(c, e, "cudaFree", __LINE__);
}

static void cu_mem_usage(tlm_ops *o, size_t *in_use, size_t *peak) {
    const cu_ctx *c = cu_of(o);
    if (in_use) *in_use = c->dev_in_use;
    if (peak) *peak = c->dev_peak;
}

void *cu_scratch(cu_ctx *c, size_t bytes) {
    if (bytes <= c->scratch_bytes) return c->scratch;
    if (c->capturing) {
        cu_fail(c, "scratch memory must grow to %zu bytes while recording a graph: run the step once un-recorded "
                   "first", bytes);
        return NULL;
    }
    c->graph_gen++; /* recorded steps hold the old block's address */
    size_t want = bytes + bytes / 2;
    /* kernels queued earlier may still use the old block */
    if (c->scratch) {
        if (!cu_host_wait(c, c->stream, "cudaStreamSynchronize (growing scratch)")) return NULL;
        cu_dfree(c, c->scratch);
        c->scratch = NULL;
        c->scratch_bytes = 0;
    }
    void *p = NULL;
    cudaError_t e = cu_dmalloc(c, &p, want);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        cu_fail(c, "out of GPU memory on cuda:%d for %zu bytes of scratch: use a smaller --batch", c->device, want);
        return NULL;
    }
    c->scratch = p;
    c->scratch_bytes = want;
    return p;
}

unsigned cu_grid(const cu_ctx *c, size_t n, unsigned per_block) {
    size_t b = (n + per_block - 1) / per_block;
    size_t cap = (size_t)c->sm_count * 32;
    if (b > cap) b = cap;
    if (b < 1) b = 1;
    return (unsigned)b;
}

/* ---- memory ---------------------------------------------------------------- */

static void *cu_alloc(tlm_ops *o, size_t bytes) {
    cu_ctx *c = cu_of(o);
    if (c->failed) {
        cu_report(c->err);
        return NULL;
    }
    if (c->capturing) {
        cu_fail(c, "alloc while recording a graph: allocate before graph_begin");
        return NULL;
    }
    void *p = NULL;
    cudaError_t e = cu_dmalloc(c, &p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky: clear it */
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        char msg[256];
        snprintf(msg, sizeof msg,
                 "out of GPU memory on cuda:%d allocating %.1f MB (%.1f of %.1f GB free): use a smaller --batch or "
                 "model",
                 c->device, bytes / 1e6, fr / 1e9, tot / 1e9);
        cu_report(msg);
        return NULL;
    }
    /* zero-filled, as the interface promises; ordered before every later op,
     * the copy stream's included: an upload into a fresh buffer (the first
     * batch) must not be overwritten by its zero fill */
    if (!CU_OK(c, cudaMemsetAsync(p, 0, bytes, c->stream)) || !CU_OK(c, cudaEventRecord(c->ev_compute, c->stream)) ||
        !CU_OK(c, cudaStreamWaitEvent(c->copy, c->ev_compute, 0))) {
        cu_dfree(c, p);
        return NULL;
    }
    return p;
}

static void cu_free(tlm_ops *o, void *p) {
    cu_ctx *c = cu_of(o);
    if (!p) return;
    /* cudaFree is refused during a capture and breaks it; freeing is still
     * the right thing for the memory */
    if (c->capturing) cu_fail(c, "free while recording a graph: free after graph_end");
    cu_dfree(c, p);
}

static void cu_pin_add(cu_ctx *c, void *p, size_t n) {
    pthread_mutex_lock(&c->pin_mu);
    if (c->npins == c->cap_pins) {
        int cap = c->cap_pins ? 2 * c->cap_pins : 16;
        cu_pin *np = (cu_pin *)realloc(c->pins, (size_t)cap * sizeof *np);
        if (!np) { /* the buffer then just counts as pageable: still correct */
            pthread_mutex_unlock(&c->pin_mu);
            return;
        }
        c->pins = np;
        c->cap_pins = cap;
    }
    c->pins[c->npins].p = p;
    c->pins[c->npins].n = n;
    c->npins++;
    pthread_mutex_unlock(&c->pin_mu);
}

static void cu_pin_remove(cu_ctx *c, void *p) {
    pthread_mutex_lock(&c->pin_mu);
    for (int i = 0; i < c->npins; i++)
        if (c->pins[i].p == p) {
            c->pins[i] = c->pins[--c->npins];
            break;
        }
    pthread_mutex_unlock(&c->pin_mu);
}

/* Is [p, p+n) inside a host_alloc'ed page-locked buffer? */
static int cu_pin_find(cu_ctx *c, const void *p, size_t n) {
    int found = 0;
    uintptr_t a = (uintptr_t)p;
    pthread_mutex_lock(&c->pin_mu);
    for (int i = 0; i < c->npins && !found; i++) {
        uintptr_t b = (uintptr_t)c->pins[i].p;
        found = a >= b && a + n <= b + c->pins[i].n;
    }
    pthread_mutex_unlock(&c->pin_mu);
    return found;
}

static void *cu_host_alloc(tlm_ops *o, size_t bytes, int *pinned) {
    cu_ctx *c = cu_of(o);
    void *p = NULL;
    size_t n = bytes ? bytes : 1;
    if (c->capturing) cu_fail(c, "host_alloc while recording a graph: allocate before graph_begin");
    if (!c->failed && !c->capturing && cudaHostAlloc(&p, n, cudaHostAllocPortable) == cudaSuccess) {
        memset(p, 0, n);
        cu_pin_add(c, p, n);
        if (pinned) *pinned = 1;
        return p;
    }
    (void)cudaGetLastError();
    /* page-locked memory is a limited resource: fall back to ordinary
     * memory, which still works (each copy is then staged by CUDA) */
    size_t rounded = (n + 63) / 64 * 64;
    p = aligned_alloc(64, rounded);
    if (!p) {
        char msg[160];
        snprintf(msg, sizeof msg, "out of host memory allocating %.1f MB of staging buffers: use a smaller --batch",
                 bytes / 1e6);
        cu_report(msg);
        return NULL;
    }
    memset(p, 0, rounded);
    if (pinned) *pinned = 0;
    return p;
}

static void cu_host_free(tlm_ops *o, void *p, int pinned) {
    cu_ctx *c = cu_of(o);
    if (!p) return;
    if (pinned) {
        cu_pin_remove(c, p);
        cudaError_t e = cudaFreeHost(p);
        if (e != cudaSuccess && !c->failed) cu_ok_at(c, e, "cudaFreeHost", __LINE__);
    } else {
        free(p);
    }
}

static void cu_copy_h2d(tlm_ops *o, void *dst, const void *src, size_t bytes) {
    cu_ctx *c = cu_of(o);
    if (c->failed || bytes == 0) return;
    if (c->capturing) {
        /* Recorded: src is read when the graph runs, so it must stay valid
         * and be pinned (CUDA refuses to capture a pageable copy). On the
         * compute stream itself: a recorded step is one chain of nodes,
         * with no event joins to the copy stream. */
        if (!cu_pin_find(c, src, bytes))
            cu_fail(c, "copy_h2d while recording a graph needs a host_alloc (pinned) source");
        else
            CU_OK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
        return;
    }
    if (cu_pin_find(c, src, bytes)) {
        CU_OK(c, cudaEventRecord(c->ev_compute, c->stream)) &&
            CU_OK(c, cudaStreamWaitEvent(c->copy, c->ev_compute, 0)) &&
            CU_OK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->copy)) &&
            CU_OK(c, cudaEventRecord(c->ev_copied, c->copy)) &&
            CU_OK(c, cudaStreamWaitEvent(c->stream, c->ev_copied, 0));
    } else {
        CU_OK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
    }
    if (c->sync_check && !c->failed) CU_OK(c, cudaStreamSynchronize(c->stream));
}

static void cu_copy_d2h(tlm_ops *o, void *dst, const void *src, size_t bytes) {
    cu_ctx *c = cu_of(o);
    if (bytes == 0) return;
    if (c->capturing) {
        /* recorded, not waited for: dst is written when the graph runs */
        if (c->failed) return;
        if (!cu_pin_find(c, dst, bytes))
            cu_fail(c, "copy_d2h while recording a graph needs a host_alloc (pinned) destination");
        else
            CU_OK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
        return;
    }
    if (!c->failed && CU_OK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream)) &&
        cu_host_wait(c, c->stream, "cudaStreamSynchronize (copy_d2h)"))
        return;
    memset(dst, 0xff, bytes); /* NaN floats, -1 ints: the caller stops */
    cu_report(c->err);
}

static void cu_copy_d2d(tlm_ops *o, void *dst, const void *src, size_t bytes) {
    cu_ctx *c = cu_of(o);
    if (c->failed || bytes == 0) return;
    CU_OK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
}

static void cu_zero(tlm_ops *o, void *p, size_t bytes) {
    cu_ctx *c = cu_of(o);
    if (c->failed || bytes == 0) return;
    CU_OK(c, cudaMemsetAsync(p, 0, bytes, c->stream));
}

static void cu_sync(tlm_ops *o) {
    cu_ctx *c = cu_of(o);
    if (c->failed || c->capturing) return; /* nothing recorded has run yet: nothing to wait for */
    cu_host_wait(c, c->copy, "cudaStreamSynchronize (sync, copy stream)") &&
        cu_host_wait(c, c->stream, "cudaStreamSynchronize (sync)");
}

/* ---- asynchronous uploads ordered by events -------------------------------------- */

struct tlm_event {
    cudaEvent_t ev;
    int recorded; /* an event never recorded has passed */
};

static tlm_event *cu_event_create(tlm_ops *o) {
    cu_ctx *c = cu_of(o);
    if (c->failed) {
        cu_report(c->err);
        return NULL;
    }
    tlm_event *e = (tlm_event *)calloc(1, sizeof *e);
    if (!e) {
        cu_report("out of host memory creating a CUDA event");
        return NULL;
    }
    if (!CU_OK(c, cudaEventCreateWithFlags(&e->ev, cudaEventDisableTiming))) {
        free(e);
        return NULL;
    }
    return e;
}

static void cu_event_destroy(tlm_ops *o, tlm_event *e) {
    (void)o;
    if (!e) return;
    cudaEventDestroy(e->ev);
    free(e);
}

static void cu_event_record(tlm_ops *o, tlm_event *e) {
    cu_ctx *c = cu_of(o);
    if (c->failed || !e) return;
    if (c->capturing) { /* an event inside a graph is not an upload's point in the stream */
        cu_fail(c, "event_record while recording a graph is not supported");
        return;
    }
    if (CU_OK(c, cudaEventRecord(e->ev, c->stream))) e->recorded = 1;
}

/* copy stream: [wait after] [copy] [record ev_copied, done]; compute stream:
 * [wait ev_copied]. The compute stream's wait is enqueued now, so it sits
 * between the ops enqueued before this call and those after it: earlier
 * compute keeps running while the copy proceeds. */
static void cu_copy_h2d_async(tlm_ops *o, void *dst, const void *src, size_t bytes, tlm_event *after,
                              tlm_event *done) {
    cu_ctx *c = cu_of(o);
    if (c->failed) return;
    if (c->capturing) {
        cu_fail(c, "copy_h2d_async while recording a graph is not supported: use copy_h2d");
        return;
    }
    bool ok = true;
    if (after && after->recorded) ok = CU_OK(c, cudaStreamWaitEvent(c->copy, after->ev, 0));
    if (ok && bytes) ok = CU_OK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->copy));
    ok = ok && CU_OK(c, cudaEventRecord(c->ev_copied, c->copy)) &&
         CU_OK(c, cudaStreamWaitEvent(c->stream, c->ev_copied, 0));
    if (ok && done && CU_OK(c, cudaEventRecord(done->ev, c->copy))) done->recorded = 1;
    if (c->sync_check && !c->failed) CU_OK(c, cudaStreamSynchronize(c->copy));
}

static int cu_event_done(tlm_ops *o, tlm_event *e, int wait) {
    cu_ctx *c = cu_of(o);
    if (!e || !e->recorded) return 1;
    cudaError_t q = cudaEventQuery(e->ev);
    if (q == cudaSuccess) return 1;
    if (q == cudaErrorNotReady) {
        if (!wait) return 0;
        c->event_waits++;
        q = cudaEventSynchronize(e->ev);
        if (q == cudaSuccess) return 1;
    }
    /* A device error: after it nothing more runs, so the host has nothing
     * to wait for; status() reports it. */
    if (!c->failed) cu_ok_at(c, q, "cudaEventQuery (waiting for an upload)", __LINE__);
    return 1;
}

/* ---- status -------------------------------------------------------------------- */

static int cu_status(tlm_ops *o) {
    cu_ctx *c = cu_of(o);
    /* querying a capturing stream is refused and would break the recording */
    if (!c->failed && !c->capturing) {
        /* Not a wait: finds a fault of a kernel that already ran (CUDA
         * reports those at some later call), and says "not ready" for
         * work still queued. */
        cudaError_t e = cudaStreamQuery(c->stream);
        if (e != cudaSuccess && e != cudaErrorNotReady)
            cu_fail(c, "CUDA error on cuda:%d while running queued ops: %s (%s)%s", c->device,
                    cudaGetErrorString(e), cudaGetErrorName(e), cu_fix(c));
    }
    if (!c->failed) return 0;
    cu_report(c->err);
    return -1;
}

/* ---- recorded steps (graph block) --------------------------------------------------- */

struct tlm_graph {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    unsigned long gen; /* c->graph_gen when recorded */
};

/* Capture mode ThreadLocal: a call on this thread that is unsafe during a
 * capture (cudaMalloc, a stream synchronisation, ...) fails and breaks the
 * recording instead of silently running at record time; the ops already
 * refuse those themselves, so this only catches what they miss. Other
 * threads (the data loader's) are not affected, as they would be by
 * Global. */
static int cu_graph_begin(tlm_ops *o) {
    cu_ctx *c = cu_of(o);
    if (c->failed) {
        cu_report(c->err);
        return -1;
    }
    if (c->capturing) {
        cu_report("graph_begin: a graph is already being recorded");
        return -1;
    }
    cudaError_t e = cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        char msg[256];
        snprintf(msg, sizeof msg, "cudaStreamBeginCapture on cuda:%d: %s (%s)", c->device, cudaGetErrorString(e),
                 cudaGetErrorName(e));
        cu_report(msg);
        return -1;
    }
    c->capturing = 1;
    c->cap_failed = 0;
    c->cap_err[0] = 0;
    return 0;
}

static tlm_graph *cu_graph_end(tlm_ops *o) {
    cu_ctx *c = cu_of(o);
    if (!c->capturing) {
        cu_report("graph_end without graph_begin");
        return NULL;
    }
    const unsigned long gen = c->graph_gen;
    cudaGraph_t g = NULL;
    /* ends the capture even when it was invalidated: the stream is usable
     * again whatever happened while recording */
    cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    c->capturing = 0;
    char msg[sizeof c->cap_err + 64];
    if (c->cap_failed || e != cudaSuccess || !g) {
        if (g) cudaGraphDestroy(g);
        (void)cudaGetLastError(); /* a capture error is not a device fault */
        snprintf(msg, sizeof msg, "recording a graph failed: %s",
                 c->cap_failed ? c->cap_err : e != cudaSuccess ? cudaGetErrorString(e) : "no graph was captured");
        cu_report(msg);
        return NULL;
    }
    tlm_graph *r = (tlm_graph *)calloc(1, sizeof *r);
    if (!r) {
        cudaGraphDestroy(g);
        cu_report("out of host memory for a recorded graph");
        return NULL;
    }
    e = cudaGraphInstantiate(&r->exec, g, 0);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        cudaGraphDestroy(g);
        free(r);
        snprintf(msg, sizeof msg, "cudaGraphInstantiate on cuda:%d: %s (%s)", c->device, cudaGetErrorString(e),
                 cudaGetErrorName(e));
        cu_report(msg);
        return NULL;
    }
    r->graph = g;
    r->gen = gen;
    return r;
}

static int cu_graph_launch(tlm_ops *o, tlm_graph *g) {
    cu_ctx *c = cu_of(o);
    if (c->failed) {
        cu_report(c->err);
        return -1;
    }
    if (!g || c->capturing) {
        cu_report(g ? "graph_launch while recording a graph is not supported" : "graph_launch: no graph");
        return -1;
    }
    if (g->gen != c->graph_gen) {
        cu_report("graph_launch: the recorded step is stale (scratch memory or the RoPE table was reallocated "
                  "since it was recorded): record it again");
        return -1;
    }
    if (!CU_OK(c, cudaGraphLaunch(g->exec, c->stream))) return -1;
    if (c->sync_check && !cu_host_wait(c, c->stream, "cudaStreamSynchronize (graph_launch)")) return -1;
    return 0;
}

static void cu_graph_destroy(tlm_ops *o, tlm_graph *g) {
    (void)o;
    if (!g) return;
    /* launches still queued complete: CUDA keeps what they need */
    cudaGraphExecDestroy(g->exec);
    cudaGraphDestroy(g->graph);
    free(g);
}

/* ---- matrix products ---------------------------------------------------------- */

/* dst[rows, cols] (dense) = bf16(src[rows, cols] with row stride ld) */
static __global__ void k_to_bf16(__nv_bfloat16 *dst, const float *src, int rows, int cols, int ld) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x)
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            dst[(size_t)r * cols + j] = __float2bfloat16(src[(size_t)r * ld + j]);
}

/* ops.h to_act (installed in the bf16 mode only): the rounding matmul_ex
 * applies to its fp32 operands, so a product gets the same bf16 values
 * either way. */
static void cu_to_act(tlm_ops *o, void *dst, const float *src, size_t n) {
    cu_ctx *c = cu_of(o);
    if (c->failed || n == 0) return;
    /* as rows of 4096 (n <= 2^31: model_alloc_train's limit) so the
     * grid-stride loop over rows spreads the work; the tail as one row */
    const int cols = 4096;
    size_t rows = n / cols, tail = n - rows * cols;
    if (rows)
        CU_LAUNCH(k_to_bf16, cu_grid(c, rows, 1), 256, c->stream, (__nv_bfloat16 *)dst, src, (int)rows, cols, cols);
    if (tail)
        CU_LAUNCH(k_to_bf16, 1, 256, c->stream, (__nv_bfloat16 *)dst + rows * cols, src + rows * cols, 1, (int)tail,
                  (int)tail);
    cu_after(c, "to_act");
}

/* C[M,N] = beta C for a bf16 C (a product with K = 0). */
static __global__ void k_scale_bf16(__nv_bfloat16 *C, int M, int N, int ldc, float beta) {
    for (int r = blockIdx.x; r < M; r += gridDim.x)
        for (int j = threadIdx.x; j < N; j += blockDim.x) {
            size_t i = (size_t)r * ldc + j;
            C[i] = __float2bfloat16(beta == 0.0f ? 0.0f : beta * __bfloat162float(C[i]));
        }
}

static void cu_matmul_ex(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const void *A, int adt,
                         int lda, const void *B, int bdt, int ldb, float beta, void *C, int cdt, int ldc);

/* Row-major C = alpha op(A) op(B) + beta C is, read column-major, the
 * product C^T = op(B)^T op(A)^T: swap the operands and the sizes. */
static void cu_matmul(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc) {
    cu_ctx *c = cu_of(o);
    if (c->failed || M <= 0 || N <= 0) return;
    if (c->dtype == CU_DTYPE_BF16 && K > 0) {
        /* both operands rounded to bf16 copies, C fp32 */
        cu_matmul_ex(o, transA, transB, M, N, K, alpha, A, TLM_ACT_F32, lda, B, TLM_ACT_F32, ldb, beta, C, TLM_ACT_F32,
                     ldc);
        return;
    }
    cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N, opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (c->dtype == CU_DTYPE_TF32 && K > 0) {
        cu_blas_ok(c,
                   c->blas.gemm_ex(c->blas_h, opB, opA, N, M, K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda,
                                   &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT),
                   "gemm_ex (tf32)");
        cu_after(c, "matmul");
        return;
    }
    cu_blas_ok(c, c->blas.sgemm(c->blas_h, opB, opA, N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc), "sgemm");
    cu_after(c, "matmul");
}

/* Per-operand element types (ops.h). All fp32 outside the bf16 mode: the
 * fp32 / tf32 product above, unchanged. Otherwise one cublasGemmEx with
 * bf16 A and B, fp32 compute (CUBLAS_COMPUTE_32F, fp32 alpha and beta) and
 * C in fp32 or bf16 (both are combinations cuBLAS lists for bf16 inputs;
 * with a bf16 C, beta reads C as bf16). bf16 operands are read in place
 * with their strides; an fp32 operand (a weight, the residual gradient) is
 * first rounded into a dense bf16 copy in scratch: one extra pass over it,
 * where the all-fp32 interface needed one over both operands. */
static void cu_matmul_ex(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const void *A, int adt,
                         int lda, const void *B, int bdt, int ldb, float beta, void *C, int cdt, int ldc) {
    cu_ctx *c = cu_of(o);
    if (c->failed || M <= 0 || N <= 0) return;
    const bool a16 = adt == TLM_ACT_BF16, b16 = bdt == TLM_ACT_BF16, c16 = cdt == TLM_ACT_BF16;
    if (!a16 && !b16 && !c16 && (c->dtype != CU_DTYPE_BF16 || K <= 0)) {
        cu_matmul(o, transA, transB, M, N, K, alpha, (const float *)A, lda, (const float *)B, ldb, beta, (float *)C,
                  ldc);
        return;
    }
    if (K <= 0) { /* C = beta C; cuBLAS would reject the degenerate strides */
        if (c16) {
            CU_LAUNCH(k_scale_bf16, cu_grid(c, (size_t)M, 1), 256, c->stream, (__nv_bfloat16 *)C, M, N, ldc, beta);
            cu_after(c, "matmul (bf16, K = 0)");
        } else {
            cu_matmul(o, transA, transB, M, N, K, alpha, NULL, lda, NULL, ldb, beta, (float *)C, ldc);
        }
        return;
    }
    cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N, opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
    /* the stored matrices: A is [ar, ac], B [br, bc], row-major */
    int ar = transA ? K : M, ac = transA ? M : K;
    int br = transB ? N : K, bc = transB ? K : N;
    size_t na = a16 ? 0 : (size_t)ar * ac, nb = b16 ? 0 : (size_t)br * bc;
    size_t off_b = (na * sizeof(__nv_bfloat16) + 255) / 256 * 256;
    const void *ap = A, *bp = B;
    if (na + nb) {
        char *s = (char *)cu_scratch(c, off_b + nb * sizeof(__nv_bfloat16));
        if (!s) return;
        if (!a16) {
            CU_LAUNCH(k_to_bf16, cu_grid(c, (size_t)ar, 1), 256, c->stream, (__nv_bfloat16 *)s, (const float *)A, ar,
                      ac, lda);
            ap = s;
            lda = ac;
        }
        if (!b16) {
            CU_LAUNCH(k_to_bf16, cu_grid(c, (size_t)br, 1), 256, c->stream, (__nv_bfloat16 *)(s + off_b),
                      (const float *)B, br, bc, ldb);
            bp = s + off_b;
            ldb = bc;
        }
        cu_after(c, "matmul (bf16 operands)");
        if (c->failed) return;
    }
    cu_blas_ok(c,
               c->blas.gemm_ex(c->blas_h, opB, opA, N, M, K, &alpha, bp, CUDA_R_16BF, ldb, ap, CUDA_R_16BF, lda, &beta,
                               C, c16 ? CUDA_R_16BF : CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               c16 ? "gemm_ex (bf16, bf16 output)" : "gemm_ex (bf16)");
    cu_after(c, "matmul");
}

/* ---- cuBLAS, opened at run time ------------------------------------------------ */

#define CU_STR2(x) #x
#define CU_STR(x) CU_STR2(x)

static int cu_blas_open(cu_ctx *c, char *why, size_t wn) {
#ifdef TLM_CUDA_EMU
    (void)why;
    (void)wn;
    c->blas_lib = NULL;
    c->blas = cu_blas_api{cublasCreate_v2,       cublasDestroy_v2,      cublasSetStream_v2,
                          cublasSetMathMode,     cublasSetWorkspace_v2, cublasGetVersion_v2,
                          cublasGetStatusString, cublasSgemm_v2,        cublasGemmEx};
    return 0;
#else
    const char *soname = "libcublas.so." CU_STR(CUBLAS_VER_MAJOR);
    void *h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    char first[256] = "";
    if (!h) {
        const char *e = dlerror();
        snprintf(first, sizeof first, "%s", e ? e : soname);
#ifdef TLM_CUDA_LIBDIR
        /* the toolkit this module was built with (it sets its own RUNPATH
         * for libcublasLt) */
        h = dlopen(TLM_CUDA_LIBDIR "/libcublas.so." CU_STR(CUBLAS_VER_MAJOR), RTLD_NOW | RTLD_LOCAL);
#endif
    }
    if (!h) {
        snprintf(why, wn, "cannot load cuBLAS (%s): install the CUDA %d runtime libraries or use --device cpu", first,
                 CUBLAS_VER_MAJOR);
        return -1;
    }
    c->blas_lib = h;
    struct {
        void **slot;
        const char *name;
    } syms[] = {
        {(void **)&c->blas.create, "cublasCreate_v2"},
        {(void **)&c->blas.destroy, "cublasDestroy_v2"},
        {(void **)&c->blas.set_stream, "cublasSetStream_v2"},
        {(void **)&c->blas.set_math_mode, "cublasSetMathMode"},
        {(void **)&c->blas.set_workspace, "cublasSetWorkspace_v2"},
        {(void **)&c->blas.get_version, "cublasGetVersion_v2"},
        {(void **)&c->blas.status_string, "cublasGetStatusString"},
        {(void **)&c->blas.sgemm, "cublasSgemm_v2"},
        {(void **)&c->blas.gemm_ex, "cublasGemmEx"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(h, syms[i].name);
        if (!*syms[i].slot) {
            snprintf(why, wn, "%s has no %s: install cuBLAS %d or use --device cpu", soname, syms[i].name,
                     CUBLAS_VER_MAJOR);
            return -1;
        }
    }
    return 0;
#endif
}

/* ---- start-up -------------------------------------------------------------------- */

static __global__ void k_probe(int *p) {
    if (threadIdx.x == 0) *p = 0x1234;
}

static void cu_destroy(tlm_ops *o) {
    if (!o) return;
    cu_ctx *c = cu_of(o);
    if (c) {
        if (c->stream) cudaStreamSynchronize(c->stream);
        if (c->copy) cudaStreamSynchronize(c->copy);
        if (c->blas_h && c->blas.destroy) c->blas.destroy(c->blas_h);
        cu_dfree(c, c->blas_ws);
        cu_dfree(c, c->scratch);
        cu_dfree(c, c->rope_tab);
        delete (cu_size_map *)c->dev_sizes;
        if (c->ev_compute) cudaEventDestroy(c->ev_compute);
        if (c->ev_copied) cudaEventDestroy(c->ev_copied);
        if (c->copy) cudaStreamDestroy(c->copy);
        if (c->stream) cudaStreamDestroy(c->stream);
        /* cuBLAS stays mapped: its own exit handlers may still run */
        pthread_mutex_destroy(&c->pin_mu);
        free(c->pins);
        free(c);
    }
    free(o);
}

static void cu_note(char *note, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void cu_note(char *note, size_t n, const char *fmt, ...) {
    if (!note || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(note, n, fmt, ap);
    va_end(ap);
}

static int cu_parse_dtype(const char *s) {
    if (!s || !*s || !strcmp(s, "fp32") || !strcmp(s, "float32")) return CU_DTYPE_FP32;
    if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16")) return CU_DTYPE_BF16;
    if (!strcmp(s, "tf32")) return CU_DTYPE_TF32;
    return -1;
}

/* Why cudaGetDeviceCount found nothing usable, as one line. The CUDA
 * runtime says "driver version is insufficient" also when there is no
 * driver at all; which one it is shows in whether it managed to load the
 * driver library. */
static void cu_no_device_note(cudaError_t e, char *note, size_t nn) {
    if (e == cudaSuccess || e == cudaErrorNoDevice) {
        cu_note(note, nn, "no CUDA GPU found");
        return;
    }
#ifndef TLM_CUDA_EMU
    if (e == cudaErrorInsufficientDriver) {
        void *drv = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
        if (!drv) {
            cu_note(note, nn, "no NVIDIA driver (libcuda.so.1 not found)");
            return;
        }
        dlclose(drv);
        cu_note(note, nn, "the NVIDIA driver is older than this build's CUDA %d.%d runtime: update the driver",
                CUDART_VERSION / 1000, CUDART_VERSION / 10 % 100);
        return;
    }
#endif
    cu_note(note, nn, "no usable CUDA driver or GPU (%s)", cudaGetErrorString(e));
}

/* Start the backend on GPU `device`, or NULL with the reason in note. */
static tlm_ops *cu_create(int device, int dtype, char *note, size_t nn) {
    char why[384] = "";
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        cu_no_device_note(e, note, nn);
        return NULL;
    }
    if (device < 0 || device >= count) {
        cu_note(note, nn, "cuda:%d asked for, but this machine has %d CUDA GPU%s (cuda:0%s)", device, count,
                count == 1 ? "" : "s", count > 1 ? "..cuda:N-1" : "");
        return NULL;
    }
    tlm_ops *o = (tlm_ops *)calloc(1, sizeof *o);
    cu_ctx *c = (cu_ctx *)calloc(1, sizeof *c);
    if (!o || !c) {
        free(o);
        free(c);
        cu_note(note, nn, "out of host memory starting the CUDA backend");
        return NULL;
    }
    o->ctx = c;
    pthread_mutex_init(&c->pin_mu, NULL);
    c->device = device;
    c->dtype = dtype;
    c->act16 = dtype == CU_DTYPE_BF16;
    const char *sc = getenv("TLM_CUDA_SYNC");
    c->sync_check = sc && *sc && strcmp(sc, "0") != 0;

    cudaDeviceProp p;
    int *probe = NULL, got = 0;
    if (!CU_OK(c, cudaSetDevice(device)) || !CU_OK(c, cudaGetDeviceProperties(&p, device)) ||
        !CU_OK(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) ||
        !CU_OK(c, cudaStreamCreateWithFlags(&c->copy, cudaStreamNonBlocking)) ||
        !CU_OK(c, cudaEventCreateWithFlags(&c->ev_compute, cudaEventDisableTiming)) ||
        !CU_OK(c, cudaEventCreateWithFlags(&c->ev_copied, cudaEventDisableTiming)) ||
        !CU_OK(c, cudaMalloc((void **)&probe, sizeof(int)))) {
        cu_note(why, sizeof why, "%s", c->err);
        goto fail;
    }
    c->sm_count = p.multiProcessorCount > 0 ? p.multiProcessorCount : 1;
    /* A kernel of this module must run here: catches a GPU older than the
     * architectures compiled in, or a driver too old for them. */
    CU_LAUNCH(k_probe, 1, 32, c->stream, probe);
    cu_after(c, "start-up probe");
    if (!c->failed && CU_OK(c, cudaMemcpyAsync(&got, probe, sizeof got, cudaMemcpyDeviceToHost, c->stream)))
        CU_OK(c, cudaStreamSynchronize(c->stream));
    cudaFree(probe);
    if (c->failed || got != 0x1234) {
        cu_note(why, sizeof why, "%s (compute capability %d.%d) cannot run this build's kernels: %s", p.name, p.major,
                 p.minor, c->failed ? c->err : "the probe kernel did not run");
        goto fail;
    }
    if (cu_blas_open(c, why, sizeof why)) goto fail;
    if (!cu_blas_ok(c, c->blas.create(&c->blas_h), "cublasCreate") ||
        !cu_blas_ok(c, c->blas.set_stream(c->blas_h, c->stream), "cublasSetStream") ||
        /* default math: fp32 products stay fp32 (no TF32) */
        !cu_blas_ok(c, c->blas.set_math_mode(c->blas_h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode") ||
        !CU_OK(c, cu_dmalloc(c, &c->blas_ws, CU_BLAS_WORKSPACE)) ||
        /* a fixed workspace: the same algorithms (and bits) every run */
        !cu_blas_ok(c, c->blas.set_workspace(c->blas_h, c->blas_ws, CU_BLAS_WORKSPACE), "cublasSetWorkspace")) {
        cu_note(why, sizeof why, "%s", c->err);
        goto fail;
    }
    {
        int bv = 0;
        c->blas.get_version(c->blas_h, &bv);
        double gib = (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0);
        snprintf(o->device_desc, sizeof o->device_desc, "%.60s, %.1f GiB, compute %d.%d, %d SMs, cuBLAS %d.%d",
                 p.name, gib, p.major, p.minor, p.multiProcessorCount, bv / 10000, bv / 100 % 100);
        cu_note(note, nn, "cuda:%d (%.60s, %.1f GiB, compute %d.%d), %s", device, p.name, gib, p.major, p.minor,
                dtype == CU_DTYPE_BF16   ? "bf16 matrix products and activations, fp32 master weights"
                : dtype == CU_DTYPE_TF32 ? "tf32 matrix products (tensor cores, fp32 operands)"
                                         : "fp32 matrix products (TF32 off)");
    }
    o->name = "cuda";
    o->threads = 1;
    o->alloc = cu_alloc;
    o->free = cu_free;
    o->host_alloc = cu_host_alloc;
    o->host_free = cu_host_free;
    o->copy_h2d = cu_copy_h2d;
    o->copy_d2h = cu_copy_d2h;
    o->copy_d2d = cu_copy_d2d;
    o->zero = cu_zero;
    o->sync = cu_sync;
    o->event_create = cu_event_create;
    o->event_destroy = cu_event_destroy;
    o->event_record = cu_event_record;
    o->copy_h2d_async = cu_copy_h2d_async;
    o->event_done = cu_event_done;
    o->status = cu_status;
    o->mem_usage = cu_mem_usage;
    o->graph_begin = cu_graph_begin;
    o->graph_end = cu_graph_end;
    o->graph_launch = cu_graph_launch;
    o->graph_destroy = cu_graph_destroy;
    o->matmul = cu_matmul;
    o->matmul_ex = cu_matmul_ex;
    if (c->act16) o->to_act = cu_to_act;
    o->act_dtype = c->act16 ? TLM_ACT_BF16 : TLM_ACT_F32;
    cu_kernels_install(o);
    cu_attn_install(o);
    cu_infer_install(o);
    cu_sample_install(o);
    o->destroy = cu_destroy;
    c->started = 1;
    return o;

fail:
    cu_note(note, nn, "%s", why[0] ? why : "the CUDA backend could not start");
    cu_destroy(o);
    return NULL;
}

/* The entry point src/ops/ops.c looks for. Precision from TLM_CUDA_DTYPE
 * (fp32, tf32 or bf16; default fp32). */
CU_EXPORT tlm_ops *tlm_cuda_ops_create(int device, char *note, size_t n) {
    const char *s = getenv("TLM_CUDA_DTYPE");
    int dt = cu_parse_dtype(s);
    if (dt < 0) {
        cu_note(note, n, "TLM_CUDA_DTYPE=%s is not a precision: use fp32, tf32 or bf16", s);
        return NULL;
    }
    return cu_create(device, dt, note, n);
}

/* The same with the precision given ("fp32" or "bf16"; NULL = fp32), for a
 * host that passes --dtype down explicitly. */
CU_EXPORT tlm_ops *tlm_cuda_ops_create_ex(int device, const char *dtype, char *note, size_t n) {
    int dt = cu_parse_dtype(dtype);
    if (dt < 0) {
        cu_note(note, n, "--dtype %s is not a precision: use fp32, tf32 or bf16", dtype);
        return NULL;
    }
    return cu_create(device, dt, note, n);
}

/* How often the host has waited for the device since o (an op table of this
 * module) was created: *stream_syncs for the compute stream (copy_d2h, sync,
 * growing scratch), *event_waits for an upload not yet done. For tests and
 * profiling: a training step's budget is one stream sync, when it reads its
 * loss. Either pointer may be NULL. */
CU_EXPORT void tlm_cuda_wait_counts(tlm_ops *o, long *stream_syncs, long *event_waits) {
    cu_ctx *c = cu_of(o);
    if (stream_syncs) *stream_syncs = c->host_syncs;
    if (event_waits) *event_waits = c->event_waits;
}

/* One line per GPU ("cuda:0 NAME, 79.2 GiB, compute 9.0, 132 SMs\n") into
 * buf, for `tinylm info`. Returns the number of GPUs (0 with the reason in
 * buf when there are none or no driver). */
CU_EXPORT int tlm_cuda_list_devices(char *buf, size_t n) {
    if (buf && n) buf[0] = 0;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        cu_no_device_note(e, buf, n);
        return 0;
    }
    size_t used = 0;
    for (int d = 0; d < count; d++) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, d) != cudaSuccess) continue;
        if (buf && used < n) {
            int w = snprintf(buf + used, n - used, "cuda:%d %s, %.1f GiB, compute %d.%d, %d SMs\n", d, p.name,
                             (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), p.major, p.minor,
                             p.multiProcessorCount);
            if (w > 0) used += (size_t)w;
        }
    }
    return count;
}
