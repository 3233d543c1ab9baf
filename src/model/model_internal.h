/* Helpers shared by the training (model.c) and generation (model_infer.c)
 * paths of the model. */
#ifndef TLM_MODEL_INTERNAL_H
#define TLM_MODEL_INTERNAL_H

#include "model/model.h"

static inline void model_free_dev(tlm_model *m, void *p) {
    if (p) m->ops->free(m->ops, p);
}

/* y[N,out] = x[N,in] @ w[out,in]^T + beta * y  (a linear layer, no bias) */
static inline void model_linear(tlm_ops *o, float *y, const float *x, const float *w, int N, int in, int out,
                                float beta) {
    o->matmul(o, 0, 1, N, out, in, 1.0f, x, in, w, in, beta, y, out);
}

#endif
