/* Pieces shared by the two CPU backends (fast and reference). Internal to
 * src/backends/cpu. */
#ifndef TLM_BACKENDS_CPU_INTERNAL_H
#define TLM_BACKENDS_CPU_INTERNAL_H

#include "ops/ops.h"

/* Fill the memory entries of o (alloc, free, host_alloc, host_free, copies,
 * zero, sync) with host-memory versions: on the CPU "device" memory is
 * ordinary 64-byte aligned memory and every op is synchronous. */
void cpu_mem_install(tlm_ops *o);

/* loss_mean of both CPU backends (cpu_ref.c): the mean of losses[N] over
 * targets >= 0, summed in double in row order, as the host loop it
 * replaced did. */
void cpu_loss_mean(tlm_ops *o, float *out, const float *losses, const int32_t *targets, int N);

/* Number of logical CPUs this process may run on (affinity mask aware). */
int cpu_count_available(void);

#endif
