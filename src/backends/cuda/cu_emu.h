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
 * blocks run one at a time. Device memory is host memory.
 *
 * Where a GPU gives no guarantee, this emulator picks the less convenient
 * answer, so code that leans on luck fails here rather than on the GPU:
 * - the threads of a block run in a shuffled order between scheduling
 *   points, and the blocks of a grid in a shuffled order (deterministic:
 *   TLM_CUDA_EMU_SEED picks another);
 * - shared arrays named in CU_SHARED_POISON start every block as 0xFF bytes;
 * - a stream's work is queued and runs only when something waits for it,
 *   and work another stream waits for runs first (see emu_stream), so a
 *   missing event between streams reorders their work;
 * - a launch over the hardware's limits (1,024 threads a block, grid y and
 *   z 65,535) is not run and is a launch error, as on a GPU.
 *
 * Graphs: while a stream is being captured (cudaStreamBeginCapture), each
 * kernel launch, memcpy, memset and cuBLAS product on it is RECORDED as a
 * closure (its arguments copied, its memory read when it runs) instead of
 * run, and cudaGraphLaunch replays the closures in order. As in CUDA's
 * ThreadLocal mode, a call that is unsafe during a capture (cudaMalloc,
 * cudaFree, a synchronisation, a query of the captured stream) fails with
 * cudaErrorStreamCaptureUnsupported and invalidates the capture, and so
 * does anything this emulator does not model (events, work on another
 * stream): cudaStreamEndCapture then returns
 * cudaErrorStreamCaptureInvalidated, so tests catch a recorded step that
 * would break on a GPU.
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

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <type_traits>
#include <utility>
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
/* `__shared__` is a block-scope static: block-shared storage, as blocks run
 * one at a time. A GPU's shared memory starts each block as garbage; the
 * kernels name their arrays in CU_SHARED_POISON right after declaring
 * them, so each block here starts with them full of 0xFF bytes (NaN
 * floats, -1 ints) and a read before the first write shows. (Registering
 * from the __shared__ macro itself would need the array's name; GCC drops
 * section attributes of static locals in templates, which ruled out
 * finding them by section.) */
#define __shared__ static
#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define CU_SHARED_POISON(...) static emu::shared_reg EMU_CAT(emu_shreg_, __LINE__)(emu::shared_spans(__VA_ARGS__))
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

typedef struct emu_stream *cudaStream_t;

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
    /* The order the scheduler visits the block's threads in: shuffled for
     * every block, so code that relies on ascending thread order between
     * barriers fails here as it may on a GPU. */
    std::vector<int> order;
    uint64_t rng = 0;
    /* The running kernel's __shared__ byte ranges, poisoned at each block
     * start; a declaration met for the first time appends itself. */
    std::vector<std::pair<char *, char *>> *shm = nullptr;
};

inline state g;
constexpr size_t kStack = 256 * 1024;

/* splitmix64: deterministic (seeded by TLM_CUDA_EMU_SEED, default 1), so a
 * failure found with one order repeats with the same seed. */
