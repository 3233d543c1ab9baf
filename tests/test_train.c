/* Training: schedule values, AdamW details, learning, bit-exact resume,
 * divergence handling, damaged checkpoints, refusal to overwrite, and
 * unwritable run folders. Everything runs on a tiny model (dim 32, 2
 * layers, context 16, vocab ~300) built from synthetic token files. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokfile.h"
#include "io/fileio.h"
#include "io/safetensors.h"
#include "text/tokenizer.h"
#include "train/train.h"
#include "util/common.h"

/* ---- fixtures ------------------------------------------------------------ */

static const char *WORDS[] = {"the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "a",
                              "red", "ball", "in", "garden", "while", "bird", "sang", "tree", "of", "sun"};

/* A tokenizer trained on generated words, and token files holding a
 * learnable sequence: next = (7 * prev + 3) mod V, with a random token in
 * place of 1 in 10 so the loss cannot reach zero. */
static int make_data(const char *dir, int want_vocab, uint64_t ntrain, uint64_t nval, uint64_t seed) {
    tlm_rng r;
    tlm_rng_seed(&r, seed);
    size_t cap = 20000, len = 0;
    char *text = malloc(cap);
    while (len + 16 < cap) {
        const char *w = WORDS[tlm_rng_below(&r, sizeof WORDS / sizeof WORDS[0])];
        len += (size_t)snprintf(text + len, cap - len, "%s%s", w, tlm_rng_below(&r, 8) == 0 ? ".\n" : " ");
    }
    const char *docs[1] = {text};
    size_t lens[1] = {len};
    tlm_tokenizer *tok = tokenizer_train(docs, lens, 1, want_vocab, NULL, NULL);
    free(text);
    if (!tok) return -1;
    dir_create(dir);
    char p[1200];
    int rc = tokenizer_save(tok, path_join(p, sizeof p, dir, "tokenizer.json"));
    int V = tokenizer_vocab_size(tok);
    tokenizer_free(tok);
    if (rc) return -1;
    uint64_t n = ntrain + nval;
    int32_t *toks = malloc(n * sizeof(int32_t));
    toks[0] = 1;
    for (uint64_t i = 1; i < n; i++)
        toks[i] = tlm_rng_below(&r, 10) == 0 ? (int32_t)tlm_rng_below(&r, (uint64_t)V)
                                             : (int32_t)((7 * (int64_t)toks[i - 1] + 3) % V);
    rc = tokfile_write(path_join(p, sizeof p, dir, "train.bin"), toks, ntrain, V, 1);
    if (!rc) rc = tokfile_write(path_join(p, sizeof p, dir, "val.bin"), toks + ntrain, nval, V, 1);
    free(toks);
    return rc;
}

/* strcpy with a length check (snprintf into the fixed option buffers
 * trips -Wformat-truncation on our longer path buffers). */
static void set_str(char *dst, size_t n, const char *src) {
    size_t len = strlen(src);
    assert_true(len < n);
    memcpy(dst, src, len + 1);
}

static void tiny_opts(tlm_train_opts *o, const char *data, const char *out) {
    train_opts_default(o);
    set_str(o->data, sizeof o->data, data);
    set_str(o->out, sizeof o->out, out);
    o->cfg.dim = 32;
    o->cfg.layers = 2;
    o->cfg.heads = 2;
    o->cfg.hidden = 64;
    o->cfg.context = 16;
    o->cfg.norm_eps = 1e-5f;
    o->cfg.rope_theta = 10000.0f;
    o->batch = 4;
    o->accum = 1;
    o->lr = 1e-2;
    o->warmup = 5;
    o->max_steps = 20;
    o->eval_every = 5;
    o->eval_batches = 3;
    o->log_every = 1;
    o->workers = 2;
    o->prefetch = 3;
    o->seed = 42;
    o->threads = 1;
    snprintf(o->device, sizeof o->device, "cpu");
}

/* Shared test folders: one data set for every test. */
typedef struct {
    char *root;
    char data[1100];
} fixture;

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    f->root = test_tmpdir();
    path_join(f->data, sizeof f->data, f->root, "data");
    /* 1200 training tokens = 74 windows = 18 batches of 4: the resume test
     * crosses epoch boundaries. */
    if (make_data(f->data, 300, 1200, 600, 7)) {
        fprintf(stderr, "make_data: %s\n", tlm_last_error());
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    test_rmtree(f->root);
    free(f->root);
    free(f);
    return 0;
}

