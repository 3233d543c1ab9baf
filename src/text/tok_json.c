/* tokenizer.json (Hugging Face `tokenizers` format, ByteLevel BPE): save and load. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "io/fileio.h"
#include "text/tok_internal.h"
#include "util/common.h"

/* GPT-2's byte alphabet: printable Latin-1 bytes ('!'..'~', 0xA1..0xAC,
 * 0xAE..0xFF) stand for themselves; the other 68 bytes, in increasing
 * order, take U+0100, U+0101, ... so every token is printable text. */
static int byte_is_printable(int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE); }

int tok_byte_cp(int b) {
    if (byte_is_printable(b)) return b;
    if (b <= 0x20) return 256 + b;                /* 0x00..0x20: 33 bytes */
    if (b >= 0x7F && b <= 0xA0) return 256 + 33 + (b - 0x7F);  /* 34 bytes */
    return 256 + 67;                              /* 0xAD */
}

static int cp_to_byte(uint32_t cp) {
    if (cp < 256) return byte_is_printable((int)cp) ? (int)cp : -1;
    uint32_t k = cp - 256;
    if (k < 33) return (int)k;
    if (k < 67) return (int)(0x7F + (k - 33));
    if (k == 67) return 0xAD;
    return -1;
}

/* Token bytes -> alphabet text (UTF-8; each byte becomes 1 or 2 bytes). */
static size_t bytes_to_text(const unsigned char *p, size_t n, char *out) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int cp = tok_byte_cp(p[i]);
        if (cp < 0x80) out[k++] = (char)cp;
        else {
            out[k++] = (char)(0xC0 | (cp >> 6));
            out[k++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    out[k] = 0;
    return k;
}

/* Alphabet text of length n -> bytes (at most n). -1 if a character is
 * not in the alphabet. */
static int text_to_bytes(const char *s, size_t n, unsigned char *out, size_t *len) {
    const unsigned char *u = (const unsigned char *)s;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        if (u[i] < 0x80) cp = u[i++];
        else if ((u[i] & 0xE0) == 0xC0 && i + 1 < n && (u[i + 1] & 0xC0) == 0x80) {
            cp = ((uint32_t)(u[i] & 0x1F) << 6) | (u[i + 1] & 0x3F);
            i += 2;
        } else return -1;  /* every alphabet character is below U+0800 */
        int b = cp_to_byte(cp);
        if (b < 0) return -1;
        out[k++] = (unsigned char)b;
    }
    *len = k;
    return 0;
}

/* ---- save ------------------------------------------------------------ */

static cJSON *byte_level(int add_prefix_space, int trim_offsets) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    int ok = cJSON_AddStringToObject(o, "type", "ByteLevel") && cJSON_AddBoolToObject(o, "add_prefix_space", add_prefix_space) &&
             cJSON_AddBoolToObject(o, "trim_offsets", trim_offsets) && cJSON_AddTrueToObject(o, "use_regex");
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

