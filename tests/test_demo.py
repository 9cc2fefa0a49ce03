"""``unite demo`` on a reduced world: the ensemble must beat both single models, and the parts it is built
from (the world, the knowledge split, greedy decoding, the cache, the command) must do what they say."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from unite_ext.cli import main
from unite_ext.demo import (
    RELATIONS,
    DemoResult,
    DemoSettings,
    build_world,
    evaluate_system,
    format_report,
    is_exact_match,
    prepare,
    run_demo,
    train_model,
)
from unite_ext.toy_tokenizers import train_byte_level_bpe

# 30 creatures: A knows 18, B knows 18, both know 6. Short training: a few seconds per model on two cores.
SMALL = DemoSettings(seed=0, num_facts=90, train_steps=200)
CLI_OPTIONS = ["--seed", "0", "--facts", "90", "--train-steps", "200", "--no-progress"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """UNITE_EXT_CACHE for the whole module, so the command below finds the models trained here."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNITE_EXT_CACHE", str(folder))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield folder


@pytest.fixture(scope="module")
def demo(cache_dir) -> DemoResult:
    return run_demo(SMALL, k=10, sync="exact", progress=False)


def test_world_has_every_relation_of_each_creature_and_the_overlapping_split():
    facts = build_world(SMALL)
    assert len(facts) == 90
    entities = list(dict.fromkeys(f.entity for f in facts))
    assert len(entities) == 30
    for entity in entities:
        assert sorted(f.relation for f in facts if f.entity == entity) == sorted(r.name for r in RELATIONS)
    # ceil(0.6 * 30) = 18 creatures each: A the first 18, B the last 18, so creatures 12..17 are shared.
    known_by = {f.entity: f.known_by for f in facts}
    assert [known_by[e] for e in entities] == ["A"] * 12 + ["AB"] * 6 + ["B"] * 12
    values = {f.value.lower() for f in facts}
    assert not values & set(entities), "a creature shares its name with a value"
    assert len({f.value for f in facts if f.relation == "home"}) <= SMALL.values_per_relation
    fact = facts[0]
    assert fact.prompt.startswith("Q: ") and fact.prompt.endswith(" A:") and fact.entity in fact.prompt
    assert fact.answer == f" {fact.value}."
    assert build_world(SMALL) == facts
    assert build_world(DemoSettings(seed=1, num_facts=90)) != facts


def test_world_cuts_the_last_creature_short():
    facts = build_world(DemoSettings(num_facts=20))
    assert len(facts) == 20
    assert len({f.entity for f in facts}) == math.ceil(20 / len(RELATIONS))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"num_facts": 14}, "num_facts"),
        ({"known_fraction": 0.5}, "known_fraction"),
        ({"known_fraction": 1.0}, "known_fraction"),
        ({"train_steps": 0}, "train_steps"),
        ({"values_per_relation": 1}, "values_per_relation"),
        ({"resegment_probability": 1.0}, "resegment_probability"),
    ],
)
def test_settings_are_checked(changes, named):
    with pytest.raises(ValueError, match=named):
        DemoSettings(**changes)


@pytest.mark.parametrize(
    ("generated", "answer", "expected"),
    [
        (" Quendor.", " Quendor.", True),
        ("Quendor. ", " Quendor.", True),
        (" Quendor", " Quendor.", False),
        (" Quendor.x", " Quendor.", False),
        (" quendor.", " Quendor.", False),
        ("", " ", False),  # an empty answer is never right
    ],
)
def test_exact_match(generated, answer, expected):
    assert is_exact_match(generated, answer) is expected


def test_ensemble_beats_both_single_models(demo):
    model_a, model_b, ensemble = (s.accuracy for s in demo.systems)
    print("\n" + format_report(demo))
    assert ensemble > model_a and ensemble > model_b


def test_each_model_knows_only_what_it_read(demo):
    model_a, model_b, ensemble = demo.systems
    assert model_a.group_accuracy["A only"] >= 0.9 and model_a.group_accuracy["both"] >= 0.9
    assert model_b.group_accuracy["B only"] >= 0.9 and model_b.group_accuracy["both"] >= 0.9
    # Guessing among 12 values per relation: far below what the model that read the fact gets.
    assert model_a.group_accuracy["B only"] <= 0.5
    assert model_b.group_accuracy["A only"] <= 0.5
    assert ensemble.group_accuracy["A only"] > model_b.group_accuracy["A only"]
    assert ensemble.group_accuracy["B only"] > model_a.group_accuracy["B only"]


