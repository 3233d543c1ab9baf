/* The key/value cache: per layer, k and v for every sequence and position. */
#include <stdlib.h>
#include <string.h>

#include "infer/infer.h"

static size_t kvcache_elem(const tlm_kvcache *c) { return c->kv_dtype == TLM_KV_F16 ? 2 : sizeof(float); }

int kvcache_alloc(tlm_kvcache *c, tlm_model *m, int B, int Tmax) { return kvcache_alloc_dtype(c, m, B, Tmax, 0); }

int kvcache_alloc_dtype(tlm_kvcache *c, tlm_model *m, int B, int Tmax, int kv_dtype) {
    memset(c, 0, sizeof *c);
    const int L = m->cfg.layers, D = m->cfg.dim;
    if (B < 1 || Tmax < 1) return tlm_errorf("kv cache: batch %d and length %d must be positive", B, Tmax);
    c->L = L;
    c->B = B;
    c->Tmax = Tmax;
    c->D = D;
    c->H = m->cfg.heads;
    if (kv_dtype != 0 && kv_dtype != TLM_KV_F32 && kv_dtype != TLM_KV_F16)
        return tlm_errorf("kv cache: unknown element type %d", kv_dtype);
    c->kv_dtype = kv_dtype;
    c->k = calloc((size_t)L, sizeof *c->k);
    c->v = calloc((size_t)L, sizeof *c->v);
    if (!c->k || !c->v) {
        kvcache_free(c, m);
        return tlm_errorf("out of memory allocating the kv cache");
    }
    const size_t bytes = (size_t)B * (size_t)Tmax * (size_t)D * kvcache_elem(c);
    for (int l = 0; l < L; l++) {
        c->k[l] = m->ops->alloc(m->ops, bytes);
        c->v[l] = m->ops->alloc(m->ops, bytes);
        if (!c->k[l] || !c->v[l]) {
            char b[32];
            tlm_fmt_bytes(2.0 * (double)bytes * L, b, sizeof b);
            kvcache_free(c, m);
            return tlm_errorf("out of device memory for a %s kv cache (%d samples x %d positions): use fewer "
                              "--samples or --max-tokens",
                              b, B, Tmax);
        }
    }
    return 0;
}

void kvcache_free(tlm_kvcache *c, tlm_model *m) {
    for (int l = 0; l < c->L && c->k && c->v; l++) {
        if (c->k[l]) m->ops->free(m->ops, c->k[l]);
        if (c->v[l]) m->ops->free(m->ops, c->v[l]);
    }
    free(c->k);
    free(c->v);
    memset(c, 0, sizeof *c);
}

void kvcache_broadcast(tlm_kvcache *c, tlm_model *m, int src, int npos) {
    /* Sequence b occupies elements b*Tmax*D .. (b+1)*Tmax*D-1 in both
     * layouts: positions are rows of D ([B,Tmax,D]), or each head's rows of
     * hd come one head after the other ([B,H,Tmax,hd]). */
    const size_t es = kvcache_elem(c);
    const size_t seq = (size_t)c->Tmax * (size_t)c->D * es;
    const int parts = c->kv_dtype ? c->H : 1;           /* contiguous runs per sequence */
    const size_t run = seq / (size_t)parts;              /* bytes from one run to the next */
    const size_t bytes = (size_t)npos * (size_t)(c->D / parts) * es;
    for (int l = 0; l < c->L; l++) {
        char *k = (char *)c->k[l], *v = (char *)c->v[l];
        for (int b = 0; b < c->B; b++) {
            if (b == src) continue;
            for (int h = 0; h < parts; h++) {
                size_t to = (size_t)b * seq + (size_t)h * run, from = (size_t)src * seq + (size_t)h * run;
                m->ops->copy_d2d(m->ops, k + to, k + from, bytes);
                m->ops->copy_d2d(m->ops, v + to, v + from, bytes);
            }
        }
    }
}