int tokenizer_save(const tlm_tokenizer *t, const char *path) {
    /* Key order and values follow what `tokenizers` writes for a ByteLevel
     * BPE, so the file is interchangeable with one it saved. */
    cJSON *root = cJSON_CreateObject();
    char *buf = malloc(2 * (size_t)t->tok_off[t->vocab] + 2 * 64 + 1);
    int ok = root && buf;
    ok = ok && cJSON_AddStringToObject(root, "version", "1.0") && cJSON_AddNullToObject(root, "truncation") &&
         cJSON_AddNullToObject(root, "padding");
    cJSON *added = ok ? cJSON_AddArrayToObject(root, "added_tokens") : NULL;
    ok = ok && added;
    for (int id = 0; ok && id < t->vocab; id++) {
        if (!t->is_special[id]) continue;
        size_t n;
        const unsigned char *p = tokenizer_token_bytes(t, id, &n);
        cJSON *a = cJSON_CreateObject();
        ok = a && cJSON_AddItemToArray(added, a);
        if (!ok) {
            cJSON_Delete(a);
            break;
        }
        memcpy(buf, p, n);
        buf[n] = 0;
        ok = cJSON_AddNumberToObject(a, "id", id) && cJSON_AddStringToObject(a, "content", buf) &&
             cJSON_AddFalseToObject(a, "single_word") && cJSON_AddFalseToObject(a, "lstrip") &&
             cJSON_AddFalseToObject(a, "rstrip") && cJSON_AddFalseToObject(a, "normalized") &&
             cJSON_AddTrueToObject(a, "special");
    }
    ok = ok && cJSON_AddNullToObject(root, "normalizer");
    cJSON *pre = ok ? byte_level(0, 1) : NULL, *post = ok ? byte_level(1, 0) : NULL, *dec = ok ? byte_level(1, 1) : NULL;
    if (ok && pre && post && dec) {
        cJSON_AddItemToObject(root, "pre_tokenizer", pre);
        cJSON_AddItemToObject(root, "post_processor", post);
        cJSON_AddItemToObject(root, "decoder", dec);
    } else {
        cJSON_Delete(pre);
        cJSON_Delete(post);
        cJSON_Delete(dec);
        ok = 0;
    }
    cJSON *model = ok ? cJSON_AddObjectToObject(root, "model") : NULL;
    ok = ok && model && cJSON_AddStringToObject(model, "type", "BPE") && cJSON_AddNullToObject(model, "dropout") &&
         cJSON_AddNullToObject(model, "unk_token") && cJSON_AddNullToObject(model, "continuing_subword_prefix") &&
         cJSON_AddNullToObject(model, "end_of_word_suffix") && cJSON_AddFalseToObject(model, "fuse_unk") &&
         cJSON_AddFalseToObject(model, "byte_fallback") && cJSON_AddFalseToObject(model, "ignore_merges");
    cJSON *vocab = ok ? cJSON_AddObjectToObject(model, "vocab") : NULL;
    ok = ok && vocab;
    for (int id = 0; ok && id < t->vocab; id++) {
        size_t n;
        const unsigned char *p = tokenizer_token_bytes(t, id, &n);
        if (t->is_special[id]) {
            memcpy(buf, p, n);
            buf[n] = 0;
        } else bytes_to_text(p, n, buf);
        ok = cJSON_AddNumberToObject(vocab, buf, id) != NULL;
    }
    cJSON *merges = ok ? cJSON_AddArrayToObject(model, "merges") : NULL;
    ok = ok && merges;
    for (int r = 0; ok && r < t->nmerges; r++) {
        size_t nl, nr;
        const unsigned char *l = tokenizer_token_bytes(t, t->merge_left[r], &nl);
        const unsigned char *rr = tokenizer_token_bytes(t, t->merge_right[r], &nr);
        size_t k = bytes_to_text(l, nl, buf);
        buf[k++] = ' ';
        bytes_to_text(rr, nr, buf + k);
        cJSON *s = cJSON_CreateString(buf);
        ok = s && cJSON_AddItemToArray(merges, s);
        if (!ok) cJSON_Delete(s);
    }
    char *txt = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    free(buf);
    if (!txt) return tlm_errorf("out of memory writing the tokenizer to %s", path);
    int rc = file_write_atomic(path, txt, strlen(txt));
    cJSON_free(txt);
    return rc;
}

/* ---- load ------------------------------------------------------------ */

#define LOAD_FIX "re-create it with `tinylm prepare` or use a byte-level BPE tokenizer.json"

static int is_int_id(const cJSON *v, int *out) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= 0 && d < (double)(1 << 24)) || d != (double)(int)d) return 0;
    *out = (int)d;
    return 1;
}

static int check_byte_level(const char *path, const cJSON *root, const char *key) {
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(root, key);
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(o, "type");
    if (!cJSON_IsObject(o) || !cJSON_IsString(ty) || strcmp(ty->valuestring, "ByteLevel") != 0)
        return tlm_errorf("tokenizer %s: \"%s\" is not {\"type\": \"ByteLevel\", ...}, so this is not a byte-level BPE: %s",
                          path, key, LOAD_FIX);
    if (!strcmp(key, "pre_tokenizer")) {
        const cJSON *aps = cJSON_GetObjectItemCaseSensitive(o, "add_prefix_space");
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(o, "use_regex");
        if (cJSON_IsTrue(aps)) return tlm_errorf("tokenizer %s: pre_tokenizer.add_prefix_space is true, which tinylm does not support: %s", path, LOAD_FIX);
        if (cJSON_IsFalse(re)) return tlm_errorf("tokenizer %s: pre_tokenizer.use_regex is false, which tinylm does not support: %s", path, LOAD_FIX);
    }
    return 0;
}

/* One merge entry, either "left right" or ["left", "right"]. */
static int merge_sides(const cJSON *m, const char **l, size_t *nl, const char **r, size_t *nr) {
    if (cJSON_IsString(m)) {
        const char *s = m->valuestring, *sp = strchr(s, ' ');
        if (!sp || sp == s || !sp[1] || strchr(sp + 1, ' ')) return -1;
        *l = s;
        *nl = (size_t)(sp - s);
        *r = sp + 1;
        *nr = strlen(sp + 1);
        return 0;
    }
    if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2) {
        const cJSON *a = m->child, *b = a->next;
        if (!cJSON_IsString(a) || !cJSON_IsString(b) || !a->valuestring[0] || !b->valuestring[0]) return -1;
        *l = a->valuestring;
        *nl = strlen(a->valuestring);
        *r = b->valuestring;
        *nr = strlen(b->valuestring);
        return 0;
    }
    return -1;
}