def test_measurements_are_consistent(demo):
    k = demo.k
    model_a, model_b, ensemble = demo.systems
    # One byte-level model: its top k are k distinct byte strings. The SentencePiece model can hold two
    # tokens with the same bytes ("▁" and "<0x20>"), which count once.
    assert model_a.mean_union_size == k
    assert model_b.mean_union_size <= k
    assert k < ensemble.mean_union_size <= 2 * k
    for system in demo.systems:
        assert system.correct == [
            is_exact_match(text, fact.answer) for text, fact in zip(system.texts, demo.facts, strict=True)
        ]
        assert system.accuracy == sum(system.correct) / len(demo.facts)
        assert system.generated_tokens >= len(demo.facts) and system.tokens_per_second > 0
        assert system.fused_step_seconds > 0 and system.reference_step_seconds > 0
        assert system.same_choice >= 0.99  # ties closer than 1e-6 may go either way
    report = format_report(demo)
    for system in demo.systems:
        assert system.name in report and f"{100 * system.accuracy:.1f}%" in report


@pytest.mark.parametrize("member", [0, 1])
def test_single_model_answers_are_its_greedy_generations(demo, member):
    """A single model in the demo decodes as transformers' own greedy `generate` does."""
    _, models, _, trained = prepare(SMALL, torch.device("cpu"), progress=False)
    assert not trained
    model = models[member]
    facts = demo.facts[::3]
    # With one model, sync="fast" feeds back the chosen token itself, exactly as `generate` does.
    result = evaluate_system(model.name, [model], facts, k=10, sync="fast", progress=False)
    max_new_tokens = max(len(f.answer.encode("utf-8")) for f in facts) + 1
    eos = model.tokenizer.eos_token_id
    for fact, text in zip(facts, result.texts, strict=True):
        prompt_ids = model.tokenizer(fact.prompt)["input_ids"]
        with torch.no_grad():
            output = model.model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0].tolist()
        prompt_text = model.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        full_text = model.tokenizer.decode(output, skip_special_tokens=True)
        assert full_text.startswith(prompt_text)
        assert text == full_text[len(prompt_text) :].split("\n")[0]


def test_rerun_loads_the_cached_models(demo, cache_dir):
    assert demo.trained
    assert demo.cache_folder.parent == cache_dir / "demo"
    again = run_demo(SMALL, k=10, sync="exact", progress=False)
    assert not again.trained and again.cache_folder == demo.cache_folder
    assert again.facts == demo.facts
    for first, second in zip(demo.systems, again.systems, strict=True):
        assert second.texts == first.texts


def test_training_is_reproducible():
    settings = DemoSettings(num_facts=15, train_steps=5, batch_size=4)
    facts = build_world(settings)
    tokenizer = train_byte_level_bpe([f.prompt + f.answer for f in facts], 300)
    states = [
        train_model(
            "A", tokenizer, facts, settings, seed, torch.device("cpu"), progress=False
        ).model.state_dict()
        for seed in (3, 3, 4)
    ]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert not all(torch.equal(states[0][name], states[2][name]) for name in states[0])


def test_command_prints_the_table(demo, capsys):
    assert main(["demo", *CLI_OPTIONS]) == 0
    out = capsys.readouterr().out
    assert f"loaded from {demo.cache_folder}" in out
    for system in demo.systems:
        assert system.name in out and f"{100 * system.accuracy:.1f}%" in out


def test_command_reports_bad_options(cache_dir, capsys):
    assert main(["demo", "--facts", "3", "--no-progress"]) == 2
    assert "num_facts must be at least 15" in capsys.readouterr().err
    assert main(["demo", "--facts", "1000", "--k", "65", "--no-progress"]) == 2  # before any training
    assert "k must be an integer in 1..64" in capsys.readouterr().err
    assert not list((cache_dir / "demo").glob(DemoSettings(num_facts=1000).cache_key() + "*"))
    if not torch.cuda.is_available():
        assert main(["demo", *CLI_OPTIONS, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