/* What the progress callback sees, and what it should do. */
typedef struct {
    tlm_trainer *t;
    float loss[256];      /* by step */
    double val[256];      /* by step, NAN where not evaluated */
    int64_t last_step;
    int64_t stop_at;      /* ask to stop after this step (0: never) */
    int64_t poison_at;    /* write NaN into the parameters after this step */
    int nsaves;
} recorder;

static void recorder_init(recorder *r, tlm_trainer *t) {
    memset(r, 0, sizeof *r);
    r->t = t;
    for (int i = 0; i < 256; i++) {
        r->loss[i] = NAN;
        r->val[i] = NAN;
    }
}

static int on_progress(void *user, const tlm_train_progress *p) {
    recorder *r = user;
    if (p->event == TLM_TRAIN_STEP) {
        assert_true(p->step > r->last_step);
        r->last_step = p->step;
        if (p->step < 256) r->loss[p->step] = (float)p->loss;
        if (p->step == r->poison_at) {
            float nan = NAN;
            tlm_ops *o = r->t->ops;
            o->copy_h2d(o, r->t->model.params + 5, &nan, sizeof nan);
        }
        return p->step == r->stop_at;
    }
    if (p->event == TLM_TRAIN_EVAL && p->step < 256) r->val[p->step] = p->val_loss;
    if (p->event == TLM_TRAIN_SAVE) r->nsaves++;
    return 0;
}

static float *host_params(tlm_trainer *t) {
    size_t n = t->model.nparams;
    float *h = malloc(n * sizeof(float));
    t->ops->copy_d2h(t->ops, h, t->model.params, n * sizeof(float));
    return h;
}

/* Snapshot of the checkpoint files, for byte-for-byte comparisons. */
static const char *FILES[] = {"config.json", "tokenizer.json", "model.safetensors", "trainer_state.safetensors",
                              "trainer_state.json", "metrics.jsonl", "loss.svg"};
#define NFILES ((int)(sizeof FILES / sizeof FILES[0]))
typedef struct {
    char *data[NFILES];
    size_t len[NFILES];
} snapshot;

static void snap_take(snapshot *s, const char *dir) {
    char p[1200];
    for (int i = 0; i < NFILES; i++) {
        s->data[i] = test_read_file(path_join(p, sizeof p, dir, FILES[i]), &s->len[i]);
        assert_non_null(s->data[i]);
    }
}

static void snap_check_same(const snapshot *s, const char *dir) {
    snapshot now;
    snap_take(&now, dir);
    for (int i = 0; i < NFILES; i++) {
        if (now.len[i] != s->len[i] || memcmp(now.data[i], s->data[i], s->len[i]))
            fail_msg("%s/%s changed", dir, FILES[i]);
        free(now.data[i]);
    }
}

static void snap_free(snapshot *s) {
    for (int i = 0; i < NFILES; i++) free(s->data[i]);
}

static void write_file(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, n, fp), n);
    fclose(fp);
}

/* Train opts into a fresh trainer, expecting rc from trainer_run. */
static void train_expect(const tlm_train_opts *o, recorder *r, int want_rc, float **params_out) {
    tlm_trainer t;
    if (trainer_open(&t, o)) fail_msg("trainer_open: %s", tlm_last_error());
    recorder_init(r, &t);
    int rc = trainer_run(&t, on_progress, r, NULL);
    if (rc != want_rc) fail_msg("trainer_run returned %d, wanted %d: %s", rc, want_rc, tlm_last_error());
    if (params_out) *params_out = host_params(&t);
    trainer_close(&t);
}

/* ---- schedule ------------------------------------------------------------ */

static void test_schedule(void **state) {
    (void)state;
    const double lr = 1e-3, mn = 1e-4;
    /* warmup 10, horizon 110: the cosine spans steps 10..110 */
    assert_float_equal(schedule_lr(1, lr, mn, 10, 110), 1e-4, 1e-15);
    assert_float_equal(schedule_lr(5, lr, mn, 10, 110), 5e-4, 1e-15);
    assert_float_equal(schedule_lr(10, lr, mn, 10, 110), 1e-3, 1e-15);
    /* a quarter of the way: 1e-4 + 0.45e-3 * (1 + cos(pi/4)) */
    assert_float_equal(schedule_lr(35, lr, mn, 10, 110), 8.681980515339464e-4, 1e-15);
    /* half way: the mean of lr and min_lr */
    assert_float_equal(schedule_lr(60, lr, mn, 10, 110), 5.5e-4, 1e-15);
    /* three quarters: 1e-4 + 0.45e-3 * (1 - cos(pi/4)) */
    assert_float_equal(schedule_lr(85, lr, mn, 10, 110), 2.318019484660536e-4, 1e-15);
    assert_float_equal(schedule_lr(110, lr, mn, 10, 110), 1e-4, 1e-15);
    assert_float_equal(schedule_lr(500, lr, mn, 10, 110), 1e-4, 1e-15);
    /* no warmup: step 1 of 3 is a third of the way down */
    assert_float_equal(schedule_lr(1, 0.3, 0.0, 0, 3), 0.15 * (1 + 0.5), 1e-15);
    /* warmup as long as the run: pure ramp, then the floor */
    assert_float_equal(schedule_lr(4, 1.0, 0.1, 4, 4), 1.0, 1e-15);
    assert_float_equal(schedule_lr(5, 1.0, 0.1, 4, 4), 0.1, 1e-15);

    /* Defaults the trainer derives: min_lr = lr/10, warmup clamped. */
    tlm_train_opts o;
    train_opts_default(&o);
    assert_int_equal(o.batch, 16);
    assert_true(o.lr == 1e-3);
    assert_true(o.weight_decay == 0.1 && o.clip == 1.0);
    assert_int_equal(o.max_steps, 1500);
    assert_int_equal(o.eval_every, 100);
    assert_int_equal(o.eval_batches, 20);
}

