/* Subcommands: one file each. Each returns the process exit code. The CLI is
 * the only layer that prints; libraries return errors via tlm_last_error(). */
#ifndef TLM_CLI_CLI_H
#define TLM_CLI_CLI_H

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

#endif
