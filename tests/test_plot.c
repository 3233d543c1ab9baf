/* The SVG loss chart: well-formed enough for a browser, one polyline per
 * non-empty series, labels present and escaped, degenerate data handled. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/fileio.h"
#include "io/plot.h"
#include "util/common.h"

static int count(const char *s, const char *sub) {
    int n = 0;
    for (const char *p = strstr(s, sub); p; p = strstr(p + 1, sub)) n++;
    return n;
}

/* Every number in the points list of the k-th polyline, as x,y pairs. */
static int polyline_points(const char *svg, int k, double *xy, int cap) {
    const char *p = svg;
    for (int i = 0; i <= k; i++) {
        p = strstr(p, "<polyline");
        assert_non_null(p);
        p++;
    }
    p = strstr(p, "points=\"");
    assert_non_null(p);
    p += 8;
    int n = 0;
    while (*p != '"') {
        char *end;
        double x = strtod(p, &end);
        assert_true(end != p && *end == ',');
        double y = strtod(end + 1, &end);
        assert_true(n < cap);
        xy[2 * n] = x;
        xy[2 * n + 1] = y;
        n++;
        p = end;
        while (*p == ' ') p++;
    }
    return n;
}

/* Rough well-formedness: every opened element is closed. */
static void check_shape(const char *svg) {
    assert_memory_equal(svg, "<svg", 4);
    assert_non_null(strstr(svg, "</svg>"));
    assert_int_equal(count(svg, "<svg"), count(svg, "</svg>"));
    assert_int_equal(count(svg, "<text"), count(svg, "</text>"));
    assert_int_equal(count(svg, "<g"), count(svg, "</g>"));
    assert_int_equal(count(svg, "<"), count(svg, ">"));
    assert_null(strstr(svg, "nan"));
    assert_null(strstr(svg, "inf"));
}

static void test_chart(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char path[1024];
    path_join(path, sizeof path, dir, "loss.svg");
    enum { N = 100 };
    double tx[N], ty[N], vx[5], vy[5], one_x = 5e5, one_y = 2.5;
    for (int i = 0; i < N; i++) {
        tx[i] = (i + 1) * 10000.0;
        ty[i] = 8.0 * exp(-i / 30.0) + 2.0;
    }
    for (int i = 0; i < 5; i++) {
        vx[i] = (i + 1) * 200000.0;
        vy[i] = 4.0 - 0.3 * i;
    }
    ty[40] = NAN; /* a diverged step is skipped, not drawn */
    tlm_series s[4] = {
        {"train", tx, ty, N, "#1f77b4"},
        {"val", vx, vy, 5, "#ff7f0e"},
        {"empty", NULL, NULL, 0, "#2ca02c"},
        {"single", &one_x, &one_y, 1, NULL},
    };
    assert_int_equal(plot_write_svg(path, "tinylm <run> & co", "tokens seen", "loss (nats)", s, 4), 0);
    char *svg = test_read_file(path, NULL);
    assert_non_null(svg);
    check_shape(svg);
    assert_int_equal(count(svg, "<polyline"), 3);
    assert_non_null(strstr(svg, "tinylm &lt;run&gt; &amp; co"));
    assert_non_null(strstr(svg, "tokens seen"));
    assert_non_null(strstr(svg, "loss (nats)"));
    assert_non_null(strstr(svg, ">train<"));
    assert_non_null(strstr(svg, ">val<"));
    assert_non_null(strstr(svg, ">single<"));
    assert_non_null(strstr(svg, "#ff7f0e"));
    /* x runs to 1M tokens: nice ticks with a suffix. */
    assert_non_null(strstr(svg, ">1.0M<"));
    assert_non_null(strstr(svg, ">0.2M<"));
    assert_int_equal(count(svg, "<circle"), 1); /* the lone point */

    /* Points: the NaN one left out, all inside the canvas, x increasing,
     * falling loss drawn lower down (SVG y grows downward). */
    double xy[2 * N];
    int np = polyline_points(svg, 0, xy, N);
    assert_int_equal(np, N - 1);
    for (int i = 0; i < np; i++) {
        assert_true(xy[2 * i] >= 0 && xy[2 * i] <= 800);
        assert_true(xy[2 * i + 1] >= 0 && xy[2 * i + 1] <= 480);
        if (i) {
            assert_true(xy[2 * i] > xy[2 * i - 2]);
            assert_true(xy[2 * i + 1] >= xy[2 * i - 1] - 1e-9);
        }
    }
    assert_int_equal(polyline_points(svg, 1, xy, N), 5);
    free(svg);
    test_rmtree(dir);
    free(dir);
}

static void test_degenerate(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char path[1024];
    path_join(path, sizeof path, dir, "empty.svg");
    /* No series at all, and only empty series. */
    assert_int_equal(plot_write_svg(path, "t", "x", "y", NULL, 0), 0);
    char *svg = test_read_file(path, NULL);
    check_shape(svg);
    assert_int_equal(count(svg, "<polyline"), 0);
    free(svg);
    tlm_series e = {"train", NULL, NULL, 0, NULL};
    assert_int_equal(plot_write_svg(path, "t", "x", "y", &e, 1), 0);
    svg = test_read_file(path, NULL);
    check_shape(svg);
    assert_int_equal(count(svg, "<polyline"), 0);
    free(svg);
    /* One point; a flat line; all points non-finite. */
    double x1 = 0, y1 = 3.0, fx[3] = {1, 2, 3}, fy[3] = {2, 2, 2}, nx[2] = {1, 2}, ny[2] = {NAN, INFINITY};
    tlm_series s[3] = {{"a", &x1, &y1, 1, NULL}, {"b", fx, fy, 3, NULL}, {"c", nx, ny, 2, NULL}};
    for (int k = 1; k <= 3; k++) {
        assert_int_equal(plot_write_svg(path, NULL, NULL, NULL, s, k), 0);
        svg = test_read_file(path, NULL);
        check_shape(svg);
        assert_int_equal(count(svg, "<polyline"), k);
        free(svg);
    }
    /* Unwritable destination: error names it. */
    char bad[1100];
    snprintf(bad, sizeof bad, "%s/loss.svg", path); /* below a regular file */
    assert_int_equal(plot_write_svg(bad, "t", "x", "y", s, 2), -1);
    assert_non_null(strstr(tlm_last_error(), bad));
    test_rmtree(dir);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chart),
        cmocka_unit_test(test_degenerate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