/* ---- optimizer ------------------------------------------------------------ */

static void test_adamw(void **state) {
    (void)state;
    tlm_config c = {300, 32, 2, 2, 64, 16, 1e-5f, 10000.0f};
    tlm_ops *ops = ops_create("cpu", 1, NULL, 0);
    assert_non_null(ops);
    tlm_model m;
    assert_int_equal(model_create(&m, &c, ops), 0);
    assert_int_equal(model_alloc_train(&m, 1, 16), 0);
    model_init_random(&m, 3);
    size_t P = m.nparams;
    tlm_adamw a;
    assert_int_equal(adamw_create(&a, ops, P), 0);
    float *p0 = malloc(P * sizeof(float)), *p1 = malloc(P * sizeof(float)), *g = malloc(P * sizeof(float));
    ops->copy_d2h(ops, p0, m.params, P * sizeof(float));

    /* Zero gradients: only decoupled weight decay moves the parameters,
     * p *= 1 - lr*wd on 2-D weights, norms untouched. */
    model_zero_grad(&m);
    assert_float_equal(adamw_grad_norm(&a, &m), 0.0, 0.0);
    adamw_update(&a, &m, 0.1, 0.5, 1.0, 1);
    ops->copy_d2h(ops, p1, m.params, P * sizeof(float));
    int ndecay = 0, nnorm = 0;
    for (int i = 0; i < m.ntensors; i++) {
        const tlm_tensor *ts = &m.tensors[i];
        for (size_t k = ts->offset; k < ts->offset + (size_t)ts->rows * ts->cols; k++) {
            float want = ts->decay ? p0[k] * (1.0f - 0.05f) : p0[k];
            assert_float_equal(p1[k], want, 1e-6 * fabsf(p0[k]) + 1e-12);
        }
        if (ts->decay) ndecay++;
        else nnorm++;
    }
    assert_int_equal(nnorm, 2 * c.layers + 1);
    assert_int_equal(ndecay, 1 + 7 * c.layers);

    /* Gradients of 3 everywhere: norm 3*sqrt(P); clipped to 1. The first
     * bias-corrected Adam step moves every parameter by lr * sign(g),
     * whatever the clipping scale (the scale cancels in m/sqrt(v)). */
    adamw_destroy(&a, ops);
    assert_int_equal(adamw_create(&a, ops, P), 0);
    for (size_t k = 0; k < P; k++) g[k] = 3.0f;
    ops->copy_h2d(ops, m.grads, g, P * sizeof(float));
    assert_float_equal(adamw_grad_norm(&a, &m), 3.0 * sqrt((double)P), 1e-4 * 3.0 * sqrt((double)P));
    adamw_update(&a, &m, 0.01, 0.0, 1.0, 1);
    ops->copy_d2h(ops, p0, m.params, P * sizeof(float));
    for (size_t k = 0; k < P; k++) assert_float_equal(p0[k], p1[k] - 0.01f, 1e-5);
    /* The second moment holds the clipped gradient: (1-b2) * (3/(3 sqrt P))^2. */
    ops->copy_d2h(ops, g, a.v, P * sizeof(float));
    double want_v = (1 - TLM_ADAM_BETA2) / (double)P;
    assert_float_equal(g[0], want_v, 1e-3 * want_v);
    assert_float_equal(g[P - 1], want_v, 1e-3 * want_v);

    free(p0);
    free(p1);
    free(g);
    adamw_destroy(&a, ops);
    model_destroy(&m);
    ops_destroy(ops);
}

/* ---- learning -------------------------------------------------------------- */

