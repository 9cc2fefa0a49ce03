"""The public ensemble step, backed by the compiled op (CPU or CUDA, wherever the logits are)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._ops import ops
from ._step_inputs import EnsembleStep, TablesLike, _tables_pair, prepare_step_inputs
from .defaults import DEFAULT_K


def ensemble_step(
    logits: Sequence[Tensor],
    tables: TablesLike | tuple[Sequence[Tensor], Sequence[Tensor]],
    k: int = DEFAULT_K,
    weights: Sequence[float] | Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> EnsembleStep:
    """One UNITE step over N models' next-token logits (SPEC.md section 2).

    Args:
        logits: one ``[B, V_i]`` float32/bfloat16/float16 tensor per model, all on one device.
        tables: a :class:`~unite_ext.VocabTables` (moved to the logits' device) or a pair
            ``(to_canon, from_canon)`` of int32 tensor lists.
        k: candidates proposed per model, 1..64 (default 10, as in the paper).
        weights: per-model weights >= 0, not all zero; normalised to sum 1 (default uniform).
        temperature: 0 (default) is greedy; > 0 samples with ``P(u) ~ p(u)^(1/T)``.
        top_p: nucleus mass for sampling, in (0, 1] (default 1: no truncation).
        generator: source of the per-row uniform numbers when sampling.
        uniforms: float32 ``[B]`` uniform numbers in [0, 1) to use instead of drawing them.

    Returns:
        :class:`EnsembleStep` with ``next_canon``, ``next_ids``, ``union_ids``, ``union_probs``,
        ``model_probs``, ``top1_prob`` and ``status``. The call never synchronises with the GPU and
        has fixed output shapes, so it can be captured in a CUDA graph.
    """
    args = prepare_step_inputs(logits, tables, k, weights, temperature, top_p, generator, uniforms)
    return EnsembleStep(
        *ops.ensemble_step(
            args.logits,
            args.to_canon,
            args.from_canon,
            args.k,
            args.weights,
            args.temperature,
            args.top_p,
            args.uniforms,
        )
    )


def topk_stats(logits: Tensor, to_canon: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 1 for one model: ``(topk_ids [B, k] int64, topk_logits [B, k] float32, top1_prob [B])``.

    ``topk_ids`` is -1 padded and all -1 for a row that the model cannot vote in (NaN/+inf logits or no
    finite logit). Run it where the model's logits are, then :func:`union_average` on one device.
    """
    return ops.topk_stats(logits, to_canon, k)


def union_average(
    logits: Sequence[Tensor],
    tables: TablesLike | tuple[Sequence[Tensor], Sequence[Tensor]],
    topk: Sequence[tuple[Tensor, Tensor, Tensor]],
    weights: Sequence[float] | Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> EnsembleStep:
    """Stages 2-6 from each model's :func:`topk_stats` result; exactly :func:`ensemble_step`'s outputs."""
    k = topk[0][0].shape[1]
    args = prepare_step_inputs(logits, tables, k, weights, temperature, top_p, generator, uniforms)
    next_canon, next_ids, union_ids, union_probs, model_probs, status = ops.union_average(
        args.logits,
        args.to_canon,
        args.from_canon,
        [t[0] for t in topk],
        [t[1] for t in topk],
        args.weights,
        args.temperature,
        args.top_p,
        args.uniforms,
    )
    top1 = torch.stack([t[2] for t in topk])
    return EnsembleStep(next_canon, next_ids, union_ids, union_probs, model_probs, top1, status)


def _enters_whole(x: Tensor, device: torch.device) -> bool:
    """Whether a model's logits enter `union_average` as they are: they already sit on the step's device."""
    return x.device == device


def ensemble_step_across_devices(
    logits: Sequence[Tensor],
    tables: Sequence[TablesLike | tuple[Sequence[Tensor], Sequence[Tensor]]],
    k: int = DEFAULT_K,
    weights: Sequence[float] | Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> EnsembleStep:
    """:func:`ensemble_step` for models whose logits sit on different devices, without copying them whole.

    ``tables[i]`` are the tables on ``logits[i].device`` (:meth:`VocabTables.to`); the step runs on
    ``logits[0].device``, where its outputs are. A model on another device runs :func:`topk_stats` there,
    receives every model's candidates (``[B, N*k]`` canonical ids) and sends back its logits at their
    tokens, which fill a stand-in row (-inf elsewhere) on the step's device: :func:`union_average` reads
    a model's logits at the union's tokens only. Outputs equal :func:`ensemble_step`'s on the same logits.
    """
    if isinstance(logits, Tensor) or not isinstance(logits, Sequence) or len(logits) == 0:
        raise TypeError("logits must be a non-empty list of [B, V_i] tensors, one per model")
    if len(tables) != len(logits):
        raise ValueError(
            f"tables has {len(tables)} entries but there are {len(logits)} models: one per model"
        )
    pairs = [_tables_pair(t) for t in tables]
    first = logits[0]
    batch = first.shape[0] if isinstance(first, Tensor) and first.dim() == 2 else None
    for i, (x, (to_canon, from_canon)) in enumerate(zip(logits, pairs, strict=True)):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != batch:
            raise ValueError(
                f"logits[{i}] must be a [B, V] tensor with the batch size of logits[0] (a [B, V] tensor), "
                f"got shape {getattr(x, 'shape', None)}"
            )
        if to_canon[i].device != x.device or from_canon[i].device != x.device:
            raise ValueError(
                f"tables[{i}] are on {from_canon[i].device} but logits[{i}] is on {x.device}: "
                "give each model the tables on its logits' device (tables.to(device))"
            )
    device = first.device
    stats = [
        topk_stats(x, to_canon[i], k) for i, (x, (to_canon, _)) in enumerate(zip(logits, pairs, strict=True))
    ]
    # Every model's candidates as canonical ids. Empty slots (-1) and special tokens clamp to real tokens
    # and ids: a model then sends a few more true logits than the union needs, which changes nothing.
    candidates = torch.cat(
        [
            to_canon[i][ids.clamp(min=0)].clamp(min=0).to(device)
            for i, ((ids, _, _), (to_canon, _)) in enumerate(zip(stats, pairs, strict=True))
        ],
        1,
    )
    inputs = []
    for j, (x, (_, from_canon)) in enumerate(zip(logits, pairs, strict=True)):
        if _enters_whole(x, device):
            inputs.append(x)
            continue
        tokens = from_canon[j][candidates.to(x.device).long()].long().clamp(min=0)  # [B, N*k]
        values = x.gather(1, tokens)
        standin = torch.full(x.shape, float("-inf"), dtype=x.dtype, device=device)
        inputs.append(standin.scatter_(1, tokens.to(device), values.to(device)))
    return union_average(
        inputs,
        pairs[0],
        [tuple(t.to(device) for t in s) for s in stats],
        weights,
        temperature,
        top_p,
        generator,
        uniforms,
    )
