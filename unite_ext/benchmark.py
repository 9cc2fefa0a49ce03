"""Micro-benchmark of one ensemble step: the compiled op against the pure-PyTorch reference, and the
op's two stages timed apart.

Run it as ``unite bench`` or ``python bench/bench_step.py`` (same options). Inputs are synthetic but
shaped like real ones: vocabularies of Qwen2 (151936), Llama-3 (128256) and Mistral (32768), a canonical
space of 250k ids, and logits drawn as ``randn * 3`` so that the top-k are not degenerate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from . import reference
from .defaults import DEFAULT_K
from .step import ensemble_step, topk_stats, union_average

# Qwen2, Llama-3 and Mistral: an N-model benchmark uses the first N.
MODEL_VOCAB_SIZES = (151936, 128256, 32768)
NUM_CANONICAL = 250_000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synthetic_tables(
    vocab_sizes: Sequence[int],
    num_canonical: int,
    generator: torch.Generator,
    *,
    eos_tokens: int = 1,
    special_tokens: int = 64,
    subtoken_pool: int | None = None,
    represented: float = 0.5,
) -> tuple[list[Tensor], list[Tensor]]:
    """Random ``(to_canon, from_canon)`` int32 tables with the structure of real ones (SPEC.md section 1).

    For each model, ``eos_tokens`` token ids map to canonical id 0, ``special_tokens`` ids to -1 and the
    rest to distinct random canonical ids in ``1..num_canonical-1``. ``from_canon[c]`` is the model's own
    token for ``c`` when it has one, the first EOS id for ``c = 0``, else (for a fraction ``represented``
    of the other ids, default 0.5) a "first sub-token" drawn from the first ``subtoken_pool`` regular
    tokens (default: all of them; a small pool makes many ids share one sub-token), else -1. Token
    positions are shuffled, so the kinds of token are interleaved. Counts are capped by the vocabulary.
    """
    to_canon: list[Tensor] = []
    from_canon: list[Tensor] = []
    for vocab in vocab_sizes:
        eos = min(eos_tokens, vocab)
        specials = min(special_tokens, vocab - eos)
        num_regular = vocab - eos - specials
        if num_regular > num_canonical - 1:
            raise ValueError(f"{num_regular} regular tokens do not fit in {num_canonical - 1} canonical ids")
        tokens = torch.randperm(vocab, generator=generator)
        regular = tokens[eos + specials :]
        model_to_canon = torch.full((vocab,), -1, dtype=torch.int32)
        model_to_canon[tokens[:eos]] = 0
        canonical = torch.randperm(num_canonical - 1, generator=generator)[:num_regular] + 1
        model_to_canon[regular] = canonical.to(torch.int32)
        model_from_canon = torch.full((num_canonical,), -1, dtype=torch.int32)
        if num_regular:
            pool = regular[: subtoken_pool or num_regular]
            subtoken = pool[torch.randint(len(pool), (num_canonical,), generator=generator)]
            has_subtoken = torch.rand(num_canonical, generator=generator) < represented
            model_from_canon[has_subtoken] = subtoken[has_subtoken].to(torch.int32)
            model_from_canon[canonical] = regular.to(torch.int32)
        model_from_canon[0] = tokens[0] if eos else -1
        to_canon.append(model_to_canon)
        from_canon.append(model_from_canon)
    return to_canon, from_canon


def synthetic_logits(
    batch: int,
    vocab_sizes: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> list[Tensor]:
    """One ``[batch, V_i]`` tensor per model, ``randn * 3`` (drawn on the CPU: the same on any device)."""
    return [
        (torch.randn(batch, v, generator=generator) * 3).to(device=device, dtype=dtype) for v in vocab_sizes
    ]


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA: event timing)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start_s)
    return statistics.median(samples)


def cuda_graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` (whose inputs must stay in place) in a CUDA graph; return the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the graph: allocator pools, lazy initialisation
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class GraphCaptureFailed:
    """Stands for a variant that could not be captured in a CUDA graph; the table shows the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def step_variants(
    logits: list[Tensor],
    tables: tuple[list[Tensor], list[Tensor]],
    k: int,
) -> dict[str, Callable[[], object] | GraphCaptureFailed]:
    """Greedy steps to time, plus their CUDA-graph replays on CUDA.

    "fused" is the op, "reference" the pure-PyTorch step; the op's two stages on their own show where its
    time goes: "top-k" is `topk_stats` on every model (reading every logit), "union" is `union_average`
    on the top-k results.
    """

    def every_topk() -> list[tuple[Tensor, Tensor, Tensor]]:
        return [topk_stats(x, to_canon, k) for x, to_canon in zip(logits, tables[0], strict=True)]

    topk = every_topk()
    eager: dict[str, Callable[[], object]] = {
        "fused": lambda: ensemble_step(logits, tables, k=k),
        "reference": lambda: reference.ensemble_step(logits, tables, k=k),
        "top-k": every_topk,
        "union": lambda: union_average(logits, tables, topk),
    }
    variants: dict[str, Callable[[], object] | GraphCaptureFailed] = dict(eager)
    if logits[0].device.type == "cuda":
        for name, step in eager.items():
            try:
                variants[f"{name} graph"] = cuda_graph_replay(step)
            except RuntimeError as error:  # reported in the table, not hidden
                variants[f"{name} graph"] = GraphCaptureFailed(str(error).splitlines()[0])
    return variants


