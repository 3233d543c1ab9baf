#!/usr/bin/env bash
# Check that Hugging Face `tokenizers` (its Node.js binding from npm, the
# same Rust core as the Python package) loads our tokenizer.json and encodes
# every document exactly as `tinylm encode` does. Not part of the test suite:
# it needs the npm registry.
# usage: dev/check_hf_tokenizer.sh TINYLM_BINARY TOKENIZER_JSON FILE_OR_FOLDER
set -euo pipefail
bin="$1"; tokjson="$(realpath "$2")"; input="$3"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
(cd "$work" && npm install --silent --no-audit --no-fund tokenizers@0.23.2 >/dev/null)
cat > "$work/enc.js" <<'JS'
const { Tokenizer } = require('tokenizers');
const fs = require('fs');
(async () => {
  const tok = Tokenizer.fromFile(process.argv[2]);
  for (const f of process.argv.slice(3)) {
    const e = await tok.encode(fs.readFileSync(f, 'utf8'), null, { addSpecialTokens: false });
    console.log(e.getIds().join(' '));
  }
})();
JS
if [ -d "$input" ]; then files=("$input"/*.txt); else files=("$input"); fi
# require() resolves from the script's folder, where npm put the package.
node "$work/enc.js" "$tokjson" "${files[@]}" > "$work/hf.txt"
: > "$work/ours.txt"
for f in "${files[@]}"; do "$bin" encode --tokenizer "$tokjson" --input "$f" >> "$work/ours.txt"; done
ntok=$(wc -w < "$work/ours.txt")
if cmp -s "$work/hf.txt" "$work/ours.txt"; then
  echo "hf-tokenizers 0.23.2 and tinylm agree on ${#files[@]} documents, $ntok tokens"
else
  echo "MISMATCH between hf-tokenizers and tinylm (first differing document below)"
  diff <(tr ' ' '\n' < "$work/hf.txt") <(tr ' ' '\n' < "$work/ours.txt") | head -5
  exit 1
fi
