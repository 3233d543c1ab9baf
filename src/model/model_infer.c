/*
 * The generation path of the model: forward over a KV cache, computing
 * logits only for the last position of each sequence. Written against the
 * op table like the training path in model.c.
 */
#include "model/model.h"
#include "model/model_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "util/common.h"

int model_infer_scratch_alloc(tlm_model *m, tlm_infer_scratch *s, int Bmax, int Tchunk) {
    memset(s, 0, sizeof *s);
    const tlm_config *c = &m->cfg;
    if (Bmax <= 0 || Tchunk <= 0) return tlm_errorf("generation batch and chunk sizes must be positive");
    long long Nll = (long long)Bmax * Tchunk;
    if (Nll * 3 * c->dim > 0x7fffffffLL || Nll * 2 * c->hidden > 0x7fffffffLL ||
        (long long)Bmax * c->vocab > 0x7fffffffLL)
        return tlm_errorf("generation batch %d x chunk %d is too large: use a smaller batch", Bmax, Tchunk);
    tlm_ops *o = m->ops;
    size_t N = (size_t)Nll, D = (size_t)c->dim, F = (size_t)c->hidden;
    const size_t f = sizeof(float);
    int ok = 1;
#define DEV(ptr, bytes) do { if (ok) { (ptr) = o->alloc(o, (bytes)); if (!(ptr)) ok = 0; } } while (0)
    DEV(s->x, N * D * f);
    DEV(s->xn, N * D * f);
    DEV(s->qkv, N * 3 * D * f);
    DEV(s->att, N * D * f);
    DEV(s->gu, N * 2 * F * f);
    DEV(s->act, N * F * f);
    DEV(s->xlast, (size_t)Bmax * D * f);
    DEV(s->tokens_dev, N * sizeof(int32_t));
#undef DEV
    if (!ok) {
        model_infer_scratch_free(m, s);
        return -1;
    }
    s->Bmax = Bmax;
    s->Tchunk = Tchunk;
    return 0;
}

void model_infer_scratch_free(tlm_model *m, tlm_infer_scratch *s) {
    model_free_dev(m, s->x); model_free_dev(m, s->xn); model_free_dev(m, s->qkv); model_free_dev(m, s->att);
    model_free_dev(m, s->gu); model_free_dev(m, s->act); model_free_dev(m, s->xlast); model_free_dev(m, s->tokens_dev);
    memset(s, 0, sizeof *s);
}

int model_forward_cached(tlm_model *m, tlm_infer_scratch *s, float **kc, float **vc, int Tmax,
                         const int32_t *tokens, int B, int T, int pos0, float *logits_out) {
    const tlm_config *c = &m->cfg;
    tlm_ops *o = m->ops;
    if (B <= 0 || T <= 0 || B > s->Bmax || T > s->Tchunk)
        return tlm_errorf("generation batch %d x %d exceeds the scratch allocated for %d x %d", B, T, s->Bmax,
                          s->Tchunk);
    if (pos0 < 0 || pos0 + T > Tmax)
        return tlm_errorf("positions %d..%d exceed the KV cache length %d", pos0, pos0 + T - 1, Tmax);
    const int N = B * T, D = c->dim, F = c->hidden, V = c->vocab, H = c->heads, hd = D / H, L = c->layers;
    const float eps = c->norm_eps, theta = c->rope_theta;
    o->copy_h2d(o, s->tokens_dev, tokens, (size_t)N * sizeof(int32_t));
    o->embed_fwd(o, s->x, s->tokens_dev, m->wte, N, D);
    for (int l = 0; l < L; l++) {
        const tlm_layer_params *p = &m->layer[l];
        o->rmsnorm_fwd(o, s->xn, NULL, s->x, p->attn_norm, N, D, eps);
        model_linear(o, s->qkv, s->xn, p->wqkv, N, D, 3 * D, 0.0f);
        o->rope_fwd(o, s->qkv, B, T, H, hd, pos0, theta);
        o->kv_store(o, kc[l], vc[l], s->qkv, B, T, Tmax, D, pos0);
        o->attn_cached(o, s->att, s->qkv, kc[l], vc[l], B, T, Tmax, H, hd, pos0);
        model_linear(o, s->x, s->att, p->wo, N, D, D, 1.0f);
        o->rmsnorm_fwd(o, s->xn, NULL, s->x, p->mlp_norm, N, D, eps);
        model_linear(o, s->gu, s->xn, p->wgu, N, D, 2 * F, 0.0f);
        o->swiglu_fwd(o, s->act, s->gu, N, F);
        model_linear(o, s->x, s->act, p->wdown, N, F, D, 1.0f);
    }
    /* Only the last position of each sequence needs logits: gather those B
     * rows, so the [V,D] head costs B rows instead of B*T. */
    for (int b = 0; b < B; b++)
        o->copy_d2d(o, s->xlast + (size_t)b * D, s->x + ((size_t)b * T + (size_t)(T - 1)) * D,
                    (size_t)D * sizeof(float));
    o->rmsnorm_fwd(o, s->xn, NULL, s->xlast, m->final_norm, B, D, eps);
    model_linear(o, logits_out, s->xn, m->wte, B, D, V, 0.0f);
    return 0;
}