static void test_loss_decreases(void **state) {
    fixture *f = *state;
    char out[1200];
    path_join(out, sizeof out, f->root, "run_learn");
    tlm_train_opts o;
    tiny_opts(&o, f->data, out);
    o.max_steps = 50;
    o.eval_every = 25;
    recorder r;
    train_expect(&o, &r, 0, NULL);
    assert_int_equal(r.last_step, 50);
    double first = (r.loss[1] + r.loss[2] + r.loss[3]) / 3, last = (r.loss[48] + r.loss[49] + r.loss[50]) / 3;
    /* Starts near ln(300) = 5.7 (uniform guess). */
    assert_true(fabs(first - log(300.0)) < 0.5);
    if (!(last < first - 1.5)) fail_msg("loss went from %g to %g in 50 steps", first, last);
    assert_true(isfinite(r.val[25]) && isfinite(r.val[50]));
    assert_true(r.val[50] < r.val[25]);

    /* The run folder is a complete checkpoint with a history. */
    char p[1300];
    size_t len;
    char *txt = test_read_file(path_join(p, sizeof p, out, "metrics.jsonl"), &len);
    assert_non_null(txt);
    int lines = 0;
    for (size_t i = 0; i < len; i++) lines += txt[i] == '\n';
    assert_int_equal(lines, 50);
    assert_non_null(strstr(txt, "\"step\": 50,"));
    assert_non_null(strstr(txt, "\"val_loss\""));
    free(txt);
    txt = test_read_file(path_join(p, sizeof p, out, "loss.svg"), &len);
    assert_non_null(txt);
    assert_non_null(strstr(txt, "<svg"));
    free(txt);
    tlm_config c;
    assert_int_equal(config_load_json(&c, path_join(p, sizeof p, out, "config.json")), 0);
    assert_int_equal(c.vocab, 300);
    assert_int_equal(c.dim, 32);
    tlm_st_file *st = safetensors_open(path_join(p, sizeof p, out, "model.safetensors"));
    assert_non_null(st);
    int64_t shape[4];
    assert_int_equal(safetensors_shape(st, "model.embed_tokens.weight", shape), 2);
    assert_int_equal(shape[0], 300);
    assert_int_equal(shape[1], 32);
    assert_int_equal(safetensors_shape(st, "model.norm.weight", shape), 1);
    assert_string_equal(safetensors_meta(st, "format"), "pt");
    safetensors_close(st);
    assert_true(path_exists(path_join(p, sizeof p, out, "tokenizer.json")));
}

/* ---- resume ---------------------------------------------------------------- */

static void check_resume(fixture *f, const char *name, int accum, int threads, int workers_b, int workers_resume) {
    char outa[1200], outb[1200];
    char na[64], nb[64];
    snprintf(na, sizeof na, "%s_a", name);
    snprintf(nb, sizeof nb, "%s_b", name);
    path_join(outa, sizeof outa, f->root, na);
    path_join(outb, sizeof outb, f->root, nb);
    tlm_train_opts o;
    tiny_opts(&o, f->data, outa);
    o.accum = accum;
    o.threads = threads;
    o.save_every = 7; /* saves that do not line up with the stop */

    recorder ra, rb1, rb2;
    float *pa, *pb;
    train_expect(&o, &ra, 0, &pa);
    assert_int_equal(ra.last_step, 20);

    /* Interrupted at step 10 (the callback asks to stop: save, return 1). */
    set_str(o.out, sizeof o.out, outb);
    o.workers = workers_b;
    tlm_trainer t;
    if (trainer_open(&t, &o)) fail_msg("%s", tlm_last_error());
    recorder_init(&rb1, &t);
    rb1.stop_at = 10;
    assert_int_equal(trainer_run(&t, on_progress, &rb1, NULL), 1);
    assert_int_equal(t.saved_step, 10);
    trainer_close(&t);

    /* Resumed with another worker count. */
    o.resume = 1;
    o.workers = workers_resume;
    train_expect(&o, &rb2, 0, &pb);
    assert_int_equal(rb2.last_step, 20);
    for (int s = 1; s <= 20; s++) {
        float lb = s <= 10 ? rb1.loss[s] : rb2.loss[s];
        if (memcmp(&ra.loss[s], &lb, sizeof lb)) fail_msg("step %d: loss %.9g vs resumed %.9g", s, ra.loss[s], lb);
    }
    /* Evaluations after the resume agree too. */
    assert_true(isfinite(ra.val[15]) && ra.val[15] == rb2.val[15]);
    assert_true(ra.val[20] == rb2.val[20]);
    tlm_trainer tmp;
    size_t P;
    {
        /* parameter count of this shape, for the comparison */
        tlm_train_opts q = o;
        q.max_steps = 1000;
        if (trainer_open(&tmp, &q)) fail_msg("%s", tlm_last_error());
        P = tmp.model.nparams;
        float *pc = host_params(&tmp); /* the reloaded final checkpoint */
        assert_memory_equal(pc, pb, P * sizeof(float));
        free(pc);
        trainer_close(&tmp);
    }
    assert_memory_equal(pa, pb, P * sizeof(float));

    /* The two histories hold the same losses. */
    char p[1300];
    char *ma = test_read_file(path_join(p, sizeof p, outa, "metrics.jsonl"), NULL);
    char *mb = test_read_file(path_join(p, sizeof p, outb, "metrics.jsonl"), NULL);
    assert_non_null(ma);
    assert_non_null(mb);
    const char *xa = ma, *xb = mb;
    int n = 0;
    while ((xa = strstr(xa, "\"loss\": ")) && (xb = strstr(xb, "\"loss\": "))) {
        assert_true(strtod(xa + 8, NULL) == strtod(xb + 8, NULL));
        xa++;
        xb++;
        n++;
    }
    assert_int_equal(n, 20);
    free(ma);
    free(mb);
    free(pa);
    free(pb);
}

