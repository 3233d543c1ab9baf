/*
 * Checkpoints: the run folder is a Hugging Face model folder
 *   config.json, model.safetensors, tokenizer.json
 * plus what resuming needs
 *   trainer_state.safetensors  AdamW moments "adam_m", "adam_v" [P]
 *   trainer_state.json         step, tokens, loader position, RNG, options,
 *                              and the step and checksum of every tensor file
 * and metrics.jsonl, loss.svg.
 *
 * Save order: every file is written atomically (temp, fsync, rename), and
 * trainer_state.json goes last. It is the commit record: a crash before it
 * leaves the previous trainer_state.json, which then disagrees with a newer
 * model.safetensors or trainer_state.safetensors (their __metadata__ step
 * and checksum), and resume refuses the mismatched pair instead of
 * continuing from a mix of two steps.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/fileio.h"
#include "io/safetensors.h"
#include "train/train.h"

#define STATE_FORMAT "tinylm-trainer-state"
#define STATE_VERSION 1

static const char *const CKPT_FILES[] = {"trainer_state.json", "model.safetensors", "trainer_state.safetensors"};

int checkpoint_exists(const char *run_dir) {
    char p[1200];
    for (size_t i = 0; i < sizeof CKPT_FILES / sizeof CKPT_FILES[0]; i++)
        if (path_exists(path_join(p, sizeof p, run_dir, CKPT_FILES[i]))) return 1;
    return 0;
}

/* ---- options <-> JSON ---------------------------------------------------- */

static void hex64(char out[17], uint64_t v) { snprintf(out, 17, "%016llx", (unsigned long long)v); }

static int parse_hex64(const char *s, uint64_t *out) {
    if (!s || strlen(s) != 16) return -1;
    char *end;
    unsigned long long v = strtoull(s, &end, 16);
    if (*end) return -1;
    *out = v;
    return 0;
}

static cJSON *opts_to_json(const tlm_train_opts *o) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "data", o->data);
    cJSON_AddNumberToObject(j, "batch", o->batch);
    cJSON_AddNumberToObject(j, "accum", o->accum);
    cJSON_AddNumberToObject(j, "lr", o->lr);
    cJSON_AddNumberToObject(j, "min_lr", o->min_lr);
    cJSON_AddNumberToObject(j, "warmup", (double)o->warmup);
    cJSON_AddNumberToObject(j, "weight_decay", o->weight_decay);
    cJSON_AddNumberToObject(j, "clip", o->clip);
    cJSON_AddNumberToObject(j, "max_steps", (double)o->max_steps);
    cJSON_AddNumberToObject(j, "max_time", o->max_time);
    cJSON_AddNumberToObject(j, "eval_every", (double)o->eval_every);
    cJSON_AddNumberToObject(j, "eval_batches", (double)o->eval_batches);
    cJSON_AddNumberToObject(j, "save_every", (double)o->save_every);
    cJSON_AddNumberToObject(j, "log_every", (double)o->log_every);
    cJSON_AddNumberToObject(j, "workers", o->workers);
    cJSON_AddNumberToObject(j, "prefetch", o->prefetch);
    /* a string: JSON numbers lose integers above 2^53 */
    char dec[24];
    snprintf(dec, sizeof dec, "%llu", (unsigned long long)o->seed);
    cJSON_AddStringToObject(j, "seed", dec);
    cJSON_AddNumberToObject(j, "threads", o->threads);
    cJSON_AddStringToObject(j, "device", o->device);
    cJSON_AddStringToObject(j, "dtype", o->dtype[0] ? o->dtype : "auto");
    return j;
}

/* Field getters: each fails with an error naming the file and the field. */
static int get_num(const cJSON *obj, const char *key, const char *path, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(v))
        return tlm_errorf("%s has no number \"%s\": the checkpoint is damaged; start a new run in another --out",
                          path, key);
    *out = v->valuedouble;
    return 0;
}

static int get_i64(const cJSON *obj, const char *key, const char *path, int64_t *out) {
    double d = 0;
    if (get_num(obj, key, path, &d)) return -1;
    if (d != floor(d) || fabs(d) > 9007199254740992.0)
        return tlm_errorf("%s has \"%s\" = %g, not an integer: the checkpoint is damaged", path, key, d);
    *out = (int64_t)d;
    return 0;
}

static int get_str(const cJSON *obj, const char *key, const char *path, char *out, size_t n) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsString(v) || strlen(v->valuestring) >= n)
        return tlm_errorf("%s has no string \"%s\": the checkpoint is damaged; start a new run in another --out",
                          path, key);
    strcpy(out, v->valuestring);
    return 0;
}

