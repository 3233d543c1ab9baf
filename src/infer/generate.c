/* The batched, KV-cached generation loop. */
#include <stdlib.h>
#include <string.h>

#include "infer/infer.h"

#define GEN_DEFAULT_CHUNK 128

void generate_seed_rng(tlm_rng *r, uint64_t seed, int index) {
    /* Hash (seed, index) so sample i is the same whatever the batch size
     * and nearby seeds do not give shifted copies of each other's streams. */
    uint64_t words[2] = {seed, (uint64_t)(int64_t)index};
    tlm_rng_seed(r, tlm_fnv1a64(words, sizeof words, TLM_FNV_INIT));
}

int generate_validate(const tlm_model *m, const int32_t *prompt, int nprompt, int eot, const tlm_gen_params *p) {
    const int V = m->cfg.vocab, ctx = m->cfg.context;
    if (p->samples < 1) return tlm_errorf("--samples %d is invalid: use 1 or more", p->samples);
    if (p->max_tokens < 1) return tlm_errorf("--max-tokens %d is invalid: use 1 or more", p->max_tokens);
    if (sampler_check_params(&p->sampling)) return -1;
    if (nprompt < 0) return tlm_errorf("generate: negative prompt length %d", nprompt);
    if (nprompt == 0) {
        if (eot < 0 || eot >= V)
            return tlm_errorf("generate: an empty prompt needs an end-of-text token to start from");
        nprompt = 1;
    } else {
        for (int i = 0; i < nprompt; i++)
            if (prompt[i] < 0 || prompt[i] >= V)
                return tlm_errorf("prompt token %d at position %d is outside the model vocabulary of %d", prompt[i],
                                  i, V);
    }
    if (nprompt >= ctx)
        return tlm_errorf("the prompt is %d tokens but the model context is %d: shorten --prompt", nprompt, ctx);
    if ((long)nprompt + p->max_tokens > ctx)
        return tlm_errorf("the prompt (%d token%s) plus --max-tokens %d exceeds the model context of %d tokens: "
                          "use --max-tokens %d or less",
                          nprompt, nprompt == 1 ? "" : "s", p->max_tokens, ctx, ctx - nprompt);
    return 0;
}

/* Drawing the next token of many streams: chunk c draws for streams
 * [c*B/n, (c+1)*B/n) with sampler sm[c] (its own scratch); each stream uses
 * only its own rng and logits row, so the split changes no token. */
typedef struct {
    tlm_sampler *sm;
    int nchunks, B, V, first;
    const float *logits;
    tlm_rng *rng;
    const unsigned char *done;
    int32_t *tok;
} gen_draw_job;

static void gen_draw_chunk(void *arg, int c) {
    const gen_draw_job *j = arg;
    const int b0 = (int)((long)c * j->B / j->nchunks), b1 = (int)((long)(c + 1) * j->B / j->nchunks);
    for (int b = b0; b < b1; b++) {
        if (j->done[b]) continue;
        /* after the prompt every sequence starts from logits row 0 */
        const float *row = j->logits + (size_t)(j->first ? 0 : b) * j->V;
        j->tok[b] = sampler_sample(&j->sm[c], row, &j->rng[b]);
    }
}

/* ---- recorded decode steps ------------------------------------------------
 * On a device that pays microseconds per launch (CUDA), a decode step of
 * ~50 small ops is bound by launching them. There the step runs as: copy
 * its inputs up (one pinned buffer: tokens, uniforms, position), forward
 * (model_forward_packed_dev, position read on the device), draw
 * (sample_dev), copy the tokens down into a pinned buffer; recorded once
 * (ops.h's graph block) and replayed as ONE launch per step, the host then
 * waiting once (it needs the tokens for end-of-text and the callback).
 * Same inputs, same kernels, so the same tokens as op by op. */
typedef struct {
    int use_graph;     /* record and replay (else every step op by op) */
    int nrun;          /* steps run so far */
    tlm_graph *graph;  /* the recorded step, once recorded */
    int32_t *host;     /* pinned: tokens[B] | uniforms[B] (floats) | pos | out tokens[B] */
    int pinned;
    int32_t *dev;      /* the same layout on the device */
} gen_fused;

static int gen_env_no_graph(void) {
    const char *e = getenv("TLM_NO_GRAPH");
    return e && *e && strcmp(e, "0") != 0;
}

/* Enqueue one fused step for the inputs in f->host; the tokens land in
 * f->host + 2B + 1 once it has run (copy_d2h waits unless recording). */
