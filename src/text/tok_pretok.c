/* Pre-tokenization: GPT-2 regex over valid UTF-8 runs, lone invalid bytes. */
#include <string.h>

#include "text/tok_internal.h"
#include "util/common.h"

/* The GPT-2 pattern with \s spelled out as the Unicode White_Space set.
 * PCRE2's own \s (with UCP) also takes U+180E, which Oniguruma, the engine
 * behind `tokenizers`, does not; spelling the set out makes both split
 * text the same way (up to Unicode-version differences in letters). */
#define WS "\\t\\n\\x0b\\f\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
static const char tok_pattern[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|[" WS "]+(?![^" WS
                                  "])|[" WS "]+";

int tok_regex_init(tok_regex *r) {
    memset(r, 0, sizeof *r);
    int err;
    PCRE2_SIZE at;
    r->code = pcre2_compile((PCRE2_SPTR)tok_pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &at, NULL);
    if (!r->code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return tlm_errorf("tokenizer: PCRE2 cannot compile the split pattern at offset %zu: %s: "
                          "install a PCRE2 built with Unicode support",
                          (size_t)at, (const char *)msg);
    }
    /* JIT is an optimisation: some builds or platforms lack it, and the
     * interpreter gives the same matches. */
    r->jit = pcre2_jit_compile(r->code, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

void tok_regex_free(tok_regex *r) {
    if (r->code) pcre2_code_free(r->code);
    memset(r, 0, sizeof *r);
}

/* Strict UTF-8 as PCRE2 checks it: no overlongs, no surrogates, nothing
 * above U+10FFFF. */
size_t tok_utf8_valid_prefix(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        /* ASCII dominates real text: skip it 8 bytes at a time. */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL) break;
            i += 8;
        }
        if (i >= n) break;
        unsigned c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t need;
        unsigned lo = 0x80, hi = 0xBF;  /* allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) { need = 2; lo = 0xA0; }
        else if (c >= 0xE1 && c <= 0xEC) need = 2;
        else if (c == 0xED) { need = 2; hi = 0x9F; }
        else if (c >= 0xEE && c <= 0xEF) need = 2;
        else if (c == 0xF0) { need = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) { need = 3; hi = 0x8F; }
        else return i;
        if (i + need >= n) return i;  /* truncated */
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += need + 1;
    }
    return n;
}

int tok_pretok_begin(tok_pretok *it, const tok_regex *re, const void *text, size_t len) {
    memset(it, 0, sizeof *it);
    it->re = re;
    it->md = pcre2_match_data_create_from_pattern(re->code, NULL);
    if (!it->md) return -1;
    tok_pretok_reset(it, text, len);
    return 0;
}

void tok_pretok_reset(tok_pretok *it, const void *text, size_t len) {
    it->s = text;
    it->n = len;
    it->pos = 0;
    it->run_end = 0;
}

void tok_pretok_end(tok_pretok *it) {
    if (it->md) pcre2_match_data_free(it->md);
    it->md = NULL;
}

static size_t utf8_char_len(unsigned c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

int tok_pretok_next(tok_pretok *it, size_t *start, size_t *len) {
    size_t pos = it->pos;
    if (pos >= it->n) return 0;
    if (pos >= it->run_end) {
        size_t v = tok_utf8_valid_prefix(it->s + pos, it->n - pos);
        if (v == 0) {  /* not valid UTF-8 here: this byte alone is a piece */
            *start = pos;
            *len = 1;
            it->pos = pos + 1;
            return 1;
        }
        it->run_end = pos + v;
    }
    /* No look-behind in the pattern, so matching from the piece start with
     * the subject cut there is the same as matching inside the run. */
    PCRE2_SPTR subj = (PCRE2_SPTR)(it->s + pos);
    PCRE2_SIZE slen = it->run_end - pos;
    int rc = it->re->jit ? pcre2_jit_match(it->re->code, subj, slen, 0, 0, it->md, NULL)
                         : pcre2_match(it->re->code, subj, slen, 0, PCRE2_NO_UTF_CHECK, it->md, NULL);
    size_t plen;
    if (rc > 0) {
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(it->md);
        if (ov[0] == 0 && ov[1] > 0) plen = ov[1];
        else if (ov[0] > 0) plen = ov[0];  /* unmatched gap: its own piece (cannot happen: every char matches) */
        else plen = utf8_char_len(it->s[pos]);
    } else {
        /* A resource limit or other failure: keep going one character at a
         * time so the pieces still tile the text. */
        plen = utf8_char_len(it->s[pos]);
    }
    if (plen > slen) plen = slen;
    *start = pos;
    *len = plen;
    it->pos = pos + plen;
    return 1;
}

static inline int ascii_letter(unsigned char c) { return (unsigned char)((c | 0x20) - 'a') < 26; }

/* A cut at p is safe when s[p-1] is an ASCII letter and s[p] is a space:
 * whichever alternative matched that letter (a letter run or a contraction)
 * ends at p without looking past it, and no pattern alternative looks
 * behind, so matching restarts at p exactly as the whole-text scan would. */
size_t tok_safe_cuts(const unsigned char *s, size_t n, size_t target, size_t *cuts, size_t max_cuts) {
    size_t nc = 0;
    if (target < 2) target = 2;
    size_t p = target;
    while (nc < max_cuts && p < n) {
        const unsigned char *q = memchr(s + p, ' ', n - p);
        while (q && !ascii_letter(q[-1])) {
            size_t off = (size_t)(q - s) + 1;
            q = off < n ? memchr(s + off, ' ', n - off) : NULL;
        }
        if (!q) break;
        size_t cut = (size_t)(q - s);
        cuts[nc++] = cut;
        p = cut + target;
    }
    return nc;
}
