/* The training loop: options, data checks, steps, evaluation, saving. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/fileio.h"
#include "text/tokenizer.h"
#include "train/train.h"

/* Evaluation losses read back per this many batches. */
#define TRAIN_EVAL_CHUNK 256

void train_opts_default(tlm_train_opts *o) {
    memset(o, 0, sizeof *o);
    o->batch = 16;
    o->accum = 1;
    o->lr = 1e-3;
    o->min_lr = -1;
    o->warmup = -1;
    o->weight_decay = 0.1;
    o->clip = 1.0;
    o->max_steps = 1500;
    o->max_time = 0;
    o->eval_every = 100;
    o->eval_batches = 20;
    o->save_every = 0;
    o->log_every = 10;
    o->workers = 2;
    o->prefetch = 4;
    o->seed = 1337;
    o->threads = 0;
    snprintf(o->device, sizeof o->device, "auto");
    snprintf(o->dtype, sizeof o->dtype, "auto");
}

/* Check ranges (the CLI checks them too; tests call the library directly)
 * and fill in the derived defaults. */
static int opts_resolve(tlm_train_opts *o) {
    if (!o->data[0]) return tlm_errorf("--data is required: pass the folder written by tinylm prepare");
    if (!o->out[0]) return tlm_errorf("--out is required: pass the run folder to write checkpoints to");
    if (o->batch < 1) return tlm_errorf("--batch %d is out of range: use 1 or more", o->batch);
    if (o->accum < 1) return tlm_errorf("--accum %d is out of range: use 1 or more", o->accum);
    if (!(o->lr > 0) || !isfinite(o->lr)) return tlm_errorf("--lr %g is out of range: use a positive number", o->lr);
    if (o->min_lr < 0) o->min_lr = o->lr / 10;
    if (!(o->min_lr <= o->lr))
        return tlm_errorf("--min-lr %g is above --lr %g: use a value from 0 to --lr", o->min_lr, o->lr);
    if (o->max_steps < 1)
        return tlm_errorf("--max-steps %lld is out of range: use 1 or more", (long long)o->max_steps);
    if (o->warmup < 0) o->warmup = 100;
    if (o->warmup > o->max_steps) o->warmup = o->max_steps;
    if (!(o->weight_decay >= 0) || !isfinite(o->weight_decay))
        return tlm_errorf("--weight-decay %g is out of range: use 0 or more", o->weight_decay);
    if (!(o->clip >= 0) || !isfinite(o->clip))
        return tlm_errorf("--clip %g is out of range: use 0 (off) or more", o->clip);
    if (!(o->max_time >= 0)) return tlm_errorf("--max-time %g is out of range: use a positive duration", o->max_time);
    if (o->eval_every < 1)
        return tlm_errorf("--eval-every %lld is out of range: use 1 or more", (long long)o->eval_every);
    if (o->eval_batches < 1)
        return tlm_errorf("--eval-batches %lld is out of range: use 1 or more", (long long)o->eval_batches);
    if (o->save_every < 0)
        return tlm_errorf("--save-every %lld is out of range: use 1 or more", (long long)o->save_every);
    if (o->save_every == 0) o->save_every = o->eval_every;
    if (o->log_every < 1) return tlm_errorf("--log-every %lld is out of range: use 1 or more", (long long)o->log_every);
    if (o->workers < 0 || o->workers > 256) return tlm_errorf("--workers %d is out of range: use 0 to 256", o->workers);
    if (o->prefetch < 1 || o->prefetch > 1024)
        return tlm_errorf("--prefetch %d is out of range: use 1 to 1024", o->prefetch);
    if (o->threads < 0) return tlm_errorf("--threads %d is out of range: use 0 (all cores) or more", o->threads);
    if (!o->device[0]) snprintf(o->device, sizeof o->device, "auto");
    if (!o->dtype[0]) snprintf(o->dtype, sizeof o->dtype, "auto");
    if (ops_check_dtype(o->dtype)) return -1;
    return 0;
}

/* On resume, a shape flag given on the command line must equal the saved
 * shape: a changed model cannot continue from these weights. */