static int get_hex(const cJSON *obj, const char *key, const char *path, uint64_t *out) {
    char s[32];
    if (get_str(obj, key, path, s, sizeof s)) return -1;
    if (parse_hex64(s, out)) return tlm_errorf("%s has a malformed \"%s\": the checkpoint is damaged", path, key);
    return 0;
}

static int opts_from_json(tlm_train_opts *o, const cJSON *j, const char *path) {
    int64_t i = 0;
    if (get_str(j, "data", path, o->data, sizeof o->data)) return -1;
    if (get_i64(j, "batch", path, &i)) return -1;
    o->batch = (int)i;
    if (get_i64(j, "accum", path, &i)) return -1;
    o->accum = (int)i;
    if (get_num(j, "lr", path, &o->lr) || get_num(j, "min_lr", path, &o->min_lr)) return -1;
    if (get_i64(j, "warmup", path, &o->warmup)) return -1;
    if (get_num(j, "weight_decay", path, &o->weight_decay) || get_num(j, "clip", path, &o->clip)) return -1;
    if (get_i64(j, "max_steps", path, &o->max_steps) || get_num(j, "max_time", path, &o->max_time)) return -1;
    if (get_i64(j, "eval_every", path, &o->eval_every) || get_i64(j, "eval_batches", path, &o->eval_batches) ||
        get_i64(j, "save_every", path, &o->save_every) || get_i64(j, "log_every", path, &o->log_every))
        return -1;
    if (get_i64(j, "workers", path, &i)) return -1;
    o->workers = (int)i;
    if (get_i64(j, "prefetch", path, &i)) return -1;
    o->prefetch = (int)i;
    char dec[32], *end;
    if (get_str(j, "seed", path, dec, sizeof dec)) return -1;
    o->seed = strtoull(dec, &end, 10);
    if (!dec[0] || *end) return tlm_errorf("%s has a malformed \"seed\": the checkpoint is damaged", path);
    if (get_i64(j, "threads", path, &i)) return -1;
    o->threads = (int)i;
    if (get_str(j, "device", path, o->device, sizeof o->device)) return -1;
    /* Runs saved before --dtype existed trained in fp32 (the CUDA module's
     * default then), so that is what resuming them keeps. */
    if (!cJSON_GetObjectItemCaseSensitive(j, "dtype"))
        snprintf(o->dtype, sizeof o->dtype, "fp32");
    else if (get_str(j, "dtype", path, o->dtype, sizeof o->dtype))
        return -1;
    return 0;
}

/* ---- trainer_state.json --------------------------------------------------- */

static cJSON *num_or_null(double v) { return isfinite(v) ? cJSON_CreateNumber(v) : cJSON_CreateNull(); }

static int write_state_json(const tlm_trainer *t, const tlm_ckpt_state *s, const char *path) {
    cJSON *j = cJSON_CreateObject();
    char h[17];
    cJSON_AddStringToObject(j, "format", STATE_FORMAT);
    cJSON_AddNumberToObject(j, "version", STATE_VERSION);
    cJSON_AddNumberToObject(j, "step", (double)s->step);
    cJSON_AddNumberToObject(j, "tokens", (double)s->tokens);
    cJSON_AddNumberToObject(j, "loader_epoch", (double)s->epoch);
    cJSON_AddNumberToObject(j, "loader_index", (double)s->index);
    hex64(h, s->loader_seed);
    cJSON_AddStringToObject(j, "loader_seed", h);
    cJSON *rng = cJSON_AddArrayToObject(j, "rng");
    for (int i = 0; i < 4; i++) {
        hex64(h, s->rng.s[i]);
        cJSON_AddItemToArray(rng, cJSON_CreateString(h));
    }
    cJSON_AddNumberToObject(j, "elapsed_s", s->elapsed_s);
    cJSON_AddItemToObject(j, "best_val_loss", num_or_null(s->best_val));
    cJSON_AddItemToObject(j, "last_val_loss", num_or_null(s->last_val));
    cJSON *sums = cJSON_AddObjectToObject(j, "fnv1a64");
    hex64(h, s->sum_model);
    cJSON_AddStringToObject(sums, "model.safetensors", h);
    hex64(h, s->sum_m);
    cJSON_AddStringToObject(sums, "adam_m", h);
    hex64(h, s->sum_v);
    cJSON_AddStringToObject(sums, "adam_v", h);
    hex64(h, s->sum_tok);
    cJSON_AddStringToObject(sums, "tokenizer.json", h);
    cJSON_AddItemToObject(j, "options", opts_to_json(&s->opt));
    cJSON_AddStringToObject(j, "metrics", "metrics.jsonl");
    (void)t;
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    if (!text) return tlm_errorf("out of memory writing %s", path);
    size_t n = strlen(text);
    text[n] = '\0';
    /* a trailing newline keeps `cat` tidy */
    char *buf = malloc(n + 2);
    int rc = -1;
    if (buf) {
        memcpy(buf, text, n);
        buf[n] = '\n';
        rc = file_write_atomic(path, buf, n + 1);
        free(buf);
    } else {
        tlm_errorf("out of memory writing %s", path);
    }
    cJSON_free(text);
    return rc;
}

