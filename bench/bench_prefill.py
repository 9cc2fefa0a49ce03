"""Memory and time of reading long prompts in one forward pass or in several (`max_pass_tokens`), and of
reading a batch's common prefix once.

Two tiny random models (the Qwen2-style and Llama-style pair of `bench_decode.py`, wider by default)
read a batch of long prompts (the GSM8K prompt of `unite eval` repeated, a different first word per row,
so that no row shares a prefix with another) and decode a few tokens, once per pass budget: "one pass"
reads every prompt in a single forward pass, a number is `max_pass_tokens`. "passes" is how many forward
passes the first model's prompts took; "peak MiB" is the most memory the run took above what it held
when it began (CPU: the process's resident memory, its peak reset before each run; CUDA: the allocator's
peak), so it counts the activations and attention masks of the passes, not the weights; "vs one pass" is
the median over runs of a run's time to the one-pass run made next to it. The texts must be the same
(they are compared). A second table times few-shot prompts (`common_prefix`).

    python bench/bench_prefill.py [--device cpu|cuda] [--batch-sizes 1 8 32] [--copies 4]
                                  [--budgets 16384 4096 1024] [--new-tokens 4] [--repeats 3]
                                  [--hidden-size 256] [--layers 2] [--attention sdpa|eager] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from unittest import mock

import torch
from bench_decode import PROMPTS, build_models, load_tokenizers, synchronize, versus
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import unite_ext.decode
from unite_ext.decode import SHARED_PREFIX_MIN_SAVING, Ensemble, _ModelBatch

ONE_PASS = 1 << 40  # a budget no batch reaches
T = TypeVar("T")


def resident_kib(field: str) -> int:
    """The process's current ("VmRSS") or peak ("VmHWM") resident memory, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def start_peak(device: str) -> int:
    """Reset the peak memory gauge; returns the memory held now, in bytes."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory goes back, so that the peak starts from here
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory is now the current one
    return resident_kib("VmRSS") * 1024


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else resident_kib("VmHWM") * 1024


def measured(run: Callable[[], T], device: str) -> tuple[float, int, T]:
    """Seconds `run` takes, the peak memory above its start in bytes, and what it returns."""
    synchronize(device)
    held = start_peak(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, peak(device) - held, result


@contextlib.contextmanager
def counting_reads() -> Iterator[dict[str, int]]:
    """`_ModelBatch.read` patched to count, in the dict it gives, the rows and tokens the first model
    reads."""
    counts = {"rows": 0, "tokens": 0}
    read = _ModelBatch.read

    def counted(run: _ModelBatch, feeds: list[list[int]], keep: int) -> Iterator[tuple[int, torch.Tensor]]:
        if run.member.index == 0:
            counts["rows"] += len(feeds)
            counts["tokens"] += sum(map(len, feeds))
        return read(run, feeds, keep)

    with mock.patch.object(_ModelBatch, "read", counted):
        yield counts


def add_model_options(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options of `tiny_pair`'s models, and of the runs."""
    parser.add_argument("--device", default="cpu", help="device of the models (default cpu)")
    parser.add_argument("--repeats", type=int, default=repeats, help="runs per measurement (median shown)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def tiny_pair(args: argparse.Namespace) -> tuple[str, list[PreTrainedTokenizerBase], list[PreTrainedModel]]:
    """The tokenizers' description, the tokenizers and the two tiny models (Qwen2- and Llama-style) that
    `add_model_options`' options describe; sets torch's CPU threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    description, toks, vocab_sizes = load_tokenizers("real")
    models = build_models(toks, vocab_sizes, args.hidden_size, args.layers, args.device, "llama")
    return description, toks, models


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--copies", type=int, default=4, help="copies of the GSM8K prompt in each row")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[16384, 4096, 1024], help="max_pass_tokens values"
    )
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    add_model_options(parser, repeats=3)
    args = parser.parse_args()
    description, toks, models = tiny_pair(args)
    for model in models:
        model.set_attn_implementation(args.attention)
        model.config.max_position_embeddings = 1 << 15  # RoPE reaches past the tiny configs' 1024
    budgets = [ONE_PASS, *args.budgets]
    ensembles = {budget: Ensemble(models, toks, max_pass_tokens=budget) for budget in budgets}
    # Rows that differ in their first words.
    prompts = [f"{n}. {PROMPTS['gsm8k'] * args.copies}" for n in range(max(args.batch_sizes))]
    ensembles[ONE_PASS].generate(prompts[:1], max_new_tokens=2, progress=False)  # warm-up
    width = max(len(toks[0](p)["input_ids"]) for p in prompts)
    print(
        f"device {args.device}, tokenizers {description}, hidden size {args.hidden_size}, {args.layers} "
        f"layers, {args.attention} attention, prompts of up to {width} tokens (first model), "
        f"{args.new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
        f"median of {args.repeats} runs"
    )
    header = f"{'batch':>5} {'budget':>9} {'passes':>6} | {'s/run':>7} {'vs one pass':>11} {'peak MiB':>9}"
    print(header, "-" * len(header), sep="\n")
    for batch in args.batch_sizes:
        rows = prompts[:batch]
        times: dict[int, list[float]] = {budget: [] for budget in budgets}
        peaks: dict[int, list[int]] = {budget: [] for budget in budgets}
        texts = {}
        for _ in range(args.repeats):
            for budget in budgets:
                seconds, most, texts[budget] = measured(
                    functools.partial(
                        ensembles[budget].generate,
                        rows,
                        max_new_tokens=args.new_tokens,
                        batch_size=len(rows),
                        progress=False,
                    ),
                    args.device,
                )
                times[budget].append(seconds)
                peaks[budget].append(most)
        for budget in budgets:
            assert texts[budget] == texts[ONE_PASS], f"passes of {budget} tokens changed the texts"
            name = "one pass" if budget == ONE_PASS else str(budget)
            passes = -(-width // max(1, budget // batch))
            change = versus(times, budget, ONE_PASS)
            print(
                f"{batch:>5} {name:>9} {passes:>6} | {statistics.median(times[budget]):>7.3f} {change:>11} "
                f"{statistics.median(peaks[budget]) / 2**20:>9.0f}"
            )
    common_prefix(args, models, toks)


def common_prefix(
    args: argparse.Namespace, models: list[PreTrainedModel], toks: list[PreTrainedTokenizerBase]
) -> None:
    """Few-shot prompts: the repeated GSM8K prompt, then a question of a few tokens per row. "once" reads
    their common prefix once, in a row of its own whose cache every row copies (`_new_batch`), "per row"
    reads every prompt whole (`SHARED_PREFIX_MIN_SAVING` out of reach), at the default pass budget;
    "tokens" is what the first model read, "vs per row" as "vs one pass" above."""
    prompts = [
        f"{PROMPTS['gsm8k'] * args.copies} Question {n}: how many?" for n in range(max(args.batch_sizes))
    ]
    ensemble = Ensemble(models, toks)
    least_saving = {"once": SHARED_PREFIX_MIN_SAVING, "per row": ONE_PASS}
    print(f"\nfew-shot prompts, {args.new_tokens} new tokens")
    header = f"{'batch':>5} {'prefix':>7} | {'tokens':>7} {'s/run':>7} {'vs per row':>10} {'peak MiB':>9}"
    print(header, "-" * len(header), sep="\n")
    for batch in args.batch_sizes:
        times: dict[str, list[float]] = {name: [] for name in least_saving}
        peaks: dict[str, list[int]] = {name: [] for name in least_saving}
        texts, tokens = {}, {}
        for _ in range(args.repeats):
            for name, saving in least_saving.items():
                run = functools.partial(
                    ensemble.generate,
                    prompts[:batch],
                    max_new_tokens=args.new_tokens,
                    batch_size=batch,
                    progress=False,
                )
                with (
                    mock.patch.object(unite_ext.decode, "SHARED_PREFIX_MIN_SAVING", saving),
                    counting_reads() as counts,
                ):
                    seconds, most, texts[name] = measured(run, args.device)
                times[name].append(seconds)
                peaks[name].append(most)
                tokens[name] = counts["tokens"]
        for name in least_saving:
            assert texts[name] == texts["per row"], "reading the common prefix once changed the texts"
            print(
                f"{batch:>5} {name:>7} | {tokens[name]:>7} {statistics.median(times[name]):>7.3f} "
                f"{versus(times, name, 'per row'):>10} {statistics.median(peaks[name]) / 2**20:>9.0f}"
            )


if __name__ == "__main__":
    main()
