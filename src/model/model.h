/*
 * The Llama-style decoder: parameters, forward and backward, written once
 * against the op interface (src/ops/ops.h).
 *
 *   x = wte[tokens]                                   [N,D]
 *   per layer l:
 *     xn  = rmsnorm(x, attn_norm)                     [N,D]
 *     qkv = xn @ wqkv^T ; rope(q, k)                  [N,3D]
 *     x  += attention(qkv) @ wo^T                     [N,D]
 *     xn  = rmsnorm(x, mlp_norm)                      [N,D]
 *     gu  = xn @ wgu^T                                [N,2F]
 *     x  += (silu(gate) * up) @ wdown^T               [N,D]
 *   logits = rmsnorm(x, final_norm) @ wte^T           [N,V]
 *
 * Parameters live in ONE flat device buffer so the optimizer, gradient
 * clipping and checkpoints each see a single array; tensor views index it.
 */
#ifndef TLM_MODEL_MODEL_H
#define TLM_MODEL_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "model/config.h"
#include "ops/ops.h"

/* One named parameter tensor: a view [rows, cols] (cols = 1 for vectors
 * written as 1-D) at `offset` floats into the flat parameter buffer.
 * Names are the Hugging Face LlamaForCausalLM names; the fused wqkv and wgu
 * are listed as their q/k/v and gate/up slices, which are contiguous. */
typedef struct {
    char name[96];
    size_t offset;
    int rows, cols;
    int ndim;   /* 1 or 2, as written to safetensors */
    int decay;  /* 1 for 2-D weights (weight decay applies), 0 for norms */
} tlm_tensor;

/* Per-layer parameter views (pointers into model->params). */
typedef struct {
    float *attn_norm; /* [D] */
    float *wqkv;      /* [3D,D] rows q|k|v */
    float *wo;        /* [D,D] */
    float *mlp_norm;  /* [D] */
    float *wgu;       /* [2F,D] rows gate|up */
    float *wdown;     /* [D,F] */
} tlm_layer_params;

/* Activations saved for backward, for a (B,T) up to the allocated size. */
typedef struct {
    float *x;      /* [N,D]  layer input (residual stream) */
    float *xn1;    /* [N,D]  rmsnorm before attention: NULL in training (recomputed in backward from x, rstd1) */
    float *rstd1;  /* [N] */
    float *qkv;    /* [N,3D] after rope */
    float *att;    /* [N,D]  attention output (before wo) */
    float *lse;    /* [B,H,T] */
    float *xmid;   /* [N,D]  residual after attention */
    float *xn2;    /* [N,D]  NULL in training (recomputed in backward from xmid, rstd2) */
    float *rstd2;  /* [N] */
    float *gu;     /* [N,2F] */
    float *act;    /* [N,F]  silu(gate)*up */
} tlm_layer_acts;

typedef struct tlm_model {
    tlm_config cfg;
    tlm_ops *ops;

    size_t nparams;
    float *params;           /* device [P] */
    float *grads;            /* device [P], NULL until model_alloc_train */
    tlm_tensor *tensors;     /* HF-named views, in a fixed order */
    int ntensors;
    float *wte;              /* [V,D] (also the output head) */
    float *final_norm;       /* [D] */
    tlm_layer_params *layer; /* [L] */
    tlm_layer_params *glayer;/* [L] gradient views (into grads) */
    float *gwte, *gfinal_norm;

    /* activations, allocated by model_alloc_train for Bmax x Tmax */
    int Bmax, Tmax;
    tlm_layer_acts *acts;    /* [L] */
    float *xfinal;           /* [N,D] residual after last layer */
    float *xf;               /* [N,D] final rmsnorm output */
    float *rstdf;            /* [N] */
    float *logits;           /* [N,V] (becomes dlogits when training) */
    float *losses;           /* [N] */
    int32_t *tokens_dev;     /* [N] inputs staged on the device */
    int32_t *targets_dev;    /* [N] */
    /* scratch for backward */
    float *dx, *dtmp, *dqkv, *datt, *dgu, *dact, *dxn;
    float *host_losses;      /* host [N] for reading the loss */
    int32_t *host_targets;   /* host [N]: targets read back when they came on the device */
} tlm_model;

/* Allocate parameters (zeroed) for cfg on ops. */
int model_create(tlm_model *m, const tlm_config *cfg, tlm_ops *ops);
void model_destroy(tlm_model *m);

/* Initialise weights: N(0, 0.02); wo and wdown scaled by 1/sqrt(2L);
 * norm weights 1. Deterministic in seed (drawn on the host, copied over). */
void model_init_random(tlm_model *m, uint64_t seed);

/* Allocate gradients and activations for batches up to Bmax x Tmax. */
int model_alloc_train(tlm_model *m, int Bmax, int Tmax);

/* Forward on host tokens inputs[B,T] and targets[B,T] (copied to the
 * device here). Returns the mean loss over non-ignored targets.
 * If grad_scale > 0, also runs backward, ACCUMULATING into m->grads the
 * gradient of (grad_scale * sum of per-token losses); pass
 * 1/(B*T*accum) for a mean over an accumulated batch.
 * inputs/targets may already be device pointers when on_device is set.
 * A batch larger than model_alloc_train's returns NaN and sets the error. */
float model_forward_backward(tlm_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                             float grad_scale, int on_device);

/* Zero all gradients. */
void model_zero_grad(tlm_model *m);

/* Cached forward for generation: tokens[B,T] (host) at positions
 * pos0..pos0+T-1 for every sequence; kc[l], vc[l] are the layer-l caches
 * [B,Tmax,D]. Writes the logits of the LAST position of each sequence to
 * logits_out (device [B,V]). `work` is scratch from model_infer_scratch. */
typedef struct {
    int Bmax, Tchunk;
    float *x, *xn, *qkv, *att, *gu, *act, *xlast; /* device scratch */
    int32_t *tokens_dev;
} tlm_infer_scratch;
int model_infer_scratch_alloc(tlm_model *m, tlm_infer_scratch *s, int Bmax, int Tchunk);
void model_infer_scratch_free(tlm_model *m, tlm_infer_scratch *s);
int model_forward_cached(tlm_model *m, tlm_infer_scratch *s, float **kc, float **vc, int Tmax,
                         const int32_t *tokens, int B, int T, int pos0, float *logits_out);

#endif
