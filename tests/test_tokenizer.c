/* Byte-level BPE tokenizer: pre-tokenization, training, encoding, files. */
#include <cjson/cJSON.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "text/tok_internal.h"
#include "text/tokenizer.h"
#include "util/common.h"

/* ---- helpers ---------------------------------------------------------- */

static const char *const WORDS[] = {
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
    "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were",
    "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would",
    "who", "so", "no", "government", "people", "states", "congress", "nation", "year", "world", "president",
    "economy", "war", "peace", "tax", "law", "it's", "don't", "we'll", "they've", "I'm", "you're", "he'd",
};
#define NWORDS (sizeof WORDS / sizeof WORDS[0])

/* English-like text of about n bytes: sentences, numbers, paragraphs. */
static char *make_text(tlm_rng *r, size_t n, size_t *len) {
    char *s = malloc(n + 64);
    size_t k = 0;
    int cap = 1;
    while (k < n) {
        uint64_t u = tlm_rng_below(r, 100);
        const char *w;
        char num[32];
        if (u < 3) {
            snprintf(num, sizeof num, "%u", (unsigned)tlm_rng_below(r, 100000));
            w = num;
        } else w = WORDS[tlm_rng_below(r, NWORDS)];
        if (k) s[k++] = ' ';
        size_t wl = strlen(w);
        memcpy(s + k, w, wl);
        if (cap && s[k] >= 'a' && s[k] <= 'z') s[k] -= 32;
        k += wl;
        cap = 0;
        if (u >= 90) {
            s[k++] = u >= 97 ? ',' : '.';
            if (u < 97) cap = 1;
            if (u == 96) s[k++] = '\n';
        }
    }
    s[k] = 0;
    *len = k;
    return s;
}

static tlm_tokenizer *train_one(const char *text, size_t len, int vocab) {
    const char *docs[1] = {text};
    size_t lens[1] = {len};
    tlm_tokenizer *t = tokenizer_train(docs, lens, 1, vocab, NULL, NULL);
    if (!t) fprintf(stderr, "train: %s\n", tlm_last_error());
    assert_non_null(t);
    return t;
}

/* A tokenizer trained on English-like text plus some Unicode, shared by
 * several tests. */
static tlm_tokenizer *small_tokenizer(void) {
    tlm_rng r;
    tlm_rng_seed(&r, 7);
    size_t len;
    char *text = make_text(&r, 60000, &len);
    const char *extra = " caf\xc3\xa9 na\xc3\xafve \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80\xf0\x9f\x98\x80 ";
    size_t el = strlen(extra);
    char *all = malloc(len + 20 * el + 1);
    memcpy(all, text, len);
    for (int i = 0; i < 20; i++) memcpy(all + len + (size_t)i * el, extra, el);
    tlm_tokenizer *t = train_one(all, len + 20 * el, 600);
    free(text);
    free(all);
    return t;
}

static void assert_roundtrip(const tlm_tokenizer *t, const unsigned char *s, size_t n) {
    int32_t *ids = malloc((n + 1) * sizeof *ids);
    size_t k = tokenizer_encode(t, (const char *)s, n, ids, n + 1);
    assert_true(k <= n);
    for (size_t i = 0; i < k; i++) {
        assert_true(ids[i] >= 0 && ids[i] < tokenizer_vocab_size(t));
        assert_int_not_equal(ids[i], tokenizer_eot_id(t));
    }
    size_t dl;
    char *d = tokenizer_decode(t, ids, k, &dl);
    assert_non_null(d);
    assert_int_equal(dl, n);
    assert_memory_equal(d, s, n);
    assert_int_equal(d[dl], 0);
    free(d);
    free(ids);
}

/* Pieces of a text, joined with '|' (for readable expectations); *outlen
 * (may be NULL) gets the length, as pieces may hold NULs. */
static char *pieces_of_n(const char *s, size_t n, size_t *outlen) {
    tok_regex re;
    assert_int_equal(tok_regex_init(&re), 0);
    tok_pretok it;
    assert_int_equal(tok_pretok_begin(&it, &re, s, n), 0);
    char *out = malloc(2 * n + 2);
    size_t k = 0, st, pl, expect = 0;
    while (tok_pretok_next(&it, &st, &pl)) {
        assert_int_equal(st, expect); /* the pieces tile the text */
        assert_true(pl > 0);
        if (k) out[k++] = '|';
        memcpy(out + k, s + st, pl);
        k += pl;
        expect = st + pl;
    }
    assert_int_equal(expect, n);
    out[k] = 0;
    if (outlen) *outlen = k;
    tok_pretok_end(&it);
    tok_regex_free(&re);
    return out;
}

static char *pieces_of(const char *s, size_t n) { return pieces_of_n(s, n, NULL); }

static void check_split(const char *s, const char *want) {
    char *got = pieces_of(s, strlen(s));
    if (strcmp(got, want)) fprintf(stderr, "split of \"%s\": got \"%s\", want \"%s\"\n", s, got, want);
    assert_string_equal(got, want);
    free(got);
}

/* GPT-2's byte -> code point table, written from its definition. */
static void byte_alphabet(int cp[256]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        cp[b] = printable ? b : 256 + n++;
    }
}

static void utf8_put(char **p, int cp) {
    if (cp < 0x80) *(*p)++ = (char)cp;
    else {
        *(*p)++ = (char)(0xC0 | (cp >> 6));
        *(*p)++ = (char)(0x80 | (cp & 0x3F));
    }
}

/* Alphabet text of a byte string (static buffer per call site use). */
static void alpha_text(const char *bytes, size_t n, char *out) {
    int cp[256];
    byte_alphabet(cp);
    char *p = out;
    for (size_t i = 0; i < n; i++) utf8_put(&p, cp[(unsigned char)bytes[i]]);
    *p = 0;
}

/* A tokenizer.json with ids 0..255 = bytes, then the given merges' results
 * in order, then <|endoftext|>. merges: "left right" as raw bytes split at
 * the single space of each entry (test inputs have no other spaces). */
static cJSON *make_json(const char *const *merges, int nm) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    cJSON *a = cJSON_CreateObject();
    cJSON_AddNumberToObject(a, "id", 256 + nm);
    cJSON_AddStringToObject(a, "content", "<|endoftext|>");
    cJSON_AddTrueToObject(a, "special");
    cJSON_AddItemToArray(added, a);
    cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
    cJSON_AddStringToObject(pre, "type", "ByteLevel");
    cJSON_AddFalseToObject(pre, "add_prefix_space");
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    cJSON *ml = cJSON_AddArrayToObject(model, "merges");
    char buf[256], l[64], r[64];
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        alpha_text(&c, 1, buf);
        cJSON_AddNumberToObject(vocab, buf, b);
    }
    for (int i = 0; i < nm; i++) {
        const char *sp = strchr(merges[i], ' ');
        char both[128];
        size_t nl = (size_t)(sp - merges[i]), nr = strlen(sp + 1);
        memcpy(both, merges[i], nl);
        memcpy(both + nl, sp + 1, nr);
        alpha_text(both, nl + nr, buf);
        cJSON_AddNumberToObject(vocab, buf, 256 + i);
        alpha_text(merges[i], nl, l);
        alpha_text(sp + 1, nr, r);
        snprintf(buf, sizeof buf, "%s %s", l, r);
        cJSON_AddItemToArray(ml, cJSON_CreateString(buf));
    }
    cJSON_AddNumberToObject(vocab, "<|endoftext|>", 256 + nm);
    return root;
}

static void write_json(const char *path, const cJSON *j) {
    char *s = cJSON_Print(j);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(s, f);
    fclose(f);
    cJSON_free(s);
}

static void write_text(const char *path, const char *s) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(s, f);
    fclose(f);
}

/* Reference BPE for one piece: repeatedly merge the leftmost pair of
 * lowest rank, scanning everything each time. rank2d[a*V+b] = rank or -1. */
static int *rank_table(const tlm_tokenizer *t) {
    int V = tokenizer_vocab_size(t);
    int *rk = malloc((size_t)V * V * sizeof *rk);
    for (size_t i = 0; i < (size_t)V * V; i++) rk[i] = -1;
    for (int m = tokenizer_merge_count(t) - 1; m >= 0; m--) {
        int a, b, c;
        tokenizer_merge(t, m, &a, &b, &c);
        rk[a * V + b] = m;
    }
    return rk;
}

