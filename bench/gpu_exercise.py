"""Calls every CUDA op of unite_ext at a few sizes and checks each against the CPU op.

Short on purpose: compute-sanitizer (memcheck, racecheck) runs it. Exits non-zero on a mismatch.
With --profile it only runs the benchmark's target steps once each (N = 2, Qwen2 + Llama-3
vocabularies, k = 10, bf16, B = 1 and 64: three kernel launches apiece), with each CUDA warp list, for
`ncu` to read. With --timeline it times each kernel of those steps with the PyTorch profiler (no hardware
counters needed, unlike ncu), eager and replayed from a CUDA graph, and prints a markdown table.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Iterator

import torch
from torch.autograd import DeviceType

import unite_ext
from unite_ext.benchmark import (
    MODEL_VOCAB_SIZES,
    NUM_CANONICAL,
    cuda_graph_replay,
    cuda_topk_list,
    synthetic_logits,
    synthetic_tables,
)
from unite_ext.step import CUDA_TOPK_LISTS

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
    failures = 0
    for vocab_sizes, batch, k, dtype in CASES:
        to_canon, from_canon = random_tables(vocab_sizes, 3000, gen)
        logits = [(torch.randn(batch, v, generator=gen) * 3).to(dtype) for v in vocab_sizes]
        logits[0][0, 3] = float("nan")  # row 0 of model 0 is left out
        uniforms = torch.rand(batch, generator=gen)
        for temperature, top_p in ((0.0, 1.0), (0.8, 0.9)):
            cpu = unite_ext.ensemble_step(
                logits, (to_canon, from_canon), k, None, temperature, top_p, None, uniforms
            )
            gpu = unite_ext.ensemble_step(
                [x.cuda() for x in logits],
                ([t.cuda() for t in to_canon], [t.cuda() for t in from_canon]),
                k,
                None,
                temperature,
                top_p,
                None,
                uniforms.cuda(),
            )
            stages = unite_ext.union_average(
                [x.cuda() for x in logits],
                ([t.cuda() for t in to_canon], [t.cuda() for t in from_canon]),
                [unite_ext.topk_stats(x.cuda(), t.cuda(), k) for x, t in zip(logits, to_canon, strict=True)],
                None,
                temperature,
                top_p,
                None,
                uniforms.cuda(),
            )
            for name, a, b, c in zip(cpu._fields, cpu, gpu, stages, strict=True):
                b, c = b.cpu(), c.cpu()
                same = torch.equal(b, c) and (
                    torch.allclose(a, b, atol=1e-5) if a.is_floating_point() else torch.equal(a, b)
                )
                if not same:
                    failures += 1
                    print(f"MISMATCH {name} vocab={vocab_sizes} B={batch} k={k} {dtype} T={temperature}")
    torch.cuda.synchronize()
    print("gpu_exercise:", "ok" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


def target_steps() -> Iterator[tuple[int, str, Callable[[], object]]]:
    """(batch, warp list, step) for the benchmark's targets; the step runs under its warp list."""
    generator = torch.Generator().manual_seed(0)
    vocab_sizes = MODEL_VOCAB_SIZES[:2]
    to_canon, from_canon = synthetic_tables(vocab_sizes, NUM_CANONICAL, generator)
    tables = ([t.cuda() for t in to_canon], [t.cuda() for t in from_canon])
    for batch in (1, 64):
        logits = synthetic_logits(batch, vocab_sizes, torch.bfloat16, torch.device("cuda"), generator)
        for warp_list in CUDA_TOPK_LISTS:

            def step(warp_list: str = warp_list, logits: list[torch.Tensor] = logits) -> object:
                with cuda_topk_list(warp_list):
                    return unite_ext.ensemble_step(logits, tables, k=10)

            yield batch, warp_list, step


def profile() -> int:
    for _, _, step in target_steps():  # the kernels' names say which warp list they ran with
        step()
    torch.cuda.synchronize()
    return 0


KERNELS = ("topk_partial", "topk_finalize", "union_average")  # one launch each per target step


def timeline(repeats: int = 50) -> int:
    """Median GPU time of each kernel of a step, and of the step's span (first kernel's start to last
    kernel's end: launch gaps included), over ``repeats`` steps run one at a time. Where launches overlap
    (sm_90 and later), a kernel's time includes its wait for the kernel before it."""
    print("| B | warp list | mode | " + " | ".join(f"{name} (µs)" for name in KERNELS) + " | span (µs) |")
    print("|---|---|---|" + "---|" * (len(KERNELS) + 1))
    for batch, warp_list, step in target_steps():
        for mode, run in (("eager", step), ("graph", cuda_graph_replay(step))):
            for _ in range(5):
                run()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
                for _ in range(repeats):
                    run()
                    torch.cuda.synchronize()
            kernels = [e for e in trace.events() if e.device_type == DeviceType.CUDA]
            events = sorted(
                (e for e in kernels if any(name in e.name for name in KERNELS)),
                key=lambda e: e.time_range.start,
            )
            expected = repeats * len(KERNELS)
            if len(events) != expected:
                print(f"| {batch} | {warp_list} | {mode} | {len(events)} kernels seen, {expected} expected |")
                continue
            steps = [events[i : i + len(KERNELS)] for i in range(0, len(events), len(KERNELS))]
            durations = [
                statistics.median(e.time_range.elapsed_us() for s in steps for e in s if name in e.name)
                for name in KERNELS
            ]
            span = statistics.median(s[-1].time_range.end - s[0].time_range.start for s in steps)
            cells = " | ".join(f"{d:.1f}" for d in [*durations, span])
            print(f"| {batch} | {warp_list} | {mode} | {cells} |")
    return 0


if __name__ == "__main__":
    modes = {"--profile": profile, "--timeline": timeline}
    sys.exit(modes[sys.argv[1]]() if sys.argv[1:2] and sys.argv[1] in modes else main())
