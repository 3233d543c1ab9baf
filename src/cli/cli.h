/* Subcommands: one file each. Each returns the process exit code. The CLI is
 * the only layer that prints; libraries return errors via tlm_last_error(). */
#ifndef TLM_CLI_CLI_H
#define TLM_CLI_CLI_H

#include <stdio.h>

#include "model/config.h"

int cmd_prepare(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_bench(int argc, char **argv);
/* encode and decode share one file; argv[0] says which. */
int cmd_encode(int argc, char **argv);

/* Print "tinylm <cmd>: error: <msg>" on one line to stderr; returns 1. */
int cli_fail(const char *cmd, const char *msg);

/* Shared flag parsing helpers: each returns 0 and sets *out, or prints a
 * one-line error naming the flag and returns -1. */
int cli_parse_int(const char *cmd, const char *flag, const char *val, long lo, long hi, long *out);
int cli_parse_float(const char *cmd, const char *flag, const char *val, double lo, double hi, double *out);
/* Durations: "90", "90s", "5m", "1.5h" -> seconds. */
int cli_parse_duration(const char *cmd, const char *flag, const char *val, double *out);
/* Fetch the value of a flag at argv[*i] ("--flag VALUE" or "--flag=VALUE");
 * advances *i. Returns NULL after printing an error if the value is missing. */
const char *cli_flag_value(const char *cmd, int argc, char **argv, int *i);
/* Does argv[i] name `flag` (either "--flag" or "--flag=...")? */
int cli_is_flag(const char *arg, const char *flag);

/* ---- table-driven flag parsing -------------------------------------------------
 *
 * Each subcommand describes its flags as an array of cli_flag and hands it to
 * cli_parse_flags, so every command accepts "--flag VALUE" and "--flag=VALUE",
 * -h/--help, and reports unknown flags, missing values and bad or
 * out-of-range numbers with the same one-line errors. Build entries with the
 * CLI_FLAG_* macros: the destination pointer is checked against the type. */

typedef enum {
    CLI_INT,      /* int, lo..hi (a range inside int) */
    CLI_LONG,     /* long, lo..hi */
    CLI_DOUBLE,   /* double, flo..fhi */
    CLI_STRING,   /* const char *, pointing into argv */
    CLI_DURATION, /* double seconds: "90", "90s", "5m", "1.5h" */
    CLI_SWITCH,   /* int set to 1; takes no value */
    CLI_CUSTOM,   /* parse(cmd, name, value, dest.p) */
} cli_flag_type;

typedef struct {
    const char *name; /* "--batch" */
    cli_flag_type type;
    union {
        int *i; /* CLI_INT, CLI_SWITCH */
        long *l;
        double *d; /* CLI_DOUBLE, CLI_DURATION */
        const char **s;
        void *p; /* CLI_CUSTOM: passed to parse */
    } dest;
    /* Set to 1 when the flag appears (may be NULL): lets a caller tell a
     * typed value from its default, e.g. so --resume keeps saved values. */
    int *given;
    long lo, hi;     /* CLI_INT, CLI_LONG: inclusive range */
    double flo, fhi; /* CLI_DOUBLE: inclusive range */
    /* CLI_CUSTOM: returns 0, or -1 after printing one error line. */
    int (*parse)(const char *cmd, const char *flag, const char *val, void *dest);
} cli_flag;

/* (Parameter names are capitals so that they cannot replace the member
 * names in the designators.) */
#define CLI_FLAG_INT(NAME, DEST, GIVEN, LO, HI) \
    {.name = (NAME), .type = CLI_INT, .dest.i = (DEST), .given = (GIVEN), .lo = (LO), .hi = (HI)}
#define CLI_FLAG_LONG(NAME, DEST, GIVEN, LO, HI) \
    {.name = (NAME), .type = CLI_LONG, .dest.l = (DEST), .given = (GIVEN), .lo = (LO), .hi = (HI)}
#define CLI_FLAG_DOUBLE(NAME, DEST, GIVEN, LO, HI) \
    {.name = (NAME), .type = CLI_DOUBLE, .dest.d = (DEST), .given = (GIVEN), .flo = (LO), .fhi = (HI)}
#define CLI_FLAG_STRING(NAME, DEST, GIVEN) {.name = (NAME), .type = CLI_STRING, .dest.s = (DEST), .given = (GIVEN)}
#define CLI_FLAG_DURATION(NAME, DEST, GIVEN) \
    {.name = (NAME), .type = CLI_DURATION, .dest.d = (DEST), .given = (GIVEN)}
#define CLI_FLAG_SWITCH(NAME, DEST) {.name = (NAME), .type = CLI_SWITCH, .dest.i = (DEST)}
#define CLI_FLAG_CUSTOM(NAME, PARSE, DEST, GIVEN) \
    {.name = (NAME), .type = CLI_CUSTOM, .dest.p = (DEST), .given = (GIVEN), .parse = (PARSE)}

/* The number of entries of a flag table (an array, not a pointer). */
#define CLI_NFLAGS(table) ((int)(sizeof(table) / sizeof((table)[0])))

/* What cli_parse_flags returns. */
enum {
    CLI_PARSE_OK = 0,
    CLI_PARSE_HELP = 1,   /* usage went to stdout: the command should exit 0 */
    CLI_PARSE_ERROR = -1, /* one error line went to stderr: exit CLI_EXIT_USAGE */
};
/* Exit code of a command line that does not parse. */
#define CLI_EXIT_USAGE 2

/* Parse argv[1..argc-1] (argv[0] is the subcommand) against flags[0..nflags-1].
 * -h or --help prints usage(stdout) and returns CLI_PARSE_HELP. No command
 * takes positional arguments, so any other argument is an unknown flag.
 * Later occurrences of a flag override earlier ones. */
int cli_parse_flags(const char *cmd, int argc, char **argv, const cli_flag *flags, int nflags,
                    void (*usage)(FILE *));

/* ---- the model-shape flags shared by train and bench ------------------------------ */

/* Zero (or NULL) means "not given": the preset's value, or the saved one on
 * --resume. */
typedef struct {
    const char *preset;
    long vocab, dim, layers, heads, hidden, context;
} cli_model_flags;

/* Table entries for --preset, --dim, --layers, --heads, --hidden and
 * --context writing into the cli_model_flags *M. --vocab is separate:
 * train takes the vocabulary from the data and has no such flag. */
#define CLI_MODEL_FLAGS(M)                                   \
    CLI_FLAG_STRING("--preset", &(M)->preset, NULL),         \
    CLI_FLAG_LONG("--dim", &(M)->dim, NULL, 1, 16384),       \
    CLI_FLAG_LONG("--layers", &(M)->layers, NULL, 1, 1024),  \
    CLI_FLAG_LONG("--heads", &(M)->heads, NULL, 1, 16384),   \
    CLI_FLAG_LONG("--hidden", &(M)->hidden, NULL, 1, 65536), \
    CLI_FLAG_LONG("--context", &(M)->context, NULL, 1, 1L << 20)
#define CLI_MODEL_VOCAB_FLAG(M) CLI_FLAG_LONG("--vocab", &(M)->vocab, NULL, 257, 1 << 20)

/* Lay the given shape fields over c (the preset's or the saved shape). */
void cli_model_apply(const cli_model_flags *m, tlm_config *c);

#endif