inline uint64_t rand64() {
    if (g.rng == 0) {
        const char *e = getenv("TLM_CUDA_EMU_SEED");
        g.rng = (e && *e ? strtoull(e, nullptr, 0) : 1) * 0x9E3779B97F4A7C15ull | 1;
    }
    uint64_t z = (g.rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Shared arrays per kernel (keyed by the kernel's address). */
inline std::map<const void *, std::vector<std::pair<char *, char *>>> shm_by_kernel;

/* The byte ranges of a kernel's __shared__ arrays. */
template <class... T> std::vector<std::pair<char *, char *>> shared_spans(T &...a) {
    return {std::pair<char *, char *>((char *)&a, (char *)&a + sizeof a)...};
}
/* A kernel's arrays (CU_SHARED_POISON): registered for the kernel that
 * meets them first, and poisoned right away, since this block's start has
 * passed already (the first thread to get here is the first to use them). */
struct shared_reg {
    explicit shared_reg(std::vector<std::pair<char *, char *>> r) {
        for (auto &x : r) {
            if (g.shm) g.shm->push_back(x);
            memset(x.first, 0xFF, (size_t)(x.second - x.first));
        }
    }
};

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
    for (auto &r : *g.shm) memset(r.first, 0xFF, (size_t)(r.second - r.first));
    for (int i = g.nf - 1; i > 0; i--) { /* Fisher-Yates */
        int j = (int)(rand64() % (uint64_t)(i + 1));
        std::swap(g.order[i], g.order[j]);
    }
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
        for (int k = 0; k < g.nf; k++) {
            const int i = g.order[k];
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

/* Stream capture: the one stream being captured and what was recorded. */
struct capture {
    bool on = false, invalid = false;
    cudaStream_t stream = nullptr;
    std::vector<std::function<void()>> ops;
};
inline capture cap;
inline int last_error = 0; /* what cudaGetLastError hands back (and clears) */

enum { ERR_INVALID_CONFIGURATION = 9, ERR_CAPTURE_UNSUPPORTED = 900, ERR_CAPTURE_INVALIDATED = 901 };

/* A call that is unsafe during a capture: breaks it. The error to return. */
inline int unsafe_call() {
    cap.invalid = true;
    last_error = ERR_CAPTURE_UNSUPPORTED;
    return ERR_CAPTURE_UNSUPPORTED;
}

} // namespace emu

/* ---- streams: work runs late, and streams overtake each other ------------ */

/* A GPU runs a stream's work some time after it was enqueued, and two
 * streams with no event between them in any relative order. Running each
 * call at once would hide every missing event or synchronisation, so here
 * a stream is a queue that runs only when something forces it: a
 * synchronisation of it or of the device, a query or synchronisation of an
 * event recorded on it, a copy into pageable host memory, cudaFree. Work a
 * queue waits for on another stream (cudaStreamWaitEvent) runs as early as
 * possible, before the waiting stream's own earlier work: so a copy stream
 * that is not told to wait for a zero fill on the compute stream really
 * lands first, as it can on a GPU. */
struct emu_op {
    std::function<void()> fn;      /* the work, or empty for a wait */
    struct emu_stream *wait_on;    /* a wait: that stream up to wait_n */
    uint64_t wait_n;
};
struct emu_stream {
    std::deque<emu_op> q;
    uint64_t submitted = 0, done = 0; /* ops enqueued and run so far */
    bool blocking = true;             /* synchronises with the legacy stream */
};
/* A recorded point in a stream: the work enqueued there before the record. */
struct emu_event {
    emu_stream *s = nullptr; /* never recorded: complete */
    uint64_t n = 0;
};

namespace emu {

inline emu_stream legacy;                /* the NULL stream */
inline std::vector<emu_stream *> streams; /* created ones */
inline std::vector<emu_event *> events;

inline emu_stream *S(cudaStream_t s) { return s ? s : &legacy; }

/* Run stream s until its first n ops have run, and whatever they wait for
 * on other streams, that first. Waits only ever name points enqueued
 * earlier, so the recursion ends. */
inline void drain(emu_stream *s, uint64_t n) {
    if (s->done >= n) return;
    std::vector<std::pair<emu_stream *, uint64_t>> deps;
    for (size_t i = 0; i < s->q.size() && s->done + i < n; i++)
        if (!s->q[i].fn) deps.emplace_back(s->q[i].wait_on, s->q[i].wait_n);
    for (auto &d : deps) drain(d.first, d.second);
    while (s->done < n) {
        emu_op o = std::move(s->q.front());
        s->q.pop_front();
        s->done++;
        if (o.fn) o.fn();
        else drain(o.wait_on, o.wait_n);
    }
}
inline void drain_all(emu_stream *s) { drain(s, s->submitted); }
/* Newest stream first: the order of the calls is the one thing not to keep. */
inline void drain_device() {
    for (size_t i = streams.size(); i-- > 0;) drain_all(streams[i]);
    drain_all(&legacy);
}
inline bool pending(emu_stream *s) { return s->done < s->submitted; }

inline void enqueue(emu_stream *s, emu_op o) {
    s->q.push_back(std::move(o));
    s->submitted++;
}
/* Later work on t waits for what p has enqueued so far. */
inline void wait_for(emu_stream *t, emu_stream *p) {
    if (t != p && pending(p)) enqueue(t, emu_op{nullptr, p, p->submitted});
}

/* Work for stream s: recorded while s is captured, else queued on s. 0 or
 * an error (work on another stream during a capture is not modelled). The
 * legacy stream and the blocking streams wait for each other; the
 * backend's streams are non-blocking, so none of that touches them. */
inline int submit(cudaStream_t s, std::function<void()> fn) {
    if (!cap.on) {
        emu_stream *q = S(s);
        if (q == &legacy) {
            for (emu_stream *b : streams)
                if (b->blocking) wait_for(q, b);
        } else if (q->blocking) {
            wait_for(q, &legacy);
        }
        enqueue(q, emu_op{std::move(fn), nullptr, 0});
        return 0;
    }
    if (s != cap.stream) return unsafe_call();
    if (cap.invalid) {
        last_error = ERR_CAPTURE_INVALIDATED;
        return ERR_CAPTURE_INVALIDATED;
    }
    cap.ops.push_back(std::move(fn));
    return 0;
}

/* Pinned host blocks (cudaHostAlloc), start -> size: copies to and from
 * them are asynchronous, others are not (see cudaMemcpyAsync). */
inline std::map<uintptr_t, size_t> pinned;
inline bool is_pinned(const void *p, size_t n) {
    auto it = pinned.upper_bound((uintptr_t)p);
    if (it == pinned.begin()) return false;
    --it;
    return (uintptr_t)p + n <= it->first + it->second;
}

/* Run a launch (checked by launch()). */
template <class K, class... A> void run(K kernel, dim3 grid, dim3 block, A... args) {
    int nt = (int)(block.x * block.y * block.z);
    if (nt % 32) die("block size must be a multiple of 32 (a limit of this emulator only)");
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
    g.order.resize((size_t)nt);
    for (int i = 0; i < nt; i++) g.order[(size_t)i] = i;
    g.shm = &shm_by_kernel[reinterpret_cast<const void *>(kernel)];
    g.body = [=]() { kernel(args...); };
    /* Blocks in a pseudo-random order too: block i of the walk is
     * (a i + c) mod nb, a bijection as gcd(a, nb) = 1. */
    const uint64_t nb = (uint64_t)grid.x * grid.y * grid.z;
    uint64_t a = 1, c = rand64() % nb;
    for (int t = 0; t < 8 && nb > 2; t++) {
        const uint64_t x = 1 + rand64() % (nb - 1);
        uint64_t u = x, v = nb;
        while (v) { /* gcd(x, nb) */
            const uint64_t r = u % v;
            u = v;
            v = r;
        }
        if (u == 1) {
            a = x;
            break;
        }
    }
    for (uint64_t i = 0; i < nb; i++) {
        const uint64_t b = (uint64_t)(((unsigned __int128)a * i + c) % nb);
        g.bidx = dim3((unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y));
        run_block();
    }
    g.body = nullptr;
    g.shm = nullptr;
}

/* A kernel launch on stream s (CU_LAUNCH): the arguments are copied now,
 * as CUDA copies kernel parameters at the launch (or the capture). A bad
 * configuration is not launched and is a launch error, which
 * cudaGetLastError hands back, as on a GPU. */
template <class K, class... A> void launch(cudaStream_t s, K kernel, dim3 grid, dim3 block, A... args) {
    const uint64_t nt = (uint64_t)block.x * block.y * block.z;
    if (nt == 0 || nt > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        last_error = ERR_INVALID_CONFIGURATION;
        return;
    }
    submit(s, [=]() { run(kernel, grid, block, args...); });
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
    cudaErrorInvalidConfiguration = emu::ERR_INVALID_CONFIGURATION,
    cudaErrorInvalidDevice = 101,
    cudaErrorNoDevice = 100,
    cudaErrorNotReady = 600,
    cudaErrorStreamCaptureUnsupported = emu::ERR_CAPTURE_UNSUPPORTED,
    cudaErrorStreamCaptureInvalidated = emu::ERR_CAPTURE_INVALIDATED,
};
typedef struct emu_event *cudaEvent_t;
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2
};
/* A captured graph and its executable form: the recorded closures. */
struct emu_graph {
    std::vector<std::function<void()>> ops;
};
typedef emu_graph *cudaGraph_t;
typedef emu_graph *cudaGraphExec_t;
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
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return "unknown error";
    }
}
static inline const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
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
static inline cudaError_t cudaGetLastError() {
    cudaError_t e = emu::last_error;
    emu::last_error = cudaSuccess;
    return e;
}
static inline cudaError_t cudaDeviceSynchronize() {
    if (emu::cap.on) return emu::unsafe_call();
    emu::drain_device();
    return cudaSuccess;
}
/* Exactly the bytes asked for, so AddressSanitizer sees any overrun. */
static inline cudaError_t cudaMalloc(void **p, size_t bytes) {
    *p = nullptr;
    if (emu::cap.on) return emu::unsafe_call();
    if (posix_memalign(p, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
    memset(*p, 0xA5, bytes); /* device memory starts as garbage */
    return cudaSuccess;
}
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t bytes) { return cudaMalloc((void **)p, bytes); }
/* cudaFree and cudaFreeHost wait for the whole device, as CUDA's do: queued
 * work may still use the memory. (During a capture nothing is waited for,
 * and the capture breaks.) */
static inline cudaError_t cudaFree(void *p) {
    if (!emu::cap.on) emu::drain_device();
    free(p); /* still freed: the capture breaks, the memory is gone either way */
    return emu::cap.on ? emu::unsafe_call() : cudaSuccess;
}
static inline cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned flags) {
    (void)flags;
    *p = nullptr;
    if (emu::cap.on) return emu::unsafe_call();
    if (posix_memalign(p, 4096, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
    emu::pinned[(uintptr_t)*p] = bytes ? bytes : 1;
    return cudaSuccess;
}
static inline cudaError_t cudaFreeHost(void *p) {
    if (!emu::cap.on) emu::drain_device();
    emu::pinned.erase((uintptr_t)p);
    free(p);
    return emu::cap.on ? emu::unsafe_call() : cudaSuccess;
}
/* As CUDA does with pageable host memory: a copy from it takes the bytes
 * at the call (staged), a copy into it returns once it has landed. Pinned
 * memory is read and written when the copy runs, so the host must wait
 * for an event before it reuses it. A capture refuses pageable memory. */
static inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
    const bool from_host = k == cudaMemcpyHostToDevice || k == cudaMemcpyHostToHost;
    const bool to_host = k == cudaMemcpyDeviceToHost || k == cudaMemcpyHostToHost;
    const bool pageable_src = from_host && !emu::is_pinned(s, n), pageable_dst = to_host && !emu::is_pinned(d, n);
    if (emu::cap.on && st == emu::cap.stream && n && (pageable_src || pageable_dst)) return emu::unsafe_call();
    int e;
    if (pageable_src && n) {
        std::shared_ptr<std::vector<char>> stage = std::make_shared<std::vector<char>>((const char *)s,
                                                                                       (const char *)s + n);
        e = emu::submit(st, [=]() { memcpy(d, stage->data(), n); });
    } else {
        e = emu::submit(st, [=]() {
            if (n) memmove(d, s, n);
        });
    }
    if (e == 0 && pageable_dst && !emu::cap.on) emu::drain_all(emu::S(st));
    return e;
}
static inline cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st) {
    return emu::submit(st, [=]() {
        if (n) memset(d, v, n);
    });
}
static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) {
    *s = new emu_stream;
    (*s)->blocking = !(f & cudaStreamNonBlocking);
    emu::streams.push_back(*s);
    return cudaSuccess;
}
/* Waits for the whole device, so no queued wait still names s. */
static inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (emu::cap.on) return emu::unsafe_call();
    emu::drain_device();
    for (emu_event *e : emu::events)
        if (e->s == s) e->s = nullptr;
    for (size_t i = 0; i < emu::streams.size(); i++)
        if (emu::streams[i] == s) emu::streams.erase(emu::streams.begin() + (long)i);
    delete s;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (emu::cap.on) return emu::unsafe_call();
    emu::drain_all(emu::S(s));
    return cudaSuccess;
}
/* A query does not make the work run: queued work is "not ready". */
static inline cudaError_t cudaStreamQuery(cudaStream_t s) {
    if (emu::cap.on && s == emu::cap.stream) return emu::unsafe_call();
    return emu::pending(emu::S(s)) ? cudaErrorNotReady : cudaSuccess;
}
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f) {
    (void)f;
    *e = new emu_event;
    emu::events.push_back(*e);
    return cudaSuccess;
}
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    for (size_t i = 0; i < emu::events.size(); i++)
        if (emu::events[i] == e) emu::events.erase(emu::events.begin() + (long)i);
    delete e;
    return cudaSuccess;
}
/* Events inside a capture (fork and join of streams) are not modelled. */
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (emu::cap.on) return emu::unsafe_call();
    e->s = emu::S(s);
    e->n = e->s->submitted;
    return cudaSuccess;
}
/* The host polling an event is where the device catches up with it: the
 * work before the recorded point runs, and the event has passed. (Saying
 * "not ready" forever would hang a poll loop; the GPU does finish.) */
