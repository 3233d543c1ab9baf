/*
 * tinylm generate: sample text from a trained run folder.
 *
 * The N samples run as one batch over the same prompt (the prompt is
 * processed once). Text goes to stdout: with one sample it streams token by
 * token; with several, each sample is printed whole under a header when the
 * batch is done. The device banner and the speed summary go to stderr, so
 * stdout holds only the text.
 *
 * Context: the prompt plus --max-tokens must fit the model context. An
 * explicit --max-tokens that does not fit is an error naming both numbers;
 * the default (200) is shortened to fit, with a note.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "infer/infer.h"
#include "util/common.h"

#define CMD "generate"

static void generate_usage(FILE *f) {
    fprintf(f,
            "usage: tinylm generate --model RUN [flags]\n"
            "\n"
            "Sample text from a trained model (KV-cached; several samples run as one batch).\n"
            "\n"
            "  --model RUN         run folder: config.json, model.safetensors, tokenizer.json\n"
            "  --prompt TEXT       text to continue (default: empty, start of a document)\n"
            "  --max-tokens N      new tokens per sample (default 200, shortened to fit the context;\n"
            "                      prompt + N must fit the model context)\n"
            "  --temperature T     0 = greedy; higher = more random (default 0.8)\n"
            "  --top-k K           sample from the K most likely tokens only (default 0 = off)\n"
            "  --top-p P           nucleus: smallest set of tokens with probability >= P, in (0, 1]\n"
            "                      (default 0.95; 1 = off); applied after --top-k\n"
            "  --seed S            random seed (default: from the clock; printed in the summary)\n"
            "  --samples N         number of samples, generated as one batch (default 1)\n"
            "  --threads N         CPU threads (default: all cores)\n"
            "  --device D          auto, cpu (default auto)\n"
            "  --dtype T           weight format for generation: bf16, int8 (CPU: 8-bit weights and\n"
            "                      inputs per group of 32 with fp32 scales; about half bf16's bytes,\n"
            "                      ~4x its rounding error), fp32, ref (unpacked fp32, op by op) or\n"
            "                      auto (default: bf16 where the CPU has bf16 dot products or fast\n"
            "                      conversion, else fp32); the summary names it\n");
}

typedef struct {
    const tlm_tokenizer *tok;
    int stream; /* print tokens as they come (one sample) */
} gen_print;

static int on_token(void *user, int seq, int32_t token) {
    gen_print *p = user;
    (void)seq;
    if (!p->stream) return 0;
    size_t n = 0;
    const unsigned char *b = tokenizer_token_bytes(p->tok, token, &n);
    if (b && n) fwrite(b, 1, n, stdout);
    fflush(stdout);
    return 0;
}

/* (0, 1] has an open end, which a lo..hi range cannot say. */
static int parse_top_p(const char *cmd, const char *flag, const char *val, void *dest) {
    double *top_p = dest;
    if (cli_parse_float(cmd, flag, val, -1e300, 1e300, top_p)) return -1;
    if (!(*top_p > 0.0 && *top_p <= 1.0)) {
        fprintf(stderr, "tinylm %s: error: %s %g is out of range: use a value in (0, 1] (1 = off)\n", cmd, flag,
                *top_p);
        return -1;
    }
    return 0;
}

static int parse_dtype(const char *cmd, const char *flag, const char *val, void *dest) {
    (void)flag; /* the library's message names --dtype */
    if (model_infer_parse_dtype(val, dest)) {
        cli_fail(cmd, tlm_last_error());
        return -1;
    }
    return 0;
}

