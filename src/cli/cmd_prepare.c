/*
 * tinylm prepare: corpus -> byte-level BPE tokenizer + token files.
 *
 * Documents are the .txt files of a folder (sorted by name), or the pieces of
 * a single file separated by lines that hold only "<|endoftext|>". Validation
 * holds out whole documents (a seeded choice of about --val-fraction of
 * them); a single-document corpus holds out its tail instead, cut at a line
 * break. The tokenizer is trained on the training documents only, so the
 * validation loss measures text the tokenizer never saw either.
 */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <omp.h>

#include "cli/cli.h"
#include "data/tokfile.h"
#include "io/fileio.h"
#include "text/tokenizer.h"
#include "util/common.h"

#define CMD "prepare"

typedef struct {
    char *text;      /* owned by the file buffer it points into */
    size_t len;
    const char *source;
} doc_t;

typedef struct {
    char **paths;
    char **bufs;
    size_t *lens;
    int n;
} corpus_files;

static void prepare_usage(FILE *f) {
    fprintf(f,
            "usage: tinylm prepare --input PATH --out DIR [flags]\n"
            "\n"
            "Train a byte-level BPE tokenizer on a corpus and write token files.\n"
            "\n"
            "  --input PATH          a UTF-8 text file, or a folder of .txt files (one document each);\n"
            "                        in a single file, lines holding only <|endoftext|> separate documents\n"
            "  --out DIR             output folder: tokenizer.json, train.bin, val.bin, meta.json\n"
            "  --vocab N             vocabulary size incl. 256 bytes and <|endoftext|> (default 2560)\n"
            "  --val-fraction F      share of documents held out for validation (default 0.01; 0 = none)\n"
            "  --seed S              seed of the validation split (default 1337)\n"
            "  --threads N           encoding threads (default: all cores)\n");
}

/* Reject what would silently train a useless tokenizer: binary data (NUL
 * bytes) and text that is not UTF-8. Returns the offset of the first bad
 * byte, or -1 if the buffer is clean. */
static long find_bad_utf8(const unsigned char *s, size_t n, int *is_nul) {
    size_t i = 0;
    *is_nul = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c == 0) { *is_nul = 1; return (long)i; }
        if (c < 0x80) { i++; continue; }
        int need;
        unsigned min;
        if (c >= 0xC2 && c <= 0xDF) { need = 1; min = 0x80; }
        else if (c >= 0xE0 && c <= 0xEF) { need = 2; min = 0x800; }
        else if (c >= 0xF0 && c <= 0xF4) { need = 3; min = 0x10000; }
        else return (long)i;
        unsigned cp = c & (0x3F >> need);
        for (int k = 1; k <= need; k++) {
            if (i + (size_t)k >= n || (s[i + k] & 0xC0) != 0x80) return (long)i;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return (long)i;
        i += (size_t)need + 1;
    }
    return -1;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int list_inputs(const char *input, corpus_files *cf) {
    memset(cf, 0, sizeof *cf);
    struct stat st;
    if (stat(input, &st) != 0) return tlm_errorf("--input %s does not exist: give a text file or a folder of .txt files", input);
    if (S_ISREG(st.st_mode)) {
        cf->paths = malloc(sizeof(char *));
        cf->paths[0] = strdup(input);
        cf->n = 1;
        return 0;
    }
    if (!S_ISDIR(st.st_mode)) return tlm_errorf("--input %s is neither a file nor a folder", input);
    DIR *d = opendir(input);
    if (!d) return tlm_errorf("--input %s: cannot open the folder", input);
    int cap = 64;
    cf->paths = malloc((size_t)cap * sizeof(char *));
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 5 || strcmp(e->d_name + l - 4, ".txt") != 0 || e->d_name[0] == '.') continue;
        char p[2048];
        path_join(p, sizeof p, input, e->d_name);
        if (stat(p, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        if (cf->n == cap) cf->paths = realloc(cf->paths, (size_t)(cap *= 2) * sizeof(char *));
        cf->paths[cf->n++] = strdup(p);
    }
    closedir(d);
    if (cf->n == 0) return tlm_errorf("--input %s holds no .txt files: put the corpus in .txt files or pass one file", input);
    qsort(cf->paths, (size_t)cf->n, sizeof(char *), cmp_str);
    return 0;
}

static void free_inputs(corpus_files *cf) {
    for (int i = 0; i < cf->n; i++) {
        free(cf->paths[i]);
        if (cf->bufs) free(cf->bufs[i]);
    }
    free(cf->paths);
    free(cf->bufs);
    free(cf->lens);
}

