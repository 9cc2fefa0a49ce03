"""Pure-PyTorch ensemble step: the baseline of the benchmarks and an oracle of the tests.

Vectorised over rows and tokens (the only Python loop is over the N models). It follows
``SPEC.md`` section 2 step by step; the compiled op must give the same outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._step_inputs import EnsembleStep, TablesLike, prepare_step_inputs
from .defaults import DEFAULT_K

NEG_INF = float("-inf")


def topk_stats(logits: Tensor, to_canon: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 0-1 for one model: top-k token ids (-1 padded; all -1 when the row is unusable),
    their float32 logits (-inf padded) and the full-vocabulary probability of the top-1 token."""
    x = logits.float()
    bad = torch.isnan(x).any(1) | (x == float("inf")).any(1)
    candidates = x.masked_fill((to_canon < 0).unsqueeze(0) | torch.isnan(x), NEG_INF)
    kk = min(k, x.shape[1])
    # Ties at the k-th value go to the smaller token ids: keep everything above the threshold and
    # the first `need` tokens equal to it.
    threshold = candidates.topk(kk, dim=1).values[:, -1:]
    above = candidates > threshold
    at = (candidates == threshold) & (threshold > NEG_INF)
    need = kk - above.sum(1, keepdim=True)
    chosen = above | (at & (at.cumsum(1) <= need))
    values, ids = torch.where(chosen, candidates, NEG_INF).topk(kk, dim=1)
    # Order the chosen tokens by (logit desc, id asc).
    ids = torch.where(values > NEG_INF, ids, x.shape[1])
    order = torch.argsort(ids, dim=1, stable=True)
    ids, values = ids.gather(1, order), values.gather(1, order)
    order = torch.argsort(-values, dim=1, stable=True)
    ids, values = ids.gather(1, order), values.gather(1, order)
    usable = ~bad & (values[:, 0] > NEG_INF)
    ids = torch.where(usable.unsqueeze(1) & (values > NEG_INF), ids, -1)
    values = torch.where(ids >= 0, values, NEG_INF)
    if kk < k:
        ids = torch.nn.functional.pad(ids, (0, k - kk), value=-1)
        values = torch.nn.functional.pad(values, (0, k - kk), value=NEG_INF)
    row_max = x.masked_fill(torch.isnan(x), NEG_INF).max(1).values
    sum_exp = torch.exp(x - row_max.unsqueeze(1)).nansum(1)
    top1 = torch.where(usable, torch.exp(values[:, 0] - row_max) / sum_exp, 0.0)
    return ids.long(), values, top1.float()


def union_average(
    logits: Sequence[Tensor],
    to_canon: Sequence[Tensor],
    from_canon: Sequence[Tensor],
    topk_ids: Sequence[Tensor],
    topk_logits: Sequence[Tensor],
    weights: Sequence[float],
    temperature: float,
    top_p: float,
    uniforms: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Steps 2-6: union, gather, renormalise, average, choose."""
    n = len(logits)
    batch, k = topk_ids[0].shape
    width = n * k
    device = logits[0].device
    usable = torch.stack([ids[:, 0] >= 0 for ids in topk_ids])  # [N, B]
    status = (usable.logical_not().int() << torch.arange(n, device=device).int().unsqueeze(1)).sum(0).int()

    # Step 2: union of the candidates' canonical ids, ascending, padded with -1.
    canon = torch.cat(
        [
            torch.where(ids >= 0, tc[ids.clamp(min=0)].long(), -1)
            for ids, tc in zip(topk_ids, to_canon, strict=True)
        ],
        1,
    )
    big = torch.iinfo(torch.int64).max
    canon = torch.where(canon >= 0, canon, big).sort(1).values
    repeated = torch.zeros_like(canon, dtype=torch.bool)
    repeated[:, 1:] = canon[:, 1:] == canon[:, :-1]
    union = torch.where(repeated, big, canon).sort(1).values
    in_union = union != big
    union = torch.where(in_union, union, -1)

    # Steps 3-4 per model.
    position = torch.arange(width, device=device)
    earlier = position.unsqueeze(1) > position.unsqueeze(0)  # [L, L]: column j precedes row j'
    model_probs = []
    for i in range(n):
        x = logits[i].float()
        token = torch.where(in_union, from_canon[i][union.clamp(min=0)].long(), -1)
        present = (token >= 0) & (token < x.shape[1])
        safe = token.clamp(0, x.shape[1] - 1)
        own = present & (to_canon[i][safe].long() == union)
        m = topk_logits[i][:, :1]
        q = torch.where(present, torch.exp(x.gather(1, safe) - m), 0.0)
        # One value per token: the union entry that is the model's own token, else the smallest entry.
        same = (token.unsqueeze(2) == token.unsqueeze(1)) & present.unsqueeze(2) & present.unsqueeze(1)
        other_own = (same & own.unsqueeze(1)).any(2)
        smaller_same = (same & earlier).any(2)
        owner = present & (own | (~other_own & ~smaller_same))
        q = torch.where(owner & usable[i].unsqueeze(1), q, 0.0)
        total = q.sum(1, keepdim=True)
        model_probs.append(torch.where(total > 0, q / total, 0.0))
    model_probs = torch.stack(model_probs)  # [N, B, L]

    # Step 5: weights renormalised over the usable models of each row.
    # Built with fills, not a host-to-device copy, so that the step can be captured in a CUDA graph.
    w = torch.stack([torch.where(usable[i], weights[i], 0.0) for i in range(n)])
    w_total = w.sum(0)
    w = torch.where(w_total > 0, w / w_total, 0.0)
    probs = (w.unsqueeze(2) * model_probs).sum(0)
    votes = w_total > 0

    # Step 6: choose.
    if temperature > 0:
        log_p = torch.log(probs)
        scaled = torch.exp((log_p - log_p.max(1, keepdim=True).values) / temperature)
        scaled = torch.where(probs > 0, scaled, 0.0)
        order = torch.argsort(-scaled, dim=1, stable=True)
        sorted_p = scaled.gather(1, order)
        cumulative = sorted_p.cumsum(1)
        total = cumulative[:, -1:]
        last = (cumulative < top_p * total).sum(1, keepdim=True).clamp(max=width - 1)
        nucleus_mass = cumulative.gather(1, last)
        pick = (cumulative <= uniforms.unsqueeze(1) * nucleus_mass).sum(1, keepdim=True)
        choice = order.gather(1, torch.minimum(pick, last)).squeeze(1)
    else:
        choice = probs.argmax(1)
    next_canon = torch.where(votes, union.gather(1, choice.unsqueeze(1)).squeeze(1), -1)
    next_ids = torch.stack(
        [torch.where(next_canon >= 0, fc[next_canon.clamp(min=0)].long(), -1) for fc in from_canon]
    )
    return next_canon, next_ids, union, probs, model_probs, status


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
    """Same signature and outputs as :func:`unite_ext.ensemble_step`, in plain PyTorch."""
    args = prepare_step_inputs(logits, tables, k, weights, temperature, top_p, generator, uniforms)
    stats = [topk_stats(x, tc, args.k) for x, tc in zip(args.logits, args.to_canon, strict=True)]
    next_canon, next_ids, union, probs, model_probs, status = union_average(
        args.logits,
        args.to_canon,
        args.from_canon,
        [s[0] for s in stats],
        [s[1] for s in stats],
        args.weights,
        args.temperature,
        args.top_p,
        args.uniforms,
    )
    top1 = torch.stack([s[2] for s in stats])
    return EnsembleStep(next_canon, next_ids, union, probs, model_probs, top1, status)