static size_t ref_encode(const tlm_tokenizer *t, const int *rk, const unsigned char *s, size_t n, int32_t *out) {
    int V = tokenizer_vocab_size(t);
    tok_regex re;
    assert_int_equal(tok_regex_init(&re), 0);
    tok_pretok it;
    assert_int_equal(tok_pretok_begin(&it, &re, s, n), 0);
    size_t st, pl, k = 0;
    int32_t *w = malloc((n + 1) * sizeof *w);
    while (tok_pretok_next(&it, &st, &pl)) {
        size_t m = pl;
        for (size_t i = 0; i < m; i++) w[i] = s[st + i]; /* ids 0..255 are the bytes */
        for (;;) {
            int best = -1;
            size_t at = 0;
            for (size_t i = 0; i + 1 < m; i++) {
                int r = rk[w[i] * V + w[i + 1]];
                if (r >= 0 && (best < 0 || r < best)) best = r, at = i;
            }
            if (best < 0) break;
            int c;
            tokenizer_merge(t, best, NULL, NULL, &c);
            w[at] = c;
            memmove(w + at + 1, w + at + 2, (m - at - 2) * sizeof *w);
            m--;
        }
        memcpy(out + k, w, m * sizeof *w);
        k += m;
    }
    free(w);
    tok_pretok_end(&it);
    tok_regex_free(&re);
    return k;
}

/* ---- pre-tokenization -------------------------------------------------- */

static void test_pretokenize_splits(void **state) {
    (void)state;
    check_split("Hello world", "Hello| world");
    check_split("I'm can't we'll they've it's he'd you're",
                "I|'m| can|'t| we|'ll| they|'ve| it|'s| he|'d| you|'re");
    check_split("IT'S", "IT|'|S"); /* contractions are lower-case only */
    check_split("In 2023, 1,000 people", "In| 2023|,| 1|,|000| people");
    check_split("abc  def", "abc| | def");
    check_split("a\n\nb", "a|\n|\n|b");
    check_split("x   \n", "x|   \n");
    check_split("hi  ", "hi|  ");
    check_split("   hi", "  | hi");
    check_split("Hello!!! ...ok", "Hello|!!!| ...|ok");
    check_split("na\xc3\xafve caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", "na\xc3\xafve| caf\xc3\xa9| \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e");
    /* A combining mark is not a letter: it splits the word. */
    check_split("Cafe\xcc\x81s", "Cafe|\xcc\x81|s");
    check_split("x \xf0\x9f\x98\x80\xf0\x9f\x98\x80!", "x| \xf0\x9f\x98\x80\xf0\x9f\x98\x80!");
    check_split("\xd9\xa3\xd9\xa4 abc", "\xd9\xa3\xd9\xa4| abc"); /* Arabic-Indic digits are numbers */
    /* Whitespace is Unicode White_Space (as in `tokenizers`): NEL and the
     * ideographic space are spaces, U+180E (a format character) is not. */
    check_split("a\xc2\x85" "b", "a|\xc2\x85|b");
    check_split("\xe6\x97\xa5\xe3\x80\x80\xe3\x80\x80x", "\xe6\x97\xa5|\xe3\x80\x80|\xe3\x80\x80|x");
    check_split("a\xe1\xa0\x8e!", "a|\xe1\xa0\x8e!");
    check_split("a\t\t b", "a|\t\t| b");
    /* Invalid UTF-8: each bad byte alone, valid runs around it as usual. */
    check_split("ab\xff" "cd", "ab|\xff|cd");
    check_split("\xe6\x97 x", "\xe6|\x97| x");        /* truncated sequence */
    check_split("a\xc0\x80" "b", "a|\xc0|\x80|b");     /* overlong NUL */
    check_split("\xed\xa0\x80z", "\xed|\xa0|\x80|z"); /* surrogate */
    /* NUL is an ordinary (non-space, non-letter) character. */
    char nul[] = {'a', 0, 0, 'b', ' ', 0};
    char *got = pieces_of(nul, sizeof nul);
    char want[] = {'a', '|', 0, 0, '|', 'b', '|', ' ', 0};
    assert_memory_equal(got, want, sizeof want);
    free(got);
}

/* Splits of random mixed strings (Unicode spaces, marks, digits, emoji,
 * contractions) as Hugging Face `tokenizers` 0.23.2 made them: a file saved
 * by tokenizer_save with no merges was loaded there and each string's
 * pieces read from the encoding's word ids. An independent reference for
 * the pattern and for what \s means. */
