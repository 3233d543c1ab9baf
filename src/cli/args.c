/* Flag parsing shared by the subcommands: strict numbers, one-line errors. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

int cli_fail(const char *cmd, const char *msg) {
    fprintf(stderr, "tinylm %s: error: %s\n", cmd, msg);
    return 1;
}

int cli_is_flag(const char *arg, const char *flag) {
    size_t n = strlen(flag);
    return !strncmp(arg, flag, n) && (arg[n] == '\0' || arg[n] == '=');
}

const char *cli_flag_value(const char *cmd, int argc, char **argv, int *i) {
    const char *eq = strchr(argv[*i], '=');
    if (eq && !strncmp(argv[*i], "--", 2)) return eq + 1;
    if (*i + 1 >= argc) {
        fprintf(stderr, "tinylm %s: error: flag %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    (*i)++;
    return argv[*i];
}

int cli_parse_int(const char *cmd, const char *flag, const char *val, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(val, &end, 10);
    if (errno || end == val || *end != '\0') {
        fprintf(stderr, "tinylm %s: error: %s expects an integer, got '%s'\n", cmd, flag, val);
        return -1;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "tinylm %s: error: %s %ld is out of range: use a value from %ld to %ld\n", cmd, flag, v,
                lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_float(const char *cmd, const char *flag, const char *val, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(val, &end);
    if (errno || end == val || *end != '\0' || !isfinite(v)) {
        fprintf(stderr, "tinylm %s: error: %s expects a number, got '%s'\n", cmd, flag, val);
        return -1;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "tinylm %s: error: %s %g is out of range: use a value from %g to %g\n", cmd, flag, v, lo,
                hi);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_duration(const char *cmd, const char *flag, const char *val, double *out) {
    char *end;
    errno = 0;
    double v = strtod(val, &end);
    double mul = 1;
    if (!errno && end != val) {
        if (!strcmp(end, "") || !strcmp(end, "s")) mul = 1;
        else if (!strcmp(end, "m")) mul = 60;
        else if (!strcmp(end, "h")) mul = 3600;
        else end = NULL;
    } else {
        end = NULL;
    }
    if (!end || !isfinite(v) || v <= 0) {
        fprintf(stderr, "tinylm %s: error: %s expects a positive duration like 90s, 5m or 1.5h, got '%s'\n", cmd,
                flag, val);
        return -1;
    }
    *out = v * mul;
    return 0;
}
