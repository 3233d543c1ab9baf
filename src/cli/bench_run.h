/*
 * The measurements behind `tinylm bench`: training throughput, the sgemm
 * peak, prompt processing, batched generation, the tokenizer, peak memory.
 * Nothing here prints; cmd_bench.c formats the results.
 *
 * FLOPs are model FLOPs (what the maths needs, not what a kernel happens to
 * do: the recomputation in attention backward is not counted):
 *   per training token = 6 * P_matmul + 6 * L * D * (T + 1)
 *   P_matmul = L * (4 D^2 + 3 D F) + V * D
 * P_matmul counts the weights that enter matrix products: per layer wqkv
 * (3D x D), wo (D x D), wgu (2F x D), wdown (D x F); and the tied embedding
 * once, as the output head (the input lookup is a gather, no FLOPs). Norm
 * weights are not counted. Each such weight costs 2 FLOPs per token forward
 * and 4 backward (input and weight gradients): 6.
 * Causal attention: query t sees t+1 keys, so over T positions a sequence
 * has T(T+1)/2 query-key pairs; QK^T and PV each cost 2 D FLOPs per pair
 * (all heads together), forward 2 * 2 * D * T(T+1)/2 = 2 D T (T+1) per
 * layer, i.e. 2 D (T+1) per token; backward twice that: 6 L D (T+1).
 */
#ifndef TLM_CLI_BENCH_RUN_H
#define TLM_CLI_BENCH_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "data/tokfile.h"
#include "model/model.h"
#include "ops/ops.h"

/* ---- FLOP counting ---------------------------------------------------------- */

/* Weights that enter matrix products (see above). */
size_t bench_matmul_params(const tlm_config *c);
/* Model FLOPs per training token (forward + backward) at sequence length T. */
double bench_train_flops_per_token(const tlm_config *c, int T);

/* ---- training ---------------------------------------------------------------- */

typedef struct {
    int batch;        /* B sequences of cfg.context tokens */
    int steps;        /* timed optimizer steps */
    int warmup_steps; /* untimed steps first (buffers, caches, thread pools) */
    uint64_t seed;    /* weights and the synthetic tokens */
} bench_train_opts;

typedef struct {
    long long tokens;      /* B * T * steps */
    double seconds;        /* the timed steps */
    double tokens_per_s;
    double loss_first;     /* mean loss of the first step: about ln V for random weights */
    double loss_last;
    double flops_per_token;
    double gflops;         /* model GFLOP/s achieved */
    long long device_peak_bytes; /* the backend's device memory at most (ops mem_usage), 0 if it has none */
} bench_train_result;

/* Random-init model on ops, random tokens; each step is what the trainer does:
 * zero grads, forward + backward, global gradient norm, AdamW (clip 1). */
int bench_train(tlm_ops *ops, const tlm_config *cfg, const bench_train_opts *o, bench_train_result *r);

/* ---- the data pipeline's cost ------------------------------------------------- */

typedef struct {
    int batch, steps, warmup_steps; /* steps: timed steps per block */
    int rounds;                     /* blocks of each kind, alternating */
    uint64_t seed;
    const tlm_tokfile *data;        /* NULL: synthetic tokens held in memory */
    int workers, prefetch;          /* the loader's, as tinylm train --workers/--prefetch */
} bench_loader_opts;

typedef struct {
    double resident_step_s;   /* mean step time, the batch already on the device */
    double loader_step_s;     /* mean step time, each batch from the loader (trainer's feed) */
    double ratio;             /* loader_step_s / resident_step_s (the target: <= 1.02) */
    double resident_tokens_per_s, loader_tokens_per_s;
    int pinned;               /* the loader's ring is page-locked */
    long long steps;          /* timed steps of each kind */
} bench_loader_result;

/* What the data pipeline costs a training step: blocks of `steps` steps with
 * the batch already on the device (model_step on the last staged batch)
 * alternate with blocks where every step takes its batch from the loader
 * exactly as tinylm train does (feed_next: the loader's ring, the upload
 * on the copy queue overlapping the step before), `rounds` of each, both
 * kinds in one process on one model, each block timed from an idle device
 * to an idle device. The model trains throughout (AdamW, clip 1). */
int bench_loader(tlm_ops *ops, const tlm_config *cfg, const bench_loader_opts *o, bench_loader_result *r);

/* ---- matrix-product peak ------------------------------------------------------ */

/* Best of `reps` timed products C[n,n] = A[n,n] @ B[n,n]^T (after one
 * untimed), in GFLOP/s (2 n^3 FLOPs each), with all three matrices in the
 * backend's activation type: fp32 through ops->matmul (the CPU, CUDA's
 * fp32 and tf32 modes), bf16 through ops->matmul_ex in CUDA's bf16 mode,
 * i.e. the tensor cores' bf16 peak that training's MFU is measured
 * against. *dtype receives TLM_ACT_F32 or TLM_ACT_BF16. */
int bench_sgemm(tlm_ops *ops, int n, int reps, double *gflops, int *dtype);

/* ---- generation ---------------------------------------------------------------- */

typedef struct {
    int streams;
    int dtype;            /* the weight format that ran (TLM_GEN_*, AUTO resolved) */
    long new_tokens;      /* tokens actually sampled over all streams */
    double seconds;       /* sampling + stepping (the prompt excluded) */
    double tokens_per_s;  /* new_tokens / seconds */
} bench_gen_result;

/* Sampling used by every generation measurement: tinylm generate's defaults
 * (temperature 0.8, top-p 0.95, no top-k). */
#define BENCH_TEMPERATURE 0.8f
#define BENCH_TOP_P 0.95f

/* A random prompt of n tokens (ids 0..V-2, so never the end-of-text id). */
void bench_random_tokens(int32_t *out, int n, int V, uint64_t seed);

/* Prompt processing: best of `reps` runs of the prompt phase of
 * generate_run (1 stream, 1 new token); tokens/s = nprompt / seconds. */
int bench_prompt(tlm_model *m, const int32_t *prompt, int nprompt, int reps, double *tokens_per_s);

/* One generate_run of `streams` sequences x max_tokens new tokens after the
 * prompt, never stopping at end-of-text (eot = -1), with weights packed as
 * dtype (TLM_GEN_*; packing is not timed). */
int bench_generate(tlm_model *m, const int32_t *prompt, int nprompt, int streams, int max_tokens, uint64_t seed,
                   int dtype, bench_gen_result *r);

/* ---- tokenizer ----------------------------------------------------------------- */

typedef struct {
    size_t bytes;           /* corpus size */
    size_t docs;
    size_t tokens;          /* tokens of the encoded corpus (one EOT per document included) */
    double train_seconds;   /* tokenizer_train at `vocab` on `threads` */
    double encode_mb_s_1;   /* tokenizer_encode_many on 1 thread, 1e6 bytes/s */
    double encode_mb_s_n;   /* ... on `threads` threads */
} bench_tok_result;

/* corpus: a text file (documents separated by lines holding only
 * <|endoftext|>, as in tinylm prepare) or a folder of .txt files. */
int bench_tokenizer(const char *corpus, int vocab, int threads, bench_tok_result *r);

/* ---- memory ---------------------------------------------------------------------- */

/* Peak resident set size of this process in bytes (VmHWM; ru_maxrss where
 * /proc is missing), 0 if unknown. */
long long bench_peak_rss(void);

#endif