int cmd_generate(int argc, char **argv) {
    const char *run = NULL, *prompt = "", *device = "auto";
    int dtype = TLM_GEN_AUTO;
    long max_tokens = 200, top_k = 0, samples = 1, threads = 0, seed_l = 0;
    double temperature = 0.8, top_p = 0.95;
    int max_given = 0, seed_given = 0;
    const cli_flag flags[] = {
        CLI_FLAG_STRING("--model", &run, NULL),
        CLI_FLAG_STRING("--prompt", &prompt, NULL),
        CLI_FLAG_LONG("--max-tokens", &max_tokens, &max_given, 1, 1L << 30),
        CLI_FLAG_DOUBLE("--temperature", &temperature, NULL, 0.0, 1e6),
        CLI_FLAG_LONG("--top-k", &top_k, NULL, 0, 1L << 30),
        CLI_FLAG_CUSTOM("--top-p", parse_top_p, &top_p, NULL),
        CLI_FLAG_LONG("--seed", &seed_l, &seed_given, 0, 0x7fffffffffffffffL),
        CLI_FLAG_LONG("--samples", &samples, NULL, 1, 4096),
        CLI_FLAG_LONG("--threads", &threads, NULL, 0, 4096),
        CLI_FLAG_STRING("--device", &device, NULL),
        CLI_FLAG_CUSTOM("--dtype", parse_dtype, &dtype, NULL),
    };
    int parsed = cli_parse_flags(CMD, argc, argv, flags, CLI_NFLAGS(flags), generate_usage);
    if (parsed != CLI_PARSE_OK) return parsed == CLI_PARSE_HELP ? 0 : CLI_EXIT_USAGE;
    if (!run) return cli_fail(CMD, "--model is required: the run folder that `tinylm train` wrote");
    uint64_t seed = seed_given ? (uint64_t)seed_l : (uint64_t)(tlm_now() * 1e6) & 0x7fffffffffffffffULL;

    char note[256] = "";
    tlm_generator *g = generator_open(run, device, (int)threads, note, sizeof note);
    if (!g) return cli_fail(CMD, tlm_last_error());
    if (dtype != TLM_GEN_AUTO && generator_set_dtype(g, dtype)) {
        cli_fail(CMD, tlm_last_error());
        generator_close(g);
        return 1;
    }
    const tlm_config *c = &g->model.cfg;

    int rc = 1;
    size_t plen = strlen(prompt);
    /* Byte-level BPE never yields more tokens than bytes. */
    int32_t *ids = malloc((plen + 1) * sizeof *ids);
    int32_t *out = NULL;
    int *lens = NULL;
    if (!ids) {
        cli_fail(CMD, "out of memory encoding --prompt");
        goto done;
    }
    size_t np = tokenizer_encode(g->tok, prompt, plen, ids, plen + 1);
    long used = np > 0 ? (long)np : 1; /* an empty prompt starts from <|endoftext|> */
    long asked = max_tokens;
    if (!max_given && used + max_tokens > c->context && used < c->context) max_tokens = c->context - used;
    tlm_gen_params p = {.samples = (int)samples,
                        .max_tokens = (int)max_tokens,
                        .sampling = {.temperature = (float)temperature, .top_k = (int)top_k, .top_p = (float)top_p},
                        .seed = seed,
                        .weights = &g->packed};
    /* Every input check before the banner, so bad input gives one line. */
    if (generate_validate(&g->model, ids, (int)np, g->eot, &p)) {
        cli_fail(CMD, tlm_last_error());
        goto done;
    }
    fprintf(stderr, "tinylm generate: %s (%d layers, dim %d, vocab %d, context %d) on %s\n", run, c->layers,
            c->dim, c->vocab, c->context, note[0] ? note : g->ops->name);
    if (max_tokens != asked)
        fprintf(stderr, "note: --max-tokens shortened from %ld to %ld to fit the model context of %d\n", asked,
                max_tokens, c->context);
    out = malloc((size_t)samples * (size_t)max_tokens * sizeof *out);
    lens = calloc((size_t)samples, sizeof *lens);
    if (!out || !lens) {
        cli_fail(CMD, "out of memory: use fewer --samples or --max-tokens");
        goto done;
    }
    gen_print pr = {.tok = g->tok, .stream = samples == 1};
    if (pr.stream) {
        fputs(prompt, stdout);
        fflush(stdout);
    }
    tlm_gen_stats st;
    if (generate_run(&g->model, ids, (int)np, g->eot, &p, on_token, &pr, out, lens, &st)) {
        if (pr.stream) fputc('\n', stdout);
        cli_fail(CMD, tlm_last_error());
        goto done;
    }
    if (pr.stream) {
        fputc('\n', stdout);
    } else {
        for (int b = 0; b < (int)samples; b++) {
            size_t n = 0;
            char *text = tokenizer_decode(g->tok, out + (size_t)b * max_tokens, (size_t)lens[b], &n);
            if (!text) {
                cli_fail(CMD, tlm_last_error());
                goto done;
            }
            printf("%s=== sample %d/%ld ===\n%s", b ? "\n" : "", b + 1, samples, prompt);
            fwrite(text, 1, n, stdout);
            fputc('\n', stdout);
            free(text);
        }
    }
    fflush(stdout);
    double pt = st.prompt_seconds, gt = st.gen_seconds;
    fprintf(stderr,
            "prompt: %d token%s in %.3fs (%.1f tok/s) | generation: %ld tokens over %ld sample%s in %.3fs "
            "(%.1f tok/s) | weights %s | seed %llu\n",
            st.prompt_tokens, st.prompt_tokens == 1 ? "" : "s", pt, pt > 0 ? st.prompt_tokens / pt : 0.0, st.new_tokens, samples,
            samples == 1 ? "" : "s", gt, gt > 0 ? (double)st.new_tokens / gt : 0.0, model_infer_dtype_name(st.dtype), (unsigned long long)seed);
    rc = 0;
done:
    free(ids);
    free(out);
    free(lens);
    generator_close(g);
    return rc;
}
