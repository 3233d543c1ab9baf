/*
 * safetensors reader and writer.
 *
 * Layout: u64 little-endian N, then N bytes of JSON header (padded with
 * spaces so the data starts 8-byte aligned), then the data section. Each
 * tensor entry gives dtype, shape and [begin, end) byte offsets relative to
 * the start of the data section.
 *
 * Reading maps the whole file and validates every entry up front, so a bad
 * file fails at open with one message instead of at some later tensor.
 */
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/fileio.h"
#include "util/common.h"

/* The format caps the header at 100 MB; anything larger is corrupt. */
#define ST_MAX_HEADER (100u * 1000u * 1000u)

typedef struct {
    char *name;
    char dtype[16];
    int dsize;          /* bytes per element */
    int ndim;
    int64_t shape[4];
    uint64_t numel;
    uint64_t begin, end; /* relative to the data section */
} st_entry;

struct tlm_st_file {
    char path[1024];
    unsigned char *map;
    size_t map_len;
    const unsigned char *data; /* start of the data section */
    uint64_t data_len;
    st_entry *t;
    int n;
    char **meta_keys, **meta_vals;
    int n_meta;
};

/* ---- little-endian helpers (the host may be either) ------------------ */

static int st_host_is_le(void) {
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static uint64_t st_get_u64le(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void st_put_u64le(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* IEEE half to float, including subnormals, infinities and NaN. */
static float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {
            /* subnormal: value = man * 2^-24, exactly representable */
            float v = (float)man * 5.9604644775390625e-08f;
            return sign ? -v : v;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float st_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- writing ----------------------------------------------------------- */

static uint64_t st_numel(const tlm_st_tensor *t) {
    uint64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
    return n;
}

int safetensors_write(const char *path, const tlm_st_tensor *tensors, int n, const char *const *meta_keys,
                      const char *const *meta_vals, int n_meta) {
    /* Validate first so a bad call never creates a file. */
    for (int i = 0; i < n; i++) {
        const tlm_st_tensor *t = &tensors[i];
        if (!t->name || !*t->name || !strcmp(t->name, "__metadata__"))
            return tlm_errorf("cannot write %s: tensor %d has no usable name", path, i);
        if (t->ndim < 0 || t->ndim > 4)
            return tlm_errorf("cannot write %s: tensor %s has %d dimensions (at most 4)", path, t->name, t->ndim);
        for (int d = 0; d < t->ndim; d++)
            if (t->shape[d] < 0)
                return tlm_errorf("cannot write %s: tensor %s has a negative dimension", path, t->name);
        if (!t->data && st_numel(t) > 0)
            return tlm_errorf("cannot write %s: tensor %s has no data", path, t->name);
        for (int j = 0; j < i; j++)
            if (!strcmp(tensors[j].name, t->name))
                return tlm_errorf("cannot write %s: tensor name %s appears twice", path, t->name);
    }

    cJSON *root = cJSON_CreateObject();
    if (!root) return tlm_errorf("out of memory writing %s", path);
    if (n_meta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        for (int i = 0; meta && i < n_meta; i++) cJSON_AddStringToObject(meta, meta_keys[i], meta_vals[i]);
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const tlm_st_tensor *t = &tensors[i];
        cJSON *e = cJSON_AddObjectToObject(root, t->name);
        if (!e) break;
        cJSON_AddStringToObject(e, "dtype", "F32");
        cJSON *shape = cJSON_AddArrayToObject(e, "shape");
        for (int d = 0; shape && d < t->ndim; d++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        uint64_t bytes = st_numel(t) * 4;
        /* Offsets beyond 2^53 would lose precision in cJSON's doubles. */
        if (off + bytes > (1ull << 53)) {
            cJSON_Delete(root);
            return tlm_errorf("cannot write %s: tensors exceed 8 PB", path);
        }
        cJSON *offs = cJSON_AddArrayToObject(e, "data_offsets");
        if (offs) {
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + bytes)));
        }
        off += bytes;
    }
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!json) return tlm_errorf("out of memory writing %s", path);

    /* Pad with spaces so the data section starts 8-byte aligned, which lets
     * readers (ours included) map tensors in place. */
    size_t jlen = strlen(json);
    size_t hlen = (jlen + 7) / 8 * 8;
    unsigned char lenbuf[8];
    st_put_u64le(lenbuf, hlen);

    tlm_atomic_file f;
    if (atomic_open(&f, path) != 0) {
        free(json);
        return -1;
    }
    int rc = atomic_write(&f, lenbuf, 8);
    if (rc == 0) rc = atomic_write(&f, json, jlen);
    if (rc == 0 && hlen > jlen) rc = atomic_write(&f, "        ", hlen - jlen);
    free(json);

    int le = st_host_is_le();
    unsigned char chunk[16384];
    for (int i = 0; rc == 0 && i < n; i++) {
        const tlm_st_tensor *t = &tensors[i];
        uint64_t cnt = st_numel(t);
        if (le) {
            rc = atomic_write(&f, t->data, (size_t)cnt * 4);
            continue;
        }
        for (uint64_t s = 0; rc == 0 && s < cnt; s += sizeof chunk / 4) {
            uint64_t m = cnt - s < sizeof chunk / 4 ? cnt - s : sizeof chunk / 4;
            for (uint64_t k = 0; k < m; k++) {
                uint32_t b;
                memcpy(&b, &t->data[s + k], 4);
                for (int j = 0; j < 4; j++) chunk[4 * k + j] = (unsigned char)(b >> (8 * j));
            }
            rc = atomic_write(&f, chunk, (size_t)m * 4);
        }
    }
    if (rc != 0) {
        atomic_abort(&f);
        return -1;
    }
    return atomic_commit(&f);
}

/* ---- reading ----------------------------------------------------------- */

static int st_dtype_size(const char *dt) {
    static const struct { const char *name; int size; } k[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},
        {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
    };
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(dt, k[i].name)) return k[i].size;
    return 0;
}