static int gen_step_enqueue(tlm_model *m, const tlm_infer_weights *w, tlm_infer_scratch *ss, const tlm_kvcache *kv,
                            const tlm_kv_prefix *pre, const gen_fused *f, int B, int pos0, float *logits_dev,
                            const tlm_sampler_params *sp) {
    tlm_ops *o = m->ops;
    const int V = m->cfg.vocab;
    const size_t in_bytes = (size_t)(2 * B + 1) * sizeof(int32_t);
    o->copy_h2d(o, f->dev, f->host, in_bytes);
    if (model_forward_packed_dev(m, w, ss, kv->k, kv->v, kv->Tmax, pre, f->dev, B, 1, pos0, f->dev + 2 * B,
                                 logits_dev))
        return -1;
    const float *uni_dev = sampler_greedy(sp) ? NULL : (const float *)(f->dev + B);
    o->sample_dev(o, f->dev + 2 * B + 1, logits_dev, B, V, (size_t)V, uni_dev, sp->temperature, sp->top_k, sp->top_p);
    o->copy_d2h(o, f->host + 2 * B + 1, f->dev + 2 * B + 1, (size_t)B * sizeof(int32_t));
    return 0;
}

/* One step: op by op the first time (it grows every scratch and table the
 * step needs, which a recording cannot), recorded the second, replayed
 * after that. A graph the backend refuses as stale (memory it holds was
 * replaced since) is recorded again; a recording that fails on a healthy
 * device leaves the rest of the run op by op. */
static int gen_step_run(tlm_model *m, const tlm_infer_weights *w, tlm_infer_scratch *ss, const tlm_kvcache *kv,
                        const tlm_kv_prefix *pre, gen_fused *f, int B, int pos0, float *logits_dev,
                        const tlm_sampler_params *sp, tlm_gen_stats *st) {
    tlm_ops *o = m->ops;
    if (!f->use_graph || f->nrun++ == 0) return gen_step_enqueue(m, w, ss, kv, pre, f, B, pos0, logits_dev, sp);
    for (int attempt = 0; attempt < 2; attempt++) {
        if (!f->graph) {
            if (o->graph_begin(o)) {
                if (ops_status(o)) return -1;
                f->use_graph = 0;
                return gen_step_enqueue(m, w, ss, kv, pre, f, B, pos0, logits_dev, sp);
            }
            const int rc = gen_step_enqueue(m, w, ss, kv, pre, f, B, pos0, logits_dev, sp);
            f->graph = o->graph_end(o); /* always: no recording is left open */
            if (rc) return -1;
            if (!f->graph) {
                if (ops_status(o)) return -1;
                f->use_graph = 0;
                return gen_step_enqueue(m, w, ss, kv, pre, f, B, pos0, logits_dev, sp);
            }
            st->graph_records++;
        }
        if (o->graph_launch(o, f->graph) == 0) {
            o->sync(o); /* the one wait of the step: the tokens are needed now */
            st->graph_launches++;
            return 0;
        }
        if (ops_status(o)) return -1;
        o->graph_destroy(o, f->graph); /* stale: record it again */
        f->graph = NULL;
    }
    return tlm_errorf("generation: the device refused a decode step it had just recorded (%s)", tlm_last_error());
}