static double get_num_or_nan(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

int checkpoint_read_state(tlm_ckpt_state *s, const char *run_dir) {
    char path[1200];
    path_join(path, sizeof path, run_dir, "trainer_state.json");
    memset(s, 0, sizeof *s);
    if (!path_exists(path))
        return tlm_errorf("%s is missing: %s holds no checkpoint to resume; drop --resume to start a new run", path,
                          run_dir);
    size_t len;
    char *text = file_read_all(path, &len);
    if (!text) return -1;
    cJSON *j = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return tlm_errorf("%s is not valid JSON: the checkpoint is damaged; start a new run in another --out", path);
    }
    int rc = -1;
    char fmt[64];
    int64_t version = 0, u = 0;
    if (get_str(j, "format", path, fmt, sizeof fmt) || strcmp(fmt, STATE_FORMAT)) {
        tlm_errorf("%s is not a tinylm trainer state: the checkpoint is damaged", path);
        goto done;
    }
    if (get_i64(j, "version", path, &version)) goto done;
    if (version != STATE_VERSION) {
        tlm_errorf("%s has version %lld, this tinylm reads version %d: resume with the tinylm that wrote it", path,
                   (long long)version, STATE_VERSION);
        goto done;
    }
    if (get_i64(j, "step", path, &s->step)) goto done;
    if (get_i64(j, "tokens", path, &u)) goto done;
    s->tokens = (uint64_t)u;
    if (get_i64(j, "loader_epoch", path, &u)) goto done;
    s->epoch = (uint64_t)u;
    if (get_i64(j, "loader_index", path, &u)) goto done;
    s->index = (uint64_t)u;
    if (get_hex(j, "loader_seed", path, &s->loader_seed)) goto done;
    const cJSON *rng = cJSON_GetObjectItemCaseSensitive(j, "rng");
    if (!cJSON_IsArray(rng) || cJSON_GetArraySize(rng) != 4) {
        tlm_errorf("%s has no 4-word \"rng\": the checkpoint is damaged", path);
        goto done;
    }
    for (int i = 0; i < 4; i++) {
        const cJSON *w = cJSON_GetArrayItem(rng, i);
        if (!cJSON_IsString(w) || parse_hex64(w->valuestring, &s->rng.s[i])) {
            tlm_errorf("%s has a malformed \"rng\": the checkpoint is damaged", path);
            goto done;
        }
    }
    if (get_num(j, "elapsed_s", path, &s->elapsed_s)) goto done;
    s->best_val = get_num_or_nan(j, "best_val_loss");
    s->last_val = get_num_or_nan(j, "last_val_loss");
    const cJSON *sums = cJSON_GetObjectItemCaseSensitive(j, "fnv1a64");
    if (!cJSON_IsObject(sums)) {
        tlm_errorf("%s has no \"fnv1a64\" checksums: the checkpoint is damaged", path);
        goto done;
    }
    if (get_hex(sums, "model.safetensors", path, &s->sum_model) || get_hex(sums, "adam_m", path, &s->sum_m) ||
        get_hex(sums, "adam_v", path, &s->sum_v) || get_hex(sums, "tokenizer.json", path, &s->sum_tok))
        goto done;
    const cJSON *opts = cJSON_GetObjectItemCaseSensitive(j, "options");
    if (!cJSON_IsObject(opts)) {
        tlm_errorf("%s has no \"options\": the checkpoint is damaged", path);
        goto done;
    }
    if (opts_from_json(&s->opt, opts, path)) goto done;
    snprintf(s->opt.out, sizeof s->opt.out, "%s", run_dir);
    s->opt.resume = 1;
    if (s->step < 0 || s->opt.batch < 1 || s->opt.accum < 1 || s->opt.max_steps < 1) {
        tlm_errorf("%s holds impossible values (step %lld, batch %d): the checkpoint is damaged", path,
                   (long long)s->step, s->opt.batch);
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(j);
    return rc;
}

int train_opts_load(tlm_train_opts *o, const char *run_dir) {
    tlm_ckpt_state s;
    if (checkpoint_read_state(&s, run_dir)) return -1;
    *o = s.opt;
    memset(&o->cfg, 0, sizeof o->cfg);
    return 0;
}

/* ---- save ----------------------------------------------------------------- */

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

int trainer_save(tlm_trainer *t) {
    tlm_model *m = &t->model;
    tlm_ops *o = t->ops;
    const char *run = t->opt.out;
    size_t P = m->nparams;
    char path[1200], stepbuf[32];
    int rc = -1;
    float *hp = malloc(P * sizeof(float)), *hm = malloc(P * sizeof(float)), *hv = malloc(P * sizeof(float));
    tlm_st_tensor *st = calloc((size_t)m->ntensors, sizeof *st);
    if (!hp || !hm || !hv || !st) {
        tlm_errorf("out of memory saving the checkpoint to %s", run);
        goto done;
    }
    o->copy_d2h(o, hp, m->params, P * sizeof(float));
    o->copy_d2h(o, hm, t->adam.m, P * sizeof(float));
    o->copy_d2h(o, hv, t->adam.v, P * sizeof(float));
    /* a failed device hands back NaN: say why instead of "diverged" */
    if (ops_status(o)) goto done;
    /* Never replace a good checkpoint with a diverged one. */
    if (!all_finite(hp, P) || !all_finite(hm, P) || !all_finite(hv, P)) {
        tlm_errorf("the parameters became NaN/Inf by step %lld (training diverged), so they were not saved; the "
                   "checkpoint in %s is kept: resume it with a lower --lr than %g",
                   (long long)t->step, run, t->opt.lr);
        goto done;
    }
    if (dir_create(run)) goto done;
    snprintf(stepbuf, sizeof stepbuf, "%lld", (long long)t->step);

    if (config_save_json(&m->cfg, path_join(path, sizeof path, run, "config.json"))) goto done;
    if (file_write_atomic(path_join(path, sizeof path, run, "tokenizer.json"), t->tok_json, t->tok_json_len))
        goto done;

    for (int i = 0; i < m->ntensors; i++) {
        const tlm_tensor *ts = &m->tensors[i];
        st[i].name = ts->name;
        st[i].data = hp + ts->offset;
        st[i].ndim = ts->ndim;
        st[i].shape[0] = ts->rows;
        st[i].shape[1] = ts->cols;
        if (ts->ndim == 1) st[i].shape[0] = (int64_t)ts->rows * ts->cols;
    }
    const char *mk[] = {"format", "tinylm_step"};
    const char *mv[] = {"pt", stepbuf};
    if (safetensors_write(path_join(path, sizeof path, run, "model.safetensors"), st, m->ntensors, mk, mv, 2))
        goto done;

    tlm_st_tensor ad[2] = {{"adam_m", hm, 1, {(int64_t)P}}, {"adam_v", hv, 1, {(int64_t)P}}};
    if (safetensors_write(path_join(path, sizeof path, run, "trainer_state.safetensors"), ad, 2, mk + 1, mv + 1,
                          1))
        goto done;

    if (metrics_write(t)) goto done;

    tlm_ckpt_state s;
    memset(&s, 0, sizeof s);
    s.opt = t->opt;
    /* An absolute --data, so --resume works from any working folder. */
    char *abs = realpath(t->opt.data, NULL);
    if (abs && strlen(abs) < sizeof s.opt.data) memcpy(s.opt.data, abs, strlen(abs) + 1);
    free(abs);
    s.step = t->step;
    s.tokens = t->tokens;
    loader_tell(t->loader, &s.epoch, &s.index);
    s.loader_seed = t->loader_seed;
    s.rng = t->rng;
    s.elapsed_s = t->elapsed_s;
    s.best_val = t->best_val;
    s.last_val = t->last_val;
    s.sum_model = tlm_fnv1a64(hp, P * sizeof(float), TLM_FNV_INIT);
    s.sum_m = tlm_fnv1a64(hm, P * sizeof(float), TLM_FNV_INIT);
    s.sum_v = tlm_fnv1a64(hv, P * sizeof(float), TLM_FNV_INIT);
    s.sum_tok = tlm_fnv1a64(t->tok_json, t->tok_json_len, TLM_FNV_INIT);
    if (write_state_json(t, &s, path_join(path, sizeof path, run, "trainer_state.json"))) goto done;
    t->saved_step = t->step;
    rc = 0;
done:
    free(hp);
    free(hm);
    free(hv);
    free(st);
    return rc;
}

/* ---- load ----------------------------------------------------------------- */

static int check_step_meta(tlm_st_file *f, const char *path, const tlm_ckpt_state *s, const char *state_path) {
    const char *v = safetensors_meta(f, "tinylm_step");
    char want[32];
    snprintf(want, sizeof want, "%lld", (long long)s->step);
    if (!v)
        return tlm_errorf("%s has no tinylm_step metadata, so it cannot be matched with %s: it was not written by "
                          "tinylm train; start a new run in another --out",
                          path, state_path);
    if (strcmp(v, want))
        return tlm_errorf("%s is from step %s but %s is from step %s: the last save was interrupted, so this "
                          "checkpoint cannot be resumed exactly; start a new run in another --out",
                          path, v, state_path, want);
    return 0;
}

int checkpoint_load_tensors(tlm_trainer *t, const tlm_ckpt_state *s) {
    tlm_model *m = &t->model;
    tlm_ops *o = t->ops;
    const char *run = t->opt.out;
    size_t P = m->nparams;
    char path[1200], state_path[1200];
    path_join(state_path, sizeof state_path, run, "trainer_state.json");
    int rc = -1;
    tlm_st_file *f = NULL;
    float *h = malloc(P * sizeof(float));
    if (!h) {
        tlm_errorf("out of memory loading the checkpoint from %s", run);
        goto done;
    }

    path_join(path, sizeof path, run, "model.safetensors");
    if (!(f = safetensors_open(path))) goto done;
    if (check_step_meta(f, path, s, state_path)) goto done;
    for (int i = 0; i < m->ntensors; i++) {
        const tlm_tensor *ts = &m->tensors[i];
        int64_t shape[4] = {0};
        int nd = safetensors_shape(f, ts->name, shape);
        if (nd < 0) goto done;
        int64_t want0 = ts->ndim == 1 ? (int64_t)ts->rows * ts->cols : ts->rows;
        if (nd != ts->ndim || shape[0] != want0 || (nd == 2 && shape[1] != ts->cols)) {
            tlm_errorf("tensor %s in %s has a different shape than RUN/config.json implies: the checkpoint is "
                       "damaged; start a new run in another --out",
                       ts->name, path);
            goto done;
        }
        if (safetensors_read_f32(f, ts->name, h + ts->offset, (size_t)ts->rows * ts->cols)) goto done;
    }
    safetensors_close(f);
    f = NULL;
    if (tlm_fnv1a64(h, P * sizeof(float), TLM_FNV_INIT) != s->sum_model) {
        tlm_errorf("%s does not match the checksum recorded in %s: the file is damaged or was changed; start a new "
                   "run in another --out",
                   path, state_path);
        goto done;
    }
    o->copy_h2d(o, m->params, h, P * sizeof(float));

    path_join(path, sizeof path, run, "trainer_state.safetensors");
    if (!(f = safetensors_open(path))) goto done;
    if (check_step_meta(f, path, s, state_path)) goto done;
    const char *names[2] = {"adam_m", "adam_v"};
    float *dst[2] = {t->adam.m, t->adam.v};
    uint64_t sums[2] = {s->sum_m, s->sum_v};
    for (int k = 0; k < 2; k++) {
        int64_t shape[4] = {0};
        int nd = safetensors_shape(f, names[k], shape);
        if (nd < 0) goto done;
        if (nd != 1 || shape[0] != (int64_t)P) {
            tlm_errorf("tensor %s in %s has %lld values, the model has %zu parameters: the checkpoint is damaged",
                       names[k], path, (long long)shape[0], P);
            goto done;
        }
        if (safetensors_read_f32(f, names[k], h, P)) goto done;
        if (tlm_fnv1a64(h, P * sizeof(float), TLM_FNV_INIT) != sums[k]) {
            tlm_errorf("%s (%s) does not match the checksum recorded in %s: the file is damaged or was changed; "
                       "start a new run in another --out",
                       path, names[k], state_path);
            goto done;
        }
        o->copy_h2d(o, dst[k], h, P * sizeof(float));
    }
    rc = 0;
done:
    if (f) safetensors_close(f);
    free(h);
    return rc;
}