static inline cudaError_t cudaEventQuery(cudaEvent_t e) {
    if (emu::cap.on) return emu::unsafe_call();
    if (e->s) emu::drain(e->s, e->n);
    return cudaSuccess;
}
static inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { return cudaEventQuery(e); }
/* Later work on s waits for the point recorded last in e (the record as of
 * this call: re-recording e later does not move the wait). */
static inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned f) {
    (void)f;
    if (emu::cap.on) return emu::unsafe_call();
    emu_stream *q = emu::S(s);
    if (e->s && e->s != q && e->s->done < e->n) emu::enqueue(q, emu_op{nullptr, e->s, e->n});
    return cudaSuccess;
}

/* ---- graphs (stream capture) ------------------------------------------------ */

static inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
    (void)mode; /* one thread: ThreadLocal and Global are the same here */
    if (emu::cap.on) return cudaErrorInvalidValue;
    emu::cap.on = true;
    emu::cap.invalid = false;
    emu::cap.stream = s;
    emu::cap.ops.clear();
    return cudaSuccess;
}
static inline cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g) {
    *g = nullptr;
    if (!emu::cap.on || s != emu::cap.stream) return cudaErrorInvalidValue;
    emu::cap.on = false;
    std::vector<std::function<void()>> ops;
    ops.swap(emu::cap.ops);
    if (emu::cap.invalid) return cudaErrorStreamCaptureInvalidated;
    *g = new emu_graph{std::move(ops)};
    return cudaSuccess;
}
static inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t *x, cudaGraph_t g, unsigned long long flags = 0) {
    (void)flags;
    *x = new emu_graph{g->ops};
    return cudaSuccess;
}
/* The replay is one more piece of queued work on s; it copies the closures,
 * so destroying the executable graph meanwhile is safe, as in CUDA. */
