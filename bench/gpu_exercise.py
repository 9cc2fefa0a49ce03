"""Calls every CUDA op of unite_ext at a few sizes and checks each against the CPU op.

Short on purpose: compute-sanitizer (memcheck, racecheck) runs it. Exits non-zero on a mismatch.
With --profile it only runs the benchmark's target steps once each (N = 2, Qwen2 + Llama-3 vocabularies,
k = 10, bf16, B = 1 and 64: three kernel launches apiece), for `ncu` to read. With --timeline it times each
kernel of those steps with the PyTorch profiler (no hardware counters needed, unlike ncu) and the host's time
per call, eager (with and without the Python layer) and replayed from a CUDA graph, and prints a markdown
table.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch.autograd import DeviceType

import unite_ext
from unite_ext._ops import ops
from unite_ext._step_inputs import prepare_step_inputs
from unite_ext.benchmark import (
    MODEL_VOCAB_SIZES,
    NUM_CANONICAL,
    cuda_graph_replay,
    synthetic_logits,
    synthetic_tables,
)
from unite_ext.defaults import DEFAULT_K

# (vocabulary sizes, batch, k, dtype): odd sizes exercise unaligned rows, k > V empty slots, k > 32
# the two-slot warp lists.
CASES = [
    ((1000, 777), 1, 10, torch.float32),
    ((33, 4097, 9001), 5, 64, torch.bfloat16),
    ((151936, 128256), 2, 10, torch.bfloat16),
    ((7, 50), 3, 40, torch.float16),
    (tuple(range(60, 140, 10)), 2, 64, torch.float32),  # 8 models: the union kernel takes them in 2 passes
]


def random_tables(vocab_sizes: tuple[int, ...], num_canonical: int, gen: torch.Generator):
    to_canon = [torch.randint(-1, num_canonical, (v,), generator=gen, dtype=torch.int32) for v in vocab_sizes]
    from_canon = [
        torch.randint(-1, v, (num_canonical,), generator=gen, dtype=torch.int32) for v in vocab_sizes
    ]
    return to_canon, from_canon


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    failures = sum(exercise_case(*case, gen) for case in CASES)
    torch.cuda.synchronize()
    print("gpu_exercise:", "ok" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


def exercise_case(
    vocab_sizes: tuple[int, ...], batch: int, k: int, dtype: torch.dtype, gen: torch.Generator
) -> int:
    """Runs one case of CASES greedy and sampling; returns the number of mismatched outputs."""
    failures = 0
    to_canon, from_canon = random_tables(vocab_sizes, 3000, gen)
    logits = [(torch.randn(batch, v, generator=gen) * 3).to(dtype) for v in vocab_sizes]
    logits[0][0, 3] = float("nan")  # row 0 of model 0 is left out
    uniforms = torch.rand(batch, generator=gen)
    tables = (to_canon, from_canon)
    on_gpu = [x.cuda() for x in logits]
    gpu_tables = ([t.cuda() for t in to_canon], [t.cuda() for t in from_canon])
    for temperature, top_p in ((0.0, 1.0), (0.8, 0.9)):
        cpu = unite_ext.ensemble_step(logits, tables, k, None, temperature, top_p, None, uniforms)
        gpu = unite_ext.ensemble_step(on_gpu, gpu_tables, k, None, temperature, top_p, None, uniforms.cuda())
        topk = [unite_ext.topk_stats(x, t, k) for x, t in zip(on_gpu, gpu_tables[0], strict=True)]
        stages = unite_ext.union_average(
            on_gpu, gpu_tables, topk, None, temperature, top_p, None, uniforms.cuda()
        )
        for name, a, b, c in zip(cpu._fields, cpu, gpu, stages, strict=True):
            b, c = b.cpu(), c.cpu()
            same = torch.equal(b, c) and (
                torch.allclose(a, b, atol=1e-5) if a.is_floating_point() else torch.equal(a, b)
            )
            if not same:
                failures += 1
                print(f"MISMATCH {name} {vocab_sizes=} B={batch} {k=} {dtype} T={temperature}")
    return failures


TargetStep = tuple[int, list[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]


def target_steps() -> Iterator[TargetStep]:
    """(batch, logits, tables) of the benchmark's targets: N = 2, bf16, B = 1 and 64, on the GPU (k is
    DEFAULT_K, 10)."""
    generator = torch.Generator().manual_seed(0)
    vocab_sizes = MODEL_VOCAB_SIZES[:2]
    to_canon, from_canon = synthetic_tables(vocab_sizes, NUM_CANONICAL, generator)
    tables = ([t.cuda() for t in to_canon], [t.cuda() for t in from_canon])
    for batch in (1, 64):
        logits = synthetic_logits(batch, vocab_sizes, torch.bfloat16, torch.device("cuda"), generator)
        yield batch, logits, tables


def profile() -> int:
    for _, logits, tables in target_steps():
        unite_ext.ensemble_step(logits, tables, k=DEFAULT_K)
    torch.cuda.synchronize()
    return 0


KERNELS = ("topk_partial", "topk_finalize", "union_average")  # one launch each per target step


def host_microseconds(run: Callable[[], object], repeats: int) -> float:
    """Host time per call of ``run`` over ``repeats`` calls queued without waiting for the GPU."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / repeats * 1e6


