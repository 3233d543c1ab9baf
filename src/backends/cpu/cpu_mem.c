/* Host-memory implementations of the memory part of the op table, shared by
 * the fast and the reference CPU backends. */
#include "backends/cpu/cpu_internal.h"

#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "util/common.h"

static void *cpu_mem_alloc(tlm_ops *o, size_t bytes) {
    (void)o;
    return tlm_alloc(bytes); /* zero-filled, 64-byte aligned */
}

static void cpu_mem_free(tlm_ops *o, void *p) {
    (void)o;
    tlm_free(p);
}

/* The CPU reads staging buffers directly, so page-locking buys nothing. */
static void *cpu_mem_host_alloc(tlm_ops *o, size_t bytes, int *pinned) {
    (void)o;
    if (pinned) *pinned = 0;
    return tlm_alloc(bytes);
}

static void cpu_mem_host_free(tlm_ops *o, void *p, int pinned) {
    (void)o;
    (void)pinned;
    tlm_free(p);
}

static void cpu_mem_copy(tlm_ops *o, void *dst, const void *src, size_t bytes) {
    (void)o;
    if (bytes) memmove(dst, src, bytes);
}

static void cpu_mem_zero(tlm_ops *o, void *p, size_t bytes) {
    (void)o;
    if (bytes) memset(p, 0, bytes);
}

static void cpu_mem_sync(tlm_ops *o) { (void)o; }

void cpu_mem_install(tlm_ops *o) {
    o->alloc = cpu_mem_alloc;
    o->free = cpu_mem_free;
    o->host_alloc = cpu_mem_host_alloc;
    o->host_free = cpu_mem_host_free;
    o->copy_h2d = cpu_mem_copy;
    o->copy_d2h = cpu_mem_copy;
    o->copy_d2d = cpu_mem_copy;
    o->zero = cpu_mem_zero;
    o->sync = cpu_mem_sync;
}

int cpu_count_available(void) {
#ifdef __linux__
    /* Containers and taskset restrict the CPUs we may use; count those. */
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
