/*
 * Generation: loading a run folder, the KV cache, the sampler and the
 * batched generation loop.
 *
 * Flow for N samples of one prompt (B = N):
 *   prompt [P] --model_forward_cached, chunks of Tchunk, B=1--> caches of sequence 0
 *   caches of sequence 0 copied to sequences 1..B-1 (the prompt is computed once)
 *   repeat: sample one token per live sequence on the host from logits [B,V],
 *           feed tokens [B,1] at position P+k --> logits [B,V]
 * Sampling runs on the CPU on logits copied back (sampler_sample), or on
 * the device where the backend has ops.h's `sample` (only the tokens come
 * back; the uniforms are still drawn here, from each stream's rng).
 * Where the backend can also record ops (ops.h's graph block, CUDA), a
 * decode step (inputs up, forward, draw, tokens down) is recorded once and
 * replayed as one launch per step, with the same tokens.
 */
#ifndef TLM_INFER_INFER_H
#define TLM_INFER_INFER_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "model/model_infer.h"
#include "text/tokenizer.h"
#include "util/common.h"

/* ---- sampler ------------------------------------------------------------ */

typedef struct {
    float temperature; /* 0 = greedy argmax; logits are divided by it */
    int top_k;         /* keep the k most likely tokens; 0 (or >= V) = off */
    float top_p;       /* nucleus: smallest most-likely set with mass >= top_p,
                        * taken after top-k; 1 = off. Must be in (0, 1]. */
} tlm_sampler_params;

/* Workspace for one vocabulary size; reused for every draw (no allocation
 * per token). Not thread-safe: one per thread. */
typedef struct {
    tlm_sampler_params p;
    int V;
    int32_t *idx; /* [V] candidate token ids */
    float *prob;  /* [V] unnormalised probabilities of the candidates */
    double *hist; /* [256] probability mass per bucket (top-p) */
} tlm_sampler;

/* Error naming --temperature, --top-k or --top-p if p is out of range. */
int sampler_check_params(const tlm_sampler_params *p);
/* Validates p as above. */
int sampler_init(tlm_sampler *s, int V, const tlm_sampler_params *p);
void sampler_free(tlm_sampler *s);
/* One token from logits[V]. Greedy (temperature 0 or top_k 1) draws no
 * random numbers; otherwise exactly one uniform is drawn from rng, so a
 * sequence's stream of tokens depends only on its own rng. */
int32_t sampler_sample(tlm_sampler *s, const float *logits, tlm_rng *rng);
/* The same draw with its uniform u in [0, 1) given (the one sampler_sample
 * would take from rng; ignored when greedy): a device sampler (ops.h
 * `sample`) draws the uniforms on the host and is held to this. */
int32_t sampler_sample_u(tlm_sampler *s, const float *logits, float u);
/* Does p draw without random numbers (temperature 0 or top_k 1)? */
int sampler_greedy(const tlm_sampler_params *p);
/* Index of the largest logit; ties go to the lowest id. */
int32_t sampler_argmax(const float *logits, int V);

/* ---- KV cache ----------------------------------------------------------- */

/* Per layer l: k[l], v[l] are device buffers. kv_dtype 0 (the reference
 * path, kv_store/attn_cached): fp32 [B,Tmax,D]. TLM_KV_F32 or TLM_KV_F16
 * (packed weights, attn_decode): head-major [B,H,Tmax,hd] of that element
 * type (halves behind the float *), optionally after a shared prefix of P
 * positions, pk[l], pv[l] [H,P,hd], that every sequence reads (one prompt,
 * many samples: stored and streamed once instead of B times); the
 * sequences' own rows then hold positions P .. P+Tmax-1. */
typedef struct {
    int L, B, P, Tmax, D, H;
    int kv_dtype;
    float **k, **v;   /* host arrays [L] of device pointers */
    float **pk, **pv; /* the shared prefix, NULL when P = 0 */
} tlm_kvcache;

/* The reference path's cache (kv_dtype 0). */
int kvcache_alloc(tlm_kvcache *c, tlm_model *m, int B, int Tmax);
/* The cache for model_infer_kv_dtype(weights) (0, TLM_KV_F32, TLM_KV_F16). */
int kvcache_alloc_dtype(tlm_kvcache *c, tlm_model *m, int B, int Tmax, int kv_dtype);
/* The same with a shared prefix of P positions (P = 0: none) and Tmax
 * positions of each sequence's own after it. */
int kvcache_alloc_shared(tlm_kvcache *c, tlm_model *m, int B, int P, int Tmax, int kv_dtype);
void kvcache_free(tlm_kvcache *c, tlm_model *m);
/* The prefix as model_forward_packed takes it. */
tlm_kv_prefix kvcache_prefix(const tlm_kvcache *c);
/* Copy positions 0..npos-1 of sequence `src` to every other sequence, so a
 * shared prompt is computed once for the whole batch. */
