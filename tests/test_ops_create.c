/*
 * Device selection (ops_create) and the CPU description helpers: accepted
 * and rejected --device values, their messages, and the cpu_info fields.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "backends/cpu/cpu_info.h"
#include "ops/ops.h"
#include "util/common.h"

static void test_cpu_specs(void **state) {
    (void)state;
    char note[256];
    tlm_ops *o = ops_create("cpu", 2, note, sizeof note);
    assert_non_null(o);
    assert_string_equal(o->name, "cpu");
    assert_int_equal(o->threads, 2);
    assert_true(strncmp(o->device_desc, "CPU: ", 5) == 0);
    assert_non_null(strstr(o->device_desc, "2 threads"));
    assert_true(note[0] != 0);
    ops_destroy(o);

    o = ops_create("cpu", 0, NULL, 0); /* all cores; note may be NULL */
    assert_non_null(o);
    assert_true(o->threads >= 1);
    ops_destroy(o);

    o = ops_create("cpu-ref", 8, note, sizeof note);
    assert_non_null(o);
    assert_string_equal(o->name, "cpu-ref");
    assert_int_equal(o->threads, 1);
    ops_destroy(o);
}

static void test_auto_always_works(void **state) {
    (void)state;
    char note[256] = "x";
    tlm_ops *o = ops_create("auto", 1, note, sizeof note);
    assert_non_null(o);
    assert_true(note[0] != 0 && strcmp(note, "x") != 0);
    /* on the CPU the banner says why CUDA was not used */
    if (strcmp(o->name, "cpu") == 0) assert_non_null(strstr(note, "cpu (")), assert_non_null(strstr(note, "CUDA"));
    ops_destroy(o);
}

static void test_bad_specs(void **state) {
    (void)state;
    const char *bad[] = {"gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cudax", "cpu-fast"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char note[64] = "untouched";
        tlm_ops *o = ops_create(bad[i], 1, note, sizeof note);
        if (o) fail_msg("--device %s was accepted", bad[i]);
        const char *e = tlm_last_error();
        if (!strstr(e, "--device") || !strstr(e, bad[i])) fail_msg("error for %s: %s", bad[i], e);
    }
    /* the unknown-device message lists what is accepted */
    assert_null(ops_create("tpu", 1, NULL, 0));
    assert_non_null(strstr(tlm_last_error(), "cpu-ref"));
    assert_non_null(strstr(tlm_last_error(), "cuda:N"));
}

/* Without the CUDA module (or a GPU) an explicit cuda request fails with
 * one line that says what to do; where both exist it must work. */
static void test_cuda_request(void **state) {
    (void)state;
    char note[256];
    tlm_ops *o = ops_create("cuda", 1, note, sizeof note);
    if (o) {
        assert_string_equal(o->name, "cuda");
        ops_destroy(o);
        skip();
    }
    const char *e = tlm_last_error();
    assert_non_null(strstr(e, "--device cuda"));
    assert_non_null(strstr(e, "use --device cpu"));
    assert_null(strchr(e, '\n'));
}

static void test_cpu_info(void **state) {
    (void)state;
    tlm_cpu_info ci;
    cpu_info_query(&ci);
    assert_true(ci.model[0] != 0);
    assert_true(ci.cores >= 1);
    assert_true(ci.blas[0] != 0);
#if defined(TLM_BLAS_OPENBLAS)
    assert_true(strncmp(ci.blas, "OpenBLAS ", 9) == 0);
    assert_null(strchr(ci.blas + 9, ' ')); /* just name and version */
#endif
#if defined(__AVX2__)
    assert_true(ci.avx2); /* built with AVX2 enabled, so the CPU has it */
#endif
#if defined(__AVX512F__)
    assert_true(ci.avx512f);
#endif
    char buf[64];
    tlm_cpu_info fake = {0};
    assert_string_equal(cpu_info_simd(&fake, buf, sizeof buf), "none");
    fake.avx2 = fake.avx512f = 1;
    assert_string_equal(cpu_info_simd(&fake, buf, sizeof buf), "AVX2 AVX-512F");
    fake.avx512bf16 = 1;
    assert_string_equal(cpu_info_simd(&fake, buf, sizeof buf), "AVX2 AVX-512F AVX-512-BF16");
    char tiny[8];
    /* no room for the second name: whole names only */
    assert_string_equal(cpu_info_simd(&fake, tiny, sizeof tiny), "AVX2");
}

/* --dtype: fp32 and auto run on the CPU, bf16 and tf32 are refused there with one
 * line naming --dtype, and an unknown precision is refused everywhere. */
static void test_dtype(void **state) {
    (void)state;
    const char *ok[] = {"fp32", "auto", NULL};
    for (int i = 0; i < 3; i++) {
        tlm_ops *o = ops_create_ex("cpu", 1, ok[i], NULL, 0);
        if (!o) fail_msg("--device cpu --dtype %s: %s", ok[i] ? ok[i] : "(default)", tlm_last_error());
        ops_destroy(o);
    }
    const char *cpus[] = {"cpu", "cpu-ref"};
    const char *tc[] = {"bf16", "tf32"};
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < 2; k++) {
            assert_null(ops_create_ex(cpus[i], 1, tc[k], NULL, 0));
            const char *e = tlm_last_error();
            char want[32];
            snprintf(want, sizeof want, "--dtype %s", tc[k]);
            if (!strstr(e, want) || !strstr(e, "fp32") || strchr(e, '\n')) fail_msg("%s on %s: %s", tc[k], cpus[i], e);
        }
    const char *bad[] = {"fp16", "BF16", "", "float"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(ops_check_dtype(bad[i]), -1);
        assert_null(ops_create_ex("auto", 1, bad[i], NULL, 0));
        const char *e = tlm_last_error();
        if (!strstr(e, "--dtype") || !strstr(e, "fp32, bf16, tf32 or auto")) fail_msg("--dtype '%s': %s", bad[i], e);
    }
    /* auto + bf16 needs CUDA: either it runs there, or it is refused */
    char note[256];
    tlm_ops *o = ops_create_ex("auto", 1, "bf16", note, sizeof note);
    if (o) {
        assert_string_equal(o->name, "cuda");
        assert_non_null(strstr(note, "bf16"));
        ops_destroy(o);
    } else {
        assert_non_null(strstr(tlm_last_error(), "--dtype bf16"));
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu_specs),
        cmocka_unit_test(test_auto_always_works),
        cmocka_unit_test(test_bad_specs),
        cmocka_unit_test(test_cuda_request),
        cmocka_unit_test(test_cpu_info),
        cmocka_unit_test(test_dtype),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