static inline cudaError_t cudaGraphLaunch(cudaGraphExec_t x, cudaStream_t s) {
    if (emu::cap.on) return emu::unsafe_call(); /* graphs inside a capture: not modelled */
    std::shared_ptr<std::vector<std::function<void()>>> ops =
        std::make_shared<std::vector<std::function<void()>>>(x->ops);
    emu::submit(s, [ops]() {
        for (auto &fn : *ops) fn();
    });
    return cudaSuccess;
}
static inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t x) {
    delete x;
    return cudaSuccess;
}
static inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
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

/* A handle remembers its stream: products are queued there. */
struct emu_blas {
    cudaStream_t stream = nullptr;
};
static inline cublasStatus_t cublasCreate_v2(cublasHandle_t *h) {
    *h = new emu_blas;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
    h->stream = s;
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

/* cuBLAS's argument checks of a product, made when it is called. */
static inline bool emu_gemm_args_ok(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda, int ldb,
                                    int ldc) {
    if (m < 0 || n < 0 || k < 0) return false;
    if (lda < (ta == CUBLAS_OP_N ? (m > 1 ? m : 1) : (k > 1 ? k : 1))) return false;
    if (ldb < (tb == CUBLAS_OP_N ? (k > 1 ? k : 1) : (n > 1 ? n : 1))) return false;
    return ldc >= (m > 1 ? m : 1);
}

/* C[m,n] = alpha op(A)[m,k] op(B)[k,n] + beta C, column-major; element
 * loaders abstract the data type. Arguments checked by emu_gemm_args_ok. */
template <class LA, class LB>
static inline void emu_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, LA la,
                            int lda, LB lb, int ldb, float beta, float *C, int ldc) {
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
}