/* Two compute threads here: the parallel backend must be deterministic too. */
static void test_resume_bit_exact(void **state) { check_resume(*state, "resume1", 1, 2, 2, 2); }
static void test_resume_other_workers(void **state) { check_resume(*state, "resume2", 2, 1, 3, 0); }

/* ---- divergence -------------------------------------------------------------- */

static void test_nan_keeps_checkpoint(void **state) {
    fixture *f = *state;
    char out[1200];
    path_join(out, sizeof out, f->root, "run_nan");
    tlm_train_opts o;
    tiny_opts(&o, f->data, out);
    o.max_steps = 10;
    recorder r;
    train_expect(&o, &r, 0, NULL);
    snapshot s;
    snap_take(&s, out);

    /* Continue, and poison the parameters after step 12: step 13's loss is
     * NaN. The run must fail without touching the step-10 checkpoint (the
     * next save would have been at step 15). */
    o.resume = 1;
    o.max_steps = 20;
    tlm_trainer t;
    if (trainer_open(&t, &o)) fail_msg("%s", tlm_last_error());
    recorder_init(&r, &t);
    r.poison_at = 12;
    assert_int_equal(trainer_run(&t, on_progress, &r, NULL), -1);
    assert_int_equal(r.last_step, 12);
    assert_int_equal(r.nsaves, 0);
    const char *e = tlm_last_error();
    assert_non_null(strstr(e, "NaN"));
    assert_non_null(strstr(e, "--lr"));
    assert_non_null(strstr(e, "step 10"));
    trainer_close(&t);
    snap_check_same(&s, out);

    /* Poison right before a save point: the evaluation or the save catches
     * it, and the files stay those of step 10. */
    if (trainer_open(&t, &o)) fail_msg("%s", tlm_last_error());
    recorder_init(&r, &t);
    r.poison_at = 15;
    assert_int_equal(trainer_run(&t, on_progress, &r, NULL), -1);
    assert_int_equal(r.nsaves, 0);
    trainer_close(&t);
    snap_check_same(&s, out);

    /* A huge learning rate diverges on its own. */
    char out2[1200];
    path_join(out2, sizeof out2, f->root, "run_nan2");
    tiny_opts(&o, f->data, out2);
    o.lr = 1e6;
    o.warmup = 0;
    o.max_steps = 50;
    if (trainer_open(&t, &o)) fail_msg("%s", tlm_last_error());
    recorder_init(&r, &t);
    assert_int_equal(trainer_run(&t, on_progress, &r, NULL), -1);
    assert_non_null(strstr(tlm_last_error(), "diverged"));
    assert_non_null(strstr(tlm_last_error(), "--lr"));
    assert_true(r.last_step < 50);
    trainer_close(&t);
    snap_free(&s);
}

/* ---- damaged or mismatched checkpoints ------------------------------------------ */

static void expect_open_error(const tlm_train_opts *o, const char *needle1, const char *needle2) {
    tlm_trainer t;
    if (trainer_open(&t, o) == 0) {
        trainer_close(&t);
        fail_msg("trainer_open succeeded, expected an error mentioning %s", needle1);
    }
    const char *e = tlm_last_error();
    if (!strstr(e, needle1) || (needle2 && !strstr(e, needle2)))
        fail_msg("error '%s' should mention '%s' and '%s'", e, needle1, needle2 ? needle2 : "");
    assert_null(strchr(e, '\n'));
}

