/* Model configuration: presets, validation, Hugging Face config.json. */
#include "model/config.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/fileio.h"
#include "util/common.h"

int config_preset(const char *name, tlm_config *c) {
    if (!name) return tlm_errorf("--preset is missing: use --preset seed or --preset tiny");
    tlm_config p = {0};
    p.norm_eps = 1e-5f;
    p.rope_theta = 10000.0f;
    if (strcmp(name, "seed") == 0) {
        /* 8,688,896 parameters: trains in reasonable time on a laptop CPU. */
        p.vocab = 2560; p.dim = 256; p.layers = 10; p.heads = 8; p.hidden = 704; p.context = 256;
    } else if (strcmp(name, "tiny") == 0) {
        /* For tests and smoke runs: seconds per hundred steps. */
        p.vocab = 512; p.dim = 64; p.layers = 2; p.heads = 4; p.hidden = 176; p.context = 64;
    } else {
        return tlm_errorf("unknown --preset '%s': use seed or tiny", name);
    }
    *c = p;
    return 0;
}

/* Bounds chosen so that every int product the model and the ops form from
 * one tensor's dimensions (V*D, 3D*D, 2F*D, T*3D...) stays below 2^31. */
#define CFG_MAX_VOCAB (1 << 20)
#define CFG_MAX_DIM 16384
#define CFG_MAX_HIDDEN 65536
#define CFG_MAX_LAYERS 1024
#define CFG_MAX_CONTEXT (1 << 20)

static int check_range(const char *flag, long long v, long long lo, long long hi) {
    if (v < lo) {
        if (lo == 1) return tlm_errorf("%s must be positive (got %lld)", flag, v);
        return tlm_errorf("%s must be at least %lld (got %lld)", flag, lo, v);
    }
    if (v > hi) return tlm_errorf("%s %lld is too large: the maximum is %lld", flag, v, hi);
    return 0;
}

int config_validate(const tlm_config *c) {
    if (!c) return tlm_errorf("no model configuration given");
    if (c->vocab < 257)
        return tlm_errorf("--vocab must be at least 257 (256 byte tokens + <|endoftext|>), got %d", c->vocab);
    if (check_range("--vocab", c->vocab, 257, CFG_MAX_VOCAB)) return -1;
    if (check_range("--dim", c->dim, 1, CFG_MAX_DIM)) return -1;
    if (check_range("--layers", c->layers, 1, CFG_MAX_LAYERS)) return -1;
    if (check_range("--heads", c->heads, 1, c->dim)) return -1;
    if (check_range("--hidden", c->hidden, 1, CFG_MAX_HIDDEN)) return -1;
    if (check_range("--context", c->context, 1, CFG_MAX_CONTEXT)) return -1;
    if (c->dim % c->heads != 0)
        return tlm_errorf("--dim %d is not divisible by --heads %d: choose --heads dividing --dim", c->dim,
                          c->heads);
    if ((c->dim / c->heads) % 2 != 0)
        return tlm_errorf("--dim/--heads must be even for RoPE (head size %d/%d = %d)", c->dim, c->heads,
                          c->dim / c->heads);
    /* Per-tensor products, in 64 bits so the check itself cannot overflow. */
    if ((int64_t)c->vocab * c->dim > INT_MAX)
        return tlm_errorf("--vocab %d x --dim %d is too large (embedding over 2^31 elements)", c->vocab, c->dim);
    if ((int64_t)2 * c->hidden * c->dim > INT_MAX)
        return tlm_errorf("--hidden %d x --dim %d is too large (MLP weight over 2^31 elements)", c->hidden,
                          c->dim);
    if ((int64_t)3 * c->context * c->dim > INT_MAX)
        return tlm_errorf("--context %d x --dim %d is too large (activations over 2^31 elements)", c->context,
                          c->dim);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps) || c->norm_eps > 1.0f)
        return tlm_errorf("--norm-eps must be in (0, 1] (got %g)", (double)c->norm_eps);
    if (!(c->rope_theta > 1.0f) || !isfinite(c->rope_theta))
        return tlm_errorf("--rope-theta must be a finite number above 1 (got %g)", (double)c->rope_theta);
    return 0;
}

size_t config_param_count(const tlm_config *c) {
    size_t V = (size_t)c->vocab, D = (size_t)c->dim, F = (size_t)c->hidden, L = (size_t)c->layers;
    /* per layer: two norms, q/k/v/o, gate/up/down; plus wte and the final norm */
    size_t per_layer = 2 * D + 4 * D * D + 3 * F * D;
    return V * D + L * per_layer + D;
}

/* The shortest decimal that reads back as the same float, so config.json
 * says 1e-05 rather than 9.99999974737875e-06. */
static double float_to_short_double(float f) {
    char buf[64];
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if (strtof(buf, NULL) == f) return strtod(buf, NULL);
    }
    return (double)f;
}

