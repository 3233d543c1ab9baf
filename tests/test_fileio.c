/* fileio: whole-file reads, atomic writes that never damage the old file,
 * mkdir -p, path helpers. Tests run as root, so failures are simulated with
 * RLIMIT_FSIZE (disk full -> EFBIG), a path under a regular file (ENOTDIR)
 * and a path under /proc (not writable). */
#include "testutil.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "io/fileio.h"
#include "util/common.h"

/* Number of entries in dir whose name contains ".tmp." (leftover temps). */
static int count_temps(const char *dir) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp.")) n++;
    closedir(d);
    return n;
}

static void test_write_and_replace(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char path[1024];
    path_join(path, sizeof path, dir, "a.txt");
    assert_false(path_exists(path));
    assert_int_equal(file_write_atomic(path, "hello", 5), 0);
    assert_true(path_exists(path));
    assert_false(path_is_dir(path));
    size_t len = 0;
    char *s = file_read_all(path, &len);
    assert_non_null(s);
    assert_int_equal(len, 5);
    assert_string_equal(s, "hello");
    free(s);

    /* Replace with longer content written in several pieces. */
    tlm_atomic_file f;
    assert_int_equal(atomic_open(&f, path), 0);
    assert_int_equal(atomic_write(&f, "second ", 7), 0);
    assert_int_equal(atomic_write(&f, "", 0), 0);
    assert_int_equal(atomic_write(&f, "version", 7), 0);
    /* Until commit, readers still see the old file. */
    s = file_read_all(path, &len);
    assert_string_equal(s, "hello");
    free(s);
    assert_int_equal(atomic_commit(&f), 0);
    s = file_read_all(path, &len);
    assert_int_equal(len, 14);
    assert_string_equal(s, "second version");
    free(s);

    /* Empty file. */
    assert_int_equal(file_write_atomic(path, NULL, 0), 0);
    s = file_read_all(path, &len);
    assert_non_null(s);
    assert_int_equal(len, 0);
    assert_string_equal(s, "");
    free(s);

    /* Binary data larger than the stdio buffer survives byte-exact. */
    size_t big = 300000;
    unsigned char *data = malloc(big);
    for (size_t i = 0; i < big; i++) data[i] = (unsigned char)(i * 131u + (i >> 9));
    assert_int_equal(file_write_atomic(path, data, big), 0);
    unsigned char *back = (unsigned char *)file_read_all(path, &len);
    assert_int_equal(len, big);
    assert_memory_equal(back, data, big);
    free(back);
    free(data);

    assert_int_equal(count_temps(dir), 0);
    test_rmtree(dir);
    free(dir);
}

static void test_abort_keeps_old(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char path[1024];
    path_join(path, sizeof path, dir, "keep.txt");
    assert_int_equal(file_write_atomic(path, "old", 3), 0);
    tlm_atomic_file f;
    assert_int_equal(atomic_open(&f, path), 0);
    assert_int_equal(atomic_write(&f, "new!", 4), 0);
    assert_int_equal(count_temps(dir), 1);
    atomic_abort(&f);
    atomic_abort(&f); /* idempotent */
    assert_int_equal(count_temps(dir), 0);
    size_t len;
    char *s = file_read_all(path, &len);
    assert_string_equal(s, "old");
    free(s);
    test_rmtree(dir);
    free(dir);
}

/* Disk full: the file size limit makes write() fail with EFBIG part way. */
static void test_disk_full_keeps_old(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char path[1024];
    path_join(path, sizeof path, dir, "model.bin");
    assert_int_equal(file_write_atomic(path, "old content", 11), 0);

    size_t big = 1 << 20;
    char *data = malloc(big);
    memset(data, 'x', big);

    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = old;
    lim.rlim_cur = 10000;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);

    int rc1 = file_write_atomic(path, data, big);
    char err1[1024];
    snprintf(err1, sizeof err1, "%s", tlm_last_error());

    /* Piecewise writes: the failure may surface in write or in commit. */
    tlm_atomic_file f;
    int rc2 = atomic_open(&f, path);
    for (int i = 0; i < 64 && rc2 == 0; i++) rc2 = atomic_write(&f, data, 4096);
    if (rc2 == 0) rc2 = atomic_commit(&f);
    else {
        assert_int_equal(atomic_commit(&f), -1); /* a failed file never commits */
        atomic_abort(&f);
    }
    char err2[1024];
    snprintf(err2, sizeof err2, "%s", tlm_last_error());

    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev);

    assert_int_equal(rc1, -1);
    assert_int_equal(rc2, -1);
    assert_non_null(strstr(err1, path));
    assert_non_null(strstr(err1, strerror(EFBIG)));
    assert_non_null(strstr(err1, "free disk space"));
    assert_null(strchr(err1, '\n'));
    assert_non_null(strstr(err2, path));

    size_t len;
    char *s = file_read_all(path, &len);
    assert_non_null(s);
    assert_string_equal(s, "old content");
    free(s);
    assert_int_equal(count_temps(dir), 0);
    free(data);
    test_rmtree(dir);
    free(dir);
}

