/*
 * The op interface: everything the model needs from a compute device.
 *
 * A backend (src/backends/cpu, later cuda) fills a tlm_ops table once at
 * start-up. The model is written once against this table and never names a
 * backend; a backend never includes model headers.
 *
 * Conventions
 *  - All tensors are row-major float32 unless said otherwise. Pointers named
 *    in comments as [A,B] are device buffers obtained from ops->alloc (on the
 *    CPU that is ordinary host memory).
 *  - ACTIVATIONS: pointers typed `void *` / `const void *` below hold
 *    elements of o->act_dtype: TLM_ACT_F32 (float) or TLM_ACT_BF16
 *    (bfloat16: the top 16 bits of a float, rounded to nearest even). They
 *    are the inputs and outputs of the matrix products that a backend may
 *    keep narrow in memory: normalised rows (xn), qkv, the attention output,
 *    gate|up, the SwiGLU output, the logits, and their gradients. Pointers
 *    typed float stay fp32 whatever act_dtype is: the residual stream and
 *    its gradient (embed, add_inplace, rmsnorm's x and dx), rstd, lse, the
 *    losses, weights, gradients, AdamW moments, KV caches and everything in
 *    the generation block. Arithmetic inside ops is fp32 either way (an
 *    activation is widened on load and rounded once on store), so with
 *    TLM_ACT_F32 nothing changes from an all-fp32 interface.
 *  - N = B*T rows. D = model width, H heads, hd = D/H head size, F = SwiGLU
 *    hidden width, V = vocabulary.
 *  - Fused projections: the attention input projection is one [3D, D]
 *    matrix whose rows are q (D rows), then k, then v; so qkv activations
 *    are [N, 3D] with each row laid out q|k|v, and head h of q sits at
 *    columns h*hd .. h*hd+hd-1. The MLP input projection is one [2F, D]
 *    matrix, gate rows then up rows; its activations are [N, 2F], gate|up.
 *  - "_bwd" ops that produce parameter gradients ACCUMULATE into them
 *    (+=), so gradient accumulation across micro-batches is free; gradients
 *    of activations are OVERWRITTEN unless said otherwise.
 *  - Ops may run asynchronously on a device; ops->sync waits for all of them.
 *    Reads of results on the host go through copy_d2h (which syncs). A
 *    training step therefore keeps what it produces (losses, the gradient
 *    norm) on the device and reads it with one copy_d2h when it is printed.
 *  - Ops have no error return. A device error makes a backend "failed":
 *    later ops do nothing and reads return NaN; ops->status (optional)
 *    turns that into a one-line error for the caller.
 */
#ifndef TLM_OPS_OPS_H
#define TLM_OPS_OPS_H

#include <stddef.h>
#include <stdint.h>

typedef struct tlm_ops tlm_ops;

/* ---- generation block: packed weight handles (see the end of tlm_ops) ---- */
typedef struct tlm_packed tlm_packed; /* opaque, owned by the backend that packed it */
/* storage of packed weights (TLM_PACK_I8 is 4: model_infer.h's TLM_GEN_REF is 3) */
enum { TLM_PACK_F32 = 1, TLM_PACK_BF16 = 2, TLM_PACK_I8 = 4 };
enum { TLM_PACK_LINEAR = 0, TLM_PACK_SWIGLU = 1 }; /* what matmul_packed computes */
enum { TLM_KV_F32 = 1, TLM_KV_F16 = 2 };           /* elements of attn_decode's caches */
/* elements of activation buffers (o->act_dtype) and of matmul_ex's operands */
enum { TLM_ACT_F32 = 1, TLM_ACT_BF16 = 2 };

/* A point in a backend's stream of ops (see the upload block of tlm_ops). */
typedef struct tlm_event tlm_event; /* opaque, owned by the backend that made it */
/* A recorded sequence of ops (see the graph block of tlm_ops). */
typedef struct tlm_graph tlm_graph; /* opaque, owned by the backend that recorded it */

