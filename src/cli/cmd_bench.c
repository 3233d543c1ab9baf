/*
 * tinylm bench: throughput and memory of one model configuration on this
 * machine, with nothing to prepare (random weights, random tokens).
 *
 * Training runs in a child process (this binary re-executed with
 * --only train --json) so that its peak memory is training's alone and its
 * timing is not disturbed by what the other measurements left behind. The
 * measurements themselves are in bench_run.c; this file parses flags and
 * prints a table or one JSON object.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "backends/cpu/cpu_info.h"
#include "cli/bench_run.h"
#include "cli/cli.h"
#include "data/tokfile.h"
#include "model/config.h"
#include "model/model.h"
#include "model/model_infer.h"
#include "ops/ops.h"
#include "util/common.h"

#define CMD "bench"
#define MAX_STREAMS 16
#define MAX_GEN_DTYPES 4
#define PROMPT_REPS 3

enum { S_TRAIN = 1, S_SGEMM = 2, S_PROMPT = 4, S_GEN = 8, S_TOK = 16, S_MEM = 32, S_LOADER = 64 };
/* the default set; the loader comparison runs on request (--only loader) */
#define S_ALL (S_TRAIN | S_SGEMM | S_PROMPT | S_GEN | S_TOK | S_MEM)

static void bench_usage(FILE *f) {
    fprintf(f,
            "usage: tinylm bench [flags]\n"
            "\n"
            "Measure training and generation speed, the share of the machine's fp32 matrix-product\n"
            "peak that training reaches, tokenizer speed and peak memory, for one model configuration\n"
            "with random weights and random tokens (no data needed). bench/compare.sh runs the\n"
            "PyTorch reference (dev/bench_torch.py) on the same configuration beside it.\n"
            "\n"
            "model\n"
            "  --preset NAME         seed or tiny (default seed: vocab 2560, dim 256, 10 layers,\n"
            "                        8 heads, hidden 704, context 256)\n"
            "  --vocab N             vocabulary size (overrides the preset)\n"
            "  --dim N, --layers N, --heads N, --hidden N, --context N   (override the preset)\n"
            "training\n"
            "  --batch N             sequences of --context tokens per step (default 16)\n"
            "  --steps N             timed optimizer steps (default 10)\n"
            "  --warmup-steps N      untimed steps before them (default 2)\n"
            "  --gemm-size N         the peak: best of --gemm-reps N x N x N sgemm (default 2048)\n"
            "  --gemm-reps N         (default 5; one untimed product first)\n"
            "generation\n"
            "  --prompt-tokens N     random prompt length; prompt tokens/s is the best of %d\n"
            "                        prompt phases (default 128)\n"
            "  --gen-tokens N        new tokens per stream (default 256); end-of-text is ignored\n"
            "  --streams LIST        comma-separated stream counts (default 1,64)\n"
            "  --gen-dtype LIST      comma-separated weight formats to generate with, each at every\n"
            "                        --streams count: auto, bf16, int8, fp32, ref (as generate\n"
            "                        --dtype; default auto, the backend's fastest); e.g. bf16,int8\n"
            "data pipeline (--only loader)\n"
            "  --data PATH           a folder from tinylm prepare (its train.bin) or a token file;\n"
            "                        without it, synthetic tokens held in memory\n"
            "  --workers N           loader threads, as tinylm train (default 2)\n"
            "  --prefetch N          loader ring slots, as tinylm train (default 4)\n"
            "  --loader-rounds N     alternating blocks of --steps steps of each kind (default 3)\n"
            "tokenizer\n"
            "  --corpus PATH         a text file or folder of .txt files (e.g. data/sotu); without it\n"
            "                        the tokenizer is not measured\n"
            "  --vocab-train N       vocabulary of the trained tokenizer (default 2560)\n"
            "runtime and output\n"
            "  --threads N           compute threads, 0 = all cores (default 0)\n"
            "  --device D            cpu, cpu-ref, auto or cuda[:N] (default cpu)\n"
            "  --seed S              weights, tokens and sampling (default 1337)\n"
            "  --only LIST           comma-separated subset of: train, sgemm, prompt, gen, tokenizer,\n"
            "                        memory (peak = memory), loader; default all but loader (tokenizer\n"
            "                        only with --corpus)\n"
            "  --json                print one JSON object instead of the table\n"
            "  -h, --help            show this help\n"
            "\n"
            "What is counted\n"
            "  training tokens/s = batch x context x steps / time of the timed steps; a step is what\n"
            "    tinylm train does: forward, backward, global gradient norm, AdamW with clipping.\n"
            "  model FLOPs per training token = 6 x P_matmul + 6 x L x D x (T + 1), where\n"
            "    P_matmul = L x (4 D^2 + 3 D F) + V x D: the weights that enter matrix products\n"
            "    (wq, wk, wv, wo, gate, up, down per layer, and the tied embedding once as the output\n"
            "    head; not the norms, not the embedding lookup), 2 FLOPs per weight per token forward\n"
            "    and 4 backward; causal attention: QK^T and PV over T(T+1)/2 query-key pairs per\n"
            "    sequence, 2 D FLOPs each, forward 2 D (T + 1) per token per layer, backward twice\n"
            "    that. Recomputation in attention backward is not counted.\n"
            "  share of peak = model FLOPs/s of training / best sgemm FLOPs/s (2 n^3 per product).\n"
            "  generation tokens/s = tokens sampled over all streams / time after the prompt (the\n"
            "    prompt is computed once and shared; weights packed beforehand, in the format the\n"
            "    row names), temperature 0.8, top-p 0.95. When prompt +\n"
            "    new tokens exceed --context, the generation model's context is raised to fit\n"
            "    (RoPE has no learned positions: the same weights, the true cost of those positions).\n"
            "  loader overhead = mean training step time with every batch taken from the loader as\n"
            "    tinylm train does (worker threads fill a ring of host buffers, page-locked where the\n"
            "    device supports it; each upload overlaps the step before) / the same with the batch\n"
            "    already on the device; blocks of the two kinds alternate in one process.\n"
            "  peak memory = maximum resident set size of a process that runs only the training\n"
            "    benchmark.\n",
            PROMPT_REPS);
}

