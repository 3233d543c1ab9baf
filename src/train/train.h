/*
 * Training: the learning-rate schedule, AdamW with global-norm clipping,
 * checkpoints (a Hugging Face run folder plus trainer_state.*), and the loop.
 *
 * The loop never prints: it reports every step, evaluation and save through
 * a callback, and returns errors via tlm_last_error(). A run is a pure
 * function of its options: the batches come from (seed, epoch, index), the
 * optimizer state is saved exactly, so a stopped-and-resumed run reproduces
 * an uninterrupted one bit for bit (on the same device and thread count).
 */
#ifndef TLM_TRAIN_TRAIN_H
#define TLM_TRAIN_TRAIN_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "data/loader.h"
#include "data/tokfile.h"
#include "model/config.h"
#include "model/model.h"
#include "ops/ops.h"
#include "util/common.h"

/* ---- options ------------------------------------------------------------ */

typedef struct {
    char data[1024];        /* --data: folder from `tinylm prepare` */
    char out[1024];         /* --out: the run folder */
    /* Model shape. vocab always comes from the data. On --resume, a zero
     * field means "as saved"; a non-zero one must equal the saved value. */
    tlm_config cfg;
    int batch;              /* --batch: sequences per micro-batch */
    int accum;              /* --accum: micro-batches per optimizer step */
    double lr;              /* --lr: peak learning rate */
    double min_lr;          /* --min-lr: < 0 means lr / 10 */
    int64_t warmup;         /* --warmup: < 0 means min(100, max_steps) */
    double weight_decay;    /* --weight-decay (2-D weights only) */
    double clip;            /* --clip: global gradient norm, 0 = off */
    int64_t max_steps;      /* --max-steps: also the cosine horizon */
    double max_time;        /* --max-time seconds for this invocation, 0 = none */
    int64_t eval_every;     /* --eval-every */
    int64_t eval_batches;   /* --eval-batches */
    int64_t save_every;     /* --save-every: 0 means eval_every */
    int64_t log_every;      /* --log-every: metrics.jsonl cadence */
    int workers;            /* --workers: loader threads (0 = caller's thread) */
    int prefetch;           /* --prefetch: ring slots */
    uint64_t seed;          /* --seed */
    int threads;            /* --threads: compute threads, 0 = all cores */
    char device[32];        /* --device: auto, cpu, cpu-ref, cuda[:N] */
    char dtype[8];          /* --dtype: matrix products in fp32, bf16 (CUDA only) or auto (bf16 on CUDA,
                               fp32 on the CPU); "" = auto */
    int resume;             /* --resume */
    /* Not a flag and not saved: run on this op table instead of creating
     * one from device and dtype (borrowed: the caller destroys it after
     * trainer_close). NULL normally; tests use it to train on the CUDA
     * emulator. */
    tlm_ops *ops;
} tlm_train_opts;

/* Defaults of every flag (model shape left zero: the caller picks a preset). */
void train_opts_default(tlm_train_opts *o);

/* Read the options a run was saved with (RUN/trainer_state.json), for a
 * resume that keeps everything not given on the command line. cfg is left
 * zeroed (the shape comes from RUN/config.json), resume is set. */
int train_opts_load(tlm_train_opts *o, const char *run_dir);

/* ---- schedule ----------------------------------------------------------- */

/* Learning rate for 1-based `step`: linear warmup lr*step/warmup up to
 * step == warmup, then cosine from lr down to min_lr at step == max_steps,
 * then constant min_lr. */
double schedule_lr(int64_t step, double lr, double min_lr, int64_t warmup, int64_t max_steps);

/* ---- optimizer ---------------------------------------------------------- */

#define TLM_ADAM_BETA1 0.9
#define TLM_ADAM_BETA2 0.95
#define TLM_ADAM_EPS 1e-8

/* AdamW moments, one flat device array each, aligned with model->params. */
typedef struct {
    float *m, *v;       /* device [P] */
    float *gnorm_sq;    /* device scalar: sum of squared gradients */
    size_t n;
} tlm_adamw;

int adamw_create(tlm_adamw *a, tlm_ops *ops, size_t nparams);
void adamw_destroy(tlm_adamw *a, tlm_ops *ops);
/* Global gradient norm of model->grads (also left on the device for
 * clipping by the next adamw_update). Waits for the device. */