int config_save_json(const tlm_config *c, const char *path) {
    if (config_validate(c)) return -1;
    cJSON *j = cJSON_CreateObject();
    if (!j) return tlm_errorf("out of memory writing %s", path);
    const char *arch[] = {"LlamaForCausalLM"};
    cJSON_AddItemToObject(j, "architectures", cJSON_CreateStringArray(arch, 1));
    cJSON_AddStringToObject(j, "model_type", "llama");
    cJSON_AddNumberToObject(j, "vocab_size", c->vocab);
    cJSON_AddNumberToObject(j, "hidden_size", c->dim);
    cJSON_AddNumberToObject(j, "intermediate_size", c->hidden);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", c->heads);
    cJSON_AddNumberToObject(j, "max_position_embeddings", c->context);
    cJSON_AddNumberToObject(j, "rms_norm_eps", float_to_short_double(c->norm_eps));
    cJSON_AddNumberToObject(j, "rope_theta", float_to_short_double(c->rope_theta));
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddBoolToObject(j, "tie_word_embeddings", 1);
    cJSON_AddBoolToObject(j, "attention_bias", 0);
    cJSON_AddBoolToObject(j, "mlp_bias", 0);
    cJSON_AddStringToObject(j, "torch_dtype", "float32");
    cJSON_AddNumberToObject(j, "initializer_range", 0.02);
    /* The last id is <|endoftext|>: documents are separated (and begun) by it. */
    cJSON_AddNumberToObject(j, "bos_token_id", c->vocab - 1);
    cJSON_AddNumberToObject(j, "eos_token_id", c->vocab - 1);
    cJSON_AddStringToObject(j, "tinylm_version", TLM_VERSION_STRING);
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    if (!text) return tlm_errorf("out of memory writing %s", path);
    size_t n = strlen(text);
    char *buf = malloc(n + 2);
    if (!buf) { cJSON_free(text); return tlm_errorf("out of memory writing %s", path); }
    memcpy(buf, text, n);
    buf[n] = '\n';
    cJSON_free(text);
    int rc = file_write_atomic(path, buf, n + 1);
    free(buf);
    return rc;
}

/* A required positive integer key. */
static int json_get_int(const cJSON *j, const char *key, const char *path, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!v) return tlm_errorf("%s is missing \"%s\": it is not a usable model config.json", path, key);
    double d = v->valuedouble;
    if (!cJSON_IsNumber(v) || d != floor(d) || d < INT_MIN || d > INT_MAX)
        return tlm_errorf("\"%s\" in %s must be an integer below 2^31", key, path);
    *out = (int)d;
    return 0;
}

/* An optional number key (HF defaults apply when missing). */
static int json_get_float(const cJSON *j, const char *key, const char *path, float dflt, float *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!v) { *out = dflt; return 0; }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return tlm_errorf("\"%s\" in %s must be a number", key, path);
    *out = (float)v->valuedouble;
    return 0;
}

static int config_from_json(tlm_config *c, const cJSON *j, const char *path) {
    if (!cJSON_IsObject(j)) return tlm_errorf("%s is not a JSON object: it is not a model config.json", path);
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    if (mt && (!cJSON_IsString(mt) || strcmp(mt->valuestring, "llama") != 0))
        return tlm_errorf("%s has model_type %s%s%s: only \"llama\" models are supported", path,
                          cJSON_IsString(mt) ? "\"" : "", cJSON_IsString(mt) ? mt->valuestring : "(not a string)",
                          cJSON_IsString(mt) ? "\"" : "");
    tlm_config r = {0};
    if (json_get_int(j, "vocab_size", path, &r.vocab) || json_get_int(j, "hidden_size", path, &r.dim) ||
        json_get_int(j, "intermediate_size", path, &r.hidden) ||
        json_get_int(j, "num_hidden_layers", path, &r.layers) ||
        json_get_int(j, "num_attention_heads", path, &r.heads) ||
        json_get_int(j, "max_position_embeddings", path, &r.context))
        return -1;
    if (cJSON_GetObjectItemCaseSensitive(j, "num_key_value_heads")) {
        int kv = 0;
        if (json_get_int(j, "num_key_value_heads", path, &kv)) return -1;
        if (kv != r.heads)
            return tlm_errorf("%s has num_key_value_heads %d != num_attention_heads %d: grouped-query "
                              "attention is not supported",
                              path, kv, r.heads);
    }
    /* Hugging Face LlamaConfig defaults: rms_norm_eps 1e-6, rope_theta 10000. */
    if (json_get_float(j, "rms_norm_eps", path, 1e-6f, &r.norm_eps)) return -1;
    if (json_get_float(j, "rope_theta", path, 10000.0f, &r.rope_theta)) return -1;
    /* HF's default for tie_word_embeddings is false, which would need an
     * lm_head.weight we do not have. */
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(j, "tie_word_embeddings");
    if (tie && !cJSON_IsBool(tie)) return tlm_errorf("\"tie_word_embeddings\" in %s must be true or false", path);
    if (!cJSON_IsTrue(tie))
        return tlm_errorf("%s has tie_word_embeddings false (or missing): only tied input/output embeddings "
                          "are supported",
                          path);
    const char *flags[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++) {
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, flags[i]);
        if (b && !cJSON_IsBool(b)) return tlm_errorf("\"%s\" in %s must be true or false", flags[i], path);
        if (cJSON_IsTrue(b)) return tlm_errorf("%s has %s true: biases are not supported", path, flags[i]);
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0))
        return tlm_errorf("%s has a hidden_act other than \"silu\": only SwiGLU models are supported", path);
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(j, "rope_scaling");
    if (rs && !cJSON_IsNull(rs)) return tlm_errorf("%s sets rope_scaling: RoPE scaling is not supported", path);
    if (config_validate(&r)) {
        char inner[1024];
        snprintf(inner, sizeof inner, "%s", tlm_last_error());
        return tlm_errorf("invalid model in %s: %s", path, inner);
    }
    *c = r;
    return 0;
}

int config_load_json(tlm_config *c, const char *path) {
    size_t len = 0;
    char *text = file_read_all(path, &len);
    if (!text) return -1; /* file_read_all's error names the path and the cause */
    cJSON *j = cJSON_ParseWithLength(text, len);
    free(text);
    if (!j) return tlm_errorf("%s is not valid JSON: fix or regenerate the model's config.json", path);
    int rc = config_from_json(c, j, path);
    cJSON_Delete(j);
    return rc;
}
