/* Model configuration: hyper-parameters, presets, validation. */
#ifndef TLM_MODEL_CONFIG_H
#define TLM_MODEL_CONFIG_H

#include <stddef.h>

typedef struct {
    int vocab;        /* V */
    int dim;          /* D */
    int layers;       /* L */
    int heads;        /* H; head size hd = D / H (must be even for RoPE) */
    int hidden;       /* F, SwiGLU hidden width */
    int context;      /* maximum sequence length T */
    float norm_eps;   /* RMSNorm epsilon (1e-5) */
    float rope_theta; /* RoPE base (10000) */
} tlm_config;

/* Fill c from a named preset ("seed", "tiny"). Error names --preset. */
int config_preset(const char *name, tlm_config *c);
/* Check every field; the error names the flag to change (--dim, --heads...). */
int config_validate(const tlm_config *c);
/* Total parameter count (tied embeddings: the output head is wte). */
size_t config_param_count(const tlm_config *c);

/* Hugging Face config.json (LlamaForCausalLM) read/write. */
int config_save_json(const tlm_config *c, const char *path);
int config_load_json(tlm_config *c, const char *path);

#endif
