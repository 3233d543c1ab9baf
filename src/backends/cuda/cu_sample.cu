/*
 * Token sampling on the device (ops.h `sample`): the rules of the host's
 * sampler_sample (src/infer/sampler.c), so a step returns B tokens instead
 * of B x V logits.
 *
 * One block per row. Nothing is sorted and nothing but the row is read:
 * every question the sampler asks is a SELECTION, "the first item, in the
 * order (key desc, id asc), at which the running weight from the top
 * reaches a target", with
 *   - top-k:   key = the logit's order-preserving bits, weight 1, target k;
 *   - nucleus: key = logit bits (top-k path) or probability bits (whole
 *              vocabulary), weight = probability, target top_p * sum;
 *   - draw in the top-k order: the same with target u * mass, strictly.
 * A selection finds the threshold key bit by bit from the top (32 block
 * sums of "weight of the items whose key >= candidate") and then the id
 * among the items tied on that key by bisection over ids. Each pass is a
 * block sum over the row, so shared memory stays a few words and any V
 * works; sums are in double (the host sums the top-k path and the nucleus
 * in double too) and are deterministic (fixed per-thread order, then the
 * block tree). The draw over the whole vocabulary runs in id order: a
 * bisection over x of the mass of nucleus members with id <= x.
 *
 * Probabilities are recomputed from the logits in every pass rather than
 * stored: a pass is then one read of the row (L2 resident for a block)
 * and gives bit-identical values each time. Both paths use the host's own
 * exp polynomial (tlm_expf, util/fastexp.h) with unfused operations, so
 * the probabilities are bitwise the host's (the device's expf could differ
 * from the host library's in the last bit and move a boundary draw).
 *
 * Searches go a digit of DB bits (or a 2^DB-way split of an id range) at a
 * time: one pass sums the weight at 2^DB - 1 candidate cuts together (each
 * with the same per-thread order and block tree as a pass of its own, so
 * the sums, and the item found, are those of a bit-by-bit search), and the
 * largest cut that still reaches the target fixes the digit. Cost with
 * top-p on the whole vocabulary: 1 + 1 + (1 + 32/DB + 1 + 1 + log_{2^DB} V)
 * + 1 + (1 + log_{2^DB} V) passes over the row: 17 at V = 2560 with DB = 4,
 * 35 with DB = 2 (bit by bit it was 60); greedy is two.
 */
#include "backends/cuda/cu_internal.h"

#include <stdlib.h>
#include <string.h>

#define SAMPLE_THREADS 256

/* Float bits that order like the values (-0 taken as +0, as the host's
 * comparisons do). */
static __device__ __forceinline__ uint32_t cu_logit_key(float f) {
    uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* util/fastexp.h's tlm_expf, operation for operation and unfused, so the
 * whole-vocabulary probabilities are bitwise the host's. */
static __device__ __forceinline__ float cu_sampler_expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __fadd_rn(__fadd_rn(__fmul_rn(x, 1.44269504088896341f), 12582912.0f), -12582912.0f);
    float r = __fadd_rn(x, -__fmul_rn(n, 0.693145751953125f));
    r = __fadd_rn(r, -__fmul_rn(n, 1.428606765330187e-06f));
    float p = 1.0f / 5040;
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 720);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 120);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 24);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 6);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    return __fmul_rn(p, __uint_as_float((uint32_t)((int32_t)n + 127) << 23));
}

static __device__ __forceinline__ int cu_block_min_int(int v, int *red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = cu_imin(v, __shfl_xor_sync(CU_FULL, v, o));
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1) v = cu_imin(v, __shfl_xor_sync(CU_FULL, v, o));
    return v;
}

/* Which weight an item carries in a pass. */
enum { W_ONE_K, W_PROB_K, W_PROB_P };
/* Which items a pass sums: key >= kmin; key == kmin and id <= idmax; id <= idmax. */
enum { P_GE, P_EQ, P_ID };

/* One row and what is known of it so far. The top k and the nucleus are
 * "every item at least as good as (key, id)" in (key desc, id asc) order;
 * (0, V) admits everything. */
struct srow {
    const float *lg;
    int V;
    int topk;         /* the top-k path: ranked by logit, else by probability */
    float mx, invT;
    uint32_t kkey;    /* the k-th best */
    int kid;
    uint32_t pkey;    /* the last member of the nucleus */
    int pid;
};

