#!/usr/bin/env bash
# Run here before the device call: ../shared does not travel to the device machine, so this copies the
# real tokenizer files that the CUDA decode tests and bench_decode.py read into .device_carry/ (git-ignored,
# about 10 MB). Then call the device with carry [".device_carry"] and `bash bench/gpu_check.sh`, which
# points UNITE_EXT_TOKENIZERS there.
set -eu
cd "$(dirname "$0")/.."
source=../shared/tokenizers
target=.device_carry/tokenizers
[ -d "$source" ] || { echo "no $source: nothing to copy" >&2; exit 1; }
rm -rf "$target"
mkdir -p "$target"
for name in gpt2 qwen2 llama2 mistral; do cp -r "$source/$name" "$target/"; done
du -sh .device_carry
