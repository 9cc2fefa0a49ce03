"""Inputs and outputs of one ensemble step, shared by the compiled op and the pure-PyTorch reference.

Every check here looks at shapes, dtypes and devices only, so it never synchronises with the GPU and
works under ``torch.compile`` and CUDA-graph capture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

MAX_K = 64
# Per-model parameters travel to the CUDA kernels by value; ``status`` has one bit per model.
MAX_MODELS = 16
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class EnsembleStep(NamedTuple):
    """Outputs of one step (``../SPEC.md`` section 2). ``L = N * k`` is the padded union width."""

    next_canon: Tensor  # int64 [B]: chosen canonical id, -1 when no model could vote
    next_ids: Tensor  # int64 [N, B]: from_canon[i][next_canon], -1 where not representable
    union_ids: Tensor  # int64 [B, L]: union of the top-k candidates, ascending, padded with -1
    union_probs: Tensor  # float32 [B, L]: weighted average p(u), 0 in padding
    model_probs: Tensor  # float32 [N, B, L]: each model's probabilities renormalised over the union
    top1_prob: Tensor  # float32 [N, B]: full-vocabulary probability of each model's own top-1 token
    status: Tensor  # int32 [B]: bit i set when model i was left out of the row (NaN/+inf/no finite logit)


class TablesLike(Protocol):
    to_canon: list[Tensor]
    from_canon: list[Tensor]


class StepInputs(NamedTuple):
    logits: list[Tensor]
    to_canon: list[Tensor]
    from_canon: list[Tensor]
    k: int
    weights: list[float]
    temperature: float
    top_p: float
    uniforms: Tensor | None


def _tables_pair(tables: TablesLike | tuple[Sequence[Tensor], Sequence[Tensor]]) -> tuple[list, list]:
    if hasattr(tables, "to_canon") and hasattr(tables, "from_canon"):
        return list(tables.to_canon), list(tables.from_canon)
    if isinstance(tables, (tuple, list)) and len(tables) == 2:
        return list(tables[0]), list(tables[1])
    raise TypeError(
        "tables must be a VocabTables or a pair (to_canon: list[Tensor], from_canon: list[Tensor])"
    )


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise a ValueError unless `value` is an integer (not a bool) in low..high (no upper bound: None)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_weights(weights: Sequence[float] | Tensor | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    values = weights.tolist() if isinstance(weights, Tensor) else list(weights)
    if len(values) != n:
        raise ValueError(f"weights has {len(values)} entries but there are {n} models")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and >= 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError("weights are all zero: at least one model must have a positive weight")
    return [w / total for w in values]


def prepare_step_inputs(
    logits: Sequence[Tensor],
    tables: TablesLike | tuple[Sequence[Tensor], Sequence[Tensor]],
    k: int,
    weights: Sequence[float] | Tensor | None,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    uniforms: Tensor | None,
) -> StepInputs:
    """Validate the arguments of ``ensemble_step`` and draw the per-row uniforms when sampling."""
    if isinstance(logits, Tensor) or not isinstance(logits, Sequence) or len(logits) == 0:
        raise TypeError("logits must be a non-empty list of [B, V_i] tensors, one per model")
    logits = list(logits)
    n = len(logits)
    if n > MAX_MODELS:
        raise ValueError(f"at most {MAX_MODELS} models can be ensembled, got {n}")
    to_canon, from_canon = _tables_pair(tables)
    if len(to_canon) != n or len(from_canon) != n:
        raise ValueError(
            f"tables describe {len(to_canon)} (to_canon) and {len(from_canon)} (from_canon) models "
            f"but logits has {n}"
        )
    device = logits[0].device
    batch = logits[0].shape[0] if logits[0].dim() == 2 else None
    num_canonical = from_canon[0].shape[0] if from_canon[0].dim() == 1 else None
    for i, (x, tc, fc) in enumerate(zip(logits, to_canon, from_canon, strict=True)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(
                f"logits[{i}] must be a 2-D [B, V] tensor, got shape {getattr(x, 'shape', None)}"
            )
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"logits[{i}] has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.device != device:
            raise ValueError(f"logits[{i}] is on {x.device} but logits[0] is on {device}")
        if x.shape[0] != batch:
            raise ValueError(f"logits[{i}] has batch size {x.shape[0]} but logits[0] has {batch}")
        for name, table in (("to_canon", tc), ("from_canon", fc)):
            if not isinstance(table, Tensor) or table.dtype != torch.int32 or table.dim() != 1:
                raise TypeError(f"tables.{name}[{i}] must be a 1-D int32 tensor")
            if table.device != device:
                raise ValueError(
                    f"tables.{name}[{i}] is on {table.device} but the logits are on {device}; "
                    "move the tables once with tables.to(device)"
                )
        if tc.shape[0] != x.shape[1]:
            raise ValueError(
                f"logits[{i}] has {x.shape[1]} columns but tables.to_canon[{i}] has {tc.shape[0]} entries "
                "(build the tables with the model's config.vocab_size)"
            )
        if fc.shape[0] != num_canonical:
            raise ValueError(
                f"tables.from_canon[{i}] has {fc.shape[0]} entries "
                f"but tables.from_canon[0] has {num_canonical}"
            )
    check_int("k", k, 1, MAX_K)
    weights = _check_weights(weights, n)
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 is greedy), got {temperature}")
    top_p = float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and uniforms is None:
        gen_device = generator.device if generator is not None else device
        uniforms = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    if uniforms is not None:
        if uniforms.shape != (batch,) or uniforms.dtype != torch.float32 or uniforms.device != device:
            raise ValueError(
                f"uniforms must be a float32 tensor of shape [{batch}] on {device}, "
                f"got {tuple(uniforms.shape)} {uniforms.dtype} on {uniforms.device}"
            )
    return StepInputs(logits, to_canon, from_canon, k, weights, temperature, top_p, uniforms)
