/* Loss curves as a self-contained SVG line chart. */
#include "io/plot.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/fileio.h"
#include "util/common.h"

/* Canvas and plot-area geometry in SVG user units. */
#define PW 800.0
#define PH 480.0
#define ML 78.0  /* room for y tick labels and the y label */
#define MR 24.0
#define MT 44.0  /* title */
#define MB 60.0  /* x tick labels and the x label */

typedef struct {
    char *s;
    size_t len, cap;
    int oom;
} plot_buf;

static void plot_printf(plot_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void plot_printf(plot_buf *b, const char *fmt, ...) {
    if (b->oom) return;
    if (!b->s) {
        b->cap = 8192;
        b->s = malloc(b->cap);
        if (!b->s) {
            b->oom = 1;
            return;
        }
    }
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->s + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = 1;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t ncap = (b->cap + (size_t)n + 1) * 2;
        char *ns = realloc(b->s, ncap);
        if (!ns) {
            b->oom = 1;
            return;
        }
        b->s = ns;
        b->cap = ncap;
    }
}

/* Text content and attribute values must not break the XML. */
static void plot_text(plot_buf *b, const char *s) {
    for (; s && *s; s++) {
        switch (*s) {
        case '&': plot_printf(b, "&amp;"); break;
        case '<': plot_printf(b, "&lt;"); break;
        case '>': plot_printf(b, "&gt;"); break;
        case '"': plot_printf(b, "&quot;"); break;
        default:
            if ((unsigned char)*s >= 0x20 || *s == '\t') plot_printf(b, "%c", *s);
        }
    }
}

/* A colour goes into an attribute unescaped, so accept only plain ones. */
static const char *plot_color(const char *c, int i) {
    static const char *palette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};
    if (c && *c && strlen(c) < 32) {
        int ok = 1;
        for (const char *p = c; *p; p++)
            if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '#'))
                ok = 0;
        if (ok) return c;
    }
    return palette[i % 6];
}

/* A 1-2-5 step giving about `target` intervals over [lo, hi]. */
static double plot_nice_step(double lo, double hi, int target) {
    double raw = (hi - lo) / target;
    double mag = pow(10.0, floor(log10(raw)));
    double r = raw / mag;
    double m = r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10;
    return m * mag;
}

typedef struct {
    double lo, hi, step;
} plot_axis;

/* Axis covering [mn, mx] that starts and ends on ticks. */
static plot_axis plot_make_axis(double mn, double mx, int have) {
    plot_axis a;
    if (!have) {
        mn = 0;
        mx = 1;
    } else if (mx - mn <= 1e-12 * fmax(fabs(mn), fabs(mx))) {
        /* One value (or a flat curve): give it some room around it. */
        double pad = mn != 0 ? fabs(mn) * 0.1 : 1.0;
        mn -= pad;
        mx += pad;
    }
    a.step = plot_nice_step(mn, mx, 5);
    a.lo = floor(mn / a.step) * a.step;
    a.hi = ceil(mx / a.step) * a.step;
    if (a.hi <= a.lo) a.hi = a.lo + a.step;
    return a;
}

/* Tick label: large numbers with k/M/G suffixes (tokens seen), the rest
 * with as many decimals as the step needs. */
static void plot_fmt_tick(char *out, size_t n, double v, const plot_axis *a) {
    double step = a->step;
    if (fabs(v) < step * 1e-9) { /* no "-0", "0.0M" or "1e-17" */
        snprintf(out, n, "0");
        return;
    }
    /* One suffix for the whole axis, chosen by its largest value. */
    static const char *suf[] = {"", "k", "M", "G", "T"};
    double amax = fmax(fabs(a->lo), fabs(a->hi));
    int k = 0;
    double scale = 1;
    if (amax >= 1e4)
        while (k < 4 && amax >= 1000 * scale) {
            k++;
            scale *= 1000;
        }
    double s = step / scale;
    int dec = s >= 1 ? 0 : (int)ceil(-log10(s) - 1e-9);
    if (dec > 8) dec = 8;
    snprintf(out, n, "%.*f%s", dec, v / scale, suf[k]);
}

