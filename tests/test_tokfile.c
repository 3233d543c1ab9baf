/* Token files: the exact header layout, 2- and 4-byte tokens, and every
 * way tokfile_open must refuse a bad file (with the path and the fix). */
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokfile.h"
#include "io/fileio.h"
#include "util/common.h"

static char *g_dir;

static int setup(void **state) {
    (void)state;
    g_dir = test_tmpdir();
    return g_dir ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    test_rmtree(g_dir);
    free(g_dir);
    return 0;
}

/* Reference FNV-1a 64, written out here so the test does not trust the
 * library's own. */
static uint64_t ref_fnv(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static uint64_t le(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void test_fnv_vectors(void **state) {
    (void)state;
    /* Published FNV-1a 64 test vectors. */
    assert_true(tlm_fnv1a64("", 0, TLM_FNV_INIT) == 0xcbf29ce484222325ULL);
    assert_true(tlm_fnv1a64("a", 1, TLM_FNV_INIT) == 0xaf63dc4c8601ec8cULL);
    assert_true(tlm_fnv1a64("foobar", 6, TLM_FNV_INIT) == 0x85944171f73967e8ULL);
    assert_true(ref_fnv((const unsigned char *)"foobar", 6) == 0x85944171f73967e8ULL);
}

static void test_round_trip_u16(void **state) {
    (void)state;
    char path[1024];
    path_join(path, sizeof path, g_dir, "train.bin");
    enum { N = 1000 };
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (i * 7919) % 65536; /* uses the full 16 bits */
    tok[0] = 65535;
    assert_int_equal(tokfile_write(path, tok, N, 65536, 17), 0);

    size_t len;
    unsigned char *raw = test_read_file(path, &len);
    assert_int_equal(len, 64 + 2 * N);
    assert_memory_equal(raw, "TLMTOKS\0", 8);
    assert_int_equal(le(raw + 8, 4), 1);
    assert_int_equal(le(raw + 12, 4), 65536);
    assert_int_equal(le(raw + 16, 4), 2);
    assert_int_equal(le(raw + 20, 4), 0);
    assert_int_equal(le(raw + 24, 8), N);
    assert_int_equal(le(raw + 32, 8), 17);
    assert_true(le(raw + 40, 8) == ref_fnv(raw + 64, 2 * N));
    for (int i = 48; i < 64; i++) assert_int_equal(raw[i], 0);
    for (int i = 0; i < N; i++) assert_int_equal(le(raw + 64 + 2 * i, 2), tok[i]);
    free(raw);

    tlm_tokfile f;
    assert_int_equal(tokfile_open(&f, path), 0);
    assert_int_equal(f.vocab, 65536);
    assert_int_equal(f.token_bytes, 2);
    assert_int_equal(f.count, N);
    assert_int_equal(f.ndocs, 17);
    assert_string_equal(f.path, path);
    for (int i = 0; i < N; i++) assert_int_equal(tokfile_get(&f, i), tok[i]);
    tokfile_close(&f);
    assert_null(f.map);
}

static void test_round_trip_u32(void **state) {
    (void)state;
    char path[1024];
    path_join(path, sizeof path, g_dir, "big.bin");
    enum { N = 333 };
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (i * 104729) % 70000;
    tok[5] = 69999;
    assert_int_equal(tokfile_write(path, tok, N, 70000, 1), 0);
    size_t len;
    unsigned char *raw = test_read_file(path, &len);
    assert_int_equal(len, 64 + 4 * N);
    assert_int_equal(le(raw + 16, 4), 4);
    assert_int_equal(le(raw + 64 + 4 * 5, 4), 69999);
    free(raw);
    tlm_tokfile f;
    assert_int_equal(tokfile_open(&f, path), 0);
    assert_int_equal(f.token_bytes, 4);
    for (int i = 0; i < N; i++) assert_int_equal(tokfile_get(&f, i), tok[i]);
    tokfile_close(&f);

    /* An empty token file is valid (the loader decides it is too small). */
    assert_int_equal(tokfile_write(path, NULL, 0, 100, 0), 0);
    assert_int_equal(tokfile_open(&f, path), 0);
    assert_int_equal(f.count, 0);
    tokfile_close(&f);
}

static void test_write_rejects(void **state) {
    (void)state;
    char path[1024];
    path_join(path, sizeof path, g_dir, "bad.bin");
    int32_t tok[3] = {1, 2, 300};
    assert_int_equal(tokfile_write(path, tok, 3, 300, 1), -1);
    assert_non_null(strstr(tlm_last_error(), path));
    assert_non_null(strstr(tlm_last_error(), "300"));
    tok[2] = -1;
    assert_int_equal(tokfile_write(path, tok, 3, 300, 1), -1);
    assert_int_equal(tokfile_write(path, tok, 2, 0, 1), -1);
    assert_false(path_exists(path));
    /* Unwritable destination (a path below a regular file). */
    char under[1100];
    path_join(path, sizeof path, g_dir, "plainfile");
    assert_int_equal(file_write_atomic(path, "x", 1), 0);
    snprintf(under, sizeof under, "%s/train.bin", path);
    assert_int_equal(tokfile_write(under, tok, 2, 300, 1), -1);
    assert_non_null(strstr(tlm_last_error(), under));
}

/* Write a good file, let `mutate` damage its bytes, expect open to fail
 * with the path, the fix and `what` in the message. */
static void expect_reject(const char *name, void (*mutate)(unsigned char *raw, size_t *len), const char *what) {
    char path[1024];
    path_join(path, sizeof path, g_dir, name);
    int32_t tok[50];
    for (int i = 0; i < 50; i++) tok[i] = i * 3;
    assert_int_equal(tokfile_write(path, tok, 50, 200, 2), 0);
    size_t len;
    unsigned char *raw = test_read_file(path, &len);
    mutate(raw, &len);
    assert_int_equal(file_write_atomic(path, raw, len), 0);
    free(raw);
    tlm_tokfile f;
    if (tokfile_open(&f, path) == 0) fail_msg("%s: expected rejection", name);
    const char *err = tlm_last_error();
    if (!strstr(err, path)) fail_msg("%s: error lacks the path: %s", name, err);
    if (!strstr(err, "tinylm prepare")) fail_msg("%s: error lacks the fix: %s", name, err);
    if (!strstr(err, what)) fail_msg("%s: error lacks \"%s\": %s", name, what, err);
    assert_null(f.map);
}

static void m_short(unsigned char *raw, size_t *len) { (void)raw; *len = 40; }
static void m_magic(unsigned char *raw, size_t *len) { (void)len; raw[3] = 'X'; }
static void m_version(unsigned char *raw, size_t *len) { (void)len; raw[8] = 2; }
static void m_truncated(unsigned char *raw, size_t *len) { (void)raw; *len -= 2; }
static void m_extra(unsigned char *raw, size_t *len) { raw[*len] = 0; *len += 1; } /* raw has a spare NUL */
static void m_corrupt(unsigned char *raw, size_t *len) { (void)len; raw[64 + 31] ^= 0x10; }
static void m_vocab0(unsigned char *raw, size_t *len) { (void)len; raw[12] = raw[13] = raw[14] = raw[15] = 0; }
static void m_width(unsigned char *raw, size_t *len) { (void)len; raw[16] = 3; }
static void m_count(unsigned char *raw, size_t *len) { (void)len; raw[31] = 0x80; } /* huge count */

static void test_open_rejects(void **state) {
    (void)state;
    char path[1024];
    path_join(path, sizeof path, g_dir, "nothere.bin");
    tlm_tokfile f;
    assert_int_equal(tokfile_open(&f, path), -1);
    assert_non_null(strstr(tlm_last_error(), path));
    assert_non_null(strstr(tlm_last_error(), "tinylm prepare"));
    assert_non_null(strstr(tlm_last_error(), "not found"));

    expect_reject("short.bin", m_short, "header");
    expect_reject("magic.bin", m_magic, "magic");
    expect_reject("version.bin", m_version, "version 2");
    expect_reject("trunc.bin", m_truncated, "truncated");
    expect_reject("extra.bin", m_extra, "payload");
    expect_reject("corrupt.bin", m_corrupt, "checksum");
    expect_reject("vocab0.bin", m_vocab0, "vocab");
    expect_reject("width.bin", m_width, "bytes per token");
    expect_reject("count.bin", m_count, "truncated");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fnv_vectors),   cmocka_unit_test(test_round_trip_u16),
        cmocka_unit_test(test_round_trip_u32), cmocka_unit_test(test_write_rejects),
        cmocka_unit_test(test_open_rejects),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
