/* Tokenizer lifetime, BPE encoding (single text and many documents), decoding. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "text/tok_internal.h"
#include "util/common.h"

/* Pieces up to this many bytes use the simple quadratic merge loop on the
 * stack; longer ones (rare: long runs of letters or spaces) use a heap. */
#define TOK_SHORT_PIECE 128
/* Pieces this long or shorter are worth caching. */
#define TOK_CACHE_MAX_LEN 48
/* A per-call cache stops growing here (entries); beyond it pieces are
 * rare enough that recomputing is cheaper than the memory. */
#define TOK_CACHE_MAX_ENTRIES (1u << 17)

void tokenizer_free(tlm_tokenizer *t) {
    if (!t) return;
    free(t->tok_off);
    free(t->tok_bytes);
    free(t->is_special);
    free(t->merge_left);
    free(t->merge_right);
    free(t->merge_result);
    free(t->pair_key);
    free(t->pair_rank);
    bmap_free(&t->word_cache);
    free(t->word_tokens);
    tok_regex_free(&t->re);
    free(t);
}

int tokenizer_vocab_size(const tlm_tokenizer *t) { return t->vocab; }
int tokenizer_eot_id(const tlm_tokenizer *t) { return t->eot; }
int tokenizer_merge_count(const tlm_tokenizer *t) { return t->nmerges; }

int tokenizer_merge(const tlm_tokenizer *t, int rank, int *left, int *right, int *result) {
    if (rank < 0 || rank >= t->nmerges) return tlm_errorf("tokenizer merge rank %d is out of range [0, %d)", rank, t->nmerges);
    if (left) *left = t->merge_left[rank];
    if (right) *right = t->merge_right[rank];
    if (result) *result = t->merge_result[rank];
    return 0;
}

const unsigned char *tokenizer_token_bytes(const tlm_tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->vocab) return NULL;
    if (len) *len = (size_t)(t->tok_off[id + 1] - t->tok_off[id]);
    return t->tok_bytes + t->tok_off[id];
}

char *tokenizer_decode(const tlm_tokenizer *t, const int32_t *ids, size_t n, size_t *len) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab) {
            tlm_errorf("cannot decode token id %d at position %zu: the tokenizer has ids 0..%d; "
                       "the tokens come from a different tokenizer",
                       (int)id, i, t->vocab - 1);
            return NULL;
        }
        total += t->tok_off[id + 1] - t->tok_off[id];
    }
    char *out = malloc(total + 1);
    if (!out) {
        tlm_errorf("out of memory decoding %zu tokens", n);
        return NULL;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l = t->tok_off[ids[i] + 1] - t->tok_off[ids[i]];
        memcpy(out + k, t->tok_bytes + t->tok_off[ids[i]], l);
        k += l;
    }
    out[k] = 0;
    if (len) *len = k;
    return out;
}

/* ---- BPE on one piece ------------------------------------------------- */

/* Repeatedly merge the adjacent pair with the lowest rank (leftmost among
 * equals) until no adjacent pair has a rank. Returns the token count. */
static size_t bpe_short(const tlm_tokenizer *t, const unsigned char *p, size_t n, int32_t *out) {
    int32_t sym[TOK_SHORT_PIECE];
    int32_t rk[TOK_SHORT_PIECE];  /* rk[i]: rank of (sym[i], sym[i+1]); INT32_MAX = none */
    for (size_t i = 0; i < n; i++) sym[i] = t->byte_id[p[i]];
    size_t m = n;
    for (size_t i = 0; i + 1 < m; i++) {
        int32_t r = tok_pair_rank(t, sym[i], sym[i + 1]);
        rk[i] = r < 0 ? INT32_MAX : r;
    }
    while (m > 1) {
        size_t best = 0;
        int32_t br = rk[0];
        for (size_t i = 1; i + 1 < m; i++)
            if (rk[i] < br) { br = rk[i]; best = i; }
        if (br == INT32_MAX) break;
        sym[best] = t->merge_result[br];
        /* Drop sym[best+1] and the rank of the pair that started there. */
        memmove(sym + best + 1, sym + best + 2, (m - best - 2) * sizeof *sym);
        if (m - best > 2) memmove(rk + best + 1, rk + best + 2, (m - best - 3) * sizeof *rk);
        m--;
        if (best > 0) {
            int32_t r = tok_pair_rank(t, sym[best - 1], sym[best]);
            rk[best - 1] = r < 0 ? INT32_MAX : r;
        }
        if (best + 1 < m) {
            int32_t r = tok_pair_rank(t, sym[best], sym[best + 1]);
            rk[best] = r < 0 ? INT32_MAX : r;
        }
    }
    memcpy(out, sym, m * sizeof *sym);
    return m;
}