/* Products are queued (or recorded) on the handle's stream. */
static inline cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                            int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                                            const float *beta, float *C, int ldc) {
    if (!emu_gemm_args_ok(ta, tb, m, n, k, lda, ldb, ldc)) return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *alpha, be = *beta;
    int e = emu::submit(h->stream, [=]() {
        emu_gemm(
            ta, tb, m, n, k, al, [A](size_t i) { return A[i]; }, lda, [B](size_t i) { return B[i]; }, ldb, be, C,
            ldc);
    });
    return e ? CUBLAS_STATUS_INVALID_VALUE : CUBLAS_STATUS_SUCCESS;
}

static inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType at, int lda,
                                          const void *B, cudaDataType bt, int ldb, const void *beta, void *C,
                                          cudaDataType ct, int ldc, cublasComputeType_t comp, cublasGemmAlgo_t algo) {
    (void)algo;
    /* the combinations tinylm uses, all listed by cuBLAS: fp32 A, B, C
     * (compute 32F or 32F_FAST_TF32); bf16 A, B with fp32 or bf16 C
     * (compute 32F). Anything else is refused, as cuBLAS would. */
    if (at != bt || (ct != CUDA_R_32F && !(ct == CUDA_R_16BF && at == CUDA_R_16BF)))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (comp != CUBLAS_COMPUTE_32F && !(comp == CUBLAS_COMPUTE_32F_FAST_TF32 && at == CUDA_R_32F))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!emu_gemm_args_ok(ta, tb, m, n, k, lda, ldb, ldc)) return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *(const float *)alpha, be = *(const float *)beta;
    float *Cf = (float *)C;
    int e;
    if (ct == CUDA_R_16BF) {
        /* fp32 accumulation, C read (beta) and written as bf16: through a
         * widened copy of C, rounded once at the end, when the stream runs */
        __nv_bfloat16 *cb = (__nv_bfloat16 *)C;
        const __nv_bfloat16 *a = (const __nv_bfloat16 *)A, *b = (const __nv_bfloat16 *)B;
        e = emu::submit(h->stream, [=]() {
            std::vector<float> cf((size_t)ldc * (n > 0 ? n : 1));
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) cf[(size_t)j * ldc + i] = __bfloat162float(cb[(size_t)j * ldc + i]);
            emu_gemm(
                ta, tb, m, n, k, al, [a](size_t i) { return __bfloat162float(a[i]); }, lda,
                [b](size_t i) { return __bfloat162float(b[i]); }, ldb, be, cf.data(), ldc);
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) cb[(size_t)j * ldc + i] = __float2bfloat16(cf[(size_t)j * ldc + i]);
        });
        return e ? CUBLAS_STATUS_INVALID_VALUE : CUBLAS_STATUS_SUCCESS;
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
        e = emu::submit(h->stream, [=]() {
            emu_gemm(
                ta, tb, m, n, k, al, [a, tf32](size_t i) { return tf32(a[i]); }, lda,
                [b, tf32](size_t i) { return tf32(b[i]); }, ldb, be, Cf, ldc);
        });
    } else if (at == CUDA_R_32F) {
        const float *a = (const float *)A, *b = (const float *)B;
        e = emu::submit(h->stream, [=]() {
            emu_gemm(
                ta, tb, m, n, k, al, [a](size_t i) { return a[i]; }, lda, [b](size_t i) { return b[i]; }, ldb, be, Cf,
                ldc);
        });
    } else {
        const __nv_bfloat16 *a = (const __nv_bfloat16 *)A, *b = (const __nv_bfloat16 *)B;
        e = emu::submit(h->stream, [=]() {
            emu_gemm(
                ta, tb, m, n, k, al, [a](size_t i) { return __bfloat162float(a[i]); }, lda,
                [b](size_t i) { return __bfloat162float(b[i]); }, ldb, be, Cf, ldc);
        });
    }
    return e ? CUBLAS_STATUS_INVALID_VALUE : CUBLAS_STATUS_SUCCESS;
}