static const struct {
    const char *text;
    size_t len;
    const char *want;
    size_t wlen;
} HF_SPLITS[] = {
        {"\xe0\xb8\x81\xe0\xb8\xb4\xe2\x80\xaf\xe2\x80\x80\xe2\x80\xa9X\xc2\x85", 18, "\xe0\xb8\x81|\xe0\xb8\xb4|\xe2\x80\xaf\xe2\x80\x80|\xe2\x80\xa9|X|\xc2\x85", 23},
        {"\xe2\x80\x80" "0'll!\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82", 20, "\xe2\x80\x80|0|'ll|!|\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82", 24},
        {"\xe6\x97\xa5\xf4\x8f\xbf\xbf\xe2\x81\x9f,\x09\xe6\x97\xa5" "b\xe2\x80\x99s\xe3\x80\x87", 23, "\xe6\x97\xa5|\xf4\x8f\xbf\xbf|\xe2\x81\x9f|,|\x09|\xe6\x97\xa5" "b|\xe2\x80\x99|s|\xe3\x80\x87", 31},
        {"'d\xcd\xb8'll   \xc2\x85", 12, "'d|\xcd\xb8'|ll|   \xc2\x85", 15},
        {"--aa'S\xe2\x80\x99s're're\xd9\xa3", 18, "--|aa|'|S|\xe2\x80\x99|s|'re|'re|\xd9\xa3", 26},
        {"'t\xe2\x81\x9f\xe2\x80\xa8\xc2\xa0'S'd\xe2\x80\xaf", 17, "'t|\xe2\x81\x9f\xe2\x80\xa8|\xc2\xa0|'|S|'d|\xe2\x80\xaf", 23},
        {"\xcd\xb8\xc2\xbd" "c\xed\x95\x9c\xea\xb5\xad\x09", 12, "\xcd\xb8|\xc2\xbd|c\xed\x95\x9c\xea\xb5\xad|\x09", 15},
        {"\x0a\x0a\xe8\xaa\x9e" "9\x7f", 7, "\x0a|\x0a|\xe8\xaa\x9e|9|\x7f", 11},
        {"\x0d\x0b" "a\x0c\xe2\x80\xa8\xe3\x80\x80", 10, "\x0d|\x0b|a|\x0c\xe2\x80\xa8\xe3\x80\x80", 13},
        {"9\xe2\x85\xab\xe0\xb8\x81\xe0\xb8\xb4\xe2\x85\xab\xe1\x9a\x80\xe2\x81\x9f\xc2\xb2", 21, "9\xe2\x85\xab|\xe0\xb8\x81|\xe0\xb8\xb4|\xe2\x85\xab|\xe1\x9a\x80|\xe2\x81\x9f|\xc2\xb2", 27},
        {"\xe1\x9a\x80\xc2\xa0\xe3\x80\x80've", 11, "\xe1\x9a\x80\xc2\xa0|\xe3\x80\x80|'ve", 13},
        {"\xe6\x9c\xac" "c", 4, "\xe6\x9c\xac" "c", 4},
        {"\xc2\xaa" "c\xe3\x80\x80\x09\xed\x95\x9c\xea\xb5\xad\xf4\x8f\xbf\xbf\x0a", 18, "\xc2\xaa" "c|\xe3\x80\x80|\x09|\xed\x95\x9c\xea\xb5\xad|\xf4\x8f\xbf\xbf|\x0a", 23},
        {"\x0dZ", 2, "\x0d|Z", 3},
        {"\xc2\x85't\x3f\xe6\x97\xa5", 8, "\xc2\x85|'t|\x3f|\xe6\x97\xa5", 11},
        {"\xca\xb0\xe2\x80\x8b\xe0\xb8\x81\xe0\xb8\xb4\xe2\x80\xa9\xe6\x9c\xac\xc2\x85,\x0b\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82", 33, "\xca\xb0|\xe2\x80\x8b|\xe0\xb8\x81|\xe0\xb8\xb4|\xe2\x80\xa9|\xe6\x9c\xac|\xc2\x85|,|\x0b|\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82", 42},
        {"Y\x0b\x22'S\xc7\x85\xe2\x80\x8b", 10, "Y|\x0b|\x22'|S\xc7\x85|\xe2\x80\x8b", 14},
        {"\x0a\x0a\xc7\x85\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xe2\x81\x9f\xe2\x81\x9f\x22\xe2\x85\xab", 22, "\x0a|\x0a|\xc7\x85|\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd|\xe2\x81\x9f|\xe2\x81\x9f|\x22|\xe2\x85\xab", 29},
        {"\xe2\x85\xab've'\xc2\xa0's\x1c\xe2\x80\xaf", 15, "\xe2\x85\xab|'ve|'|\xc2\xa0|'s|\x1c|\xe2\x80\xaf", 21},
        {"\xe1\x9a\x80'll\x1c" "0'\x0c", 10, "\xe1\x9a\x80|'ll|\x1c|0|'|\x0c", 15},
        {"\xc2\xaaY\xc3\xb1\x0c\xca\xb0\xe6\x9c\xac \xe2\x80\x80\x09\x0a\x0a", 18, "\xc2\xaaY\xc3\xb1|\x0c|\xca\xb0\xe6\x9c\xac| \xe2\x80\x80\x09\x0a\x0a", 21},
        {"\xe1\x9a\x80Y", 4, "\xe1\x9a\x80|Y", 5},
        {"\x7f'S-\x1c-\xc2\xa0\xe3\x80\x87,'re", 15, "\x7f'|S|-\x1c-|\xc2\xa0|\xe3\x80\x87|,'|re", 21},
        {"\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82's1\x09\xd9\xa3\x0a\x0a \xc2\x85", 23, "\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82|'s|1|\x09|\xd9\xa3|\x0a\x0a \xc2\x85", 28},
        {"\xe2\x80\xa8 \xe1\xa0\x8e\xe2\x80\xaf", 10, "\xe2\x80\xa8| \xe1\xa0\x8e|\xe2\x80\xaf", 12},
        {"\xe1\x9a\x80\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xd9\xa3\xc2\xa0\xc2\xaa\x0a\x0a!", 20, "\xe1\x9a\x80|\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd|\xd9\xa3|\xc2\xa0|\xc2\xaa|\x0a|\x0a|!", 27},
        {"\xe2\x80\xaf've\xc2\xa0\xe2\x80\x80\xc7\x85'd\x22\xe1\xa0\x8e", 19, "\xe2\x80\xaf|'ve|\xc2\xa0|\xe2\x80\x80|\xc7\x85|'d|\x22\xe1\xa0\x8e", 25},
        {"\xe2\x80\x8b\xe3\x80\x80\xe2\x80\x8a\xed\x95\x9c\xea\xb5\xad" "9\xe0\xb8\x81\xe0\xb8\xb4", 22, "\xe2\x80\x8b|\xe3\x80\x80|\xe2\x80\x8a|\xed\x95\x9c\xea\xb5\xad|9|\xe0\xb8\x81|\xe0\xb8\xb4", 28},
        {"\xe2\x85\xab\xed\x95\x9c\xea\xb5\xad", 9, "\xe2\x85\xab|\xed\x95\x9c\xea\xb5\xad", 10},
        {"\xe3\x80\x80\xe2\x80\x8b\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xe1\xa0\x8e\xe8\xaa\x9e\xe2\x80\xaf\xef\xbb\xbf\xd9\xa3\xc7\x85\xe2\x80\x80", 33, "\xe3\x80\x80|\xe2\x80\x8b\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xe1\xa0\x8e|\xe8\xaa\x9e|\xe2\x80\xaf|\xef\xbb\xbf|\xd9\xa3|\xc7\x85|\xe2\x80\x80", 40},
        {"\x0a" "b\xc2\xa0\xe3\x80\x80", 7, "\x0a|b|\xc2\xa0\xe3\x80\x80", 9},
        {"\x00\xe2\x80\x8b\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xc2\x85" "e\xcc\x81\xe2\x80\x8a", 20, "\x00\xe2\x80\x8b\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd|\xc2\x85|e|\xcc\x81|\xe2\x80\x8a", 24},
        {"\xca\xb0\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xe1\xa0\x8e\xca\xb0\xe3\x80\x87\xca\xb0've", 23, "\xca\xb0|\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xe1\xa0\x8e|\xca\xb0|\xe3\x80\x87|\xca\xb0|'ve", 28},
        {"\xed\x95\x9c\xea\xb5\xad\x7f\xe2\x80\xa8\x0a\x0a\xe2\x80\xa9're't\xed\x95\x9c\xea\xb5\xad\xe1\x9a\x80", 29, "\xed\x95\x9c\xea\xb5\xad|\x7f|\xe2\x80\xa8\x0a\x0a|\xe2\x80\xa9|'re|'t|\xed\x95\x9c\xea\xb5\xad|\xe1\x9a\x80", 36},
        {"\xe2\x80\xaf'\x1c\xe2\x80\x8b\x09're", 12, "\xe2\x80\xaf|'\x1c\xe2\x80\x8b|\x09|'re", 15},
        {"\xe2\x80\x8b\x09\xc2\xbd\xc2\x85\xe3\x80\x80\xe1\x9a\x80\xf0\x9f\x98\x80\x1cX't", 22, "\xe2\x80\x8b|\x09|\xc2\xbd|\xc2\x85\xe3\x80\x80|\xe1\x9a\x80|\xf0\x9f\x98\x80\x1c|X|'t", 29},
        {"\x0b\x0c\xc2\x85\xe2\x80\x80", 7, "\x0b\x0c\xc2\x85\xe2\x80\x80", 7},
        {"\xc3\xa9\xe2\x80\xa9'd\xc2\xa0", 9, "\xc3\xa9|\xe2\x80\xa9|'d|\xc2\xa0", 12},
        {"\xc2\xa0\xc3\xa9", 4, "\xc2\xa0|\xc3\xa9", 5},
        {"0  !\xc2\xb2", 6, "0| | !|\xc2\xb2", 9},
        {"\xe1\x9a\x80'm\xe3\x80\x80Y", 9, "\xe1\x9a\x80|'m|\xe3\x80\x80|Y", 12},
        {"\xc2\x85\xca\xb0\xf4\x8f\xbf\xbf\xe2\x80\x8a  \x0b'S", 16, "\xc2\x85|\xca\xb0|\xf4\x8f\xbf\xbf|\xe2\x80\x8a  |\x0b|'|S", 22},
        {"\xef\xbb\xbf\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82" "a\xca\xb0\xc2\xaa", 20, "\xef\xbb\xbf|\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82" "a\xca\xb0\xc2\xaa", 21},
        {"\xe3\x80\x87!\xe2\x80\xaf\xe3\x80\x80\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82Y", 23, "\xe3\x80\x87|!|\xe2\x80\xaf|\xe3\x80\x80|\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82Y", 27},
        {" \xc2\xbd.\xd9\xa3\xe2\x81\x9f\xe2\x80\x8b\xc7\x85\x0a\xd9\xa3\xe0\xb8\x81\xe0\xb8\xb4", 23, " \xc2\xbd|.|\xd9\xa3|\xe2\x81\x9f|\xe2\x80\x8b|\xc7\x85|\x0a|\xd9\xa3|\xe0\xb8\x81|\xe0\xb8\xb4", 32},
        {"\x09\xe3\x80\x87\x1c\xe1\xa0\x8e", 8, "\x09|\xe3\x80\x87|\x1c\xe1\xa0\x8e", 10},
        {"\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82\xc2\x85\x0a\x0a'll\x0c\xf4\x8f\xbf\xbf\x1c\xe1\x9a\x80't  ", 32, "\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82|\xc2\x85\x0a|\x0a|'ll|\x0c|\xf4\x8f\xbf\xbf\x1c|\xe1\x9a\x80|'t|  ", 40},
        {"\xca\xb0\xe2\x80\x8a" "a", 6, "\xca\xb0|\xe2\x80\x8a|a", 8},
        {",\x00\x1c \xe2\x81\x9f\x0a\x0a\x00\xc2\xa0", 12, ",\x00\x1c| \xe2\x81\x9f\x0a|\x0a|\x00|\xc2\xa0", 16},
        {"\x0a\x0b\xc3\xa9\xe2\x80\x80\xd9\xa3\xe1\x9a\x80\xe3\x80\x80\xf4\x8f\xbf\xbf", 19, "\x0a|\x0b|\xc3\xa9|\xe2\x80\x80|\xd9\xa3|\xe1\x9a\x80|\xe3\x80\x80|\xf4\x8f\xbf\xbf", 26},
        {"'ll\x0c\x0c\xe8\xaa\x9e\xc2\xbd\xe2\x80\x80\xe6\x9c\xac\x09", 17, "'ll|\x0c|\x0c|\xe8\xaa\x9e|\xc2\xbd|\xe2\x80\x80|\xe6\x9c\xac|\x09", 24},
        {"\xc2\xb2\xe2\x85\xab", 5, "\xc2\xb2\xe2\x85\xab", 5},
        {"e\xcc\x81\x0a\x0a\xe1\x9a\x80X\x3f\xe2\x80\x8a\xc2\x85\x0c\xe6\x97\xa5", 19, "e|\xcc\x81|\x0a\x0a|\xe1\x9a\x80|X|\x3f|\xe2\x80\x8a\xc2\x85|\x0c|\xe6\x97\xa5", 27},
        {"Z  \xc2\xad" "b\xe1\x9a\x80\xe2\x80\xaf", 12, "Z| | \xc2\xad|b|\xe1\x9a\x80\xe2\x80\xaf", 16},
        {"\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xe6\x97\xa5\xc2\xa0Y\xe6\x97\xa5\xe1\xa0\x8e\xf0\x9f\x98\x80's\x1c" "e\xcc\x81", 30, "\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd|\xe6\x97\xa5|\xc2\xa0|Y\xe6\x97\xa5|\xe1\xa0\x8e\xf0\x9f\x98\x80'|s|\x1c|e|\xcc\x81", 38},
        {"\xe2\x80\x80\x0d\xc2\xa0\xe2\x80\xa8\xe1\xa0\x8e\x0d", 13, "\xe2\x80\x80\x0d\xc2\xa0|\xe2\x80\xa8|\xe1\xa0\x8e|\x0d", 16},
        {"c-\xc2\xbd", 4, "c|-|\xc2\xbd", 6},
        {"\xe2\x80\xaf\xe3\x80\x80\xc7\x85 \xd9\xa3\xe2\x80\xa9", 14, "\xe2\x80\xaf|\xe3\x80\x80|\xc7\x85| \xd9\xa3|\xe2\x80\xa9", 18},
        {"\xc2\x85\xca\xb0", 4, "\xc2\x85|\xca\xb0", 5},
        {"\xe2\x80\xa9\x0b-Ya\xe6\x9c\xac\xe3\x80\x80", 13, "\xe2\x80\xa9|\x0b|-|Ya\xe6\x9c\xac|\xe3\x80\x80", 17},
};

