/*
 * tinylm: raw text to a trained small Llama-style language model and back.
 *
 * The public C API. Every function that can fail returns 0 on success and -1
 * on failure; tlm_last_error() then holds one human sentence that names the
 * file or flag at fault and what to do about it. The message is per thread.
 *
 * The finer-grained module headers (tokenizer, model, trainer, generator)
 * live under src/ and are used by the CLI and the tests; this header is the
 * stable surface for programs embedding tinylm.
 */
#ifndef TINYLM_TINYLM_H
#define TINYLM_TINYLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TLM_VERSION_STRING "0.1.0"

/* The last error set on this thread ("" if none). */
const char *tlm_last_error(void);

/* Set the error message (printf-style) and return -1, for one-line
 * `return tlm_errorf(...)` in error paths. */
int tlm_errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* A loaded tokenizer (Hugging Face tokenizer.json, byte-level BPE). */
typedef struct tlm_tokenizer tlm_tokenizer;

/* A trained model ready for generation (run folder: config.json,
 * model.safetensors, tokenizer.json). */
typedef struct tlm_generator tlm_generator;

/* Sampling options for tlm_generator_generate. */
typedef struct {
    int max_tokens;    /* new tokens at most (prompt + max_tokens must fit the context) */
    float temperature; /* 0 = greedy */
    int top_k;         /* 0 = off */
    float top_p;       /* in (0, 1]; 1 = off */
    uint64_t seed;     /* same seed, same text */
} tlm_generate_options;

/* max_tokens 200, temperature 0.8, top_k 0, top_p 0.95, seed 0. */
void tlm_generate_options_default(tlm_generate_options *o);

/* Load a run folder on a device ("auto", "cpu"; threads <= 0 = all
 * cores). NULL + tlm_last_error() naming the file at fault. */
tlm_generator *tlm_generator_open(const char *run_dir, const char *device, int threads);

/* Continue prompt (may be ""); stops at end-of-text or max_tokens. *text
 * receives the continuation only (malloc'd, NUL-terminated; free() it),
 * *len its length (may be NULL). Returns 0 or -1. */
int tlm_generator_generate(tlm_generator *g, const char *prompt, const tlm_generate_options *o, char **text,
                           size_t *len);

void tlm_generator_close(tlm_generator *g);

#ifdef __cplusplus
}
#endif
#endif
