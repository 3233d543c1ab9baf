/* Loss curves as a standalone SVG (no dependencies, opens in any browser). */
#ifndef TLM_IO_PLOT_H
#define TLM_IO_PLOT_H

#include <stddef.h>

typedef struct {
    const char *label;   /* "train", "val" */
    const double *x;     /* tokens seen */
    const double *y;     /* loss */
    size_t n;
    const char *color;   /* e.g. "#1f77b4" */
} tlm_series;

/* Write an SVG line chart atomically. */
int plot_write_svg(const char *path, const char *title, const char *xlabel, const char *ylabel,
                   const tlm_series *series, int nseries);

#endif
