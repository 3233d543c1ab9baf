/* safetensors: round trip, a file assembled byte by byte here (F32, BF16,
 * F16, unaligned header), and rejection of truncated or corrupt files with
 * errors that name the file. */
#include "testutil.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/fileio.h"
#include "io/safetensors.h"
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

/* Bytes of a safetensors file: u64 LE header length, header, data. */
static void put_file(const char *path, const char *header, const unsigned char *data, size_t dlen) {
    size_t hlen = strlen(header);
    size_t total = 8 + hlen + dlen;
    unsigned char *buf = malloc(total);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header, hlen);
    if (dlen) memcpy(buf + 8 + hlen, data, dlen);
    assert_int_equal(file_write_atomic(path, buf, total), 0);
    free(buf);
}

static void put_f32le(unsigned char *p, float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(b >> (8 * i));
}

static void test_round_trip(void **state) {
    (void)state;
    char path[1024];
    path_join(path, sizeof path, g_dir, "rt.safetensors");
    float a[6], b[4], c[2 * 3 * 1 * 2], s = 42.5f;
    for (int i = 0; i < 6; i++) a[i] = (float)i * 0.25f - 1.0f;
    for (int i = 0; i < 4; i++) b[i] = 1e-30f * (float)(i + 1);
    for (int i = 0; i < 12; i++) c[i] = (float)(i * i) - 3.5f;
    tlm_st_tensor t[4] = {
        {"model.embed_tokens.weight", a, 2, {2, 3, 0, 0}},
        {"model.norm.weight", b, 1, {4, 0, 0, 0}},
        {"four.d", c, 4, {2, 3, 1, 2}},
        {"scalar", &s, 0, {0, 0, 0, 0}},
    };
    const char *keys[] = {"format", "tinylm"}, *vals[] = {"pt", "0.1.0 \"quoted\""};
    assert_int_equal(safetensors_write(path, t, 4, keys, vals, 2), 0);

    /* Inspect the bytes independently of the reader. */
    size_t len;
    unsigned char *raw = test_read_file(path, &len);
    assert_non_null(raw);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | raw[i];
    assert_int_equal((8 + hlen) % 8, 0);
    assert_int_equal(len, 8 + hlen + 4 * (6 + 4 + 12 + 1));
    assert_int_equal(raw[8], '{');
    cJSON *h = cJSON_ParseWithLength((const char *)raw + 8, hlen);
    assert_non_null(h);
    cJSON *e = cJSON_GetObjectItem(h, "model.norm.weight");
    assert_string_equal(cJSON_GetObjectItem(e, "dtype")->valuestring, "F32");
    cJSON *off = cJSON_GetObjectItem(e, "data_offsets");
    int b0 = cJSON_GetArrayItem(off, 0)->valueint, b1 = cJSON_GetArrayItem(off, 1)->valueint;
    assert_int_equal(b0, 24); /* written in order: a (24 bytes) then b */
    assert_int_equal(b1, 40);
    for (int i = 0; i < 4; i++) {
        unsigned char want[4];
        put_f32le(want, b[i]);
        assert_memory_equal(raw + 8 + hlen + b0 + 4 * i, want, 4);
    }
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(h, "__metadata__"), "format")->valuestring, "pt");
    cJSON_Delete(h);
    free(raw);

    tlm_st_file *f = safetensors_open(path);
    assert_non_null(f);
    int64_t shape[4];
    assert_int_equal(safetensors_shape(f, "model.embed_tokens.weight", shape), 2);
    assert_int_equal(shape[0], 2);
    assert_int_equal(shape[1], 3);
    assert_int_equal(safetensors_shape(f, "four.d", shape), 4);
    assert_int_equal(shape[3], 2);
    assert_int_equal(safetensors_shape(f, "scalar", shape), 0);
    float oa[6], ob[4], oc[12], os;
    assert_int_equal(safetensors_read_f32(f, "model.embed_tokens.weight", oa, 6), 0);
    assert_int_equal(safetensors_read_f32(f, "model.norm.weight", ob, 4), 0);
    assert_int_equal(safetensors_read_f32(f, "four.d", oc, 12), 0);
    assert_int_equal(safetensors_read_f32(f, "scalar", &os, 1), 0);
    assert_memory_equal(oa, a, sizeof a);
    assert_memory_equal(ob, b, sizeof b);
    assert_memory_equal(oc, c, sizeof c);
    assert_true(os == s);
    assert_string_equal(safetensors_meta(f, "format"), "pt");
    assert_string_equal(safetensors_meta(f, "tinylm"), "0.1.0 \"quoted\"");
    assert_null(safetensors_meta(f, "absent"));

    /* Errors name the tensor and the file. */
    assert_int_equal(safetensors_read_f32(f, "model.norm.weight", ob, 5), -1);
    assert_non_null(strstr(tlm_last_error(), "model.norm.weight"));
    assert_non_null(strstr(tlm_last_error(), path));
    assert_int_equal(safetensors_read_f32(f, "nope", ob, 4), -1);
    assert_non_null(strstr(tlm_last_error(), "nope"));
    assert_non_null(strstr(tlm_last_error(), path));
    assert_int_equal(safetensors_shape(f, "nope", shape), -1);
    safetensors_close(f);

    /* No tensors at all is a valid file too. */
    assert_int_equal(safetensors_write(path, NULL, 0, NULL, NULL, 0), 0);
    f = safetensors_open(path);
    assert_non_null(f);
    assert_null(safetensors_meta(f, "format"));
    safetensors_close(f);

    /* Duplicate names are refused before anything is written. */
    tlm_st_tensor dup[2] = {{"x", a, 1, {6, 0, 0, 0}}, {"x", b, 1, {4, 0, 0, 0}}};
    assert_int_equal(safetensors_write(path, dup, 2, NULL, NULL, 0), -1);
    assert_non_null(strstr(tlm_last_error(), path));
}

