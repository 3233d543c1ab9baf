/* The measurements behind `tinylm bench` (see bench_run.h for the FLOP count). */
#include "cli/bench_run.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <omp.h>

#include "infer/infer.h"
#include "io/fileio.h"
#include "text/tokenizer.h"
#include "train/train.h"
#include "util/common.h"

/* ---- FLOP counting ---------------------------------------------------------- */

size_t bench_matmul_params(const tlm_config *c) {
    const size_t D = (size_t)c->dim, F = (size_t)c->hidden, L = (size_t)c->layers, V = (size_t)c->vocab;
    return L * (4 * D * D + 3 * D * F) + V * D;
}

double bench_train_flops_per_token(const tlm_config *c, int T) {
    return 6.0 * (double)bench_matmul_params(c) + 6.0 * c->layers * (double)c->dim * ((double)T + 1.0);
}

/* ---- training ---------------------------------------------------------------- */

void bench_random_tokens(int32_t *out, int n, int V, uint64_t seed) {
    tlm_rng rng;
    tlm_rng_seed(&rng, seed);
    /* V-1 is the end-of-text id: a benchmark prompt should look like text. */
    uint64_t range = V > 1 ? (uint64_t)(V - 1) : 1;
    for (int i = 0; i < n; i++) out[i] = (int32_t)tlm_rng_below(&rng, range);
}

/* What a training benchmark trains: a random-init model with its training
 * buffers for B x T, AdamW, and room on the device (and the host) for the
 * loss and squared gradient norm of nsteps steps. */
typedef struct {
    tlm_model m;
    tlm_adamw adam;
    int have_model, have_adam;
    float *stats_dev, *stats; /* [2 * nsteps] */
} bench_trainee;

static int bench_trainee_open(bench_trainee *t, tlm_ops *ops, const tlm_config *cfg, int B, int T, uint64_t seed,
                              int nsteps) {
    memset(t, 0, sizeof *t);
    if (model_create(&t->m, cfg, ops)) return -1;
    t->have_model = 1;
    model_init_random(&t->m, seed);
    if (model_alloc_train(&t->m, B, T)) return -1;
    if (adamw_create(&t->adam, ops, t->m.nparams)) return -1;
    t->have_adam = 1;
    t->stats_dev = ops->alloc(ops, (size_t)2 * nsteps * sizeof(float));
    t->stats = malloc((size_t)2 * nsteps * sizeof(float));
    if (!t->stats_dev || !t->stats)
        return tlm_errorf("out of memory for the benchmark's %d step statistics", nsteps);
    return 0;
}

/* Read the statistics of nsteps steps back; -1 + error if one is not finite. */
static int bench_trainee_check(bench_trainee *t, tlm_ops *ops, int nsteps) {
    if (ops_status(ops)) return -1;
    ops->copy_d2h(ops, t->stats, t->stats_dev, (size_t)2 * nsteps * sizeof(float));
    for (int s = 0; s < nsteps; s++)
        if (!isfinite(t->stats[2 * s]) || !isfinite(t->stats[2 * s + 1]))
            return tlm_errorf("bench: training step %d gave a non-finite loss or gradient", s + 1);
    return 0;
}

static void bench_trainee_close(bench_trainee *t, tlm_ops *ops) {
    if (t->stats_dev) ops->free(ops, t->stats_dev);
    free(t->stats);
    if (t->have_adam) adamw_destroy(&t->adam, ops);
    if (t->have_model) model_destroy(&t->m);
    memset(t, 0, sizeof *t);
}