static void test_pretokenize_matches_hf(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof HF_SPLITS / sizeof HF_SPLITS[0]; i++) {
        size_t gl;
        char *got = pieces_of_n(HF_SPLITS[i].text, HF_SPLITS[i].len, &gl);
        if (gl != HF_SPLITS[i].wlen || memcmp(got, HF_SPLITS[i].want, HF_SPLITS[i].wlen))
            fprintf(stderr, "case %zu: got \"%s\"\n", i, got);
        assert_int_equal(gl, HF_SPLITS[i].wlen);
        assert_memory_equal(got, HF_SPLITS[i].want, HF_SPLITS[i].wlen);
        free(got);
    }
}

/* Cutting a document at tok_safe_cuts positions changes no piece. */
static void test_safe_cuts(void **state) {
    (void)state;
    tlm_rng r;
    tlm_rng_seed(&r, 11);
    const char *frag[] = {"word", " ", "  ", "\n", "'s", "'ll", "12", ",", "\xe6\x97\xa5", "\xff", "\xc3\xa9", "\t", "!"};
    for (int trial = 0; trial < 20; trial++) {
        char s[4000];
        size_t n = 0;
        while (n < 3900) {
            const char *f = frag[tlm_rng_below(&r, sizeof frag / sizeof frag[0])];
            memcpy(s + n, f, strlen(f));
            n += strlen(f);
        }
        char *whole = pieces_of(s, n);
        size_t cuts[64];
        size_t nc = tok_safe_cuts((const unsigned char *)s, n, 50 + trial * 10, cuts, 64);
        assert_true(nc > 0);
        char *joined = malloc(3 * n + 64);
        size_t k = 0, prev = 0;
        for (size_t c = 0; c <= nc; c++) {
            size_t e = c < nc ? cuts[c] : n;
            assert_true(e > prev);
            char *p = pieces_of(s + prev, e - prev);
            if (k) joined[k++] = '|';
            memcpy(joined + k, p, strlen(p));
            k += strlen(p);
            free(p);
            prev = e;
        }
        joined[k] = 0;
        assert_string_equal(joined, whole);
        free(joined);
        free(whole);
    }
}

/* ---- training ------------------------------------------------------------ */

static void expect_merges(const tlm_tokenizer *t, const char *const *want, int n) {
    assert_int_equal(tokenizer_merge_count(t), n);
    for (int m = 0; m < n; m++) {
        int a, b, c;
        assert_int_equal(tokenizer_merge(t, m, &a, &b, &c), 0);
        assert_int_equal(c, 256 + m);
        size_t la, lb;
        const unsigned char *pa = tokenizer_token_bytes(t, a, &la), *pb = tokenizer_token_bytes(t, b, &lb);
        char got[128];
        snprintf(got, sizeof got, "%.*s %.*s", (int)la, (const char *)pa, (int)lb, (const char *)pb);
        if (strcmp(got, want[m])) fprintf(stderr, "merge %d: got \"%s\", want \"%s\"\n", m, got, want[m]);
        assert_string_equal(got, want[m]);
        /* The merged token's bytes are the two parts joined. */
        size_t lc;
        const unsigned char *pc = tokenizer_token_bytes(t, c, &lc);
        assert_int_equal(lc, la + lb);
        assert_memory_equal(pc, pa, la);
        assert_memory_equal(pc + la, pb, lb);
    }
}

static tlm_tokenizer *train_docs(const char *const *docs, size_t nd, int vocab) {
    size_t lens[16];
    for (size_t i = 0; i < nd; i++) lens[i] = strlen(docs[i]);
    return tokenizer_train(docs, lens, nd, vocab, NULL, NULL);
}

static void test_train_hand_computed(void **state) {
    (void)state;
    /* Pieces hug x3, pug, pun, bun, hugs. Counts: ug 5, then hug 4, then
     * un 2; then four pairs of count 1, taken in byte order of (left,
     * right): (b,un) < (hug,s) < (p,ug) < (p,un). */
    const char *docs[] = {"hug", "hug", "hug", "pug", "pun", "bun", "hugs"};
    const char *want[] = {"u g", "h ug", "u n", "b un", "hug s", "p ug", "p un"};
    tlm_tokenizer *t = train_docs(docs, 7, 257 + 7);
    assert_non_null(t);
    expect_merges(t, want, 7);
    assert_int_equal(tokenizer_vocab_size(t), 264);
    assert_int_equal(tokenizer_eot_id(t), 263);
    size_t el;
    const unsigned char *eb = tokenizer_token_bytes(t, 263, &el);
    assert_int_equal(el, strlen(TLM_EOT_TEXT));
    assert_memory_equal(eb, TLM_EOT_TEXT, el);
    tokenizer_free(t);
    /* Nothing is left to merge for one more token. */
    assert_null(train_docs(docs, 7, 257 + 8));
    assert_non_null(strstr(tlm_last_error(), "--vocab 264"));

    /* Ties: (a,b) beats (a,y) on the right part and (b,x) on the left; then
     * "a" sorts before "ab" (a prefix comes first). */
    const char *docs2[] = {"abx", "abx", "ay", "ay"};
    const char *want2[] = {"a b", "a y", "ab x"};
    t = train_docs(docs2, 4, 257 + 3);
    assert_non_null(t);
    expect_merges(t, want2, 3);
    tokenizer_free(t);

    /* Pieces never span documents: "b c" is never a pair. */
    const char *docs3[] = {"ab", "cd"};
    const char *want3[] = {"a b", "c d"};
    t = train_docs(docs3, 2, 259);
    assert_non_null(t);
    expect_merges(t, want3, 2);
    tokenizer_free(t);
    assert_null(train_docs(docs3, 2, 260));

    /* Within a document pieces split at the space: " c" sorts first (0x20). */
    const char *docs4[] = {"ab cd"};
    const char *want4[] = {"  c", " c d", "a b"};
    t = train_docs(docs4, 1, 260);
    assert_non_null(t);
    expect_merges(t, want4, 3);
    tokenizer_free(t);

    /* Overlapping runs: "aaaa" x2 and "aaa": (a,a) occurs 3+3+2 = 8 times,
     * merged left to right: aa aa (x2) and aa a. Then (aa,aa) 2 vs (aa,a) 1. */
    const char *docs5[] = {"aaaa", "aaaa", "aaa"};
    const char *want5[] = {"a a", "aa aa", "aa a"};
    t = train_docs(docs5, 3, 260);
    assert_non_null(t);
    expect_merges(t, want5, 3);
    tokenizer_free(t);

    assert_null(train_docs(docs5, 3, 256));
    assert_non_null(strstr(tlm_last_error(), "--vocab"));
}