static int check_shape(const char *flag, int given, int saved, const char *cfg_path) {
    if (given && given != saved)
        return tlm_errorf("%s %d does not match %s (%d): a resumed run keeps its model shape; drop %s or train into "
                          "a new --out",
                          flag, given, cfg_path, saved, flag);
    return 0;
}

static int open_data(tlm_trainer *t, int *vocab) {
    const char *dir = t->opt.data;
    char p[1200];
    if (!path_is_dir(dir))
        return tlm_errorf("--data %s is not a folder: run tinylm prepare --input TEXT --out %s first", dir, dir);
    const char *need[] = {"tokenizer.json", "train.bin", "val.bin"};
    for (int i = 0; i < 3; i++)
        if (!path_exists(path_join(p, sizeof p, dir, need[i])))
            return tlm_errorf("%s is missing: --data must be a folder written by tinylm prepare (re-run tinylm "
                              "prepare --out %s)",
                              p, dir);
    path_join(p, sizeof p, dir, "tokenizer.json");
    if (!(t->tok_json = file_read_all(p, &t->tok_json_len))) return -1;
    tlm_tokenizer *tok = tokenizer_load(p);
    if (!tok) return -1;
    int tv = tokenizer_vocab_size(tok);
    tokenizer_free(tok);
    char tp[1200], vp[1200];
    path_join(tp, sizeof tp, dir, "train.bin");
    path_join(vp, sizeof vp, dir, "val.bin");
    if (tokfile_open(&t->train, tp)) return -1;
    t->train_ok = 1;
    if (tokfile_open(&t->val, vp)) return -1;
    t->val_ok = 1;
    if (t->train.vocab != tv || t->val.vocab != tv)
        return tlm_errorf("vocab sizes disagree: %s has %d, %s has %d, %s has %d: the files come from different "
                          "runs; re-run tinylm prepare --out %s",
                          p, tv, tp, t->train.vocab, vp, t->val.vocab, dir);
    *vocab = tv;
    return 0;
}

/* Every parameter must belong to exactly one listed tensor, or the
 * optimizer would skip some and checkpoints would lose them. */
static int check_tensor_cover(const tlm_model *m) {
    size_t total = 0;
    for (int i = 0; i < m->ntensors; i++) {
        const tlm_tensor *ts = &m->tensors[i];
        size_t n = (size_t)ts->rows * (size_t)ts->cols;
        if (ts->offset + n > m->nparams) return tlm_errorf("internal error: tensor %s lies outside the parameters", ts->name);
        total += n;
    }
    if (total != m->nparams)
        return tlm_errorf("internal error: the model's tensors cover %zu of %zu parameters", total, m->nparams);
    return 0;
}