/* ---- flags ------------------------------------------------------------------------ */

typedef struct {
    const char *corpus, *device, *data;
    cli_model_flags model;
    long batch, steps, warmup, gemm_size, gemm_reps;
    long prompt_tokens, gen_tokens, vocab_train, threads, seed;
    long workers, prefetch, loader_rounds;
    int streams[MAX_STREAMS], nstreams;
    int gen_dtypes[MAX_GEN_DTYPES], ngen_dtypes; /* TLM_GEN_* */
    unsigned sections;
    int only_given, json;
} bench_flags;

/* --streams and --only: CLI_CUSTOM parsers, dest is the bench_flags. */
static int parse_streams(const char *cmd, const char *flag, const char *v, void *dest) {
    bench_flags *g = dest;
    g->nstreams = 0;
    const char *p = v;
    for (;;) {
        char *end;
        errno = 0;
        long s = strtol(p, &end, 10);
        if (errno || end == p || (*end != ',' && *end != '\0') || s < 1 || s > 4096) {
            fprintf(stderr, "tinylm %s: error: %s expects comma-separated counts from 1 to 4096 like 1,64, got '%s'\n",
                    cmd, flag, v);
            return -1;
        }
        if (g->nstreams == MAX_STREAMS) {
            fprintf(stderr, "tinylm %s: error: %s lists more than %d counts: give fewer\n", cmd, flag, MAX_STREAMS);
            return -1;
        }
        g->streams[g->nstreams++] = (int)s;
        if (*end == '\0') return 0;
        p = end + 1;
    }
}

static int parse_gen_dtypes(const char *cmd, const char *flag, const char *v, void *dest) {
    bench_flags *g = dest;
    g->ngen_dtypes = 0;
    const char *p = v;
    for (;;) {
        size_t n = strcspn(p, ",");
        char name[16];
        int dt = -1;
        if (n > 0 && n < sizeof name) {
            memcpy(name, p, n);
            name[n] = 0;
            if (model_infer_parse_dtype(name, &dt)) dt = -1;
        }
        if (dt < 0) {
            fprintf(stderr, "tinylm %s: error: %s '%s' names an unknown format '%.*s': use auto, bf16, int8, fp32 or ref\n",
                    cmd, flag, v, (int)n, p);
            return -1;
        }
        if (g->ngen_dtypes == MAX_GEN_DTYPES) {
            fprintf(stderr, "tinylm %s: error: %s lists more than %d formats: give fewer\n", cmd, flag, MAX_GEN_DTYPES);
            return -1;
        }
        g->gen_dtypes[g->ngen_dtypes++] = dt;
        if (p[n] == '\0') return 0;
        p += n + 1;
    }
}

static int parse_only(const char *cmd, const char *flag, const char *v, void *dest) {
    bench_flags *g = dest;
    static const struct { const char *name; unsigned bit; } names[] = {
        {"train", S_TRAIN}, {"sgemm", S_SGEMM}, {"prompt", S_PROMPT}, {"gen", S_GEN},
        {"tokenizer", S_TOK}, {"memory", S_MEM}, {"peak", S_MEM}, {"loader", S_LOADER}};
    g->sections = 0;
    const char *p = v;
    for (;;) {
        size_t n = strcspn(p, ",");
        unsigned bit = 0;
        for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
            if (strlen(names[k].name) == n && !strncmp(p, names[k].name, n)) bit = names[k].bit;
        if (!bit) {
            fprintf(stderr, "tinylm %s: error: %s '%s' names an unknown part '%.*s': use train, sgemm, prompt, gen, tokenizer, memory or loader\n",
                    cmd, flag, v, (int)n, p);
            return -1;
        }
        g->sections |= bit;
        if (p[n] == '\0') return 0;
        p += n + 1;
    }
}

