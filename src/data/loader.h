/*
 * The data loader: shuffled batches of training windows, assembled ahead
 * of time by worker threads into a ring of host buffers.
 *
 * A window is context+1 consecutive tokens; window w starts at token w*T
 * (T = context), so inputs of different windows never overlap and there are
 * (count-1)/T windows. Epoch e visits the windows in a permutation seeded by
 * (seed, e); batch k of an epoch is windows perm[k*B .. k*B+B) (the partial
 * batch at the end is dropped). A batch is therefore a pure function of
 * (seed, epoch, k): the worker count never changes the data, and the
 * position (epoch, k) is all a checkpoint needs to resume.
 *
 * Buffers come from ops->host_alloc, so they are page-locked exactly where
 * the device can use that.
 */
#ifndef TLM_DATA_LOADER_H
#define TLM_DATA_LOADER_H

#include <stdint.h>

#include "data/tokfile.h"
#include "ops/ops.h"

typedef struct tlm_loader tlm_loader;

typedef struct {
    int32_t *inputs;   /* host [B,T] */
    int32_t *targets;  /* host [B,T] */
    uint64_t epoch, index; /* which batch this is */
    int slot;          /* ring slot, for loader_release */
} tlm_batch;

/* workers = 0 assembles on the caller's thread; prefetch = ring slots (>=1).
 * f must stay open while the loader lives. ops may be NULL (ordinary
 * aligned memory, e.g. for evaluation tools). */
tlm_loader *loader_create(const tlm_tokfile *f, int B, int T, uint64_t seed, int workers, int prefetch,
                          tlm_ops *ops);
void loader_destroy(tlm_loader *l);

/* Position of the NEXT batch loader_next will return. */
void loader_tell(const tlm_loader *l, uint64_t *epoch, uint64_t *index);
/* Restart from (epoch, index), dropping anything prefetched. */
int loader_seek(tlm_loader *l, uint64_t epoch, uint64_t index);
/* Blocks until the next batch is ready. The batch stays valid until
 * loader_release(l, batch). */
int loader_next(tlm_loader *l, tlm_batch *out);
void loader_release(tlm_loader *l, const tlm_batch *b);

uint64_t loader_windows(const tlm_loader *l);
uint64_t loader_batches_per_epoch(const tlm_loader *l);
int loader_pinned(const tlm_loader *l);   /* ring is page-locked memory */

/* Fill one batch deterministically (what workers do); exposed for tests and
 * for evaluation, which reads windows in order with no shuffle when
 * shuffle == 0. inputs/targets are [B,T]. */
void loader_fill(const tlm_tokfile *f, int B, int T, uint64_t seed, uint64_t epoch, uint64_t index,
                 int shuffle, int32_t *inputs, int32_t *targets);

#endif