/* Split one file's text at lines holding only <|endoftext|>; appends docs. */
static void split_docs(char *buf, size_t len, const char *source, doc_t **docs, size_t *n, size_t *cap) {
    const char *sep = TLM_EOT_TEXT;
    size_t sl = strlen(sep);
    size_t start = 0, i = 0;
    while (i <= len) {
        size_t line_end = i;
        while (line_end < len && buf[line_end] != '\n') line_end++;
        size_t ll = line_end - i;
        if (ll >= 1 && buf[line_end - 1] == '\r') ll--;
        int is_sep = (ll == sl && !memcmp(buf + i, sep, sl));
        if (is_sep || line_end >= len) {
            size_t end = is_sep ? i : len;
            /* Trim one trailing newline so documents do not end in blank noise. */
            size_t dl = end - start;
            if (dl > 0) {
                if (*n == *cap) *docs = realloc(*docs, (*cap *= 2) * sizeof(doc_t));
                (*docs)[(*n)++] = (doc_t){buf + start, dl, source};
            }
            start = line_end + 1;
        }
        if (line_end >= len) break;
        i = line_end + 1;
    }
}

static void on_progress(void *user, const char *stage, double done, double total) {
    double *t0 = user;
    if (!isatty(STDERR_FILENO) && done < total) return;
    fprintf(stderr, "\r  %-14s %5.1f%%  %6.1fs", stage, total > 0 ? 100.0 * done / total : 100.0, tlm_now() - *t0);
    if (done >= total) fputc('\n', stderr);
    fflush(stderr);
}

/* Encode documents in parallel; each is followed by the end-of-text token. */
static int32_t *encode_docs(const tlm_tokenizer *tok, doc_t *docs, const int *which, int nwhich, uint64_t *ntok) {
    size_t *counts = calloc((size_t)nwhich + 1, sizeof(size_t));
    int32_t **parts = calloc((size_t)nwhich, sizeof(int32_t *));
    int eot = tokenizer_eot_id(tok);
#pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < nwhich; k++) {
        const doc_t *d = &docs[which[k]];
        /* Byte-level BPE never yields more tokens than bytes. */
        parts[k] = malloc((d->len + 1) * sizeof(int32_t));
        counts[k] = tokenizer_encode(tok, d->text, d->len, parts[k], d->len);
        parts[k][counts[k]++] = eot;
    }
    uint64_t total = 0;
    for (int k = 0; k < nwhich; k++) total += counts[k];
    int32_t *all = malloc((total ? total : 1) * sizeof(int32_t));
    uint64_t off = 0;
    for (int k = 0; k < nwhich; k++) {
        memcpy(all + off, parts[k], counts[k] * sizeof(int32_t));
        off += counts[k];
        free(parts[k]);
    }
    free(parts);
    free(counts);
    *ntok = total;
    return all;
}