static int parse_flags(int argc, char **argv, bench_flags *g) {
    memset(g, 0, sizeof *g);
    g->model.preset = "seed";
    g->device = "cpu";
    g->batch = 16;
    g->steps = 10;
    g->warmup = 2;
    g->gemm_size = 2048;
    g->gemm_reps = 5;
    g->prompt_tokens = 128;
    g->gen_tokens = 256;
    g->vocab_train = 2560;
    g->workers = 2;
    g->prefetch = 4;
    g->loader_rounds = 3;
    g->seed = 1337;
    g->streams[0] = 1;
    g->streams[1] = 64;
    g->nstreams = 2;
    g->gen_dtypes[0] = TLM_GEN_AUTO;
    g->ngen_dtypes = 1;
    g->sections = S_ALL;
    const cli_flag flags[] = {
        CLI_MODEL_FLAGS(&g->model),
        CLI_MODEL_VOCAB_FLAG(&g->model),
        CLI_FLAG_LONG("--batch", &g->batch, NULL, 1, 1L << 20),
        CLI_FLAG_LONG("--steps", &g->steps, NULL, 1, 1000000),
        CLI_FLAG_LONG("--warmup-steps", &g->warmup, NULL, 0, 1000000),
        CLI_FLAG_LONG("--gemm-size", &g->gemm_size, NULL, 1, 32768),
        CLI_FLAG_LONG("--gemm-reps", &g->gemm_reps, NULL, 1, 10000),
        CLI_FLAG_LONG("--prompt-tokens", &g->prompt_tokens, NULL, 1, 1L << 20),
        CLI_FLAG_LONG("--gen-tokens", &g->gen_tokens, NULL, 1, 1L << 20),
        CLI_FLAG_CUSTOM("--streams", parse_streams, g, NULL),
        CLI_FLAG_CUSTOM("--gen-dtype", parse_gen_dtypes, g, NULL),
        CLI_FLAG_STRING("--corpus", &g->corpus, NULL),
        CLI_FLAG_STRING("--data", &g->data, NULL),
        CLI_FLAG_LONG("--workers", &g->workers, NULL, 0, 256),
        CLI_FLAG_LONG("--prefetch", &g->prefetch, NULL, 1, 1024),
        CLI_FLAG_LONG("--loader-rounds", &g->loader_rounds, NULL, 1, 10000),
        CLI_FLAG_LONG("--vocab-train", &g->vocab_train, NULL, 257, 1 << 24),
        CLI_FLAG_LONG("--threads", &g->threads, NULL, 0, 4096),
        CLI_FLAG_STRING("--device", &g->device, NULL),
        CLI_FLAG_LONG("--seed", &g->seed, NULL, 0, 0x7fffffffffffffffL),
        CLI_FLAG_CUSTOM("--only", parse_only, g, &g->only_given),
        CLI_FLAG_SWITCH("--json", &g->json),
    };
    return cli_parse_flags(CMD, argc, argv, flags, CLI_NFLAGS(flags), bench_usage);
}

/* ---- the training child ------------------------------------------------------------ */

typedef struct {
    int ok;
    bench_train_result r;
    long long peak_rss;
} train_child;

/* Run this binary as `bench --only train --json` with the same model,
 * batch, steps, threads and device; read its JSON. The child prints its own
 * error line on failure. Returns 0, or -1 with *printed set when the child
 * has already reported the error. */
