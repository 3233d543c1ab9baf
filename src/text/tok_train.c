/*
 * BPE training. Pieces are counted once (in parallel); training then runs
 * on the unique pieces ("words") weighted by their counts. Each merge only
 * touches the words that contain the merged pair (found through a pair ->
 * words index) and updates pair counts incrementally; a max-heap with lazy
 * deletion picks the next pair.
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "text/tok_internal.h"
#include "util/common.h"

typedef struct {
    int32_t a, b;
    int32_t stamp;      /* last merge step that changed the count */
    int32_t banned;     /* joins into an existing token's bytes: never merged */
    uint32_t nwhere, cwhere;
    int64_t count;      /* occurrences, weighted by word frequency */
    int32_t *where;     /* words that may contain the pair (may repeat or be stale) */
} tpair;

typedef struct {
    int64_t count;  /* the pair's count when pushed; stale if it differs now */
    int32_t pair;
} theap;

typedef struct {
    /* (a, b) -> pair index */
    uint64_t *keys;
    int32_t *idx;
    size_t mask, nkeys;
    tpair *pairs;
    size_t npairs, cpairs;
    theap *heap;
    size_t nheap, cheap;
    /* token bytes, growing as merges add tokens */
    uint64_t *tok_off;
    unsigned char *tok_bytes;
    size_t ctok_bytes;
    int ntok;
    /* words */
    int32_t *sym;
    size_t *woff;
    int32_t *wlen, *wstamp;
    int64_t *wfreq;
    size_t nwords;
    int32_t *changed;
    size_t nchanged, cchanged;
    bmap tokset;  /* bytes of every token so far */
    int32_t step;
    int oom;
} trainer;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 16;
    while (nc < need) nc *= 2;
    void *np = realloc(*p, nc * elem);
    if (!np) return -1;
    *p = np;
    *cap = nc;
    return 0;
}

static int32_t pair_lookup(trainer *tr, int32_t a, int32_t b) {
    uint64_t key = tok_pair_pack(a, b);
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 32) & tr->mask;
    while (tr->keys[i] != UINT64_MAX) {
        if (tr->keys[i] == key) return tr->idx[i];
        i = (i + 1) & tr->mask;
    }
    /* New pair: keep the table at most half full. */
    if ((tr->nkeys + 1) * 2 > tr->mask + 1) {
        size_t ncap = (tr->mask + 1) * 2;
        uint64_t *nk = malloc(ncap * sizeof *nk);
        int32_t *ni = malloc(ncap * sizeof *ni);
        if (!nk || !ni) {
            free(nk);
            free(ni);
            tr->oom = 1;
            return -1;
        }
        memset(nk, 0xFF, ncap * sizeof *nk);
        for (size_t j = 0; j <= tr->mask; j++) {
            if (tr->keys[j] == UINT64_MAX) continue;
            size_t k = (size_t)((tr->keys[j] * 0x9E3779B97F4A7C15ULL) >> 32) & (ncap - 1);
            while (nk[k] != UINT64_MAX) k = (k + 1) & (ncap - 1);
            nk[k] = tr->keys[j];
            ni[k] = tr->idx[j];
        }
        free(tr->keys);
        free(tr->idx);
        tr->keys = nk;
        tr->idx = ni;
        tr->mask = ncap - 1;
        i = (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 32) & tr->mask;
        while (tr->keys[i] != UINT64_MAX) i = (i + 1) & tr->mask;
    }
    if (grow((void **)&tr->pairs, &tr->cpairs, tr->npairs + 1, sizeof *tr->pairs)) {
        tr->oom = 1;
        return -1;
    }
    int32_t id = (int32_t)tr->npairs++;
    tr->pairs[id] = (tpair){a, b, -1, 0, 0, 0, 0, NULL};
    tr->keys[i] = key;
    tr->idx[i] = id;
    tr->nkeys++;
    return id;
}

