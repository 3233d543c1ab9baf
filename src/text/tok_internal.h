/*
 * Internals shared by the tokenizer's source files (not a public contract).
 *
 * tokenizer.c   struct lifetime, encode/decode, encode_many
 * tok_pretok.c  UTF-8 runs, the PCRE2 pre-tokenizer, safe split points
 * tok_train.c   BPE training
 * tok_json.c    tokenizer.json save/load, the GPT-2 byte alphabet
 * tok_map.c     byte-string hash map used by all of the above
 */
#ifndef TLM_TEXT_TOK_INTERNAL_H
#define TLM_TEXT_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>

#include "text/tokenizer.h"

/* ---- byte-string map: bytes -> int64 value, open addressing ---------- */

typedef struct {
    uint64_t h;    /* 0 marks an empty slot (real hashes are forced non-zero) */
    uint64_t off;  /* key bytes at arena + off */
    int64_t val;
    uint32_t len;
} bmap_entry;

typedef struct {
    bmap_entry *e;
    size_t cap;  /* power of two */
    size_t n;
    unsigned char *arena;
    size_t alen, acap;
} bmap;

uint64_t tok_hash_bytes(const unsigned char *p, size_t n);
int bmap_init(bmap *m, size_t cap_hint);  /* -1 on out of memory (no error set) */
void bmap_free(bmap *m);
/* The slot for key (inserted with val 0 if new; *added says which), or NULL
 * when memory runs out. Pointers die on the next insert. */
bmap_entry *bmap_upsert(bmap *m, const unsigned char *key, size_t len, uint64_t h, int *added);
const bmap_entry *bmap_find(const bmap *m, const unsigned char *key, size_t len, uint64_t h);
static inline const unsigned char *bmap_key(const bmap *m, const bmap_entry *e) { return m->arena + e->off; }

/* ---- pre-tokenizer ----------------------------------------------------- */

/* The GPT-2 split pattern, compiled once per tokenizer (UTF + UCP + JIT). */
typedef struct {
    pcre2_code *code;
    int jit;  /* JIT compiled: use pcre2_jit_match */
} tok_regex;

int tok_regex_init(tok_regex *r);  /* -1 + error */
void tok_regex_free(tok_regex *r);

/* Length of the longest valid (strict) UTF-8 prefix of s[0..n). */
size_t tok_utf8_valid_prefix(const unsigned char *s, size_t n);

/* Iterates the pieces of one text. Valid UTF-8 runs go through the regex;
 * every byte that is not part of valid UTF-8 is a piece on its own, so the
 * pieces always tile the input exactly. */
typedef struct {
    const tok_regex *re;
    pcre2_match_data *md;
    const unsigned char *s;
    size_t n, pos, run_end;
} tok_pretok;

int tok_pretok_begin(tok_pretok *it, const tok_regex *re, const void *text, size_t len); /* -1: OOM */
void tok_pretok_reset(tok_pretok *it, const void *text, size_t len);  /* reuse match data */
void tok_pretok_end(tok_pretok *it);
/* Next piece as (start offset, length); 0 at the end. */
int tok_pretok_next(tok_pretok *it, size_t *start, size_t *len);

/* Split [0, n) into chunks of about `target` bytes at positions where the
 * pre-tokenizer is guaranteed to have a piece boundary, so pre-tokenizing
 * the chunks separately gives exactly the pieces of the whole. Writes up to
 * max_cuts cut positions (each strictly inside (0, n)) and returns their
 * count. */
size_t tok_safe_cuts(const unsigned char *s, size_t n, size_t target, size_t *cuts, size_t max_cuts);

/* ---- the tokenizer -------------------------------------------------- */

struct tlm_tokenizer {
    int vocab;        /* number of ids, special tokens included */
    int eot;          /* id of <|endoftext|> */
    int nmerges;
    uint64_t *tok_off;        /* [vocab+1] token id -> bytes at tok_bytes + tok_off[id] */
    unsigned char *tok_bytes;
    unsigned char *is_special;  /* [vocab] added (special) tokens: never produced by encode */
    int32_t byte_id[256];       /* the token of each single byte */
    int32_t *merge_left, *merge_right, *merge_result;  /* [nmerges], in rank order */
    /* (left, right) -> rank, open addressing on the packed pair. */
    uint64_t *pair_key;  /* UINT64_MAX = empty */
    int32_t *pair_rank;
    size_t pair_mask;
    /* Read-only cache built once: pieces that equal a token's bytes ->
     * their encoding (common whole words), shared by all threads. */
    bmap word_cache;
    int32_t *word_tokens;
    tok_regex re;
};

/* Build the pair table, the shared word cache and the regex from the
 * already-filled token table and merges. -1 + error. */
int tok_finish(tlm_tokenizer *t);

static inline uint64_t tok_pair_pack(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

static inline int32_t tok_pair_rank(const tlm_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = tok_pair_pack(a, b);
    uint64_t h = key * 0x9E3779B97F4A7C15ULL;
    size_t i = (size_t)(h >> 32) & t->pair_mask;
    for (;;) {
        uint64_t k = t->pair_key[i];
        if (k == key) return t->pair_rank[i];
        if (k == UINT64_MAX) return -1;
        i = (i + 1) & t->pair_mask;
    }
}

/* GPT-2 byte alphabet: byte b <-> code point tok_byte_cp(b). */
int tok_byte_cp(int b);

#endif