/* ---- WMMA (nvcuda::wmma, <mma.h>): bf16 16x16x16, fp32 accumulators ------ */

/* The real fragment layout across a warp's lanes is opaque (documented as
 * unspecified), so any layout is a legal model: here every lane's fragment
 * holds the whole tile, row-major in its logical shape (a: 16x16 [m][k],
 * b: [k][n], accumulator: [m][n]), and every lane does the whole load,
 * product or store itself. Stores from all 32 lanes write identical values
 * to the same addresses, which is harmless (the emulator has no race
 * detector, and the values agree). Each operation first meets the other 31
 * lanes at a warp operation: like the hardware, all lanes must call it
 * together (a divergent call aborts). Memory that one lane wrote is seen by
 * another lane's load only after a real __syncwarp/__syncthreads in the
 * kernel, because lanes run one after the other between scheduling points:
 * so a kernel missing that barrier computes wrong values here, as it may
 * on the GPU. Pointers must be 32-byte aligned and ldm a multiple of 16
 * bytes, as the CUDA programming guide requires: checked. */
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
    static constexpr int num_elements = 256;
    T x[256];
};

namespace detail {
inline void enter(const void *p, unsigned ldm, size_t esize) {
    emu::warp_op<int>(emu::W_SYNC, 0, 0);
    if ((uintptr_t)p % 32) emu::die("wmma: pointer not 32-byte aligned");
    if ((ldm * esize) % 16) emu::die("wmma: ldm not a multiple of 16 bytes");
}
inline float f(float v) { return v; }
inline float f(__nv_bfloat16 v) { return __bfloat162float(v); }
/* element (r, c) of a 16x16 tile at p, row-major or column-major */
template <class T> inline T at(const T *p, unsigned ldm, int r, int c, bool colmajor) {
    return colmajor ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
} // namespace detail

template <class Use, class T, class L> inline void fill_fragment(fragment<Use, 16, 16, 16, T, L> &a, T v) {
    emu::warp_op<int>(emu::W_SYNC, 0, 0);
    for (int i = 0; i < 256; i++) a.x[i] = v;
}
template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L> &a, const T *p, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout");
    detail::enter(p, ldm, sizeof(T));
    const bool cm = std::is_same<L, col_major>::value;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) a.x[r * 16 + c] = detail::at(p, ldm, r, c, cm);
}
template <class T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T> &a, const T *p, unsigned ldm, layout_t l) {
    detail::enter(p, ldm, sizeof(T));
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) a.x[r * 16 + c] = detail::at(p, ldm, r, c, l == mem_col_major);
}
template <class T>
inline void store_matrix_sync(T *p, const fragment<accumulator, 16, 16, 16, T> &a, unsigned ldm, layout_t l) {
    detail::enter(p, ldm, sizeof(T));
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) {
            size_t i = l == mem_col_major ? (size_t)c * ldm + r : (size_t)r * ldm + c;
            p[i] = a.x[r * 16 + c];
        }
}
/* d = a b + c in fp32: bf16 products are exact in fp32; the sum runs over
 * k in order (the hardware's order and internal rounding may differ, within
 * the tests' bounds). d may be c. */
template <class TA, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB> &b, const fragment<accumulator, 16, 16, 16, float> &c) {
    emu::warp_op<int>(emu::W_SYNC, 0, 0);
    float r[256];
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float acc = c.x[m * 16 + n];
            for (int k = 0; k < 16; k++) acc += detail::f(a.x[m * 16 + k]) * detail::f(b.x[k * 16 + n]);
            r[m * 16 + n] = acc;
        }
    memcpy(d.x, r, sizeof r);
}
} // namespace wmma
} // namespace nvcuda

#endif
