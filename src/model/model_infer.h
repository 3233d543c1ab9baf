/*
 * Generation with packed weights (the fast path of model_infer.c).
 *
 * Every linear layer's weights are converted once, by the backend, into its
 * inference format (ops->pack: fp32 or bf16 panels), and the cached forward
 * then runs five ops per layer:
 *   qkv  = rmsnorm(x) @ wqkv^T               matmul_packed (norm fused)
 *   att  = attention(rope(qkv)) over cache    attn_decode (rope + store fused)
 *   x   += att @ wo^T                         matmul_packed (accumulate)
 *   act  = swiglu(rmsnorm(x) @ wgu^T)         matmul_packed (SWIGLU kind)
 *   x   += act @ wdown^T                      matmul_packed (accumulate)
 * instead of the eleven of model_forward_cached, which stays as the
 * unpacked fp32 reference.
 */
#ifndef TLM_MODEL_MODEL_INFER_H
#define TLM_MODEL_MODEL_INFER_H

#include "model/model.h"

/* The number format generation runs with. */
enum {
    TLM_GEN_AUTO = 0,            /* the backend's fastest packed dtype (bf16 on CPUs with bf16 dot
                                  * products or cheap conversion); unpacked where it has no packed ops */
    TLM_GEN_F32 = TLM_PACK_F32,   /* packed fp32 weights */
    TLM_GEN_BF16 = TLM_PACK_BF16, /* packed bf16 weights (and bf16 inputs to each product), fp32 sums */
    TLM_GEN_REF = 3,             /* unpacked op-by-op fp32 (model_forward_cached): the exact reference */
    TLM_GEN_I8 = TLM_PACK_I8,     /* int8 weights per group of 32 k with fp32 scales, inputs quantised
                                  * the same way per row; exact integer sums, fp32 scaling (ops.h) */
};

/* Packed weights of a model for one dtype. */
typedef struct {
    int dtype;                              /* TLM_GEN_F32, _BF16, _I8 or _REF (never AUTO) */
    int L;
    tlm_packed **wqkv, **wo, **wgu, **wdown; /* [L]; wgu packed as TLM_PACK_SWIGLU */
    tlm_packed *head;                        /* wte [V,D] as the output projection */
} tlm_infer_weights;

/* The dtype that `dtype` means on m's backend (AUTO resolved). -1 + error
 * naming --dtype when the backend cannot run it (e.g. bf16 without packed
 * ops, int8 where pack does not take TLM_PACK_I8: ops->pack_dtypes). */
int model_infer_resolve_dtype(const tlm_model *m, int dtype);
/* "fp32", "bf16", "int8", "fp32-ref" (and "auto" for AUTO). */
const char *model_infer_dtype_name(int dtype);
/* Parse a --dtype value: auto, fp32 (or f32), bf16, int8 (or i8), ref. -1 +
 * error naming --dtype otherwise. */
int model_infer_parse_dtype(const char *s, int *dtype);

/* Pack m's current parameters (re-pack after they change). TLM_GEN_REF
 * packs nothing. -1 + error on failure (w is then empty). */
int model_infer_pack(tlm_model *m, tlm_infer_weights *w, int dtype);
void model_infer_unpack(tlm_model *m, tlm_infer_weights *w);

/* The KV cache that generation with w uses: 0 for the reference path (w
 * NULL or TLM_GEN_REF: kv_store's fp32 [B,Tmax,D]), else attn_decode's
 * head-major caches of TLM_KV_F16 with bf16 or int8 weights (half the bytes
 * for attention to stream; fp16 keeps 3 more mantissa bits than bf16 and
 * the values of k and v fit its range) or TLM_KV_F32 with fp32 weights. */
int model_infer_kv_dtype(const tlm_infer_weights *w);

/* model_forward_cached (same arguments and result) through packed weights;
 * w NULL or of dtype TLM_GEN_REF: model_forward_cached itself. kc, vc are
 * caches of model_infer_kv_dtype(w) elements (cast to float **).
 * pre (NULL: none; packed weights only) is a prefix shared by all B
 * sequences, stored once per layer ([H,P,hd] each, see attn_decode): the
 * caches kc, vc then hold positions P .. P+Tmax-1 of each sequence, and
 * pos0 >= P. Generating several samples of one prompt computes the prompt
 * once (B = 1, no prefix, caches = pre's, Tmax = P) and then steps all
 * samples over it. */
typedef struct {
    float **k, **v; /* [L] device caches [H,P,hd] */
    int P;
} tlm_kv_prefix;
int model_forward_packed(tlm_model *m, const tlm_infer_weights *w, tlm_infer_scratch *s, float **kc, float **vc,
                         int Tmax, const tlm_kv_prefix *pre, const int32_t *tokens, int B, int T, int pos0,
                         float *logits_out);
/* model_forward_packed (packed weights only: w of TLM_GEN_REF is an error)
 * with the step's inputs in DEVICE memory, so that the step can be
 * recorded once and replayed (ops.h's graph block): tokens_dev [B*T]
 * int32, and pos_dev (one int32; NULL: use pos0) the position of the
 * first token, read when the ops run (see attn_decode). pos0 is validated
 * against the cache as in model_forward_packed either way: pass the
 * position of the step being enqueued or recorded. Nothing here reads the
 * host or waits for the device. */
int model_forward_packed_dev(tlm_model *m, const tlm_infer_weights *w, tlm_infer_scratch *s, float **kc, float **vc,
                             int Tmax, const tlm_kv_prefix *pre, const int32_t *tokens_dev, int B, int T, int pos0,
                             const int32_t *pos_dev, float *logits_out);


#endif
