/* A vectorisable float exp shared by the CPU backend and the sampler. */
#ifndef TLM_UTIL_FASTEXP_H
#define TLM_UTIL_FASTEXP_H

#include <stdint.h>
#include <string.h>

/* exp(x) for float, written so that loops calling it vectorise (glibc's
 * expf only does without -ffast-math). x = n ln2 + r with |r| <= ln2/2, then
 * e^r by its Taylor series to r^7 (truncation < 1e-8 relative) and 2^n by
 * building the float exponent directly. Input is clamped to [-87, 88] so
 * 2^n stays a normal float; e^-87 ~ 1.6e-38 stands in for anything smaller,
 * which is harmless for softmax and sigmoid, and never drawn by the
 * sampler's 24-bit uniforms. One definition for the CPU kernels and the
 * sampler: the CUDA sampler (cu_sample.cu) reproduces it step for step. */
static inline float tlm_expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* round to nearest by adding and removing 1.5 * 2^23 (no floorf, which
     * some compilers will not vectorise under a mask) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    /* ln2 split in a high part exact in float times small n, and the rest */
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* NaN slips past the clamps (every comparison with it is false) and
     * converting it to int is undefined; use 0 there: r is NaN already, so
     * the result stays NaN and a diverging run is still detected. */
    n = (n == n) ? n : 0.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#endif