int trainer_open(tlm_trainer *t, const tlm_train_opts *opt) {
    memset(t, 0, sizeof *t);
    t->saved_step = -1;
    t->last_val = t->best_val = NAN;
    t->opt = *opt;
    tlm_train_opts *o = &t->opt;
    tlm_ckpt_state st;
    tlm_config cfg;
    char p[1200];
    memset(&st, 0, sizeof st);
    memset(&cfg, 0, sizeof cfg);
    if (opts_resolve(o)) goto fail;

    if (o->resume) {
        if (checkpoint_read_state(&st, o->out)) goto fail;
        path_join(p, sizeof p, o->out, "trainer_state.json");
        /* The data order is a function of (seed, batch): changing either
         * would silently continue on different batches. */
        if (o->batch != st.opt.batch) {
            tlm_errorf("--batch %d differs from the %d this run was trained with (%s): a resumed run keeps its "
                       "batch; drop --batch or train into a new --out",
                       o->batch, st.opt.batch, p);
            goto fail;
        }
        if (o->seed != st.opt.seed) {
            tlm_errorf("--seed %llu differs from the %llu this run was trained with (%s): a resumed run keeps its "
                       "seed; drop --seed or train into a new --out",
                       (unsigned long long)o->seed, (unsigned long long)st.opt.seed, p);
            goto fail;
        }
        if (st.step >= o->max_steps) {
            tlm_errorf("%s already finished: it is at step %lld of --max-steps %lld; pass a larger --max-steps to "
                       "train further",
                       o->out, (long long)st.step, (long long)o->max_steps);
            goto fail;
        }
        path_join(p, sizeof p, o->out, "config.json");
        if (config_load_json(&cfg, p)) goto fail;
        if (check_shape("--dim", o->cfg.dim, cfg.dim, p) || check_shape("--layers", o->cfg.layers, cfg.layers, p) ||
            check_shape("--heads", o->cfg.heads, cfg.heads, p) ||
            check_shape("--hidden", o->cfg.hidden, cfg.hidden, p) ||
            check_shape("--context", o->cfg.context, cfg.context, p))
            goto fail;
    } else {
        if (checkpoint_exists(o->out)) {
            tlm_errorf("%s already holds a checkpoint: pass --resume to continue or choose another --out", o->out);
            goto fail;
        }
        cfg = o->cfg;
        if (cfg.norm_eps == 0) cfg.norm_eps = 1e-5f;
        if (cfg.rope_theta == 0) cfg.rope_theta = 10000.0f;
    }

    int vocab = 0;
    if (open_data(t, &vocab)) goto fail;
    if (o->resume) {
        if (cfg.vocab != vocab) {
            tlm_errorf("%s/tokenizer.json has vocab %d but the run in %s was trained with vocab %d: resume with the "
                       "--data folder it was trained on (or re-run tinylm prepare --vocab %d)",
                       o->data, vocab, o->out, cfg.vocab, cfg.vocab);
            goto fail;
        }
        if (tlm_fnv1a64(t->tok_json, t->tok_json_len, TLM_FNV_INIT) != st.sum_tok) {
            tlm_errorf("%s/tokenizer.json differs from the tokenizer the run in %s was trained with: resume with "
                       "the --data folder it was trained on",
                       o->data, o->out);
            goto fail;
        }
    }
    cfg.vocab = vocab;
    if (config_validate(&cfg)) goto fail;

    const int B = o->batch, T = cfg.context;
    uint64_t need_train = (uint64_t)B * (uint64_t)T + 1;
    if (t->train.count < need_train) {
        tlm_errorf("--context %d with --batch %d needs at least %llu tokens in %s, which holds %llu: use a smaller "
                   "--context or --batch, or prepare more text",
                   T, B, (unsigned long long)need_train, t->train.path, (unsigned long long)t->train.count);
        goto fail;
    }
    if (t->val.count < (uint64_t)T + 1) {
        tlm_errorf("--context %d needs at least %d tokens in %s, which holds %llu: use a smaller --context or "
                   "prepare more validation text",
                   T, T + 1, t->val.path, (unsigned long long)t->val.count);
        goto fail;
    }
    /* Evaluation reads whole batches of val.bin in order; with fewer
     * windows than a batch it uses one smaller batch. */
    uint64_t val_windows = (t->val.count - 1) / (uint64_t)T;
    if (val_windows < (uint64_t)B) {
        t->eval_B = (int)val_windows;
        t->eval_nb = 1;
    } else {
        t->eval_B = B;
        uint64_t avail = val_windows / (uint64_t)B;
        t->eval_nb = (int64_t)(avail < (uint64_t)o->eval_batches ? avail : (uint64_t)o->eval_batches);
    }

    if (o->ops) {
        t->ops = o->ops;
        snprintf(t->device_note, sizeof t->device_note, "%s (given by the caller)", o->ops->name);
    } else {
        if (!(t->ops = ops_create_ex(o->device, o->threads, o->dtype, t->device_note, sizeof t->device_note)))
            goto fail;
        t->own_ops = 1;
    }
    if (model_create(&t->model, &cfg, t->ops)) goto fail;
    t->model_ok = 1;
    if (check_tensor_cover(&t->model)) goto fail;
    if (model_alloc_train(&t->model, B, T)) goto fail;
    if (adamw_create(&t->adam, t->ops, t->model.nparams)) goto fail;
    t->adam_ok = 1;
    t->stats_dev = t->ops->alloc(t->ops, (size_t)(1 + o->accum) * sizeof(float));
    t->stats_host = malloc((size_t)(1 + o->accum) * sizeof(float));
    t->eval_chunk = t->eval_nb < TRAIN_EVAL_CHUNK ? (int)t->eval_nb : TRAIN_EVAL_CHUNK;
    t->eval_dev = t->ops->alloc(t->ops, (size_t)t->eval_chunk * sizeof(float));
    t->eval_host = malloc((size_t)t->eval_chunk * sizeof(float));
    for (int j = 0; j < 2; j++) t->eval_buf[j] = t->ops->host_alloc(t->ops, 2 * (size_t)B * T * sizeof(int32_t),
                                                                    &t->eval_pinned[j]);
    if (!t->stats_dev || !t->stats_host || !t->eval_dev || !t->eval_host || !t->eval_buf[0] || !t->eval_buf[1]) {
        tlm_errorf("out of memory for the step's statistics or evaluation batches: use a smaller --batch, --context "
                   "or --accum");
        goto fail;
    }

    if (o->resume) {
        if (checkpoint_load_tensors(t, &st)) goto fail;
        t->step = st.step;
        t->tokens = st.tokens;
        t->elapsed_s = st.elapsed_s;
        t->best_val = st.best_val;
        t->last_val = st.last_val;
        t->rng = st.rng;
        t->loader_seed = st.loader_seed;
        t->saved_step = st.step;
    } else {
        tlm_rng_seed(&t->rng, o->seed);
        uint64_t init_seed = tlm_rng_u64(&t->rng);
        t->loader_seed = tlm_rng_u64(&t->rng);
        model_init_random(&t->model, init_seed);
    }
    t->loader = loader_create(&t->train, B, T, t->loader_seed, o->workers, o->prefetch, t->ops);
    if (!t->loader) goto fail;
    feed_init(&t->feed, t->loader, &t->model, o->prefetch);
    if (o->resume) {
        if (loader_seek(t->loader, st.epoch, st.index)) goto fail;
        if (metrics_load(t, t->step)) goto fail;
    } else {
        if (dir_create(o->out)) goto fail;
    }
    return 0;
fail:;
    /* Keep the message: closing must not clobber it. */
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", tlm_last_error());
    trainer_close(t);
    return tlm_errorf("%s", msg);
}

