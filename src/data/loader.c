/*
 * The data loader (see loader.h for the contract).
 *
 * Shuffling uses a keyed bijection instead of a stored permutation: a
 * Feistel network over the smallest even-bit power-of-two domain that holds
 * the W windows, with cycle walking to stay inside [0, W). Why:
 *  - window j of epoch e is computed in O(1) with no per-epoch table, so
 *    loader_fill stays a pure function of (seed, epoch, index) that any
 *    worker (or the evaluator, or a test) can call without shared state;
 *  - a table of W u64 would cost 8 bytes per window per epoch rebuild (a
 *    billion-token corpus at T=256 is 32 MB and an O(W) pause at every epoch
 *    boundary), the Feistel costs a few hashes per window.
 * A balanced Feistel network is a bijection for any round function, and
 * cycle walking (re-applying it until the value lands below W) restricts
 * a bijection of the larger domain to a bijection of [0, W); the domain is
 * at most 4W, so the expected walk is under 4 steps.
 *
 * Ring protocol: global batch number g = epoch * batches_per_epoch + index
 * lives in slot g % prefetch. A slot is FREE -> FILLING (a worker claimed
 * it) -> READY -> HELD (the consumer has it) -> FREE (loader_release).
 * Workers claim batches strictly in order (next_fill), so batch g waits
 * until batch g - prefetch has been released; the consumer takes them
 * strictly in order (next_consume). loader_seek bumps a generation
 * number: READY slots are dropped at once, FILLING slots are dropped by
 * their worker when it finishes, so no stale batch is ever handed out.
 */
#include "data/loader.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "util/common.h"

#define LOADER_ROUNDS 6

enum { SLOT_FREE, SLOT_FILLING, SLOT_READY, SLOT_HELD };

typedef struct {
    int32_t *inputs, *targets; /* [B,T] each, one host_alloc block */
    int pinned;
    int state;
    uint64_t batch; /* global batch number held or being filled */
} loader_slot;

struct tlm_loader {
    tlm_tokfile f; /* copy of the caller's handle; the mapping stays theirs */
    int B, T;
    uint64_t seed, windows, bpe;
    tlm_ops *ops;
    int workers, prefetch, pinned;
    loader_slot *slots;
    pthread_t *threads;
    int nthreads;

    pthread_mutex_t mu;
    pthread_cond_t cv_work;  /* a slot became FREE, or stop */
    pthread_cond_t cv_ready; /* a slot became READY */
    uint64_t next_fill, next_consume, gen;
    int stop;
};

/* ---- the keyed permutation ------------------------------------------- */

typedef struct {
    uint64_t n;     /* permute [0, n) */
    int half;       /* bits per Feistel half */
    uint64_t mask;  /* (1 << half) - 1 */
    uint64_t keys[LOADER_ROUNDS];
} loader_perm;