/* A JSON number that is a non-negative integer exactly representable. */
static int st_json_u64(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= 0) || d > 9007199254740992.0 || floor(d) != d) return -1;
    *out = (uint64_t)d;
    return 0;
}

static int st_cmp_begin(const void *a, const void *b) {
    const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

#define ST_FIX "re-export or re-download the file"

/* Parse and validate the header; fills f->t, f->meta. */
static int st_parse_header(tlm_st_file *f, const char *json, size_t jlen) {
    const char *p = f->path;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, jlen, &end, 0);
    if (!root) {
        size_t at = end && end >= json ? (size_t)(end - json) : 0;
        return tlm_errorf("%s is not a valid safetensors file: its JSON header does not parse (near byte %zu): " ST_FIX,
                          p, at + 8);
    }
    /* Only the space padding may follow the JSON value. */
    for (const char *q = end; q && q < json + jlen; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            cJSON_Delete(root);
            return tlm_errorf("%s is not a valid safetensors file: junk after its JSON header: " ST_FIX, p);
        }
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return tlm_errorf("%s is not a valid safetensors file: its header is not a JSON object: " ST_FIX, p);
    }
    int count = cJSON_GetArraySize(root);
    const cJSON *meta_obj = cJSON_GetObjectItemCaseSensitive(root, "__metadata__");
    int nmeta_max = cJSON_IsObject(meta_obj) ? cJSON_GetArraySize(meta_obj) : 0;
    f->t = calloc((size_t)count + 1, sizeof *f->t);
    f->meta_keys = calloc((size_t)nmeta_max + 1, sizeof(char *));
    f->meta_vals = calloc((size_t)nmeta_max + 1, sizeof(char *));
    if (!f->t || !f->meta_keys || !f->meta_vals) {
        cJSON_Delete(root);
        return tlm_errorf("out of memory reading %s", p);
    }
    int rc = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, root) {
        const char *key = it->string ? it->string : "";
        if (!strcmp(key, "__metadata__")) {
            if (!cJSON_IsObject(it)) {
                rc = tlm_errorf("%s has a __metadata__ entry that is not an object: " ST_FIX, p);
                break;
            }
            const cJSON *m;
            cJSON_ArrayForEach(m, it) {
                if (!cJSON_IsString(m)) {
                    rc = tlm_errorf("%s has __metadata__ value %s that is not a string: " ST_FIX, p,
                                    m->string ? m->string : "?");
                    break;
                }
                if (f->n_meta >= nmeta_max) {
                    rc = tlm_errorf("%s has more than one __metadata__ entry: " ST_FIX, p);
                    break;
                }
                f->meta_keys[f->n_meta] = strdup(m->string ? m->string : "");
                f->meta_vals[f->n_meta] = strdup(m->valuestring);
                f->n_meta++;
                if (!f->meta_keys[f->n_meta - 1] || !f->meta_vals[f->n_meta - 1]) {
                    rc = tlm_errorf("out of memory reading %s", p);
                    break;
                }
            }
            if (rc) break;
            continue;
        }
        st_entry *e = &f->t[f->n];
        e->name = strdup(key);
        f->n++;
        if (!e->name) {
            rc = tlm_errorf("out of memory reading %s", p);
            break;
        }
        if (!cJSON_IsObject(it)) {
            rc = tlm_errorf("%s: tensor %s is not described by a JSON object: " ST_FIX, p, key);
            break;
        }
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
        const cJSON *sh = cJSON_GetObjectItemCaseSensitive(it, "shape");
        const cJSON *of = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(of)) {
            rc = tlm_errorf("%s: tensor %s lacks dtype, shape or data_offsets: " ST_FIX, p, key);
            break;
        }
        snprintf(e->dtype, sizeof e->dtype, "%s", dt->valuestring);
        e->dsize = st_dtype_size(dt->valuestring);
        if (e->dsize == 0 || strlen(dt->valuestring) >= sizeof e->dtype) {
            rc = tlm_errorf("%s: tensor %s has unknown dtype \"%.20s\": export it as F32, BF16 or F16", p, key,
                            dt->valuestring);
            break;
        }
        e->ndim = cJSON_GetArraySize(sh);
        if (e->ndim > 4) {
            rc = tlm_errorf("%s: tensor %s has %d dimensions; tinylm reads at most 4: " ST_FIX, p, key, e->ndim);
            break;
        }
        e->numel = 1;
        int d = 0;
        const cJSON *dim;
        cJSON_ArrayForEach(dim, sh) {
            uint64_t v;
            if (st_json_u64(dim, &v) != 0 || v > (1ull << 40)) {
                rc = tlm_errorf("%s: tensor %s has an invalid shape: " ST_FIX, p, key);
                break;
            }
            e->shape[d++] = (int64_t)v;
            /* Overflow-safe: each dim <= 2^40 and the product is checked
             * against the file size below before it can grow further. */
            if (v && e->numel > UINT64_MAX / v) {
                rc = tlm_errorf("%s: tensor %s has an impossibly large shape: " ST_FIX, p, key);
                break;
            }
            e->numel *= v;
        }
        if (rc) break;
        if (cJSON_GetArraySize(of) != 2 || st_json_u64(cJSON_GetArrayItem(of, 0), &e->begin) != 0 ||
            st_json_u64(cJSON_GetArrayItem(of, 1), &e->end) != 0 || e->begin > e->end) {
            rc = tlm_errorf("%s: tensor %s has invalid data_offsets: " ST_FIX, p, key);
            break;
        }
        if (e->end > f->data_len) {
            rc = tlm_errorf("%s: tensor %s ends at byte %llu of the data but the data holds only %llu bytes "
                            "(truncated file?): " ST_FIX,
                            p, key, (unsigned long long)e->end, (unsigned long long)f->data_len);
            break;
        }
        if (e->numel > f->data_len || e->end - e->begin != e->numel * (uint64_t)e->dsize) {
            rc = tlm_errorf("%s: tensor %s spans %llu bytes but %s x %llu elements need %llu: " ST_FIX, p, key,
                            (unsigned long long)(e->end - e->begin), e->dtype, (unsigned long long)e->numel,
                            (unsigned long long)(e->numel * (uint64_t)e->dsize));
            break;
        }
    }
    cJSON_Delete(root);
    if (rc) return rc;

    /* No two tensors may share bytes (or names: cJSON keeps duplicates). */
    if (f->n > 1) {
        st_entry **order = malloc((size_t)f->n * sizeof *order);
        if (!order) return tlm_errorf("out of memory reading %s", p);
        for (int i = 0; i < f->n; i++) order[i] = &f->t[i];
        qsort(order, (size_t)f->n, sizeof *order, st_cmp_begin);
        for (int i = 1; i < f->n && rc == 0; i++) {
            const st_entry *a = order[i - 1], *b = order[i];
            if (b->begin < a->end)
                rc = tlm_errorf("%s: tensors %s and %s overlap in the data section: " ST_FIX, p, a->name, b->name);
        }
        free(order);
        for (int i = 0; i < f->n && rc == 0; i++)
            for (int j = 0; j < i && rc == 0; j++)
                if (!strcmp(f->t[i].name, f->t[j].name))
                    rc = tlm_errorf("%s: tensor %s appears twice in the header: " ST_FIX, p, f->t[i].name);
    }
    return rc;
}

