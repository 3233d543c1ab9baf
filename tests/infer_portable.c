/*
 * The fast CPU backend's generation ops (cpu_infer.c) compiled once more
 * with no SIMD path (CI_PORTABLE_ONLY), installed by
 * cpu_infer_install_portable: test_infer_ops holds the portable kernels to
 * the SIMD kernels' numbers on this very machine, which otherwise runs
 * only the SIMD ones.
 */
#define CI_PORTABLE_ONLY 1
#define cpu_infer_install cpu_infer_install_portable
#include "backends/cpu/cpu_infer.c"
