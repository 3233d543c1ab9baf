/*
 * Byte-level BPE tokenizer (GPT-2 style), trained and used natively.
 *
 * Pre-tokenization: the GPT-2 regex with Unicode classes via PCRE2
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * (\s is the Unicode White_Space set, as in the `tokenizers` library). Text
 * that is not valid UTF-8 is handled bytewise: valid runs are split by the
 * regex, and each byte outside them is a piece of its own, so every byte
 * string encodes and decode(encode(x)) == x.
 * Each piece's bytes are mapped to the GPT-2 byte-to-unicode alphabet; id b
 * (0..255) is the single byte b, then one id per merge in rank order, then
 * the special token <|endoftext|> last (id vocab-1). Saved as a Hugging Face tokenizer.json (model type
 * "BPE", pre_tokenizer/decoder "ByteLevel") that the `tokenizers` library
 * loads.
 */
#ifndef TLM_TEXT_TOKENIZER_H
#define TLM_TEXT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "tinylm/tinylm.h"

#define TLM_EOT_TEXT "<|endoftext|>"

/* Progress callback for long work: done/total in bytes or merges; may be NULL. */
typedef void (*tlm_progress_fn)(void *user, const char *stage, double done, double total);

/* Train on a set of documents (each a byte string, any content, not
 * necessarily valid UTF-8). vocab_size includes the 256 byte tokens and the
 * end-of-text token. Deterministic: ties between equally frequent pairs go
 * to the lexicographically smallest pair of token ids' byte strings
 * (compare the left tokens' bytes, then the right ones'; memcmp order, a
 * prefix first). Pieces never span documents. progress stages:
 * "pre-tokenize" (bytes) and "merges". Fails (NULL + error) if vocab_size
 * is outside 257..2^24 or the text has too few distinct pairs for it. */
tlm_tokenizer *tokenizer_train(const char *const *docs, const size_t *lens, size_t ndocs, int vocab_size,
                               tlm_progress_fn progress, void *user);

int tokenizer_save(const tlm_tokenizer *t, const char *path);   /* tokenizer.json, atomic */
/* Load a tokenizer.json: ours, or any byte-level BPE from `tokenizers` whose
 * ids run 0..V-1 and that has the <|endoftext|> added token (merges as
 * "a b" or ["a", "b"]). Ids then follow the file. NULL + a one-line error
 * naming the path and the fault (missing file, not JSON, not a byte-level
 * BPE, bad or duplicate ids, merges naming unknown tokens, no special token). */
tlm_tokenizer *tokenizer_load(const char *path);
void tokenizer_free(tlm_tokenizer *t);

int tokenizer_vocab_size(const tlm_tokenizer *t);
int tokenizer_eot_id(const tlm_tokenizer *t);

/* Encode bytes (no special-token parsing: "<|endoftext|>" in text is plain
 * text). Returns the number of tokens written; if it exceeds cap, returns
 * the count needed and writes only cap. Thread-safe on a shared tokenizer. */
size_t tokenizer_encode(const tlm_tokenizer *t, const char *text, size_t len, int32_t *out, size_t cap);

/* Decode tokens to bytes (malloc'd, NUL-terminated, *len set). The special
 * token decodes to its text. Invalid ids are an error. */
char *tokenizer_decode(const tlm_tokenizer *t, const int32_t *ids, size_t n, size_t *len);

/* The byte string of one token id (not NUL-terminated), NULL if invalid. */
const unsigned char *tokenizer_token_bytes(const tlm_tokenizer *t, int id, size_t *len);

/* Encode many documents in parallel (OpenMP; large documents are also cut
 * at points where the pre-tokenizer is known to split, so the result equals
 * encoding each document alone). Returns the malloc'd tokens of all
 * documents in order, each followed by the end-of-text id if add_eot;
 * *ntokens is their count. doc_offsets (may be NULL) receives ndocs+1
 * entries: document i's tokens (and its end-of-text) are
 * [doc_offsets[i], doc_offsets[i+1]). progress gets stage "encode" in bytes.
 * NULL + error on failure (out of memory). */
int32_t *tokenizer_encode_many(const tlm_tokenizer *t, const char *const *docs, const size_t *lens, size_t ndocs,
                               int add_eot, size_t *doc_offsets, size_t *ntokens, tlm_progress_fn progress,
                               void *user);

/* Merges in rank order: merge `rank` joins tokens left and right into
 * result (for trained tokenizers result = 256 + rank). -1 + error if rank
 * is out of range. Any pointer may be NULL. */
int tokenizer_merge_count(const tlm_tokenizer *t);
int tokenizer_merge(const tlm_tokenizer *t, int rank, int *left, int *right, int *result);

#endif