static int run_train_child(const bench_flags *g, const tlm_config *c, int threads, train_child *out, int *printed) {
    memset(out, 0, sizeof *out);
    *printed = 0;
    char num[16][32];
    long vals[] = {c->vocab, c->dim, c->layers, c->heads, c->hidden, c->context, threads, g->batch, g->steps, g->warmup,
                   g->seed};
    const char *flags[] = {"--vocab", "--dim", "--layers", "--heads", "--hidden", "--context", "--threads", "--batch",
                           "--steps", "--warmup-steps", "--seed"};
    const int nv = (int)(sizeof vals / sizeof vals[0]);
    char *args[48];
    int na = 0;
    args[na++] = "tinylm";
    args[na++] = "bench";
    args[na++] = "--only";
    args[na++] = "train";
    args[na++] = "--json";
    args[na++] = "--device";
    args[na++] = (char *)g->device;
    for (int k = 0; k < nv; k++) {
        snprintf(num[k], sizeof num[k], "%ld", vals[k]);
        args[na++] = (char *)flags[k];
        args[na++] = num[k];
    }
    args[na] = NULL;

    int fd[2];
    if (pipe(fd) != 0) return tlm_errorf("cannot create a pipe for the training process: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        close(fd[0]);
        close(fd[1]);
        return tlm_errorf("cannot start the training process: %s", strerror(errno));
    }
    if (pid == 0) {
        dup2(fd[1], STDOUT_FILENO);
        close(fd[0]);
        close(fd[1]);
        execv("/proc/self/exe", args);
        fprintf(stderr, "tinylm bench: error: cannot run /proc/self/exe for the training process: %s\n", strerror(errno));
        _exit(127);
    }
    close(fd[1]);
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 1 == cap) buf = realloc(buf, cap *= 2);
        ssize_t k = read(fd[0], buf + len, cap - 1 - len);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        len += (size_t)k;
    }
    buf[len] = 0;
    close(fd[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        free(buf);
        *printed = WIFEXITED(status);
        return tlm_errorf("the training process failed (%s %d)", WIFEXITED(status) ? "exit" : "signal",
                          WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    }
    cJSON *j = cJSON_Parse(buf);
    free(buf);
    const char *keys[] = {"train_tokens_per_s", "train_seconds", "train_tokens", "train_loss_first",
                          "train_loss_last", "flops_per_token", "train_gflops", "peak_rss_bytes"};
    double v[8];
    for (int k = 0; k < 8; k++) {
        cJSON *it = j ? cJSON_GetObjectItem(j, keys[k]) : NULL;
        if (!cJSON_IsNumber(it)) {
            cJSON_Delete(j);
            return tlm_errorf("the training process printed no '%s' in its JSON", keys[k]);
        }
        v[k] = it->valuedouble;
    }
    cJSON *dp = cJSON_GetObjectItem(j, "device_peak_bytes"); /* only where the device says */
    out->r.device_peak_bytes = cJSON_IsNumber(dp) ? (long long)dp->valuedouble : 0;
    cJSON_Delete(j);
    out->r.tokens_per_s = v[0];
    out->r.seconds = v[1];
    out->r.tokens = (long long)v[2];
    out->r.loss_first = v[3];
    out->r.loss_last = v[4];
    out->r.flops_per_token = v[5];
    out->r.gflops = v[6];
    out->peak_rss = (long long)v[7];
    out->ok = 1;
    return 0;
}

/* ---- formatting --------------------------------------------------------------------- */

static const char *fmt_thousands(double x, char *buf, size_t n) {
    char raw[48];
    int len = snprintf(raw, sizeof raw, "%.0f", x);
    size_t o = 0;
    for (int i = 0; i < len && o + 2 < n; i++) {
        if (i > 0 && raw[i - 1] != '-' && (len - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = raw[i];
    }
    buf[o] = 0;
    return buf;
}

/* Large values as integers with separators, small ones with 3 significant digits. */
static const char *fmt_value(double x, char *buf, size_t n) {
    if (x >= 1000) return fmt_thousands(x, buf, n);
    if (x >= 100) snprintf(buf, n, "%.0f", x);
    else if (x >= 10) snprintf(buf, n, "%.1f", x);
    else snprintf(buf, n, "%.2f", x);
    return buf;
}

static void row(const char *label, const char *value) { printf("  %-52s %14s\n", label, value); }

/* ---- main ---------------------------------------------------------------------------- */

typedef struct {
    int have_train, have_sgemm, have_prompt, have_tok, have_mem, have_loader, ngen;
    bench_train_result train;
    bench_loader_result loader;
    double sgemm_gflops, prompt_tps;
    int sgemm_dtype; /* TLM_ACT_F32 or TLM_ACT_BF16 */
    bench_gen_result gen[MAX_GEN_DTYPES * MAX_STREAMS]; /* dtype by dtype, streams within */
    bench_tok_result tok;
    long long peak_rss;
    int gen_context;
    char mem_note[96];
    double load_start; /* 1-minute load average before the first figure, < 0 unknown */
    int ncpu;
} bench_results;

static void print_json(const bench_flags *g, const tlm_config *c, int threads, const tlm_ops *ops,
                       const tlm_cpu_info *ci, const bench_results *R) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "tool", "tinylm");
    cJSON_AddStringToObject(j, "version", TLM_VERSION_STRING);
    cJSON_AddStringToObject(j, "device", ops ? ops->device_desc : g->device);
    cJSON_AddStringToObject(j, "cpu", ci->model);
    cJSON_AddStringToObject(j, "blas", ci->blas);
    cJSON_AddNumberToObject(j, "threads", threads);
    cJSON *cf = cJSON_AddObjectToObject(j, "config");
    cJSON_AddNumberToObject(cf, "vocab", c->vocab);
    cJSON_AddNumberToObject(cf, "dim", c->dim);
    cJSON_AddNumberToObject(cf, "layers", c->layers);
    cJSON_AddNumberToObject(cf, "heads", c->heads);
    cJSON_AddNumberToObject(cf, "hidden", c->hidden);
    cJSON_AddNumberToObject(cf, "context", c->context);
    cJSON_AddNumberToObject(j, "params", (double)config_param_count(c));
    cJSON_AddNumberToObject(j, "params_matmul", (double)bench_matmul_params(c));
    cJSON_AddNumberToObject(j, "flops_per_token", bench_train_flops_per_token(c, c->context));
    cJSON_AddStringToObject(j, "flops_formula", "6*P_matmul + 6*L*D*(T+1); P_matmul = L*(4*D^2 + 3*D*F) + V*D");
    cJSON_AddNumberToObject(j, "batch", (double)g->batch);
    cJSON_AddNumberToObject(j, "steps", (double)g->steps);
    cJSON_AddNumberToObject(j, "warmup_steps", (double)g->warmup);
    if (R->have_train) {
        cJSON_AddNumberToObject(j, "train_tokens", (double)R->train.tokens);
        cJSON_AddNumberToObject(j, "train_seconds", R->train.seconds);
        cJSON_AddNumberToObject(j, "train_tokens_per_s", R->train.tokens_per_s);
        cJSON_AddNumberToObject(j, "train_loss_first", R->train.loss_first);
        cJSON_AddNumberToObject(j, "train_loss_last", R->train.loss_last);
        cJSON_AddNumberToObject(j, "train_gflops", R->train.gflops);
        if (R->train.device_peak_bytes > 0)
            cJSON_AddNumberToObject(j, "device_peak_bytes", (double)R->train.device_peak_bytes);
    }
    if (R->have_loader) {
        cJSON *l = cJSON_AddObjectToObject(j, "loader");
        cJSON_AddStringToObject(l, "data", g->data ? g->data : "synthetic");
        cJSON_AddNumberToObject(l, "workers", (double)g->workers);
        cJSON_AddNumberToObject(l, "prefetch", (double)g->prefetch);
        cJSON_AddBoolToObject(l, "pinned", R->loader.pinned);
        cJSON_AddNumberToObject(l, "steps_each", (double)R->loader.steps);
        cJSON_AddNumberToObject(l, "resident_step_s", R->loader.resident_step_s);
        cJSON_AddNumberToObject(l, "loader_step_s", R->loader.loader_step_s);
        cJSON_AddNumberToObject(l, "ratio", R->loader.ratio);
        cJSON_AddNumberToObject(l, "resident_tokens_per_s", R->loader.resident_tokens_per_s);
        cJSON_AddNumberToObject(l, "loader_tokens_per_s", R->loader.loader_tokens_per_s);
    }
    if (R->have_sgemm) {
        cJSON_AddNumberToObject(j, "sgemm_size", (double)g->gemm_size);
        cJSON_AddNumberToObject(j, "sgemm_reps", (double)g->gemm_reps);
        cJSON_AddNumberToObject(j, "sgemm_gflops", R->sgemm_gflops);
        cJSON_AddStringToObject(j, "sgemm_dtype", R->sgemm_dtype == TLM_ACT_BF16 ? "bf16" : "fp32");
    }
    if (R->have_train && R->have_sgemm && R->sgemm_gflops > 0)
        cJSON_AddNumberToObject(j, "peak_share", R->train.gflops / R->sgemm_gflops);
    if (R->have_prompt) {
        cJSON_AddNumberToObject(j, "prompt_tokens", (double)g->prompt_tokens);
        cJSON_AddNumberToObject(j, "prompt_tokens_per_s", R->prompt_tps);
    }
    if (R->ngen > 0) {
        cJSON_AddNumberToObject(j, "gen_new_tokens", (double)g->gen_tokens);
        cJSON_AddNumberToObject(j, "gen_prompt_tokens", (double)g->prompt_tokens);
        cJSON_AddNumberToObject(j, "gen_context", R->gen_context);
        cJSON *arr = cJSON_AddArrayToObject(j, "gen");
        for (int k = 0; k < R->ngen; k++) {
            cJSON *e = cJSON_CreateObject();
            cJSON_AddNumberToObject(e, "streams", R->gen[k].streams);
            cJSON_AddStringToObject(e, "dtype", model_infer_dtype_name(R->gen[k].dtype));
            cJSON_AddNumberToObject(e, "new_tokens", (double)R->gen[k].new_tokens);
            cJSON_AddNumberToObject(e, "seconds", R->gen[k].seconds);
            cJSON_AddNumberToObject(e, "tokens_per_s", R->gen[k].tokens_per_s);
            cJSON_AddItemToArray(arr, e);
        }
    }
    if (R->have_tok) {
        cJSON *t = cJSON_AddObjectToObject(j, "tokenizer");
        cJSON_AddStringToObject(t, "corpus", g->corpus);
        cJSON_AddNumberToObject(t, "bytes", (double)R->tok.bytes);
        cJSON_AddNumberToObject(t, "documents", (double)R->tok.docs);
        cJSON_AddNumberToObject(t, "tokens", (double)R->tok.tokens);
        cJSON_AddNumberToObject(t, "vocab", (double)g->vocab_train);
        cJSON_AddNumberToObject(t, "train_seconds", R->tok.train_seconds);
        cJSON_AddNumberToObject(t, "encode_mb_s_1_thread", R->tok.encode_mb_s_1);
        cJSON_AddNumberToObject(t, "encode_mb_s_all_threads", R->tok.encode_mb_s_n);
    }
    if (R->have_mem) {
        cJSON_AddNumberToObject(j, "peak_rss_bytes", (double)R->peak_rss);
        cJSON_AddStringToObject(j, "peak_rss_of", R->mem_note);
    }
    if (R->load_start >= 0) cJSON_AddNumberToObject(j, "load_average_start", R->load_start);
    char *s = cJSON_Print(j);
    printf("%s\n", s);
    free(s);
    cJSON_Delete(j);
}

static void print_table(const bench_flags *g, const tlm_config *c, int threads, const tlm_ops *ops,
                        const tlm_cpu_info *ci, const bench_results *R) {
    char a[48], b[48], lab[128];
    time_t now = time(NULL);
    char date[64];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M", localtime(&now));
    printf("tinylm bench %s, %s\n", TLM_VERSION_STRING, date);
    if (ops) printf("  device    %s\n", ops->device_desc);
    else printf("  device    %s, %d thread%s, %s\n", ci->model, threads, threads == 1 ? "" : "s", ci->blas);
    if (R->load_start >= 0)
        printf("  machine   load average %.2f on %d CPU%s at the start%s\n", R->load_start, R->ncpu,
               R->ncpu == 1 ? "" : "s",
               R->load_start >= 0.5 * R->ncpu ? " (busy: other work lowers every figure)" : "");
    printf("  model     vocab %d, dim %d, layers %d, heads %d, hidden %d, context %d: %s parameters, %s in matrix products\n",
           c->vocab, c->dim, c->layers, c->heads, c->hidden, c->context,
           fmt_thousands((double)config_param_count(c), a, sizeof a), fmt_thousands((double)bench_matmul_params(c), b, sizeof b));
    if (R->have_train)
        printf("  training  batch %ld x %d = %s tokens/step, %ld warm-up + %ld timed steps, AdamW, clip 1; loss at step 1 %.3f (ln V = %.3f)\n",
               g->batch, c->context, fmt_thousands((double)g->batch * c->context, a, sizeof a), g->warmup, g->steps,
               R->train.loss_first, log((double)c->vocab));
    if (R->have_loader)
        printf("  loader    batch %ld x %d, %ld warm-up + %ld rounds of %ld steps each way, data %s, %ld workers, "
               "%ld ring slots%s\n",
               g->batch, c->context, g->warmup + 1, g->loader_rounds, g->steps, g->data ? g->data : "synthetic",
               g->workers, g->prefetch, R->loader.pinned ? ", page-locked" : "");
    printf("\n  %-52s %14s\n", "figure", "tinylm");
    if (R->have_train) {
        row("training tokens/s", fmt_value(R->train.tokens_per_s, a, sizeof a));
        row("training model GFLOP/s", fmt_value(R->train.gflops, a, sizeof a));
    }
    if (R->have_loader) {
        snprintf(lab, sizeof lab, "step ms, batch on the device (%lld steps)", R->loader.steps);
        row(lab, fmt_value(R->loader.resident_step_s * 1e3, a, sizeof a));
        snprintf(lab, sizeof lab, "step ms, batch from the loader (%lld steps)", R->loader.steps);
        row(lab, fmt_value(R->loader.loader_step_s * 1e3, a, sizeof a));
        snprintf(a, sizeof a, "%.3f", R->loader.ratio);
        row("loader / on-device step time", a);
    }
    if (R->have_sgemm) {
        if (R->sgemm_dtype == TLM_ACT_BF16)
            snprintf(lab, sizeof lab, "bf16 matmul peak GFLOP/s (%ld^3, best of %ld)", g->gemm_size, g->gemm_reps);
        else
            snprintf(lab, sizeof lab, "fp32 sgemm peak GFLOP/s (%ld^3, best of %ld)", g->gemm_size, g->gemm_reps);
        row(lab, fmt_value(R->sgemm_gflops, a, sizeof a));
    }
    if (R->have_train && R->have_sgemm && R->sgemm_gflops > 0) {
        snprintf(a, sizeof a, "%.1f%%", 100.0 * R->train.gflops / R->sgemm_gflops);
        row("training share of the sgemm peak", a);
    }
    if (R->have_prompt) {
        snprintf(lab, sizeof lab, "prompt tokens/s (%ld-token prompt, best of %d)", g->prompt_tokens, PROMPT_REPS);
        row(lab, fmt_value(R->prompt_tps, a, sizeof a));
    }
    for (int k = 0; k < R->ngen; k++) {
        snprintf(lab, sizeof lab, "generation tokens/s, %d stream%s (%s tokens, %s)", R->gen[k].streams,
                 R->gen[k].streams == 1 ? "" : "s", fmt_thousands((double)R->gen[k].new_tokens, b, sizeof b),
                 model_infer_dtype_name(R->gen[k].dtype));
        row(lab, fmt_value(R->gen[k].tokens_per_s, a, sizeof a));
    }
    if (R->have_tok) {
        snprintf(lab, sizeof lab, "tokenizer training s (vocab %ld, %s)", g->vocab_train,
                 tlm_fmt_bytes((double)R->tok.bytes, b, sizeof b));
        row(lab, fmt_value(R->tok.train_seconds, a, sizeof a));
        row("encoding MB/s, 1 thread", fmt_value(R->tok.encode_mb_s_1, a, sizeof a));
        snprintf(lab, sizeof lab, "encoding MB/s, all %d thread%s", threads, threads == 1 ? "" : "s");
        row(lab, fmt_value(R->tok.encode_mb_s_n, a, sizeof a));
    }
    if (R->have_train && R->train.device_peak_bytes > 0) {
        snprintf(a, sizeof a, "%.1f", (double)R->train.device_peak_bytes / 1e6);
        row("peak device memory MB (training)", a);
    }
    if (R->have_mem) {
        snprintf(lab, sizeof lab, "peak memory MB (max RSS, %s)", R->mem_note);
        snprintf(a, sizeof a, "%.1f", (double)R->peak_rss / 1e6);
        row(lab, a);
    }
    printf("\n");
    if (R->have_train || R->have_sgemm)
        printf("FLOPs per training token = 6 x P_matmul + 6 x L x D x (T+1) = 6 x %s + 6 x %d x %d x %d = %s\n"
               "  (P_matmul = L(4D^2 + 3DF) + VD: attention and MLP weights, and the tied embedding once as the head)\n",
               fmt_thousands((double)bench_matmul_params(c), a, sizeof a), c->layers, c->dim, c->context + 1,
               fmt_thousands(bench_train_flops_per_token(c, c->context), b, sizeof b));
    if (R->ngen > 0) {
        printf("generation: %ld new tokens per stream after a %ld-token prompt, temperature %.1f, top-p %.2f, "
               "end-of-text ignored",
               g->gen_tokens, g->prompt_tokens, (double)BENCH_TEMPERATURE, (double)BENCH_TOP_P);
        if (R->gen_context > c->context)
            printf("; context raised from %d to %d for it (same weights: RoPE has no learned positions)", c->context,
                   R->gen_context);
        printf("\n");
    }
}

/* On a terminal only; stderr, so --json output stays one object on stdout. */
static void progress(const char *what) {
    if (!isatty(STDERR_FILENO)) return;
    fprintf(stderr, "bench: %s...\n", what);
}

int cmd_bench(int argc, char **argv) {
    bench_flags g;
    int pr = parse_flags(argc, argv, &g);
    if (pr != CLI_PARSE_OK) return pr == CLI_PARSE_HELP ? 0 : CLI_EXIT_USAGE;

    tlm_config c;
    if (config_preset(g.model.preset, &c)) return cli_fail(CMD, tlm_last_error());
    cli_model_apply(&g.model, &c);
    if (config_validate(&c)) return cli_fail(CMD, tlm_last_error());
    if (!g.corpus) {
        if (g.only_given && (g.sections & S_TOK))
            return cli_fail(CMD, "--only tokenizer needs --corpus PATH (a text file or a folder of .txt files)");
        g.sections &= ~(unsigned)S_TOK;
    }
    /* The generation model's context: prompt + new tokens must fit. */
    tlm_config gc = c;
    if (g.sections & (S_PROMPT | S_GEN)) {
        long need = g.prompt_tokens + ((g.sections & S_GEN) ? g.gen_tokens : 1);
        if (need > gc.context) gc.context = (int)need;
        if (config_validate(&gc)) {
            char msg[512];
            snprintf(msg, sizeof msg, "--prompt-tokens %ld + --gen-tokens %ld: %s", g.prompt_tokens, g.gen_tokens,
                     tlm_last_error());
            return cli_fail(CMD, msg);
        }
    }

    tlm_cpu_info ci;
    cpu_info_query(&ci);
    int threads = g.threads > 0 ? (int)g.threads : (ci.cores > 0 ? ci.cores : 1);

    bench_results R;
    memset(&R, 0, sizeof R);
    R.gen_context = gc.context;
    /* Other work on the machine lowers every figure: say how busy it was
     * when the run began (the run's own threads come after). */
    if (getloadavg(&R.load_start, 1) != 1) R.load_start = -1;
    R.ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    bench_train_opts to = {(int)g.batch, (int)g.steps, (int)g.warmup, (uint64_t)g.seed};
    /* Training in-process when nothing else is measured (this is the child,
     * or the user asked for training alone); otherwise in a fresh process. */
    int in_process = (g.sections & (S_TRAIN | S_MEM)) && !(g.sections & ~(unsigned)(S_TRAIN | S_MEM));
    if ((g.sections & (S_TRAIN | S_MEM)) && !in_process) {
        if (access("/proc/self/exe", X_OK) == 0) {
            progress("training (separate process)");
            train_child tc;
            int printed;
            if (run_train_child(&g, &c, threads, &tc, &printed)) return printed ? 1 : cli_fail(CMD, tlm_last_error());
            R.train = tc.r;
            R.have_train = (g.sections & S_TRAIN) != 0;
            R.peak_rss = tc.peak_rss;
            R.have_mem = (g.sections & S_MEM) != 0;
            snprintf(R.mem_note, sizeof R.mem_note, "training alone");
        } else {
            /* No way to re-run ourselves: train first, here, so the peak so
             * far is still training's (plus the bare process). */
            in_process = 1;
        }
    }

    char note[256] = "";
    tlm_ops *ops = ops_create(g.device, threads, note, sizeof note);
    if (!ops) return cli_fail(CMD, tlm_last_error());
    int rc = 1;
    tlm_model gm;
    int have_gm = 0;
    int32_t *prompt = NULL;

    if (in_process && (g.sections & (S_TRAIN | S_MEM))) {
        progress("training");
        if (bench_train(ops, &c, &to, &R.train)) goto fail;
        R.have_train = (g.sections & S_TRAIN) != 0;
        /* Reported even for --only train: the child's answer to its parent. */
        R.peak_rss = bench_peak_rss();
        R.have_mem = 1;
        snprintf(R.mem_note, sizeof R.mem_note, "%s", (g.sections & ~(unsigned)(S_TRAIN | S_MEM)) ? "training first, in this process" : "training alone");
    }
    if (g.sections & S_LOADER) {
        progress("data loader against a batch already on the device");
        tlm_tokfile tf;
        int have_tf = 0;
        if (g.data) {
            char path[2048];
            struct stat sb;
            if (stat(g.data, &sb) == 0 && S_ISDIR(sb.st_mode)) snprintf(path, sizeof path, "%s/train.bin", g.data);
            else snprintf(path, sizeof path, "%s", g.data);
            if (tokfile_open(&tf, path)) {
                char msg[1024];
                snprintf(msg, sizeof msg, "--data: %s", tlm_last_error());
                tlm_errorf("%s", msg);
                goto fail;
            }
            have_tf = 1;
        }
        bench_loader_opts lo = {(int)g.batch, (int)g.steps, (int)g.warmup, (int)g.loader_rounds, (uint64_t)g.seed,
                                have_tf ? &tf : NULL, (int)g.workers, (int)g.prefetch};
        int lrc = bench_loader(ops, &c, &lo, &R.loader);
        if (have_tf) tokfile_close(&tf);
        if (lrc) goto fail;
        R.have_loader = 1;
    }
    if (g.sections & S_SGEMM) {
        progress("sgemm peak");
        if (bench_sgemm(ops, (int)g.gemm_size, (int)g.gemm_reps, &R.sgemm_gflops, &R.sgemm_dtype)) goto fail;
        R.have_sgemm = 1;
    }
    if (g.sections & (S_PROMPT | S_GEN)) {
        if (model_create(&gm, &gc, ops)) goto fail;
        have_gm = 1;
        model_init_random(&gm, (uint64_t)g.seed);
        prompt = malloc((size_t)g.prompt_tokens * sizeof *prompt);
        if (!prompt) {
            tlm_errorf("out of memory for a %ld-token prompt", g.prompt_tokens);
            goto fail;
        }
        bench_random_tokens(prompt, (int)g.prompt_tokens, gc.vocab, (uint64_t)g.seed + 1);
    }
    if (g.sections & S_GEN)
        for (int d = 0; d < g.ngen_dtypes; d++)
            if (model_infer_resolve_dtype(&gm, g.gen_dtypes[d]) < 0) {
                /* the library's line names --dtype, generate's flag */
                char msg[512];
                snprintf(msg, sizeof msg, "--gen-dtype: %s", tlm_last_error());
                tlm_errorf("%s", msg);
                goto fail;
            }
    if (g.sections & S_PROMPT) {
        progress("prompt processing");
        if (bench_prompt(&gm, prompt, (int)g.prompt_tokens, PROMPT_REPS, &R.prompt_tps)) goto fail;
        R.have_prompt = 1;
    }
    if (g.sections & S_GEN) {
        /* every format at every stream count, one after the other in this
         * process: side by side on the same machine state */
        for (int d = 0; d < g.ngen_dtypes; d++)
            for (int k = 0; k < g.nstreams; k++) {
                char what[96];
                snprintf(what, sizeof what, "generation, %d stream%s, %s", g.streams[k], g.streams[k] == 1 ? "" : "s",
                         model_infer_dtype_name(model_infer_resolve_dtype(&gm, g.gen_dtypes[d])));
                progress(what);
                if (bench_generate(&gm, prompt, (int)g.prompt_tokens, g.streams[k], (int)g.gen_tokens,
                                   (uint64_t)g.seed, g.gen_dtypes[d], &R.gen[R.ngen]))
                    goto fail;
                R.ngen++;
            }
    }
    if (g.sections & S_TOK) {
        progress("tokenizer");
        if (bench_tokenizer(g.corpus, (int)g.vocab_train, threads, &R.tok)) goto fail;
        R.have_tok = 1;
    }
    if (g.json) print_json(&g, &c, threads, ops, &ci, &R);
    else print_table(&g, &c, threads, ops, &ci, &R);
    rc = 0;
fail:
    if (rc) cli_fail(CMD, tlm_last_error());
    free(prompt);
    if (have_gm) model_destroy(&gm);
    ops_destroy(ops);
    return rc;
}