@dataclass
class BenchRow:
    """Median seconds per step of each variant for one configuration."""

    models: int
    batch: int
    dtype: str
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # variants that could not run, with the reason


def run_benchmark(
    device: torch.device,
    dtypes: Sequence[str],
    batch_sizes: Sequence[int],
    model_counts: Sequence[int],
    k: int,
    repeats: int,
    warmup: int,
    seed: int = 0,
) -> list[BenchRow]:
    """Time the fused op and the reference (and on CUDA both replayed from a CUDA graph), greedy steps."""
    generator = torch.Generator().manual_seed(seed)
    configs = [(n, b, d) for n in model_counts for d in dtypes for b in batch_sizes]
    tables_by_count = {}
    for n in model_counts:
        to_canon, from_canon = synthetic_tables(MODEL_VOCAB_SIZES[:n], NUM_CANONICAL, generator)
        tables_by_count[n] = ([t.to(device) for t in to_canon], [t.to(device) for t in from_canon])
    rows: list[BenchRow] = []
    for n, batch, dtype in tqdm(configs, desc="ensemble step", unit="config"):
        tables = tables_by_count[n]
        logits = synthetic_logits(batch, MODEL_VOCAB_SIZES[:n], DTYPES[dtype], device, generator)
        row = BenchRow(n, batch, dtype)
        for name, fn in step_variants(logits, tables, k).items():
            if isinstance(fn, GraphCaptureFailed):
                row.failures[name] = fn.reason
            else:
                row.seconds[name] = median_seconds(fn, device, repeats, warmup)
        rows.append(row)
    return rows


def _ratio(row: BenchRow, slow: str, fast: str) -> str:
    if slow in row.seconds and fast in row.seconds:
        return f"{row.seconds[slow] / row.seconds[fast]:.1f}x"
    return "n/a"


def format_table(rows: Sequence[BenchRow], k: int, device_name: str) -> str:
    """Markdown table: microseconds per step and the speed-up of the fused op over the reference."""
    names = [*rows[0].seconds, *rows[0].failures]
    graphs = "fused graph" in names
    header = ["N", "vocabularies", "B", "dtype", *[f"{name} (µs)" for name in names], "reference / fused"]
    if graphs:
        header.append("reference graph / fused graph")
    lines = [
        f"Ensemble step, k={k}, on {device_name} (median per step)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    failures: dict[str, str] = {}
    for row in rows:
        vocabularies = " + ".join(str(v) for v in MODEL_VOCAB_SIZES[: row.models])
        cells = [str(row.models), vocabularies, str(row.batch), row.dtype]
        cells += [f"{row.seconds[name] * 1e6:,.1f}" if name in row.seconds else "failed" for name in names]
        cells.append(_ratio(row, "reference", "fused"))
        if graphs:
            cells.append(_ratio(row, "reference graph", "fused graph"))
        lines.append("| " + " | ".join(cells) + " |")
        failures.update(row.failures)
    lines += ["", *[f"{name} failed: {reason}" for name, reason in failures.items()]] if failures else []
    return "\n".join(lines) + "\n"


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _names_from(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """Parser of a comma-separated list of names taken from ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [part for part in text.split(",") if part]
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(allowed)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unite bench", description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device", default=default_device, help=f"device to time on (default {default_device})"
    )
    parser.add_argument(
        "--dtypes",
        type=_names_from(list(DTYPES), "dtype(s)"),
        default=["float32", "bfloat16"],
        help="comma-separated (default float32,bfloat16)",
    )
    parser.add_argument(
        "--batch-sizes", type=_int_list, default=[1, 8, 64], help="comma-separated (default 1,8,64)"
    )
    parser.add_argument("--models", type=_int_list, default=[2, 3], help="model counts, 1..3 (default 2,3)")
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"candidates per model (default {DEFAULT_K})"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (default 0)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table (and write it with ``--out``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch.cuda.is_available() is False")
    if any(not 1 <= n <= len(MODEL_VOCAB_SIZES) for n in args.models):
        parser.error(f"--models must be in 1..{len(MODEL_VOCAB_SIZES)}, got {args.models}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    rows = run_benchmark(
        device,
        args.dtypes,
        args.batch_sizes,
        args.models,
        args.k,
        args.repeats,
        args.warmup,
        args.seed,
    )
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    table = format_table(rows, args.k, device_name)
    print(table, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(table)
    return 0
