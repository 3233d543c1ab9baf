/* tinylm: the command-line entry point; dispatches to one file per subcommand. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "tinylm/tinylm.h"

static void usage(FILE *f) {
    fprintf(f,
            "tinylm %s: train a small Llama-style language model from raw text, then generate.\n"
            "\n"
            "usage: tinylm <command> [flags]    (tinylm <command> --help for its flags)\n"
            "\n"
            "commands:\n"
            "  prepare   train a byte-level BPE tokenizer on a corpus and write token files\n"
            "  train     train a model on prepared data; checkpoints to a Hugging Face folder\n"
            "  generate  sample text from a trained model (KV-cached, batched)\n"
            "  bench     measure training/generation speed, share of the sgemm peak, memory\n"
            "  encode    print the token ids of a text (decode: the reverse)\n"
            "  info      show the CPU, threads, BLAS, devices and pinned-memory support\n"
            "  version   print the version\n",
            TLM_VERSION_STRING);
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "prepare")) return cmd_prepare(argc - 1, argv + 1);
    if (!strcmp(cmd, "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "encode") || !strcmp(cmd, "decode")) return cmd_encode(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("tinylm %s\n", TLM_VERSION_STRING);
        return 0;
    }
    fprintf(stderr, "tinylm: error: unknown command '%s': run 'tinylm --help' for the list\n", cmd);
    return 2;
}