void trainer_close(tlm_trainer *t) {
    if (t->model_ok && t->loader) feed_release(&t->feed, 0); /* no copy may still read a slot that is freed */
    if (t->loader) loader_destroy(t->loader);
    if (t->adam_ok) adamw_destroy(&t->adam, t->ops);
    if (t->model_ok) model_destroy(&t->model);
    if (t->ops) {
        if (t->stats_dev) t->ops->free(t->ops, t->stats_dev);
        if (t->eval_dev) t->ops->free(t->ops, t->eval_dev);
        for (int j = 0; j < 2; j++)
            if (t->eval_buf[j]) t->ops->host_free(t->ops, t->eval_buf[j], t->eval_pinned[j]);
        if (t->own_ops) ops_destroy(t->ops);
    }
    if (t->train_ok) tokfile_close(&t->train);
    if (t->val_ok) tokfile_close(&t->val);
    free(t->tok_json);
    free(t->stats_host);
    free(t->eval_host);
    free(t->metrics);
    memset(t, 0, sizeof *t);
}

double trainer_eval(tlm_trainer *t) {
    tlm_model *m = &t->model;
    tlm_ops *o = t->ops;
    const int T = m->cfg.context, B = t->eval_B;
    /* The same sum, in the same order, as adding up the batch losses one
     * by one; but the host waits once per chunk instead of per batch. */
    double sum = 0;
    for (int64_t k0 = 0; k0 < t->eval_nb; k0 += t->eval_chunk) {
        int n = t->eval_nb - k0 < t->eval_chunk ? (int)(t->eval_nb - k0) : t->eval_chunk;
        for (int i = 0; i < n; i++) {
            const int64_t k = k0 + i;
            const int j = (int)(k % 2);
            int32_t *in = t->eval_buf[j], *tg = in + (size_t)B * T;
            /* this buffer's previous upload (two batches ago) must be done */
            model_stage_done(m, t->eval_ticket[j], 1);
            loader_fill(&t->val, B, T, 0, 0, (uint64_t)k, 0, in, tg);
            if ((t->eval_ticket[j] = model_stage(m, in, tg, B, T)) < 0 || model_step(m, 0.0f, t->eval_dev + i))
                return NAN;
        }
        o->copy_d2h(o, t->eval_host, t->eval_dev, (size_t)n * sizeof(float));
        for (int i = 0; i < n; i++) sum += t->eval_host[i];
    }
    if (ops_status(o)) return NAN;
    return sum / (double)t->eval_nb;
}