/* Add delta occurrences of (a, b) in word w. */
static void pair_add(trainer *tr, int32_t a, int32_t b, int64_t delta, int32_t w) {
    int32_t id = pair_lookup(tr, a, b);
    if (id < 0) return;
    tpair *p = &tr->pairs[id];
    p->count += delta;
    if (delta > 0 && (p->nwhere == 0 || p->where[p->nwhere - 1] != w)) {
        if (p->nwhere == p->cwhere) {
            uint32_t nc = p->cwhere ? p->cwhere * 2 : 4;
            int32_t *nw = realloc(p->where, nc * sizeof *nw);
            if (!nw) {
                tr->oom = 1;
                return;
            }
            p->where = nw;
            p->cwhere = nc;
        }
        p->where[p->nwhere++] = w;
    }
    if (p->stamp != tr->step) {
        p->stamp = tr->step;
        if (grow((void **)&tr->changed, &tr->cchanged, tr->nchanged + 1, sizeof *tr->changed)) {
            tr->oom = 1;
            return;
        }
        tr->changed[tr->nchanged++] = id;
    }
}

static int bytes_cmp(const trainer *tr, int32_t x, int32_t y) {
    size_t nx = tr->tok_off[x + 1] - tr->tok_off[x], ny = tr->tok_off[y + 1] - tr->tok_off[y];
    int c = memcmp(tr->tok_bytes + tr->tok_off[x], tr->tok_bytes + tr->tok_off[y], nx < ny ? nx : ny);
    if (c) return c;
    return nx < ny ? -1 : nx > ny ? 1 : 0;
}

/* Heap order: higher count first; ties to the lexicographically smaller
 * (left bytes, right bytes), so training never depends on hash or thread
 * order. */
static int heap_better(const trainer *tr, const theap *x, const theap *y) {
    if (x->count != y->count) return x->count > y->count;
    const tpair *p = &tr->pairs[x->pair], *q = &tr->pairs[y->pair];
    int c = bytes_cmp(tr, p->a, q->a);
    if (!c) c = bytes_cmp(tr, p->b, q->b);
    return c < 0;
}

static void heap_push(trainer *tr, int32_t pair) {
    if (grow((void **)&tr->heap, &tr->cheap, tr->nheap + 1, sizeof *tr->heap)) {
        tr->oom = 1;
        return;
    }
    theap v = {tr->pairs[pair].count, pair};
    size_t i = tr->nheap++;
    while (i > 0) {
        size_t par = (i - 1) / 2;
        if (!heap_better(tr, &v, &tr->heap[par])) break;
        tr->heap[i] = tr->heap[par];
        i = par;
    }
    tr->heap[i] = v;
}

static theap heap_pop(trainer *tr) {
    theap top = tr->heap[0], v = tr->heap[--tr->nheap];
    size_t i = 0, n = tr->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_better(tr, &tr->heap[c + 1], &tr->heap[c])) c++;
        if (!heap_better(tr, &tr->heap[c], &v)) break;
        tr->heap[i] = tr->heap[c];
        i = c;
    }
    if (n) tr->heap[i] = v;
    return top;
}

/* Replace every (a, b) in word w, left to right without overlaps, by c and
 * move the counts of the neighbouring pairs. Working on the already
 * rewritten prefix makes runs like "a b a b" and "a a a" come out right. */
static void merge_word(trainer *tr, int32_t w, int32_t a, int32_t b, int32_t c) {
    int32_t *s = tr->sym + tr->woff[w];
    int32_t len = tr->wlen[w], j = 0;
    int64_t f = tr->wfreq[w];
    for (int32_t i = 0; i < len;) {
        if (i + 1 < len && s[i] == a && s[i + 1] == b) {
            if (j > 0) {
                pair_add(tr, s[j - 1], a, -f, w);
                pair_add(tr, s[j - 1], c, f, w);
            }
            if (i + 2 < len) {
                pair_add(tr, b, s[i + 2], -f, w);
                pair_add(tr, c, s[i + 2], f, w);
            }
            pair_add(tr, a, b, -f, w);
            s[j++] = c;
            i += 2;
        } else {
            s[j++] = s[i++];
        }
    }
    tr->wlen[w] = j;
}

static void trainer_free(trainer *tr) {
    free(tr->keys);
    free(tr->idx);
    for (size_t i = 0; i < tr->npairs; i++) free(tr->pairs[i].where);
    free(tr->pairs);
    free(tr->heap);
    free(tr->tok_off);
    free(tr->tok_bytes);
    free(tr->sym);
    free(tr->woff);
    free(tr->wlen);
    free(tr->wstamp);
    free(tr->wfreq);
    free(tr->changed);
    bmap_free(&tr->tokset);
}

