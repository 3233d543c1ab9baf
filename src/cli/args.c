/* Flag parsing shared by the subcommands: strict numbers, one-line errors,
 * and the table-driven parser every subcommand uses. */
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

/* ---- table-driven flag parsing ---------------------------------------------------- */

static const cli_flag *find_flag(const char *arg, const cli_flag *flags, int nflags) {
    for (int k = 0; k < nflags; k++)
        if (cli_is_flag(arg, flags[k].name)) return &flags[k];
    return NULL;
}

/* Store one value; 0, or -1 after the parse helper printed the error. */
static int store_value(const char *cmd, const cli_flag *f, const char *v) {
    long l;
    switch (f->type) {
    case CLI_INT:
        if (cli_parse_int(cmd, f->name, v, f->lo, f->hi, &l)) return -1;
        *f->dest.i = (int)l;
        return 0;
    case CLI_LONG: return cli_parse_int(cmd, f->name, v, f->lo, f->hi, f->dest.l);
    case CLI_DOUBLE: return cli_parse_float(cmd, f->name, v, f->flo, f->fhi, f->dest.d);
    case CLI_DURATION: return cli_parse_duration(cmd, f->name, v, f->dest.d);
    case CLI_STRING: *f->dest.s = v; return 0;
    case CLI_CUSTOM: return f->parse(cmd, f->name, v, f->dest.p);
    case CLI_SWITCH: break; /* handled by the caller: takes no value */
    }
    return -1;
}

int cli_parse_flags(const char *cmd, int argc, char **argv, const cli_flag *flags, int nflags,
                    void (*usage)(FILE *)) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return CLI_PARSE_HELP;
        }
        const cli_flag *f = find_flag(a, flags, nflags);
        if (!f) {
            if (nflags == 0)
                fprintf(stderr, "tinylm %s: error: unknown flag '%s': tinylm %s takes no flags\n", cmd, a, cmd);
            else
                fprintf(stderr, "tinylm %s: error: unknown flag '%s': see tinylm %s --help\n", cmd, a, cmd);
            return CLI_PARSE_ERROR;
        }
        if (f->type == CLI_SWITCH) {
            if (a[strlen(f->name)] == '=') {
                fprintf(stderr, "tinylm %s: error: flag %s takes no value, got '%s'\n", cmd, f->name, a);
                return CLI_PARSE_ERROR;
            }
            *f->dest.i = 1;
        } else {
            const char *v = cli_flag_value(cmd, argc, argv, &i);
            if (!v || store_value(cmd, f, v)) return CLI_PARSE_ERROR;
        }
        if (f->given) *f->given = 1;
    }
    return CLI_PARSE_OK;
}

void cli_model_apply(const cli_model_flags *m, tlm_config *c) {
    if (m->vocab) c->vocab = (int)m->vocab;
    if (m->dim) c->dim = (int)m->dim;
    if (m->layers) c->layers = (int)m->layers;
    if (m->heads) c->heads = (int)m->heads;
    if (m->hidden) c->hidden = (int)m->hidden;
    if (m->context) c->context = (int)m->context;
}