static void test_damaged_checkpoint(void **state) {
    fixture *f = *state;
    char out[1200], p[1300];
    path_join(out, sizeof out, f->root, "run_damaged");
    tlm_train_opts o;
    tiny_opts(&o, f->data, out);
    o.max_steps = 10;
    recorder r;
    train_expect(&o, &r, 0, NULL);
    snapshot s;
    snap_take(&s, out);
    o.resume = 1;
    o.max_steps = 20;

    /* A flipped byte in the weights. */
    path_join(p, sizeof p, out, "model.safetensors");
    char *b = malloc(s.len[2]);
    memcpy(b, s.data[2], s.len[2]);
    b[s.len[2] - 5] ^= 0x40;
    write_file(p, b, s.len[2]);
    expect_open_error(&o, "model.safetensors", "checksum");
    /* A truncated weights file. */
    write_file(p, s.data[2], s.len[2] / 2);
    expect_open_error(&o, "model.safetensors", NULL);
    write_file(p, s.data[2], s.len[2]);
    free(b);

    /* A flipped byte in the optimizer state. */
    path_join(p, sizeof p, out, "trainer_state.safetensors");
    b = malloc(s.len[3]);
    memcpy(b, s.data[3], s.len[3]);
    b[s.len[3] - 1] ^= 0x01;
    write_file(p, b, s.len[3]);
    expect_open_error(&o, "trainer_state.safetensors", "checksum");
    write_file(p, s.data[3], s.len[3]);
    free(b);

    /* trainer_state.json that is not JSON, or is missing. */
    path_join(p, sizeof p, out, "trainer_state.json");
    write_file(p, "{\"step\": 1", 10);
    expect_open_error(&o, "trainer_state.json", NULL);
    remove(p);
    expect_open_error(&o, "trainer_state.json", "--resume");
    write_file(p, s.data[4], s.len[4]);

    /* An interrupted save: weights from a later step than the state. */
    char out2[1200];
    path_join(out2, sizeof out2, f->root, "run_damaged2");
    tlm_train_opts o2 = o;
    set_str(o2.out, sizeof o2.out, out2);
    o2.resume = 0;
    o2.max_steps = 15;
    train_expect(&o2, &r, 0, NULL);
    size_t len;
    char *later = test_read_file(path_join(p, sizeof p, out2, "model.safetensors"), &len);
    path_join(p, sizeof p, out, "model.safetensors");
    write_file(p, later, len);
    free(later);
    expect_open_error(&o, "step 15", "step 10");
    write_file(p, s.data[2], s.len[2]);

    /* Mismatched shape or data on resume. */
    tlm_train_opts o3 = o;
    o3.cfg.dim = 64;
    o3.cfg.heads = 0;
    expect_open_error(&o3, "--dim", "config.json");
    char data2[1200];
    path_join(data2, sizeof data2, f->root, "data_v280");
    assert_int_equal(make_data(data2, 280, 1200, 600, 9), 0);
    o3 = o;
    set_str(o3.data, sizeof o3.data, data2);
    expect_open_error(&o3, "vocab", "prepare");
    o3 = o;
    o3.batch = 8;
    expect_open_error(&o3, "--batch", NULL);
    /* A finished run only continues with a larger --max-steps. */
    o3 = o;
    o3.max_steps = 10;
    expect_open_error(&o3, "--max-steps", NULL);

    /* All these refusals left the checkpoint intact: it still resumes. */
    snap_check_same(&s, out);
    train_expect(&o, &r, 0, NULL);
    assert_int_equal(r.last_step, 20);
    snap_free(&s);
}

/* ---- refusing to overwrite, bad data, unwritable folders ------------------------ */

static void test_refuse_overwrite(void **state) {
    fixture *f = *state;
    char out[1200];
    path_join(out, sizeof out, f->root, "run_overwrite");
    tlm_train_opts o;
    tiny_opts(&o, f->data, out);
    o.max_steps = 5;
    recorder r;
    train_expect(&o, &r, 0, NULL);
    snapshot s;
    snap_take(&s, out);
    expect_open_error(&o, "already holds a checkpoint", "--resume");
    o.max_steps = 50;
    o.lr = 0.5;
    expect_open_error(&o, "already holds a checkpoint", NULL);
    snap_check_same(&s, out);
    snap_free(&s);
}