struct tlm_ops {
    const char *name;        /* "cpu", "cpu-ref", "cuda" */
    char device_desc[128];   /* e.g. "AMD EPYC, 2 threads, OpenBLAS 0.3.21" */
    void *ctx;               /* backend-private state */
    int threads;             /* compute threads (CPU) */
    /* Element type of activation buffers (see Conventions): TLM_ACT_F32 on
     * the CPU backends and in CUDA's fp32/tf32 modes, TLM_ACT_BF16 in CUDA's
     * bf16 mode (half the activation traffic of a training step). Callers
     * size activation buffers with it (model_act_bytes). */
    int act_dtype;

    /* ---- memory ---------------------------------------------------- */
    /* Device memory, zero-filled, 64-byte aligned. NULL + error on failure. */
    void *(*alloc)(tlm_ops *o, size_t bytes);
    void (*free)(tlm_ops *o, void *p);
    /* Host memory for staging transfers (the loader's batch ring). Page-locked
     * where the device can DMA from it asynchronously (CUDA: cudaHostAlloc);
     * aligned ordinary memory otherwise. *pinned says which was given. */
    void *(*host_alloc)(tlm_ops *o, size_t bytes, int *pinned);
    void (*host_free)(tlm_ops *o, void *p, int pinned);
    void (*copy_h2d)(tlm_ops *o, void *dst, const void *src, size_t bytes);
    void (*copy_d2h)(tlm_ops *o, void *dst, const void *src, size_t bytes);
    void (*copy_d2d)(tlm_ops *o, void *dst, const void *src, size_t bytes);
    void (*zero)(tlm_ops *o, void *p, size_t bytes);
    void (*sync)(tlm_ops *o);

