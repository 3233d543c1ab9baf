/*
 * The CPU backend's thread team (cpu_team.h).
 *
 * At one token every op is a few microseconds of work, and on a shared
 * machine an OpenMP fork/join per op is worse than slow: with a static split
 * the caller must wait for every thread, and a thread the scheduler has put
 * aside holds everyone for a time slice. Here an op is cut into chunks that
 * the caller and the helper threads CLAIM from one counter: a helper that is
 * not running claims nothing and is not waited for, so a busy machine
 * degrades to one-thread speed instead of stalling. Helpers spin briefly
 * between ops (the next op comes within microseconds) and then sleep.
 *
 * One case remains: a helper that is preempted while it holds a chunk makes
 * the caller wait for it. A helper that runs finishes its last chunk at
 * most one chunk after the caller ran out of chunks, and a chunk is no
 * longer than the caller's own share; so when the wait exceeds the caller's
 * own time by CPU_TEAM_STALL_S, the machine is taken to be busy and the ops run
 * alone for CPU_TEAM_SOLO_S before trying again. (A fixed 50 us limit alone
 * mistook long chunks for preemption: at 64 streams, attention and product
 * chunks are tens of microseconds, and 2 threads ran 25% slower.)
 *
 * Chunks write disjoint outputs and compute each output exactly as one
 * thread would, so results never depend on who ran what. */

#include "backends/cpu/cpu_team.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "util/common.h"

#define CPU_TEAM_MAX_HELPERS 63
#define CPU_TEAM_STALL_S 50e-6 /* a wait this much longer than a chunk means a helper was preempted */
#define CPU_TEAM_SOLO_S 0.02 /* ... then run alone this long (0.1 s cost 4% of training on an idle VM,
                                * whose vCPUs are now and then descheduled) */
#define CPU_TEAM_SPIN_LIMIT 100000 /* waiting rounds before a helper sleeps (~1 ms) */


typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nhelpers;                        /* started; only ever grows */
    atomic_int busy;                     /* a caller owns the team */
    atomic_uint gen;                     /* generation of the posted job */
    atomic_ullong claim;                 /* (gen << 32) | next chunk */
    atomic_int done;                     /* chunks finished */
    atomic_int sleeping;                 /* helpers blocked on cv */
    _Atomic(cpu_chunk_fn) fn;
    _Atomic(void *) arg;
    atomic_int nchunks, nhelp;           /* the job's chunks; helpers 0..nhelp-1 take part */
    double solo_until;                   /* tlm_now() before which ops run alone (owner only) */
} cpu_team;

static cpu_team cpu_the_team = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* One round of waiting. Every 32nd round gives the CPU away: when the
 * machine is busy, a helper may share its core with the caller (or the
 * caller with a helper that holds a chunk), and plain spinning would then
 * take the time the other one needs to make progress. */