static void test_bad_data(void **state) {
    fixture *f = *state;
    char out[1200], bad[1200], p[1300];
    path_join(out, sizeof out, f->root, "run_bad");
    path_join(bad, sizeof bad, f->root, "data_bad");
    tlm_train_opts o;
    tiny_opts(&o, bad, out);
    expect_open_error(&o, "--data", NULL); /* no such folder */

    /* Copy the good data, then break it piece by piece. */
    dir_create(bad);
    const char *names[] = {"tokenizer.json", "train.bin", "val.bin"};
    char *content[3];
    size_t len[3];
    for (int i = 0; i < 3; i++) {
        content[i] = test_read_file(path_join(p, sizeof p, f->data, names[i]), &len[i]);
        write_file(path_join(p, sizeof p, bad, names[i]), content[i], len[i]);
    }
    remove(path_join(p, sizeof p, bad, "train.bin"));
    expect_open_error(&o, "train.bin", "prepare");
    /* truncated */
    write_file(p, content[1], len[1] - 7);
    expect_open_error(&o, "train.bin", NULL);
    /* corrupt payload */
    content[1][len[1] - 3] ^= 0x5a;
    write_file(p, content[1], len[1]);
    expect_open_error(&o, "train.bin", NULL);
    content[1][len[1] - 3] ^= 0x5a;
    write_file(p, content[1], len[1]);

    /* a context too long for the data */
    o.cfg.context = 512;
    expect_open_error(&o, "--context", "train.bin");
    o.cfg.context = 16;
    /* an impossible model */
    o.cfg.heads = 3;
    expect_open_error(&o, "--heads", NULL);
    o.cfg.heads = 2;
    /* out-of-range options */
    o.batch = 0;
    expect_open_error(&o, "--batch", NULL);
    o.batch = 4;
    o.min_lr = 1.0;
    expect_open_error(&o, "--min-lr", NULL);
    o.min_lr = -1;

    /* val.bin from another vocabulary */
    int32_t toks[100];
    for (int i = 0; i < 100; i++) toks[i] = i;
    assert_int_equal(tokfile_write(path_join(p, sizeof p, bad, "val.bin"), toks, 100, 260, 1), 0);
    expect_open_error(&o, "val.bin", "prepare");
    for (int i = 0; i < 3; i++) free(content[i]);
    /* nothing was created for the failed runs */
    assert_false(path_exists(out));
}

static void test_unwritable(void **state) {
    fixture *f = *state;
    char file[1200], out[1300];
    path_join(file, sizeof file, f->root, "plainfile");
    write_file(file, "x", 1);
    path_join(out, sizeof out, file, "run");
    tlm_train_opts o;
    tiny_opts(&o, f->data, out);
    expect_open_error(&o, "plainfile", NULL);

    /* A save that fails mid-run reports the path and leaves no damage. */
    path_join(out, sizeof out, f->root, "run_unwritable");
    tiny_opts(&o, f->data, out);
    tlm_trainer t;
    if (trainer_open(&t, &o)) fail_msg("%s", tlm_last_error());
    set_str(t.opt.out, sizeof t.opt.out, "/proc/tinylm-no-such-run");
    assert_int_equal(trainer_save(&t), -1);
    assert_non_null(strstr(tlm_last_error(), "/proc/tinylm-no-such-run"));
    path_join(t.opt.out, sizeof t.opt.out, file, "run");
    assert_int_equal(trainer_run(&t, NULL, NULL, NULL), -1);
    assert_non_null(strstr(tlm_last_error(), "plainfile"));
    trainer_close(&t);
}

/* ---- reading the loss only when it is recorded ---------------------------------------- */

typedef struct {
    float loss[32];
    double gnorm[32];
    int64_t loss_step[32];
} reading_rec;

static int on_reading(void *user, const tlm_train_progress *p) {
    reading_rec *r = user;
    if (p->event == TLM_TRAIN_STEP && p->step < 32) {
        r->loss[p->step] = (float)p->loss;
        r->gnorm[p->step] = p->grad_norm;
        r->loss_step[p->step] = p->loss_step;
    }
    return 0;
}

static void run_reading(const tlm_train_opts *o, reading_rec *r, float **params, size_t *nparams) {
    tlm_trainer t;
    if (trainer_open(&t, o)) fail_msg("trainer_open: %s", tlm_last_error());
    memset(r, 0, sizeof *r);
    if (trainer_run(&t, on_reading, r, NULL) != 0) fail_msg("trainer_run: %s", tlm_last_error());
    *params = host_params(&t);
    *nparams = t.model.nparams;
    trainer_close(&t);
}

/* A step reads its loss (waits for the device) only on steps it records;
 * the others report the latest reading. Reading less often changes no
 * parameter and no recorded value. */
