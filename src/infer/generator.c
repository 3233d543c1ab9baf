/* Run folders for generation: load config.json, tokenizer.json and
 * model.safetensors; the public tlm_generator API on top. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infer/infer.h"
#include "io/fileio.h"
#include "io/safetensors.h"

int infer_load_weights(tlm_model *m, const char *path) {
    tlm_st_file *f = safetensors_open(path);
    if (!f) return -1;
    /* Staged on the host and copied once: one transfer instead of one per
     * tensor, and a failed load never leaves a half-written model. */
    float *host = tlm_alloc(m->nparams * sizeof(float));
    if (!host) {
        safetensors_close(f);
        return -1;
    }
    int rc = -1;
    for (int i = 0; i < m->ntensors; i++) {
        const tlm_tensor *t = &m->tensors[i];
        int64_t shape[4];
        int nd = safetensors_shape(f, t->name, shape);
        if (nd < 0) {
            tlm_errorf("tensor %s is missing from %s: the file does not belong to this config.json", t->name,
                       path);
            goto out;
        }
        int ok = t->ndim == 1 ? (nd == 1 && shape[0] == (int64_t)t->rows * t->cols)
                              : (nd == 2 && shape[0] == t->rows && shape[1] == t->cols);
        if (!ok) {
            char got[96] = "", want[64];
            size_t n = 0;
            for (int d = 0; d < nd && d < 4; d++)
                n += (size_t)snprintf(got + n, sizeof got - n, "%s%lld", d ? "," : "", (long long)shape[d]);
            if (t->ndim == 1)
                snprintf(want, sizeof want, "%d", t->rows * t->cols);
            else
                snprintf(want, sizeof want, "%d,%d", t->rows, t->cols);
            tlm_errorf("tensor %s in %s has shape [%s] but config.json needs [%s]: the weights and config.json "
                       "come from different models",
                       t->name, path, got, want);
            goto out;
        }
        size_t count = (size_t)t->rows * (size_t)t->cols;
        float *dst = host + t->offset;
        if (safetensors_read_f32(f, t->name, dst, count)) goto out;
        for (size_t j = 0; j < count; j++) {
            if (!isfinite(dst[j])) {
                tlm_errorf("tensor %s in %s holds NaN or infinite values: the checkpoint is corrupt (the "
                           "training diverged or the file was damaged)",
                           t->name, path);
                goto out;
            }
        }
    }
    m->ops->copy_h2d(m->ops, m->params, host, m->nparams * sizeof(float));
    rc = 0;
out:
    tlm_free(host);
    safetensors_close(f);
    return rc;
}

tlm_generator *generator_open(const char *run, const char *device, int threads, char *note, size_t note_len) {
    if (note && note_len) note[0] = 0;
    if (!run || !*run) {
        tlm_errorf("--model is missing: pass the run folder that `tinylm train` wrote");
        return NULL;
    }
    if (!path_is_dir(run)) {
        tlm_errorf("run folder %s not found: pass --model the folder that `tinylm train` wrote", run);
        return NULL;
    }
    char cpath[1100], mpath[1100], tpath[1100];
    path_join(cpath, sizeof cpath, run, "config.json");
    path_join(mpath, sizeof mpath, run, "model.safetensors");
    path_join(tpath, sizeof tpath, run, "tokenizer.json");
    const char *need[] = {cpath, mpath, tpath};
    for (int i = 0; i < 3; i++) {
        if (!path_exists(need[i])) {
            tlm_errorf("%s is missing: a run folder needs config.json, model.safetensors and tokenizer.json "
                       "(train one with `tinylm train`)",
                       need[i]);
            return NULL;
        }
    }

    tlm_generator *g = calloc(1, sizeof *g);
    if (!g) {
        tlm_errorf("out of memory opening %s", run);
        return NULL;
    }
    snprintf(g->run, sizeof g->run, "%s", run);
    tlm_config cfg;
    if (config_load_json(&cfg, cpath)) goto fail;
    g->tok = tokenizer_load(tpath);
    if (!g->tok) goto fail;
    int tv = tokenizer_vocab_size(g->tok);
    if (tv != cfg.vocab) {
        tlm_errorf("tokenizer vocab %d in %s does not match model vocab %d in %s: the files come from different "
                   "runs",
                   tv, tpath, cfg.vocab, cpath);
        goto fail;
    }
    g->eot = tokenizer_eot_id(g->tok);
    g->ops = ops_create(device, threads, note, note_len);
    if (!g->ops) goto fail;
    if (model_create(&g->model, &cfg, g->ops)) goto fail;
    if (infer_load_weights(&g->model, mpath)) goto fail;
    if (model_infer_pack(&g->model, &g->packed, TLM_GEN_AUTO)) goto fail;
    return g;
fail:
    generator_close(g);
    return NULL;
}

void generator_close(tlm_generator *g) {
    if (!g) return;
    if (g->model.params) {
        model_infer_unpack(&g->model, &g->packed);
        model_destroy(&g->model);
    }
    if (g->ops) ops_destroy(g->ops);
    if (g->tok) tokenizer_free(g->tok);
    free(g);
}

int generator_set_dtype(tlm_generator *g, int dtype) {
    tlm_infer_weights w;
    if (model_infer_pack(&g->model, &w, dtype)) return -1;
    model_infer_unpack(&g->model, &g->packed);
    g->packed = w;
    return 0;
}

/* ---- public API (include/tinylm/tinylm.h) -------------------------------- */

void tlm_generate_options_default(tlm_generate_options *o) {
    o->max_tokens = 200;
    o->temperature = 0.8f;
    o->top_k = 0;
    o->top_p = 0.95f;
    o->seed = 0;
}

tlm_generator *tlm_generator_open(const char *run_dir, const char *device, int threads) {
    return generator_open(run_dir, device, threads, NULL, 0);
}

int tlm_generator_generate(tlm_generator *g, const char *prompt, const tlm_generate_options *o, char **text,
                           size_t *len) {
    *text = NULL;
    if (len) *len = 0;
    const size_t plen = prompt ? strlen(prompt) : 0;
    size_t cap = plen + 1;
    int32_t *ids = malloc(cap * sizeof *ids);
    int32_t *out = malloc((size_t)(o->max_tokens > 0 ? o->max_tokens : 1) * sizeof *out);
    if (!ids || !out) {
        free(ids);
        free(out);
        return tlm_errorf("out of memory encoding the prompt");
    }
    /* Byte-level BPE never yields more tokens than bytes, so cap suffices. */
    size_t np = tokenizer_encode(g->tok, prompt ? prompt : "", plen, ids, cap);
    tlm_gen_params p = {.samples = 1,
                        .max_tokens = o->max_tokens,
                        .sampling = {.temperature = o->temperature, .top_k = o->top_k, .top_p = o->top_p},
                        .seed = o->seed,
                        .weights = &g->packed};
    int n = 0, rc = -1;
    if (np > cap) {
        tlm_errorf("prompt encoding overflowed its buffer");
    } else if (generate_run(&g->model, ids, (int)np, g->eot, &p, NULL, NULL, out, &n, NULL) == 0) {
        *text = tokenizer_decode(g->tok, out, (size_t)n, len);
        rc = *text ? 0 : -1;
    }
    free(ids);
    free(out);
    return rc;
}

void tlm_generator_close(tlm_generator *g) { generator_close(g); }