double adamw_grad_norm(tlm_adamw *a, tlm_model *m);
/* The same without waiting: the squared norm stays in a->gnorm_sq for
 * adamw_update and, when copy_to is given, is copied there too (a device
 * float), so the caller can read it with its losses in one copy. */
void adamw_grad_norm_async(tlm_adamw *a, tlm_model *m, float *copy_to);
/* One AdamW step (t is 1-based) on every tensor of the model, decoupled
 * weight decay only where tensor.decay is set, gradients scaled so their
 * global norm is at most clip (clip <= 0: no clipping). Call
 * adamw_grad_norm first. */
void adamw_update(tlm_adamw *a, tlm_model *m, double lr, double weight_decay, double clip, int64_t t);

/* ---- metrics ------------------------------------------------------------ */

typedef struct {
    int64_t step;
    uint64_t tokens;
    double loss, val_loss;   /* val_loss NAN where not evaluated */
    double lr, tokens_per_s, elapsed_s, grad_norm;
} tlm_metric;

/* ---- the trainer -------------------------------------------------------- */

/* ---- the batch feed: loader -> device ------------------------------------ */
/*
 * What every training step does to get its batch onto the device: take the
 * next batch from the loader's ring (filled ahead by its workers, in
 * page-locked memory where the device has it), stage it (model_stage: an
 * asynchronous copy on the device's copy queue, overlapping the step before)
 * and hand the ring slot back once that copy has finished. Shared by the
 * trainer and the benchmark that measures what it costs (tinylm bench
 * --only loader), so the figure is the trainer's own path.
 */
typedef struct {
    tlm_batch b;
    int64_t ticket;           /* model_stage ticket of its upload */
} tlm_held_batch;

typedef struct {
    tlm_loader *loader;
    tlm_model *model;
    int keep;                 /* batches held while their upload runs */
    tlm_held_batch held[2];   /* oldest first */
    int nheld;
} tlm_feed;

/* prefetch: the loader's ring slots. With two or more, one batch is held
 * while its copy runs (the loader keeps a slot to fill next); with one,
 * none is. */
void feed_init(tlm_feed *f, tlm_loader *l, tlm_model *m, int prefetch);
/* The next batch onto the device ([B,T] inputs and targets, staged for the
 * next model_step). -1 + error. */
int feed_next(tlm_feed *f, int B, int T);
/* Hand back every held batch whose upload has finished; while more than
 * `keep` are held, wait for the oldest one's copy. keep 0 returns them all
 * (before the loader or the model goes away). */
void feed_release(tlm_feed *f, int keep);

typedef struct tlm_trainer {
    tlm_train_opts opt;      /* resolved: min_lr, warmup, save_every filled in */
    tlm_ops *ops;
    int own_ops;             /* ops came from ops_create (not opt.ops): trainer_close destroys it */
    char device_note[256];   /* ops_create's banner line */
    tlm_tokfile train, val;
    int train_ok, val_ok;
    char *tok_json;          /* DIR/tokenizer.json bytes, copied into RUN */
    size_t tok_json_len;
    tlm_model model;
    int model_ok;
    tlm_loader *loader;
    tlm_adamw adam;
    int adam_ok;
    /* What a step leaves on the device, read with one copy when it is
     * logged: [0] the squared gradient norm, [1 + a] the mean loss of
     * micro-batch a. */
    float *stats_dev;        /* device [1 + accum] */
    float *stats_host;       /* host [1 + accum] */
    tlm_feed feed;           /* loader batches onto the device */
    /* Evaluation: batches alternate between two host buffers (inputs then
     * targets, [2,B,T] each, from host_alloc) so one uploads while the
     * next is filled; their losses gather on the device and are read in
     * chunks. */
    int32_t *eval_buf[2];
    int eval_pinned[2];
    int64_t eval_ticket[2];  /* model_stage ticket of each buffer's last upload */
    float *eval_dev;         /* device [eval_chunk] */
    float *eval_host;        /* host [eval_chunk] */
    int eval_chunk;
    int eval_B;              /* rows per eval batch (B, or fewer when val is small) */
    int64_t eval_nb;         /* eval batches actually used */
    uint64_t loader_seed;
    tlm_rng rng;             /* seeds everything random; saved with the run */

    /* progress */
    int64_t step;            /* optimizer steps done */
    uint64_t tokens;         /* training tokens consumed */
    double elapsed_s;        /* training seconds over all invocations */
    double last_val, best_val; /* NAN until evaluated */
    int64_t saved_step;      /* step of the checkpoint on disk, -1 if none */
    tlm_metric *metrics;
    size_t nmetrics, cap_metrics;
} tlm_trainer;

