/* The CLI's table-driven flag parser (src/cli/args.c): values of every type
 * in both spellings, "given" bits, ranges, unknown flags, missing values,
 * help, and the one-line errors on stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "testutil.h"

static FILE *g_usage_to;
static int g_usage_calls;
static char g_err[4096]; /* what the last parse wrote to stderr */

static void usage_stub(FILE *f) {
    g_usage_to = f;
    g_usage_calls++;
}

/* Run cli_parse_flags on {"test", args..., NULL} with stderr captured. */
static int parse_v(const cli_flag *flags, int nflags, const char **args) {
    int argc = 0;
    while (args[argc]) argc++;
    g_usage_to = NULL;
    g_usage_calls = 0;
    fflush(stderr);
    FILE *tmp = tmpfile();
    assert_non_null(tmp);
    int saved = dup(STDERR_FILENO);
    assert_true(saved >= 0);
    assert_true(dup2(fileno(tmp), STDERR_FILENO) >= 0);
    int rc = cli_parse_flags("test", argc, (char **)args, flags, nflags, usage_stub);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    rewind(tmp);
    size_t n = fread(g_err, 1, sizeof g_err - 1, tmp);
    g_err[n] = 0;
    fclose(tmp);
    return rc;
}
#define PARSE(flags, ...) parse_v(flags, CLI_NFLAGS(flags), (const char *[]){"test", __VA_ARGS__, NULL})

/* The parse failed with exactly one error line holding `want`. */
static void expect_error(int rc, const char *want) {
    if (rc != CLI_PARSE_ERROR || strncmp(g_err, "tinylm test: error: ", 20) || !strstr(g_err, want) ||
        strchr(g_err, '\n') != g_err + strlen(g_err) - 1)
        fail_msg("rc %d, expected one error line naming \"%s\", got: %s", rc, want, g_err);
}

typedef struct {
    int n;
    long big;
    double x, t;
    const char *s;
    int sw;
    int has_n, has_big, has_x, has_t, has_s;
} vals;

/* One flag of each kind; the table points into *v. */
#define TABLE(v)                                                                \
    const cli_flag flags[] = {                                                  \
        CLI_FLAG_INT("--n", &(v)->n, &(v)->has_n, 1, 64),                       \
        CLI_FLAG_LONG("--big", &(v)->big, &(v)->has_big, 0, 0x7fffffffffffffffL), \
        CLI_FLAG_DOUBLE("--x", &(v)->x, &(v)->has_x, 0.0, 2.5),                 \
        CLI_FLAG_DURATION("--t", &(v)->t, &(v)->has_t),                         \
        CLI_FLAG_STRING("--s", &(v)->s, &(v)->has_s),                           \
        CLI_FLAG_SWITCH("--sw", &(v)->sw),                                      \
    }

static void test_values(void **state) {
    (void)state;
    vals v = {.n = 7, .x = 1.0, .s = "default"};
    TABLE(&v);
    /* nothing given: defaults stay, no given bit */
    assert_int_equal(PARSE(flags, NULL), CLI_PARSE_OK);
    assert_int_equal(v.n, 7);
    assert_int_equal(v.has_n + v.has_big + v.has_x + v.has_t + v.has_s + v.sw, 0);

    /* "--flag VALUE" */
    assert_int_equal(PARSE(flags, "--n", "12", "--x", "0.25", "--t", "90"), CLI_PARSE_OK);
    assert_int_equal(v.n, 12);
    assert_true(v.x == 0.25);
    assert_true(v.t == 90.0);
    assert_int_equal(v.has_n, 1);
    assert_int_equal(v.has_x, 1);
    assert_int_equal(v.has_t, 1);
    assert_int_equal(v.has_big + v.has_s + v.sw, 0);
    assert_string_equal(v.s, "default");
    assert_string_equal(g_err, "");

    /* "--flag=VALUE", the largest long, durations in minutes and hours */
    assert_int_equal(PARSE(flags, "--n=64", "--big=9223372036854775807", "--x=2.5", "--t=1.5h", "--s=a=b", "--sw"),
                     CLI_PARSE_OK);
    assert_int_equal(v.n, 64);
    assert_true(v.big == 0x7fffffffffffffffL);
    assert_true(v.x == 2.5);
    assert_true(v.t == 5400.0);
    assert_string_equal(v.s, "a=b"); /* only the first '=' splits */
    assert_int_equal(v.sw, 1);
    assert_int_equal(v.has_big, 1);
    assert_int_equal(v.has_s, 1);
    assert_int_equal(PARSE(flags, "--t", "5m"), CLI_PARSE_OK);
    assert_true(v.t == 300.0);
    assert_int_equal(PARSE(flags, "--t", "90s"), CLI_PARSE_OK);
    assert_true(v.t == 90.0);

    /* a value may start with dashes; an empty value is a value */
    assert_int_equal(PARSE(flags, "--s", "--n"), CLI_PARSE_OK);
    assert_string_equal(v.s, "--n");
    assert_int_equal(PARSE(flags, "--s="), CLI_PARSE_OK);
    assert_string_equal(v.s, "");
    /* the last occurrence wins */
    assert_int_equal(PARSE(flags, "--n", "3", "--n=4"), CLI_PARSE_OK);
    assert_int_equal(v.n, 4);
}