/* The same merge order for long pieces in O(n log n): symbols in a linked
 * list, candidate merges in a min-heap keyed by (rank, position). A heap
 * entry is acted on only if the pair it names is still at that position. */
static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t par = (i - 1) / 2;
        if (h[par] <= v) break;
        h[i] = h[par];
        i = par;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--(*n)];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    if (m) h[i] = v;
    return top;
}

#define POS_BITS 40
static size_t bpe_long(const tlm_tokenizer *t, const unsigned char *p, size_t n, int32_t *out) {
    int32_t *sym = malloc(n * sizeof *sym);
    size_t *next = malloc(n * sizeof *next), *prev = malloc(n * sizeof *prev);
    uint64_t *heap = malloc(3 * n * sizeof *heap);  /* n-1 initial + 2 per merge */
    size_t m = 0;
    if (!sym || !next || !prev || !heap) {
        /* Out of memory: bytes still decode to the same text. */
        for (size_t i = 0; i < n; i++) out[i] = t->byte_id[p[i]];
        m = n;
        goto done;
    }
    const size_t NONE = (size_t)-1;
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        sym[i] = t->byte_id[p[i]];
        prev[i] = i ? i - 1 : NONE;
        next[i] = i + 1 < n ? i + 1 : NONE;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        int32_t r = tok_pair_rank(t, sym[i], sym[i + 1]);
        if (r >= 0) heap_push(heap, &hn, ((uint64_t)r << POS_BITS) | i);
    }
    while (hn) {
        uint64_t e = heap_pop(heap, &hn);
        int32_t r = (int32_t)(e >> POS_BITS);
        size_t i = (size_t)(e & ((1ULL << POS_BITS) - 1));
        size_t j = next[i];
        /* Stale: the left symbol was absorbed (sym -1), or the pair changed. */
        if (sym[i] < 0 || j == NONE || sym[i] != t->merge_left[r] || sym[j] != t->merge_right[r]) continue;
        sym[i] = t->merge_result[r];
        sym[j] = -1;
        next[i] = next[j];
        if (next[j] != NONE) prev[next[j]] = i;
        if (prev[i] != NONE) {
            int32_t rl = tok_pair_rank(t, sym[prev[i]], sym[i]);
            if (rl >= 0) heap_push(heap, &hn, ((uint64_t)rl << POS_BITS) | prev[i]);
        }
        if (next[i] != NONE) {
            int32_t rr = tok_pair_rank(t, sym[i], sym[next[i]]);
            if (rr >= 0) heap_push(heap, &hn, ((uint64_t)rr << POS_BITS) | i);
        }
    }
    for (size_t i = 0; i != NONE; i = next[i]) out[m++] = sym[i];
done:
    free(sym);
    free(next);
    free(prev);
    free(heap);
    return m;
}

static size_t bpe_piece(const tlm_tokenizer *t, const unsigned char *p, size_t n, int32_t *out) {
    if (n == 1) {
        out[0] = t->byte_id[p[0]];
        return 1;
    }
    return n <= TOK_SHORT_PIECE ? bpe_short(t, p, n, out) : bpe_long(t, p, n, out);
}

/* ---- encoder: a pre-tokenizer plus an optional private cache ---------- */

