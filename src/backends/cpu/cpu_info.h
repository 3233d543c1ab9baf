/* What the CPU and the BLAS library are, for `tinylm info` and the CPU
 * backend's device description. */
#ifndef TLM_BACKENDS_CPU_INFO_H
#define TLM_BACKENDS_CPU_INFO_H

#include <stddef.h>

typedef struct {
    char model[96];       /* "AMD EPYC 7B13" (/proc/cpuinfo), "unknown CPU" if not found */
    int avx2;             /* SIMD features the CPU and OS support (x86: cpuid at run time) */
    int avx512f;
    int avx512bf16;
    int neon;             /* ARM: known at compile time */
    int cores;            /* logical CPUs this process may run on */
    char blas[64];        /* "OpenBLAS 0.3.21", "Accelerate" */
    char blas_config[160];/* the library's full build string (OpenBLAS: core, threading) */
} tlm_cpu_info;

/* Fill *ci. Never fails: unknown fields are left "unknown" / 0. */
void cpu_info_query(tlm_cpu_info *ci);

/* The SIMD features as one space-separated string ("AVX2 AVX-512F
 * AVX-512-BF16", or "none") in buf; returns buf. */
const char *cpu_info_simd(const tlm_cpu_info *ci, char *buf, size_t n);

#endif
