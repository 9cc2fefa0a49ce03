"""pytest-benchmark timings of one CPU ensemble step, fused op against the PyTorch reference.

Not part of the test run (tests/ is the test path). Run:
``.venv/bin/python -m pytest bench/test_bench_step.py --benchmark-columns=median,iqr,rounds``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import unite_ext
from unite_ext.benchmark import MODEL_VOCAB_SIZES, NUM_CANONICAL, synthetic_logits, synthetic_tables

VOCAB_SIZES = MODEL_VOCAB_SIZES[:2]  # Qwen2 + Llama-3
K = 10
STEPS: dict[str, Callable[..., unite_ext.EnsembleStep]] = {
    "fused": unite_ext.ensemble_step,
    "reference": unite_ext.reference.ensemble_step,
}


Tables = tuple[list[Tensor], list[Tensor]]


@pytest.fixture(scope="module")
def tables() -> Tables:
    return synthetic_tables(VOCAB_SIZES, NUM_CANONICAL, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("step", list(STEPS))
def test_ensemble_step_cpu(benchmark, tables: Tables, step: str, batch: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    logits = synthetic_logits(batch, VOCAB_SIZES, torch.float32, torch.device("cpu"), generator)
    benchmark.group = f"N=2 {'+'.join(map(str, VOCAB_SIZES))} k={K} fp32 B={batch}"
    result = benchmark(STEPS[step], logits, tables, k=K)
    assert result.next_canon.shape == (batch,)