void kvcache_broadcast(tlm_kvcache *c, tlm_model *m, int src, int npos);

/* ---- the generation loop ------------------------------------------------ */

typedef struct {
    int samples;                 /* B >= 1, all from the same prompt */
    int max_tokens;              /* new tokens per sequence, >= 1 */
    tlm_sampler_params sampling;
    uint64_t seed;               /* sequence i draws from rng(seed, seq_base + i) */
    int seq_base;                /* index of sequence 0 for seeding (0 normally) */
    int chunk;                   /* prompt positions per forward; 0 = 128 */
    /* Number format (model_infer.h): TLM_GEN_AUTO (0, the backend's fastest:
     * packed bf16 on CPUs with AVX-512 BF16 / AVX2 / NEON), TLM_GEN_F32,
     * TLM_GEN_BF16, TLM_GEN_I8, or TLM_GEN_REF (the unpacked fp32 reference path). The
     * weights are packed at the start of the call (a few ms) unless
     * `weights` already holds them, which then decides the format. */
    int dtype;
    const tlm_infer_weights *weights;
    /* Non-zero: never record the decode step (ops.h's graph block), step
     * op by op as on a device without graphs. The environment variable
     * TLM_NO_GRAPH=1 does the same (to compare the two, e.g. in bench). */
    int no_graph;
} tlm_gen_params;

typedef struct {
    int prompt_tokens;      /* positions processed for the prompt */
    long new_tokens;        /* tokens sampled over all sequences, incl. a final EOT */
    int steps;              /* batched forward steps after the prompt */
    double prompt_seconds;  /* prompt forward (+ cache broadcast) */
    double gen_seconds;     /* sampling + stepping, all sequences */
    int dtype;              /* the number format used (TLM_GEN_F32, _BF16, _I8 or _REF) */
    int graph_records;      /* decode steps recorded as a graph (1, more when one went stale) */
    int graph_launches;     /* decode steps run as one graph launch */
} tlm_gen_stats;

/* Called for every new token of sequence seq (0..B-1), in order; the EOT
 * that ends a sequence is not reported. Return non-zero to stop everything
 * (generate_run then returns 0 with what it has). */
typedef int (*tlm_token_fn)(void *user, int seq, int32_t token);

/* The rng of sequence `index` under `seed` (independent of the batch size). */
void generate_seed_rng(tlm_rng *r, uint64_t seed, int index);

/* Every check generate_run makes before computing anything: parameter
 * ranges, prompt ids, prompt + max_tokens within the context. */
int generate_validate(const tlm_model *m, const int32_t *prompt, int nprompt, int eot, const tlm_gen_params *p);

/* Generate p->samples continuations of prompt[nprompt] (host token ids).
 * An empty prompt starts from the eot token. Each sequence stops at eot
 * (eot < 0: never) or after max_tokens. The prompt plus max_tokens must fit
 * the model context (error names --max-tokens and the context otherwise).
 * out (may be NULL) receives [B, max_tokens] new tokens, out_len[B] their
 * counts (EOT excluded). stats may be NULL. */
int generate_run(tlm_model *m, const int32_t *prompt, int nprompt, int eot, const tlm_gen_params *p,
                 tlm_token_fn on_token, void *user, int32_t *out, int *out_len, tlm_gen_stats *stats);

/* ---- run folders -------------------------------------------------------- */

/* Load RUN/model.safetensors into m (already created for its config):
 * every tensor of m->tensors must be present with its exact shape; errors
 * name the file and the tensor. */
int infer_load_weights(tlm_model *m, const char *path);

/* A loaded run folder: what `tinylm generate` and the public tlm_generator
 * work with. */
struct tlm_generator {
    tlm_ops *ops;
    tlm_model model;
    tlm_tokenizer *tok;
    int eot;
    char run[1024];
    tlm_infer_weights packed; /* the model's weights packed for generation */
};

/* Open RUN (config.json, model.safetensors, tokenizer.json) on the device
 * named by spec ("auto", "cpu", ...); note (may be NULL) receives the
 * device banner. Errors name the file at fault. */
tlm_generator *generator_open(const char *run, const char *device, int threads, char *note, size_t note_len);
void generator_close(tlm_generator *g);
/* Re-pack g's weights for generation in `dtype` (TLM_GEN_*; generator_open
 * packs TLM_GEN_AUTO). Error naming --dtype if the device cannot. */
int generator_set_dtype(tlm_generator *g, int dtype);

#endif
