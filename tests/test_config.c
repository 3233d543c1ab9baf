/* Model configuration: presets, validation messages, config.json. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/config.h"
#include "testutil.h"
#include "tinylm/tinylm.h"

static void test_presets(void **state) {
    (void)state;
    tlm_config c;
    assert_int_equal(config_preset("seed", &c), 0);
    assert_int_equal(c.vocab, 2560);
    assert_int_equal(c.dim, 256);
    assert_int_equal(c.layers, 10);
    assert_int_equal(c.heads, 8);
    assert_int_equal(c.hidden, 704);
    assert_int_equal(c.context, 256);
    assert_true(c.norm_eps == 1e-5f);
    assert_true(c.rope_theta == 10000.0f);
    assert_int_equal(config_validate(&c), 0);
    /* 2560*256 + 10*(2*256 + 4*256*256 + 3*704*256) + 256, by hand */
    assert_int_equal(config_param_count(&c), 8688896);

    assert_int_equal(config_preset("tiny", &c), 0);
    assert_int_equal(c.vocab, 512);
    assert_int_equal(c.dim, 64);
    assert_int_equal(c.layers, 2);
    assert_int_equal(c.heads, 4);
    assert_int_equal(c.hidden, 176);
    assert_int_equal(c.context, 64);
    assert_int_equal(config_validate(&c), 0);
    /* 512*64 + 2*(128 + 4*4096 + 3*176*64) + 64 */
    assert_int_equal(config_param_count(&c), 32768 + 2 * (128 + 16384 + 33792) + 64);

    tlm_config before = c;
    assert_int_equal(config_preset("huge", &c), -1);
    assert_non_null(strstr(tlm_last_error(), "--preset"));
    assert_non_null(strstr(tlm_last_error(), "huge"));
    assert_memory_equal(&c, &before, sizeof c); /* untouched on error */
}

/* Validate a modified seed config; expect failure with `flag` in the message. */
static void expect_invalid(tlm_config c, const char *flag) {
    int rc = config_validate(&c);
    if (rc != -1 || !strstr(tlm_last_error(), flag))
        fail_msg("expected an error naming %s, got rc %d: '%s'", flag, rc, tlm_last_error());
}

static void test_validate(void **state) {
    (void)state;
    tlm_config ok;
    config_preset("seed", &ok);
    tlm_config c;

    c = ok; c.heads = 7;               /* 256 % 7 != 0 */
    expect_invalid(c, "--heads");
    assert_non_null(strstr(tlm_last_error(), "--dim"));
    assert_non_null(strstr(tlm_last_error(), "divisible"));
    c = ok; c.dim = 24; c.heads = 8;   /* head size 3 */
    expect_invalid(c, "--dim/--heads must be even for RoPE");
    c = ok; c.dim = 0;
    expect_invalid(c, "--dim");
    c = ok; c.dim = -64;
    expect_invalid(c, "--dim");
    c = ok; c.layers = 0;
    expect_invalid(c, "--layers");
    c = ok; c.heads = 0;
    expect_invalid(c, "--heads");
    c = ok; c.hidden = -1;
    expect_invalid(c, "--hidden");
    c = ok; c.context = 0;
    expect_invalid(c, "--context");
    c = ok; c.vocab = 256;
    expect_invalid(c, "--vocab");
    c = ok; c.vocab = 257;             /* the smallest byte-level vocabulary is fine */
    assert_int_equal(config_validate(&c), 0);
    c = ok; c.heads = 512;             /* more heads than dimensions */
    expect_invalid(c, "--heads");
    c = ok; c.norm_eps = 0.0f;
    expect_invalid(c, "--norm-eps");
    c = ok; c.rope_theta = -1.0f;
    expect_invalid(c, "--rope-theta");
    /* sizes whose int products would overflow */
    c = ok; c.dim = 1 << 30;
    expect_invalid(c, "--dim");
    c = ok; c.vocab = 1000000; c.dim = 8192; c.heads = 32;
    expect_invalid(c, "--vocab");
    c = ok; c.hidden = 65536; c.dim = 16384; c.heads = 64;
    expect_invalid(c, "--hidden");
    c = ok; c.context = 1 << 20; c.dim = 4096;
    expect_invalid(c, "--context");
    c = ok; c.layers = 1 << 28;
    expect_invalid(c, "--layers");
    assert_int_equal(config_validate(&ok), 0);
}

