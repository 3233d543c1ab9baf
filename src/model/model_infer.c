/*
 * The generation path of the model: forward over a KV cache, computing
 * logits only for the last position of each sequence. Written against the
 * op table like the training path in model.c.
 */
#include "model/model.h"
#include "model/model_internal.h"
#include "model/model_infer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
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
    /* fp32-sized although model_forward_cached keeps xn, qkv, att, gu and
     * act in o->act_dtype: the packed path (model_forward_packed) shares
     * these buffers and writes fp32 into them */
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
    /* xn, qkv, att, gu, act are activations (o->act_dtype); x, xlast fp32 */
    const int act = o->act_dtype, f32 = TLM_ACT_F32;
    o->copy_h2d(o, s->tokens_dev, tokens, (size_t)N * sizeof(int32_t));
    o->embed_fwd(o, s->x, s->tokens_dev, m->wte, N, D);
    for (int l = 0; l < L; l++) {
        const tlm_layer_params *p = &m->layer[l];
        o->rmsnorm_fwd(o, s->xn, NULL, s->x, p->attn_norm, N, D, eps);
        model_linear(o, s->qkv, act, s->xn, p->wqkv, N, D, 3 * D, 0.0f);
        o->rope_fwd(o, s->qkv, B, T, H, hd, pos0, theta);
        o->kv_store(o, kc[l], vc[l], s->qkv, B, T, Tmax, D, pos0);
        o->attn_cached(o, s->att, s->qkv, kc[l], vc[l], B, T, Tmax, H, hd, pos0);
        model_linear(o, s->x, f32, s->att, p->wo, N, D, D, 1.0f);
        o->rmsnorm_fwd(o, s->xn, NULL, s->x, p->mlp_norm, N, D, eps);
        model_linear(o, s->gu, act, s->xn, p->wgu, N, D, 2 * F, 0.0f);
        o->swiglu_fwd(o, s->act, s->gu, N, F);
        model_linear(o, s->x, f32, s->act, p->wdown, N, F, D, 1.0f);
    }
    /* Only the last position of each sequence needs logits: gather those B
     * rows, so the [V,D] head costs B rows instead of B*T. */
    for (int b = 0; b < B; b++)
        o->copy_d2d(o, s->xlast + (size_t)b * D, s->x + ((size_t)b * T + (size_t)(T - 1)) * D,
                    (size_t)D * sizeof(float));
    o->rmsnorm_fwd(o, s->xn, NULL, s->xlast, m->final_norm, B, D, eps);
    model_linear(o, logits_out, f32, s->xn, m->wte, B, D, V, 0.0f); /* fp32 logits for the sampler */
    return 0;
}

/* ---- packed weights ------------------------------------------------------ */

static int model_has_packed_ops(const tlm_ops *o) {
    return o->pack && o->pack_free && o->matmul_packed && o->attn_decode && o->pack_dtype_fast;
}

int model_infer_resolve_dtype(const tlm_model *m, int dtype) {
    const tlm_ops *o = m->ops;
    switch (dtype) {
    case TLM_GEN_AUTO:
        return model_has_packed_ops(o) ? o->pack_dtype_fast : TLM_GEN_REF;
    case TLM_GEN_F32:
        /* fp32 is fp32: the unpacked path computes the same thing */
        return model_has_packed_ops(o) ? TLM_GEN_F32 : TLM_GEN_REF;
    case TLM_GEN_BF16:
        if (!model_has_packed_ops(o))
            return tlm_errorf("--dtype bf16 is not available on the %s device: use --dtype fp32", o->name);
        return TLM_GEN_BF16;
    case TLM_GEN_I8: {
        /* a table that does not say (0) predates int8: F32 and BF16 only */
        const unsigned dts = o->pack_dtypes ? o->pack_dtypes : 1u << TLM_PACK_F32 | 1u << TLM_PACK_BF16;
        if (!model_has_packed_ops(o) || !(dts & 1u << TLM_PACK_I8))
            return tlm_errorf("--dtype int8 is not available on the %s device: use --dtype bf16 or fp32 (int8 "
                              "runs on the CPU)",
                              o->name);
        return TLM_GEN_I8;
    }
    case TLM_GEN_REF:
        return TLM_GEN_REF;
    default:
        return tlm_errorf("generation dtype %d is unknown: use auto, fp32, bf16, int8 or ref", dtype);
    }
}

