"""What a copy of a recurrent model's cache costs next to a one-token decode step.

In exact sync a recurrent model whose rollbacks are frequent copies its cache before every forward pass
(`unite_ext.decode._Member.copies_pay`, `_copy_of_cache`: the recurrent states copied, the attention
layers' keys and values shared). The copy's cost is mostly Python (one clone per state), like a small
model's decode step, so tiny models with real depths (hidden size 32) show the ratio that a GPU, where
both are bound by the host, is expected to show. Printed per model type: the copy, a deep copy of the
whole cache (for comparison), the step after a prompt, the reread of the row that a rollback costs
without a copy (a pass over the prompt from an empty cache), the copy's share of a step, and the
rollback rate above which copies cost less than rereads (copy / reread; medians, one thread).

Usage: python bench/bench_cache_copy.py [--prompt-tokens 400] [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models' configs

from tiny_models import RECURRENT_OVERRIDES, tiny_auto_model  # noqa: E402

from unite_ext.decode import _copy_of_cache  # noqa: E402
from unite_ext.toy_tokenizers import SAMPLE_TEXTS, train_byte_level_bpe  # noqa: E402

# Model types (those whose tiny configs list layer types) at depths of the order of released hybrids.
DEPTHS = {"qwen3_5_text": 48, "lfm2": 32, "granitemoehybrid": 40}
TOKENIZER = train_byte_level_bpe(SAMPLE_TEXTS, vocab_size=300)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_model(
    model_type: str, layers: int, prompt_tokens: int, repeats: int
) -> tuple[float, float, float, float]:
    """(copy, deep copy, one-token step, reread of the prompt) in ms for a tiny model of `model_type`."""
    overrides = dict(RECURRENT_OVERRIDES[model_type])
    overrides["layer_types"] = (overrides["layer_types"] * layers)[:layers]  # the tiny pattern, repeated
    model = tiny_auto_model(model_type, TOKENIZER, num_hidden_layers=layers, **overrides).eval()
    prompt = torch.randint(0, len(TOKENIZER), (1, prompt_tokens))
    token = torch.randint(0, len(TOKENIZER), (1, 1))
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache
        copy_ms = median_ms(lambda: _copy_of_cache(cache), repeats)
        deep_ms = median_ms(lambda: copy.deepcopy(cache), repeats)
        # Each step on a fresh deep copy, so that the cache the copies come from stays as it was.
        both_ms = median_ms(lambda: model(token, cache=copy.deepcopy(cache), use_cache=True), repeats)
        reread_ms = median_ms(lambda: model(prompt, use_cache=True), repeats)
    return copy_ms, deep_ms, both_ms - deep_ms, reread_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"prompt {args.prompt_tokens} tokens, hidden size 32, median of {args.repeats}, one thread")
    print(
        f"{'model type':>17} {'layers':>6} | {'copy ms':>8} | {'deep copy ms':>12} | {'step ms':>8} | "
        f"{'reread ms':>9} | copy / step | pays above"
    )
    for model_type, layers in DEPTHS.items():
        copy_ms, deep_ms, step_ms, reread_ms = time_model(
            model_type, layers, args.prompt_tokens, args.repeats
        )
        print(
            f"{model_type:>17} {layers:>6} | {copy_ms:>8.2f} | {deep_ms:>12.2f} | {step_ms:>8.2f} | "
            f"{reread_ms:>9.2f} | {copy_ms / step_ms:>11.1%} | {copy_ms / reread_ms:>10.2%}"
        )


if __name__ == "__main__":
    main()