int bench_train(tlm_ops *ops, const tlm_config *cfg, const bench_train_opts *o, bench_train_result *r) {
    memset(r, 0, sizeof *r);
    const int B = o->batch, T = cfg->context;
    if (B < 1 || o->steps < 1 || o->warmup_steps < 0) return tlm_errorf("bench: --batch and --steps must be positive");
    /* As the trainer does: each step's loss and squared gradient norm stay
     * on the device, stats[2*s] and stats[2*s+1], and are read once after
     * the timed steps, so a GPU is never made to wait inside the loop. The
     * batch is staged once: model_step reuses the latest staged batch. */
    const int nsteps = o->warmup_steps + o->steps;
    bench_trainee tr;
    int rc = -1;
    int64_t ticket = -1;
    size_t n = (size_t)B * (size_t)T;
    int32_t *in = malloc(n * sizeof *in), *tg = malloc(n * sizeof *tg);
    memset(&tr, 0, sizeof tr);
    if (!in || !tg) {
        tlm_errorf("out of memory for a batch of %d x %d tokens: use a smaller --batch", B, T);
        goto out;
    }
    if (bench_trainee_open(&tr, ops, cfg, B, T, o->seed, nsteps)) goto out;
    /* Random tokens: the work per step does not depend on their values, and
     * a random model's loss on them is about ln V (a check of the run). */
    bench_random_tokens(in, (int)n, cfg->vocab, o->seed ^ 0x5eedULL);
    bench_random_tokens(tg, (int)n, cfg->vocab, o->seed ^ 0x7a56e7ULL);

    const float grad_scale = 1.0f / (float)n;
    if ((ticket = model_stage(&tr.m, in, tg, B, T)) < 0) goto out;
    double t0 = 0;
    for (int s = 0; s < nsteps; s++) {
        if (s == o->warmup_steps) {
            ops->sync(ops);
            t0 = tlm_now();
        }
        model_zero_grad(&tr.m);
        if (model_step(&tr.m, grad_scale, tr.stats_dev + 2 * s)) goto out;
        adamw_grad_norm_async(&tr.adam, &tr.m, tr.stats_dev + 2 * s + 1);
        /* Constant learning rate: the schedule costs nothing measurable. */
        adamw_update(&tr.adam, &tr.m, 1e-3, 0.1, 1.0, s + 1);
    }
    ops->sync(ops);
    r->seconds = tlm_now() - t0;
    if (bench_trainee_check(&tr, ops, nsteps)) goto out;
    r->loss_first = tr.stats[0];
    r->loss_last = tr.stats[2 * (nsteps - 1)];
    r->tokens = (long long)n * o->steps;
    r->tokens_per_s = r->seconds > 0 ? (double)r->tokens / r->seconds : 0;
    r->flops_per_token = bench_train_flops_per_token(cfg, T);
    r->gflops = r->flops_per_token * r->tokens_per_s / 1e9;
    if (ops->mem_usage) {
        size_t peak = 0;
        ops->mem_usage(ops, NULL, &peak);
        r->device_peak_bytes = (long long)peak;
    }
    rc = 0;
out:
    if (ticket > 0) model_stage_done(&tr.m, ticket, 1); /* the copy may still read in, tg */
    bench_trainee_close(&tr, ops);
    free(in);
    free(tg);
    return rc;
}

/* ---- the data pipeline's cost ---------------------------------------------------- */

/* One training step as the trainer runs it; with a feed, its batch comes
 * from the loader first, else the last staged batch is used again. */
static int bench_loader_step(tlm_model *m, tlm_adamw *adam, tlm_feed *feed, int B, int T, float grad_scale,
                             float *stats, int t) {
    model_zero_grad(m);
    if (feed && feed_next(feed, B, T)) return -1;
    if (model_step(m, grad_scale, stats)) return -1;
    adamw_grad_norm_async(adam, m, stats + 1);
    adamw_update(adam, m, 1e-3, 0.1, 1.0, t);
    return 0;
}