const char *model_infer_dtype_name(int dtype) {
    switch (dtype) {
    case TLM_GEN_AUTO: return "auto";
    case TLM_GEN_F32: return "fp32";
    case TLM_GEN_BF16: return "bf16";
    case TLM_GEN_I8: return "int8";
    case TLM_GEN_REF: return "fp32-ref";
    default: return "?";
    }
}

int model_infer_parse_dtype(const char *s, int *dtype) {
    if (!strcmp(s, "auto")) *dtype = TLM_GEN_AUTO;
    else if (!strcmp(s, "fp32") || !strcmp(s, "f32")) *dtype = TLM_GEN_F32;
    else if (!strcmp(s, "bf16")) *dtype = TLM_GEN_BF16;
    else if (!strcmp(s, "int8") || !strcmp(s, "i8")) *dtype = TLM_GEN_I8;
    else if (!strcmp(s, "ref")) *dtype = TLM_GEN_REF;
    else return tlm_errorf("--dtype %s is unknown: use auto, fp32, bf16, int8 or ref", s);
    return 0;
}

void model_infer_unpack(tlm_model *m, tlm_infer_weights *w) {
    tlm_ops *o = m->ops;
    for (int l = 0; l < w->L; l++) {
        if (w->wqkv && w->wqkv[l]) o->pack_free(o, w->wqkv[l]);
        if (w->wo && w->wo[l]) o->pack_free(o, w->wo[l]);
        if (w->wgu && w->wgu[l]) o->pack_free(o, w->wgu[l]);
        if (w->wdown && w->wdown[l]) o->pack_free(o, w->wdown[l]);
    }
    if (w->head) o->pack_free(o, w->head);
    free(w->wqkv);
    free(w->wo);
    free(w->wgu);
    free(w->wdown);
    memset(w, 0, sizeof *w);
    w->dtype = TLM_GEN_REF;
}

int model_infer_pack(tlm_model *m, tlm_infer_weights *w, int dtype) {
    memset(w, 0, sizeof *w);
    w->dtype = TLM_GEN_REF;
    int dt = model_infer_resolve_dtype(m, dtype);
    if (dt < 0) return -1;
    if (dt == TLM_GEN_REF) return 0;
    tlm_ops *o = m->ops;
    const tlm_config *c = &m->cfg;
    const int L = c->layers, D = c->dim, F = c->hidden;
    w->L = L;
    w->wqkv = calloc((size_t)L, sizeof *w->wqkv);
    w->wo = calloc((size_t)L, sizeof *w->wo);
    w->wgu = calloc((size_t)L, sizeof *w->wgu);
    w->wdown = calloc((size_t)L, sizeof *w->wdown);
    if (!w->wqkv || !w->wo || !w->wgu || !w->wdown) {
        tlm_errorf("out of memory packing the weights for generation");
        goto fail;
    }
    for (int l = 0; l < L; l++) {
        const tlm_layer_params *p = &m->layer[l];
        if (!(w->wqkv[l] = o->pack(o, p->wqkv, 3 * D, D, dt, TLM_PACK_LINEAR))) goto fail;
        if (!(w->wo[l] = o->pack(o, p->wo, D, D, dt, TLM_PACK_LINEAR))) goto fail;
        if (!(w->wgu[l] = o->pack(o, p->wgu, 2 * F, D, dt, TLM_PACK_SWIGLU))) goto fail;
        if (!(w->wdown[l] = o->pack(o, p->wdown, D, F, dt, TLM_PACK_LINEAR))) goto fail;
    }
    if (!(w->head = o->pack(o, m->wte, c->vocab, D, dt, TLM_PACK_LINEAR))) goto fail;
    w->dtype = dt;
    return 0;
fail:
    model_infer_unpack(m, w);
    return -1;
}

int model_infer_kv_dtype(const tlm_infer_weights *w) {
    if (!w || w->dtype == TLM_GEN_REF) return 0;
    return w->dtype == TLM_GEN_BF16 || w->dtype == TLM_GEN_I8 ? TLM_KV_F16 : TLM_KV_F32;
}

/* The step of model_forward_packed(_dev): tokens on the host (tok_host) or
 * on the device (tok_dev), position pos0 or *pos_dev. */
