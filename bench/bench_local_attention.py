"""Cost of the position-built attention masks that models with sliding-window layers get in the loop, and
what dropping the keys out of the windows' reach saves.

Two tiny random Mistral-style models (the tokenizers of `bench_decode.py`) decode the same prompts with no
window, with a window too large to bind (the loop then builds 4-D masks from the tokens' positions, and the
texts must equal the no-window texts) and with a window that binds, once as the loop runs (its sliding
layers drop the keys no query will attend again) and once keeping every key ("all keys": the texts must be
the same). The ratio is the median over runs of a windowed run's time to the no-window run made next to it;
"KV KiB" is the most keys and values the models' caches held between steps (each model's most, summed).

    python bench/bench_local_attention.py [--device cpu|cuda] [--batch-sizes 1 8] [--new-tokens 64]
                                          [--repeats 5] [--windows 4096 64] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
from bench_decode import PROMPTS, load_tokenizers, synchronize, versus
from tiny_models import tiny_causal_lm

from unite_ext import decode
from unite_ext.decode import Ensemble, Generation


def timed_generate(
    ensemble: Ensemble, rows: list[str], new_tokens: int, device: str
) -> tuple[float, int, list[Generation]]:
    """Seconds to decode `rows` in one batch, the most bytes of keys and values the models' caches held after
    a forward pass (each model's most, summed), and the texts."""
    peaks = [0] * len(ensemble.members)
    forward = decode._ModelBatch.forward

    def measured(run: decode._ModelBatch, feeds: list[list[int]]) -> torch.Tensor:
        logits = forward(run, feeds)
        layers = [layer for layer in run.cache.layers if layer.keys is not None]
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
        peaks[run.member.index] = max(peaks[run.member.index], held)
        return logits

    synchronize(device)
    start = time.perf_counter()
    with mock.patch.object(decode._ModelBatch, "forward", measured):
        texts = ensemble.generate(rows, max_new_tokens=new_tokens, batch_size=len(rows), progress=False)
    synchronize(device)
    return time.perf_counter() - start, sum(peaks), texts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="device of the models and the step (default cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is shown")
    parser.add_argument("--windows", type=int, nargs="+", default=[4096, 64], help="sliding windows to time")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    description, toks, vocab_sizes = load_tokenizers("real")
    ensembles = {
        window: Ensemble(
            [
                tiny_causal_lm(
                    "mistral",
                    size,
                    seed=i,
                    hidden_size=64,
                    eos_token_id=tok.eos_token_id,
                    sliding_window=window,
                ).to(args.device)
                for i, (size, tok) in enumerate(zip(vocab_sizes, toks, strict=True))
            ],
            toks,
        )
        for window in [None, *args.windows]
    }
    # Rows that differ in their last words, so that they feed and roll back different numbers of tokens.
    prompts = [f"{PROMPTS['gsm8k']} {n}" for n in range(max(args.batch_sizes))]
    print(
        f"device {args.device}, tokenizers {description}, {args.new_tokens} new tokens, torch threads "
        f"{torch.get_num_threads()}, median of {args.repeats} runs"
    )
    header = f"{'batch':>5} {'window':>14} | {'s/run':>7} {'vs none':>8} {'KV KiB':>9}"
    print(header)
    print("-" * len(header))
    for batch in args.batch_sizes:
        rows = prompts[:batch]
        runs = [(str(window), window, False) for window in ensembles]
        runs += [(f"{window} all keys", window, True) for window in args.windows]
        times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        texts, kv_bytes = {}, {}
        for _ in range(args.repeats):
            for name, window, all_keys in runs:
                # A margin beyond any row's length keeps every key.
                keeps = mock.patch.object(decode, "_LOCAL_ROLLBACK_MARGIN", 1 << 40)
                with keeps if all_keys else contextlib.nullcontext():
                    seconds, kv_bytes[name], texts[name] = timed_generate(
                        ensembles[window], rows, args.new_tokens, args.device
                    )
                times[name].append(seconds)
        # A model holds at most one token per generated byte after its prompt.
        prompt_tokens = max(len(t(p)["input_ids"]) for t in toks for p in rows)
        longest = prompt_tokens + max(g.num_bytes for g in texts["None"])
        for window in args.windows:
            if window >= longest:
                assert texts[str(window)] == texts["None"], "a window that never binds changed the texts"
            assert texts[str(window)] == texts[f"{window} all keys"], "dropping keys changed the texts"
        for name, _, _ in runs:
            change = versus(times, name, "None")
            print(
                f"{batch:>5} {name:>14} | {statistics.median(times[name]):>7.3f} {change:>8} "
                f"{kv_bytes[name] / 1024:>9.0f}"
            )


if __name__ == "__main__":
    main()