/* Open the data, check it against the options (and, with opt->resume, the
 * checkpoint in opt->out), create the device, model, optimizer and loader.
 * Fresh runs refuse a folder that already holds a checkpoint. Nothing is
 * written to opt->out here except creating the folder. On failure the
 * trainer is closed and the error names the file or flag. */
int trainer_open(tlm_trainer *t, const tlm_train_opts *opt);
void trainer_close(tlm_trainer *t);

typedef enum { TLM_TRAIN_STEP, TLM_TRAIN_EVAL, TLM_TRAIN_SAVE } tlm_train_event;

typedef struct {
    tlm_train_event event;
    int64_t step, max_steps;
    uint64_t tokens;
    double loss;             /* this step's mean training loss */
    double val_loss;         /* last evaluation (NAN if none yet) */
    double best_val_loss;
    double lr, grad_norm;
    /* The step loss and grad_norm were measured at. A step reads them from
     * the device only when they are recorded (every --log-every steps, the
     * first and last step, evaluations, saves, stops), so the host never
     * waits for the device otherwise; other steps report the latest
     * reading, and loss_step < step says so. */
    int64_t loss_step;
    double tokens_per_s;     /* recent training throughput */
    double elapsed_s;        /* over all invocations of this run */
    double eta_s;            /* to max_steps or max_time, whichever is sooner */
} tlm_train_progress;

/* Called after every step (TLM_TRAIN_STEP), after each evaluation and each
 * save. A non-zero return asks the loop to stop: it saves and returns 1. */
typedef int (*tlm_train_cb)(void *user, const tlm_train_progress *p);

/* Train until max_steps or max_time (then evaluate, save, return 0), or
 * until the callback or *stop (set from a signal handler; may be NULL) asks
 * to stop (save, return 1). A non-finite loss or gradient returns -1 when
 * it is read (see loss_step; always before a save) without saving, leaving
 * the last good checkpoint as it was; so does a device error
 * (ops_status), with the device's message.
 * Host waits: a step waits for the device only to read its loss (one copy
 * of the losses and the gradient norm together), and to reuse a loader
 * slot whose upload is still running (which waits for that copy, not for
 * the compute). */
int trainer_run(tlm_trainer *t, tlm_train_cb cb, void *user, volatile sig_atomic_t *stop);

/* Mean validation loss over the first eval_batches batches of val.bin.
 * NaN, with the device's error set, when the device failed. */
double trainer_eval(tlm_trainer *t);

/* Write the checkpoint for the current step into opt.out (see checkpoint.c
 * for the order that keeps it consistent across a crash). */
int trainer_save(tlm_trainer *t);

/* Does run_dir hold checkpoint files? */
int checkpoint_exists(const char *run_dir);

/* ---- internal to src/train (checkpoint.c <-> trainer.c) ------------------ */

/* What trainer_state.json records besides the options. */
typedef struct {
    tlm_train_opts opt;       /* the options the run was saved with */
    int64_t step;
    uint64_t tokens;
    uint64_t epoch, index;    /* loader position of the next batch */
    uint64_t loader_seed;
    tlm_rng rng;
    double elapsed_s, best_val, last_val;
    uint64_t sum_model, sum_m, sum_v, sum_tok; /* FNV-1a of the saved data */
} tlm_ckpt_state;

int checkpoint_read_state(tlm_ckpt_state *s, const char *run_dir);
/* Load params and AdamW moments from the run folder into t and verify they
 * belong to state s (same step, same checksums). */
int checkpoint_load_tensors(tlm_trainer *t, const tlm_ckpt_state *s);
/* metrics.jsonl and loss.svg from t->metrics. */
int metrics_write(const tlm_trainer *t);
/* Read RUN/metrics.jsonl back, keeping records up to max_step. A missing
 * file gives no records. */
int metrics_load(tlm_trainer *t, int64_t max_step);
int metrics_add(tlm_trainer *t, const tlm_metric *r);

#endif