int bench_loader(tlm_ops *ops, const tlm_config *cfg, const bench_loader_opts *o, bench_loader_result *r) {
    memset(r, 0, sizeof *r);
    const int B = o->batch, T = cfg->context;
    if (B < 1 || o->steps < 1 || o->rounds < 1 || o->warmup_steps < 0)
        return tlm_errorf("bench: --batch, --steps and --loader-rounds must be positive");
    tlm_tokfile syn;
    memset(&syn, 0, sizeof syn);
    const tlm_tokfile *data = o->data;
    if (data && data->vocab > cfg->vocab)
        return tlm_errorf("the --data tokens have vocabulary %d but the model %d: use --vocab %d", data->vocab,
                          cfg->vocab, data->vocab);
    if (!data) {
        /* Synthetic tokens in memory, 8 batches per epoch: the loader's
         * work per batch (gather B windows in a shuffled order, copy them
         * into its ring) does not depend on the values. */
        uint64_t count = (uint64_t)8 * B * T + 1;
        int32_t *tmp = malloc(count * sizeof *tmp);
        uint16_t *tok16 = malloc(count * sizeof *tok16);
        if (!tmp || !tok16 || cfg->vocab > 65536) {
            free(tmp);
            free(tok16);
            return tlm_errorf("out of memory for the loader benchmark's %llu synthetic tokens",
                              (unsigned long long)count);
        }
        bench_random_tokens(tmp, (int)count, cfg->vocab, o->seed ^ 0x10adULL);
        for (uint64_t i = 0; i < count; i++) tok16[i] = (uint16_t)tmp[i];
        free(tmp);
        syn.vocab = cfg->vocab;
        syn.token_bytes = 2;
        syn.count = count;
        syn.ndocs = 1;
        syn.tokens = tok16;
        snprintf(syn.path, sizeof syn.path, "(synthetic tokens)");
        data = &syn;
    }
    if ((data->count - 1) / (uint64_t)T < (uint64_t)B) {
        tlm_errorf("%s has %llu tokens, fewer than one batch of %d x %d: use a smaller --batch", data->path,
                   (unsigned long long)data->count, B, T);
        free((void *)syn.tokens);
        return -1;
    }
    bench_trainee tr;
    memset(&tr, 0, sizeof tr);
    tlm_loader *ld = NULL;
    tlm_feed feed;
    memset(&feed, 0, sizeof feed);
    int rc = -1;
    const int nsteps = o->warmup_steps + 1 + 2 * o->rounds * o->steps;
    if (bench_trainee_open(&tr, ops, cfg, B, T, o->seed, nsteps)) goto out;
    ld = loader_create(data, B, T, o->seed, o->workers, o->prefetch, ops);
    if (!ld) goto out;
    r->pinned = loader_pinned(ld);
    feed_init(&feed, ld, &tr.m, o->prefetch);
    const float grad_scale = 1.0f / (float)((size_t)B * (size_t)T);
    int s = 0;
    /* warm-up through the loader (its workers start, the ring fills) */
    for (int k = 0; k < o->warmup_steps + 1; k++, s++)
        if (bench_loader_step(&tr.m, &tr.adam, &feed, B, T, grad_scale, tr.stats_dev + 2 * s, s + 1)) goto out;
    double tsum[2] = {0, 0};
    for (int round = 0; round < o->rounds; round++)
        for (int half = 0; half < 2; half++) {
            /* alternate which kind goes first, so a drifting machine
             * (clocks, other work) weighs on both alike */
            const int use_loader = (round + half) % 2;
            ops->sync(ops);
            const double t0 = tlm_now();
            for (int k = 0; k < o->steps; k++, s++)
                if (bench_loader_step(&tr.m, &tr.adam, use_loader ? &feed : NULL, B, T, grad_scale,
                                      tr.stats_dev + 2 * s, s + 1))
                    goto out;
            ops->sync(ops);
            tsum[use_loader] += tlm_now() - t0;
        }
    if (bench_trainee_check(&tr, ops, nsteps)) goto out;
    r->steps = (long long)o->rounds * o->steps;
    r->resident_step_s = tsum[0] / (double)r->steps;
    r->loader_step_s = tsum[1] / (double)r->steps;
    r->ratio = r->resident_step_s > 0 ? r->loader_step_s / r->resident_step_s : 0;
    const double tok = (double)B * (double)T;
    r->resident_tokens_per_s = r->resident_step_s > 0 ? tok / r->resident_step_s : 0;
    r->loader_tokens_per_s = r->loader_step_s > 0 ? tok / r->loader_step_s : 0;
    rc = 0;
out:
    if (ld) {
        feed_release(&feed, 0); /* no copy may still read a ring slot */
        loader_destroy(ld);
    }
    bench_trainee_close(&tr, ops);
    free((void *)syn.tokens);
    return rc;
}

/* ---- matrix-product peak ------------------------------------------------------ */