/* Naive trainer: recount every pair from scratch for each merge. */
typedef struct {
    int32_t *s;
    int n;
    int64_t f;
} ref_word;

static int ref_bytes_cmp(unsigned char **tb, size_t *tl, int x, int y) {
    size_t n = tl[x] < tl[y] ? tl[x] : tl[y];
    int c = memcmp(tb[x], tb[y], n);
    if (c) return c;
    return tl[x] < tl[y] ? -1 : tl[x] > tl[y];
}

static void test_train_matches_naive(void **state) {
    (void)state;
    tlm_rng r;
    tlm_rng_seed(&r, 3);
    enum { ND = 12, NM = 120 };
    char *docs[ND];
    size_t lens[ND];
    const char *alpha = "aaabbcde";
    for (int d = 0; d < ND; d++) {
        docs[d] = malloc(600);
        size_t k = 0;
        while (k < 500) {
            if (k) docs[d][k++] = tlm_rng_below(&r, 8) ? ' ' : '\n';
            int wl = 1 + (int)tlm_rng_below(&r, 7);
            for (int i = 0; i < wl; i++) docs[d][k++] = alpha[tlm_rng_below(&r, 8)];
            if (tlm_rng_below(&r, 10) == 0) docs[d][k++] = '.';
        }
        lens[d] = k;
    }
    tlm_tokenizer *t = tokenizer_train((const char *const *)docs, lens, ND, 257 + NM, NULL, NULL);
    assert_non_null(t);

    /* Reference: words = all pieces of all documents (with repeats). */
    ref_word *w = NULL;
    int nw = 0, cw = 0;
    tok_regex re;
    assert_int_equal(tok_regex_init(&re), 0);
    tok_pretok it;
    assert_int_equal(tok_pretok_begin(&it, &re, "", 0), 0);
    for (int d = 0; d < ND; d++) {
        tok_pretok_reset(&it, docs[d], lens[d]);
        size_t st, pl;
        while (tok_pretok_next(&it, &st, &pl)) {
            if (nw == cw) w = realloc(w, (size_t)(cw = cw ? 2 * cw : 64) * sizeof *w);
            w[nw].s = malloc(pl * sizeof(int32_t));
            for (size_t i = 0; i < pl; i++) w[nw].s[i] = (unsigned char)docs[d][st + i];
            w[nw].n = (int)pl;
            w[nw].f = 1;
            nw++;
        }
    }
    tok_pretok_end(&it);
    tok_regex_free(&re);
    int V = 257 + NM;
    unsigned char *tb[257 + NM];
    size_t tl[257 + NM];
    for (int b = 0; b < 256; b++) {
        tb[b] = malloc(1);
        tb[b][0] = (unsigned char)b;
        tl[b] = 1;
    }
    int64_t *cnt = malloc((size_t)V * V * sizeof *cnt);
    for (int m = 0; m < NM; m++) {
        memset(cnt, 0, (size_t)V * V * sizeof *cnt);
        for (int i = 0; i < nw; i++)
            for (int j = 0; j + 1 < w[i].n; j++) cnt[w[i].s[j] * V + w[i].s[j + 1]] += w[i].f;
        int ba = -1, bb = -1;
        int64_t bc = 0;
        for (int a = 0; a < 256 + m; a++)
            for (int b = 0; b < 256 + m; b++) {
                int64_t c = cnt[a * V + b];
                if (c <= 0) continue;
                int better = c > bc;
                if (c == bc) {
                    int k = ref_bytes_cmp(tb, tl, a, ba);
                    if (!k) k = ref_bytes_cmp(tb, tl, b, bb);
                    better = k < 0;
                }
                if (better) ba = a, bb = b, bc = c;
            }
        assert_true(ba >= 0);
        int c = 256 + m;
        tl[c] = tl[ba] + tl[bb];
        tb[c] = malloc(tl[c]);
        memcpy(tb[c], tb[ba], tl[ba]);
        memcpy(tb[c] + tl[ba], tb[bb], tl[bb]);
        for (int i = 0; i < nw; i++) {
            int j = 0;
            for (int k = 0; k < w[i].n;) {
                if (k + 1 < w[i].n && w[i].s[k] == ba && w[i].s[k + 1] == bb) w[i].s[j++] = c, k += 2;
                else w[i].s[j++] = w[i].s[k++];
            }
            w[i].n = j;
        }
        int a, b, res;
        assert_int_equal(tokenizer_merge(t, m, &a, &b, &res), 0);
        if (a != ba || b != bb) fprintf(stderr, "merge %d: got (%d,%d), reference (%d,%d) count %lld\n", m, a, b, ba, bb, (long long)bc);
        assert_int_equal(a, ba);
        assert_int_equal(b, bb);
        assert_int_equal(res, c);
    }
    free(cnt);
    for (int i = 0; i < 256 + NM; i++) free(tb[i]);
    for (int i = 0; i < nw; i++) free(w[i].s);
    free(w);
    for (int d = 0; d < ND; d++) free(docs[d]);
    tokenizer_free(t);
}

static void test_train_deterministic(void **state) {
    (void)state;
    tlm_rng r;
    tlm_rng_seed(&r, 5);
    char *docs[6];
    size_t lens[6];
    for (int d = 0; d < 6; d++) docs[d] = make_text(&r, 20000 + 5000 * (size_t)d, &lens[d]);
    char *dir = test_tmpdir();
    char p1[600], p2[600], p3[600];
    snprintf(p1, sizeof p1, "%s/a.json", dir);
    snprintf(p2, sizeof p2, "%s/b.json", dir);
    snprintf(p3, sizeof p3, "%s/c.json", dir);
    tlm_tokenizer *t1 = tokenizer_train((const char *const *)docs, lens, 6, 500, NULL, NULL);
    tlm_tokenizer *t2 = tokenizer_train((const char *const *)docs, lens, 6, 500, NULL, NULL);
    int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    tlm_tokenizer *t3 = tokenizer_train((const char *const *)docs, lens, 6, 500, NULL, NULL);
    omp_set_num_threads(nt);
    assert_non_null(t1);
    assert_non_null(t2);
    assert_non_null(t3);
    assert_int_equal(tokenizer_save(t1, p1), 0);
    assert_int_equal(tokenizer_save(t2, p2), 0);
    assert_int_equal(tokenizer_save(t3, p3), 0);
    size_t n1, n2, n3;
    char *b1 = test_read_file(p1, &n1), *b2 = test_read_file(p2, &n2), *b3 = test_read_file(p3, &n3);
    assert_non_null(b1);
    assert_int_equal(n1, n2);
    assert_int_equal(n1, n3);
    assert_memory_equal(b1, b2, n1);
    assert_memory_equal(b1, b3, n1);
    free(b1), free(b2), free(b3);
    tokenizer_free(t1), tokenizer_free(t2), tokenizer_free(t3);
    for (int d = 0; d < 6; d++) free(docs[d]);
    test_rmtree(dir);
    free(dir);
}

