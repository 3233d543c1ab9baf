/*
 * tinylm train: prepared data -> a trained model in a Hugging Face folder.
 *
 * The loop lives in src/train; this file parses flags, prints the banner and
 * the progress line, and turns SIGINT/SIGTERM into "save at the next step
 * boundary and exit 0".
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/cpu/cpu_info.h"
#include "cli/cli.h"
#include "train/train.h"
#include "util/common.h"

#define CMD "train"

static void train_usage(FILE *f) {
    fprintf(f,
            "usage: tinylm train --data DIR --out RUN [flags]\n"
            "\n"
            "Train a Llama-style model on data from `tinylm prepare`; RUN becomes a Hugging Face model\n"
            "folder (config.json, model.safetensors, tokenizer.json) plus trainer_state.*, metrics.jsonl\n"
            "and loss.svg.\n"
            "\n"
            "data and run\n"
            "  --data DIR            folder from tinylm prepare (tokenizer.json, train.bin, val.bin)\n"
            "  --out RUN             run folder; must not hold a checkpoint unless --resume\n"
            "  --resume              continue the checkpoint in RUN exactly where it stopped; flags not\n"
            "                        given keep their saved values (--data too)\n"
            "model (the vocabulary always comes from the data)\n"
            "  --preset NAME         seed (8.7M parameters) or tiny (default seed)\n"
            "  --dim N               model width (overrides the preset)\n"
            "  --layers N            transformer layers\n"
            "  --heads N             attention heads (--dim/--heads must be even)\n"
            "  --hidden N            SwiGLU hidden width\n"
            "  --context N           sequence length in tokens\n"
            "optimisation\n"
            "  --batch N             sequences per micro-batch (default 16)\n"
            "  --accum N             micro-batches per step, gradient accumulation (default 1)\n"
            "  --lr X                peak learning rate (default 1e-3)\n"
            "  --min-lr X            final learning rate of the cosine decay (default lr/10)\n"
            "  --warmup N            linear warmup steps (default 100, at most --max-steps)\n"
            "  --weight-decay X      AdamW decoupled weight decay on 2-D weights (default 0.1)\n"
            "  --clip X              clip the global gradient norm to X, 0 = off (default 1.0)\n"
            "  --max-steps N         optimizer steps, also the cosine horizon (default 1500)\n"
            "  --max-time T          stop after T (90s, 5m, 1.5h) of this invocation, even before\n"
            "                        --max-steps; --resume continues later\n"
            "evaluation, logging, checkpoints\n"
            "  --eval-every N        validation loss every N steps and at the end (default 100)\n"
            "  --eval-batches N      batches of val.bin per evaluation (default 20)\n"
            "  --save-every N        checkpoint every N steps and at the end (default --eval-every)\n"
            "  --log-every N         progress line and metrics.jsonl record every N steps when stdout\n"
            "                        is not a terminal (default 10)\n"
            "runtime\n"
            "  --device D            auto, cpu, cpu-ref or cuda[:N] (default auto)\n"
            "  --dtype T             matrix products in fp32, or bf16 (CUDA tensor cores; weights,\n"
            "                        gradients and optimizer state stay fp32), or tf32 (CUDA tensor\n"
            "                        cores reading fp32 with 10 mantissa bits), or auto: bf16 on CUDA,\n"
            "                        fp32 on the CPU (default auto; fp32 for exact comparison)\n"
            "  --threads N           compute threads (default: all cores)\n"
            "  --workers N           data loader threads, 0 = load on the training thread (default 2)\n"
            "  --prefetch N          batches the loader prepares ahead (default 4)\n"
            "  --seed S              seed of the initial weights and the data order (default 1337)\n"
            "  -h, --help            show this help\n"
            "\n"
            "Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the next step and exits; --resume continues\n"
            "bit for bit as if never interrupted (same device and --threads).\n");
}

/* ---- formatting ------------------------------------------------------------ */