def step_modes(
    logits: list[torch.Tensor], tables: tuple[list[torch.Tensor], list[torch.Tensor]]
) -> tuple[tuple[str, Callable[[], object]], ...]:
    """The target step three ways: the public function, the compiled op on checked arguments (without the
    Python layer's checks) and a CUDA-graph replay."""
    step = functools.partial(unite_ext.ensemble_step, logits, tables, k=DEFAULT_K)
    args = prepare_step_inputs(logits, tables, DEFAULT_K, None, 0.0, 1.0, None, None)
    op = functools.partial(ops.ensemble_step, *args)
    return (("eager", step), ("op only", op), ("graph", cuda_graph_replay(step)))


def kernel_timeline(run: Callable[[], object], repeats: int) -> str:
    """The cells of one row of the table that timeline prints (see there)."""
    for _ in range(5):
        run()
    host = host_microseconds(run, repeats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
        for _ in range(repeats):
            run()
            torch.cuda.synchronize()
    kernels = [e for e in trace.events() if e.device_type == DeviceType.CUDA]
    events = sorted(
        (e for e in kernels if any(name in e.name for name in KERNELS)), key=lambda e: e.time_range.start
    )
    expected = repeats * len(KERNELS)
    if len(events) != expected:
        return f"{len(events)} kernels seen, {expected} expected |" + " |" * len(KERNELS) + f" {host:.1f}"
    steps = [events[i : i + len(KERNELS)] for i in range(0, len(events), len(KERNELS))]
    durations = [
        statistics.median(e.time_range.elapsed_us() for s in steps for e in s if name in e.name)
        for name in KERNELS
    ]
    span = statistics.median(s[-1].time_range.end - s[0].time_range.start for s in steps)
    return " | ".join(f"{d:.1f}" for d in [*durations, span, host])


def timeline(repeats: int = 50) -> int:
    """Per mode (step_modes): median GPU time of each kernel of a step and of the step's span (first
    kernel's start to last kernel's end: launch gaps included) over ``repeats`` steps run one at a time,
    and the host's time per call over ``repeats`` calls queued back to back. Where launches overlap (sm_90
    and later), a kernel's time includes its wait for the kernel before it. An eager step whose host time
    exceeds its span is bound by the host."""
    columns = [f"{name} (µs)" for name in KERNELS] + ["span (µs)", "host (µs)"]
    print("| B | mode | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for batch, logits, tables in target_steps():
        for mode, run in step_modes(logits, tables):
            print(f"| {batch} | {mode} | {kernel_timeline(run, repeats)} |")
    return 0


if __name__ == "__main__":
    modes = {(): main, ("--profile",): profile, ("--timeline",): timeline}
    arguments = tuple(sys.argv[1:])
    if arguments not in modes:  # a mistyped option must not run the sanitizers' exercise instead
        sys.exit(f"usage: {sys.argv[0]} [--profile | --timeline], got {' '.join(arguments)}")
    sys.exit(modes[arguments]())
