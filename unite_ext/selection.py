"""Determine-then-ensemble: choosing which models to ensemble from how each does alone.

The rule of Yao et al. (2025): evaluate every candidate alone on a development subset; the
most accurate candidate is the base; every other candidate joins when

- its accuracy is within ``max_accuracy_gap`` of the base's. With ``gap="relative"`` (default) that
  means ``accuracy >= (1 - max_accuracy_gap) * base_accuracy``: 10% of the base's accuracy, so the
  tolerance scales with how hard the task is (a base at 40% admits 36% and above, one at 80% admits
  72% and above). ``gap="absolute"`` means ``accuracy >= base_accuracy - max_accuracy_gap``, in
  accuracy points (0.10 = 10 points).
- its mean response length is within a factor ``max_length_ratio`` of the base's: the longer of the
  two is at most ``max_length_ratio`` times the shorter. Lengths are UTF-8 bytes of the responses, so
  models with different tokenizers are measured in the same unit.

Both bounds are inclusive. Ties for the base go to the candidate listed first. Candidates are
considered in order of accuracy (ties: listed order) until ``max_models`` are chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unite_ext.model_spec import ModelSpec
from unite_ext.tasks import Example, Task
from unite_ext.tasks.evaluation import GenerateFn, evaluate, format_table

GapKind = Literal["relative", "absolute"]
_TOLERANCE = 1e-12  # accuracies are ratios of counts; keep the inclusive bounds exact


@dataclass(frozen=True)
class CandidateStats:
    """How a candidate did alone: accuracy, mean response length (UTF-8 bytes), examples evaluated."""

    model: str
    accuracy: float
    mean_length: float
    examples: int


@dataclass(frozen=True)
class Decision:
    """Whether a candidate joins the ensemble, and why."""

    model: str
    chosen: bool
    reason: str


def candidate_stats(model: str, records: Sequence[dict[str, Any]]) -> CandidateStats:
    """Accuracy and mean response length of a candidate from its evaluation records."""
    if not records:
        raise ValueError(f"no evaluated examples for candidate {model}")
    lengths = [len(r["prediction"].encode("utf-8")) for r in records]
    accuracy = sum(bool(r["correct"]) for r in records) / len(records)
    return CandidateStats(model, accuracy, sum(lengths) / len(lengths), len(records))


def apply_selection_rule(
    stats: Sequence[CandidateStats],
    *,
    max_accuracy_gap: float = 0.10,
    gap: GapKind = "relative",
    max_length_ratio: float = 2.0,
    max_models: int | None = None,
) -> list[Decision]:
    """Decide for every candidate (see the module documentation for the rule).

    Args:
        stats: the candidates, in the order they were listed.
        max_accuracy_gap: how far below the base's accuracy a candidate may be (default 0.10).
        gap: ``"relative"`` (default): a fraction of the base's accuracy; ``"absolute"``: accuracy points.
        max_length_ratio: bound on longer/shorter mean response length (default 2.0).
        max_models: the most models to choose, base included (default ``None``: no limit).

    Returns:
        One decision per candidate, in the order of ``stats``.
    """
    if not stats:
        raise ValueError("no candidates")
    if not 0 <= max_accuracy_gap <= 1:
        raise ValueError(f"max_accuracy_gap must be between 0 and 1, got {max_accuracy_gap}")
    if gap not in ("relative", "absolute"):
        raise ValueError(f"gap must be 'relative' or 'absolute', got {gap!r}")
    if max_length_ratio < 1:
        raise ValueError(f"max_length_ratio must be at least 1, got {max_length_ratio}")
    if max_models is not None and max_models < 1:
        raise ValueError(f"max_models must be at least 1, got {max_models}")
    order = sorted(range(len(stats)), key=lambda i: -stats[i].accuracy)  # stable: ties keep listed order
    base = stats[order[0]]
    floor = base.accuracy * (1 - max_accuracy_gap) if gap == "relative" else base.accuracy - max_accuracy_gap
    gap_text = (
        f"{100 * max_accuracy_gap:g}% of the base's"
        if gap == "relative"
        else f"{100 * max_accuracy_gap:g} points"
    )
    decisions: dict[int, Decision] = {
        order[0]: Decision(base.model, True, "base: the most accurate candidate")
    }
    chosen = 1
    for i in order[1:]:
        candidate = stats[i]
        longer = max(candidate.mean_length, base.mean_length)
        shorter = min(candidate.mean_length, base.mean_length)
        if candidate.accuracy < floor - _TOLERANCE:
            reason = (
                f"accuracy {100 * candidate.accuracy:.2f}% is below {100 * floor:.2f}% "
                f"(more than {gap_text} under the base's {100 * base.accuracy:.2f}%)"
            )
            decisions[i] = Decision(candidate.model, False, reason)
        elif longer > max_length_ratio * shorter + _TOLERANCE:
            reason = (
                f"mean response length {candidate.mean_length:.1f} bytes is not within "
                f"{max_length_ratio:g}x of the base's {base.mean_length:.1f}"
            )
            decisions[i] = Decision(candidate.model, False, reason)
        elif max_models is not None and chosen >= max_models:
            decisions[i] = Decision(
                candidate.model, False, f"compatible, but {max_models} models already chosen"
            )
        else:
            reason = f"accuracy within {gap_text} and mean length within {max_length_ratio:g}x of the base's"
            decisions[i] = Decision(candidate.model, True, reason)
            chosen += 1
    return [decisions[i] for i in range(len(stats))]


def evaluate_candidates(
    task: Task,
    examples: Sequence[Example],
    candidates: Sequence[ModelSpec],
    generator_for: Callable[[ModelSpec], GenerateFn],
    *,
    work_dir: Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[CandidateStats]:
    """Evaluate every candidate alone on ``examples`` with the same prompts and scoring.

    Args:
        generator_for: gives the generation function of one candidate (called once per candidate, in
            turn, so only one candidate needs to be loaded at a time).
        work_dir: where to keep each candidate's records (``candidate-<i>.jsonl``), so that an
            interrupted selection resumes; default ``None`` keeps them in memory.
        batch_size, max_new_tokens, progress: as for :func:`unite_ext.tasks.evaluation.evaluate`.
    """
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    stats = []
    for index, candidate in enumerate(candidates):
        out = None if work_dir is None else Path(work_dir) / f"candidate-{index}.jsonl"
        run = {"task": task.name, "models": [candidate.as_dict()], "max_new_tokens": max_new_tokens}
        result = evaluate(
            task,
            examples,
            generator_for(candidate),
            out,
            run=run,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        stats.append(candidate_stats(candidate.path, result.records))
    return stats


def format_decisions(stats: Sequence[CandidateStats], decisions: Sequence[Decision]) -> str:
    """The table ``unite select`` prints: one row per candidate with its figures and the decision."""
    header = ["model", "accuracy", "mean length (bytes)", "examples", "decision", "reason"]
    rows = [
        [
            s.model,
            f"{100 * s.accuracy:.2f}%",
            f"{s.mean_length:.1f}",
            str(s.examples),
            "chosen" if d.chosen else "left out",
            d.reason,
        ]
        for s, d in zip(stats, decisions, strict=True)
    ]
    return format_table(header, rows)