int bench_sgemm(tlm_ops *ops, int n, int reps, double *gflops, int *dtype) {
    *gflops = 0;
    if (n < 1 || reps < 1) return tlm_errorf("bench: --gemm-size and --gemm-reps must be positive");
    const int dt = ops->act_dtype == TLM_ACT_BF16 && ops->matmul_ex && ops->to_act ? TLM_ACT_BF16 : TLM_ACT_F32;
    *dtype = dt;
    size_t nn = (size_t)n * (size_t)n, bytes = nn * sizeof(float), ebytes = nn * (dt == TLM_ACT_BF16 ? 2 : 4);
    float *h = tlm_alloc(bytes);
    void *a = ops->alloc(ops, ebytes), *b = ops->alloc(ops, ebytes), *c = ops->alloc(ops, ebytes);
    /* bf16: the values go up in fp32 and are rounded on the device */
    float *stage = dt == TLM_ACT_BF16 ? ops->alloc(ops, bytes) : NULL;
    int rc = -1;
    if (!h || !a || !b || !c || (dt == TLM_ACT_BF16 && !stage)) {
        tlm_errorf("out of memory for three %d x %d matrices: use a smaller --gemm-size", n, n);
        goto out;
    }
    tlm_rng rng;
    tlm_rng_seed(&rng, 42);
    for (int m = 0; m < 2; m++) {
        for (size_t i = 0; i < nn; i++) h[i] = tlm_rng_uniform(&rng) - 0.5f;
        void *dst = m == 0 ? a : b;
        if (stage) {
            ops->copy_h2d(ops, stage, h, bytes);
            ops->to_act(ops, dst, stage, nn);
        } else {
            ops->copy_h2d(ops, dst, h, bytes);
        }
    }
    double best = 0;
    /* One untimed product first: BLAS thread start-up and first-touch. */
    for (int k = 0; k <= reps; k++) {
        ops->sync(ops);
        double t0 = tlm_now();
        /* x @ W^T, the layout of every product in the model. */
        if (dt == TLM_ACT_F32)
            ops->matmul(ops, 0, 1, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        else
            ops->matmul_ex(ops, 0, 1, n, n, n, 1.0f, a, dt, n, b, dt, n, 0.0f, c, dt, n);
        ops->sync(ops);
        double dt_s = tlm_now() - t0;
        double g = dt_s > 0 ? 2.0 * (double)n * n * n / dt_s / 1e9 : 0;
        if (k > 0 && g > best) best = g;
    }
    if (ops_status(ops)) goto out;
    *gflops = best;
    rc = 0;
out:
    tlm_free(h);
    if (a) ops->free(ops, a);
    if (b) ops->free(ops, b);
    if (c) ops->free(ops, c);
    if (stage) ops->free(ops, stage);
    return rc;
}

/* ---- generation ---------------------------------------------------------------- */

static tlm_gen_params gen_params(int streams, int max_tokens, uint64_t seed) {
    tlm_gen_params p;
    memset(&p, 0, sizeof p);
    p.samples = streams;
    p.max_tokens = max_tokens;
    p.sampling.temperature = BENCH_TEMPERATURE;
    p.sampling.top_k = 0;
    p.sampling.top_p = BENCH_TOP_P;
    p.seed = seed;
    return p;
}

int bench_prompt(tlm_model *m, const int32_t *prompt, int nprompt, int reps, double *tokens_per_s) {
    *tokens_per_s = 0;
    tlm_gen_params p = gen_params(1, 1, 1);
    double best = 0;
    for (int k = 0; k < reps; k++) {
        tlm_gen_stats st;
        if (generate_run(m, prompt, nprompt, -1, &p, NULL, NULL, NULL, NULL, &st)) return -1;
        if (st.prompt_seconds > 0 && (best == 0 || st.prompt_seconds < best)) best = st.prompt_seconds;
    }
    *tokens_per_s = best > 0 ? (double)nprompt / best : 0;
    return 0;
}

int bench_generate(tlm_model *m, const int32_t *prompt, int nprompt, int streams, int max_tokens, uint64_t seed,
                   int dtype, bench_gen_result *r) {
    memset(r, 0, sizeof *r);
    r->streams = streams;
    tlm_gen_params p = gen_params(streams, max_tokens, seed);
    p.dtype = dtype;
    tlm_gen_stats st;
    /* eot = -1: sequences never stop early, so every stream makes max_tokens. */
    if (generate_run(m, prompt, nprompt, -1, &p, NULL, NULL, NULL, NULL, &st)) return -1;
    r->dtype = st.dtype;
    r->new_tokens = st.new_tokens;
    r->seconds = st.gen_seconds;
    r->tokens_per_s = st.gen_seconds > 0 ? (double)st.new_tokens / st.gen_seconds : 0;
    return 0;
}

/* ---- tokenizer ----------------------------------------------------------------- */

typedef struct {
    char **bufs;    /* file contents, owned */
    int nbufs;
    const char **docs;
    size_t *lens;
    size_t ndocs, cap;
    size_t bytes;
} corpus_t;

static void corpus_add_doc(corpus_t *c, const char *text, size_t len) {
    if (len == 0) return;
    if (c->ndocs == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 64;
        c->docs = realloc(c->docs, c->cap * sizeof *c->docs);
        c->lens = realloc(c->lens, c->cap * sizeof *c->lens);
    }
    c->docs[c->ndocs] = text;
    c->lens[c->ndocs++] = len;
}

/* Documents of one file: the pieces between lines holding only <|endoftext|>. */
static void corpus_split(corpus_t *c, const char *buf, size_t len) {
    const size_t sl = strlen(TLM_EOT_TEXT);
    size_t start = 0, i = 0;
    while (i < len) {
        size_t e = i;
        while (e < len && buf[e] != '\n') e++;
        size_t ll = e - i;
        if (ll > 0 && buf[e - 1] == '\r') ll--;
        if (ll == sl && !memcmp(buf + i, TLM_EOT_TEXT, sl)) {
            corpus_add_doc(c, buf + start, i - start);
            start = e < len ? e + 1 : len;
        }
        i = e + 1;
    }
    if (start < len) corpus_add_doc(c, buf + start, len - start);
}

static int corpus_add_file(corpus_t *c, const char *path, int split) {
    size_t len;
    char *buf = file_read_all(path, &len);
    if (!buf) return -1;
    c->bufs = realloc(c->bufs, (size_t)(c->nbufs + 1) * sizeof *c->bufs);
    c->bufs[c->nbufs++] = buf;
    c->bytes += len;
    if (split) corpus_split(c, buf, len);
    else corpus_add_doc(c, buf, len);
    return 0;
}

static int cmp_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int corpus_read(corpus_t *c, const char *path) {
    memset(c, 0, sizeof *c);
    struct stat st;
    if (stat(path, &st) != 0) return tlm_errorf("--corpus %s does not exist: give a text file or a folder of .txt files", path);
    if (S_ISREG(st.st_mode)) return corpus_add_file(c, path, 1);
    if (!S_ISDIR(st.st_mode)) return tlm_errorf("--corpus %s is neither a file nor a folder", path);
    DIR *d = opendir(path);
    if (!d) return tlm_errorf("--corpus %s: cannot open the folder", path);
    char **names = NULL;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 5 || strcmp(e->d_name + l - 4, ".txt") != 0 || e->d_name[0] == '.') continue;
        names = realloc(names, (size_t)(n + 1) * sizeof *names);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    /* Sorted, so the documents (and the tokenizer) are the same on every run. */
    if (n > 0) qsort(names, (size_t)n, sizeof *names, cmp_name);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        char p[4096];
        if (!rc && corpus_add_file(c, path_join(p, sizeof p, path, names[i]), 0)) rc = -1;
        free(names[i]);
    }
    free(names);
    if (!rc && c->ndocs == 0) return tlm_errorf("--corpus %s holds no text in .txt files", path);
    return rc;
}

