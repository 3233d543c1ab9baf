/*
 * The CPU backend's thread team: one set of helper threads for every
 * parallel op of the fast CPU backend (training and generation).
 *
 * Work is cut into chunks that the caller and the helpers CLAIM from one
 * counter, so a helper the scheduler has put aside claims nothing and is
 * not waited for: on a busy machine ops degrade to one-thread speed
 * instead of stalling at a barrier for a time slice (as OpenMP's static
 * splits and barriers do). Chunks must write disjoint outputs and compute
 * each output exactly as one thread would, so results never depend on the
 * thread count or on who ran what.
 */
#ifndef TLM_BACKENDS_CPU_TEAM_H
#define TLM_BACKENDS_CPU_TEAM_H

typedef void (*cpu_chunk_fn)(void *arg, int chunk);

/* Run fn(arg, c) for c in [0, nchunks) on up to `threads` threads (the
 * caller included) and return when all are done. Runs inline when asked
 * for one thread, when the team is in use by another caller (a nested
 * call), or when helpers cannot be started. */
void cpu_team_run(int threads, int nchunks, cpu_chunk_fn fn, void *arg);

/* Index of the calling thread among the workers of the current run: 0
 * for the caller, 1 .. threads-1 for helpers. Per-worker scratch indexed
 * by it needs `threads` slots. */
int cpu_team_worker(void);

/* fn(arg, i0, i1) over contiguous parts of [0, n): on one thread when
 * n * work_per_item < min_work (too small to share), else in one part per
 * thread. The claims already let a running thread take a stalled one's
 * part; four parts per thread measured 2% slower in training on an idle
 * machine. */
typedef void (*cpu_range_fn)(void *arg, long i0, long i1);
void cpu_team_range(int threads, long n, long min_work, long work_per_item, cpu_range_fn fn, void *arg);

#endif