int generate_run(tlm_model *m, const int32_t *prompt, int nprompt, int eot, const tlm_gen_params *p,
                 tlm_token_fn on_token, void *user, int32_t *out, int *out_len, tlm_gen_stats *stats) {
    if (generate_validate(m, prompt, nprompt, eot, p)) return -1;
    const int V = m->cfg.vocab;
    const int B = p->samples, maxt = p->max_tokens;
    tlm_ops *ops = m->ops;
    const int32_t start = eot;
    if (nprompt == 0) {
        prompt = &start;
        nprompt = 1;
    }
    const int Tmax = nprompt + maxt;
    const int chunk = p->chunk > 0 ? p->chunk : GEN_DEFAULT_CHUNK;
    const int Tc = chunk < nprompt ? chunk : nprompt;

    int rc = -1, stop = 0;
    /* one sampler (scratch) per chunk of streams drawn in parallel */
    enum { GEN_MAX_DRAW = 16 };
    tlm_sampler sm[GEN_MAX_DRAW];
    int have_sm = 0;
    int nsm = ops->host_for && B >= 8 ? (ops->threads < B / 4 ? ops->threads : B / 4) : 1;
    if (nsm > GEN_MAX_DRAW) nsm = GEN_MAX_DRAW;
    if (nsm < 1) nsm = 1;
    tlm_kvcache kv;
    /* Two scratches: the prompt needs 1 x Tc rows, a step B x 1; one
     * scratch for both would hold B x Tc rows. */
    tlm_infer_scratch sp, ss;
    memset(&kv, 0, sizeof kv);
    int have_sp = 0, have_ss = 0;
    float *logits_dev = NULL, *logits = NULL;
    /* Sampling on the device (ops->sample): only B tokens come back per
     * step instead of B x V logits; the uniforms are drawn here, from each
     * stream's own rng exactly as sampler_sample would, so the tokens are
     * the host path's (up to sums rounded in another order). */
    const int dev_sample = ops->sample != NULL;
    const int greedy = sampler_greedy(&p->sampling);
    float *uni = NULL;
    int32_t *dtok = NULL;
    gen_fused fz;
    memset(&fz, 0, sizeof fz);
    int fused = 0; /* steps go through gen_step_run */
    /* Packed weights: the caller's, or packed here for this call. */
    tlm_infer_weights own;
    memset(&own, 0, sizeof own);
    own.dtype = TLM_GEN_REF;
    const tlm_infer_weights *wts = p->weights;
    tlm_rng *rng = calloc((size_t)B, sizeof *rng);
    int32_t *tok = calloc((size_t)B, sizeof *tok);
    int *len = calloc((size_t)B, sizeof *len);
    unsigned char *done = calloc((size_t)B, 1);
    tlm_gen_stats st;
    memset(&st, 0, sizeof st);
    st.prompt_tokens = nprompt;
    if (!rng || !tok || !len || !done) {
        tlm_errorf("out of memory for %d samples: use fewer --samples", B);
        goto out;
    }
    if (!wts) {
        if (model_infer_pack(m, &own, p->dtype)) goto out;
        wts = &own;
    }
    st.dtype = wts->dtype;
    for (; have_sm < nsm; have_sm++)
        if (sampler_init(&sm[have_sm], V, &p->sampling)) goto out;
    /* Packed weights keep the prompt's keys and values once, shared by all
     * samples (attention streams them once per step instead of B times);
     * the reference path copies them into every sequence. */
    const int shared = wts->dtype != TLM_GEN_REF;
    if (shared ? kvcache_alloc_shared(&kv, m, B, nprompt, maxt, model_infer_kv_dtype(wts))
               : kvcache_alloc_dtype(&kv, m, B, Tmax, 0))
        goto out;
    const tlm_kv_prefix pre = kvcache_prefix(&kv);
    if (model_infer_scratch_alloc(m, &sp, 1, Tc)) goto out;
    have_sp = 1;
    if (model_infer_scratch_alloc(m, &ss, B, 1)) goto out;
    have_ss = 1;
    logits_dev = ops->alloc(ops, (size_t)B * V * sizeof(float));
    if (dev_sample) {
        uni = calloc((size_t)B, sizeof *uni);
        dtok = calloc((size_t)B, sizeof *dtok);
        if (!logits_dev || !uni || !dtok) goto out;
    } else {
        logits = tlm_alloc((size_t)B * V * sizeof(float));
        if (!logits_dev || !logits) goto out;
    }
    for (int b = 0; b < B; b++) generate_seed_rng(&rng[b], p->seed, p->seq_base + b);
    if (dev_sample && shared && ops->sample_dev && ops->graph_begin && !p->no_graph && !gen_env_no_graph()) {
        /* pinned, or the recorded copies could not read and write it */
        fz.host = ops->host_alloc(ops, (size_t)(3 * B + 1) * sizeof(int32_t), &fz.pinned);
        if (!fz.host) goto out;
        if (fz.pinned) {
            fz.dev = ops->alloc(ops, (size_t)(3 * B + 1) * sizeof(int32_t));
            if (!fz.dev) goto out;
            fz.use_graph = 1;
            fused = 1;
        }
    }

    /* Prompt: every sequence shares it, so compute it once, as one sequence
     * whose caches are the shared prefix (or sequence 0's, copied to the
     * others on the reference path). */
    double t0 = tlm_now();
    for (int pos = 0; pos < nprompt; pos += Tc) {
        int T = nprompt - pos < Tc ? nprompt - pos : Tc;
        if (model_forward_packed(m, wts, &sp, shared ? kv.pk : kv.k, shared ? kv.pv : kv.v, shared ? nprompt : Tmax,
                                 NULL, prompt + pos, 1, T, pos, logits_dev))
            goto out;
    }
    if (!shared && B > 1) kvcache_broadcast(&kv, m, 0, nprompt);
    if (dev_sample)
        ops->sync(ops); /* the prompt's time is its own */
    else
        ops->copy_d2h(ops, logits, logits_dev, (size_t)V * sizeof(float));
    /* a failed device hands back NaN logits: stop with its message */
    if (ops_status(ops)) goto out;
    double t1 = tlm_now();
    st.prompt_seconds = t1 - t0;

    int live = B;
    gen_draw_job dj = {.sm = sm, .nchunks = nsm, .B = B, .V = V, .logits = logits, .rng = rng, .done = done,
                       .tok = tok};
    for (int k = 0; k < maxt && live > 0 && !stop; k++) {
        dj.first = k == 0;
        if (fused && k > 0) {
            /* drawn by the previous step, right after its forward */
            const int32_t *got = fz.host + 2 * B + 1;
            for (int b = 0; b < B; b++)
                if (!done[b]) tok[b] = got[b];
        } else if (dev_sample) {
            /* one uniform per live stream, as sampler_sample draws it */
            for (int b = 0; b < B; b++) uni[b] = done[b] || greedy ? 0.0f : tlm_rng_uniform(&rng[b]);
            /* after the prompt every sequence starts from logits row 0 */
            ops->sample(ops, dtok, logits_dev, B, V, k == 0 ? 0 : (size_t)V, uni, p->sampling.temperature,
                        p->sampling.top_k, p->sampling.top_p);
            if (ops_status(ops)) goto out;
            /* finished streams keep feeding their last token */
            for (int b = 0; b < B; b++)
                if (!done[b]) tok[b] = dtok[b];
        } else if (nsm > 1)
            ops->host_for(ops, nsm, gen_draw_chunk, &dj);
        else
            gen_draw_chunk(&dj, 0);
        /* then, in stream order: end-of-text, output, the caller's callback */
        for (int b = 0; b < B && !stop; b++) {
            if (done[b]) continue;
            const int32_t t = tok[b];
            st.new_tokens++;
            if (t == eot) {
                done[b] = 1;
                live--;
                continue;
            }
            if (out) out[(size_t)b * maxt + len[b]] = t;
            len[b]++;
            if (on_token && on_token(user, b, t)) stop = 1;
        }
        if (stop || live == 0 || k == maxt - 1) break;
        /* Finished sequences are stepped along with the rest (feeding their
         * last token); their outputs are ignored. */
        if (fused) {
            /* this step's tokens, and the uniforms of the next draw, drawn
             * from each live stream's rng as the loop's top would */
            float *un = (float *)(fz.host + B);
            for (int b = 0; b < B; b++) {
                fz.host[b] = tok[b];
                un[b] = done[b] || greedy ? 0.0f : tlm_rng_uniform(&rng[b]);
            }
            fz.host[2 * B] = nprompt + k;
            if (gen_step_run(m, wts, &ss, &kv, shared ? &pre : NULL, &fz, B, nprompt + k, logits_dev, &p->sampling,
                             &st))
                goto out;
            if (ops_status(ops)) goto out;
            st.steps++;
            continue;
        }
        if (model_forward_packed(m, wts, &ss, kv.k, kv.v, kv.Tmax, shared ? &pre : NULL, tok, B, 1, nprompt + k,
                                 logits_dev))
            goto out;
        if (!dev_sample) {
            ops->copy_d2h(ops, logits, logits_dev, (size_t)B * V * sizeof(float));
            if (ops_status(ops)) goto out;
        }
        st.steps++;
    }
    st.gen_seconds = tlm_now() - t1;
    if (out_len) memcpy(out_len, len, (size_t)B * sizeof *len);
    rc = 0;

out:
    if (stats) *stats = st;
    if (fz.graph) ops->graph_destroy(ops, fz.graph);
    if (fz.dev) ops->free(ops, fz.dev);
    if (fz.host) ops->host_free(ops, fz.host, fz.pinned);
    if (logits_dev) ops->free(ops, logits_dev);
    tlm_free(logits);
    if (have_sp) model_infer_scratch_free(m, &sp);
    if (have_ss) model_infer_scratch_free(m, &ss);
    kvcache_free(&kv, m);
    for (int i = 0; i < have_sm; i++) sampler_free(&sm[i]);
    model_infer_unpack(m, &own);
    free(rng);
    free(tok);
    free(len);
    free(done);
    free(uni);
    free(dtok);
    return rc;
}