/* ---- encoding ------------------------------------------------------------ */

static void test_encode_rank_order(void **state) {
    (void)state;
    /* (b,c) has the lowest rank, so "abc" becomes a+bc then abc; a
     * left-to-right greedy merger would take ab first and stop at [ab, c]. */
    const char *merges[] = {"b c", "a b", "a bc", "a a", "aa a", "x y", "y z", "xy z"};
    /* ids: bc 256, ab 257, abc 258, aa 259, aaa 260, xy 261, yz 262, xyz 263, eot 264 */
    cJSON *j = make_json(merges, 8);
    char *dir = test_tmpdir();
    char path[600];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    write_json(path, j);
    cJSON_Delete(j);
    tlm_tokenizer *t = tokenizer_load(path);
    if (!t) fprintf(stderr, "%s\n", tlm_last_error());
    assert_non_null(t);
    assert_int_equal(tokenizer_vocab_size(t), 265);
    assert_int_equal(tokenizer_eot_id(t), 264);
    struct {
        const char *text;
        int n;
        int32_t ids[8];
    } cases[] = {
        {"abc", 1, {258}},
        {"abcbc", 2, {258, 256}},
        {"abab", 2, {257, 257}},
        {"aaa", 1, {260}},               /* (a,a) leftmost, then (aa,a) */
        {"aaaa", 2, {259, 259}},         /* (a,a) at 0, then (a,a) at 1 beats (aa,a) by rank */
        {"xyz", 1, {263}},               /* (x,y) rank 5 before (y,z) rank 6, then (xy,z) */
        {"ab c", 3, {257, ' ', 'c'}},    /* pieces "ab", " c" */
        {"cab", 2, {'c', 257}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t out[16];
        size_t n = tokenizer_encode(t, cases[i].text, strlen(cases[i].text), out, 16);
        if (n != (size_t)cases[i].n || memcmp(out, cases[i].ids, n * sizeof *out))
            fprintf(stderr, "encode \"%s\": got %zu tokens, first %d\n", cases[i].text, n, n ? out[0] : -1);
        assert_int_equal(n, cases[i].n);
        assert_memory_equal(out, cases[i].ids, n * sizeof *out);
    }
    /* A long piece takes the heap path; it must agree with the reference. */
    int *rk = rank_table(t);
    tlm_rng r;
    tlm_rng_seed(&r, 9);
    for (int trial = 0; trial < 6; trial++) {
        size_t n = trial < 3 ? 40 + 30 * (size_t)trial : 300 + 700 * (size_t)trial;
        unsigned char *s = malloc(n);
        for (size_t i = 0; i < n; i++) s[i] = "abcxyza"[tlm_rng_below(&r, 7)];
        int32_t *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
        size_t na = tokenizer_encode(t, (const char *)s, n, a, n);
        size_t nb = ref_encode(t, rk, s, n, b);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na * sizeof *a);
        free(s), free(a), free(b);
    }
    free(rk);
    tokenizer_free(t);
    test_rmtree(dir);
    free(dir);
}

static void test_encode_matches_reference(void **state) {
    (void)state;
    tlm_tokenizer *t = small_tokenizer();
    int *rk = rank_table(t);
    tlm_rng r;
    tlm_rng_seed(&r, 21);
    for (int trial = 0; trial < 10; trial++) {
        size_t n;
        char *s = make_text(&r, 2000 + 20000 * (size_t)(trial == 9), &n);
        if (trial == 8) { /* one very long word: the heap path on real merges */
            for (size_t i = 0; i < n; i++)
                if (s[i] == ' ' || s[i] == ',' || s[i] == '.' || s[i] == '\n' || s[i] == '\'') s[i] = 'e';
        }
        int32_t *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
        size_t na = tokenizer_encode(t, s, n, a, n);
        size_t nb = ref_encode(t, rk, (const unsigned char *)s, n, b);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na * sizeof *a);
        /* Common words are single tokens after training on this text. */
        if (trial == 0) assert_true(na < n / 2);
        free(s), free(a), free(b);
    }
    free(rk);
    tokenizer_free(t);
}

static void test_roundtrip_bytes(void **state) {
    (void)state;
    tlm_tokenizer *t = small_tokenizer();
    tlm_rng r;
    tlm_rng_seed(&r, 1234);
    static const char *const frags[] = {
        "the", " of", " ", "  ", "\n", "\t", "\r\n", "'s", "'ll", "123", ",", ".",
        "\xe6\x97\xa5\xe6\x9c\xac",          /* CJK */
        "\xf0\x9f\x98\x80",                  /* emoji */
        "\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd",  /* emoji + skin tone modifier */
        "e\xcc\x81",                         /* combining acute */
        "\xc3\xa9",
        "\x80", "\xbf",                      /* lone continuation bytes */
        "\xe6\x97",                          /* truncated */
        "\xc0\x80", "\xed\xa0\x80", "\xf5\x80\x80\x80", "\xff", "\xfe",
        "\xef\xbb\xbf",                      /* BOM */
        "\xc2\xa0",                          /* no-break space */
    };
    const size_t nf = sizeof frags / sizeof frags[0];
    unsigned char buf[1200];
    for (int trial = 0; trial < 400; trial++) {
        size_t n = 0, want = tlm_rng_below(&r, 300);
        int mode = trial % 3;
        while (n < want) {
            if (mode == 0) buf[n++] = (unsigned char)tlm_rng_below(&r, 256); /* any bytes, NULs included */
            else if (mode == 1 || tlm_rng_below(&r, 4)) {
                const char *f = frags[tlm_rng_below(&r, nf)];
                size_t fl = strlen(f);
                memcpy(buf + n, f, fl);
                n += fl;
            } else buf[n++] = 0;
        }
        assert_roundtrip(t, buf, n);
    }
    assert_roundtrip(t, (const unsigned char *)"", 0);
    /* Long runs: one piece of 100k spaces, of letters, of invalid bytes. */
    size_t big = 100000;
    unsigned char *s = malloc(big + 2);
    memset(s, ' ', big);
    s[big] = 'x';
    assert_roundtrip(t, s, big + 1);
    for (size_t i = 0; i < big; i++) s[i] = "the"[i % 3];
    assert_roundtrip(t, s, big);
    memset(s, 0xff, big);
    assert_roundtrip(t, s, big);
    free(s);
    /* The end-of-text text is plain text, never the special id. */
    int32_t ids[32];
    size_t k = tokenizer_encode(t, TLM_EOT_TEXT, strlen(TLM_EOT_TEXT), ids, 32);
    assert_true(k > 1);
    for (size_t i = 0; i < k; i++) assert_int_not_equal(ids[i], tokenizer_eot_id(t));
    tokenizer_free(t);
}

static void test_encode_cap_and_decode(void **state) {
    (void)state;
    tlm_tokenizer *t = small_tokenizer();
    const char *s = "The government of the people, by the people, for the people.";
    int32_t full[128], part[128];
    size_t n = tokenizer_encode(t, s, strlen(s), full, 128);
    assert_true(n > 4);
    for (size_t cap = 0; cap <= n; cap++) {
        for (int i = 0; i < 128; i++) part[i] = -7;
        size_t m = tokenizer_encode(t, s, strlen(s), part, cap);
        assert_int_equal(m, n);
        assert_memory_equal(part, full, cap * sizeof *part);
        assert_int_equal(part[cap], -7); /* nothing written past cap */
    }
    /* The special token decodes to its text; bad ids are an error. */
    int32_t ids[3] = {full[0], tokenizer_eot_id(t), full[1]};
    size_t dl;
    char *d = tokenizer_decode(t, ids, 3, &dl);
    assert_non_null(d);
    size_t l0, l1;
    const unsigned char *b0 = tokenizer_token_bytes(t, full[0], &l0), *b1 = tokenizer_token_bytes(t, full[1], &l1);
    assert_int_equal(dl, l0 + strlen(TLM_EOT_TEXT) + l1);
    assert_memory_equal(d, b0, l0);
    assert_memory_equal(d + l0, TLM_EOT_TEXT, strlen(TLM_EOT_TEXT));
    assert_memory_equal(d + l0 + strlen(TLM_EOT_TEXT), b1, l1);
    free(d);
    int32_t bad[2] = {5, tokenizer_vocab_size(t)};
    assert_null(tokenizer_decode(t, bad, 2, &dl));
    assert_non_null(strstr(tlm_last_error(), "token id"));
    bad[1] = -1;
    assert_null(tokenizer_decode(t, bad, 2, &dl));
    assert_null(tokenizer_token_bytes(t, -1, &dl));
    assert_null(tokenizer_token_bytes(t, tokenizer_vocab_size(t), &dl));
    /* Single bytes are ids 0..255 in a trained tokenizer. */
    const unsigned char *b = tokenizer_token_bytes(t, 'A', &dl);
    assert_int_equal(dl, 1);
    assert_int_equal(b[0], 'A');
    tokenizer_free(t);
}