typedef struct {
    const tlm_tokenizer *t;
    tok_pretok it;
    int use_cache;
    bmap cache;          /* piece -> (offset << 8 | count) into toks */
    int32_t *toks;
    size_t ntoks, ctoks;
    int32_t *scratch;    /* for pieces too long for the stack buffer */
    size_t cscratch;
} tok_encoder;

static int encoder_init(tok_encoder *e, const tlm_tokenizer *t, int use_cache) {
    memset(e, 0, sizeof *e);
    e->t = t;
    if (tok_pretok_begin(&e->it, &t->re, "", 0)) return -1;
    if (use_cache) {
        if (bmap_init(&e->cache, 4096)) return 0;  /* no cache is only slower */
        e->use_cache = 1;
    }
    return 0;
}

static void encoder_free(tok_encoder *e) {
    tok_pretok_end(&e->it);
    if (e->use_cache) bmap_free(&e->cache);
    free(e->toks);
    free(e->scratch);
}

static void cache_put(tok_encoder *e, const unsigned char *p, size_t n, uint64_t h, const int32_t *ids, size_t k) {
    if (e->cache.n >= TOK_CACHE_MAX_ENTRIES) return;
    if (e->ntoks + k > e->ctoks) {
        size_t nc = e->ctoks ? e->ctoks * 2 : 16384;
        int32_t *nt = realloc(e->toks, nc * sizeof *nt);
        if (!nt) return;
        e->toks = nt;
        e->ctoks = nc;
    }
    int added;
    bmap_entry *en = bmap_upsert(&e->cache, p, n, h, &added);
    if (!en) return;
    memcpy(e->toks + e->ntoks, ids, k * sizeof *ids);
    en->val = (int64_t)((e->ntoks << 8) | k);
    e->ntoks += k;
}

/* Encode text into out[count..], never writing at or past cap; returns
 * the new count (which may exceed cap). */
static size_t encoder_run(tok_encoder *e, const unsigned char *text, size_t len, int32_t *out, size_t cap,
                          size_t count) {
    const tlm_tokenizer *t = e->t;
    tok_pretok_reset(&e->it, text, len);
    size_t st, n;
    int32_t local[TOK_SHORT_PIECE];
    while (tok_pretok_next(&e->it, &st, &n)) {
        const unsigned char *p = text + st;
        if (n == 1) {
            if (count < cap) out[count] = t->byte_id[p[0]];
            count++;
            continue;
        }
        const int32_t *ids = NULL;
        size_t k = 0;
        uint64_t h = 0;
        if (n <= TOK_CACHE_MAX_LEN) {
            h = tok_hash_bytes(p, n);
            const bmap_entry *en = bmap_find(&t->word_cache, p, n, h);
            if (en) {
                ids = t->word_tokens + (en->val >> 8);
                k = (size_t)(en->val & 0xFF);
            } else if (e->use_cache && (en = bmap_find(&e->cache, p, n, h))) {
                ids = e->toks + (en->val >> 8);
                k = (size_t)(en->val & 0xFF);
            }
        }
        if (!ids) {
            int32_t *buf = local;
            if (n > TOK_SHORT_PIECE) {
                if (n > e->cscratch) {
                    int32_t *ns = realloc(e->scratch, n * sizeof *ns);
                    if (!ns) {  /* out of memory: plain bytes still round-trip */
                        for (size_t i = 0; i < n; i++, count++)
                            if (count < cap) out[count] = t->byte_id[p[i]];
                        continue;
                    }
                    e->scratch = ns;
                    e->cscratch = n;
                }
                buf = e->scratch;
            }
            k = bpe_piece(t, p, n, buf);
            ids = buf;
            if (e->use_cache && n <= TOK_CACHE_MAX_LEN) cache_put(e, p, n, h, ids, k);
        }
        if (count + k <= cap) memcpy(out + count, ids, k * sizeof *ids);
        else
            for (size_t i = 0; i < k; i++)
                if (count + i < cap) out[count + i] = ids[i];
        count += k;
    }
    return count;
}