static int notify(tlm_train_cb cb, void *user, tlm_train_progress *p, tlm_train_event ev) {
    if (!cb) return 0;
    p->event = ev;
    return cb(user, p);
}

static int diverged(const tlm_trainer *t, const char *what, double v, int64_t step) {
    const char *val = isnan(v) ? "NaN" : v > 0 ? "+Inf" : "-Inf";
    if (t->saved_step >= 0)
        return tlm_errorf("%s is %s at step %lld (training diverged): this state was not saved and the checkpoint of "
                          "step %lld in %s is kept; resume it with a lower --lr than %g",
                          what, val, (long long)step, (long long)t->saved_step, t->opt.out, t->opt.lr);
    return tlm_errorf("%s is %s at step %lld (training diverged): nothing was saved; start again with a lower --lr "
                      "than %g",
                      what, val, (long long)step, t->opt.lr);
}

/* Read what the step left on the device (one copy: the squared gradient
 * norm and every micro-batch loss) into *loss and *gnorm; -1 on a device
 * error or a non-finite value. */
static int read_stats(tlm_trainer *t, int64_t step, float *loss, double *gnorm) {
    const int accum = t->opt.accum;
    tlm_ops *o = t->ops;
    o->copy_d2h(o, t->stats_host, t->stats_dev, (size_t)(1 + accum) * sizeof(float));
    if (ops_status(o)) return -1;
    /* added up as when each micro-batch's loss came back on its own */
    double lsum = 0;
    for (int a = 0; a < accum; a++) lsum += t->stats_host[1 + a];
    /* Kept as a float so metrics.jsonl (%.9g) reproduces it exactly. */
    *loss = (float)(lsum / accum);
    *gnorm = sqrt((double)t->stats_host[0]);
    if (!isfinite(*loss)) return diverged(t, "the training loss", *loss, step);
    if (!isfinite(*gnorm)) return diverged(t, "the gradient norm", *gnorm, step);
    return 0;
}

