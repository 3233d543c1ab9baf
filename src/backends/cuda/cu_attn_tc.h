/*
 * Causal self-attention for training on the tensor cores (bf16 operands,
 * fp32 accumulation): cu_attn_tc.cu. Same semantics as ops.h attn_fwd /
 * attn_bwd; cu_attn.cu calls these in the backend's bf16 mode when
 * cu_attn_tc_ok() says the head size fits, else its own fp32 kernels.
 */
#ifndef TLM_BACKENDS_CUDA_ATTN_TC_H
#define TLM_BACKENDS_CUDA_ATTN_TC_H

#include "backends/cuda/cu_internal.h"

/* bf16 mode and a head size the WMMA tiles take (a multiple of 16, <= 128). */
static inline bool cu_attn_tc_ok(const cu_ctx *c, int hd) {
    return c->dtype == CU_DTYPE_BF16 && hd % 16 == 0 && hd >= 16 && hd <= 128;
}

/* out[B,T,D], lse[B,H,T] from qkv[B,T,3D] (D = H * hd). Element type E of
 * qkv and out: float or __nv_bfloat16 (only float is used so far). */
template <class E> void cu_attn_tc_fwd(cu_ctx *c, E *out, float *lse, const E *qkv, int B, int T, int H, int hd);

/* dqkv[B,T,3D] from dout, out [B,T,D], lse [B,H,T], qkv; di [B,H,T] is
 * device scratch for dout_i . out_i. */
template <class E>
void cu_attn_tc_bwd(cu_ctx *c, E *dqkv, float *di, const E *dout, const E *out, const float *lse, const E *qkv, int B,
                    int T, int H, int hd);

#endif
