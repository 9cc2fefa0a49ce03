"""How often, and how deep, exact sync rolls a model back, on real tokenizers.

For every ordered pair of the Qwen2, Llama-3, Llama-2 and Mistral tokenizers, the text is generated as the
first one's tokens, one step each (as if the ensemble always chose that model's token), and the second one
follows it with `sync="exact"` (re-encoding its last `lookbehind` tokens with every new token's bytes).
Printed per pair: the steps, the share of steps with a rollback and how many tokens each took back. A
recurrent model goes back to a copy of its cache after a rollback within its last forward pass's tokens
(one token, after a step that fed one) and rereads the whole row after a deeper one.

Text: the worked solutions of the GSM8K 4-shot prompt, then this repository's README (prose, code and
tables).

Usage: python bench/bench_rollbacks.py [--tokenizer-dir DIR] [--lookbehind 8]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # where the tokenizer files are

from shared_data import real_tokenizer_dir  # noqa: E402

from unite_ext.defaults import DEFAULT_LOOKBEHIND  # noqa: E402
from unite_ext.sync import Continuation, ExactSync  # noqa: E402
from unite_ext.tasks.gsm8k import Gsm8k  # noqa: E402
from unite_ext.vocab import VocabTables  # noqa: E402

NAMES = ("qwen2", "llama3", "llama2", "mistral")
README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", type=Path, default=real_tokenizer_dir())
    parser.add_argument("--lookbehind", type=int, default=DEFAULT_LOOKBEHIND)
    args = parser.parse_args()
    tokenizers = [AutoTokenizer.from_pretrained(args.tokenizer_dir / name) for name in NAMES]
    tables = VocabTables.from_tokenizers(tokenizers)
    text = (Gsm8k().header() + README.read_text(encoding="utf-8")).encode("utf-8")

    def token_bytes(model: int, token: int) -> bytes:
        return tables.canonical_bytes(int(tables.to_canon[model][token]))

    print(f"text: {len(text):,} bytes, lookbehind {args.lookbehind}")
    print(f"{'chosen':>8} -> {'follows':<8} | {'steps':>6} | {'rollbacks':>9} | tokens taken back: steps")
    for chooser, follower in itertools.permutations(range(len(NAMES)), 2):
        sync = ExactSync(
            lambda data, i=follower: tables.encode_mid_text(i, data),
            lambda token, i=follower: len(token_bytes(i, token)),
            args.lookbehind,
        )
        continuation, generated, depths = Continuation(), bytearray(), collections.Counter()
        pieces = [token_bytes(chooser, t) for t in tables.encode_mid_text(chooser, text)]
        for piece in pieces:
            generated += piece
            rollback, _ = sync.extend(continuation, generated, 0)
            depths[rollback] += 1
        rolled = len(pieces) - depths[0]
        taken_back = ", ".join(f"{d}: {n}" for d, n in sorted(depths.items()) if d) or "-"
        print(
            f"{NAMES[chooser]:>8} -> {NAMES[follower]:<8} | {len(pieces):>6} | "
            f"{rolled / len(pieces):>8.1%} | {taken_back}"
        )


if __name__ == "__main__":
    main()