/* Count the pieces of all documents into one map (val = count). Pieces of
 * one byte are skipped: they hold no pair. */
static int count_pieces(const tok_regex *re, const char *const *docs, const size_t *lens, size_t ndocs, bmap *out,
                        tlm_progress_fn progress, void *user) {
    const size_t unit_bytes = (size_t)1 << 20;
    size_t nunits = 0, total = 0;
    for (size_t d = 0; d < ndocs; d++) {
        nunits += 1 + lens[d] / unit_bytes;
        total += lens[d];
    }
    size_t *ustart = malloc((nunits + 1) * sizeof *ustart), *uend = malloc((nunits + 1) * sizeof *uend);
    size_t *udoc = malloc((nunits + 1) * sizeof *udoc), *cuts = malloc((total / unit_bytes + 1) * sizeof *cuts);
    int nth = omp_get_max_threads();
    bmap *maps = calloc((size_t)nth, sizeof *maps);
    if (!ustart || !uend || !udoc || !cuts || !maps) {
        free(ustart), free(uend), free(udoc), free(cuts), free(maps);
        return tlm_errorf("out of memory counting the training text's pieces");
    }
    size_t nu = 0;
    for (size_t d = 0; d < ndocs; d++) {
        size_t nc = tok_safe_cuts((const unsigned char *)docs[d], lens[d], unit_bytes, cuts, lens[d] / unit_bytes + 1);
        size_t s = 0;
        for (size_t c = 0; c <= nc; c++) {
            size_t e = c < nc ? cuts[c] : lens[d];
            udoc[nu] = d, ustart[nu] = s, uend[nu] = e;
            nu++;
            s = e;
        }
    }
    free(cuts);
    int failed = 0;
    size_t done = 0;
#pragma omp parallel num_threads(nth)
    {
        int tid = omp_get_thread_num();
        tok_pretok it;
        int ok = bmap_init(&maps[tid], 1 << 14) == 0;
        int have_it = ok && tok_pretok_begin(&it, re, "", 0) == 0;
        if (!have_it) ok = 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t u = 0; u < nu; u++) {
            if (!ok) continue;
            const unsigned char *text = (const unsigned char *)docs[udoc[u]] + ustart[u];
            size_t n = uend[u] - ustart[u], st, pl;
            tok_pretok_reset(&it, text, n);
            while (tok_pretok_next(&it, &st, &pl)) {
                if (pl < 2) continue;
                int added;
                bmap_entry *e = bmap_upsert(&maps[tid], text + st, pl, tok_hash_bytes(text + st, pl), &added);
                if (!e) {
                    ok = 0;
#pragma omp atomic write
                    failed = 1;
                    break;
                }
                e->val++;
            }
            size_t sofar;
#pragma omp atomic capture
            sofar = done += n;
            /* The final 100% comes once, after the loop. */
            if (progress && tid == 0 && sofar < total) progress(user, "pre-tokenize", (double)sofar, (double)total);
        }
        if (have_it) tok_pretok_end(&it);
    }
    free(ustart), free(uend), free(udoc);
    /* Fold the per-thread maps into the first. */
    for (int k = 1; k < nth && !failed; k++) {
        const bmap *m = &maps[k];
        for (size_t i = 0; i < m->cap && !failed; i++) {
            const bmap_entry *e = &m->e[i];
            if (!e->h) continue;
            int added;
            bmap_entry *d = bmap_upsert(&maps[0], bmap_key(m, e), e->len, e->h, &added);
            if (!d) failed = 1;
            else d->val += e->val;
        }
    }
    for (int k = 1; k < nth; k++) bmap_free(&maps[k]);
    if (failed) {
        bmap_free(&maps[0]);
        free(maps);
        return tlm_errorf("out of memory counting the training text's pieces");
    }
    *out = maps[0];
    free(maps);
    if (progress) progress(user, "pre-tokenize", (double)total, (double)total);
    return 0;
}