/* Item i's rank key and its weight under wm (0 outside the set wm covers). */
static __device__ __forceinline__ double cu_item(const srow &s, int i, int wm, uint32_t *key) {
    const float l = s.lg[i];
    float p;
    if (s.topk) {
        const uint32_t k = cu_logit_key(l);
        *key = k;
        if (!(k > s.kkey || (k == s.kkey && i <= s.kid))) return 0.0;
        if (wm == W_ONE_K) return 1.0;
        p = cu_sampler_expf((l - s.mx) * s.invT);
    } else {
        p = cu_sampler_expf((l - s.mx) * s.invT);
        *key = __float_as_uint(p); /* p > 0: its bits order like it */
    }
    if (wm == W_PROB_P && !(*key > s.pkey || (*key == s.pkey && i <= s.pid))) return 0.0;
    return p;
}

/* The total weight of the items a pass covers; every thread gets it. */
static __device__ double cu_pass(const srow &s, int wm, int pm, uint32_t kmin, int idmax, double *red) {
    double acc = 0;
    for (int i = threadIdx.x; i < s.V; i += blockDim.x) {
        uint32_t key;
        const double w = cu_item(s, i, wm, &key);
        const bool in = pm == P_GE ? key >= kmin : pm == P_EQ ? (key == kmin && i <= idmax) : i <= idmax;
        if (in) acc += w;
    }
    return cu_block_sum(acc, red);
}

static __device__ __forceinline__ bool cu_reach(double w, double target, bool strict) {
    return strict ? w > target : w >= target;
}

/* A search takes one digit of DB bits of a key (or a 2^DB-way split of an
 * id range) per pass, summing the weight at NC = 2^DB - 1 candidate cuts
 * together. Wide digits mean fewer passes but more registers (the NC
 * sums), so fewer blocks per SM: cu_sample picks DB = 4 (15 sums, about 100
 * registers, 2 blocks of 256 threads per SM) when every row's block is
 * resident at once anyway, and DB = 2 (3 sums, about 40 registers, 5
 * blocks per SM) for more rows. NC is a template constant: nvcc unrolls
 * the loops over it and keeps the sums in registers. */

/* The NC cuts of one pass, computed where used rather than stored (fewer
 * registers): keys t | (j+1) << shift (the next digit of a key search), or
 * ids lo + (j+1)(n-1)/2^DB (a split of the ids lo .. lo+n-1:
 * nondecreasing, inside [lo, lo+n-1) for n >= 2). */
struct scuts {
    uint32_t base;
    int shift, n; /* n == 0: key cuts */
};
template <int DB> static __device__ __forceinline__ uint32_t cu_cut(const scuts &c, int j) {
    return c.n == 0 ? c.base | ((uint32_t)(j + 1) << c.shift)
                    : c.base + (uint32_t)(((long long)(j + 1) * (c.n - 1)) >> DB);
}

/* cu_pass at NC cuts at once: out[j] = the weight of the items with
 * key >= cut j (P_GE), with key == teq and id <= cut j (P_EQ), or with
 * id <= cut j (P_ID). Each out[j] is summed exactly as cu_pass would sum
 * it alone (same per-thread order, same block tree; an item outside adds
 * nothing), so a search by digits finds what one bit by bit would: the
 * sums only shrink as a cut excludes more (rounding is monotone).
 * red: >= NC * 32 doubles. */
template <int DB>
static __device__ void cu_pass_cuts(const srow &s, int wm, int pm, uint32_t teq, const scuts &cut, double *out,
                                    double *red) {
    constexpr int NC = (1 << DB) - 1;
    double acc[NC];
    for (int j = 0; j < NC; j++) acc[j] = 0.0;
    for (int i = threadIdx.x; i < s.V; i += blockDim.x) {
        uint32_t key;
        const double w = cu_item(s, i, wm, &key);
        if (w == 0.0 || (pm == P_EQ && key != teq)) continue;
        const uint32_t x = pm == P_GE ? key : (uint32_t)i;
        for (int j = 0; j < NC; j++) {
            /* keys count from the cut up, ids from the cut down */
            const bool in = pm == P_GE ? x >= cu_cut<DB>(cut, j) : x <= cu_cut<DB>(cut, j);
            if (in) acc[j] += w;
        }
    }
    const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int j = 0; j < NC; j++) acc[j] = cu_warp_sum(acc[j]);
    __syncthreads(); /* the previous use of red is over */
    if (lane == 0)
        for (int j = 0; j < NC; j++) red[j * 32 + wp] = acc[j];
    __syncthreads();
    for (int j = 0; j < NC; j++) out[j] = cu_warp_sum(lane < nw ? red[j * 32 + lane] : 0.0);
}

/* The smallest id x in [lo, hi] at which base + (the weight of the items
 * with id <= x, and key == teq for P_EQ) reaches target; hi must. */