static int run_steps(tlm_trainer *t, tlm_train_cb cb, void *user, volatile sig_atomic_t *stop) {
    const tlm_train_opts *o = &t->opt;
    tlm_model *m = &t->model;
    const int B = o->batch, T = m->cfg.context;
    const uint64_t tokens_per_step = (uint64_t)B * (uint64_t)T * (uint64_t)o->accum;
    /* The mean over every token of the accumulated batch. */
    const float grad_scale = (float)(1.0 / (double)tokens_per_step);
    const double t0 = tlm_now(), base_elapsed = t->elapsed_s;
    double tps = 0;
    int64_t session_steps = 0;
    int stop_req = 0;
    tlm_train_progress pr;
    memset(&pr, 0, sizeof pr);
    pr.max_steps = o->max_steps;
    pr.loss = pr.grad_norm = NAN;
    /* Throughput is measured from reading to reading: only a reading shows
     * where the device is (between them the host may run ahead of it). The
     * time counted is that of the steps themselves (from their start to
     * their enqueueing or reading), so evaluations and saves do not count. */
    double step_time = 0;
    int64_t read_step = t->step;
    int have_tps = 0;

    while (t->step < o->max_steps) {
        const int64_t step = t->step + 1;
        const double ts = tlm_now();
        const double lr = schedule_lr(step, o->lr, o->min_lr, o->warmup, o->max_steps);

        model_zero_grad(m);
        for (int a = 0; a < o->accum; a++) {
            if (feed_next(&t->feed, B, T)) return -1;
            if (model_step(m, grad_scale, t->stats_dev + 1 + a)) return -1;
        }
        adamw_grad_norm_async(&t->adam, m, t->stats_dev);
        adamw_update(&t->adam, m, lr, o->weight_decay, o->clip, step);
        t->step = step;
        t->tokens += tokens_per_step;
        if (ops_status(t->ops)) return -1;

        double now = tlm_now();
        const int timed_out = o->max_time > 0 && now - t0 >= o->max_time;
        const int finished = step >= o->max_steps || timed_out;
        const int eval_due = step % o->eval_every == 0 || finished;
        const int log_due = step % o->log_every == 0 || step == 1 || eval_due;
        /* the one host wait of a step, on the steps that record the loss */
        int fresh = 0;
        if (log_due || step % o->save_every == 0 || (stop && *stop)) {
            float loss;
            double gnorm;
            if (read_stats(t, step, &loss, &gnorm)) return -1;
            fresh = 1;
            now = tlm_now();
            pr.loss = loss;
            pr.grad_norm = gnorm;
            pr.loss_step = step;
        }
        step_time += now - ts;
        if (fresh) {
            const int64_t n = step - read_step;
            const double inst = step_time > 0 ? (double)tokens_per_step * (double)n / step_time : 0;
            /* a moving average with weight 0.1 per step */
            const double keep_w = pow(0.9, (double)n);
            tps = have_tps ? keep_w * tps + (1 - keep_w) * inst : inst;
            have_tps = 1;
            step_time = 0;
            read_step = step;
        }
        session_steps++;
        t->elapsed_s = base_elapsed + (now - t0);

        double eta = (double)(o->max_steps - step) * (now - t0) / (double)session_steps;
        if (o->max_time > 0 && o->max_time - (now - t0) < eta) eta = o->max_time - (now - t0);
        if (eta < 0) eta = 0;

        pr.step = step;
        pr.tokens = t->tokens;
        pr.val_loss = t->last_val;
        pr.best_val_loss = t->best_val;
        pr.lr = lr;
        pr.tokens_per_s = tps;
        pr.elapsed_s = t->elapsed_s;
        pr.eta_s = eta;
        if (notify(cb, user, &pr, TLM_TRAIN_STEP)) stop_req = 1;
        if (stop && *stop) stop_req = 1;
        if (stop_req && !fresh) {
            /* asked to stop on a step that did not read: it is recorded */
            float loss;
            double gnorm;
            if (read_stats(t, step, &loss, &gnorm)) return -1;
            pr.loss = loss;
            pr.grad_norm = gnorm;
            pr.loss_step = step;
        }
        /* Recorded after the callback, so a step where it asked to stop
         * (the last one before a resume) is in the history too. */
        if (log_due || stop_req) {
            tlm_metric r = {step, t->tokens, pr.loss, NAN, lr, tps, t->elapsed_s, pr.grad_norm};
            if (metrics_add(t, &r)) return -1;
        }

        if (eval_due) {
            const double val = trainer_eval(t);
            if (ops_status(t->ops)) return -1;
            if (!isfinite(val)) return diverged(t, "the validation loss", val, step);
            t->last_val = val;
            if (!(val >= t->best_val)) t->best_val = val; /* also replaces NAN */
            t->metrics[t->nmetrics - 1].val_loss = val;
            pr.val_loss = val;
            pr.best_val_loss = t->best_val;
            if (notify(cb, user, &pr, TLM_TRAIN_EVAL)) stop_req = 1;
        }
        if (stop && *stop) stop_req = 1;
        const int save_due = step % o->save_every == 0 || finished || stop_req;
        if (save_due) {
            t->elapsed_s = base_elapsed + (tlm_now() - t0);
            if (trainer_save(t)) return -1;
            if (notify(cb, user, &pr, TLM_TRAIN_SAVE)) stop_req = 1;
        } else if (eval_due) {
            if (metrics_write(t)) return -1;
        }
        if (stop_req && !finished) {
            if (t->saved_step != t->step && trainer_save(t)) return -1;
            return 1;
        }
        if (timed_out) break;
    }
    return 0;
}

int trainer_run(tlm_trainer *t, tlm_train_cb cb, void *user, volatile sig_atomic_t *stop) {
    int rc = run_steps(t, cb, user, stop);
    /* every batch back to the loader, its upload done (also on errors) */
    feed_release(&t->feed, 0);
    return rc;
}