static int model_forward_packed_at(tlm_model *m, const tlm_infer_weights *w, tlm_infer_scratch *s, float **kc,
                                   float **vc, int Tmax, const tlm_kv_prefix *pre, const int32_t *tok_host,
                                   const int32_t *tok_dev, int B, int T, int pos0, const int32_t *pos_dev,
                                   float *logits_out) {
    const int P = pre ? pre->P : 0;
    const tlm_config *c = &m->cfg;
    tlm_ops *o = m->ops;
    if (B <= 0 || T <= 0 || B > s->Bmax || T > s->Tchunk)
        return tlm_errorf("generation batch %d x %d exceeds the scratch allocated for %d x %d", B, T, s->Bmax,
                          s->Tchunk);
    if (P < 0 || pos0 < P || pos0 - P + T > Tmax)
        return tlm_errorf("positions %d..%d exceed the KV cache (%d shared + %d own positions)", pos0, pos0 + T - 1,
                          P, Tmax);
    const int N = B * T, D = c->dim, H = c->heads, hd = D / H, L = c->layers;
    const float eps = c->norm_eps, theta = c->rope_theta;
    const int kvt = model_infer_kv_dtype(w);
    if (tok_dev) {
        o->embed_fwd(o, s->x, tok_dev, m->wte, N, D);
    } else if (o->embed_rows) {
        o->embed_rows(o, s->x, tok_host, m->wte, N, D);
    } else {
        o->copy_h2d(o, s->tokens_dev, tok_host, (size_t)N * sizeof(int32_t));
        o->embed_fwd(o, s->x, s->tokens_dev, m->wte, N, D);
    }
    for (int l = 0; l < L; l++) {
        const tlm_layer_params *p = &m->layer[l];
        o->matmul_packed(o, s->qkv, s->x, N, w->wqkv[l], p->attn_norm, eps, 0);
        o->attn_decode(o, s->att, s->qkv, kc[l], vc[l], kvt, P ? pre->k[l] : NULL, P ? pre->v[l] : NULL, P, B, T,
                       Tmax, H, hd, pos0, pos_dev, theta);
        o->matmul_packed(o, s->x, s->att, N, w->wo[l], NULL, 0.0f, 1);
        o->matmul_packed(o, s->act, s->x, N, w->wgu[l], p->mlp_norm, eps, 0);
        o->matmul_packed(o, s->x, s->act, N, w->wdown[l], NULL, 0.0f, 1);
    }
    /* logits of the last position of each sequence only (one row when T = 1) */
    const float *xl = s->x;
    if (T > 1) {
        for (int b = 0; b < B; b++)
            o->copy_d2d(o, s->xlast + (size_t)b * D, s->x + ((size_t)b * T + (size_t)(T - 1)) * D,
                        (size_t)D * sizeof(float));
        xl = s->xlast;
    }
    o->matmul_packed(o, logits_out, xl, B, w->head, m->final_norm, eps, 0);
    return 0;
}

int model_forward_packed(tlm_model *m, const tlm_infer_weights *w, tlm_infer_scratch *s, float **kc, float **vc,
                         int Tmax, const tlm_kv_prefix *pre, const int32_t *tokens, int B, int T, int pos0,
                         float *logits_out) {
    if (!w || w->dtype == TLM_GEN_REF) {
        if (pre && pre->P > 0) return tlm_errorf("a shared KV prefix needs packed weights (not --dtype ref)");
        return model_forward_cached(m, s, kc, vc, Tmax, tokens, B, T, pos0, logits_out);
    }
    return model_forward_packed_at(m, w, s, kc, vc, Tmax, pre, tokens, NULL, B, T, pos0, NULL, logits_out);
}

int model_forward_packed_dev(tlm_model *m, const tlm_infer_weights *w, tlm_infer_scratch *s, float **kc, float **vc,
                             int Tmax, const tlm_kv_prefix *pre, const int32_t *tokens_dev, int B, int T, int pos0,
                             const int32_t *pos_dev, float *logits_out) {
    if (!w || w->dtype == TLM_GEN_REF)
        return tlm_errorf("a step with its inputs on the device needs packed weights (not --dtype ref)");
    return model_forward_packed_at(m, w, s, kc, vc, Tmax, pre, NULL, tokens_dev, B, T, pos0, pos_dev, logits_out);
}
