#include "io/fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "util/common.h"

/* The fix depends on the cause: a full disk wants space freed, a missing or
 * read-only folder wants another destination. */
static const char *fileio_fix(int err) {
    switch (err) {
    case ENOSPC:
    case EFBIG:
#ifdef EDQUOT
    case EDQUOT:
#endif
        return "free disk space or choose another --out";
    default:
        return "choose another --out (its folder must exist and be writable), or free disk space";
    }
}

char *file_read_all(const char *path, size_t *len) {
    if (len) *len = 0;
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        tlm_errorf("cannot read %s: %s: check the path", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(fp), &st) != 0) {
        int e = errno;
        fclose(fp);
        tlm_errorf("cannot read %s: %s: check the path", path, strerror(e));
        return NULL;
    }
    if (S_ISDIR(st.st_mode)) {
        fclose(fp);
        tlm_errorf("cannot read %s: it is a folder, not a file: check the path", path);
        return NULL;
    }
    /* Grow as we go rather than trusting st_size: pipes and /proc files
     * report 0 and files may change under us. */
    /* +2: room for the NUL and for the final zero-byte read that sees EOF
     * without growing the buffer. */
    size_t cap = st.st_size > 0 ? (size_t)st.st_size + 2 : 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        fclose(fp);
        tlm_errorf("out of memory reading %s", path);
        return NULL;
    }
    for (;;) {
        if (n + 1 >= cap) {
            size_t ncap = cap * 2;
            char *nb = realloc(buf, ncap);
            if (!nb) {
                free(buf);
                fclose(fp);
                tlm_errorf("out of memory reading %s", path);
                return NULL;
            }
            buf = nb;
            cap = ncap;
        }
        size_t r = fread(buf + n, 1, cap - 1 - n, fp);
        n += r;
        if (r == 0) break;
    }
    if (ferror(fp)) {
        int e = errno;
        free(buf);
        fclose(fp);
        tlm_errorf("cannot read %s: %s: check the path", path, strerror(e));
        return NULL;
    }
    fclose(fp);
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

/* Close and remove the temp file after a failure; keeps the first error. */
static int atomic_fail(tlm_atomic_file *f, int err) {
    if (f->fp) {
        fclose(f->fp);
        f->fp = NULL;
    }
    if (f->tmp[0]) unlink(f->tmp);
    f->tmp[0] = 0;
    f->failed = 1;
    return tlm_errorf("cannot write %s: %s: %s", f->path, strerror(err), fileio_fix(err));
}

int atomic_open(tlm_atomic_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    f->failed = 1;
    if (!path || !*path) return tlm_errorf("cannot write a file with an empty path: choose another --out");
    size_t plen = strlen(path);
    if (plen >= sizeof f->path) return tlm_errorf("cannot write %s: path is too long: choose a shorter --out", path);
    memcpy(f->path, path, plen + 1);
    /* The temp file sits beside the target so rename() never crosses
     * filesystems (which would make it a non-atomic copy). */
    snprintf(f->tmp, sizeof f->tmp, "%s.tmp.%ld", path, (long)getpid());
    f->fp = fopen(f->tmp, "wb");
    if (!f->fp) {
        int e = errno;
        f->tmp[0] = 0; /* nothing was created, nothing to remove */
        return atomic_fail(f, e);
    }
    f->failed = 0;
    return 0;
}

int atomic_write(tlm_atomic_file *f, const void *data, size_t n) {
    if (f->failed || !f->fp) return -1; /* the first error is already set */
    if (n == 0) return 0;
    errno = 0;
    if (fwrite(data, 1, n, f->fp) != n) return atomic_fail(f, errno ? errno : EIO);
    return 0;
}

/* fsync the folder holding path so the rename itself survives a crash. */
static int fileio_sync_dir(const char *path) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == dir) dir[1] = 0;
    else *slash = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    /* Some filesystems cannot fsync a folder (EINVAL); nothing more to do. */
    if (rc != 0 && e == EINVAL) rc = 0;
    errno = e;
    return rc;
}

int atomic_commit(tlm_atomic_file *f) {
    if (f->failed || !f->fp) return -1;
    errno = 0;
    if (fflush(f->fp) != 0) return atomic_fail(f, errno ? errno : EIO);
    if (fsync(fileno(f->fp)) != 0) return atomic_fail(f, errno);
    FILE *fp = f->fp;
    f->fp = NULL;
    if (fclose(fp) != 0) return atomic_fail(f, errno ? errno : EIO);
    if (rename(f->tmp, f->path) != 0) return atomic_fail(f, errno);
    f->tmp[0] = 0; /* the temp file is now the target */
    if (fileio_sync_dir(f->path) != 0) {
        f->failed = 1;
        return tlm_errorf("wrote %s but could not sync its folder: %s: check the disk", f->path,
                          strerror(errno));
    }
    f->failed = 1; /* closed: further writes are refused */
    return 0;
}

void atomic_abort(tlm_atomic_file *f) {
    if (f->fp) {
        fclose(f->fp);
        f->fp = NULL;
    }
    if (f->tmp[0]) unlink(f->tmp);
    f->tmp[0] = 0;
    f->failed = 1;
}

int file_write_atomic(const char *path, const void *data, size_t n) {
    tlm_atomic_file f;
    if (atomic_open(&f, path) != 0) return -1;
    if (atomic_write(&f, data, n) != 0) return -1;
    return atomic_commit(&f);
}

int dir_create(const char *path) {
    if (!path || !*path) return tlm_errorf("cannot create a folder with an empty path: choose another --out");
    char buf[1024];
    size_t len = strlen(path);
    if (len >= sizeof buf) return tlm_errorf("cannot create folder %s: path is too long: choose a shorter --out", path);
    memcpy(buf, path, len + 1);
    /* Create each prefix in turn; an existing folder is fine, an existing
     * file in the way is not. */
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        char saved = buf[i];
        buf[i] = 0;
        if (mkdir(buf, 0777) != 0) {
            int e = errno;
            struct stat st;
            if (e != EEXIST || stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
                if (e == EEXIST) e = ENOTDIR;
                return tlm_errorf("cannot create folder %s: %s (at %s): %s", path, strerror(e), buf, fileio_fix(e));
            }
        }
        buf[i] = saved;
        while (buf[i] == '/' && buf[i + 1] == '/') i++; /* collapse "a//b" */
    }
    return 0;
}

int path_exists(const char *path) {
    struct stat st;
    return path && stat(path, &st) == 0;
}

int path_is_dir(const char *path) {
    struct stat st;
    return path && stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

const char *path_join(char *out, size_t n, const char *dir, const char *name) {
    if (!dir || !*dir || (name && name[0] == '/')) {
        snprintf(out, n, "%s", name ? name : "");
        return out;
    }
    size_t dl = strlen(dir);
    snprintf(out, n, "%s%s%s", dir, dir[dl - 1] == '/' ? "" : "/", name ? name : "");
    return out;
}