/* 64-bit finaliser (splitmix64's): a cheap, well-mixed round function. */
static uint64_t loader_mix(uint64_t z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ULL;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void loader_perm_init(loader_perm *p, uint64_t n, uint64_t seed, uint64_t epoch) {
    p->n = n;
    p->half = 1;
    while (p->half < 32 && (1ULL << (2 * p->half)) < n) p->half++;
    p->mask = (1ULL << p->half) - 1;
    /* Hash seed and epoch separately before combining so that nearby
     * (seed, epoch) pairs give unrelated keys. */
    tlm_rng r;
    tlm_rng_seed(&r, loader_mix(seed + 0x9e3779b97f4a7c15ULL) ^ loader_mix(~epoch * 0xd1b54a32d192ed03ULL));
    for (int i = 0; i < LOADER_ROUNDS; i++) p->keys[i] = tlm_rng_u64(&r);
}

static uint64_t loader_perm_apply(const loader_perm *p, uint64_t x) {
    do {
        uint64_t l = x >> p->half, r = x & p->mask;
        for (int i = 0; i < LOADER_ROUNDS; i++) {
            uint64_t nl = r;
            r = l ^ (loader_mix(r ^ p->keys[i]) & p->mask);
            l = nl;
        }
        x = (l << p->half) | r;
    } while (x >= p->n);
    return x;
}

/* ---- batch assembly ---------------------------------------------------- */

static uint64_t loader_count_windows(const tlm_tokfile *f, int T) {
    return f->count >= 1 ? (f->count - 1) / (uint64_t)T : 0;
}

void loader_fill(const tlm_tokfile *f, int B, int T, uint64_t seed, uint64_t epoch, uint64_t index, int shuffle,
                 int32_t *inputs, int32_t *targets) {
    uint64_t W = loader_count_windows(f, T);
    loader_perm p;
    if (shuffle) loader_perm_init(&p, W, seed, epoch);
    for (int b = 0; b < B; b++) {
        uint64_t w = index * (uint64_t)B + (uint64_t)b;
        if (shuffle) w = loader_perm_apply(&p, w);
        uint64_t start = w * (uint64_t)T;
        int32_t *in = inputs + (size_t)b * T, *tg = targets + (size_t)b * T;
        /* Window = T+1 tokens; targets are the inputs shifted by one. */
        if (f->token_bytes == 2) {
            const uint16_t *s = (const uint16_t *)f->tokens + start;
            for (int t = 0; t < T; t++) in[t] = s[t];
            for (int t = 0; t < T; t++) tg[t] = s[t + 1];
        } else {
            const uint32_t *s = (const uint32_t *)f->tokens + start;
            for (int t = 0; t < T; t++) in[t] = (int32_t)s[t];
            for (int t = 0; t < T; t++) tg[t] = (int32_t)s[t + 1];
        }
    }
}

/* ---- workers ------------------------------------------------------------ */

static void *loader_worker(void *arg) {
    tlm_loader *l = arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        while (!l->stop && l->slots[l->next_fill % (uint64_t)l->prefetch].state != SLOT_FREE)
            pthread_cond_wait(&l->cv_work, &l->mu);
        if (l->stop) break;
        uint64_t g = l->next_fill++, gen = l->gen;
        loader_slot *s = &l->slots[g % (uint64_t)l->prefetch];
        s->state = SLOT_FILLING;
        s->batch = g;
        pthread_mutex_unlock(&l->mu);

        loader_fill(&l->f, l->B, l->T, l->seed, g / l->bpe, g % l->bpe, 1, s->inputs, s->targets);

        pthread_mutex_lock(&l->mu);
        if (gen == l->gen) {
            s->state = SLOT_READY;
            pthread_cond_broadcast(&l->cv_ready);
        } else {
            s->state = SLOT_FREE; /* a seek happened meanwhile: drop it */
            pthread_cond_broadcast(&l->cv_work);
        }
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

static void loader_stop_workers(tlm_loader *l) {
    pthread_mutex_lock(&l->mu);
    l->stop = 1;
    pthread_cond_broadcast(&l->cv_work);
    pthread_cond_broadcast(&l->cv_ready);
    pthread_mutex_unlock(&l->mu);
    for (int i = 0; i < l->nthreads; i++) pthread_join(l->threads[i], NULL);
    l->nthreads = 0;
}

/* ---- public API ----------------------------------------------------------- */

void loader_destroy(tlm_loader *l) {
    if (!l) return;
    loader_stop_workers(l);
    for (int i = 0; l->slots && i < l->prefetch; i++) {
        if (!l->slots[i].inputs) continue;
        if (l->ops && l->ops->host_free) l->ops->host_free(l->ops, l->slots[i].inputs, l->slots[i].pinned);
        else tlm_free(l->slots[i].inputs);
    }
    free(l->slots);
    free(l->threads);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv_work);
    pthread_cond_destroy(&l->cv_ready);
    free(l);
}

tlm_loader *loader_create(const tlm_tokfile *f, int B, int T, uint64_t seed, int workers, int prefetch,
                          tlm_ops *ops) {
    if (!f || !f->tokens) {
        tlm_errorf("data loader needs an open token file: run `tinylm prepare` first");
        return NULL;
    }
    if (B < 1 || T < 1) {
        tlm_errorf("batch %d x context %d is invalid for %s: use a positive --batch and --context", B, T, f->path);
        return NULL;
    }
    if (workers < 0 || prefetch < 1) {
        tlm_errorf("data loader needs workers >= 0 and prefetch >= 1 (got %d and %d): fix --workers/--prefetch",
                   workers, prefetch);
        return NULL;
    }
    uint64_t W = loader_count_windows(f, T);
    if (W < (uint64_t)B) {
        tlm_errorf("token file %s has %llu tokens, only %llu windows of %d+1 tokens, fewer than one batch of %d: "
                   "use a smaller --batch/--context or more data",
                   f->path, (unsigned long long)f->count, (unsigned long long)W, T, B);
        return NULL;
    }
    tlm_loader *l = calloc(1, sizeof *l);
    if (!l) {
        tlm_errorf("out of memory creating the data loader");
        return NULL;
    }
    l->f = *f;
    l->B = B;
    l->T = T;
    l->seed = seed;
    l->windows = W;
    l->bpe = W / (uint64_t)B;
    l->ops = ops;
    l->workers = workers;
    l->prefetch = prefetch;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv_work, NULL);
    pthread_cond_init(&l->cv_ready, NULL);
    l->slots = calloc((size_t)prefetch, sizeof *l->slots);
    l->threads = calloc((size_t)(workers > 0 ? workers : 1), sizeof *l->threads);
    if (!l->slots || !l->threads) {
        tlm_errorf("out of memory creating the data loader");
        loader_destroy(l);
        return NULL;
    }
    size_t half = (size_t)B * (size_t)T, bytes = 2 * half * sizeof(int32_t);
    l->pinned = 1;
    for (int i = 0; i < prefetch; i++) {
        loader_slot *s = &l->slots[i];
        if (ops && ops->host_alloc) {
            s->inputs = ops->host_alloc(ops, bytes, &s->pinned);
        } else {
            s->inputs = tlm_alloc(bytes);
            s->pinned = 0;
        }
        if (!s->inputs) {
            char b[32];
            tlm_errorf("out of memory allocating the data loader ring (%d slots of %s): use a smaller --batch or "
                       "--prefetch",
                       prefetch, tlm_fmt_bytes((double)bytes, b, sizeof b));
            loader_destroy(l);
            return NULL;
        }
        s->targets = s->inputs + half;
        if (!s->pinned) l->pinned = 0;
    }
    for (int i = 0; i < workers; i++) {
        if (pthread_create(&l->threads[i], NULL, loader_worker, l) != 0) {
            tlm_errorf("cannot start data loader thread %d of %d: use fewer --workers", i + 1, workers);
            loader_destroy(l);
            return NULL;
        }
        l->nthreads++;
    }
    return l;
}

