/* File helpers: whole-file reads and crash-safe writes. */
#ifndef TLM_IO_FILEIO_H
#define TLM_IO_FILEIO_H

#include <stddef.h>
#include <stdio.h>

/* Read a whole file (malloc'd, NUL-terminated; *len excludes the NUL).
 * Errors name the path. */
char *file_read_all(const char *path, size_t *len);

/* Atomic write: data goes to PATH.tmp.<pid> in the same folder, is flushed
 * and fsync'd, renamed over PATH, then the folder is fsync'd. On any
 * failure (disk full, read-only folder) the temp file is removed, the old
 * PATH is untouched, and the error names PATH and the cause. */
typedef struct {
    FILE *fp;
    char path[1024];
    char tmp[1100];
    int failed;
} tlm_atomic_file;

int atomic_open(tlm_atomic_file *f, const char *path);
int atomic_write(tlm_atomic_file *f, const void *data, size_t n);  /* -1 + error */
int atomic_commit(tlm_atomic_file *f);  /* flush, fsync, rename, fsync dir */
void atomic_abort(tlm_atomic_file *f);  /* remove the temp file */
/* One-shot convenience. */
int file_write_atomic(const char *path, const void *data, size_t n);

/* mkdir -p; error names the path. */
int dir_create(const char *path);
int path_exists(const char *path);
int path_is_dir(const char *path);
/* Join a folder and a file name into out. */
const char *path_join(char *out, size_t n, const char *dir, const char *name);

#endif
