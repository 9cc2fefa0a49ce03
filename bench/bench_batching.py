"""Rows joining a batch as others finish, against batches decoded to their end one after the other, and
against rows decoded one at a time.

Two tiny random models (the Qwen2- and Llama-style pair of `bench_decode.py`, or `--second`, a recurrent
model type, which reads each row of a batch in passes of its own) decode --rows prompts (the GSM8K prompt
with a different last word each) in batches of --batch-size. The rows end at different steps: each text
stops at a stop string taken from its own free-running text at a random depth. "one by one" decodes the
rows one at a time (batch size 1); "static" decodes the prompts a batch at a time, each batch until its
last row ends (finished rows leave it, so its last steps run with few rows); "joining" is `generate`
itself, where waiting rows read their prompts and join the batch once at most half of it is left. All give
the same texts (asserted). Columns: loop steps (ensemble steps), the mean rows per step, the forward
passes each model ran, the tokens the models read in all (prompts and new tokens, not padding), seconds
per run (median) and the median ratio of the runs made next to each other. Where a pass costs about the
same at any batch size (a GPU decoding a large model), time follows the passes; on a CPU, the tokens read.

    python bench/bench_batching.py [--device cpu|cuda] [--rows 32] [--batch-size 8] [--new-tokens 64]
                                   [--second llama|<recurrent model type>] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from unittest import mock

import torch
from bench_decode import PROMPTS, build_models, load_tokenizers, synchronize, versus
from tiny_models import RECURRENT_OVERRIDES

from unite_ext import decode
from unite_ext.decode import Ensemble, Generation, StepTrace


class Counter:
    """Loop steps, rows per step, forward passes per model and tokens read by the models over a run."""

    def __init__(self, models: int) -> None:
        self.steps = 0
        self.rows = 0
        self.passes = [0] * models
        self.tokens = 0

    def on_step(self, trace: StepTrace) -> None:
        self.steps += 1
        self.rows += len(trace.rows)


def run(
    ensemble: Ensemble, prompts: list[str], batch: int, new_tokens: int, stops: list[str], joining: bool
) -> tuple[float, Counter, list[Generation]]:
    """Seconds, counts and texts of decoding `prompts` with rows joining, or a batch at a time."""
    counter = Counter(len(ensemble.members))
    read = decode._ModelBatch._pass

    def counted(model_batch: decode._ModelBatch, feeds: list[list[int]], keep: int) -> torch.Tensor:
        counter.passes[model_batch.member.index] += 1
        counter.tokens += sum(map(len, feeds))
        return read(model_batch, feeds, keep)

    options = {"max_new_tokens": new_tokens, "stop": stops, "batch_size": batch, "progress": False}
    groups = [prompts] if joining else [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    device = ensemble.members[0].input_device.type
    with mock.patch.object(decode._ModelBatch, "_pass", counted):
        synchronize(device)
        start = time.perf_counter()
        texts = [g for group in groups for g in ensemble.generate(group, on_step=counter.on_step, **options)]
        synchronize(device)
    return time.perf_counter() - start, counter, texts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="device of the models and the step (default cpu)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--second",
        choices=("llama", *sorted(RECURRENT_OVERRIDES)),
        default="llama",
        help="the second model: Llama-style (default) or a recurrent model type",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    description, toks, vocab_sizes = load_tokenizers("real")
    ensemble = Ensemble(build_models(toks, vocab_sizes, 64, 2, args.device, args.second), toks)
    prompts = [f"{PROMPTS['gsm8k']} {n}" for n in range(args.rows)]
    free = ensemble.generate(
        prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size, progress=False
    )
    # Six characters, so that a row seldom meets another row's stop string first.
    depths = random.Random(0)
    stops = []
    for g in free:
        depth = depths.randrange(len(g.text) - 6) if len(g.text) > 6 else 0
        if g.text[depth : depth + 6].strip():
            stops.append(g.text[depth : depth + 6])
    # Each variant: its batch size, and whether rows join the batch (one `generate` call for all rows).
    variants = {
        "one by one": (1, True),
        "static": (args.batch_size, False),
        "joining": (args.batch_size, True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    counts, texts = {}, {}
    for _ in range(args.repeats):
        for name, (batch, joining) in variants.items():
            seconds, counts[name], texts[name] = run(
                ensemble, prompts, batch, args.new_tokens, stops, joining
            )
            times[name].append(seconds)
    for name in variants:
        assert texts[name] == texts["one by one"], f"{name} changed the texts"
    lengths = [g.num_steps for g in texts["static"]]
    print(
        f"device {args.device}, tokenizers {description}, second model {args.second}, {args.rows} rows in "
        f"batches of {args.batch_size}, up to {args.new_tokens} new tokens (rows took "
        f"{min(lengths)}-{max(lengths)} steps, mean {statistics.mean(lengths):.1f}), torch threads "
        f"{torch.get_num_threads()}, median of {args.repeats} runs"
    )
    header = (
        f"{'batching':>10} | {'steps':>6} {'rows/step':>9} {'passes':>11} {'tokens read':>11} {'s/run':>7} "
        f"{'vs static':>9}"
    )
    print(header, "-" * len(header), sep="\n")
    for name, counter in counts.items():
        seconds = statistics.median(times[name])
        passes = " + ".join(map(str, counter.passes))
        print(
            f"{name:>10} | {counter.steps:>6} {counter.rows / counter.steps:>9.2f} {passes:>11} "
            f"{counter.tokens:>11} {seconds:>7.3f} {versus(times, name, 'static'):>9}"
        )


if __name__ == "__main__":
    main()
