"""A float64 scalar oracle of one UNITE ensemble step, written from SPEC.md section 2.

Plain Python loops over rows, tokens and candidates with float64 maths (``math.exp``, ``math.fsum``). It
shares no code with ``unite_ext`` so that the tests can catch errors in the compiled op and in the
PyTorch reference alike. Besides the outputs it says, per row, which comparisons are well defined and
which choices a float32 implementation may legitimately make (near-ties and near-boundary draws).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# SPEC accuracy: next_canon may differ where the two best p(u) differ by less than this.
GREEDY_TIE_TOLERANCE = 1e-6
# A sampled choice is not checked where r * mass (or top_p) lies this close (relative) to a cumulative sum.
SAMPLING_BOUNDARY_TOLERANCE = 1e-5


@dataclass
class OracleRow:
    """Expected outputs of one row. Lists over candidates follow ``union`` (ascending canonical ids)."""

    status: int
    topk: list[list[int]]  # per model: token ids of T_i, best first (empty when left out)
    union: list[int]
    union_probs: list[float]  # p(u); empty when not defined
    model_probs: list[list[float]]  # per model: qhat_i(u) (zeros when left out); empty when not defined
    top1_prob: list[float]  # per model
    next_canon: int  # -1 when no model is usable or the choice is not defined
    # Choices a float32 implementation may make: {next_canon} unless a near-tie or near-boundary draw.
    allowed_choices: set[int] = field(default_factory=set)
    probs_defined: bool = True  # every usable model has a positive sum of q_i over the union
    choice_defined: bool = True  # probs_defined and the usable models' weights do not sum to zero
    shares_with_own: bool = False  # some model maps several u to one token, one of them its own token
    shares_without_own: bool = False  # some model maps several u to one token, none of them its own

    @property
    def choice_exact(self) -> bool:
        """True when next_canon must match exactly (no near-tie, no near-boundary draw)."""
        return self.choice_defined and self.allowed_choices == {self.next_canon}


def _as_rows(logits: Tensor) -> list[list[float]]:
    # bfloat16/float16 values are exactly representable in float64: the oracle reads the rounded inputs.
    return logits.detach().cpu().to(torch.float64).tolist()


def _top1_full_softmax(x: list[float], top1: int) -> float:
    """Full-vocabulary softmax probability of token ``top1`` (every column of the row counts)."""
    shift = max(x)
    return math.exp(x[top1] - shift) / math.fsum(math.exp(v - shift) for v in x)


def _gather(
    x: list[float], to_canon: list[int], from_canon: list[int], union: list[int], row_max: float
) -> tuple[list[float], bool, bool]:
    """Step 3 for one model: q_i(u) over the union, and whether shared tokens occurred (with/without own)."""
    candidates_of_token: dict[int, list[int]] = {}
    for j, u in enumerate(union):
        t = from_canon[u]
        if t >= 0:
            candidates_of_token.setdefault(t, []).append(j)
    q = [0.0] * len(union)
    with_own = without_own = False
    for t, js in candidates_of_token.items():
        own = [j for j in js if union[j] == to_canon[t]]
        receiver = own[0] if own else min(js, key=lambda j: union[j])
        if len(js) > 1:
            with_own |= bool(own)
            without_own |= not own
        q[receiver] = math.exp(x[t] - row_max)
    return q, with_own, without_own


def _greedy_choice(
    union: list[int], p: list[float], q: list[list[float]], voters: list[int]
) -> tuple[int, set[int]]:
    best = max(range(len(union)), key=lambda j: (p[j], -union[j]))
    allowed = {union[best]}
    for j in range(len(union)):
        near = abs(p[j] - p[best]) < GREEDY_TIE_TOLERANCE
        if j != best and near and not _structurally_equal(q, voters, j, best):
            allowed.add(union[j])
    return union[best], allowed


def _structurally_equal(q: list[list[float]], voters: list[int], a: int, b: int) -> bool:
    """Same q_i in every voting model: p(a) == p(b) in any arithmetic, so the id must break the tie."""
    return all(q[i][a] == q[i][b] for i in voters)


def _sampled_choice(
    union: list[int],
    p: list[float],
    q: list[list[float]],
    voters: list[int],
    temperature: float,
    top_p: float,
    r: float,
) -> tuple[int, set[int]]:
    weight = [pj ** (1.0 / temperature) for pj in p]
    order = sorted(range(len(union)), key=lambda j: (-weight[j], union[j]))
    cumulative = list(itertools.accumulate(weight[j] for j in order))
    total = cumulative[-1]
    nucleus = len(order)
    if top_p < 1.0:
        nucleus = next(pos + 1 for pos, c in enumerate(cumulative) if c >= top_p * total)
    mass = cumulative[nucleus - 1]
    target = r * mass
    position = next(pos for pos in range(nucleus) if cumulative[pos] > target)
    choice = union[order[position]]

    ambiguous = any(abs(c - target) <= SAMPLING_BOUNDARY_TOLERANCE * mass for c in cumulative[:nucleus])
    if top_p < 1.0:
        ambiguous |= any(abs(c - top_p * total) <= SAMPLING_BOUNDARY_TOLERANCE * total for c in cumulative)

    def near_tie(pos: int) -> bool:  # order positions pos and pos + 1 may swap in float32
        if pos < 0 or pos + 1 >= len(order):
            return False
        a, b = order[pos], order[pos + 1]
        return abs(p[a] - p[b]) < GREEDY_TIE_TOLERANCE and not _structurally_equal(q, voters, a, b)

    ambiguous |= near_tie(position - 1) or near_tie(position)
    ambiguous |= top_p < 1.0 and near_tie(nucleus - 1)
    return choice, set(union) if ambiguous else {choice}


def _row(
    xs: list[list[float]],
    to_canon: list[list[int]],
    from_canon: list[list[int]],
    k: int,
    weights: list[float],
    temperature: float,
    top_p: float,
    r: float,
) -> OracleRow:
    n = len(xs)
    status = 0
    topk: list[list[int]] = []
    row_max: list[float] = []
    top1_prob: list[float] = []
    # Step 0 and step 1.
    for i, x in enumerate(xs):
        regular_finite = [t for t, v in enumerate(x) if to_canon[i][t] >= 0 and math.isfinite(v)]
        if any(math.isnan(v) or v == math.inf for v in x) or not regular_finite:
            status |= 1 << i
            topk.append([])
            row_max.append(math.nan)
            top1_prob.append(0.0)
            continue
        ranked = sorted(regular_finite, key=lambda t: (-x[t], t))
        topk.append(ranked[:k])
        row_max.append(x[ranked[0]])
        top1_prob.append(_top1_full_softmax(x, ranked[0]))
    usable = [i for i in range(n) if not status >> i & 1]
    if not usable:
        return OracleRow(status, topk, [], [], [[] for _ in range(n)], top1_prob, -1, {-1})

    # Step 2.
    union = sorted({to_canon[i][t] for i in usable for t in topk[i]})
    # Steps 3 and 4.
    q = [[0.0] * len(union) for _ in range(n)]
    shares_with_own = shares_without_own = False
    for i in usable:
        q[i], with_own, without_own = _gather(xs[i], to_canon[i], from_canon[i], union, row_max[i])
        shares_with_own |= with_own
        shares_without_own |= without_own
    sums = [math.fsum(q[i]) for i in range(n)]
    probs_defined = all(sums[i] > 0 for i in usable)
    weight_total = math.fsum(weights[i] for i in usable)
    choice_defined = probs_defined and weight_total > 0
    row = OracleRow(
        status,
        topk,
        union,
        [],
        [],
        top1_prob,
        -1,
        set(),
        probs_defined,
        choice_defined,
        shares_with_own,
        shares_without_own,
    )
    if not probs_defined:
        return row
    row.model_probs = [[qi / sums[i] for qi in q[i]] if i in usable else [0.0] * len(union) for i in range(n)]
    if not choice_defined:
        return row
    # Step 5.
    voters = [i for i in usable if weights[i] > 0]
    w = [weights[i] / weight_total for i in range(n)]
    row.union_probs = [math.fsum(w[i] * row.model_probs[i][j] for i in usable) for j in range(len(union))]
    # Step 6.
    if temperature == 0.0:
        row.next_canon, row.allowed_choices = _greedy_choice(union, row.union_probs, q, voters)
    else:
        row.next_canon, row.allowed_choices = _sampled_choice(
            union, row.union_probs, q, voters, temperature, top_p, r
        )
    return row


def oracle_step(
    logits: list[Tensor],
    to_canon: list[Tensor],
    from_canon: list[Tensor],
    k: int,
    weights: list[float] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    uniforms: Tensor | None = None,
) -> list[OracleRow]:
    """Evaluate SPEC.md section 2 row by row in float64.

    Args:
        logits: one ``[B, V_i]`` tensor per model (any float dtype; read exactly in float64).
        to_canon, from_canon: the int32 tables of each model.
        k: candidates per model.
        weights: per-model weights >= 0 (default uniform); normalised over each row's usable models.
        temperature: 0 (default) is greedy.
        top_p: nucleus mass for sampling (default 1).
        uniforms: ``[B]`` uniform numbers for sampling (required when temperature > 0).

    Returns:
        One :class:`OracleRow` per batch row.
    """
    n = len(logits)
    batch = logits[0].shape[0]
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    rows = [_as_rows(x) for x in logits]
    to_canon_lists = [t.tolist() for t in to_canon]
    from_canon_lists = [t.tolist() for t in from_canon]
    draws = [0.0] * batch if uniforms is None else uniforms.to(torch.float64).tolist()
    return [
        _row(
            [rows[i][b] for i in range(n)],
            to_canon_lists,
            from_canon_lists,
            k,
            weights,
            temperature,
            top_p,
            draws[b],
        )
        for b in range(batch)
    ]
