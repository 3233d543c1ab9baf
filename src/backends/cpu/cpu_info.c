/* CPU model, SIMD features, core count and BLAS version. */
#include "backends/cpu/cpu_info.h"

#include <stdio.h>
#include <string.h>

#include "backends/cpu/cpu_internal.h"

#if defined(TLM_BLAS_OPENBLAS)
#include <cblas.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif

static void cpu_info_model(char *buf, size_t n) {
    snprintf(buf, n, "unknown CPU");
#if defined(__APPLE__)
    size_t len = n;
    if (sysctlbyname("machdep.cpu.brand_string", buf, &len, NULL, 0) != 0) snprintf(buf, n, "unknown CPU");
#else
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        /* x86 says "model name", some ARM kernels "Model" or "Hardware". */
        if (strncmp(line, "model name", 10) && strncmp(line, "Model", 5) && strncmp(line, "Hardware", 8)) continue;
        char *colon = strchr(line, ':');
        if (!colon) continue;
        char *v = colon + 1;
        while (*v == ' ' || *v == '\t') v++;
        size_t len = strcspn(v, "\r\n");
        while (len && v[len - 1] == ' ') len--;
        if (!len) continue;
        if (len >= n) len = n - 1;
        memcpy(buf, v, len);
        buf[len] = 0;
        break;
    }
    fclose(f);
#endif
}

static void cpu_info_features(tlm_cpu_info *ci) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    ci->avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    ci->avx512f = __builtin_cpu_supports("avx512f") ? 1 : 0;
    /* AVX-512 BF16 is CPUID leaf 7 sub-leaf 1, EAX bit 5; it needs the OS to
     * save the AVX-512 state, which avx512f support above already implies. */
    unsigned a, b, c, d;
    if (ci->avx512f && __get_cpuid_max(0, NULL) >= 7 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
        ci->avx512bf16 = (a >> 5) & 1;
#endif
#if defined(__ARM_NEON) || defined(__aarch64__)
    ci->neon = 1;
#endif
}

static void cpu_info_blas(tlm_cpu_info *ci) {
#if defined(TLM_BLAS_OPENBLAS)
    const char *cfg = openblas_get_config();
    snprintf(ci->blas_config, sizeof ci->blas_config, "%s", cfg ? cfg : "OpenBLAS");
    /* The config string starts "OpenBLAS <version> ..."; keep those two words. */
    const char *p = ci->blas_config;
    const char *sp = strchr(p, ' ');
    if (sp) sp = strchr(sp + 1, ' ');
    size_t len = sp ? (size_t)(sp - p) : strlen(p);
    if (len >= sizeof ci->blas) len = sizeof ci->blas - 1;
    memcpy(ci->blas, p, len);
    ci->blas[len] = 0;
#elif defined(TLM_BLAS_ACCELERATE)
    snprintf(ci->blas, sizeof ci->blas, "Accelerate");
    snprintf(ci->blas_config, sizeof ci->blas_config, "Apple Accelerate (vecLib)");
#else
    snprintf(ci->blas, sizeof ci->blas, "CBLAS");
    snprintf(ci->blas_config, sizeof ci->blas_config, "unknown CBLAS");
#endif
}

void cpu_info_query(tlm_cpu_info *ci) {
    memset(ci, 0, sizeof *ci);
    cpu_info_model(ci->model, sizeof ci->model);
    cpu_info_features(ci);
    ci->cores = cpu_count_available();
    cpu_info_blas(ci);
}

const char *cpu_info_simd(const tlm_cpu_info *ci, char *buf, size_t n) {
    if (!n) return buf;
    buf[0] = 0;
    const char *names[] = {"AVX2", "AVX-512F", "AVX-512-BF16", "NEON"};
    int have[] = {ci->avx2, ci->avx512f, ci->avx512bf16, ci->neon};
    size_t used = 0;
    for (int i = 0; i < 4; i++) {
        if (!have[i]) continue;
        int w = snprintf(buf + used, n - used, "%s%s", used ? " " : "", names[i]);
        if (w < 0 || (size_t)w >= n - used) { /* no room: drop the partial name */
            buf[used] = 0;
            break;
        }
        used += (size_t)w;
    }
    if (!used) snprintf(buf, n, "none");
    return buf;
}