static void test_unwritable_folders(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char file[1024], under[1100];
    path_join(file, sizeof file, dir, "plain");
    assert_int_equal(file_write_atomic(file, "x", 1), 0);
    /* A path below a regular file: ENOTDIR. */
    snprintf(under, sizeof under, "%s/out.bin", file);
    assert_int_equal(file_write_atomic(under, "data", 4), -1);
    assert_non_null(strstr(tlm_last_error(), under));
    assert_non_null(strstr(tlm_last_error(), strerror(ENOTDIR)));
    assert_non_null(strstr(tlm_last_error(), "--out"));
    /* /proc does not accept new files. */
    assert_int_equal(file_write_atomic("/proc/tinylm-test-file.bin", "data", 4), -1);
    assert_non_null(strstr(tlm_last_error(), "/proc/tinylm-test-file.bin"));
    assert_false(path_exists("/proc/tinylm-test-file.bin"));
    /* dir_create cannot go through a file either. */
    snprintf(under, sizeof under, "%s/sub/dir", file);
    assert_int_equal(dir_create(under), -1);
    assert_non_null(strstr(tlm_last_error(), under));
    /* Reading a missing file names it. */
    snprintf(under, sizeof under, "%s/missing.txt", dir);
    size_t len = 7;
    assert_null(file_read_all(under, &len));
    assert_int_equal(len, 0);
    assert_non_null(strstr(tlm_last_error(), under));
    /* Reading a folder fails cleanly. */
    assert_null(file_read_all(dir, NULL));
    assert_non_null(strstr(tlm_last_error(), dir));
    test_rmtree(dir);
    free(dir);
}

static void test_dir_create(void **state) {
    (void)state;
    char *dir = test_tmpdir();
    char p[1024];
    snprintf(p, sizeof p, "%s/a/b//c/", dir);
    assert_int_equal(dir_create(p), 0);
    assert_int_equal(dir_create(p), 0); /* existing is fine */
    snprintf(p, sizeof p, "%s/a/b/c", dir);
    assert_true(path_is_dir(p));
    snprintf(p, sizeof p, "%s/a", dir);
    assert_true(path_is_dir(p));
    /* A file in the way. */
    char f[1024];
    snprintf(f, sizeof f, "%s/a/file", dir);
    assert_int_equal(file_write_atomic(f, "x", 1), 0);
    assert_int_equal(dir_create(f), -1);
    assert_non_null(strstr(tlm_last_error(), f));
    test_rmtree(dir);
    free(dir);
}

static void test_path_join(void **state) {
    (void)state;
    char out[64];
    assert_string_equal(path_join(out, sizeof out, "runs/x", "config.json"), "runs/x/config.json");
    assert_string_equal(path_join(out, sizeof out, "runs/x/", "config.json"), "runs/x/config.json");
    assert_string_equal(path_join(out, sizeof out, "", "config.json"), "config.json");
    assert_string_equal(path_join(out, sizeof out, "runs", "/abs/file"), "/abs/file");
    char tiny[8];
    path_join(tiny, sizeof tiny, "abcdef", "ghij");
    assert_int_equal(strlen(tiny), 7); /* truncated, still terminated */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_write_and_replace), cmocka_unit_test(test_abort_keeps_old),
        cmocka_unit_test(test_disk_full_keeps_old), cmocka_unit_test(test_unwritable_folders),
        cmocka_unit_test(test_dir_create), cmocka_unit_test(test_path_join),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
