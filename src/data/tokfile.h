/*
 * Token files (train.bin, val.bin): a fixed 64-byte little-endian header,
 * then the tokens.
 *
 *   offset size field
 *   0      8    magic "TLMTOKS\0"
 *   8      4    version (1)
 *   12     4    vocab size
 *   16     4    bytes per token (2 if vocab <= 65536, else 4)
 *   20     4    reserved (0)
 *   24     8    token count
 *   32     8    document count
 *   40     8    FNV-1a 64 checksum of the payload bytes
 *   48     16   reserved (0)
 *   64     ...  tokens, little-endian, unsigned
 *
 * Readers memory-map the file and check size, magic, version and the
 * checksum before use.
 */
#ifndef TLM_DATA_TOKFILE_H
#define TLM_DATA_TOKFILE_H

#include <stddef.h>
#include <stdint.h>

#define TLM_TOKFILE_HEADER 64
#define TLM_TOKFILE_VERSION 1

typedef struct {
    int vocab;
    int token_bytes;
    uint64_t count;
    uint64_t ndocs;
    const void *tokens;   /* mapped payload */
    void *map; size_t map_len;
    char path[1024];
} tlm_tokfile;

/* Write atomically (temp file, fsync, rename). */
int tokfile_write(const char *path, const int32_t *tokens, uint64_t count, int vocab, uint64_t ndocs);
/* Map and validate (size, magic, version, checksum, every token < vocab
 * is NOT re-scanned: the checksum covers it). Error names the file. */
int tokfile_open(tlm_tokfile *f, const char *path);
void tokfile_close(tlm_tokfile *f);
/* Token i as int32. */
static inline int32_t tokfile_get(const tlm_tokfile *f, uint64_t i) {
    if (f->token_bytes == 2) return (int32_t)((const uint16_t *)f->tokens)[i];
    return (int32_t)((const uint32_t *)f->tokens)[i];
}

#endif
