"""Figures for the cross-tokenizer tables: build time (cold and from the cache), size, canonical ids,
vocabulary overlap and mid-text encoding speed, on the real Qwen2, Llama-3 and Mistral tokenizers.

Usage: python bench/bench_vocab.py [--tokenizer-dir DIR]  (default: ../shared/tokenizers, or
$UNITE_EXT_TOKENIZERS when set)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # where the tokenizer files are

from shared_data import real_tokenizer_dir  # noqa: E402

from unite_ext.vocab import VocabTables  # noqa: E402

NAMES = ("qwen2", "llama3", "mistral")
LOGITS = {"qwen2": 151936, "llama3": 128256, "mistral": 32000}  # config.vocab_size
CHAT_EOS = {"qwen2": [151643], "llama3": [128009], "mistral": None}
SAMPLE_TEXT = (
    "The ensemble chose the next token \u2014 a word, a digit or a newline \u2014 and every model re-reads "
    "the last few tokens: 1990s, caf\u00e9, \u4f60\u597d\u4e16\u754c, \U0001f642.\n"
)


def build(tokenizers: list, names: tuple[str, ...], cache_dir: Path) -> tuple[VocabTables, float]:
    start = time.perf_counter()
    tables = VocabTables.from_tokenizers(
        tokenizers,
        vocab_sizes=[LOGITS[n] for n in names],
        eos_token_ids=[CHAT_EOS[n] for n in names],
        cache_dir=cache_dir,
    )
    return tables, time.perf_counter() - start


def tensor_bytes(tables: VocabTables) -> int:
    tensors = [*tables.to_canon, *tables.from_canon, *(t for pair in tables.seq_from_canon for t in pair)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", type=Path, default=real_tokenizer_dir())
    args = parser.parse_args()

    start = time.perf_counter()
    tokenizers = {n: AutoTokenizer.from_pretrained(args.tokenizer_dir / n) for n in NAMES}
    print(f"loading the 3 tokenizers: {time.perf_counter() - start:.2f} s (not counted below)")

    with tempfile.TemporaryDirectory() as cache:
        triple, cold = build(list(tokenizers.values()), NAMES, Path(cache))
        _, warm = build(list(tokenizers.values()), NAMES, Path(cache))
        print(f"qwen2+llama3+mistral: build cold {cold:.2f} s, from cache {warm:.3f} s")
        size = tensor_bytes(triple) / 1e6
        print(f"qwen2+llama3+mistral: {triple.num_canonical:,} canonical ids, tensors {size:.1f} MB")
        pair, _ = build([tokenizers["qwen2"], tokenizers["llama3"]], ("qwen2", "llama3"), Path(cache))
        canonical_bytes = len(pair.decode(range(pair.num_canonical))) + 8 * (pair.num_canonical + 1)
        print(
            f"qwen2+llama3: {pair.num_canonical:,} canonical ids, tensors {tensor_bytes(pair) / 1e6:.1f} MB "
            f"(+ {canonical_bytes / 1e6:.1f} MB of canonical byte strings on the host)"
        )

    print("share of model A's regular tokens that model B lacks as a whole token:")
    to_canon = [t.numpy() for t in triple.to_canon]
    for a, b in itertools.permutations(range(len(NAMES)), 2):
        tokens_a = to_canon[a][to_canon[a] > 0]
        held_by_b = np.zeros(triple.num_canonical, dtype=bool)
        held_by_b[to_canon[b][to_canon[b] > 0]] = True
        lacking = int((~held_by_b[tokens_a]).sum())
        share = lacking / len(tokens_a)
        print(f"  A={NAMES[a]:8s} B={NAMES[b]:8s} {lacking:7,} / {len(tokens_a):7,} = {share:6.1%}")

    data = SAMPLE_TEXT.encode("utf-8")
    windows = [data[i : i + 48] for i in range(0, len(data) - 48)]  # includes cuts inside characters
    print(f"encode_mid_text on {len(windows)} windows of 48 bytes (some cut inside a UTF-8 character):")
    for i, name in enumerate(NAMES):
        start = time.perf_counter()
        repeats = 20
        for _ in range(repeats):
            for window in windows:
                triple.encode_mid_text(i, window)
        per_call = (time.perf_counter() - start) / (repeats * len(windows))
        print(f"  {name:8s} {per_call * 1e6:6.1f} us per call")


if __name__ == "__main__":
    main()
