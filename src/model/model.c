/*
 * The Llama-style decoder written once against the op table. Nothing here
 * knows which backend runs it: every buffer comes from ops->alloc and every
 * computation is an ops call. All buffers are allocated up front
 * (model_create, model_alloc_train, model_infer_scratch_alloc) so a training
 * or generation step never allocates.
 */
#include "model/model.h"
#include "model/model_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "util/common.h"

/* ---- parameter layout ----------------------------------------------------
 * The flat buffer is laid out in Hugging Face tensor order, so the tensor
 * list, the safetensors file and the buffer all walk the same way:
 *   embed_tokens [V,D]
 *   per layer: input_layernorm [D], q,k,v [D,D] each (= wqkv [3D,D]),
 *              o_proj [D,D], post_attention_layernorm [D],
 *              gate, up [F,D] each (= wgu [2F,D]), down [D,F]
 *   norm [D]
 */

static void layout_add(tlm_model *m, size_t *off, const char *name, int rows, int cols, int ndim, int decay) {
    tlm_tensor *t = &m->tensors[m->ntensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->offset = *off;
    t->rows = rows;
    t->cols = cols;
    t->ndim = ndim;
    t->decay = decay;
    *off += (size_t)rows * (size_t)cols;
}

static void layout_build(tlm_model *m) {
    const tlm_config *c = &m->cfg;
    int D = c->dim, F = c->hidden;
    size_t off = 0;
    char name[96];
    m->ntensors = 0;
    layout_add(m, &off, "model.embed_tokens.weight", c->vocab, D, 2, 1);
    for (int l = 0; l < c->layers; l++) {
#define LNAME(s) (snprintf(name, sizeof name, "model.layers.%d.%s", l, s), name)
        layout_add(m, &off, LNAME("input_layernorm.weight"), D, 1, 1, 0);
        layout_add(m, &off, LNAME("self_attn.q_proj.weight"), D, D, 2, 1);
        layout_add(m, &off, LNAME("self_attn.k_proj.weight"), D, D, 2, 1);
        layout_add(m, &off, LNAME("self_attn.v_proj.weight"), D, D, 2, 1);
        layout_add(m, &off, LNAME("self_attn.o_proj.weight"), D, D, 2, 1);
        layout_add(m, &off, LNAME("post_attention_layernorm.weight"), D, 1, 1, 0);
        layout_add(m, &off, LNAME("mlp.gate_proj.weight"), F, D, 2, 1);
        layout_add(m, &off, LNAME("mlp.up_proj.weight"), F, D, 2, 1);
        layout_add(m, &off, LNAME("mlp.down_proj.weight"), D, F, 2, 1);
#undef LNAME
    }
    layout_add(m, &off, "model.norm.weight", D, 1, 1, 0);
}

/* Point the per-layer views of base (params or grads) at their tensors. */
static void layout_views(tlm_model *m, float *base, tlm_layer_params *lp, float **wte, float **fnorm) {
    const int per_layer = 9;
    *wte = base + m->tensors[0].offset;
    for (int l = 0; l < m->cfg.layers; l++) {
        const tlm_tensor *t = &m->tensors[1 + l * per_layer];
        lp[l].attn_norm = base + t[0].offset;
        lp[l].wqkv = base + t[1].offset;
        lp[l].wo = base + t[4].offset;
        lp[l].mlp_norm = base + t[5].offset;
        lp[l].wgu = base + t[6].offset;
        lp[l].wdown = base + t[8].offset;
    }
    *fnorm = base + m->tensors[m->ntensors - 1].offset;
}

int model_create(tlm_model *m, const tlm_config *cfg, tlm_ops *ops) {
    memset(m, 0, sizeof *m);
    if (config_validate(cfg)) return -1;
    m->cfg = *cfg;
    m->ops = ops;
    m->nparams = config_param_count(cfg);
    int nt = 2 + 9 * cfg->layers;
    m->tensors = tlm_alloc(sizeof(tlm_tensor) * (size_t)nt);
    m->layer = tlm_alloc(sizeof(tlm_layer_params) * (size_t)cfg->layers);
    m->glayer = tlm_alloc(sizeof(tlm_layer_params) * (size_t)cfg->layers);
    if (!m->tensors || !m->layer || !m->glayer) { model_destroy(m); return -1; }
    layout_build(m);
    m->params = ops->alloc(ops, m->nparams * sizeof(float));
    if (!m->params) { model_destroy(m); return -1; }
    layout_views(m, m->params, m->layer, &m->wte, &m->final_norm);
    return 0;
}

static void free_train(tlm_model *m) {
    if (m->acts) {
        for (int l = 0; l < m->cfg.layers; l++) {
            tlm_layer_acts *a = &m->acts[l];
            model_free_dev(m, a->x); model_free_dev(m, a->rstd1); model_free_dev(m, a->qkv); model_free_dev(m, a->att);
            model_free_dev(m, a->lse); model_free_dev(m, a->xmid); model_free_dev(m, a->rstd2); model_free_dev(m, a->gu);
            model_free_dev(m, a->act);
        }
        tlm_free(m->acts);
        m->acts = NULL;
    }
    model_free_dev(m, m->grads);
    model_free_dev(m, m->xfinal); model_free_dev(m, m->xf); model_free_dev(m, m->rstdf); model_free_dev(m, m->logits);
    model_free_dev(m, m->losses); model_free_dev(m, m->loss_dev);
    for (int j = 0; j < 2; j++) {
        model_free_dev(m, m->tokens_dev[j]);
        model_free_dev(m, m->targets_dev[j]);
        if (m->buf_free[j]) m->ops->event_destroy(m->ops, m->buf_free[j]);
        if (m->buf_copied[j]) m->ops->event_destroy(m->ops, m->buf_copied[j]);
        m->tokens_dev[j] = m->targets_dev[j] = NULL;
        m->buf_free[j] = m->buf_copied[j] = NULL;
    }
    m->nstaged = 0;
    m->cur = m->staged_B = m->staged_T = 0;
    /* dqkv and datt share the buffers of dgu and dact (model_alloc_train) */
    model_free_dev(m, m->dx); model_free_dev(m, m->dtmp);
    model_free_dev(m, m->dgu); model_free_dev(m, m->dact); model_free_dev(m, m->dxn);
    m->grads = m->xfinal = m->xf = m->rstdf = m->logits = m->losses = m->loss_dev = NULL;
    m->dx = m->dtmp = m->dqkv = m->datt = m->dgu = m->dact = m->dxn = NULL;
    m->Bmax = m->Tmax = 0;
}

void model_destroy(tlm_model *m) {
    if (!m) return;
    if (m->ops) {
        free_train(m);
        model_free_dev(m, m->params);
    }
    tlm_free(m->tensors);
    tlm_free(m->layer);
    tlm_free(m->glayer);
    memset(m, 0, sizeof *m);
}

void model_init_random(tlm_model *m, uint64_t seed) {
    tlm_rng rng;
    tlm_rng_seed(&rng, seed);
    /* Residual-branch outputs (o_proj, down_proj) are scaled down so the
     * residual stream's variance does not grow with depth (GPT-2 style). */
    const float std = 0.02f;
    const float out_scale = 1.0f / sqrtf(2.0f * (float)m->cfg.layers);
    size_t maxn = 0;
    for (int i = 0; i < m->ntensors; i++) {
        size_t n = (size_t)m->tensors[i].rows * (size_t)m->tensors[i].cols;
        if (n > maxn) maxn = n;
    }
    float *buf = tlm_alloc(maxn * sizeof(float));
    if (!buf) return; /* out of memory: weights stay zero; the error is set */
    for (int i = 0; i < m->ntensors; i++) {
        const tlm_tensor *t = &m->tensors[i];
        size_t n = (size_t)t->rows * (size_t)t->cols;
        if (!t->decay) {
            for (size_t k = 0; k < n; k++) buf[k] = 1.0f;
        } else {
            int is_out = strstr(t->name, "o_proj") != NULL || strstr(t->name, "down_proj") != NULL;
            float s = is_out ? std * out_scale : std;
            for (size_t k = 0; k < n; k++) buf[k] = s * tlm_rng_normal(&rng);
        }
        m->ops->copy_h2d(m->ops, m->params + t->offset, buf, n * sizeof(float));
    }
    tlm_free(buf);
}

int model_alloc_train(tlm_model *m, int Bmax, int Tmax) {
    const tlm_config *c = &m->cfg;
    if (Bmax <= 0 || Tmax <= 0) return tlm_errorf("--batch and --context must be positive");
    if (Tmax > c->context)
        return tlm_errorf("sequence length %d exceeds the model context %d: use --context %d or less", Tmax,
                          c->context, c->context);
    long long Nll = (long long)Bmax * Tmax;
    if (Nll * c->vocab > 0x7fffffffLL || Nll * 3 * c->dim > 0x7fffffffLL || Nll * 2 * c->hidden > 0x7fffffffLL)
        return tlm_errorf("--batch %d x context %d is too large for one step: use a smaller --batch", Bmax, Tmax);
    free_train(m);
    tlm_ops *o = m->ops;
    size_t N = (size_t)Nll, D = (size_t)c->dim, F = (size_t)c->hidden, V = (size_t)c->vocab;
    size_t H = (size_t)c->heads, L = (size_t)c->layers;
    const size_t f = sizeof(float);
    int ok = 1;
#define DEV(ptr, bytes) do { if (ok) { (ptr) = o->alloc(o, (bytes)); if (!(ptr)) ok = 0; } } while (0)
#define ACT(n) model_act_bytes(o, (n))
    DEV(m->grads, m->nparams * f);
    m->acts = tlm_alloc(sizeof(tlm_layer_acts) * L);
    if (!m->acts) ok = 0;
    for (size_t l = 0; ok && l < L; l++) {
        tlm_layer_acts *a = &m->acts[l];
        /* xn1, xn2 are not kept: the normalised rows are rebuilt from x
         * in backward (model_forward_backward), into m->xf */
        /* ACT: activations of o->act_dtype (ops.h); the residual stream,
         * rstd and lse stay fp32 */
        DEV(a->x, N * D * f);
        DEV(a->rstd1, N * f);
        DEV(a->qkv, ACT(N * 3 * D));
        DEV(a->att, ACT(N * D));
        DEV(a->lse, N * H * f);
        DEV(a->xmid, N * D * f);
        DEV(a->rstd2, N * f);
        DEV(a->gu, ACT(N * 2 * F));
        DEV(a->act, ACT(N * F));
    }
    DEV(m->xfinal, N * D * f);
    DEV(m->xf, ACT(N * D));
    DEV(m->rstdf, N * f);
    DEV(m->logits, ACT(N * V));
    DEV(m->losses, N * f);
    DEV(m->loss_dev, f);
    for (int j = 0; j < 2; j++) {
        DEV(m->tokens_dev[j], N * sizeof(int32_t));
        DEV(m->targets_dev[j], N * sizeof(int32_t));
        /* the upload block is all or nothing (ops.h) */
        if (ok && o->event_create) {
            if (!(m->buf_free[j] = o->event_create(o)) || !(m->buf_copied[j] = o->event_create(o))) ok = 0;
        }
    }
    /* the residual gradient is fp32 (it sums the branches); the gradients
     * of activations are activations */
    DEV(m->dx, N * D * f);
    DEV(m->dtmp, N * D * f);
    /* Backward of a layer is MLP first, then attention: dgu and dact are
     * dead by the time dqkv and datt are written, so they share buffers. */
    DEV(m->dgu, ACT(N * (2 * F > 3 * D ? 2 * F : 3 * D)));
    DEV(m->dact, ACT(N * (F > D ? F : D)));
    DEV(m->dxn, ACT(N * D));
#undef ACT
#undef DEV
    m->dqkv = m->dgu;
    m->datt = m->dact;
    if (!ok) {
        char inner[1024];
        snprintf(inner, sizeof inner, "%s", tlm_last_error());
        free_train(m);
        return tlm_errorf("cannot allocate training buffers for batch %d x %d: %s", Bmax, Tmax, inner);
    }
    layout_views(m, m->grads, m->glayer, &m->gwte, &m->gfinal_norm);
    m->Bmax = Bmax;
    m->Tmax = Tmax;
    return 0;
}

void model_zero_grad(tlm_model *m) {
    if (m->grads) m->ops->zero(m->ops, m->grads, m->nparams * sizeof(float));
}

/* Backward of linear: dx[N,in] = dy @ w (overwritten); dw[out,in] += dy^T @ x.
 * x and dx are activations (o->act_dtype), w and dw fp32; dy has element
 * type dydt: an activation gradient, or the fp32 residual gradient m->dx
 * for the layers that write into the residual stream (o_proj, down_proj). */
static void linear_bwd(tlm_ops *o, void *dx, float *dw, const void *dy, int dydt, const void *x, const float *w,
                       int N, int in, int out) {
    const int act = o->act_dtype, f32 = TLM_ACT_F32;
    o->matmul_ex(o, 0, 0, N, in, out, 1.0f, dy, dydt, out, w, f32, in, 0.0f, dx, act, in);
    o->matmul_ex(o, 1, 0, out, in, N, 1.0f, dy, dydt, out, x, act, in, 1.0f, dw, f32, in);
}

/* Forward, and backward when grad_scale > 0, on device tokens tok[B,T] and
 * targets tgt[B,T] (shape already checked); the mean loss to *loss_dev. */
static void forward_backward(tlm_model *m, const int32_t *tok, const int32_t *tgt, int B, int T, float grad_scale,
                             float *loss_dev) {
    const tlm_config *c = &m->cfg;
    tlm_ops *o = m->ops;
    const int N = B * T, D = c->dim, F = c->hidden, V = c->vocab, H = c->heads, hd = D / H, L = c->layers;
    const float eps = c->norm_eps, theta = c->rope_theta;
    const int act = o->act_dtype, f32 = TLM_ACT_F32;

    /* ---- forward ---- */
    o->embed_fwd(o, m->acts[0].x, tok, m->wte, N, D);
    for (int l = 0; l < L; l++) {
        const tlm_layer_params *p = &m->layer[l];
        tlm_layer_acts *a = &m->acts[l];
        float *xout = l + 1 < L ? m->acts[l + 1].x : m->xfinal;
        float *xn = m->xf; /* scratch until the final norm; an activation */
        o->rmsnorm_fwd(o, xn, a->rstd1, a->x, p->attn_norm, N, D, eps);
        model_linear(o, a->qkv, act, xn, p->wqkv, N, D, 3 * D, 0.0f);
        o->rope_fwd(o, a->qkv, B, T, H, hd, 0, theta);
        o->attn_fwd(o, a->att, a->lse, a->qkv, B, T, H, hd);
        /* residual: start from x, let the matmul add the branch (beta = 1) */
        o->copy_d2d(o, a->xmid, a->x, (size_t)N * D * sizeof(float));
        model_linear(o, a->xmid, f32, a->att, p->wo, N, D, D, 1.0f);
        o->rmsnorm_fwd(o, xn, a->rstd2, a->xmid, p->mlp_norm, N, D, eps);
        model_linear(o, a->gu, act, xn, p->wgu, N, D, 2 * F, 0.0f);
        o->swiglu_fwd(o, a->act, a->gu, N, F);
        o->copy_d2d(o, xout, a->xmid, (size_t)N * D * sizeof(float));
        model_linear(o, xout, f32, a->act, p->wdown, N, F, D, 1.0f);
    }
    o->rmsnorm_fwd(o, m->xf, m->rstdf, m->xfinal, m->final_norm, N, D, eps);
    model_linear(o, m->logits, act, m->xf, m->wte, N, D, V, 0.0f); /* tied head */
    int want_grad = grad_scale > 0.0f && m->grads != NULL;
    o->xent(o, m->logits, m->losses, tgt, N, V, grad_scale, want_grad);
    o->loss_mean(o, loss_dev, m->losses, tgt, N); /* stays on the device */

    /* ---- backward (logits now hold dlogits) ---- */
    if (want_grad) {
        /* The head's share of dwte; the embedding's share is added at the end. */
        linear_bwd(o, m->dxn, m->gwte, m->logits, act, m->xf, m->wte, N, D, V);
        o->rmsnorm_bwd(o, m->dx, m->gfinal_norm, m->dxn, m->xfinal, m->final_norm, m->rstdf, N, D);
        /* From here m->xf is scratch again: each layer's normalised input is
         * recomputed from its saved residual (a cheap pass over [N,D]; the
         * alternative is keeping two more [N,D] buffers per layer). */
        float *xn = m->xf;
        /* The residual gradient dx is fp32 (it sums the branches) and is dy
         * of the two layers that write into the residual stream (down_proj,
         * o_proj), two products each. With bf16 activations it is rounded
         * once per branch into dtmp (free until rmsnorm_bwd writes it)
         * instead of once inside each product: the same values, half the
         * conversion traffic. */
        const int round_dy = act != f32 && o->to_act;
        const void *dy = round_dy ? (const void *)m->dtmp : (const void *)m->dx;
        const int dydt = round_dy ? act : f32;
        for (int l = L - 1; l >= 0; l--) {
            const tlm_layer_params *p = &m->layer[l];
            const tlm_layer_params *g = &m->glayer[l];
            tlm_layer_acts *a = &m->acts[l];
            /* dx holds d(layer output); the MLP branch */
            if (round_dy) o->to_act(o, m->dtmp, m->dx, (size_t)N * D);
            linear_bwd(o, m->dact, g->wdown, dy, dydt, a->act, p->wdown, N, F, D);
            o->swiglu_bwd(o, m->dgu, m->dact, a->gu, N, F);
            o->rmsnorm_fwd(o, xn, NULL, a->xmid, p->mlp_norm, N, D, eps);
            linear_bwd(o, m->dxn, g->wgu, m->dgu, act, xn, p->wgu, N, D, 2 * F);
            o->rmsnorm_bwd(o, m->dtmp, g->mlp_norm, m->dxn, a->xmid, p->mlp_norm, a->rstd2, N, D);
            o->add_inplace(o, m->dx, m->dtmp, (size_t)N * D); /* dx = d(xmid) */
            /* the attention branch */
            if (round_dy) o->to_act(o, m->dtmp, m->dx, (size_t)N * D);
            linear_bwd(o, m->datt, g->wo, dy, dydt, a->att, p->wo, N, D, D);
            o->attn_bwd(o, m->dqkv, m->datt, a->att, a->lse, a->qkv, B, T, H, hd);
            o->rope_bwd(o, m->dqkv, B, T, H, hd, 0, theta);
            o->rmsnorm_fwd(o, xn, NULL, a->x, p->attn_norm, N, D, eps);
            linear_bwd(o, m->dxn, g->wqkv, m->dqkv, act, xn, p->wqkv, N, D, 3 * D);
            o->rmsnorm_bwd(o, m->dtmp, g->attn_norm, m->dxn, a->x, p->attn_norm, a->rstd1, N, D);
            o->add_inplace(o, m->dx, m->dtmp, (size_t)N * D); /* dx = d(layer input) */
        }
        o->embed_bwd(o, m->gwte, tok, m->dx, N, D);
    }
}

static int check_fit(const tlm_model *m, int B, int T) {
    if (!m->acts || B <= 0 || T <= 0 || B > m->Bmax || T > m->Tmax)
        return tlm_errorf("batch %d x %d does not fit the buffers allocated for %d x %d", B, T, m->Bmax, m->Tmax);
    return 0;
}

int64_t model_stage(tlm_model *m, const int32_t *inputs, const int32_t *targets, int B, int T) {
    if (check_fit(m, B, T)) return -1;
    tlm_ops *o = m->ops;
    const size_t bytes = (size_t)B * T * sizeof(int32_t);
    /* buffers alternate, so a ticket names its buffer */
    const int j = (int)(m->nstaged % 2);
    if (m->buf_copied[j]) {
        /* waits (on the device) for the step that last read buffer j, not
         * for the step in flight on the other one */
        o->copy_h2d_async(o, m->tokens_dev[j], inputs, bytes, m->buf_free[j], NULL);
        o->copy_h2d_async(o, m->targets_dev[j], targets, bytes, m->buf_free[j], m->buf_copied[j]);
    } else {
        o->copy_h2d(o, m->tokens_dev[j], inputs, bytes);
        o->copy_h2d(o, m->targets_dev[j], targets, bytes);
    }
    m->cur = j;
    m->staged_B = B;
    m->staged_T = T;
    return ++m->nstaged;
}

int model_stage_done(tlm_model *m, int64_t ticket, int wait) {
    if (ticket < 1 || ticket > m->nstaged) return 1;
    tlm_event *e = m->buf_copied[(ticket - 1) % 2];
    return e ? m->ops->event_done(m->ops, e, wait) : 1;
}

int model_step(tlm_model *m, float grad_scale, float *loss_dev) {
    if (!m->staged_B || !m->acts) return tlm_errorf("model_step: no batch staged: call model_stage first");
    const int j = m->cur;
    forward_backward(m, m->tokens_dev[j], m->targets_dev[j], m->staged_B, m->staged_T, grad_scale, loss_dev);
    if (m->buf_free[j]) m->ops->event_record(m->ops, m->buf_free[j]);
    return 0;
}

float model_forward_backward(tlm_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                             float grad_scale, int on_device) {
    tlm_ops *o = m->ops;
    if (check_fit(m, B, T)) return NAN;
    if (on_device) {
        forward_backward(m, inputs, targets, B, T, grad_scale, m->loss_dev);
    } else {
        if (model_stage(m, inputs, targets, B, T) < 0 || model_step(m, grad_scale, m->loss_dev)) return NAN;
    }
    /* waits for the step, and with it for the copies out of inputs/targets
     * (the compute stream waited for them), so they are free on return */
    float loss = NAN;
    o->copy_d2h(o, &loss, m->loss_dev, sizeof loss);
    return loss;
}

/* ---- generation ---------------------------------------------------------- */