    /* ---- dense algebra -------------------------------------------- */
    /* C[M,N] = alpha * op(A) @ op(B) + beta * C, row-major, BLAS semantics:
     * op(A) is [M,K] (A stored [K,M] when transA), op(B) is [K,N] (B stored
     * [N,K] when transB); lda/ldb/ldc are row strides in elements. */
    void (*matmul)(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha,
                   const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
    /* The same with an element type per operand, adt, bdt, cdt each
     * TLM_ACT_F32 or TLM_ACT_BF16 (strides still in elements); the model's
     * products pass o->act_dtype for activations and TLM_ACT_F32 for
     * weights, weight gradients and the residual stream. Sums are fp32 and
     * C is rounded once (to bf16 when cdt is). With all three F32 it is
     * exactly matmul. Precision: a backend computing in bf16 (CUDA's bf16
     * mode) rounds fp32 operands to bf16 first; one computing in fp32 (the
     * CPU) widens bf16 operands, exactly. */
    void (*matmul_ex)(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const void *A, int adt,
                      int lda, const void *B, int bdt, int ldb, float beta, void *C, int cdt, int ldc);
    /* y[n] += x[n] (residual connections). */
    void (*add_inplace)(tlm_ops *o, float *y, const float *x, size_t n);
    /* OPTIONAL (NULL where act_dtype is TLM_ACT_F32: nothing to convert).
     * dst[n] (activation) = src[n] (fp32) rounded to act_dtype, the rounding
     * matmul_ex applies to an fp32 operand. For an fp32 tensor that feeds
     * several bf16 products (the residual gradient feeds two in each
     * linear backward), so it is rounded once instead of once per product. */
    void (*to_act)(tlm_ops *o, void *dst, const float *src, size_t n);

    /* ---- embedding ------------------------------------------------ */
    /* out[N,D] = wte[tok[n], :] */
    void (*embed_fwd)(tlm_ops *o, float *out, const int32_t *tok, const float *wte, int N, int D);
    /* dwte[tok[n], :] += dout[n, :] (accumulates; repeated tokens sum) */
    void (*embed_bwd)(tlm_ops *o, float *dwte, const int32_t *tok, const float *dout, int N, int D);

    /* ---- RMSNorm: out = x / sqrt(mean(x^2) + eps) * w ----------------- */
    /* out[N,D] (activation), rstd[N] (saved for backward, may be NULL),
     * x[N,D] (fp32 residual), w[D] */
    void (*rmsnorm_fwd)(tlm_ops *o, void *out, float *rstd, const float *x, const float *w, int N, int D,
                        float eps);
    /* dx[N,D] (fp32, overwritten), dw[D] (accumulated), from dout (activation
     * gradient), x (fp32), w, rstd */
    void (*rmsnorm_bwd)(tlm_ops *o, float *dx, float *dw, const void *dout, const float *x, const float *w,
                        const float *rstd, int N, int D);

    /* ---- RoPE (rotate-half convention, as Hugging Face Llama) ----------
     * For head vector x[0..hd), pairs (x[i], x[i+hd/2]) for i < hd/2 rotate by
     * angle pos * theta^(-2i/hd). Applied in place to the q and k parts of
     * qkv[B,T,3D]; token t of every sequence has position pos0 + t.
     * rope_bwd applies the inverse rotation to dq, dk in place in dqkv. */
    void (*rope_fwd)(tlm_ops *o, void *qkv, int B, int T, int H, int hd, int pos0, float theta);
    void (*rope_bwd)(tlm_ops *o, void *dqkv, int B, int T, int H, int hd, int pos0, float theta);

    /* ---- causal self-attention, fused (never stores T x T) -------------
     * out[B,T,D] = softmax(q k^T / sqrt(hd) + causal mask) v per head, reading
     * q, k, v from qkv[B,T,3D]. lse[B,H,T] receives the log-sum-exp of each
     * score row, which backward uses to recompute probabilities.
     * out, qkv: activations; lse: fp32. */
    void (*attn_fwd)(tlm_ops *o, void *out, float *lse, const void *qkv, int B, int T, int H, int hd);
    /* dqkv[B,T,3D] (overwritten) from dout[B,T,D], out, lse, qkv; all but
     * lse activations. */
    void (*attn_bwd)(tlm_ops *o, void *dqkv, const void *dout, const void *out, const float *lse,
                     const void *qkv, int B, int T, int H, int hd);

    /* ---- attention over a KV cache (generation) ------------------------
     * kv_store copies the k and v parts of qkv[B,T,3D] into the caches
     * kc, vc [B,Tmax,D] at positions pos0 .. pos0+T-1.
     * attn_cached: out[B,T,D]; query t (position pos0+t) attends to cached
     * keys 0 .. pos0+t.
     * qkv and out are activations; the caches kc, vc are fp32. */
    void (*kv_store)(tlm_ops *o, float *kc, float *vc, const void *qkv, int B, int T, int Tmax, int D,
                     int pos0);
    void (*attn_cached)(tlm_ops *o, void *out, const void *qkv, const float *kc, const float *vc, int B,
                        int T, int Tmax, int H, int hd, int pos0);

    /* ---- SwiGLU: a = silu(gate) * up ----------------------------------
     * gu[N,2F] (gate|up per row), a[N,F]: activations. */
    void (*swiglu_fwd)(tlm_ops *o, void *a, const void *gu, int N, int F);
    /* dgu[N,2F] (overwritten) from da[N,F] and gu: activations. */
    void (*swiglu_bwd)(tlm_ops *o, void *dgu, const void *da, const void *gu, int N, int F);

    /* ---- softmax + cross-entropy over the vocabulary --------------------
     * logits[N,V] (in/out), targets[N] (int32; a negative target is ignored:
     * loss 0, gradient 0), losses[N] out (natural log, per row).
     * If want_grad, logits are overwritten by dscale * (softmax - onehot).
     * logits: activations (the softmax and the loss are computed in fp32
     * from them); losses: fp32. */
    void (*xent)(tlm_ops *o, void *logits, float *losses, const int32_t *targets, int N, int V, float dscale,
                 int want_grad);
    /* out[0] = the mean of losses[N] over the rows whose targets[N] >= 0
     * (0 when there are none), summed in double: xent's per-row losses
     * reduced to the batch loss. A device scalar, so a step never waits for
     * its loss; the host reads the losses of a whole step with one
     * copy_d2h, and only when it records them. */
    void (*loss_mean)(tlm_ops *o, float *out, const float *losses, const int32_t *targets, int N);

    /* ---- optimizer ------------------------------------------------------
     * out[0] (+)= sum(x[i]^2) over n elements; accumulate=0 overwrites. Kept
     * on the device so clipping needs no host round trip. */
    void (*sumsq)(tlm_ops *o, float *out, const float *x, size_t n, int accumulate);
    /* AdamW on n parameters. The gradient actually used is g * s, where
     * s = min(1, clip / sqrt(*gnorm_sq)) if clip > 0 (gnorm_sq is a device
     * scalar produced by sumsq over all gradients) and 1 otherwise.
     * m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
     * p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p).
     * t is the 1-based step number. */
    void (*adamw)(tlm_ops *o, float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                  float b2, float eps, float wd, int t, const float *gnorm_sq, float clip);

    /* ==== generation: packed weights and fused decode ops ================
     * (block owned by the generation path: src/model/model_infer.c, with the
     * CPU versions in src/backends/cpu/cpu_infer*.c)
     *
     * Token-by-token generation multiplies small activations (M = number of
     * streams, often 1) by every weight matrix, so it is bound by reading the
     * weights. A backend therefore converts each matrix ONCE into its own
     * inference format (e.g. bf16 panels laid out for its SIMD kernel) and
     * multiplies by that handle every step; the fp32 parameters stay as they
     * are for training and checkpoints.
     *
     * Every result row depends only on its own input row and on the weights,
     * summed in an order fixed by the format: M (the number of streams) and
     * the thread count never change a bit of it, so a batch of streams
     * generates exactly what each stream would alone. */

    /* Storage the backend runs generation fastest with: TLM_PACK_BF16 where
     * it has bf16 dot products or cheap bf16 -> fp32 conversion, else
     * TLM_PACK_F32. 0 (with pack == NULL): no packed ops, use the
     * unpacked path (matmul, rmsnorm_fwd, ...). */
    int pack_dtype_fast;
    /* The dtypes pack accepts, as bits 1u << TLM_PACK_*; 0 means F32 and
     * BF16 (tables written before TLM_PACK_I8, e.g. CUDA's). */
    unsigned pack_dtypes;
    /* Convert w[N,K] (a linear layer's [out,in] rows, device fp32) into a
     * packed handle of dtype TLM_PACK_F32, TLM_PACK_BF16 (round to nearest
     * even) or TLM_PACK_I8: symmetric int8 per (row n, group of 32
     * consecutive k; the last group zero padded), scale s = max|w| / 127 in
     * fp32, q = w / s rounded to nearest even (all q = 0 when s = 0).
     * kind TLM_PACK_LINEAR: y = x W^T. kind TLM_PACK_SWIGLU: N = 2F
     * rows, gate rows then up rows (as wgu), and the product yields
     * silu(x Wg^T) * (x Wu^T), [M,F]. NULL + error on failure. */
    tlm_packed *(*pack)(tlm_ops *o, const float *w, int N, int K, int dtype, int kind);
    void (*pack_free)(tlm_ops *o, tlm_packed *p);
    /* y[M,Nout] = f(xn[M,K] @ W^T), or y += that when accumulate (LINEAR only;
     * the residual connections), Nout = N (LINEAR) or N/2 (SWIGLU).
     * xn = rmsnorm(x, norm_w, eps) when norm_w is given (the norm is fused
     * into reading x), x itself otherwise. With TLM_PACK_BF16 xn is rounded
     * to bf16 too: products are then exact and sums are fp32. With
     * TLM_PACK_I8 each row of xn is quantised like the weights (per group g
     * of 32 k: sx = max|xn| / 127, xq = xn / sx rounded to nearest even) and
     *   y[m,n] = sum over g in increasing order, from 0, in fp32 of
     *            fmaf(sx[m,g] * sw[n,g], (float)(sum_k xq * wq), y)
     * (the integer sums are exact). y must not overlap x. */
    void (*matmul_packed)(tlm_ops *o, float *y, const float *x, int M, const tlm_packed *w, const float *norm_w,
                          float eps, int accumulate);
    /* rope_fwd + kv_store + attn_cached in one pass: rotates q and k of
     * qkv[B,T,3D] in place (positions pos0 + t), stores k and v into the
     * caches kc, vc and writes out[B,T,D] = attention of each query over
     * cached keys 0 .. pos0+t. These caches are HEAD-MAJOR, [B,H,Tmax,hd]
     * (unlike kv_store's [B,Tmax,D]): the keys of one (sequence, head) are
     * contiguous, so attention streams them from memory, which bounds it at
     * many streams. Elements are kv_dtype: TLM_KV_F32, or TLM_KV_F16 (IEEE
     * half, rounded to nearest even, saturated to +-65504) for half the
     * bytes; sums are fp32 either way.
     * A SHARED PREFIX (kp, vp, P > 0; NULL, NULL, 0 without one): positions
     * 0 .. P-1 are the same for every sequence (one prompt, several
     * samples), so they are stored once, kp, vp [H,P,hd] of kv_dtype, and
     * each sequence's caches hold only its own positions: row r of kc, vc
     * is position P + r (so pos0 >= P and pos0 - P + T <= Tmax). Attention
     * over many streams then reads the prefix once per step (from cache)
     * instead of once per stream (from memory). Keys are visited prefix
     * first, then the sequence's own rows, whatever B is.
     * pos_dev (DEVICE, one int32; NULL: use pos0): when given, the position
     * of the first query is *pos_dev as it is WHEN THE OP RUNS, not when it
     * is enqueued, so a recorded step (graph block below) replays at later
     * positions; pos0 is then ignored. Tables the op keeps (RoPE angles) are
     * sized from the cache capacity P + Tmax, never from the position, so a
     * replay never needs them to grow. A position outside the cache
     * (< P, or past P + Tmax - T) stores nothing and writes NaN to out. */
    void (*attn_decode)(tlm_ops *o, float *out, float *qkv, void *kc, void *vc, int kv_dtype, const void *kp,
                        const void *vp, int P, int B, int T, int Tmax, int H, int hd, int pos0,
                        const int32_t *pos_dev, float theta);
    /* OPTIONAL (NULL: the model uses embed_fwd): out[N,D] = wte[tok[n], :]
     * with tok on the HOST. A step embeds only B rows: the CPU copies them
     * on the calling thread (embed_fwd may start a parallel region, whose
     * spinning threads then compete with the generation ops' own). */
    void (*embed_rows)(tlm_ops *o, float *out, const int32_t *tok_host, const float *wte, int N, int D);
    /* OPTIONAL (NULL: the caller loops itself): run fn(arg, c) for every c
     * in [0, n) on the backend's host compute threads and return when all
     * are done; the calls must be independent. Host work between steps
     * (sampling many streams) then uses the threads the backend already
     * runs, instead of a second pool spinning against them. */
    void (*host_for)(tlm_ops *o, int n, void (*fn)(void *arg, int c), void *arg);
    /* OPTIONAL (NULL: the caller copies the logits back and samples on the
     * host with sampler_sample). Draw one token per row on the device and
     * return only the tokens: tokens_host[b] (HOST, B int32) is the token
     * sampler_sample (src/infer/sampler.c) draws from row b of logits_dev
     * (DEVICE, row b at logits_dev + b * ld; ld == 0: every row reads row 0,
     * the one row of logits after a shared prompt) with temperature,
     * top_k, top_p and the uniform uniforms_host[b] (HOST, B floats in
     * [0, 1), the one number sampler_sample would have drawn from that
     * stream's rng; ignored when greedy: temperature 0 or top_k 1, where
     * the token is the argmax with ties to the lowest id). Same rules:
     *  - 0 < top_k < V: the k best by (logit desc, id asc), probabilities
     *    exp((l - max) / T), the nucleus as the shortest prefix of that
     *    order whose mass reaches top_p * sum, the inverse CDF in that
     *    order (rounding past the end: the last member);
     *  - otherwise the whole vocabulary: the nucleus is every token at least
     *    as good, in (prob desc, id asc) order, as the one where the mass
     *    from the top first reaches top_p * sum, and the inverse CDF runs
     *    over the nucleus IN ID ORDER.
     * Sums may run in another order than the host's, so a draw whose
     * uniform falls within rounding of a boundary may pick the neighbour.
     * Returns when the tokens are on the host (a device error leaves -1s
     * and the sticky status). */
    void (*sample)(tlm_ops *o, int32_t *tokens_host, const float *logits_dev, int B, int V, size_t ld,
                   const float *uniforms_host, float temperature, int top_k, float top_p);
    /* OPTIONAL (set where sample is; NULL otherwise): sample with its
     * inputs and outputs on the DEVICE and nothing waited for: it only
     * enqueues the draw, so it can be part of a recorded step (graph
     * block). tokens_dev[B] (int32) receives the tokens; uniforms_dev[B]
     * (floats, read when the op runs; may be NULL when greedy). The rules,
     * ld and the result are those of sample; sample is this op between a
     * copy of the uniforms up and a copy of the tokens down. */
    void (*sample_dev)(tlm_ops *o, int32_t *tokens_dev, const float *logits_dev, int B, int V, size_t ld,
                       const float *uniforms_dev, float temperature, int top_k, float top_p);
    /* ==== end of the generation block ==================================== */

    /* ==== asynchronous uploads (OPTIONAL: all five set, or all NULL) ======
     * For double-buffered batches: the copy of batch k+1 into one device
     * buffer runs on the device's copy engine while step k computes from
     * the other. Without this block (the CPU) callers use copy_h2d, which
     * is complete when it returns.
     *
     * An event marks a point in the stream of ops. It "passes" once every
     * op enqueued before it has finished; one never recorded has passed. */
    tlm_event *(*event_create)(tlm_ops *o); /* NULL + error on failure */
    void (*event_destroy)(tlm_ops *o, tlm_event *e);
    /* Record e after every op enqueued so far (re-recording moves it). */
    void (*event_record)(tlm_ops *o, tlm_event *e);
    /* Copy bytes from host src to device dst on a separate copy queue.
     * The copy waits only for `after` (may be NULL), typically recorded
     * after the last op that read dst, and NOT for every earlier op, so it
     * overlaps them; every op enqueued after this call waits for the copy.
     * `done` (may be NULL) is recorded after the copy: src must stay
     * unchanged until it has passed. src should come from host_alloc (the
     * loader's ring does): from ordinary memory the copy is still correct
     * but the host may wait for it. */
    void (*copy_h2d_async)(tlm_ops *o, void *dst, const void *src, size_t bytes, tlm_event *after,
                           tlm_event *done);
    /* 1 if e has passed, else 0. With wait, blocks the host until it has
     * (waiting for that point only, not for the whole device) and returns 1. */
    int (*event_done)(tlm_ops *o, tlm_event *e, int wait);
    /* ==== end of the upload block ======================================== */

    /* ==== recorded steps (OPTIONAL: all four set, or all NULL; the CPU
     * has none) =============================================================
     * A decode step is ~50 small ops; a device that pays a few microseconds
     * per launch is bound by launching them. Recording the step once and
     * replaying it makes it one launch.
     *
     * graph_begin: the ops enqueued from now until graph_end are RECORDED,
     * not run: their arguments (pointers, sizes, scalars) are fixed at that
     * moment, the memory they read is read when the graph RUNS (so a step
     * whose varying inputs, tokens and position, live in device memory
     * replays with new ones: see attn_decode's pos_dev). 0, or -1 + error
     * (already recording, a failed backend).
     * While recording:
     *  - copy_h2d and copy_d2h must use host buffers from host_alloc
     *    (pinned); they are recorded too, the host buffer being read or
     *    written when the graph runs, and copy_d2h does not wait;
     *  - nothing waits for the host: sync does nothing, and an op that would
     *    have to wait (growing scratch memory or a table, a TLM_CUDA_SYNC
     *    check) or allocate (alloc, free, pack, pack_free, host_alloc) must
     *    not be called. So run the step once un-recorded first, which grows
     *    everything it needs; a recording that breaks these rules fails at
     *    graph_end (the backend itself is not marked failed);
     *  - status does not query the device.
     * graph_end: stop recording; the recorded step, or NULL + error (the
     * recording is discarded, nothing is left half-recorded).
     * graph_launch: enqueue the recorded ops, in order, as one launch; the
     * host waits for it like for any op (sync, copy_d2h). -1 + error, and
     * nothing enqueued, when the graph is STALE: memory whose address it
     * holds was replaced since it was recorded (the backend's scratch or
     * tables grew); record it again. -1 also on a device error (status).
     * The caller's buffers named by the recorded ops must outlive the graph
     * and not move. */
    int (*graph_begin)(tlm_ops *o);
    tlm_graph *(*graph_end)(tlm_ops *o);
    int (*graph_launch)(tlm_ops *o, tlm_graph *g);
    void (*graph_destroy)(tlm_ops *o, tlm_graph *g);
    /* ==== end of the recorded steps ====================================== */

    /* OPTIONAL (NULL: the backend cannot fail after creation, the CPU).
     * 0, or -1 with tlm_errorf set to a one-line message naming the op that
     * failed and what to do, when the device has recorded an error since the
     * backend was created. Sticky: once failed, always -1. Cheap and
     * non-blocking, so callers check it once per step; ops after a failure
     * do nothing and reads give NaN, so a caller that checks it after
     * reading a result never reports garbage as a result. */
    int (*status)(tlm_ops *o);

    /* OPTIONAL (NULL: the CPU, where the process's peak resident memory
     * says it). Device memory the backend holds, in bytes: buffers from
     * alloc, its own scratch and tables, packed weights and library
     * workspace (not the driver's context), now and at most since the
     * backend was created. */
    void (*mem_usage)(tlm_ops *o, size_t *in_use, size_t *peak);

    void (*destroy)(tlm_ops *o);
};

/* Device selection. spec is "auto", "cpu", "cpu-ref", "cuda" or "cuda:N";
 * threads <= 0 means all cores. On "auto" the CUDA module is tried and the
 * CPU used when it is not present; *note receives one banner line saying
 * what happened (may be NULL). Returns NULL + error on failure. */
tlm_ops *ops_create(const char *spec, int threads, char *note, size_t note_len);
/* The same with the precision of training's matrix products: dtype "fp32"
 * (exact comparison with the CPU), "bf16" (CUDA tensor cores, bf16
 * activations (act_dtype), fp32 master weights; an error on the CPU,
 * which trains in fp32 only), "tf32" (CUDA
 * tensor cores reading the fp32 operands with 10 mantissa bits; an error
 * on the CPU too), "auto" (bf16
 * on CUDA, fp32 on the CPU), or NULL (the backend's default: fp32, or the
 * CUDA module's TLM_CUDA_DTYPE). Errors name --dtype. */
tlm_ops *ops_create_ex(const char *spec, int threads, const char *dtype, char *note, size_t note_len);
void ops_destroy(tlm_ops *o);
/* o->status where the backend has it, else 0. */
int ops_status(tlm_ops *o);
/* Is dtype one ops_create_ex accepts ("auto", "fp32", "bf16", "tf32", or NULL)?
 * 0, or -1 with an error naming --dtype. */
int ops_check_dtype(const char *dtype);

/* Backend constructors (src/backends/...). */
tlm_ops *cpu_ops_create(int threads);     /* fast: CBLAS + OpenMP + SIMD */
tlm_ops *cpu_ref_ops_create(void);        /* plain loops, single thread: the reference for tests */
/* Generation block: fill the packed ops of a CPU op table (fast: SIMD +
 * OpenMP; ref: plain loops). Called by the two constructors above. */
void cpu_infer_install(tlm_ops *o);
void cpu_infer_ref_install(tlm_ops *o);
/* matmul_ex for a backend that computes in fp32 (the CPU): all-F32 operands
 * go straight to o->matmul (bit for bit); bf16 ones are widened into
 * temporaries first (exact). For backends with act_dtype F32 the model never
 * passes bf16, so that branch only serves direct callers. */
void ops_matmul_ex_f32(tlm_ops *o, int transA, int transB, int M, int N, int K, float alpha, const void *A, int adt,
                       int lda, const void *B, int bdt, int ldb, float beta, void *C, int cdt, int ldc);
/* Bytes of n activation elements of o->act_dtype. */
static inline size_t ops_act_bytes(const tlm_ops *o, size_t n) {
    return n * (o->act_dtype == TLM_ACT_BF16 ? 2u : 4u);
}

#endif
