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

/* Activations saved for backward, for a (B,T) up to the allocated size.
 * Fields marked ACT hold elements of ops->act_dtype (ops.h): float on the
 * CPU and in CUDA's fp32/tf32 modes, bf16 in CUDA's bf16 mode. They stay
 * typed float * so fp32 callers (tests reading m.logits) are unchanged,
 * but with TLM_ACT_BF16 they must not be indexed as floats: copy
 * model_act_bytes(o, n) bytes and widen. The others are always fp32. */
typedef struct {
    float *x;      /* [N,D]  layer input (residual stream) */
    float *xn1;    /* [N,D]  rmsnorm before attention: NULL in training (recomputed in backward from x, rstd1) */
    float *rstd1;  /* [N] */
    float *qkv;    /* [N,3D] after rope; ACT */
    float *att;    /* [N,D]  attention output (before wo); ACT */
    float *lse;    /* [B,H,T] */
    float *xmid;   /* [N,D]  residual after attention */
    float *xn2;    /* [N,D]  NULL in training (recomputed in backward from xmid, rstd2) */
    float *rstd2;  /* [N] */
    float *gu;     /* [N,2F]; ACT */
    float *act;    /* [N,F]  silu(gate)*up; ACT */
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
    float *xf;               /* [N,D] final rmsnorm output (normalised-input scratch before it); ACT */
    float *rstdf;            /* [N] */
    float *logits;           /* [N,V] (becomes dlogits when training); ACT */
    float *losses;           /* [N] */
    float *loss_dev;         /* [1] model_forward_backward's mean loss */
    /* scratch for backward: dx, dtmp fp32 (the residual gradient and a
     * branch's share of it); dqkv, datt, dgu, dact, dxn ACT */
    float *dx, *dtmp, *dqkv, *datt, *dgu, *dact, *dxn;

    /* The batch on the device, double-buffered (model_stage): while a step
     * computes from one buffer, the next batch is copied into the other. */
    int32_t *tokens_dev[2];  /* [N] inputs */
    int32_t *targets_dev[2]; /* [N] */
    /* With asynchronous uploads (ops->copy_h2d_async; NULL otherwise):
     * buf_free[j] is recorded after the last op of a step that read buffer
     * j, buf_copied[j] after the copy into it. */
    tlm_event *buf_free[2], *buf_copied[2];
    int64_t nstaged;         /* stagings so far; ticket k went to buffer (k-1) % 2 */
    int cur;                 /* buffer of the latest staging */
    int staged_B, staged_T;  /* its shape (0: nothing staged) */
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

/* ---- training steps without host round trips ------------------------------
 * model_forward_backward waits for its loss; a training loop that reads the
 * loss only when it prints it uses these instead:
 *
 *   ticket = model_stage(m, inputs, targets, B, T);  // batch -> device
 *   model_step(m, grad_scale, loss_dev);             // enqueue the step
 *   ... model_stage_done(m, ticket, wait) before reusing inputs/targets
 *
 * Where the backend has asynchronous uploads (ops.h: copy_h2d_async), the
 * copy into the next of two device buffers waits only for the step that
 * last read that buffer (the one before the current), so it overlaps the
 * compute of the current step. Otherwise (the CPU) it is a plain copy,
 * complete on return. */

/* Copy host inputs[B,T] and targets[B,T] into the next device buffer; the
 * next model_step uses them. With asynchronous uploads the host arrays must
 * stay unchanged until model_stage_done(ticket) says so, and should come
 * from ops->host_alloc (the loader's ring) for the copy to be truly
 * asynchronous. Returns the ticket (>= 1), or -1 with an error when the
 * batch does not fit model_alloc_train's buffers. */
int64_t model_stage(tlm_model *m, const int32_t *inputs, const int32_t *targets, int B, int T);
/* 1 if the copy of `ticket` has finished reading its host arrays, else 0;
 * with wait, blocks until it has (that copy only, not the device's compute).
 * A ticket whose buffer was staged again since is answered for the newer
 * copy (which comes after it): later than needed, never too early. */
int model_stage_done(tlm_model *m, int64_t ticket, int wait);
/* Enqueue forward, and backward when grad_scale > 0 (accumulating into
 * m->grads as model_forward_backward does), on the batch of the latest
 * model_stage. The mean loss over its non-ignored targets goes to the
 * device float *loss_dev; nothing waits for the device. 0, or -1 with an
 * error when nothing was staged. */
int model_step(tlm_model *m, float grad_scale, float *loss_dev);

/* Cached forward for generation: tokens[B,T] (host) at positions
 * pos0..pos0+T-1 for every sequence; kc[l], vc[l] are the layer-l caches
 * [B,Tmax,D]. Writes the logits of the LAST position of each sequence to
 * logits_out (device [B,V]). `work` is scratch from model_infer_scratch. */
typedef struct {
    int Bmax, Tchunk;
    /* device scratch, each sized in fp32 (the packed path writes fp32 into
     * qkv, att, act); model_forward_cached keeps xn, qkv, att, gu, act in
     * ops->act_dtype, x and xlast in fp32; logits_out is fp32 */
    float *x, *xn, *qkv, *att, *gu, *act, *xlast;
    int32_t *tokens_dev;
} tlm_infer_scratch;
int model_infer_scratch_alloc(tlm_model *m, tlm_infer_scratch *s, int Bmax, int Tchunk);
void model_infer_scratch_free(tlm_model *m, tlm_infer_scratch *s);
int model_forward_cached(tlm_model *m, tlm_infer_scratch *s, float **kc, float **vc, int Tmax,
                         const int32_t *tokens, int B, int T, int pos0, float *logits_out);

#endif