static void corpus_free(corpus_t *c) {
    for (int i = 0; i < c->nbufs; i++) free(c->bufs[i]);
    free(c->bufs);
    free(c->docs);
    free(c->lens);
    memset(c, 0, sizeof *c);
}

int bench_tokenizer(const char *corpus, int vocab, int threads, bench_tok_result *r) {
    memset(r, 0, sizeof *r);
    corpus_t c;
    int rc = -1;
    tlm_tokenizer *tok = NULL;
    if (corpus_read(&c, corpus)) goto out;
    if (c.ndocs == 0) {
        tlm_errorf("--corpus %s holds no text", corpus);
        goto out;
    }
    r->bytes = c.bytes;
    r->docs = c.ndocs;
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    double t0 = tlm_now();
    tok = tokenizer_train(c.docs, c.lens, c.ndocs, vocab, NULL, NULL);
    r->train_seconds = tlm_now() - t0;
    if (!tok) goto restore;
    /* Encoding on one thread, then on all the benchmark's threads. */
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass == 0 ? 1 : threads);
        size_t ntok = 0;
        t0 = tlm_now();
        int32_t *ids = tokenizer_encode_many(tok, c.docs, c.lens, c.ndocs, 1, NULL, &ntok, NULL, NULL);
        double dt = tlm_now() - t0;
        if (!ids) goto restore;
        free(ids);
        double mbs = dt > 0 ? (double)c.bytes / 1e6 / dt : 0;
        if (pass == 0) r->encode_mb_s_1 = mbs;
        else r->encode_mb_s_n = mbs;
        r->tokens = ntok;
    }
    rc = 0;
restore:
    omp_set_num_threads(saved);
out:
    tokenizer_free(tok);
    corpus_free(&c);
    return rc;
}

/* ---- memory ---------------------------------------------------------------------- */

long long bench_peak_rss(void) {
    /* VmHWM is this address space's own peak: it excludes whatever the
     * parent held before exec, which ru_maxrss may include. */
    FILE *f = fopen("/proc/self/status", "r");
    if (f) {
        char line[256];
        long long kb = -1;
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "VmHWM:", 6)) {
                kb = strtoll(line + 6, NULL, 10);
                break;
            }
        fclose(f);
        if (kb >= 0) return kb * 1024;
    }
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
#ifdef __APPLE__
    return (long long)ru.ru_maxrss; /* bytes on macOS */
#else
    return (long long)ru.ru_maxrss * 1024; /* kilobytes elsewhere */
#endif
}
