/*
 * Attention of one query row by one warp, over keys and values already in
 * a cache: the loop shared by attn_cached (cu_attn.cu, one [B,Tmax,D]
 * cache) and attn_decode (cu_infer.cu, head-major [B,H,Tmax,hd] caches of
 * fp32 or fp16 behind an optional shared prefix). The kernels differ only
 * in how they map warps to (sequence, head, query) and where key j's row
 * lives, so that is all they supply: the element type KV and a Rows
 * functor with krow(j) / vrow(j) giving row j's first element.
 *
 * How: the query goes to the warp's slice of shared memory (every lane
 * reads all of it); lanes score 32 keys at a time, one each, and the warp
 * keeps a running max and sum (base-2 online softmax); the 32
 * probabilities are then broadcast by shuffles while every lane
 * accumulates its own head dimensions (lane + 32 c) of the value rows,
 * which makes the value reads coalesced. Decoding has one query row per
 * sequence, so spreading the keys over lanes is what keeps the GPU busy.
 * Results depend only on (q, keys, values, nk): never on the layout.
 */
#ifndef TLM_BACKENDS_CUDA_ATTN_WARP_CUH
#define TLM_BACKENDS_CUDA_ATTN_WARP_CUH

#include "backends/cuda/cu_internal.h"

/* IEEE half bits -> float, exact (fp16 caches of attn_decode). */
static __device__ __forceinline__ float cu_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return __uint_as_float(sign) + (sign ? -1.0f : 1.0f) * (float)m * 5.9604644775390625e-8f;
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

/* Element i of a cache row as float: fp32 as is, fp16 (uint16_t bits) widened. */
static __device__ __forceinline__ float cu_kv_get(const float *p, size_t i) { return p[i]; }
static __device__ __forceinline__ float cu_kv_get(const uint16_t *p, size_t i) { return cu_f16_to_f32(p[i]); }

/* Rows of one cache: row j at k + j * stride (and v + j * stride). */
template <class KV> struct cu_kv_rows {
    const KV *k, *v;
    size_t stride;
    __device__ __forceinline__ const KV *krow(int j) const { return k + (size_t)j * stride; }
    __device__ __forceinline__ const KV *vrow(int j) const { return v + (size_t)j * stride; }
};

/* Rows 0..P-1 from a shared prefix (kp, vp), the rest from the sequence's
 * own cache (k, v) at j - P; both with row stride `stride`. */
template <class KV> struct cu_kv_rows_prefixed {
    const KV *kp, *vp, *k, *v;
    int P;
    size_t stride;
    __device__ __forceinline__ const KV *krow(int j) const {
        return j < P ? kp + (size_t)j * stride : k + (size_t)(j - P) * stride;
    }
    __device__ __forceinline__ const KV *vrow(int j) const {
        return j < P ? vp + (size_t)j * stride : v + (size_t)(j - P) * stride;
    }
};

/* orow[0..hd) = softmax(q . K[0..nk) * scale) V for one query. Called by
 * all 32 lanes of a warp together (it shuffles with the full mask); sq is
 * that warp's own 32 * NCH floats of shared memory, NCH = ceil(hd / 32). */
template <class KV, int NCH, class Rows>
static __device__ __forceinline__ void cu_attn_warp_query(float *orow, const float *qrow, float *sq, const Rows &rows,
                                                          int nk, int hd, float scale_log2) {
    const int lane = threadIdx.x & 31;
    for (int d = lane; d < 32 * NCH; d += 32) sq[d] = d < hd ? qrow[d] : 0.f;
    __syncwarp();
    float mrun = -INFINITY, lsum = 0.f, o[NCH];
    for (int cix = 0; cix < NCH; cix++) o[cix] = 0.f;
    for (int j0 = 0; j0 < nk; j0 += 32) {
        const int jj = j0 + lane;
        float s = -INFINITY;
        if (jj < nk) {
            const KV *kr = rows.krow(jj);
            float acc = 0.f;
            for (int d = 0; d < hd; d++) acc += sq[d] * cu_kv_get(kr, d);
            s = acc * scale_log2;
        }
        const float mnew = fmaxf(mrun, cu_warp_max(s));
        const float corr = exp2f(mrun - mnew);
        const float p = jj < nk ? exp2f(s - mnew) : 0.f;
        lsum = lsum * corr + p;
        for (int cix = 0; cix < NCH; cix++) o[cix] *= corr;
        mrun = mnew;
        const int cnt = cu_imin(32, nk - j0);
        for (int i = 0; i < cnt; i++) {
            const float pi = __shfl_sync(CU_FULL, p, i);
            const KV *vr = rows.vrow(j0 + i);
            for (int cix = 0; cix < NCH; cix++) {
                int d = lane + 32 * cix;
                if (d < hd) o[cix] += pi * cu_kv_get(vr, d);
            }
        }
    }
    const float L = cu_warp_sum(lsum);
    for (int cix = 0; cix < NCH; cix++) {
        int d = lane + 32 * cix;
        if (d < hd) orow[d] = o[cix] / L;
    }
}

#endif