/* A file written by hand: header not padded (data unaligned), tensors out
 * of order in the data section, BF16 and F16 alongside F32, an I32 tensor
 * tinylm must refuse to convert. */
static void test_hand_written(void **state) {
    (void)state;
    char path[1024];
    path_join(path, sizeof path, g_dir, "hand.safetensors");
    const char *header =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[8,24]},"
        "\"h\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]},"
        "\"g\":{\"dtype\":\"F16\",\"shape\":[5],\"data_offsets\":[24,34]},"
        "\"i\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[34,38]}}";
    unsigned char d[38];
    /* BF16: 1.0, -2.0, 0.5, 3.140625 (top halves of the float32 bits). */
    const uint16_t bf[4] = {0x3F80, 0xC000, 0x3F00, 0x4049};
    for (int i = 0; i < 4; i++) {
        d[2 * i] = (unsigned char)(bf[i] & 0xff);
        d[2 * i + 1] = (unsigned char)(bf[i] >> 8);
    }
    /* F32 2x2: 1.5, -0.25, 1e-3 (0x3A83126F), 1024. */
    const uint32_t w[4] = {0x3FC00000u, 0xBE800000u, 0x3A83126Fu, 0x44800000u};
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 4; k++) d[8 + 4 * i + k] = (unsigned char)(w[i] >> (8 * k));
    /* F16: 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), 1/3 rounded. */
    const uint16_t hf[5] = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x3555};
    for (int i = 0; i < 5; i++) {
        d[24 + 2 * i] = (unsigned char)(hf[i] & 0xff);
        d[24 + 2 * i + 1] = (unsigned char)(hf[i] >> 8);
    }
    d[34] = 7, d[35] = 0, d[36] = 0, d[37] = 0;
    put_file(path, header, d, sizeof d);

    tlm_st_file *f = safetensors_open(path);
    assert_non_null(f);
    float o[5];
    assert_int_equal(safetensors_read_f32(f, "h", o, 4), 0);
    assert_true(o[0] == 1.0f && o[1] == -2.0f && o[2] == 0.5f && o[3] == 3.140625f);
    assert_int_equal(safetensors_read_f32(f, "w", o, 4), 0);
    assert_true(o[0] == 1.5f && o[1] == -0.25f && o[3] == 1024.0f);
    assert_true(fabsf(o[2] - 1e-3f) < 1e-10f);
    assert_int_equal(safetensors_read_f32(f, "g", o, 5), 0);
    assert_true(o[0] == 1.0f && o[1] == -2.0f && o[2] == 65504.0f);
    assert_true(o[3] == ldexpf(1.0f, -24));
    assert_true(o[4] == 0.333251953125f);
    int64_t shape[4];
    assert_int_equal(safetensors_shape(f, "w", shape), 2);
    assert_int_equal(shape[0], 2);
    assert_int_equal(shape[1], 2);
    assert_string_equal(safetensors_meta(f, "format"), "pt");
    assert_int_equal(safetensors_read_f32(f, "i", o, 1), -1);
    assert_non_null(strstr(tlm_last_error(), "I32"));
    assert_non_null(strstr(tlm_last_error(), path));
    safetensors_close(f);
}