void loader_tell(const tlm_loader *l, uint64_t *epoch, uint64_t *index) {
    /* next_consume is only changed by the consumer's own calls, so reading
     * it here without the lock is race-free. */
    if (epoch) *epoch = l->next_consume / l->bpe;
    if (index) *index = l->next_consume % l->bpe;
}

int loader_seek(tlm_loader *l, uint64_t epoch, uint64_t index) {
    if (epoch > (UINT64_MAX - index) / l->bpe)
        return tlm_errorf("data position epoch %llu batch %llu is out of range: the checkpoint does not match %s",
                          (unsigned long long)epoch, (unsigned long long)index, l->f.path);
    uint64_t g = epoch * l->bpe + index; /* an index past the epoch end carries over */
    pthread_mutex_lock(&l->mu);
    l->gen++;
    l->next_fill = l->next_consume = g;
    for (int i = 0; i < l->prefetch; i++)
        if (l->slots[i].state == SLOT_READY) l->slots[i].state = SLOT_FREE;
    pthread_cond_broadcast(&l->cv_work);
    pthread_mutex_unlock(&l->mu);
    return 0;
}

int loader_next(tlm_loader *l, tlm_batch *out) {
    pthread_mutex_lock(&l->mu);
    uint64_t g = l->next_consume;
    int si = (int)(g % (uint64_t)l->prefetch);
    loader_slot *s = &l->slots[si];
    if (s->state == SLOT_HELD) {
        pthread_mutex_unlock(&l->mu);
        return tlm_errorf("data loader: all %d prefetch slots are still held; release batches with loader_release "
                          "before asking for more",
                          l->prefetch);
    }
    if (l->workers == 0) {
        /* Synchronous: nothing else touches the ring. */
        s->state = SLOT_HELD;
        s->batch = g;
        l->next_fill = g + 1;
        pthread_mutex_unlock(&l->mu);
        loader_fill(&l->f, l->B, l->T, l->seed, g / l->bpe, g % l->bpe, 1, s->inputs, s->targets);
        pthread_mutex_lock(&l->mu);
    } else {
        while (!(s->state == SLOT_READY && s->batch == g)) pthread_cond_wait(&l->cv_ready, &l->mu);
        s->state = SLOT_HELD;
    }
    l->next_consume = g + 1;
    pthread_mutex_unlock(&l->mu);
    out->inputs = s->inputs;
    out->targets = s->targets;
    out->epoch = g / l->bpe;
    out->index = g % l->bpe;
    out->slot = si;
    return 0;
}

void loader_release(tlm_loader *l, const tlm_batch *b) {
    if (!b || b->slot < 0 || b->slot >= l->prefetch) return;
    pthread_mutex_lock(&l->mu);
    loader_slot *s = &l->slots[b->slot];
    if (s->state == SLOT_HELD) {
        s->state = SLOT_FREE;
        pthread_cond_broadcast(&l->cv_work);
    }
    pthread_mutex_unlock(&l->mu);
}

uint64_t loader_windows(const tlm_loader *l) { return l->windows; }
uint64_t loader_batches_per_epoch(const tlm_loader *l) { return l->bpe; }
int loader_pinned(const tlm_loader *l) { return l->pinned; }