static char *g_tmp;

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_json_roundtrip(void **state) {
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", g_tmp);
    tlm_config c = {.vocab = 3000, .dim = 96, .layers = 3, .heads = 6, .hidden = 256, .context = 128,
                    .norm_eps = 1e-6f, .rope_theta = 50000.0f};
    assert_int_equal(config_save_json(&c, path), 0);
    tlm_config r;
    memset(&r, 0xff, sizeof r);
    assert_int_equal(config_load_json(&r, path), 0);
    assert_memory_equal(&c, &r, sizeof c);

    /* The file is what Hugging Face expects of a tied Llama. */
    size_t len;
    char *text = test_read_file(path, &len);
    assert_non_null(text);
    cJSON *j = cJSON_Parse(text);
    assert_non_null(j);
    cJSON *arch = cJSON_GetObjectItem(j, "architectures");
    assert_true(cJSON_IsArray(arch) && cJSON_GetArraySize(arch) == 1);
    assert_string_equal(cJSON_GetArrayItem(arch, 0)->valuestring, "LlamaForCausalLM");
    assert_string_equal(cJSON_GetObjectItem(j, "model_type")->valuestring, "llama");
    assert_string_equal(cJSON_GetObjectItem(j, "hidden_act")->valuestring, "silu");
    assert_string_equal(cJSON_GetObjectItem(j, "torch_dtype")->valuestring, "float32");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "tie_word_embeddings")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(j, "attention_bias")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(j, "mlp_bias")));
    assert_int_equal(cJSON_GetObjectItem(j, "vocab_size")->valueint, 3000);
    assert_int_equal(cJSON_GetObjectItem(j, "hidden_size")->valueint, 96);
    assert_int_equal(cJSON_GetObjectItem(j, "intermediate_size")->valueint, 256);
    assert_int_equal(cJSON_GetObjectItem(j, "num_hidden_layers")->valueint, 3);
    assert_int_equal(cJSON_GetObjectItem(j, "num_attention_heads")->valueint, 6);
    assert_int_equal(cJSON_GetObjectItem(j, "num_key_value_heads")->valueint, 6);
    assert_int_equal(cJSON_GetObjectItem(j, "max_position_embeddings")->valueint, 128);
    assert_int_equal(cJSON_GetObjectItem(j, "bos_token_id")->valueint, 2999);
    assert_int_equal(cJSON_GetObjectItem(j, "eos_token_id")->valueint, 2999);
    assert_true(cJSON_GetObjectItem(j, "rms_norm_eps")->valuedouble == 1e-6);
    assert_true(cJSON_GetObjectItem(j, "rope_theta")->valuedouble == 50000.0);
    assert_true(cJSON_GetObjectItem(j, "initializer_range")->valuedouble == 0.02);
    assert_true(cJSON_IsString(cJSON_GetObjectItem(j, "tinylm_version")));
    cJSON_Delete(j);
    /* eps printed as the short decimal, not float noise */
    assert_non_null(strstr(text, "1e-06"));
    free(text);

    /* an invalid config is refused before anything is written */
    char bad[1024];
    snprintf(bad, sizeof bad, "%s/bad.json", g_tmp);
    c.heads = 5;
    assert_int_equal(config_save_json(&c, bad), -1);
    assert_false(test_read_file(bad, NULL) != NULL);
    remove(path);
}

/* A minimal HF-style config with one substitution: `extra` is appended
 * after the required keys (it may override earlier keys; cJSON takes the
 * first, so overriding is done by omitting keys via `omit`). */