size_t tokenizer_encode(const tlm_tokenizer *t, const char *text, size_t len, int32_t *out, size_t cap) {
    tok_encoder e;
    /* A private cache pays for itself only on texts with repeated words. */
    if (encoder_init(&e, t, len >= 8192)) {
        tlm_errorf("out of memory encoding %zu bytes", len);
        return 0;
    }
    size_t n = encoder_run(&e, (const unsigned char *)text, len, out, cap, 0);
    encoder_free(&e);
    return n;
}

/* ---- many documents in parallel -------------------------------------- */

typedef struct {
    size_t doc, start, end;
    int32_t *toks;
    size_t n;
} enc_unit;

/* Documents are cut into units of about this many bytes at safe points, so
 * one huge document still spreads over all threads. */
#define TOK_UNIT_BYTES ((size_t)1 << 20)

int32_t *tokenizer_encode_many(const tlm_tokenizer *t, const char *const *docs, const size_t *lens, size_t ndocs,
                               int add_eot, size_t *doc_offsets, size_t *ntokens, tlm_progress_fn progress,
                               void *user) {
    *ntokens = 0;
    size_t nunits = 0, total_bytes = 0;
    for (size_t d = 0; d < ndocs; d++) {
        nunits += 1 + lens[d] / TOK_UNIT_BYTES;
        total_bytes += lens[d];
    }
    enc_unit *u = calloc(nunits ? nunits : 1, sizeof *u);
    size_t *cuts = malloc((total_bytes / TOK_UNIT_BYTES + 1) * sizeof *cuts);
    if (!u || !cuts) {
        free(u);
        free(cuts);
        tlm_errorf("out of memory encoding %zu documents", ndocs);
        return NULL;
    }
    size_t nu = 0;
    for (size_t d = 0; d < ndocs; d++) {
        size_t nc = tok_safe_cuts((const unsigned char *)docs[d], lens[d], TOK_UNIT_BYTES, cuts,
                                  lens[d] / TOK_UNIT_BYTES + 1);
        size_t s = 0;
        for (size_t c = 0; c <= nc; c++) {
            size_t e = c < nc ? cuts[c] : lens[d];
            u[nu++] = (enc_unit){d, s, e, NULL, 0};
            s = e;
        }
    }
    free(cuts);

    int failed = 0;
    size_t done_bytes = 0;
#pragma omp parallel
    {
        tok_encoder e;
        int ok = encoder_init(&e, t, 1) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* Encode into a reused scratch buffer, then keep an exact-size copy:
         * a fresh bytes-sized buffer per unit costs more in page faults than
         * the encoding saves. */
        int32_t *scratch = NULL;
        size_t cscratch = 0;
#pragma omp for schedule(dynamic, 1)
        for (size_t i = 0; i < nu; i++) {
            if (!ok) continue;
            size_t n = u[i].end - u[i].start;
            if (n > cscratch) {
                /* Byte-level BPE never yields more tokens than bytes. */
                int32_t *ns = realloc(scratch, n * sizeof *ns);
                if (!ns) {
                    ok = 0;
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                scratch = ns;
                cscratch = n;
            }
            u[i].n = encoder_run(&e, (const unsigned char *)docs[u[i].doc] + u[i].start, n, scratch, n, 0);
            u[i].toks = malloc((u[i].n ? u[i].n : 1) * sizeof(int32_t));
            if (!u[i].toks) {
                ok = 0;
#pragma omp atomic write
                failed = 1;
                continue;
            }
            if (u[i].n) memcpy(u[i].toks, scratch, u[i].n * sizeof(int32_t));
            size_t sofar;
#pragma omp atomic capture
            sofar = done_bytes += n;
            if (progress && omp_get_thread_num() == 0 && sofar < total_bytes)
                progress(user, "encode", (double)sofar, (double)total_bytes);
        }
        free(scratch);
        encoder_free(&e);
    }
    int32_t *all = NULL;
    if (!failed) {
        size_t total = 0;
        for (size_t i = 0; i < nu; i++) total += u[i].n;
        if (add_eot) total += ndocs;
        all = malloc((total ? total : 1) * sizeof *all);
        if (all) {
            size_t k = 0, d = 0;
            if (doc_offsets) doc_offsets[0] = 0;
            for (size_t i = 0; i < nu; i++) {
                memcpy(all + k, u[i].toks, u[i].n * sizeof *all);
                k += u[i].n;
                if (i + 1 == nu || u[i + 1].doc != u[i].doc) {
                    if (add_eot) all[k++] = t->eot;
                    d = u[i].doc + 1;
                    if (doc_offsets) doc_offsets[d] = k;
                }
            }
            *ntokens = k;
        }
    }
    for (size_t i = 0; i < nu; i++) free(u[i].toks);
    free(u);
    if (!all) {
        tlm_errorf("out of memory encoding %zu documents (%zu bytes)", ndocs, total_bytes);
        return NULL;
    }
    if (progress) progress(user, "encode", (double)total_bytes, (double)total_bytes);
    return all;
}

/* ---- shared setup after training or loading ---------------------------- */

int tok_finish(tlm_tokenizer *t) {
    size_t cap = 16;
    while (cap < (size_t)t->nmerges * 2 + 2) cap <<= 1;
    t->pair_key = malloc(cap * sizeof *t->pair_key);
    t->pair_rank = malloc(cap * sizeof *t->pair_rank);
    if (!t->pair_key || !t->pair_rank) return tlm_errorf("out of memory building the tokenizer's merge table");
    memset(t->pair_key, 0xFF, cap * sizeof *t->pair_key);
    t->pair_mask = cap - 1;
    for (int r = 0; r < t->nmerges; r++) {
        uint64_t key = tok_pair_pack(t->merge_left[r], t->merge_right[r]);
        size_t i = (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 32) & t->pair_mask;
        while (t->pair_key[i] != UINT64_MAX && t->pair_key[i] != key) i = (i + 1) & t->pair_mask;
        if (t->pair_key[i] == key) continue;  /* a repeated merge: the first (lowest) rank wins */
        t->pair_key[i] = key;
        t->pair_rank[i] = r;
    }
    if (!t->re.code && tok_regex_init(&t->re)) return -1;  /* training compiled it already */

    /* Whole-word cache: every token that is exactly one pre-token piece
     * (" the", " of", ...) maps to its encoding, computed once, so common
     * words cost one hash probe on every call without per-call state. */
    if (bmap_init(&t->word_cache, (size_t)t->vocab)) return tlm_errorf("out of memory building the tokenizer cache");
    /* A piece never has more tokens than bytes. */
    t->word_tokens = malloc(((size_t)t->tok_off[t->vocab] + 1) * sizeof *t->word_tokens);
    if (!t->word_tokens) return tlm_errorf("out of memory building the tokenizer cache");
    tok_pretok it;
    if (tok_pretok_begin(&it, &t->re, "", 0)) return tlm_errorf("out of memory building the tokenizer cache");
    size_t used = 0;
    for (int id = 0; id < t->vocab; id++) {
        size_t n;
        const unsigned char *p = tokenizer_token_bytes(t, id, &n);
        if (t->is_special[id] || n < 2 || n > TOK_CACHE_MAX_LEN) continue;
        size_t st, pl;
        tok_pretok_reset(&it, p, n);
        if (!tok_pretok_next(&it, &st, &pl) || pl != n) continue;
        uint64_t h = tok_hash_bytes(p, n);
        int added;
        bmap_entry *en = bmap_upsert(&t->word_cache, p, n, h, &added);
        if (!en) {
            tok_pretok_end(&it);
            return tlm_errorf("out of memory building the tokenizer cache");
        }
        if (!added) continue;
        size_t k = bpe_piece(t, p, n, t->word_tokens + used);
        en->val = (int64_t)((used << 8) | k);
        used += k;
    }
    tok_pretok_end(&it);
    return 0;
}