tlm_tokenizer *tokenizer_load(const char *path) {
    size_t flen;
    char *text = file_read_all(path, &flen);
    if (!text) return NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, flen, &end, 0);
    if (!root) {
        size_t at = end && end >= text ? (size_t)(end - text) : 0;
        free(text);
        tlm_errorf("tokenizer %s is not valid JSON (error near byte %zu): %s", path, at, LOAD_FIX);
        return NULL;
    }
    free(text);

    tlm_tokenizer *t = calloc(1, sizeof *t);
    const char **slot = NULL;  /* id -> token text (alphabet text, or raw for specials) */
    unsigned char *tmp = NULL;
    bmap ids;
    memset(&ids, 0, sizeof ids);
    if (!t) {
        tlm_errorf("out of memory loading %s", path);
        goto fail;
    }
#define FAIL(...)                  \
    do {                           \
        tlm_errorf(__VA_ARGS__);   \
        goto fail;                 \
    } while (0)
    if (!cJSON_IsObject(root)) FAIL("tokenizer %s is JSON but not an object: %s", path, LOAD_FIX);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) FAIL("tokenizer %s has no \"model\" object: %s", path, LOAD_FIX);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "BPE") != 0)
        FAIL("tokenizer %s: model.type is %s%s%s, not \"BPE\": %s", path, cJSON_IsString(type) ? "\"" : "",
             cJSON_IsString(type) ? type->valuestring : "missing", cJSON_IsString(type) ? "\"" : "", LOAD_FIX);
    if (check_byte_level(path, root, "pre_tokenizer")) goto fail;
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (!cJSON_IsObject(vocab)) FAIL("tokenizer %s has no model.vocab object: %s", path, LOAD_FIX);
    if (!cJSON_IsArray(merges)) FAIL("tokenizer %s has no model.merges array: %s", path, LOAD_FIX);
    if (added && !cJSON_IsArray(added) && !cJSON_IsNull(added)) FAIL("tokenizer %s: added_tokens is not an array: %s", path, LOAD_FIX);

    /* Ids: integers that together cover 0..V-1 exactly once. */
    int maxid = -1, id;
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab) {
        if (!is_int_id(it, &id))
            FAIL("tokenizer %s: vocab token \"%s\" has id %s, which is out of range (ids are integers 0..16777215): %s",
                 path, it->string, cJSON_IsNumber(it) ? "outside 0..16777215 or fractional" : "that is not a number",
                 LOAD_FIX);
        if (id > maxid) maxid = id;
    }
    cJSON_ArrayForEach(it, added) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsString(c) || !c->valuestring[0] || !is_int_id(cJSON_GetObjectItemCaseSensitive(it, "id"), &id))
            FAIL("tokenizer %s: an added_tokens entry lacks a string \"content\" or an integer \"id\" in range: %s", path, LOAD_FIX);
        if (id > maxid) maxid = id;
    }
    if (maxid < 0) FAIL("tokenizer %s has an empty vocab: %s", path, LOAD_FIX);
    int V = maxid + 1;
    slot = calloc((size_t)V, sizeof *slot);
    t->is_special = calloc((size_t)V, 1);
    t->tok_off = calloc((size_t)V + 1, sizeof *t->tok_off);
    if (!slot || !t->is_special || !t->tok_off) FAIL("out of memory loading %s", path);
    t->vocab = V;
    cJSON_ArrayForEach(it, vocab) {
        is_int_id(it, &id);
        if (slot[id]) FAIL("tokenizer %s: id %d is used twice (\"%s\" and \"%s\"): %s", path, id, slot[id], it->string, LOAD_FIX);
        slot[id] = it->string;
    }
    t->eot = -1;
    cJSON_ArrayForEach(it, added) {
        const char *c = cJSON_GetObjectItemCaseSensitive(it, "content")->valuestring;
        is_int_id(cJSON_GetObjectItemCaseSensitive(it, "id"), &id);
        /* `tokenizers` may list a special token in the vocab as well: fine
         * if it is the same token. */
        if (slot[id] && (t->is_special[id] || strcmp(slot[id], c) != 0))
            FAIL("tokenizer %s: id %d is used twice (\"%s\" and added token \"%s\"): %s", path, id, slot[id], c, LOAD_FIX);
        slot[id] = c;
        t->is_special[id] = 1;
        if (!strcmp(c, TLM_EOT_TEXT)) t->eot = id;
    }
    for (int i = 0; i < V; i++)
        if (!slot[i])
            FAIL("tokenizer %s: ids must run 0..%d without gaps, but no token has id %d (an id is out of range or missing): %s",
                 path, V - 1, i, LOAD_FIX);
    if (t->eot < 0)
        FAIL("tokenizer %s has no special token %s in added_tokens: %s", path, TLM_EOT_TEXT, LOAD_FIX);

    /* Token bytes, and bytes -> id for resolving merges. */
    size_t total = 0;
    for (int i = 0; i < V; i++) total += strlen(slot[i]);
    t->tok_bytes = malloc(total + 1);
    tmp = malloc(total + 2);
    if (!t->tok_bytes || !tmp || bmap_init(&ids, (size_t)V)) FAIL("out of memory loading %s", path);
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    size_t off = 0;
    for (int i = 0; i < V; i++) {
        size_t sl = strlen(slot[i]), n;
        t->tok_off[i] = off;
        if (t->is_special[i]) {
            memcpy(t->tok_bytes + off, slot[i], sl);
            off += sl;
            continue;
        }
        if (text_to_bytes(slot[i], sl, t->tok_bytes + off, &n) || n == 0)
            FAIL("tokenizer %s: vocab token \"%s\" (id %d) is not in the GPT-2 byte-level alphabet: %s", path, slot[i], i, LOAD_FIX);
        int isnew;
        bmap_entry *e = bmap_upsert(&ids, t->tok_bytes + off, n, tok_hash_bytes(t->tok_bytes + off, n), &isnew);
        if (!e) FAIL("out of memory loading %s", path);
        if (!isnew) FAIL("tokenizer %s: tokens %d and %d are the same string \"%s\": %s", path, (int)e->val, i, slot[i], LOAD_FIX);
        e->val = i;
        if (n == 1) t->byte_id[t->tok_bytes[off]] = i;
        off += n;
    }
    t->tok_off[V] = off;
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) {
            char s[4];
            bytes_to_text((const unsigned char[]){(unsigned char)b}, 1, s);
            FAIL("tokenizer %s: the vocab lacks the single-byte token \"%s\" (byte 0x%02X), so some text cannot be encoded: %s",
                 path, s, b, LOAD_FIX);
        }

    int nm = cJSON_GetArraySize(merges);
    t->nmerges = nm;
    t->merge_left = malloc(((size_t)nm + 1) * sizeof(int32_t));
    t->merge_right = malloc(((size_t)nm + 1) * sizeof(int32_t));
    t->merge_result = malloc(((size_t)nm + 1) * sizeof(int32_t));
    if (!t->merge_left || !t->merge_right || !t->merge_result) FAIL("out of memory loading %s", path);
    int r = 0;
    cJSON_ArrayForEach(it, merges) {
        const char *ls, *rs;
        size_t nl, nr, bl, br;
        if (merge_sides(it, &ls, &nl, &rs, &nr))
            FAIL("tokenizer %s: merge %d is not \"left right\" or [\"left\", \"right\"]: %s", path, r, LOAD_FIX);
        const bmap_entry *el = NULL, *er = NULL, *eo;
        /* tmp holds total+2 bytes; longer sides cannot name a token anyway. */
        if (nl + nr <= total && !text_to_bytes(ls, nl, tmp, &bl)) el = bmap_find(&ids, tmp, bl, tok_hash_bytes(tmp, bl));
        if (el && !text_to_bytes(rs, nr, tmp + bl, &br)) er = bmap_find(&ids, tmp + bl, br, tok_hash_bytes(tmp + bl, br));
        if (!el || !er)
            FAIL("tokenizer %s: merge %d (\"%.*s %.*s\") refers to unknown token \"%.*s\": %s", path, r, (int)nl, ls, (int)nr, rs,
                 !el ? (int)nl : (int)nr, !el ? ls : rs, LOAD_FIX);
        /* tmp holds the left then the right bytes: their concatenation. */
        eo = bmap_find(&ids, tmp, bl + br, tok_hash_bytes(tmp, bl + br));
        if (!eo)
            FAIL("tokenizer %s: merge %d (\"%.*s %.*s\") makes a token that is not in the vocab: %s", path, r, (int)nl, ls,
                 (int)nr, rs, LOAD_FIX);
        t->merge_left[r] = (int32_t)el->val;
        t->merge_right[r] = (int32_t)er->val;
        t->merge_result[r] = (int32_t)eo->val;
        r++;
    }
#undef FAIL
    if (tok_finish(t)) goto fail;
    bmap_free(&ids);
    free(tmp);
    free(slot);
    cJSON_Delete(root);
    return t;
fail:
    bmap_free(&ids);
    free(tmp);
    free(slot);
    cJSON_Delete(root);
    tokenizer_free(t);
    return NULL;
}
