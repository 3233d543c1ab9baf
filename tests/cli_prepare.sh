#!/usr/bin/env bash
# End-to-end checks of `tinylm prepare` and `tinylm info`: a small corpus
# prepares into a loadable folder, and every kind of bad input gets a
# one-line error, a non-zero exit and leaves earlier output untouched.
# usage: cli_prepare.sh <tinylm binary> <source dir>
set -uo pipefail
bin="$1"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
ok()   { echo "ok   - $1"; passes=$((passes+1)); }
bad()  { echo "FAIL - $1"; fails=$((fails+1)); }

# expect_error NAME PATTERN CMD...: non-zero exit, exactly one error line on
# stderr, matching PATTERN (a grep -E regex).
expect_error() {
  local name="$1" pat="$2"; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  local lines; lines=$(grep -c 'error:' "$tmp/err")
  if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && grep -Eq -e "$pat" "$tmp/err"; then ok "$name"
  else bad "$name (rc=$rc, stderr: $(head -c 300 "$tmp/err"))"; fi
}

# A small synthetic corpus: a few documents of varied English-like text.
mkdir -p "$tmp/corpus"
for d in 1 2 3 4 5 6 7 8 9 10; do
  for i in $(seq 1 40); do
    echo "Document $d, line $i: the quick brown fox jumps over the lazy dog $((d*i)) times; café naïve 日本語."
  done > "$tmp/corpus/doc$d.txt"
done

"$bin" prepare --input "$tmp/corpus" --out "$tmp/prep" --vocab 300 --val-fraction 0.2 >"$tmp/out" 2>&1
if [ $? -eq 0 ] && [ -s "$tmp/prep/tokenizer.json" ] && [ -s "$tmp/prep/train.bin" ] && [ -s "$tmp/prep/val.bin" ] && [ -s "$tmp/prep/meta.json" ]; then
  ok "prepare writes tokenizer.json, train.bin, val.bin, meta.json"
else bad "prepare on a small corpus: $(cat "$tmp/out")"; fi
grep -q '"val_documents":[[:space:]]*2' "$tmp/prep/meta.json" && ok "val holds out 20% of 10 documents" || bad "val split: $(cat "$tmp/prep/meta.json")"
grep -q 'MB/s' "$tmp/out" && ok "prepare reports MB/s" || bad "no MB/s in output"

# Determinism: the same input and seed give identical files.
"$bin" prepare --input "$tmp/corpus" --out "$tmp/prep2" --vocab 300 --val-fraction 0.2 >/dev/null 2>&1
cmp -s "$tmp/prep/train.bin" "$tmp/prep2/train.bin" && cmp -s "$tmp/prep/tokenizer.json" "$tmp/prep2/tokenizer.json" \
  && ok "prepare is deterministic" || bad "prepare output differs between runs"

# Single file with <|endoftext|> separators.
cat "$tmp"/corpus/doc1.txt > "$tmp/one.txt"; echo "<|endoftext|>" >> "$tmp/one.txt"; cat "$tmp"/corpus/doc2.txt >> "$tmp/one.txt"
"$bin" prepare --input "$tmp/one.txt" --out "$tmp/prep3" --vocab 280 --val-fraction 0.5 >/dev/null 2>&1 \
  && grep -q '"documents":[[:space:]]*2' "$tmp/prep3/meta.json" && ok "single file splits at <|endoftext|> lines" || bad "single-file documents"

# encode | decode round-trips text through the prepared tokenizer.
txt='Fellow-Citizens: naïve café, 日本語 — 1790s!'
out=$("$bin" encode --tokenizer "$tmp/prep/tokenizer.json" --text "$txt" | "$bin" decode --tokenizer "$tmp/prep/tokenizer.json")
[ "$out" = "$txt" ] && ok "encode | decode round-trips" || bad "encode/decode gave '$out'"
expect_error "decode rejects an out-of-range id" "not a token id" "$bin" decode --tokenizer "$tmp/prep/tokenizer.json" --text "1 99999"

cp "$tmp/prep/train.bin" "$tmp/train.before"
: > "$tmp/empty.txt"
expect_error "empty corpus" "empty.txt.*no text|no text" "$bin" prepare --input "$tmp/empty.txt" --out "$tmp/prep"
printf 'abc\000def' > "$tmp/bin.txt"
expect_error "binary corpus" "bin.txt.*binary" "$bin" prepare --input "$tmp/bin.txt" --out "$tmp/prep"
printf 'caf\xe9 au lait\n' > "$tmp/latin1.txt"
expect_error "non-UTF-8 corpus" "latin1.txt.*UTF-8" "$bin" prepare --input "$tmp/latin1.txt" --out "$tmp/prep"
expect_error "missing input" "nope.*does not exist" "$bin" prepare --input "$tmp/nope" --out "$tmp/prep"
mkdir -p "$tmp/emptydir"
expect_error "folder without .txt" "emptydir.*no .txt" "$bin" prepare --input "$tmp/emptydir" --out "$tmp/prep"
expect_error "vocab too small" "--vocab" "$bin" prepare --input "$tmp/corpus" --out "$tmp/prep" --vocab 10
expect_error "vocab not a number" "--vocab" "$bin" prepare --input "$tmp/corpus" --out "$tmp/prep" --vocab abc
expect_error "missing --out" "--out" "$bin" prepare --input "$tmp/corpus"
expect_error "unknown flag" "--bogus" "$bin" prepare --bogus
touch "$tmp/afile"
expect_error "unwritable output folder" "afile" "$bin" prepare --input "$tmp/corpus" --out "$tmp/afile/sub" --vocab 300
cmp -s "$tmp/prep/train.bin" "$tmp/train.before" && ok "failed runs left train.bin intact" || bad "train.bin changed"

"$bin" info >"$tmp/out" 2>&1 && grep -q '^cpu:' "$tmp/out" && grep -q '^pinned:' "$tmp/out" && grep -q '^blas:' "$tmp/out" \
  && ok "info prints cpu, blas, pinned" || bad "info: $(cat "$tmp/out")"

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
