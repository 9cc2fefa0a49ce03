"""Determine-then-ensemble model selection: the rule, and candidates evaluated with stub generators."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from unite_ext.model_spec import ModelSpec
from unite_ext.selection import (
    CandidateStats,
    apply_selection_rule,
    candidate_stats,
    evaluate_candidates,
    format_decisions,
)
from unite_ext.tasks import get_task


def stats(model: str, correct: int, total: int, length: float) -> CandidateStats:
    return CandidateStats(model, correct / total, length, total)


def chosen(decisions) -> list[str]:
    return [d.model for d in decisions if d.chosen]


def test_base_is_the_most_accurate_whatever_the_order():
    candidates = [stats("weak", 20, 100, 50), stats("best", 60, 100, 50), stats("close", 58, 100, 50)]
    decisions = apply_selection_rule(candidates)
    assert [d.model for d in decisions] == ["weak", "best", "close"]  # listed order
    assert decisions[1].reason.startswith("base")
    assert chosen(decisions) == ["best", "close"]
    assert "below" in decisions[0].reason


def test_relative_and_absolute_gap_differ():
    # Base 40%: 10% relative admits 36% and above; 10 points absolute admits 30% and above.
    candidates = [
        stats("base", 40, 100, 80),
        stats("c35", 35, 100, 80),
        stats("c36", 36, 100, 80),
        stats("c29", 29, 100, 80),
    ]
    assert chosen(apply_selection_rule(candidates)) == ["base", "c36"]  # 36% is exactly on the bound: in
    assert chosen(apply_selection_rule(candidates, gap="absolute")) == ["base", "c35", "c36"]
    assert chosen(apply_selection_rule(candidates, max_accuracy_gap=0.3)) == ["base", "c35", "c36", "c29"]
    assert chosen(apply_selection_rule(candidates, max_accuracy_gap=0.0)) == ["base"]


def test_high_accuracy_relative_gap():
    # Base 80%: relative admits 72% and above, 71% is out.
    candidates = [stats("base", 80, 100, 10), stats("c72", 72, 100, 10), stats("c71", 71, 100, 10)]
    assert chosen(apply_selection_rule(candidates)) == ["base", "c72"]


def test_response_length_within_a_factor_both_ways():
    candidates = [
        stats("base", 50, 100, 100.0),
        stats("double", 49, 100, 200.0),  # exactly 2x longer: in
        stats("half", 49, 100, 50.0),  # exactly 2x shorter: in
        stats("verbose", 49, 100, 200.5),
        stats("terse", 49, 100, 49.9),
    ]
    decisions = apply_selection_rule(candidates)
    assert chosen(decisions) == ["base", "double", "half"]
    assert "length" in decisions[3].reason and "length" in decisions[4].reason
    assert chosen(apply_selection_rule(candidates, max_length_ratio=3.0)) == [c.model for c in candidates]


def test_accuracy_is_checked_before_length():
    decisions = apply_selection_rule([stats("base", 50, 100, 10), stats("bad", 10, 100, 1000)])
    assert "accuracy" in decisions[1].reason and "length" not in decisions[1].reason


def test_ties_and_max_models():
    candidates = [
        stats("a", 50, 100, 10),
        stats("b", 50, 100, 10),
        stats("c", 49, 100, 10),
        stats("d", 48, 100, 10),
    ]
    decisions = apply_selection_rule(candidates, max_models=2)
    assert decisions[0].reason.startswith("base")  # tie for the best: the one listed first
    assert chosen(decisions) == ["a", "b"]
    assert "already chosen" in decisions[2].reason
    assert chosen(apply_selection_rule(candidates, max_models=3)) == ["a", "b", "c"]


def test_zero_accuracy_base_and_zero_lengths():
    decisions = apply_selection_rule([stats("a", 0, 10, 0.0), stats("b", 0, 10, 0.0), stats("c", 0, 10, 3.0)])
    assert chosen(decisions) == ["a", "b"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_accuracy_gap": 1.5}, "max_accuracy_gap"),
        ({"gap": "percent"}, "gap"),
        ({"max_length_ratio": 0.5}, "max_length_ratio"),
        ({"max_models": 0}, "max_models"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        apply_selection_rule([stats("a", 1, 2, 1)], **options)


def test_candidate_stats_measures_bytes():
    records = [
        {"prediction": "ab", "correct": True},
        {"prediction": "é", "correct": False},  # two bytes in UTF-8
        {"prediction": "", "correct": True},
    ]
    result = candidate_stats("m", records)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.mean_length == pytest.approx(4 / 3)
    with pytest.raises(ValueError):
        candidate_stats("m", [])


@dataclass
class FakeGeneration:
    text: str
    num_steps: int


def stub_generator(right_ids: set[str], answer_length: int, examples):
    """Answers the right letter for the examples in ``right_ids`` and the wrong one elsewhere, padded
    with spaces to ``answer_length`` characters."""
    by_prompt = {e.prompt: e for e in examples}

    def generate(prompts, *, max_new_tokens, stop):
        results = []
        for prompt in prompts:
            example = by_prompt[prompt]
            letter = example.gold if example.id in right_ids else ("B" if example.gold == "A" else "A")
            results.append(FakeGeneration(letter.ljust(answer_length), 1))
        return results

    return generate


def test_evaluate_candidates_and_decide(tmp_path):
    records = [{"goal": f"goal {i}", "sol1": "one", "sol2": "two", "label": i % 2} for i in range(20)]
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = get_task("piqa")
    examples = task.load(data)
    ids = [e.id for e in examples]
    # Accuracies 0.90, 0.85 (within 10% of 0.90), 0.75 (not), 0.90 but answers 5x longer.
    plans = {
        "strong": (set(ids[:18]), 4),
        "close": (set(ids[:17]), 6),
        "weak": (set(ids[:15]), 4),
        "chatty": (set(ids[2:]), 20),
    }
    candidates = [ModelSpec(name) for name in plans]
    loaded = []

    def generator_for(spec):
        loaded.append(spec.path)
        right, length = plans[spec.path]
        return stub_generator(right, length, examples)

    result = evaluate_candidates(
        task, examples, candidates, generator_for, work_dir=tmp_path / "work", progress=False
    )
    assert loaded == list(plans)
    assert [(s.model, s.accuracy, s.mean_length, s.examples) for s in result] == [
        ("strong", pytest.approx(0.90), 4.0, 20),
        ("close", pytest.approx(0.85), 6.0, 20),
        ("weak", pytest.approx(0.75), 4.0, 20),
        ("chatty", pytest.approx(0.90), 20.0, 20),
    ]
    decisions = apply_selection_rule(result)
    assert chosen(decisions) == ["strong", "close"]
    table = format_decisions(result, decisions)
    assert "base" in table and "85.00%" in table and "left out" in table
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [f"candidate-{i}.jsonl" for i in range(4)]

    # A second run reads the kept records instead of generating again.
    def must_not_generate(spec):
        def generate(prompts, *, max_new_tokens, stop):
            raise AssertionError("generated again")

        return generate

    again = evaluate_candidates(
        task, examples, candidates, must_not_generate, work_dir=tmp_path / "work", progress=False
    )
    assert again == result
