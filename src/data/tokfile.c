#include "data/tokfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/fileio.h"
#include "util/common.h"

static const char tokfile_magic[8] = {'T', 'L', 'M', 'T', 'O', 'K', 'S', 0};

#define TOKFILE_FIX "re-run `tinylm prepare`"

static void tokfile_put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void tokfile_put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t tokfile_get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t tokfile_get_u64(const unsigned char *p) {
    return (uint64_t)tokfile_get_u32(p) | (uint64_t)tokfile_get_u32(p + 4) << 32;
}

/* Encode tokens[0..n) little-endian at width w into buf. */
static void tokfile_encode(unsigned char *buf, const int32_t *tokens, size_t n, int w) {
    for (size_t i = 0; i < n; i++) {
        uint32_t t = (uint32_t)tokens[i];
        for (int k = 0; k < w; k++) buf[i * (size_t)w + (size_t)k] = (unsigned char)(t >> (8 * k));
    }
}

int tokfile_write(const char *path, const int32_t *tokens, uint64_t count, int vocab, uint64_t ndocs) {
    if (vocab <= 0) return tlm_errorf("cannot write %s: vocab size %d must be positive", path, vocab);
    int w = vocab <= 65536 ? 2 : 4;
    /* The payload is encoded twice in chunks (checksum pass, write pass):
     * cheaper than holding a second full copy of a large corpus, and the
     * header with its checksum can then be written first. */
    enum { CHUNK = 1 << 16 };
    unsigned char *buf = malloc((size_t)CHUNK * 4);
    if (!buf) return tlm_errorf("out of memory writing %s", path);
    uint64_t sum = TLM_FNV_INIT;
    for (uint64_t s = 0; s < count; s += CHUNK) {
        size_t m = (size_t)(count - s < CHUNK ? count - s : CHUNK);
        for (size_t i = 0; i < m; i++) {
            int32_t t = tokens[s + i];
            if (t < 0 || t >= vocab) {
                free(buf);
                return tlm_errorf("cannot write %s: token %d at position %llu is outside the vocabulary of %d", path,
                                  (int)t, (unsigned long long)(s + i), vocab);
            }
        }
        tokfile_encode(buf, tokens + s, m, w);
        sum = tlm_fnv1a64(buf, m * (size_t)w, sum);
    }

    unsigned char h[TLM_TOKFILE_HEADER];
    memset(h, 0, sizeof h);
    memcpy(h, tokfile_magic, 8);
    tokfile_put_u32(h + 8, TLM_TOKFILE_VERSION);
    tokfile_put_u32(h + 12, (uint32_t)vocab);
    tokfile_put_u32(h + 16, (uint32_t)w);
    tokfile_put_u64(h + 24, count);
    tokfile_put_u64(h + 32, ndocs);
    tokfile_put_u64(h + 40, sum);

    tlm_atomic_file f;
    if (atomic_open(&f, path) != 0) {
        free(buf);
        return -1;
    }
    int rc = atomic_write(&f, h, sizeof h);
    for (uint64_t s = 0; rc == 0 && s < count; s += CHUNK) {
        size_t m = (size_t)(count - s < CHUNK ? count - s : CHUNK);
        tokfile_encode(buf, tokens + s, m, w);
        rc = atomic_write(&f, buf, m * (size_t)w);
    }
    free(buf);
    if (rc != 0) {
        atomic_abort(&f);
        return -1;
    }
    return atomic_commit(&f);
}

int tokfile_open(tlm_tokfile *f, const char *path) {
    memset(f, 0, sizeof *f);
    snprintf(f->path, sizeof f->path, "%s", path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT) return tlm_errorf("token file %s not found: run `tinylm prepare` first (or check --data)", path);
        return tlm_errorf("cannot open token file %s: %s: check the path or " TOKFILE_FIX, path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return tlm_errorf("token file %s is not a regular file: check --data or " TOKFILE_FIX, path);
    }
    size_t size = (size_t)st.st_size;
    if (size < TLM_TOKFILE_HEADER) {
        close(fd);
        return tlm_errorf("token file %s is %zu bytes, shorter than its %d-byte header (truncated): " TOKFILE_FIX,
                          path, size, TLM_TOKFILE_HEADER);
    }
    void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return tlm_errorf("cannot map token file %s: %s", path, strerror(errno));
    const unsigned char *h = m;
    int rc = 0;
    uint32_t version = tokfile_get_u32(h + 8), vocab = tokfile_get_u32(h + 12), w = tokfile_get_u32(h + 16);
    uint64_t count = tokfile_get_u64(h + 24), ndocs = tokfile_get_u64(h + 32), sum = tokfile_get_u64(h + 40);
    uint64_t payload = size - TLM_TOKFILE_HEADER;
    if (memcmp(h, tokfile_magic, 8) != 0)
        rc = tlm_errorf("%s is not a tinylm token file (bad magic): " TOKFILE_FIX, path);
    else if (version != TLM_TOKFILE_VERSION)
        rc = tlm_errorf("token file %s has version %u but this tinylm reads version %d: " TOKFILE_FIX, path, version,
                        TLM_TOKFILE_VERSION);
    else if (vocab == 0 || vocab > (uint32_t)INT32_MAX)
        rc = tlm_errorf("token file %s has an invalid vocab size %u: " TOKFILE_FIX, path, vocab);
    else if (w != 2 && w != 4)
        rc = tlm_errorf("token file %s has %u bytes per token (expected 2 or 4): " TOKFILE_FIX, path, w);
    else if (w == 2 && vocab > 65536)
        rc = tlm_errorf("token file %s stores 2-byte tokens for a vocab of %u: " TOKFILE_FIX, path, vocab);
    else if (count > payload / w || count * w != payload)
        rc = tlm_errorf("token file %s should hold %llu tokens (%llu bytes) but has %llu payload bytes "
                        "(truncated or damaged): " TOKFILE_FIX,
                        path, (unsigned long long)count, (unsigned long long)count * w, (unsigned long long)payload);
    else if (tlm_fnv1a64(h + TLM_TOKFILE_HEADER, (size_t)payload, TLM_FNV_INIT) != sum)
        rc = tlm_errorf("token file %s fails its checksum (corrupt): " TOKFILE_FIX, path);
    if (rc != 0) {
        munmap(m, size);
        return rc;
    }
    f->vocab = (int)vocab;
    f->token_bytes = (int)w;
    f->count = count;
    f->ndocs = ndocs;
    f->map = m;
    f->map_len = size;
    f->tokens = h + TLM_TOKFILE_HEADER;
    return 0;
}

void tokfile_close(tlm_tokfile *f) {
    if (f->map) munmap(f->map, f->map_len);
    memset(f, 0, sizeof *f);
}