template <int DB>
static __device__ int cu_first_id(const srow &s, int wm, int pm, uint32_t teq, double base, double target,
                                  bool strict, int lo, int hi, double *red) {
    constexpr int NC = (1 << DB) - 1;
    double sum[NC];
    while (lo < hi) {
        const scuts cut = {(uint32_t)lo, 0, hi - lo + 1};
        cu_pass_cuts<DB>(s, wm, pm, teq, cut, sum, red);
        int j = 0;
        while (j < NC && !cu_reach(base + sum[j], target, strict)) j++;
        if (j < NC) {
            hi = (int)cu_cut<DB>(cut, j);
            if (j > 0) lo = (int)cu_cut<DB>(cut, j - 1) + 1;
        } else {
            lo = (int)cu_cut<DB>(cut, NC - 1) + 1;
        }
    }
    return lo;
}

/* The largest id of an item with positive weight (and key == kmin when eq):
 * the last member when rounding leaves a target past every item. -1 if none. */
static __device__ int cu_last_id(const srow &s, int wm, bool eq, uint32_t kmin, int *redi) {
    int best = INT32_MAX; /* min of -id */
    for (int i = threadIdx.x; i < s.V; i += blockDim.x) {
        uint32_t key;
        if (cu_item(s, i, wm, &key) > 0.0 && (!eq || key == kmin)) best = cu_imin(best, -i);
    }
    best = cu_block_min_int(best, redi);
    return best == INT32_MAX ? -1 : -best;
}

/* The first item, in (key desc, id asc) order, at which the running weight
 * from the top reaches target (exceeds it when strict): its key and id.
 * false when the total never does (rounding). Every pass is a block sum, so
 * every thread takes the same branches. */
template <int DB>
static __device__ bool cu_select(const srow &s, int wm, double target, bool strict, uint32_t *okey, int *oid,
                                 double *red, int *redi) {
    constexpr int NC = (1 << DB) - 1;
    if (!cu_reach(cu_pass(s, wm, P_GE, 0, 0, red), target, strict)) return false;
    uint32_t t = 0; /* the largest key whose items and better ones reach the target */
    double sum[NC];
    for (int shift = 32 - DB; shift >= 0; shift -= DB) {
        /* the next digit: the largest d with weight(key >= t | d) reaching
         * (the weights shrink as the cut rises) */
        const scuts cut = {t, shift, 0};
        cu_pass_cuts<DB>(s, wm, P_GE, 0, cut, sum, red);
        int d = 0;
        while (d < NC && cu_reach(sum[d], target, strict)) d++;
        t |= (uint32_t)d << shift;
    }
    const double above = t == 0xffffffffu ? 0.0 : cu_pass(s, wm, P_GE, t + 1, 0, red);
    /* the items tied on t, in id order: the first whose prefix reaches */
    int lo;
    if (!cu_reach(above + cu_pass(s, wm, P_EQ, t, s.V - 1, red), target, strict)) {
        /* the sums above and below t rounded apart: the last tied item */
        lo = cu_last_id(s, wm, true, t, redi);
        if (lo < 0) return false;
    } else {
        lo = cu_first_id<DB>(s, wm, P_EQ, t, above, target, strict, 0, s.V - 1, red);
    }
    *okey = t;
    *oid = lo;
    return true;
}

