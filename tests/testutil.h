/* Helpers shared by the tests (cmocka is the assertion library). */
#ifndef TLM_TESTS_TESTUTIL_H
#define TLM_TESTS_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

/* A fresh temporary folder (mkdtemp under $TMPDIR or /tmp); removed by
 * test_rmtree. Returns a static-lifetime malloc'd path. */
char *test_tmpdir(void);
void test_rmtree(const char *path);
/* Max over i of |a-b| / max(|b|, floor): relative error with a floor so
 * values near zero are compared absolutely. */
double test_max_rel_err(const float *a, const float *b, size_t n, double floor);
/* Read a whole file into memory (NULL if missing). */
void *test_read_file(const char *path, size_t *len);
/* Run a shell command, capture its combined output into out (may be NULL),
 * return its exit status. */
int test_run(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
