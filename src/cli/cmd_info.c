/* tinylm info: what this machine offers tinylm (CPU, SIMD, BLAS, devices,
 * pinned host memory). */
#include <stdio.h>

#include "backends/cpu/cpu_info.h"
#include "cli/cli.h"
#include "ops/ops.h"
#include "tinylm/tinylm.h"

static void info_usage(FILE *f) {
    fprintf(f, "usage: tinylm info\n\nShow the CPU and its SIMD features, threads, the BLAS library, the compute\n"
               "devices found, and whether pinned (page-locked) host memory is in use.\n");
}

int cmd_info(int argc, char **argv) {
    int pr = cli_parse_flags("info", argc, argv, NULL, 0, info_usage);
    if (pr != CLI_PARSE_OK) return pr == CLI_PARSE_HELP ? 0 : CLI_EXIT_USAGE;
    tlm_cpu_info ci;
    cpu_info_query(&ci);
    char simd[128];
    printf("tinylm %s\n", TLM_VERSION_STRING);
    printf("cpu:      %s\n", ci.model);
    printf("features: %s\n", cpu_info_simd(&ci, simd, sizeof simd));
    printf("threads:  %d (default for --threads)\n", ci.cores);
    printf("blas:     %s%s%s%s\n", ci.blas, ci.blas_config[0] ? " (" : "", ci.blas_config, ci.blas_config[0] ? ")" : "");

    /* The device that --device auto would pick, and whether its host
     * allocator gives page-locked memory: that is what the loader uses. */
    char note[256] = "";
    tlm_ops *o = ops_create("auto", 0, note, sizeof note);
    if (!o) {
        printf("devices:  none usable (%s)\n", tlm_last_error());
        return 1;
    }
    printf("devices:  %s\n", o->device_desc);
    if (note[0]) printf("          %s\n", note);
    int pinned = 0;
    void *p = o->host_alloc(o, 1 << 20, &pinned);
    if (p) o->host_free(o, p, pinned);
    printf("pinned:   %s\n", pinned ? "yes (page-locked loader buffers, asynchronous host-to-device copies)"
                                    : "no (not needed: the CPU reads loader buffers directly)");
    ops_destroy(o);
    return 0;
}
