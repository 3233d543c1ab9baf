/* tinylm encode / tinylm decode: run a tokenizer.json on text or ids, for
 * inspection and for checking our tokenizer against other implementations. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "io/fileio.h"
#include "text/tokenizer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: tinylm encode --tokenizer FILE [--input FILE | --text TEXT]\n"
            "       tinylm decode --tokenizer FILE [--input FILE | --text \"ID ID ...\"]\n"
            "\n"
            "encode prints the token ids of the text (standard input if neither flag), one line,\n"
            "space-separated; decode turns whitespace-separated ids back into text.\n"
            "  --tokenizer FILE   a tokenizer.json (e.g. DIR/tokenizer.json from tinylm prepare)\n"
            "  --input FILE       read the text (or ids) from FILE\n"
            "  --text TEXT        take the text (or ids) from the command line\n");
}

static char *read_stdin(size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n - 1, stdin)) > 0) {
        n += r;
        if (cap - n < 2) buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

int cmd_encode(int argc, char **argv) {
    const char *cmd = argv[0];
    int decode = !strcmp(cmd, "decode");
    const char *tokpath = NULL, *input = NULL, *text = NULL;
    const cli_flag flags[] = {
        CLI_FLAG_STRING("--tokenizer", &tokpath, NULL),
        CLI_FLAG_STRING("--input", &input, NULL),
        CLI_FLAG_STRING("--text", &text, NULL),
    };
    int pr = cli_parse_flags(cmd, argc, argv, flags, CLI_NFLAGS(flags), usage);
    if (pr != CLI_PARSE_OK) return pr == CLI_PARSE_HELP ? 0 : CLI_EXIT_USAGE;
    if (!tokpath) return cli_fail(cmd, "--tokenizer is required: the tokenizer.json to use");
    tlm_tokenizer *t = tokenizer_load(tokpath);
    if (!t) return cli_fail(cmd, tlm_last_error());
    size_t len = 0;
    char *buf;
    if (text) { buf = strdup(text); len = strlen(text); }
    else if (input) buf = file_read_all(input, &len);
    else buf = read_stdin(&len);
    if (!buf) { tokenizer_free(t); return cli_fail(cmd, tlm_last_error()); }
    int rc = 0;
    if (!decode) {
        int32_t *ids = malloc((len + 1) * sizeof(int32_t));
        size_t n = tokenizer_encode(t, buf, len, ids, len + 1);
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids);
    } else {
        size_t cap = 1024, n = 0;
        int32_t *ids = malloc(cap * sizeof(int32_t));
        char *p = buf, *end;
        for (;;) {
            while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r' || *p == ',') p++;
            if (!*p) break;
            errno = 0;
            long v = strtol(p, &end, 10);
            if (end == p || errno || v < 0 || v >= tokenizer_vocab_size(t)) {
                char msg[256];
                snprintf(msg, sizeof msg, "'%.20s' is not a token id of %s (0..%d)", p, tokpath, tokenizer_vocab_size(t) - 1);
                rc = cli_fail(cmd, msg);
                break;
            }
            if (n == cap) ids = realloc(ids, (cap *= 2) * sizeof(int32_t));
            ids[n++] = (int32_t)v;
            p = end;
        }
        if (!rc) {
            size_t outlen;
            char *out = tokenizer_decode(t, ids, n, &outlen);
            if (!out) rc = cli_fail(cmd, tlm_last_error());
            else { fwrite(out, 1, outlen, stdout); free(out); }
        }
        free(ids);
    }
    free(buf);
    tokenizer_free(t);
    return rc;
}
