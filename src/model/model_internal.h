/* Helpers shared by the training (model.c) and generation (model_infer.c)
 * paths of the model. */
#ifndef TLM_MODEL_INTERNAL_H
#define TLM_MODEL_INTERNAL_H

#include "model/model.h"

static inline void model_free_dev(tlm_model *m, void *p) {
    if (p) m->ops->free(m->ops, p);
}

/* Bytes of n activation elements (ops.h: o->act_dtype). */
static inline size_t model_act_bytes(const tlm_ops *o, size_t n) { return ops_act_bytes(o, n); }

/* y[N,out] = x[N,in] @ w[out,in]^T + beta * y  (a linear layer, no bias).
 * x is an activation (o->act_dtype), w fp32; y has element type ydt:
 * o->act_dtype for a new activation, TLM_ACT_F32 for the residual stream
 * (beta = 1 adds the branch into it) or logits handed to the host. */
static inline void model_linear(tlm_ops *o, void *y, int ydt, const void *x, const float *w, int N, int in, int out,
                                float beta) {
    o->matmul_ex(o, 0, 1, N, out, in, 1.0f, x, o->act_dtype, in, w, TLM_ACT_F32, in, beta, y, ydt, out);
}

#endif