static void test_encode_many(void **state) {
    (void)state;
    tlm_tokenizer *t = small_tokenizer();
    tlm_rng r;
    tlm_rng_seed(&r, 77);
    enum { ND = 9 };
    char *docs[ND];
    size_t lens[ND];
    for (int d = 0; d < ND; d++) {
        /* One document over 2 MB, so it is cut into units; one empty. */
        size_t want = d == 3 ? (size_t)2300000 : d == 5 ? 0 : 500 + 3000 * (size_t)d;
        docs[d] = make_text(&r, want, &lens[d]);
        if (d == 5) lens[d] = 0;
        if (d == 6 && lens[d] > 10) docs[d][7] = (char)0xff;
    }
    size_t offs[ND + 1], ntok;
    int32_t *all = tokenizer_encode_many(t, (const char *const *)docs, lens, ND, 1, offs, &ntok, NULL, NULL);
    assert_non_null(all);
    assert_int_equal(offs[0], 0);
    assert_int_equal(offs[ND], ntok);
    for (int d = 0; d < ND; d++) {
        int32_t *one = malloc((lens[d] + 1) * sizeof *one);
        size_t n = tokenizer_encode(t, docs[d], lens[d], one, lens[d]);
        assert_int_equal(offs[d + 1] - offs[d], n + 1);
        assert_memory_equal(all + offs[d], one, n * sizeof *one);
        assert_int_equal(all[offs[d] + n], tokenizer_eot_id(t));
        free(one);
    }
    free(all);
    all = tokenizer_encode_many(t, (const char *const *)docs, lens, ND, 0, NULL, &ntok, NULL, NULL);
    assert_non_null(all);
    size_t dl;
    char *dec = tokenizer_decode(t, all, ntok, &dl);
    size_t total = 0;
    for (int d = 0; d < ND; d++) total += lens[d];
    assert_int_equal(dl, total);
    size_t off = 0;
    for (int d = 0; d < ND; d++) {
        assert_memory_equal(dec + off, docs[d], lens[d]);
        off += lens[d];
    }
    free(dec);
    free(all);
    /* Only empty documents, and none at all. */
    size_t zero[2] = {0, 0};
    all = tokenizer_encode_many(t, (const char *const *)docs, zero, 2, 1, offs, &ntok, NULL, NULL);
    assert_non_null(all);
    assert_int_equal(ntok, 2);
    assert_int_equal(offs[1], 1);
    assert_int_equal(offs[2], 2);
    assert_int_equal(all[0], tokenizer_eot_id(t));
    free(all);
    all = tokenizer_encode_many(t, NULL, NULL, 0, 1, offs, &ntok, NULL, NULL);
    assert_non_null(all);
    assert_int_equal(ntok, 0);
    free(all);
    for (int d = 0; d < ND; d++) free(docs[d]);
    tokenizer_free(t);
}

/* ---- files --------------------------------------------------------------- */

static void test_save_load_json(void **state) {
    (void)state;
    tlm_tokenizer *t = small_tokenizer();
    char *dir = test_tmpdir();
    char path[600];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    assert_int_equal(tokenizer_save(t, path), 0);
    tlm_tokenizer *u = tokenizer_load(path);
    if (!u) fprintf(stderr, "%s\n", tlm_last_error());
    assert_non_null(u);
    assert_int_equal(tokenizer_vocab_size(u), 600);
    assert_int_equal(tokenizer_eot_id(u), 599);
    tlm_rng r;
    tlm_rng_seed(&r, 99);
    size_t n;
    char *s = make_text(&r, 30000, &n);
    int32_t *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    size_t na = tokenizer_encode(t, s, n, a, n), nb = tokenizer_encode(u, s, n, b, n);
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, na * sizeof *a);
    free(a), free(b), free(s);

    /* The file is what `tokenizers` writes for a ByteLevel BPE. */
    size_t fl;
    char *txt = test_read_file(path, &fl);
    cJSON *j = cJSON_Parse(txt);
    free(txt);
    assert_non_null(j);
    const char *keys[] = {"version", "truncation", "padding", "added_tokens", "normalizer",
                          "pre_tokenizer", "post_processor", "decoder", "model"};
    const cJSON *it = j->child;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++, it = it->next) {
        assert_non_null(it);
        assert_string_equal(it->string, keys[i]);
    }
    assert_null(it);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(j, "version")->valuestring, "1.0");
    assert_true(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(j, "truncation")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(j, "normalizer")));
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(j, "added_tokens");
    assert_int_equal(cJSON_GetArraySize(added), 1);
    const cJSON *at = cJSON_GetArrayItem(added, 0);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(at, "id")->valueint, 599);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(at, "content")->valuestring, "<|endoftext|>");
    assert_true(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(at, "single_word")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(at, "lstrip")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(at, "rstrip")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(at, "normalized")));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(at, "special")));
    struct { const char *key; int aps, trim; } bl[] = {{"pre_tokenizer", 0, 1}, {"post_processor", 1, 0}, {"decoder", 1, 1}};
    for (int i = 0; i < 3; i++) {
        const cJSON *o = cJSON_GetObjectItemCaseSensitive(j, bl[i].key);
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(o, "type")->valuestring, "ByteLevel");
        assert_int_equal(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "add_prefix_space")), bl[i].aps);
        assert_int_equal(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "trim_offsets")), bl[i].trim);
        assert_true(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "use_regex")));
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    const char *mkeys[] = {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                           "fuse_unk", "byte_fallback", "ignore_merges", "vocab", "merges"};
    it = model->child;
    for (size_t i = 0; i < sizeof mkeys / sizeof mkeys[0]; i++, it = it->next) {
        assert_non_null(it);
        assert_string_equal(it->string, mkeys[i]);
    }
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(model, "type")->valuestring, "BPE");
    assert_true(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(model, "dropout")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback")));
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab"), *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    assert_int_equal(cJSON_GetArraySize(vocab), 600);
    assert_int_equal(cJSON_GetArraySize(merges), 600 - 257);
    /* Well-known GPT-2 alphabet entries. */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\xa0")->valueint, ' ');   /* U+0120 */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\x8a")->valueint, '\n');  /* U+010A */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\x80")->valueint, 0);     /* U+0100 */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\xa1")->valueint, 0x7f);  /* U+0121 */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "\xc5\x83")->valueint, 0xad);  /* U+0143 */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "A")->valueint, 'A');
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "\xc3\xa9")->valueint, 0xe9);  /* printable Latin-1 maps to itself */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(vocab, "<|endoftext|>")->valueint, 599);
    /* Every merge "L R" names vocab tokens, and L+R has id 256 + rank. */
    int cp[256];
    byte_alphabet(cp);
    for (int m = 0; m < cJSON_GetArraySize(merges); m++) {
        const char *ms = cJSON_GetArrayItem(merges, m)->valuestring;
        const char *sp = strchr(ms, ' ');
        assert_non_null(sp);
        assert_null(strchr(sp + 1, ' '));
        char l[256], rr[256], both[512];
        snprintf(l, sizeof l, "%.*s", (int)(sp - ms), ms);
        snprintf(rr, sizeof rr, "%s", sp + 1);
        snprintf(both, sizeof both, "%s%s", l, rr);
        assert_non_null(cJSON_GetObjectItemCaseSensitive(vocab, l));
        assert_non_null(cJSON_GetObjectItemCaseSensitive(vocab, rr));
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(vocab, both);
        assert_non_null(id);
        assert_int_equal(id->valueint, 256 + m);
        /* ... and that string is the alphabet text of the token's bytes. */
        size_t tl;
        const unsigned char *tb = tokenizer_token_bytes(t, 256 + m, &tl);
        char want[512], *p = want;
        for (size_t k = 0; k < tl; k++) utf8_put(&p, cp[tb[k]]);
        *p = 0;
        assert_string_equal(both, want);
    }
    cJSON_Delete(j);

    /* Saving over an existing file replaces it whole, leaving no temp file. */
    assert_int_equal(tokenizer_save(u, path), 0);
    char out[4096];
    assert_int_equal(test_run(out, sizeof out, "ls -A '%s'", dir), 0);
    assert_string_equal(out, "tokenizer.json\n");
    /* A folder that does not exist: an error naming the path. */
    char bad[700];
    snprintf(bad, sizeof bad, "%s/no/such/tokenizer.json", dir);
    assert_int_equal(tokenizer_save(t, bad), -1);
    assert_non_null(strstr(tlm_last_error(), bad));

    /* The newer `tokenizers` merge form ["L", "R"] loads the same. */
    txt = test_read_file(path, &fl);
    j = cJSON_Parse(txt);
    free(txt);
    cJSON *ml = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "merges");
    cJSON *pairs = cJSON_CreateArray();
    for (int m = 0; m < cJSON_GetArraySize(ml); m++) {
        const char *ms = cJSON_GetArrayItem(ml, m)->valuestring, *sp = strchr(ms, ' ');
        char l[256];
        snprintf(l, sizeof l, "%.*s", (int)(sp - ms), ms);
        cJSON *pr = cJSON_CreateArray();
        cJSON_AddItemToArray(pr, cJSON_CreateString(l));
        cJSON_AddItemToArray(pr, cJSON_CreateString(sp + 1));
        cJSON_AddItemToArray(pairs, pr);
    }
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "merges", pairs);
    char p2[700];
    snprintf(p2, sizeof p2, "%s/pairs.json", dir);
    write_json(p2, j);
    cJSON_Delete(j);
    tlm_tokenizer *v = tokenizer_load(p2);
    assert_non_null(v);
    for (int m = 0; m < tokenizer_merge_count(t); m++) {
        int a1, b1, c1, a2, b2, c2;
        tokenizer_merge(t, m, &a1, &b1, &c1);
        tokenizer_merge(v, m, &a2, &b2, &c2);
        assert_true(a1 == a2 && b1 == b2 && c1 == c2);
    }
    tokenizer_free(v);
    tokenizer_free(u);
    tokenizer_free(t);
    test_rmtree(dir);
    free(dir);
}

