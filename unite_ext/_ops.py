"""Loads the compiled ops and gives them fake (meta) implementations for torch.compile and opcheck.

The schemas are defined once, in csrc/torch_bindings.cpp; the shapes below follow SPEC.md section 2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (importing the library registers the ops)

ops = torch.ops.unite_ext


@torch.library.register_fake("unite_ext::topk_stats")
def _topk_stats_fake(logits: Tensor, to_canon: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    batch = logits.shape[0]
    return (
        logits.new_empty((batch, k), dtype=torch.int64),
        logits.new_empty((batch, k), dtype=torch.float32),
        logits.new_empty((batch,), dtype=torch.float32),
    )


def _choice_outputs(logits: list[Tensor], k: int) -> tuple[Tensor, ...]:
    n, batch = len(logits), logits[0].shape[0]
    width = n * k
    x = logits[0]
    return (
        x.new_empty((batch,), dtype=torch.int64),
        x.new_empty((n, batch), dtype=torch.int64),
        x.new_empty((batch, width), dtype=torch.int64),
        x.new_empty((batch, width), dtype=torch.float32),
        x.new_empty((n, batch, width), dtype=torch.float32),
    )


@torch.library.register_fake("unite_ext::union_average")
def _union_average_fake(
    logits, to_canon, from_canon, topk_ids, topk_logits, weights, temperature, top_p, uniforms
) -> tuple[Tensor, ...]:
    status = logits[0].new_empty((logits[0].shape[0],), dtype=torch.int32)
    return (*_choice_outputs(logits, topk_ids[0].shape[1]), status)


@torch.library.register_fake("unite_ext::ensemble_step")
def _ensemble_step_fake(
    logits, to_canon, from_canon, k, weights, temperature, top_p, uniforms
) -> tuple[Tensor, ...]:
    n, batch = len(logits), logits[0].shape[0]
    top1 = logits[0].new_empty((n, batch), dtype=torch.float32)
    status = logits[0].new_empty((batch,), dtype=torch.int32)
    return (*_choice_outputs(logits, k), top1, status)