/* Write a file with the given header and data, expect open to fail with an
 * error naming the file and containing `what`. */
static void expect_reject(const char *name, const char *header, size_t dlen, const char *what) {
    char path[1024];
    path_join(path, sizeof path, g_dir, name);
    unsigned char *d = calloc(1, dlen + 1);
    put_file(path, header, d, dlen);
    free(d);
    tlm_st_file *f = safetensors_open(path);
    if (f) fail_msg("%s: expected rejection", name);
    const char *err = tlm_last_error();
    if (!strstr(err, path)) fail_msg("%s: error does not name the file: %s", name, err);
    if (what && !strstr(err, what)) fail_msg("%s: error lacks \"%s\": %s", name, what, err);
}

static void test_rejects_corrupt(void **state) {
    (void)state;
    char path[1024];

    /* Missing file. */
    path_join(path, sizeof path, g_dir, "missing.safetensors");
    assert_null(safetensors_open(path));
    assert_non_null(strstr(tlm_last_error(), path));

    /* Shorter than the 8-byte length prefix. */
    path_join(path, sizeof path, g_dir, "short.safetensors");
    assert_int_equal(file_write_atomic(path, "\x10\0\0", 3), 0);
    assert_null(safetensors_open(path));
    assert_non_null(strstr(tlm_last_error(), path));
    assert_non_null(strstr(tlm_last_error(), "truncated"));

    /* Header length beyond the file. */
    path_join(path, sizeof path, g_dir, "hlen.safetensors");
    unsigned char big[12] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' '};
    assert_int_equal(file_write_atomic(path, big, sizeof big), 0);
    assert_null(safetensors_open(path));
    assert_non_null(strstr(tlm_last_error(), path));
    assert_non_null(strstr(tlm_last_error(), "header length"));

    /* A valid file cut short: the last tensor's offsets pass the end. */
    float v[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    tlm_st_tensor t[2] = {{"a", v, 1, {4, 0, 0, 0}}, {"b", v + 4, 1, {4, 0, 0, 0}}};
    path_join(path, sizeof path, g_dir, "trunc.safetensors");
    assert_int_equal(safetensors_write(path, t, 2, NULL, NULL, 0), 0);
    size_t len;
    unsigned char *raw = test_read_file(path, &len);
    assert_int_equal(file_write_atomic(path, raw, len - 4), 0);
    assert_null(safetensors_open(path));
    assert_non_null(strstr(tlm_last_error(), path));
    assert_non_null(strstr(tlm_last_error(), "truncated"));
    /* Same file with a corrupted header byte: bad JSON. */
    raw[8] = 'x';
    assert_int_equal(file_write_atomic(path, raw, len), 0);
    assert_null(safetensors_open(path));
    assert_non_null(strstr(tlm_last_error(), path));
    assert_non_null(strstr(tlm_last_error(), "JSON"));
    free(raw);

    expect_reject("notobj.safetensors", "[1,2]", 0, "object");
    expect_reject("junk.safetensors", "{} x", 0, "junk");
    expect_reject("overlap.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                  16, "overlap");
    expect_reject("size.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 16,
                  "need 12");
    expect_reject("bf16size.safetensors", "{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
                  16, "need 8");
    expect_reject("beyond.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 16,
                  "truncated");
    expect_reject("dtype.safetensors", "{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
                  "unknown dtype");
    expect_reject("negshape.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8,
                  "shape");
    expect_reject("reversed.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", 8,
                  "data_offsets");
    expect_reject("noshape.safetensors", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, "shape");
    expect_reject("meta.safetensors", "{\"__metadata__\":{\"k\":3}}", 0, "__metadata__");
    expect_reject("dims.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,2],\"data_offsets\":[0,8]}}", 8, "dimensions");
    expect_reject("twice.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                  8, "twice");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_hand_written),
        cmocka_unit_test(test_rejects_corrupt),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