static inline void cpu_team_pause(int round) {
    if ((round & 31) == 31) {
        sched_yield();
        return;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Claim and run chunks of job g until none is left. */
static void cpu_team_work(cpu_team *tm, unsigned g) {
    cpu_chunk_fn fn = atomic_load_explicit(&tm->fn, memory_order_relaxed);
    void *arg = atomic_load_explicit(&tm->arg, memory_order_relaxed);
    const unsigned long long n = (unsigned long long)atomic_load_explicit(&tm->nchunks, memory_order_relaxed);
    unsigned long long cur = atomic_load_explicit(&tm->claim, memory_order_acquire);
    for (;;) {
        /* a stale job (the caller finished it and moved on) is left alone;
         * the fields read above are only used after a successful claim of
         * job g, which cannot be over while its chunk is unfinished */
        if ((unsigned)(cur >> 32) != g || (cur & 0xffffffffu) >= n) return;
        if (atomic_compare_exchange_weak_explicit(&tm->claim, &cur, cur + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            fn(arg, (int)(cur & 0xffffffffu));
            atomic_fetch_add_explicit(&tm->done, 1, memory_order_release);
            cur = atomic_load_explicit(&tm->claim, memory_order_acquire);
        }
    }
}

/* The calling thread's worker index: 0 for callers, 1 + id for helpers. */
static _Thread_local int cpu_team_self;

int cpu_team_worker(void) { return cpu_team_self; }

static void *cpu_team_helper_main(void *p) {
    cpu_team *tm = &cpu_the_team;
    const int id = (int)(intptr_t)p;
    cpu_team_self = 1 + id;
    unsigned last = atomic_load(&tm->gen);
    for (;;) {
        int spins = 0;
        unsigned g;
        while ((g = atomic_load_explicit(&tm->gen, memory_order_acquire)) == last) {
            if (++spins < CPU_TEAM_SPIN_LIMIT) {
                cpu_team_pause(spins);
                continue;
            }
            /* idle: sleep until the next job (the caller signals when it sees
             * a sleeper; seq_cst on both sides rules out a lost wake-up) */
            pthread_mutex_lock(&tm->mu);
            atomic_fetch_add(&tm->sleeping, 1);
            while (atomic_load(&tm->gen) == last) pthread_cond_wait(&tm->cv, &tm->mu);
            atomic_fetch_sub(&tm->sleeping, 1);
            pthread_mutex_unlock(&tm->mu);
            spins = 0;
        }
        last = g;
        if (id < atomic_load_explicit(&tm->nhelp, memory_order_relaxed)) cpu_team_work(tm, g);
    }
    return NULL;
}

void cpu_team_run(int threads, int nchunks, cpu_chunk_fn fn, void *arg) {
    cpu_team *tm = &cpu_the_team;
    int expect = 0;
    if (threads <= 1 || nchunks <= 1 || !atomic_compare_exchange_strong(&tm->busy, &expect, 1)) {
        for (int c = 0; c < nchunks; c++) fn(arg, c);
        return;
    }
    if (tm->solo_until > 0 && tlm_now() < tm->solo_until) {
        atomic_store_explicit(&tm->busy, 0, memory_order_release);
        for (int c = 0; c < nchunks; c++) fn(arg, c);
        return;
    }
    int want = threads - 1 > CPU_TEAM_MAX_HELPERS ? CPU_TEAM_MAX_HELPERS : threads - 1;
    while (tm->nhelpers < want) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &at, cpu_team_helper_main, (void *)(intptr_t)tm->nhelpers);
        pthread_attr_destroy(&at);
        if (rc) break;
        tm->nhelpers++;
    }
    if (want > tm->nhelpers) want = tm->nhelpers;
    const unsigned g = atomic_load_explicit(&tm->gen, memory_order_relaxed) + 1;
    atomic_store_explicit(&tm->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&tm->arg, arg, memory_order_relaxed);
    atomic_store_explicit(&tm->nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&tm->nhelp, want, memory_order_relaxed);
    atomic_store_explicit(&tm->done, 0, memory_order_relaxed);
    atomic_store_explicit(&tm->claim, (unsigned long long)g << 32, memory_order_release);
    atomic_store(&tm->gen, g); /* seq_cst: publishes the job, pairs with the sleepers' check */
    if (atomic_load(&tm->sleeping) > 0) {
        pthread_mutex_lock(&tm->mu);
        pthread_cond_broadcast(&tm->cv);
        pthread_mutex_unlock(&tm->mu);
    }
    const double t_start = tlm_now();
    cpu_team_work(tm, g);
    if (atomic_load_explicit(&tm->done, memory_order_acquire) < nchunks) {
        /* a helper still holds a chunk */
        double t0 = tlm_now();
        for (int round = 0; atomic_load_explicit(&tm->done, memory_order_acquire) < nchunks; round++) cpu_team_pause(round);
        double t1 = tlm_now();
        if (t1 - t0 > (t0 - t_start) + CPU_TEAM_STALL_S) tm->solo_until = t1 + CPU_TEAM_SOLO_S;
    }
    atomic_store_explicit(&tm->busy, 0, memory_order_release);
}


/* Chunk c of a range job: [c*n/nchunks, (c+1)*n/nchunks). */
typedef struct {
    cpu_range_fn fn;
    void *arg;
    long n;
    int nchunks;
} cpu_range_job;

static void cpu_range_chunk(void *arg, int c) {
    const cpu_range_job *j = arg;
    long i0 = (long)((long long)j->n * c / j->nchunks), i1 = (long)((long long)j->n * (c + 1) / j->nchunks);
    if (i1 > i0) j->fn(j->arg, i0, i1);
}

void cpu_team_range(int threads, long n, long min_work, long work_per_item, cpu_range_fn fn, void *arg) {
    if (n <= 0) return;
    if (threads < 1 || n * work_per_item < min_work) threads = 1;
    long nch = threads < n ? threads : n;
    cpu_range_job j = {.fn = fn, .arg = arg, .n = n, .nchunks = (int)nch};
    cpu_team_run(threads, (int)nch, cpu_range_chunk, &j);
}
