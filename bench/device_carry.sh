#!/usr/bin/env bash
# For a GPU machine that gets the repository but not ../shared: copies the real tokenizer files that the
# CUDA decode tests and bench_decode.py read into .device_carry/ (git-ignored, about 10 MB). Send that
# folder along with the repository; bench/gpu_check.sh points UNITE_EXT_TOKENIZERS at it.
set -eu
cd "$(dirname "$0")/.."
source=../shared/tokenizers
target=.device_carry/tokenizers
[ -d "$source" ] || { echo "no $source: nothing to copy" >&2; exit 1; }
rm -rf "$target"
mkdir -p "$target"
for name in gpt2 qwen2 llama2 mistral; do cp -r "$source/$name" "$target/"; done
du -sh .device_carry
