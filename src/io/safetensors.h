/*
 * safetensors: 8-byte little-endian header length, a JSON header mapping
 * tensor names to {dtype, shape, data_offsets}, then the raw data.
 * We write F32 tensors (and read F32, BF16, F16, converting to F32).
 * The optional "__metadata__" map carries strings.
 */
#ifndef TLM_IO_SAFETENSORS_H
#define TLM_IO_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *name;   /* tensor name */
    const float *data;  /* host pointer */
    int ndim;
    int64_t shape[4];
} tlm_st_tensor;

/* Write tensors in the given order, atomically. meta_keys/meta_vals: n_meta
 * string pairs for __metadata__ (may be 0). */
int safetensors_write(const char *path, const tlm_st_tensor *tensors, int n, const char *const *meta_keys,
                      const char *const *meta_vals, int n_meta);

typedef struct tlm_st_file tlm_st_file;
/* Open and validate: header length within the file, JSON parses, every
 * tensor's offsets inside the data and consistent with dtype x shape.
 * Error names the path. */
tlm_st_file *safetensors_open(const char *path);
void safetensors_close(tlm_st_file *f);
/* Copy tensor `name` as float32 into out (count elements, which must equal
 * the tensor's element count); shape checking is the caller's via
 * safetensors_shape. Errors name the tensor and the file. */
int safetensors_read_f32(tlm_st_file *f, const char *name, float *out, size_t count);
/* ndim and shape of a tensor; -1 + error if missing. */
int safetensors_shape(tlm_st_file *f, const char *name, int64_t shape[4]);
/* A __metadata__ string, or NULL. */
const char *safetensors_meta(tlm_st_file *f, const char *key);

#endif
