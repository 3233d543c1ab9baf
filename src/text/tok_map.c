/* Byte-string hash map used for piece counting, vocab look-up and caches. */
#include <stdlib.h>
#include <string.h>

#include "text/tok_internal.h"

static inline uint64_t map_mix(uint64_t x) {
    x ^= x >> 31;
    x *= 0xD6E8FEB86659FD93ULL;
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ULL;
    x ^= x >> 32;
    return x;
}

/* Pieces are short (most under 16 bytes), so the hash folds 8 bytes at a
 * time and finishes with one strong mix; quality matters only enough for
 * linear probing. */
uint64_t tok_hash_bytes(const unsigned char *p, size_t n) {
    uint64_t h = 0x243F6A8885A308D3ULL ^ ((uint64_t)n * 0x9E3779B97F4A7C15ULL);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        memcpy(&w, p, n);
        h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL;
    }
    h = map_mix(h);
    return h ? h : 1;
}

int bmap_init(bmap *m, size_t cap_hint) {
    memset(m, 0, sizeof *m);
    size_t cap = 16;
    while (cap < cap_hint * 2) cap <<= 1;
    m->e = calloc(cap, sizeof *m->e);
    m->acap = cap * 8;
    m->arena = malloc(m->acap);
    if (!m->e || !m->arena) {
        bmap_free(m);
        return -1;
    }
    m->cap = cap;
    return 0;
}

void bmap_free(bmap *m) {
    free(m->e);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

static int bmap_grow(bmap *m) {
    size_t ncap = m->cap * 2;
    bmap_entry *ne = calloc(ncap, sizeof *ne);
    if (!ne) return -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->e[i].h) continue;
        size_t j = (size_t)m->e[i].h & (ncap - 1);
        while (ne[j].h) j = (j + 1) & (ncap - 1);
        ne[j] = m->e[i];
    }
    free(m->e);
    m->e = ne;
    m->cap = ncap;
    return 0;
}

bmap_entry *bmap_upsert(bmap *m, const unsigned char *key, size_t len, uint64_t h, int *added) {
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    for (;;) {
        bmap_entry *e = &m->e[i];
        if (!e->h) break;
        if (e->h == h && e->len == len && memcmp(m->arena + e->off, key, len) == 0) {
            *added = 0;
            return e;
        }
        i = (i + 1) & mask;
    }
    /* Keep the load under 1/2 so probes stay short. */
    if ((m->n + 1) * 2 > m->cap) {
        if (bmap_grow(m)) return NULL;
        mask = m->cap - 1;
        i = (size_t)h & mask;
        while (m->e[i].h) i = (i + 1) & mask;
    }
    if (len > UINT32_MAX) return NULL;
    if (m->alen + len > m->acap) {
        size_t ncap = m->acap * 2;
        while (ncap < m->alen + len) ncap *= 2;
        unsigned char *na = realloc(m->arena, ncap);
        if (!na) return NULL;
        m->arena = na;
        m->acap = ncap;
    }
    memcpy(m->arena + m->alen, key, len);
    bmap_entry *e = &m->e[i];
    e->h = h;
    e->off = m->alen;
    e->len = (uint32_t)len;
    e->val = 0;
    m->alen += len;
    m->n++;
    *added = 1;
    return e;
}

const bmap_entry *bmap_find(const bmap *m, const unsigned char *key, size_t len, uint64_t h) {
    if (!m->cap) return NULL;
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    for (;;) {
        const bmap_entry *e = &m->e[i];
        if (!e->h) return NULL;
        if (e->h == h && e->len == len && memcmp(m->arena + e->off, key, len) == 0) return e;
        i = (i + 1) & mask;
    }
}