static void test_bad_values(void **state) {
    (void)state;
    vals v = {.n = 7, .x = 1.0};
    TABLE(&v);
    /* out of range: the message names the flag, the value and the range */
    expect_error(PARSE(flags, "--n", "0"), "--n 0 is out of range: use a value from 1 to 64");
    expect_error(PARSE(flags, "--n=65"), "--n 65 is out of range: use a value from 1 to 64");
    expect_error(PARSE(flags, "--big", "-1"), "--big -1 is out of range");
    expect_error(PARSE(flags, "--x", "2.6"), "--x 2.6 is out of range: use a value from 0 to 2.5");
    expect_error(PARSE(flags, "--x", "-0.1"), "--x -0.1 is out of range");
    assert_int_equal(v.n, 7); /* a rejected value is not stored */
    assert_true(v.x == 1.0);
    assert_int_equal(v.has_n + v.has_x, 0);
    /* not a number */
    expect_error(PARSE(flags, "--n", "many"), "--n expects an integer, got 'many'");
    expect_error(PARSE(flags, "--n", "1.5"), "--n expects an integer, got '1.5'");
    expect_error(PARSE(flags, "--big", "9223372036854775808"), "--big expects an integer");
    expect_error(PARSE(flags, "--x", "fast"), "--x expects a number, got 'fast'");
    expect_error(PARSE(flags, "--x", "nan"), "--x expects a number");
    expect_error(PARSE(flags, "--x="), "--x expects a number, got ''");
    expect_error(PARSE(flags, "--t", "5x"), "--t expects a positive duration like 90s, 5m or 1.5h, got '5x'");
    expect_error(PARSE(flags, "--t", "0"), "--t expects a positive duration");
    /* missing values, in either position */
    expect_error(PARSE(flags, "--n"), "flag --n needs a value");
    expect_error(PARSE(flags, "--sw", "--s"), "flag --s needs a value");
    /* a switch takes no value */
    expect_error(PARSE(flags, "--sw=1"), "flag --sw takes no value");
    /* parsing stops at the first error */
    v.n = 7;
    expect_error(PARSE(flags, "--bogus", "--n", "9"), "--bogus");
    assert_int_equal(v.n, 7);
}

static void test_unknown(void **state) {
    (void)state;
    vals v = {0};
    TABLE(&v);
    expect_error(PARSE(flags, "--bogus"), "unknown flag '--bogus': see tinylm test --help");
    expect_error(PARSE(flags, "--bogus=1"), "unknown flag '--bogus=1'");
    /* names match whole: neither a prefix nor a longer name */
    expect_error(PARSE(flags, "--si", "x"), "unknown flag '--si'");
    expect_error(PARSE(flags, "--nn", "1"), "unknown flag '--nn'");
    expect_error(PARSE(flags, "-n", "1"), "unknown flag '-n'");
    /* no command takes positional arguments */
    expect_error(PARSE(flags, "stray"), "unknown flag 'stray'");
    expect_error(PARSE(flags, "--n", "2", "3"), "unknown flag '3'");
    /* a command without flags says so */
    expect_error(parse_v(NULL, 0, (const char *[]){"test", "--x", NULL}), "unknown flag '--x': tinylm test takes no flags");
    assert_int_equal(parse_v(NULL, 0, (const char *[]){"test", NULL}), CLI_PARSE_OK);
}

static void test_help(void **state) {
    (void)state;
    vals v = {0};
    TABLE(&v);
    const char *forms[] = {"-h", "--help"};
    for (int k = 0; k < 2; k++) {
        assert_int_equal(PARSE(flags, forms[k]), CLI_PARSE_HELP);
        assert_int_equal(g_usage_calls, 1);
        assert_ptr_equal(g_usage_to, stdout);
        assert_string_equal(g_err, "");
    }
    /* help wins over what follows, not over an error before it */
    assert_int_equal(PARSE(flags, "--n", "3", "--help", "--bogus"), CLI_PARSE_HELP);
    expect_error(PARSE(flags, "--bogus", "--help"), "--bogus");
    assert_int_equal(g_usage_calls, 0);
    /* as a flag's value, --help is just a value */
    assert_int_equal(PARSE(flags, "--s", "--help"), CLI_PARSE_OK);
    assert_string_equal(v.s, "--help");
    assert_int_equal(g_usage_calls, 0);
    /* --help=x is no help */
    expect_error(PARSE(flags, "--help=x"), "unknown flag '--help=x'");
    /* help with no flags at all */
    assert_int_equal(parse_v(NULL, 0, (const char *[]){"test", "-h", NULL}), CLI_PARSE_HELP);
    assert_int_equal(g_usage_calls, 1);
}