/* Each broken file gives NULL and a one-line error naming the path and
 * what is wrong. */
static void expect_load_error(const char *path, const char *what) {
    tlm_tokenizer *t = tokenizer_load(path);
    const char *e = tlm_last_error();
    if (t || !strstr(e, path) || !strstr(e, what)) fprintf(stderr, "load %s: error \"%s\", wanted \"%s\"\n", path, e, what);
    assert_null(t);
    assert_non_null(strstr(e, path));
    assert_non_null(strstr(e, what));
    assert_null(strchr(e, '\n'));
}

static void test_load_errors(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char path[700];
    const char *merges[] = {"a b", "ab c"};

    snprintf(path, sizeof path, "%s/missing.json", dir);
    expect_load_error(path, "No such file");

    snprintf(path, sizeof path, "%s/notjson.json", dir);
    write_text(path, "{\"model\": {\"type\": \"BPE\", ");
    expect_load_error(path, "not valid JSON");
    write_text(path, "");
    expect_load_error(path, "not valid JSON");

    /* The good file loads (the edits below are what breaks it). */
    cJSON *j = make_json(merges, 2);
    snprintf(path, sizeof path, "%s/good.json", dir);
    write_json(path, j);
    tlm_tokenizer *t = tokenizer_load(path);
    assert_non_null(t);
    int32_t out[4];
    assert_int_equal(tokenizer_encode(t, "abc", 3, out, 4), 1);
    assert_int_equal(out[0], 257); /* ab 256, abc 257, eot 258 */
    tokenizer_free(t);
    cJSON_Delete(j);

    snprintf(path, sizeof path, "%s/bad.json", dir);
    /* Wrong model type. */
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "type", cJSON_CreateString("WordPiece"));
    write_json(path, j);
    expect_load_error(path, "model.type is \"WordPiece\"");
    cJSON_Delete(j);
    /* No model at all. */
    write_text(path, "{\"version\": \"1.0\"}");
    expect_load_error(path, "no \"model\"");
    /* Not byte-level. */
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "pre_tokenizer"), "type", cJSON_CreateString("Whitespace"));
    write_json(path, j);
    expect_load_error(path, "ByteLevel");
    cJSON_Delete(j);
    /* A merge naming an unknown token. */
    j = make_json(merges, 2);
    cJSON_ReplaceItemInArray(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "merges"), 1,
                             cJSON_CreateString("abq c"));
    write_json(path, j);
    expect_load_error(path, "unknown token \"abq\"");
    cJSON_Delete(j);
    /* A merge whose result is not in the vocab. */
    j = make_json(merges, 2);
    cJSON_AddItemToArray(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "merges"), cJSON_CreateString("q r"));
    write_json(path, j);
    expect_load_error(path, "not in the vocab");
    cJSON_Delete(j);
    /* A malformed merge entry. */
    j = make_json(merges, 2);
    cJSON_AddItemToArray(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "merges"), cJSON_CreateString("abc"));
    write_json(path, j);
    expect_load_error(path, "merge 2 is not");
    cJSON_Delete(j);
    /* An id out of range leaves a gap. */
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "ab",
                              cJSON_CreateNumber(5000));
    write_json(path, j);
    expect_load_error(path, "no token has id 256");
    cJSON_Delete(j);
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "ab",
                              cJSON_CreateNumber(-3));
    write_json(path, j);
    expect_load_error(path, "out of range");
    cJSON_Delete(j);
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "ab",
                              cJSON_CreateString("257"));
    write_json(path, j);
    expect_load_error(path, "out of range");
    cJSON_Delete(j);
    /* A duplicated id. */
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "abc",
                              cJSON_CreateNumber(256));
    write_json(path, j);
    expect_load_error(path, "id 256 is used twice");
    cJSON_Delete(j);
    /* No special token. */
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(j, "added_tokens", cJSON_CreateArray());
    write_json(path, j);
    expect_load_error(path, "<|endoftext|>");
    cJSON_Delete(j);
    /* A missing byte token. */
    j = make_json(merges, 2);
    cJSON_DeleteItemFromObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "z");
    write_json(path, j);
    expect_load_error(path, "no token has id 122");
    cJSON_Delete(j);
    /* Ids beyond any sensible vocab, or clashing with the special token. */
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "abc",
                              cJSON_CreateNumber(999999999));
    write_json(path, j);
    expect_load_error(path, "out of range");
    cJSON_Delete(j);
    j = make_json(merges, 2);
    cJSON_ReplaceItemInObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "abc",
                              cJSON_CreateNumber(258)); /* onto the special token's id */
    write_json(path, j);
    expect_load_error(path, "used twice");
    cJSON_Delete(j);
    /* A token outside the byte alphabet. */
    j = make_json(merges, 2);
    cJSON_DeleteItemFromObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "abc");
    cJSON_AddNumberToObject(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "model"), "vocab"), "a\xe2\x82\xac", 257);
    write_json(path, j);
    expect_load_error(path, "byte-level alphabet");
    cJSON_Delete(j);
    test_rmtree(dir);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pretokenize_splits),
        cmocka_unit_test(test_pretokenize_matches_hf),
        cmocka_unit_test(test_safe_cuts),
        cmocka_unit_test(test_train_hand_computed),
        cmocka_unit_test(test_train_matches_naive),
        cmocka_unit_test(test_train_deterministic),
        cmocka_unit_test(test_encode_rank_order),
        cmocka_unit_test(test_encode_matches_reference),
        cmocka_unit_test(test_roundtrip_bytes),
        cmocka_unit_test(test_encode_cap_and_decode),
        cmocka_unit_test(test_encode_many),
        cmocka_unit_test(test_save_load_json),
        cmocka_unit_test(test_load_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