static const char *fmt_thousands(unsigned long long v, char *buf, size_t n) {
    char raw[32];
    int len = snprintf(raw, sizeof raw, "%llu", v);
    size_t o = 0;
    for (int i = 0; i < len && o + 2 < n; i++) {
        if (i > 0 && (len - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = raw[i];
    }
    buf[o] = 0;
    return buf;
}

static const char *fmt_duration(double s, char *buf, size_t n) {
    if (!(s >= 0)) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm%02lds", t / 3600, t / 60 % 60, t % 60);
    else if (t >= 60) snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, n, "%lds", t);
    return buf;
}

/* ---- signals ---------------------------------------------------------------- */

static volatile sig_atomic_t g_stop = 0;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    /* A second Ctrl-C gets the default action, for a run stuck somewhere;
     * SA_RESTART keeps file writes and waits from failing with EINTR. */
    sa.sa_flags = SA_RESTART | SA_RESETHAND;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ---- progress ------------------------------------------------------------------ */

typedef struct {
    int tty;
    int64_t log_every;
    int line_open; /* a \r progress line is on screen */
    double last_print;
    const char *out;
} printer;

static void close_line(printer *pp) {
    if (pp->line_open) {
        printf("\r\033[K");
        pp->line_open = 0;
    }
}

static int on_progress(void *user, const tlm_train_progress *p) {
    printer *pp = user;
    char tps[32], el[32], eta[32], val[32];
    if (p->event == TLM_TRAIN_STEP) {
        int last = p->step >= p->max_steps;
        if (!pp->tty && !(p->step % pp->log_every == 0 || p->step == 1 || last)) return 0;
        /* A terminal line is redrawn at most ten times a second: tiny models
         * run thousands of steps per second. */
        double now = tlm_now();
        if (pp->tty && !last && p->step != 1 && now - pp->last_print < 0.1) return 0;
        pp->last_print = now;
        if (p->val_loss == p->val_loss) snprintf(val, sizeof val, "%.4f", p->val_loss);
        else snprintf(val, sizeof val, "-");
        printf("%sstep %lld/%lld | loss %.4f | val %s | lr %.2e | %s tok/s | %s | ETA %s%s", pp->tty ? "\r" : "",
               (long long)p->step, (long long)p->max_steps, p->loss, val, p->lr,
               fmt_thousands((unsigned long long)(p->tokens_per_s + 0.5), tps, sizeof tps),
               fmt_duration(p->elapsed_s, el, sizeof el), fmt_duration(p->eta_s, eta, sizeof eta),
               pp->tty ? "\033[K" : "\n");
        pp->line_open = pp->tty;
    } else if (p->event == TLM_TRAIN_EVAL) {
        close_line(pp);
        printf("eval  step %lld: val loss %.4f (best %.4f), train loss %.4f, %s tokens seen\n", (long long)p->step,
               p->val_loss, p->best_val_loss, p->loss, fmt_thousands(p->tokens, tps, sizeof tps));
    } else if (p->event == TLM_TRAIN_SAVE) {
        close_line(pp);
        printf("saved step %lld to %s\n", (long long)p->step, pp->out);
    }
    fflush(stdout);
    return 0;
}

/* ---- flags ----------------------------------------------------------------- */

/* Flags are parsed first into this struct, with a has_ bit for each option,
 * so that on --resume only the flags the user typed replace the saved ones. */
typedef struct {
    const char *data, *out, *device, *dtype;
    cli_model_flags model;
    long batch, accum, warmup, max_steps, eval_every, eval_batches, save_every, log_every;
    long workers, prefetch, seed, threads;
    double lr, min_lr, weight_decay, clip, max_time;
    int has_batch, has_accum, has_warmup, has_max_steps, has_eval_every, has_eval_batches, has_save_every,
        has_log_every, has_workers, has_prefetch, has_seed, has_threads, has_lr, has_min_lr, has_weight_decay,
        has_clip, has_max_time;
    int resume;
} train_flags;

/* --dtype is checked while parsing, so a typo fails before any data is read. */
static int parse_dtype(const char *cmd, const char *flag, const char *val, void *dest) {
    (void)flag; /* the library's message names --dtype */
    if (ops_check_dtype(val)) {
        cli_fail(cmd, tlm_last_error());
        return -1;
    }
    *(const char **)dest = val;
    return 0;
}

static int parse_flags(int argc, char **argv, train_flags *g) {
    memset(g, 0, sizeof *g);
    const cli_flag flags[] = {
        CLI_FLAG_STRING("--data", &g->data, NULL),
        CLI_FLAG_STRING("--out", &g->out, NULL),
        CLI_FLAG_SWITCH("--resume", &g->resume),
        CLI_MODEL_FLAGS(&g->model),
        CLI_FLAG_LONG("--batch", &g->batch, &g->has_batch, 1, 1L << 20),
        CLI_FLAG_LONG("--accum", &g->accum, &g->has_accum, 1, 1L << 20),
        CLI_FLAG_DOUBLE("--lr", &g->lr, &g->has_lr, 1e-12, 1e9),
        CLI_FLAG_DOUBLE("--min-lr", &g->min_lr, &g->has_min_lr, 0, 1e9),
        CLI_FLAG_LONG("--warmup", &g->warmup, &g->has_warmup, 0, 1000000000000L),
        CLI_FLAG_DOUBLE("--weight-decay", &g->weight_decay, &g->has_weight_decay, 0, 1e3),
        CLI_FLAG_DOUBLE("--clip", &g->clip, &g->has_clip, 0, 1e9),
        CLI_FLAG_LONG("--max-steps", &g->max_steps, &g->has_max_steps, 1, 1000000000000L),
        CLI_FLAG_DURATION("--max-time", &g->max_time, &g->has_max_time),
        CLI_FLAG_LONG("--eval-every", &g->eval_every, &g->has_eval_every, 1, 1000000000000L),
        CLI_FLAG_LONG("--eval-batches", &g->eval_batches, &g->has_eval_batches, 1, 1000000000L),
        CLI_FLAG_LONG("--save-every", &g->save_every, &g->has_save_every, 1, 1000000000000L),
        CLI_FLAG_LONG("--log-every", &g->log_every, &g->has_log_every, 1, 1000000000000L),
        CLI_FLAG_STRING("--device", &g->device, NULL),
        CLI_FLAG_CUSTOM("--dtype", parse_dtype, &g->dtype, NULL),
        CLI_FLAG_LONG("--threads", &g->threads, &g->has_threads, 0, 4096),
        CLI_FLAG_LONG("--workers", &g->workers, &g->has_workers, 0, 256),
        CLI_FLAG_LONG("--prefetch", &g->prefetch, &g->has_prefetch, 1, 1024),
        CLI_FLAG_LONG("--seed", &g->seed, &g->has_seed, 0, 0x7fffffffffffffffL),
    };
    return cli_parse_flags(CMD, argc, argv, flags, CLI_NFLAGS(flags), train_usage);
}

/* Lay the typed flags over o (the defaults, or the saved options). */
static void apply_flags(const train_flags *g, tlm_train_opts *o) {
    if (g->data) snprintf(o->data, sizeof o->data, "%s", g->data);
    if (g->out) snprintf(o->out, sizeof o->out, "%s", g->out);
    if (g->device) snprintf(o->device, sizeof o->device, "%s", g->device);
    if (g->dtype) snprintf(o->dtype, sizeof o->dtype, "%s", g->dtype);
    cli_model_apply(&g->model, &o->cfg);
    if (g->has_batch) o->batch = (int)g->batch;
    if (g->has_accum) o->accum = (int)g->accum;
    if (g->has_warmup) o->warmup = g->warmup;
    if (g->has_max_steps) o->max_steps = g->max_steps;
    if (g->has_eval_every) o->eval_every = g->eval_every;
    if (g->has_eval_batches) o->eval_batches = g->eval_batches;
    if (g->has_save_every) o->save_every = g->save_every;
    if (g->has_log_every) o->log_every = g->log_every;
    if (g->has_workers) o->workers = (int)g->workers;
    if (g->has_prefetch) o->prefetch = (int)g->prefetch;
    if (g->has_seed) o->seed = (uint64_t)g->seed;
    if (g->has_threads) o->threads = (int)g->threads;
    if (g->has_lr) o->lr = g->lr;
    if (g->has_lr && !g->has_min_lr) o->min_lr = -1; /* lr/10, as for a new run */
    if (g->has_min_lr) o->min_lr = g->min_lr;
    if (g->has_weight_decay) o->weight_decay = g->weight_decay;
    if (g->has_clip) o->clip = g->clip;
    if (g->has_max_time) o->max_time = g->max_time;
    o->resume = g->resume;
}

/* ---- banner ----------------------------------------------------------------- */

static void print_banner(const tlm_trainer *t) {
    const tlm_train_opts *o = &t->opt;
    const tlm_config *c = &t->model.cfg;
    char a[32], b[32], d[32];
    printf("tinylm train: %s -> %s%s\n", o->data, o->out, o->resume ? " (resuming)" : "");
    printf("  device    %s [%s]\n", t->ops->device_desc, t->device_note);
    const char *blas = "cuBLAS";
    tlm_cpu_info ci;
    if (strncmp(t->ops->name, "cuda", 4)) {
        cpu_info_query(&ci);
        blas = ci.blas;
    }
    printf("  threads   %d, BLAS %s, pinned host memory %s, loader %d worker%s, prefetch %d\n", t->ops->threads, blas,
           loader_pinned(t->loader) ? "yes" : "no", o->workers, o->workers == 1 ? "" : "s", o->prefetch);
    printf("  model     vocab %d, dim %d, layers %d, heads %d, hidden %d, context %d: %s parameters\n", c->vocab,
           c->dim, c->layers, c->heads, c->hidden, c->context,
           fmt_thousands((unsigned long long)t->model.nparams, a, sizeof a));
    printf("  data      train %s tokens, val %s tokens (%lld eval batch%s of %d)\n",
           fmt_thousands(t->train.count, a, sizeof a), fmt_thousands(t->val.count, b, sizeof b),
           (long long)t->eval_nb, t->eval_nb == 1 ? "" : "es", t->eval_B);
    unsigned long long tps = (unsigned long long)o->batch * (unsigned long long)o->accum * (unsigned long long)c->context;
    printf("  step      %s tokens per step (batch %d x accum %d x context %d)\n", fmt_thousands(tps, a, sizeof a),
           o->batch, o->accum, c->context);
    printf("  schedule  lr %g -> %g, warmup %lld, %lld steps", o->lr, o->min_lr, (long long)o->warmup,
           (long long)o->max_steps);
    if (o->max_time > 0) printf(" or %s", fmt_duration(o->max_time, d, sizeof d));
    printf(", weight decay %g, clip %g, eval/save every %lld/%lld\n", o->weight_decay, o->clip,
           (long long)o->eval_every, (long long)o->save_every);
    if (o->resume) printf("  resume    from step %lld (%s tokens seen)\n", (long long)t->step, fmt_thousands(t->tokens, a, sizeof a));
    fflush(stdout);
}

int cmd_train(int argc, char **argv) {
    train_flags g;
    int pr = parse_flags(argc, argv, &g);
    if (pr != CLI_PARSE_OK) return pr == CLI_PARSE_HELP ? 0 : CLI_EXIT_USAGE;
    if (!g.out) return cli_fail(CMD, "--out is required: the run folder for checkpoints (see tinylm train --help)");

    tlm_train_opts o;
    if (g.resume) {
        /* Everything not typed keeps the value the run was saved with. */
        if (train_opts_load(&o, g.out)) return cli_fail(CMD, tlm_last_error());
        if (g.model.preset && config_preset(g.model.preset, &o.cfg)) return cli_fail(CMD, tlm_last_error());
    } else {
        if (!g.data) return cli_fail(CMD, "--data is required: the folder written by tinylm prepare");
        train_opts_default(&o);
        if (config_preset(g.model.preset ? g.model.preset : "seed", &o.cfg)) return cli_fail(CMD, tlm_last_error());
    }
    apply_flags(&g, &o);

    tlm_trainer t;
    if (trainer_open(&t, &o)) return cli_fail(CMD, tlm_last_error());
    print_banner(&t);

    printer pp = {isatty(STDOUT_FILENO), t.opt.log_every, 0, 0.0, t.opt.out};
    install_signals();
    int rc = trainer_run(&t, on_progress, &pp, &g_stop);
    close_line(&pp);
    char el[32], tok[32];
    if (rc < 0) {
        fflush(stdout);
        cli_fail(CMD, tlm_last_error());
        trainer_close(&t);
        return 1;
    }
    if (rc == 1)
        printf("interrupted: saved step %lld to %s; continue with: tinylm train --out %s --resume\n",
               (long long)t.step, t.opt.out, t.opt.out);
    else
        printf("done: step %lld/%lld, val loss %.4f (best %.4f), %s tokens in %s; model in %s\n", (long long)t.step,
               (long long)t.opt.max_steps, t.last_val, t.best_val, fmt_thousands(t.tokens, tok, sizeof tok),
               fmt_duration(t.elapsed_s, el, sizeof el), t.opt.out);
    trainer_close(&t);
    return 0;
}