static void write_config(const char *path, const char *omit, const char *extra) {
    const char *keys[][2] = {
        {"vocab_size", "300"},         {"hidden_size", "64"},
        {"intermediate_size", "176"},  {"num_hidden_layers", "2"},
        {"num_attention_heads", "4"},  {"max_position_embeddings", "32"},
        {"tie_word_embeddings", "true"}, {"model_type", "\"llama\""},
    };
    char buf[4096];
    size_t n = 0;
    n += (size_t)snprintf(buf + n, sizeof buf - n, "{");
    int first = 1;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        if (omit && strcmp(omit, keys[i][0]) == 0) continue;
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s\"%s\": %s", first ? "" : ", ", keys[i][0], keys[i][1]);
        first = 0;
    }
    if (extra) n += (size_t)snprintf(buf + n, sizeof buf - n, ", %s", extra);
    snprintf(buf + n, sizeof buf - n, "}");
    write_text(path, buf);
}

static void expect_load_error(const char *path, const char *what) {
    tlm_config c;
    int rc = config_load_json(&c, path);
    if (rc != -1 || !strstr(tlm_last_error(), path) || (what && !strstr(tlm_last_error(), what)))
        fail_msg("loading %s: expected an error naming the path and '%s', got rc %d: '%s'", path,
                 what ? what : "", rc, tlm_last_error());
}

static void test_json_bad_files(void **state) {
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/c.json", g_tmp);

    /* the minimal file is accepted, with HF defaults for what it omits */
    write_config(path, NULL, NULL);
    tlm_config c;
    assert_int_equal(config_load_json(&c, path), 0);
    assert_int_equal(c.vocab, 300);
    assert_int_equal(c.dim, 64);
    assert_int_equal(c.hidden, 176);
    assert_int_equal(c.layers, 2);
    assert_int_equal(c.heads, 4);
    assert_int_equal(c.context, 32);
    assert_true(c.norm_eps == 1e-6f);
    assert_true(c.rope_theta == 10000.0f);

    char missing[1024];
    snprintf(missing, sizeof missing, "%s/nope/config.json", g_tmp);
    expect_load_error(missing, NULL);

    write_text(path, "{\"vocab_size\": 300, ");
    expect_load_error(path, "JSON");
    write_text(path, "[1, 2]");
    expect_load_error(path, NULL);
    write_text(path, "");
    expect_load_error(path, NULL);

    write_config(path, "hidden_size", NULL);
    expect_load_error(path, "hidden_size");
    write_config(path, "num_attention_heads", NULL);
    expect_load_error(path, "num_attention_heads");
    write_config(path, "vocab_size", "\"vocab_size\": \"300\"");
    expect_load_error(path, "vocab_size");
    write_config(path, "vocab_size", "\"vocab_size\": 300.5");
    expect_load_error(path, "vocab_size");
    write_config(path, "tie_word_embeddings", "\"tie_word_embeddings\": false");
    expect_load_error(path, "tie_word_embeddings");
    write_config(path, "tie_word_embeddings", NULL);
    expect_load_error(path, "tie_word_embeddings");
    write_config(path, NULL, "\"num_key_value_heads\": 2");
    expect_load_error(path, "num_key_value_heads");
    write_config(path, NULL, "\"num_key_value_heads\": 4");
    assert_int_equal(config_load_json(&c, path), 0);
    write_config(path, "model_type", "\"model_type\": \"gpt2\"");
    expect_load_error(path, "model_type");
    write_config(path, NULL, "\"attention_bias\": true");
    expect_load_error(path, "attention_bias");
    write_config(path, NULL, "\"hidden_act\": \"gelu\"");
    expect_load_error(path, "hidden_act");
    write_config(path, NULL, "\"rms_norm_eps\": \"small\"");
    expect_load_error(path, "rms_norm_eps");
    /* values that parse but make no valid model: the validator's message, with the path */
    write_config(path, "num_attention_heads", "\"num_attention_heads\": 3");
    expect_load_error(path, "--heads");
    write_config(path, "vocab_size", "\"vocab_size\": 100");
    expect_load_error(path, "--vocab");
    write_config(path, "hidden_size", "\"hidden_size\": 1e12");
    expect_load_error(path, "hidden_size");
    remove(path);
}

int main(void) {
    g_tmp = test_tmpdir();
    if (!g_tmp) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_presets),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_json_roundtrip),
        cmocka_unit_test(test_json_bad_files),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    test_rmtree(g_tmp);
    free(g_tmp);
    return rc;
}