/* A CLI_CUSTOM parser: even numbers only; records what it was called with. */
static const char *g_custom_args[3];
static int parse_even(const char *cmd, const char *flag, const char *val, void *dest) {
    g_custom_args[0] = cmd;
    g_custom_args[1] = flag;
    g_custom_args[2] = val;
    long n;
    if (cli_parse_int(cmd, flag, val, -1000, 1000, &n)) return -1;
    if (n % 2) {
        fprintf(stderr, "tinylm %s: error: %s %ld is odd: give an even number\n", cmd, flag, n);
        return -1;
    }
    *(long *)dest = n;
    return 0;
}

static void test_custom(void **state) {
    (void)state;
    long even = 0;
    int has_even = 0;
    const cli_flag flags[] = {CLI_FLAG_CUSTOM("--even", parse_even, &even, &has_even)};
    assert_int_equal(PARSE(flags, "--even=42"), CLI_PARSE_OK);
    assert_int_equal(even, 42);
    assert_int_equal(has_even, 1);
    assert_string_equal(g_custom_args[0], "test");
    assert_string_equal(g_custom_args[1], "--even");
    assert_string_equal(g_custom_args[2], "42");
    has_even = 0;
    expect_error(PARSE(flags, "--even", "3"), "--even 3 is odd");
    assert_int_equal(even, 42);
    assert_int_equal(has_even, 0);
    expect_error(PARSE(flags, "--even", "x"), "--even expects an integer");
    expect_error(PARSE(flags, "--even"), "flag --even needs a value");
}

static void test_model_flags(void **state) {
    (void)state;
    cli_model_flags m = {0};
    const cli_flag flags[] = {CLI_MODEL_FLAGS(&m), CLI_MODEL_VOCAB_FLAG(&m)};
    assert_int_equal(CLI_NFLAGS(flags), 7);
    assert_int_equal(PARSE(flags, "--preset", "tiny", "--dim=32", "--heads", "2", "--context", "16"), CLI_PARSE_OK);
    assert_string_equal(m.preset, "tiny");
    tlm_config c;
    assert_int_equal(config_preset(m.preset, &c), 0);
    tlm_config preset = c;
    cli_model_apply(&m, &c);
    /* typed fields replace the preset's, the others keep it */
    assert_int_equal(c.dim, 32);
    assert_int_equal(c.heads, 2);
    assert_int_equal(c.context, 16);
    assert_int_equal(c.vocab, preset.vocab);
    assert_int_equal(c.layers, preset.layers);
    assert_int_equal(c.hidden, preset.hidden);
    assert_int_equal(PARSE(flags, "--vocab", "300", "--layers", "3", "--hidden", "64"), CLI_PARSE_OK);
    cli_model_apply(&m, &c);
    assert_int_equal(c.vocab, 300);
    assert_int_equal(c.layers, 3);
    assert_int_equal(c.hidden, 64);
    /* the ranges train and bench have always used */
    expect_error(PARSE(flags, "--vocab", "256"), "--vocab 256 is out of range: use a value from 257 to 1048576");
    expect_error(PARSE(flags, "--dim", "0"), "--dim 0 is out of range: use a value from 1 to 16384");
    expect_error(PARSE(flags, "--layers", "1025"), "--layers 1025 is out of range: use a value from 1 to 1024");
    expect_error(PARSE(flags, "--heads", "16385"), "--heads 16385 is out of range");
    expect_error(PARSE(flags, "--hidden", "65537"), "--hidden 65537 is out of range");
    expect_error(PARSE(flags, "--context", "1048577"), "--context 1048577 is out of range");
    expect_error(PARSE(flags, "--preset"), "flag --preset needs a value");
    /* without the vocab entry (train), --vocab is unknown */
    cli_model_flags t = {0};
    const cli_flag train_flags[] = {CLI_MODEL_FLAGS(&t)};
    expect_error(PARSE(train_flags, "--vocab", "300"), "unknown flag '--vocab'");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_unknown),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_custom),
        cmocka_unit_test(test_model_flags),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