tlm_st_file *safetensors_open(const char *path) {
    tlm_st_file *f = calloc(1, sizeof *f);
    if (!f) {
        tlm_errorf("out of memory opening %s", path);
        return NULL;
    }
    snprintf(f->path, sizeof f->path, "%s", path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        tlm_errorf("cannot open %s: %s: check the path (a run folder needs model.safetensors)", path,
                   strerror(errno));
        free(f);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        tlm_errorf("cannot open %s: not a regular file: check the path", path);
        close(fd);
        free(f);
        return NULL;
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        tlm_errorf("%s is not a valid safetensors file: only %zu bytes (truncated): " ST_FIX, path, size);
        close(fd);
        free(f);
        return NULL;
    }
    void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        tlm_errorf("cannot map %s: %s", path, strerror(errno));
        free(f);
        return NULL;
    }
    f->map = m;
    f->map_len = size;
    uint64_t hlen = st_get_u64le(f->map);
    if (hlen > size - 8 || hlen > ST_MAX_HEADER || hlen < 2) {
        tlm_errorf("%s is not a valid safetensors file: header length %llu does not fit the %zu-byte file "
                   "(truncated or not safetensors): " ST_FIX,
                   path, (unsigned long long)hlen, size);
        safetensors_close(f);
        return NULL;
    }
    f->data = f->map + 8 + hlen;
    f->data_len = size - 8 - hlen;
    if (st_parse_header(f, (const char *)f->map + 8, (size_t)hlen) != 0) {
        safetensors_close(f);
        return NULL;
    }
    return f;
}