int cmd_prepare(int argc, char **argv) {
    const char *input = NULL, *out = NULL;
    long vocab = 2560, seed = 1337, threads = 0;
    double val_frac = 0.01;
    const cli_flag flags[] = {
        CLI_FLAG_STRING("--input", &input, NULL),
        CLI_FLAG_STRING("--out", &out, NULL),
        CLI_FLAG_LONG("--vocab", &vocab, NULL, 257, 1 << 20),
        CLI_FLAG_DOUBLE("--val-fraction", &val_frac, NULL, 0, 0.5),
        CLI_FLAG_LONG("--seed", &seed, NULL, 0, 0x7fffffffL),
        CLI_FLAG_LONG("--threads", &threads, NULL, 0, 4096),
    };
    int pr = cli_parse_flags(CMD, argc, argv, flags, CLI_NFLAGS(flags), prepare_usage);
    if (pr != CLI_PARSE_OK) return pr == CLI_PARSE_HELP ? 0 : CLI_EXIT_USAGE;
    if (!input) return cli_fail(CMD, "--input is required: a text file or a folder of .txt files");
    if (!out) return cli_fail(CMD, "--out is required: the folder to write tokenizer.json and token files to");
    if (threads > 0) omp_set_num_threads((int)threads);

    double t0 = tlm_now();
    corpus_files cf;
    if (list_inputs(input, &cf)) { free_inputs(&cf); return cli_fail(CMD, tlm_last_error()); }
    cf.bufs = calloc((size_t)cf.n, sizeof(char *));
    cf.lens = calloc((size_t)cf.n, sizeof(size_t));
    size_t total_bytes = 0;
    size_t cap = 256, ndocs = 0;
    doc_t *docs = malloc(cap * sizeof(doc_t));
    int rc = 1;
    for (int i = 0; i < cf.n; i++) {
        cf.bufs[i] = file_read_all(cf.paths[i], &cf.lens[i]);
        if (!cf.bufs[i]) { cli_fail(CMD, tlm_last_error()); goto done; }
        int is_nul;
        long bad = find_bad_utf8((const unsigned char *)cf.bufs[i], cf.lens[i], &is_nul);
        if (bad >= 0) {
            char msg[1400];
            if (is_nul)
                snprintf(msg, sizeof msg, "%s looks binary (NUL byte at offset %ld): pass text files only", cf.paths[i], bad);
            else
                snprintf(msg, sizeof msg,
                         "%s is not valid UTF-8 (bad byte at offset %ld): convert it first, e.g. iconv -f latin1 -t utf-8", cf.paths[i], bad);
            cli_fail(CMD, msg);
            goto done;
        }
        total_bytes += cf.lens[i];
        if (cf.n > 1) {
            if (cf.lens[i] > 0) {
                if (ndocs == cap) docs = realloc(docs, (cap *= 2) * sizeof(doc_t));
                docs[ndocs++] = (doc_t){cf.bufs[i], cf.lens[i], cf.paths[i]};
            }
        } else {
            split_docs(cf.bufs[i], cf.lens[i], cf.paths[i], &docs, &ndocs, &cap);
        }
    }
    size_t nonspace = 0;
    for (size_t d = 0; d < ndocs; d++)
        for (size_t k = 0; k < docs[d].len && !nonspace; k++)
            if (docs[d].text[k] != ' ' && docs[d].text[k] != '\n' && docs[d].text[k] != '\t' && docs[d].text[k] != '\r') nonspace = 1;
    if (ndocs == 0 || !nonspace) {
        char msg[1200];
        snprintf(msg, sizeof msg, "--input %s holds no text: give a non-empty UTF-8 corpus", input);
        cli_fail(CMD, msg);
        goto done;
    }

    /* Fail on an unusable output folder before the long work, not after. */
    if (dir_create(out)) { cli_fail(CMD, tlm_last_error()); goto done; }

    /* Validation split. */
    int *is_val = calloc(ndocs, sizeof(int));
    size_t nval = 0;
    if (val_frac > 0 && ndocs >= 2) {
        nval = (size_t)llround(val_frac * (double)ndocs);
        if (nval < 1) nval = 1;
        if (nval > ndocs - 1) nval = ndocs - 1;
        size_t *perm = malloc(ndocs * sizeof(size_t));
        for (size_t i = 0; i < ndocs; i++) perm[i] = i;
        tlm_rng rng;
        tlm_rng_seed(&rng, (uint64_t)seed);
        for (size_t i = ndocs - 1; i > 0; i--) {
            size_t j = (size_t)tlm_rng_below(&rng, i + 1);
            size_t t = perm[i]; perm[i] = perm[j]; perm[j] = t;
        }
        for (size_t i = 0; i < nval; i++) is_val[perm[i]] = 1;
        free(perm);
    } else if (val_frac > 0) {
        /* One document: hold out its tail, cut after a line break. */
        doc_t *d = &docs[0];
        size_t cut = (size_t)((1.0 - val_frac) * (double)d->len);
        while (cut < d->len && d->text[cut - 1] != '\n') cut++;
        if (cut > 0 && cut < d->len) {
            if (ndocs == cap) {
                docs = realloc(docs, (cap *= 2) * sizeof(doc_t));
                d = &docs[0]; /* the old block is gone */
            }
            docs[1] = (doc_t){d->text + cut, d->len - cut, d->source};
            d->len = cut;
            ndocs = 2;
            is_val = realloc(is_val, 2 * sizeof(int));
            is_val[0] = 0;
            is_val[1] = 1;
            nval = 1;
        }
    }
    int *train_idx = malloc(ndocs * sizeof(int)), *val_idx = malloc((nval + 1) * sizeof(int));
    int ntrain = 0, nv = 0;
    size_t train_bytes = 0;
    for (size_t i = 0; i < ndocs; i++) {
        if (is_val[i]) val_idx[nv++] = (int)i;
        else { train_idx[ntrain++] = (int)i; train_bytes += docs[i].len; }
    }
    char b1[32];
    printf("prepare: %zu documents from %d file%s, %s (%d held out for validation)\n", ndocs, cf.n, cf.n == 1 ? "" : "s",
           tlm_fmt_bytes((double)total_bytes, b1, sizeof b1), nv);
    fflush(stdout);

    /* Tokenizer on the training documents only. */
    const char **dtext = malloc((size_t)ntrain * sizeof(char *));
    size_t *dlen = malloc((size_t)ntrain * sizeof(size_t));
    for (int k = 0; k < ntrain; k++) { dtext[k] = docs[train_idx[k]].text; dlen[k] = docs[train_idx[k]].len; }
    double t_tok = tlm_now();
    tlm_tokenizer *tok = tokenizer_train(dtext, dlen, (size_t)ntrain, (int)vocab, on_progress, &t_tok);
    free(dtext);
    free(dlen);
    if (!tok) { cli_fail(CMD, tlm_last_error()); goto done2; }
    t_tok = tlm_now() - t_tok;
    printf("tokenizer: vocab %d trained in %.2fs (%.1f MB/s)\n", tokenizer_vocab_size(tok), t_tok,
           (double)train_bytes / 1e6 / (t_tok > 0 ? t_tok : 1e-9));

    double t_enc = tlm_now();
    uint64_t ntr, nva;
    int32_t *tr = encode_docs(tok, docs, train_idx, ntrain, &ntr);
    int32_t *va = encode_docs(tok, docs, val_idx, nv, &nva);
    t_enc = tlm_now() - t_enc;
    printf("encode: %llu tokens in %.2fs (%.1f MB/s), %.2f bytes/token; train %llu tokens, val %llu tokens\n",
           (unsigned long long)(ntr + nva), t_enc, (double)total_bytes / 1e6 / (t_enc > 0 ? t_enc : 1e-9),
           (double)total_bytes / (double)(ntr + nva ? ntr + nva : 1), (unsigned long long)ntr, (unsigned long long)nva);

    char p[2048];
    if (tokenizer_save(tok, path_join(p, sizeof p, out, "tokenizer.json")) ||
        tokfile_write(path_join(p, sizeof p, out, "train.bin"), tr, ntr, (int)vocab, (uint64_t)ntrain) ||
        tokfile_write(path_join(p, sizeof p, out, "val.bin"), va, nva, (int)vocab, (uint64_t)nv)) {
        cli_fail(CMD, tlm_last_error());
        goto done3;
    }
    {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "tinylm_version", TLM_VERSION_STRING);
        cJSON_AddStringToObject(m, "input", input);
        cJSON_AddNumberToObject(m, "vocab_size", (double)vocab);
        cJSON_AddNumberToObject(m, "eot_id", tokenizer_eot_id(tok));
        cJSON_AddNumberToObject(m, "seed", (double)seed);
        cJSON_AddNumberToObject(m, "val_fraction", val_frac);
        cJSON_AddNumberToObject(m, "documents", (double)ndocs);
        cJSON_AddNumberToObject(m, "bytes", (double)total_bytes);
        cJSON_AddNumberToObject(m, "train_documents", ntrain);
        cJSON_AddNumberToObject(m, "val_documents", nv);
        cJSON_AddNumberToObject(m, "train_tokens", (double)ntr);
        cJSON_AddNumberToObject(m, "val_tokens", (double)nva);
        cJSON_AddNumberToObject(m, "tokenizer_seconds", t_tok);
        cJSON_AddNumberToObject(m, "encode_seconds", t_enc);
        cJSON *vs = cJSON_AddArrayToObject(m, "val_sources");
        for (int k = 0; k < nv; k++) cJSON_AddItemToArray(vs, cJSON_CreateString(docs[val_idx[k]].source));
        char *js = cJSON_Print(m);
        cJSON_Delete(m);
        int bad = file_write_atomic(path_join(p, sizeof p, out, "meta.json"), js, strlen(js));
        free(js);
        if (bad) { cli_fail(CMD, tlm_last_error()); goto done3; }
    }
    printf("prepare: wrote %s/{tokenizer.json,train.bin,val.bin,meta.json} in %.1fs\n", out, tlm_now() - t0);
    rc = 0;
done3:
    free(tr);
    free(va);
    tokenizer_free(tok);
done2:
    free(train_idx);
    free(val_idx);
    free(is_val);
done:
    free(docs);
    free_inputs(&cf);
    return rc;
}