int plot_write_svg(const char *path, const char *title, const char *xlabel, const char *ylabel,
                   const tlm_series *series, int nseries) {
    double xmn = INFINITY, xmx = -INFINITY, ymn = INFINITY, ymx = -INFINITY;
    int have = 0;
    for (int s = 0; s < nseries; s++) {
        for (size_t i = 0; i < series[s].n; i++) {
            double x = series[s].x[i], y = series[s].y[i];
            if (!isfinite(x) || !isfinite(y)) continue; /* a diverged loss must not wreck the axes */
            xmn = fmin(xmn, x), xmx = fmax(xmx, x);
            ymn = fmin(ymn, y), ymx = fmax(ymx, y);
            have = 1;
        }
    }
    plot_axis ax = plot_make_axis(xmn, xmx, have), ay = plot_make_axis(ymn, ymx, have);
    const double x0 = ML, x1 = PW - MR, y0 = PH - MB, y1 = MT; /* y grows downward in SVG */
#define SX(v) (x0 + ((v) - ax.lo) / (ax.hi - ax.lo) * (x1 - x0))
#define SY(v) (y0 - ((v) - ay.lo) / (ay.hi - ay.lo) * (y0 - y1))

    plot_buf b = {0};
    plot_printf(&b,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
                "font-family=\"sans-serif\" font-size=\"12\">\n",
                PW, PH, PW, PH);
    plot_printf(&b, "<rect x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", PW, PH);
    plot_printf(&b, "<text x=\"%.1f\" y=\"26\" text-anchor=\"middle\" font-size=\"16\">", (x0 + x1) / 2);
    plot_text(&b, title);
    plot_printf(&b, "</text>\n");

    /* Grid and ticks. */
    char lab[64];
    plot_printf(&b, "<g stroke=\"#e0e0e0\" stroke-width=\"1\">\n");
    int nxt = (int)llround((ax.hi - ax.lo) / ax.step), nyt = (int)llround((ay.hi - ay.lo) / ay.step);
    /* Rounding on huge values with a tiny spread could ask for thousands
     * of ticks; a readable chart never needs more than a few. */
    if (nxt > 20) nxt = 20;
    if (nyt > 20) nyt = 20;
    for (int i = 0; i <= nxt; i++) {
        double px = SX(ax.lo + i * ax.step);
        plot_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>\n", px, y0, px, y1);
    }
    for (int i = 0; i <= nyt; i++) {
        double py = SY(ay.lo + i * ay.step);
        plot_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>\n", x0, py, x1, py);
    }
    plot_printf(&b, "</g>\n<g fill=\"#333\">\n");
    for (int i = 0; i <= nxt; i++) {
        double v = ax.lo + i * ax.step;
        plot_fmt_tick(lab, sizeof lab, v, &ax);
        plot_printf(&b, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"middle\">%s</text>\n", SX(v), y0 + 18, lab);
    }
    for (int i = 0; i <= nyt; i++) {
        double v = ay.lo + i * ay.step;
        plot_fmt_tick(lab, sizeof lab, v, &ay);
        plot_printf(&b, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"end\">%s</text>\n", x0 - 6, SY(v) + 4, lab);
    }
    plot_printf(&b, "</g>\n");
    /* Axes frame and axis labels. */
    plot_printf(&b, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"none\" stroke=\"#333\"/>\n",
                x0, y1, x1 - x0, y0 - y1);
    plot_printf(&b, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"middle\">", (x0 + x1) / 2, PH - 14);
    plot_text(&b, xlabel);
    plot_printf(&b, "</text>\n<text x=\"0\" y=\"0\" text-anchor=\"middle\" transform=\"translate(18 %.2f) rotate(-90)\">",
                (y0 + y1) / 2);
    plot_text(&b, ylabel);
    plot_printf(&b, "</text>\n");

    /* One polyline per non-empty series; non-finite points are skipped.
     * A lone point would draw nothing as a line, so it also gets a dot. */
    for (int s = 0; s < nseries; s++) {
        const tlm_series *se = &series[s];
        if (se->n == 0) continue;
        const char *c = plot_color(se->color, s);
        plot_printf(&b, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.8\" stroke-linejoin=\"round\" points=\"",
                    c);
        size_t shown = 0, last = 0;
        for (size_t i = 0; i < se->n; i++) {
            if (!isfinite(se->x[i]) || !isfinite(se->y[i])) continue;
            plot_printf(&b, "%s%.2f,%.2f", shown ? " " : "", SX(se->x[i]), SY(se->y[i]));
            shown++;
            last = i;
        }
        plot_printf(&b, "\"/>\n");
        if (shown == 1)
            plot_printf(&b, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"3\" fill=\"%s\"/>\n", SX(se->x[last]),
                        SY(se->y[last]), c);
    }

    /* Legend, top right inside the plot. */
    int nleg = 0;
    size_t maxlab = 0;
    for (int s = 0; s < nseries; s++)
        if (series[s].label && *series[s].label) {
            nleg++;
            size_t l = strlen(series[s].label);
            if (l > maxlab) maxlab = l;
        }
    if (nleg > 0) {
        double lw = 40 + 7.0 * (double)(maxlab > 40 ? 40 : maxlab), lh = 8 + 18.0 * nleg;
        double lx = x1 - lw - 8, ly = y1 + 8;
        plot_printf(&b,
                    "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"white\" fill-opacity=\"0.85\" "
                    "stroke=\"#999\"/>\n",
                    lx, ly, lw, lh);
        int row = 0;
        for (int s = 0; s < nseries; s++) {
            if (!series[s].label || !*series[s].label) continue;
            double ry = ly + 4 + 18.0 * row + 9;
            plot_printf(&b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"%s\" stroke-width=\"2\"/>\n",
                        lx + 8, ry, lx + 30, ry, plot_color(series[s].color, s));
            plot_printf(&b, "<text x=\"%.2f\" y=\"%.2f\">", lx + 36, ry + 4);
            plot_text(&b, series[s].label);
            plot_printf(&b, "</text>\n");
            row++;
        }
    }
    plot_printf(&b, "</svg>\n");
#undef SX
#undef SY
    if (b.oom) {
        free(b.s);
        return tlm_errorf("out of memory drawing %s", path);
    }
    int rc = file_write_atomic(path, b.s, b.len);
    free(b.s);
    return rc;
}
