#include "util/common.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

static _Thread_local char g_err[1024];

const char *tlm_last_error(void) { return g_err; }

int tlm_errorf(const char *fmt, ...) {
    /* Format into a scratch buffer first: callers may pass tlm_last_error()
     * itself as an argument to prefix context onto an inner error. */
    char tmp[sizeof g_err];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    memcpy(g_err, tmp, sizeof g_err);
    return -1;
}

double tlm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Buffers this large are aligned to, and advised onto, 2 MB pages where
 * the kernel offers them (Linux transparent huge pages in "madvise" mode):
 * the KV cache of many streams, activations and weights are walked across
 * tens of MB, and with 4 KB pages nearly every row of a head's keys is a
 * TLB miss. */
#define TLM_HUGE_MIN ((size_t)4 << 20)
#define TLM_HUGE_PAGE ((size_t)2 << 20)

void *tlm_alloc(size_t bytes) {
    size_t rounded = (bytes + TLM_ALIGN - 1) / TLM_ALIGN * TLM_ALIGN;
    if (rounded == 0) rounded = TLM_ALIGN;
    void *p;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (rounded >= TLM_HUGE_MIN) {
        rounded = (rounded + TLM_HUGE_PAGE - 1) / TLM_HUGE_PAGE * TLM_HUGE_PAGE;
        p = aligned_alloc(TLM_HUGE_PAGE, rounded);
        if (p) madvise(p, rounded, MADV_HUGEPAGE); /* advice only: failure changes nothing */
    } else
#endif
        p = aligned_alloc(TLM_ALIGN, rounded);
    if (!p) {
        char b[32];
        tlm_errorf("out of memory allocating %s: use a smaller --batch or model", tlm_fmt_bytes((double)bytes, b, sizeof b));
        return NULL;
    }
    memset(p, 0, rounded);
    return p;
}

void tlm_free(void *p) { free(p); }

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void tlm_rng_seed(tlm_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t tlm_rng_u64(tlm_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float tlm_rng_uniform(tlm_rng *r) { return (float)(tlm_rng_u64(r) >> 40) * (1.0f / 16777216.0f); }

float tlm_rng_normal(tlm_rng *r) {
    /* u1 in (0,1] so the log is finite. */
    double u1 = ((double)(tlm_rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(tlm_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

uint64_t tlm_rng_below(tlm_rng *r, uint64_t n) {
    /* Rejection sampling: unbiased for every n. */
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do { x = tlm_rng_u64(r); } while (x >= limit);
    return x % n;
}

uint64_t tlm_fnv1a64(const void *data, size_t n, uint64_t h) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

const char *tlm_fmt_bytes(double bytes, char *buf, size_t n) {
    const char *units[] = {"B", "KB", "MB", "GB", "TB"};
    int u = 0;
    while (bytes >= 1000.0 && u < 4) { bytes /= 1000.0; u++; }
    snprintf(buf, n, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
    return buf;
}