tlm_tokenizer *tokenizer_train(const char *const *docs, const size_t *lens, size_t ndocs, int vocab_size,
                               tlm_progress_fn progress, void *user) {
    if (vocab_size < 257 || vocab_size > (1 << 24)) {
        tlm_errorf("tokenizer vocab size %d is out of range: choose --vocab between 257 and %d", vocab_size, 1 << 24);
        return NULL;
    }
    const int nmerges = vocab_size - 257;
    tlm_tokenizer *t = calloc(1, sizeof *t);
    trainer tr;
    memset(&tr, 0, sizeof tr);
    bmap pieces;
    memset(&pieces, 0, sizeof pieces);
    if (!t) goto oom;
    if (tok_regex_init(&t->re)) goto fail;
    if (count_pieces(&t->re, docs, lens, ndocs, &pieces, progress, user)) goto fail;

    /* Words: the unique pieces as byte-id sequences. */
    size_t nsym = pieces.alen;
    tr.sym = malloc((nsym + 1) * sizeof *tr.sym);
    tr.woff = malloc((pieces.n + 1) * sizeof *tr.woff);
    tr.wlen = malloc((pieces.n + 1) * sizeof *tr.wlen);
    tr.wstamp = calloc(pieces.n + 1, sizeof *tr.wstamp);
    tr.wfreq = malloc((pieces.n + 1) * sizeof *tr.wfreq);
    if (!tr.sym || !tr.woff || !tr.wlen || !tr.wstamp || !tr.wfreq) goto oom;
    size_t so = 0;
    for (size_t i = 0; i < pieces.cap; i++) {
        const bmap_entry *e = &pieces.e[i];
        if (!e->h) continue;
        if (e->len > INT32_MAX) continue;  /* a 2 GB "word" cannot be trained on usefully */
        const unsigned char *k = bmap_key(&pieces, e);
        size_t w = tr.nwords++;
        tr.woff[w] = so;
        tr.wlen[w] = (int32_t)e->len;
        tr.wfreq[w] = e->val;
        for (uint32_t j = 0; j < e->len; j++) tr.sym[so++] = k[j];
    }
    bmap_free(&pieces);

    /* Token bytes: the 256 bytes, then one token per merge. */
    tr.tok_off = malloc(((size_t)vocab_size + 1) * sizeof *tr.tok_off);
    tr.ctok_bytes = 4096;
    tr.tok_bytes = malloc(tr.ctok_bytes);
    size_t pcap = 1 << 16;
    tr.keys = malloc(pcap * sizeof *tr.keys);
    tr.idx = malloc(pcap * sizeof *tr.idx);
    t->merge_left = malloc(((size_t)nmerges + 1) * sizeof(int32_t));
    t->merge_right = malloc(((size_t)nmerges + 1) * sizeof(int32_t));
    t->merge_result = malloc(((size_t)nmerges + 1) * sizeof(int32_t));
    if (!tr.tok_off || !tr.tok_bytes || !tr.keys || !tr.idx || !t->merge_left || !t->merge_right || !t->merge_result)
        goto oom;
    memset(tr.keys, 0xFF, pcap * sizeof *tr.keys);
    tr.mask = pcap - 1;
    for (int b = 0; b < 256; b++) {
        tr.tok_off[b] = (uint64_t)b;
        tr.tok_bytes[b] = (unsigned char)b;
    }
    tr.tok_off[256] = 256;
    tr.ntok = 256;

    tr.step = 0;
    for (size_t w = 0; w < tr.nwords; w++) {
        const int32_t *s = tr.sym + tr.woff[w];
        for (int32_t i = 0; i + 1 < tr.wlen[w]; i++) pair_add(&tr, s[i], s[i + 1], tr.wfreq[w], (int32_t)w);
    }
    for (size_t i = 0; i < tr.npairs; i++) heap_push(&tr, (int32_t)i);
    if (tr.oom) goto oom;

    if (bmap_init(&tr.tokset, (size_t)vocab_size)) goto oom;
    for (int b = 0; b < 256; b++) {
        int added;
        bmap_entry *e = bmap_upsert(&tr.tokset, tr.tok_bytes + b, 1, tok_hash_bytes(tr.tok_bytes + b, 1), &added);
        if (!e) goto oom;
        e->val = b;
    }

    int m = 0;
    while (m < nmerges) {
        int32_t pid = -1;
        while (tr.nheap) {
            theap top = heap_pop(&tr);
            const tpair *p = &tr.pairs[top.pair];
            if (p->count > 0 && p->count == top.count && !p->banned) {
                pid = top.pair;
                break;
            }
        }
        if (pid < 0) break;  /* every word is a single token already */
        int32_t a = tr.pairs[pid].a, b = tr.pairs[pid].b, c = 256 + m;
        size_t na = tr.tok_off[a + 1] - tr.tok_off[a], nb = tr.tok_off[b + 1] - tr.tok_off[b];
        size_t at = tr.tok_off[c];
        if (grow((void **)&tr.tok_bytes, &tr.ctok_bytes, at + na + nb, 1)) goto oom;
        memcpy(tr.tok_bytes + at, tr.tok_bytes + tr.tok_off[a], na);
        memcpy(tr.tok_bytes + at + na, tr.tok_bytes + tr.tok_off[b], nb);
        /* Token strings must stay unique (the vocab is keyed by them). Should
         * two different splits of one string ever both become frequent, the
         * later pair is skipped for good rather than duplicating a token. */
        int added;
        bmap_entry *e = bmap_upsert(&tr.tokset, tr.tok_bytes + at, na + nb, tok_hash_bytes(tr.tok_bytes + at, na + nb), &added);
        if (!e) goto oom;
        if (!added) {
            tr.pairs[pid].banned = 1;
            continue;
        }
        e->val = c;
        t->merge_left[m] = a;
        t->merge_right[m] = b;
        t->merge_result[m] = c;
        tr.tok_off[c + 1] = at + na + nb;
        tr.ntok++;

        tr.step = m + 1;
        tr.nchanged = 0;
        /* Detach the list: merging creates pairs with c, never (a, b). */
        int32_t *where = tr.pairs[pid].where;
        uint32_t nw = tr.pairs[pid].nwhere;
        tr.pairs[pid].where = NULL;
        tr.pairs[pid].nwhere = tr.pairs[pid].cwhere = 0;
        for (uint32_t k = 0; k < nw; k++) {
            int32_t w = where[k];
            if (tr.wstamp[w] == tr.step) continue;
            tr.wstamp[w] = tr.step;
            merge_word(&tr, w, a, b, c);
        }
        free(where);
        tr.pairs[pid].count = 0;
        for (size_t k = 0; k < tr.nchanged; k++)
            if (tr.pairs[tr.changed[k]].count > 0) heap_push(&tr, tr.changed[k]);
        if (tr.oom) goto oom;
        if (progress && (m % 64 == 0)) progress(user, "merges", (double)m, (double)nmerges);
        m++;
    }
    if (m < nmerges) {
        tlm_errorf("the training text has too few distinct byte pairs for a vocab of %d (only %d merges possible): "
                   "use --vocab %d or less, or more text",
                   vocab_size, m, 257 + m);
        goto fail;
    }
    if (progress) progress(user, "merges", (double)nmerges, (double)nmerges);

    /* The tokenizer: ids 0..255 bytes, 256.. merges, the special token last. */
    size_t nbytes = tr.tok_off[tr.ntok];
    size_t eotn = strlen(TLM_EOT_TEXT);
    t->vocab = vocab_size;
    t->nmerges = nmerges;
    t->eot = vocab_size - 1;
    t->tok_off = malloc(((size_t)vocab_size + 1) * sizeof *t->tok_off);
    t->tok_bytes = malloc(nbytes + eotn);
    t->is_special = calloc((size_t)vocab_size, 1);
    if (!t->tok_off || !t->tok_bytes || !t->is_special) goto oom;
    memcpy(t->tok_off, tr.tok_off, ((size_t)tr.ntok + 1) * sizeof *t->tok_off);
    memcpy(t->tok_bytes, tr.tok_bytes, nbytes);
    memcpy(t->tok_bytes + nbytes, TLM_EOT_TEXT, eotn);
    t->tok_off[vocab_size] = nbytes + eotn;
    t->is_special[t->eot] = 1;
    for (int b = 0; b < 256; b++) t->byte_id[b] = b;
    trainer_free(&tr);
    if (tok_finish(t)) {
        tokenizer_free(t);
        return NULL;
    }
    return t;
oom:
    tlm_errorf("out of memory training the tokenizer (vocab %d): use a smaller --vocab or less text", vocab_size);
fail:
    bmap_free(&pieces);
    trainer_free(&tr);
    tokenizer_free(t);
    return NULL;
}
