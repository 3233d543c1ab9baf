/* Small shared helpers: errors, clocks, a serialisable RNG, aligned memory. */
#ifndef TLM_UTIL_COMMON_H
#define TLM_UTIL_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include "tinylm/tinylm.h"

#define TLM_ALIGN 64

/* Monotonic wall clock in seconds. */
double tlm_now(void);

/* Aligned allocation (64 bytes, for SIMD and cache lines); zero-filled.
 * Returns NULL and sets the error on failure. */
void *tlm_alloc(size_t bytes);
void tlm_free(void *p);

/* A small, fast, fully serialisable RNG (xoshiro256** seeded by splitmix64).
 * The whole state is four words, so trainer_state.json can store it and a
 * resumed run draws the same numbers. */
typedef struct { uint64_t s[4]; } tlm_rng;
void tlm_rng_seed(tlm_rng *r, uint64_t seed);
uint64_t tlm_rng_u64(tlm_rng *r);
/* Uniform in [0, 1) with 24 random bits. */
float tlm_rng_uniform(tlm_rng *r);
/* Standard normal (Box-Muller; uses two uniforms per call). */
float tlm_rng_normal(tlm_rng *r);
/* Uniform integer in [0, n). */
uint64_t tlm_rng_below(tlm_rng *r, uint64_t n);

/* 64-bit FNV-1a hash, used as the payload checksum of our file formats. */
uint64_t tlm_fnv1a64(const void *data, size_t n, uint64_t h);
#define TLM_FNV_INIT 0xcbf29ce484222325ULL

/* Human-friendly size ("12.3 MB") into buf. */
const char *tlm_fmt_bytes(double bytes, char *buf, size_t n);

#endif
