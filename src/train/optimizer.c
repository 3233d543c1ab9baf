/* AdamW with decoupled weight decay and global-norm gradient clipping. */
#include <math.h>

#include "train/train.h"

int adamw_create(tlm_adamw *a, tlm_ops *ops, size_t nparams) {
    a->n = nparams;
    a->m = ops->alloc(ops, nparams * sizeof(float));
    a->v = ops->alloc(ops, nparams * sizeof(float));
    a->gnorm_sq = ops->alloc(ops, sizeof(float));
    if (!a->m || !a->v || !a->gnorm_sq) {
        adamw_destroy(a, ops);
        return -1;
    }
    return 0;
}

void adamw_destroy(tlm_adamw *a, tlm_ops *ops) {
    if (a->m) ops->free(ops, a->m);
    if (a->v) ops->free(ops, a->v);
    if (a->gnorm_sq) ops->free(ops, a->gnorm_sq);
    a->m = a->v = a->gnorm_sq = NULL;
}

void adamw_grad_norm_async(tlm_adamw *a, tlm_model *m, float *copy_to) {
    tlm_ops *o = m->ops;
    /* The gradients are one flat buffer, so one reduction covers them all;
     * the result stays on the device where adamw reads it for clipping. */
    o->sumsq(o, a->gnorm_sq, m->grads, m->nparams, 0);
    if (copy_to) o->copy_d2d(o, copy_to, a->gnorm_sq, sizeof(float));
}

double adamw_grad_norm(tlm_adamw *a, tlm_model *m) {
    tlm_ops *o = m->ops;
    adamw_grad_norm_async(a, m, NULL);
    float sq = 0;
    o->copy_d2h(o, &sq, a->gnorm_sq, sizeof sq);
    return sqrt((double)sq);
}

void adamw_update(tlm_adamw *a, tlm_model *m, double lr, double weight_decay, double clip, int64_t t) {
    tlm_ops *o = m->ops;
    /* Per tensor, because weight decay applies to the 2-D weights only. */
    for (int i = 0; i < m->ntensors; i++) {
        const tlm_tensor *ts = &m->tensors[i];
        size_t off = ts->offset, n = (size_t)ts->rows * (size_t)ts->cols;
        o->adamw(o, m->params + off, m->grads + off, a->m + off, a->v + off, n, (float)lr, (float)TLM_ADAM_BETA1,
                 (float)TLM_ADAM_BETA2, (float)TLM_ADAM_EPS, ts->decay ? (float)weight_decay : 0.0f, (int)t,
                 a->gnorm_sq, (float)clip);
    }
}