void safetensors_close(tlm_st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_vals[i]);
    }
    free(f->meta_keys);
    free(f->meta_vals);
    free(f);
}

static const st_entry *st_find(const tlm_st_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (!strcmp(f->t[i].name, name)) return &f->t[i];
    return NULL;
}

int safetensors_read_f32(tlm_st_file *f, const char *name, float *out, size_t count) {
    const st_entry *e = st_find(f, name);
    if (!e) return tlm_errorf("tensor %s is missing from %s: the file does not match this model", name, f->path);
    if (e->numel != (uint64_t)count)
        return tlm_errorf("tensor %s in %s has %llu elements, expected %zu: the file does not match this model",
                          name, f->path, (unsigned long long)e->numel, count);
    const unsigned char *src = f->data + e->begin;
    if (!strcmp(e->dtype, "F32")) {
        if (st_host_is_le()) {
            memcpy(out, src, count * 4);
        } else {
            for (size_t i = 0; i < count; i++) {
                uint32_t b = (uint32_t)src[4 * i] | (uint32_t)src[4 * i + 1] << 8 | (uint32_t)src[4 * i + 2] << 16 |
                             (uint32_t)src[4 * i + 3] << 24;
                memcpy(&out[i], &b, 4);
            }
        }
    } else if (!strcmp(e->dtype, "BF16") || !strcmp(e->dtype, "F16")) {
        int bf = e->dtype[0] == 'B';
        for (size_t i = 0; i < count; i++) {
            uint16_t h = (uint16_t)(src[2 * i] | src[2 * i + 1] << 8);
            out[i] = bf ? st_bf16_to_f32(h) : st_f16_to_f32(h);
        }
    } else {
        return tlm_errorf("tensor %s in %s has dtype %s, which tinylm cannot read: export it as F32, BF16 or F16",
                          name, f->path, e->dtype);
    }
    return 0;
}

int safetensors_shape(tlm_st_file *f, const char *name, int64_t shape[4]) {
    const st_entry *e = st_find(f, name);
    if (!e) return tlm_errorf("tensor %s is missing from %s: the file does not match this model", name, f->path);
    for (int d = 0; d < 4; d++) shape[d] = d < e->ndim ? e->shape[d] : 0;
    return e->ndim;
}

const char *safetensors_meta(tlm_st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
    return NULL;
}