static void test_loss_readings(void **state) {
    fixture *f = *state;
    char outa[1200], outb[1200], p[1300];
    path_join(outa, sizeof outa, f->root, "read_every");
    path_join(outb, sizeof outb, f->root, "read_5");
    tlm_train_opts o;
    tiny_opts(&o, f->data, outa);
    o.accum = 2;
    o.max_steps = 12;
    o.eval_every = 12;
    o.save_every = 12;
    o.log_every = 1;
    reading_rec ra, rb;
    float *pa, *pb;
    size_t P, Pb;
    run_reading(&o, &ra, &pa, &P);
    set_str(o.out, sizeof o.out, outb);
    o.log_every = 5;
    run_reading(&o, &rb, &pb, &Pb);
    assert_true(P == Pb);
    assert_memory_equal(pa, pb, P * sizeof(float));
    for (int s = 1; s <= 12; s++) {
        assert_true(ra.loss_step[s] == s);
        /* read: the first, every 5th and the last step */
        const int read = s == 1 || s % 5 == 0 || s == 12;
        const int64_t want = read ? s : s < 5 ? 1 : 5 * (s / 5);
        if (rb.loss_step[s] != want)
            fail_msg("step %d reported the loss of step %lld, want %lld", s, (long long)rb.loss_step[s],
                     (long long)want);
        if (memcmp(&rb.loss[s], &ra.loss[want], sizeof rb.loss[s]) || rb.gnorm[s] != ra.gnorm[want])
            fail_msg("step %d: loss %.9g / norm %.9g, the reading of step %lld was %.9g / %.9g", s, rb.loss[s],
                     rb.gnorm[s], (long long)want, ra.loss[want], ra.gnorm[want]);
    }
    /* metrics.jsonl holds the read steps only, with the same values */
    char *txt = test_read_file(path_join(p, sizeof p, outb, "metrics.jsonl"), NULL);
    assert_non_null(txt);
    const char *x = txt;
    const int steps[] = {1, 5, 10, 12};
    for (int i = 0; i < 4; i++) {
        char key[64];
        snprintf(key, sizeof key, "\"step\": %d,", steps[i]);
        x = strstr(x, key);
        if (!x) fail_msg("metrics.jsonl has no record of step %d", steps[i]);
        const char *l = strstr(x, "\"loss\": ");
        assert_non_null(l);
        assert_true((float)strtod(l + 8, NULL) == ra.loss[steps[i]]);
    }
    int lines = 0;
    for (const char *c = txt; *c; c++) lines += *c == '\n';
    assert_int_equal(lines, 4);
    free(txt);
    free(pa);
    free(pb);
}

/* --dtype: refused on the CPU for bf16 and everywhere for an unknown one,
 * saved with the run; runs saved before it existed resume in fp32. */
static void test_dtype_option(void **state) {
    fixture *f = *state;
    char out[1200], p[1300];
    path_join(out, sizeof out, f->root, "run_dtype");
    tlm_train_opts o;
    tiny_opts(&o, f->data, out);
    set_str(o.dtype, sizeof o.dtype, "bf16");
    expect_open_error(&o, "--dtype bf16", "fp32");
    set_str(o.dtype, sizeof o.dtype, "fp16");
    expect_open_error(&o, "--dtype fp16", NULL);
    assert_false(path_exists(out));

    set_str(o.dtype, sizeof o.dtype, "auto"); /* fp32 on the CPU */
    o.max_steps = 2;
    recorder r;
    train_expect(&o, &r, 0, NULL);
    tlm_train_opts got;
    assert_int_equal(train_opts_load(&got, out), 0);
    assert_string_equal(got.dtype, "auto");
    assert_null(got.ops);

    /* an older trainer_state.json without "dtype" */
    size_t len;
    char *js = test_read_file(path_join(p, sizeof p, out, "trainer_state.json"), &len);
    assert_non_null(js);
    char *k = strstr(js, "\"dtype\"");
    assert_non_null(k);
    memcpy(k + 1, "dtypX", 5);
    write_file(p, js, len);
    free(js);
    assert_int_equal(train_opts_load(&got, out), 0);
    assert_string_equal(got.dtype, "fp32");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_schedule),
        cmocka_unit_test(test_adamw),
        cmocka_unit_test(test_loss_decreases),
        cmocka_unit_test(test_resume_bit_exact),
        cmocka_unit_test(test_resume_other_workers),
        cmocka_unit_test(test_nan_keeps_checkpoint),
        cmocka_unit_test(test_damaged_checkpoint),
        cmocka_unit_test(test_refuse_overwrite),
        cmocka_unit_test(test_bad_data),
        cmocka_unit_test(test_unwritable),
        cmocka_unit_test(test_loss_readings),
        cmocka_unit_test(test_dtype_option),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
