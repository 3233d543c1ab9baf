/* The key/value cache: per layer, k and v for every sequence and position. */
#include <stdlib.h>
#include <string.h>

#include "infer/infer.h"

int kvcache_alloc(tlm_kvcache *c, tlm_model *m, int B, int Tmax) {
    memset(c, 0, sizeof *c);
    const int L = m->cfg.layers, D = m->cfg.dim;
    if (B < 1 || Tmax < 1) return tlm_errorf("kv cache: batch %d and length %d must be positive", B, Tmax);
    c->L = L;
    c->B = B;
    c->Tmax = Tmax;
    c->D = D;
    c->k = calloc((size_t)L, sizeof *c->k);
    c->v = calloc((size_t)L, sizeof *c->v);
    if (!c->k || !c->v) {
        kvcache_free(c, m);
        return tlm_errorf("out of memory allocating the kv cache");
    }
    const size_t bytes = (size_t)B * (size_t)Tmax * (size_t)D * sizeof(float);
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
    /* Sequence b occupies rows b*Tmax .. b*Tmax+Tmax-1 of [B*Tmax, D]. */
    const size_t seq = (size_t)c->Tmax * (size_t)c->D;
    const size_t bytes = (size_t)npos * (size_t)c->D * sizeof(float);
    for (int l = 0; l < c->L; l++) {
        for (int b = 0; b < c->B; b++) {
            if (b == src) continue;
            m->ops->copy_d2d(m->ops, c->k[l] + (size_t)b * seq, c->k[l] + (size_t)src * seq, bytes);
            m->ops->copy_d2d(m->ops, c->v[l] + (size_t)b * seq, c->v[l] + (size_t)src * seq, bytes);
        }
    }
}