template <int DB>
static __global__ void k_sample(int32_t *tok, const float *logits, int V, size_t ld, const float *u, float invT,
                                int top_k, float top_p, int greedy) {
    __shared__ double red[((1 << DB) - 1) * 32];
    __shared__ float redf[32];
    __shared__ int redi[32];
    CU_SHARED_POISON(red, redf, redi);
    const int b = blockIdx.x;
    srow s;
    s.lg = logits + (size_t)b * ld;
    s.V = V;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, s.lg[i]);
    m = cu_block_max(m, redf);
    if (greedy) {
        /* argmax, ties to the lowest id */
        int best = INT32_MAX;
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            if (s.lg[i] == m) best = cu_imin(best, i);
        best = cu_block_min_int(best, redi);
        if (threadIdx.x == 0) tok[b] = best == INT32_MAX ? 0 : best;
        return;
    }
    s.topk = top_k > 0 && top_k < V;
    s.mx = m;
    s.invT = invT;
    s.kkey = 0;
    s.kid = V;
    s.pkey = 0;
    s.pid = V;
    int last = V - 1; /* the last member in the top-k order (top-k path) */
    if (s.topk) {
        uint32_t k;
        int id;
        /* counts are exact in double, so this always finds the k-th */
        if (cu_select<DB>(s, W_ONE_K, (double)top_k, false, &k, &id, red, redi)) {
            s.kkey = k;
            s.kid = id;
            last = id;
        }
    }
    const double sum = cu_pass(s, W_PROB_K, P_GE, 0, 0, red);
    double mass = sum;
    if (top_p < 1.0f) {
        uint32_t k;
        int id;
        if (cu_select<DB>(s, W_PROB_K, (double)top_p * sum, false, &k, &id, red, redi)) {
            s.pkey = k;
            s.pid = id;
            last = id;
            mass = cu_pass(s, W_PROB_P, P_GE, 0, 0, red);
        }
    }
    const double r = (double)u[b] * mass;
    int t;
    if (s.topk) {
        /* inverse CDF in the top-k order: the first member past r */
        uint32_t k;
        int id;
        t = cu_select<DB>(s, W_PROB_P, r, true, &k, &id, red, redi) ? id : last;
    } else if (cu_pass(s, W_PROB_P, P_ID, 0, V - 1, red) > r) {
        /* inverse CDF in id order: the smallest x whose members up to x pass r */
        t = cu_first_id<DB>(s, W_PROB_P, P_ID, 0, 0.0, r, true, 0, V - 1, red);
    } else {
        /* rounding left r past every member: the last one in id order */
        t = cu_last_id(s, W_PROB_P, false, 0, redi);
        if (t < 0) t = V - 1;
    }
    if (threadIdx.x == 0) tok[b] = t;
}

/* Enqueue the draw (ops.h sample_dev): nothing waits, so it may be recorded. */
static void cu_sample_dev(tlm_ops *o, int32_t *tokens_dev, const float *logits, int B, int V, size_t ld,
                          const float *u_dev, float temperature, int top_k, float top_p) {
    cu_ctx *c = cu_of(o);
    if (c->failed || B <= 0) return;
    const int greedy = temperature == 0.0f || top_k == 1;
    if (V < 1) {
        cu_fail(c, "sample: vocabulary size %d must be positive", V);
        return;
    }
    if (!greedy && !u_dev) {
        cu_fail(c, "sample: a draw at temperature %g needs uniforms", temperature);
        return;
    }
    /* wide digits while every row's block is resident at once (2 per SM),
     * narrow ones (more blocks per SM) beyond; TLM_CUDA_SAMPLE_WIDE_ROWS
     * moves the limit (tests run both kernels at any B with it) */
    const char *wr = getenv("TLM_CUDA_SAMPLE_WIDE_ROWS");
    const long wide_rows = wr && *wr ? strtol(wr, NULL, 10) : 2L * c->sm_count;
    void (*kern)(int32_t *, const float *, int, size_t, const float *, float, int, float, int) =
        B <= wide_rows ? k_sample<4> : k_sample<2>;
    CU_LAUNCH(kern, (unsigned)B, SAMPLE_THREADS, c->stream, tokens_dev, logits, V, ld, u_dev,
              greedy ? 0.0f : 1.0f / temperature, top_k, top_p, greedy);
    cu_after(c, "sample");
}

/* sample_dev between the uniforms' copy up and the tokens' copy down, both
 * through scratch (so the caller's host buffers may be ordinary memory). */
static void cu_sample(tlm_ops *o, int32_t *tokens, const float *logits, int B, int V, size_t ld, const float *u,
                      float temperature, int top_k, float top_p) {
    cu_ctx *c = cu_of(o);
    if (B <= 0) return;
    const size_t tb = (size_t)B * sizeof(int32_t);
    const int greedy = temperature == 0.0f || top_k == 1;
    /* tokens, then the uniforms (4-byte aligned after B int32s) */
    char *s = c->failed ? NULL : (char *)cu_scratch(c, 2 * tb);
    if (s) {
        int32_t *dtok = (int32_t *)s;
        float *du = (float *)(s + tb);
        /* the uniforms ride the stream with the step's other small copies */
        if (!greedy) CU_OK(c, cudaMemcpyAsync(du, u, tb, cudaMemcpyHostToDevice, c->stream));
        cu_sample_dev(o, dtok, logits, B, V, ld, greedy ? NULL : du, temperature, top_k, top_p);
        if (!c->failed && CU_OK(c, cudaMemcpyAsync(tokens, dtok, tb, cudaMemcpyDeviceToHost, c->stream)) &&
            cu_host_wait(c, c->stream, "cudaStreamSynchronize (sample)"))
            return;
    }
    memset(tokens, 0xff, tb); /* -1: the caller stops on the status */
    cu_report(c->err);
}

void cu_sample_install(tlm_ops *o) {
    o->sample = cu_sample;
    o->sample_dev = cu_sample_dev;
}
