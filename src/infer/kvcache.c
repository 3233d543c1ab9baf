/* The key/value cache: per layer, k and v for every sequence and position. */
#include <stdlib.h>
#include <string.h>

#include "infer/infer.h"

static size_t kvcache_elem(const tlm_kvcache *c) { return c->kv_dtype == TLM_KV_F16 ? 2 : sizeof(float); }

int kvcache_alloc(tlm_kvcache *c, tlm_model *m, int B, int Tmax) { return kvcache_alloc_dtype(c, m, B, Tmax, 0); }

int kvcache_alloc_dtype(tlm_kvcache *c, tlm_model *m, int B, int Tmax, int kv_dtype) {
    return kvcache_alloc_shared(c, m, B, 0, Tmax, kv_dtype);
}

/* Per layer, two buffers of `bytes` into ks[l], vs[l]; -1 + error naming
 * the whole cache's size otherwise. */
static int kvcache_alloc_layers(tlm_kvcache *c, tlm_model *m, float ***ks, float ***vs, size_t bytes) {
    const int L = c->L;
    *ks = calloc((size_t)L, sizeof **ks);
    *vs = calloc((size_t)L, sizeof **vs);
    if (!*ks || !*vs) return tlm_errorf("out of memory allocating the kv cache");
    for (int l = 0; l < L; l++) {
        (*ks)[l] = m->ops->alloc(m->ops, bytes);
        (*vs)[l] = m->ops->alloc(m->ops, bytes);
        if (!(*ks)[l] || !(*vs)[l]) {
            char b[32];
            tlm_fmt_bytes(2.0 * (double)bytes * L, b, sizeof b);
            return tlm_errorf("out of device memory for a %s kv cache (%d samples x %d positions): use fewer "
                              "--samples or --max-tokens",
                              b, c->B, c->P + c->Tmax);
        }
    }
    return 0;
}

int kvcache_alloc_shared(tlm_kvcache *c, tlm_model *m, int B, int P, int Tmax, int kv_dtype) {
    memset(c, 0, sizeof *c);
    const int L = m->cfg.layers, D = m->cfg.dim;
    if (B < 1 || Tmax < 1 || P < 0) return tlm_errorf("kv cache: batch %d and length %d must be positive", B, Tmax);
    if (kv_dtype != 0 && kv_dtype != TLM_KV_F32 && kv_dtype != TLM_KV_F16)
        return tlm_errorf("kv cache: unknown element type %d", kv_dtype);
    if (P > 0 && kv_dtype == 0) return tlm_errorf("kv cache: a shared prefix needs the head-major caches");
    c->L = L;
    c->B = B;
    c->P = P;
    c->Tmax = Tmax;
    c->D = D;
    c->H = m->cfg.heads;
    c->kv_dtype = kv_dtype;
    const size_t es = kvcache_elem(c);
    if (kvcache_alloc_layers(c, m, &c->k, &c->v, (size_t)B * (size_t)Tmax * (size_t)D * es) ||
        (P > 0 && kvcache_alloc_layers(c, m, &c->pk, &c->pv, (size_t)P * (size_t)D * es))) {
        kvcache_free(c, m);
        return -1;
    }
    return 0;
}

static void kvcache_free_layers(tlm_model *m, float **ks, float **vs, int L) {
    for (int l = 0; l < L && ks; l++)
        if (ks[l]) m->ops->free(m->ops, ks[l]);
    for (int l = 0; l < L && vs; l++)
        if (vs[l]) m->ops->free(m->ops, vs[l]);
    free(ks);
    free(vs);
}

void kvcache_free(tlm_kvcache *c, tlm_model *m) {
    kvcache_free_layers(m, c->k, c->v, c->L);
    kvcache_free_layers(m, c->pk, c->pv, c->L);
    memset(c, 0, sizeof *c);
}

tlm_kv_prefix kvcache_prefix(const tlm_kvcache *c) {
    tlm_kv_prefix p = {.k = c->pk, .v = c->pv, .P = c->P};
    return p;
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
