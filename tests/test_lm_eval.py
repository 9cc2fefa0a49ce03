"""The lm-evaluation-harness backend ``UniteLM`` on tiny random models."""

from __future__ import annotations

import importlib.metadata
import json
import math

import numpy as np
import pytest
import torch
import transformers

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tiny_models import (  # noqa: E402
    RECURRENT_OVERRIDES,
    save_tiny_checkpoint,
    tiny_auto_model,
    tiny_model_for_tokenizer,
)

from unite_ext.decode import Ensemble, _decodes_recurrent  # noqa: E402
from unite_ext.lm_eval import UniteLM, combine_loglikelihoods  # noqa: E402
from unite_ext.toy_tokenizers import SAMPLE_TEXTS, train_byte_level_bpe, train_sentencepiece_bpe  # noqa: E402


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITE_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def members():
    """A GPT-2 model (absolute positions, so padding mistakes show) with a byte-level tokenizer and a
    Llama model with a SentencePiece tokenizer."""
    byte = train_byte_level_bpe(list(SAMPLE_TEXTS), 400)
    sp = train_sentencepiece_bpe(list(SAMPLE_TEXTS), 400)
    return [
        (tiny_model_for_tokenizer("gpt2", byte, seed=3), byte),
        (tiny_model_for_tokenizer("llama", sp, seed=4), sp),
    ]


def reference_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """log p(continuation | context), one unpadded sequence, float64 log-softmax, position by position."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    total = 0.0
    for j, token in enumerate(continuation_ids):
        position = len(context_ids) + j - 1  # the logits that predict this token
        total += float(torch.log_softmax(logits[position], dim=-1)[token])
    return total


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_combine_loglikelihoods_by_hand():
    assert combine_loglikelihoods([math.log(0.2), math.log(0.6)], [0.5, 0.5]) == pytest.approx(math.log(0.4))
    assert combine_loglikelihoods([math.log(0.2), math.log(0.6)], [0.25, 0.75]) == pytest.approx(
        math.log(0.5)
    )
    assert combine_loglikelihoods([math.log(0.2), -math.inf], [1.0, 0.0]) == pytest.approx(math.log(0.2))
    # Far below float range of the probabilities themselves: log(0.5 e^-1000 + 0.5 e^-1001).
    expected = -1000 + math.log(0.5 * (1 + math.exp(-1)))
    assert combine_loglikelihoods([-1000.0, -1001.0], [0.5, 0.5]) == pytest.approx(expected)
    assert combine_loglikelihoods([-math.inf, -math.inf], [0.5, 0.5]) == -math.inf


def test_loglikelihood_is_the_weighted_mixture_of_each_models_score(members):
    models, tokenizers = zip(*members, strict=True)
    ensemble = Ensemble(list(models), list(tokenizers), weights=[0.3, 0.7])
    lm = UniteLM(ensemble=ensemble, batch_size=3, greedy_check=False)
    pairs = [
        ("The quick brown", " fox jumps"),
        ("Numbers such as 3.14159, 42 and", " 1,000,000 appear in tables."),
        ("Lists: ", "first item"),  # the trailing space moves to the continuation
        ("", "Hello world"),  # empty context: scored after BOS (or EOS)
        ("café and", " naïve — Straße"),
    ]
    values = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (value, greedy) in zip(pairs, values, strict=True):
        if context.endswith(" "):
            context, continuation = context[:-1], " " + continuation
        scores = []
        for i, (model, tokenizer) in enumerate(members):
            if context:
                context_ids = tokenizer(context)["input_ids"]
                continuation_ids = ensemble.tables.encode_mid_text(i, continuation.encode())
            else:
                full = tokenizer(continuation)["input_ids"]
                start = tokenizer.bos_token_id
                context_ids, continuation_ids = [start], full[1:] if full[0] == start else full
            assert tokenizer.decode(continuation_ids).strip() == continuation.strip()
            scores.append(reference_loglikelihood(model, context_ids, continuation_ids))
        expected = float(np.logaddexp(math.log(0.3) + scores[0], math.log(0.7) + scores[1]))
        assert value == pytest.approx(expected, abs=1e-4)
        assert greedy is False


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm2"])
def test_a_recurrent_model_in_the_harness(members, model_type):
    """Batched, left-padded scoring is exact for a recurrent model too (padding enters its state as zeros,
    which leave it empty); generation falls back to one row at a time."""
    if not _decodes_recurrent(model_type):
        pytest.skip(f"transformers {transformers.__version__} is too old for {model_type} (refused)")
    _, tokenizer = members[0]
    model = tiny_auto_model(model_type, tokenizer, seed=8, **RECURRENT_OVERRIDES[model_type])
    ensemble = Ensemble([model], [tokenizer])
    lm = UniteLM(ensemble=ensemble, batch_size=3, greedy_check=False)
    pairs = [
        ("The quick brown", " fox jumps"),
        ("Numbers such as 3.14159, 42 and", " 1,000,000."),
        ("A", " b"),
    ]
    values = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (value, _) in zip(pairs, values, strict=True):
        context_ids = tokenizer(context)["input_ids"]
        continuation_ids = ensemble.tables.encode_mid_text(0, continuation.encode())
        assert value == pytest.approx(reference_loglikelihood(model, context_ids, continuation_ids), abs=1e-4)
    settings = {"until": ["\n"], "max_gen_toks": 6}
    with pytest.warns(UserWarning, match="decoding one row at a time"):
        outputs = lm.generate_until([request("generate_until", c, dict(settings)) for c, _ in pairs])
    assert outputs == [
        ensemble.generate([c], max_new_tokens=6, stop="\n", progress=False)[0].text for c, _ in pairs
    ]


def test_is_greedy_follows_the_ensembles_own_generation(members):
    models, tokenizers = zip(*members, strict=True)
    ensemble = Ensemble(list(models), list(tokenizers))
    lm = UniteLM(ensemble=ensemble)
    context = "The union of the top-k candidates"
    generated = ensemble.generate(prompts=[context], max_new_tokens=4, progress=False)[0].text
    assert generated
    results = lm.loglikelihood(
        [request("loglikelihood", context, generated), request("loglikelihood", context, "zzz")]
    )
    assert [greedy for _, greedy in results] == [True, generated.startswith("zzz")]


def test_generate_until_single_model_matches_hf_generate(members):
    model, tokenizer = members[0]
    lm = UniteLM(ensemble=Ensemble([model], [tokenizer], sync="fast"), batch_size=2)
    contexts = ["The quick brown fox", "Emoji: ", "def add(a, b):"]
    settings = {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}
    outputs = lm.generate_until([request("generate_until", c, dict(settings)) for c in contexts])
    for context, output in zip(contexts, outputs, strict=True):
        ids = tokenizer(context, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            tokens = model.generate(
                ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        expected = tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert output == expected


def test_generate_until_cuts_long_contexts_from_the_left(members, monkeypatch, caplog):
    """A context that leaves a model fewer than max_gen_toks positions of its 40 is cut from the left to the
    longest end that fits every model (which the ensemble would otherwise refuse), with a warning."""
    tokenizers = [tokenizer for _, tokenizer in members]
    models = [
        tiny_model_for_tokenizer("llama", tokenizer, seed=5 + i, max_position_embeddings=40)
        for i, tokenizer in enumerate(tokenizers)
    ]
    ensemble = Ensemble(models, tokenizers)
    seen: list[str] = []
    generate = ensemble.generate
    monkeypatch.setattr(ensemble, "generate", lambda **kw: seen.extend(kw["prompts"]) or generate(**kw))
    long, short = " ".join(SAMPLE_TEXTS)[:300], "The quick brown fox"
    settings = {"until": ["\n"], "max_gen_toks": 10}
    UniteLM(ensemble=ensemble).generate_until(
        [request("generate_until", c, dict(settings)) for c in (long, short)]
    )
    fitted, unchanged = seen
    assert unchanged == short

    def fits(text: str) -> bool:
        return all(len(tokenizer(text)["input_ids"]) <= 40 - 10 for tokenizer in tokenizers)

    assert long.endswith(fitted) and fits(fitted)
    assert not fits(long[len(long) - len(fitted) - 1 :])  # one more character does not fit
    assert "was cut to its last" in caplog.text


def test_loglikelihood_rolling_matches_full_text_scores(members):
    models, tokenizers = zip(*members, strict=True)
    ensemble = Ensemble(list(models), list(tokenizers))
    text = "Ensembles of language models average their predictions."
    (value,) = UniteLM(ensemble=ensemble).loglikelihood_rolling([request("loglikelihood_rolling", text)])
    scores = []
    for model, tokenizer in members:
        ids = tokenizer(text)["input_ids"]
        if ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        scores.append(reference_loglikelihood(model, [tokenizer.bos_token_id], ids))
    assert value == pytest.approx(float(np.logaddexp(*scores) - math.log(2)), abs=1e-4)


def test_simple_evaluate_on_a_local_multiple_choice_task(tmp_path):
    folders = [
        save_tiny_checkpoint(tmp_path / "byte", "byte", 5),
        save_tiny_checkpoint(tmp_path / "sp", "sentencepiece", 6),
    ]
    questions = [
        ("Is fire hot?", 0),
        ("Is ice hot?", 1),
        ("Do fish swim?", 0),
        ("Do rocks fly?", 1),
        ("Is the sun far?", 2),
    ]
    records = [{"q": q, "choices": [" yes", " no", " maybe"], "label": label} for q, label in questions]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = {
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "datasets")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{q}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    results = lm_eval.simple_evaluate(
        model="unite",
        model_args=f"models={folders[0]};{folders[1]},weights=0.6;0.4,batch_size=4,greedy_check=False",
        tasks=[task],
        task_manager=TaskManager(include_defaults=False),
    )
    # Reference accuracy: each question's answer is the choice with the largest mixture likelihood,
    # computed here model by model without the harness.
    ensemble = Ensemble.from_pretrained(folders)
    right = 0
    for question, label in questions:
        context = f"Question: {question}\nAnswer:"
        mixtures = []
        for choice in (" yes", " no", " maybe"):
            scores = []
            for i, member in enumerate(ensemble.members):
                context_ids = member.tokenizer(context)["input_ids"]
                choice_ids = ensemble.tables.encode_mid_text(i, choice.encode())
                scores.append(reference_loglikelihood(member.model, context_ids, choice_ids))
            mixtures.append(float(np.logaddexp(math.log(0.6) + scores[0], math.log(0.4) + scores[1])))
        right += int(np.argmax(mixtures)) == label
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(right / len(questions))


def test_registration_and_entry_point():
    from lm_eval.api.registry import get_model

    assert get_model("unite") is UniteLM
    (entry_point,) = importlib.metadata.entry_points(group="lm_eval.models", name="unite")
    assert entry_point.load() is UniteLM


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"models": "a", "spec": "b"}, "exactly one"),
        ({"models": "a;b", "weights": "1"}, "weights gives 1 numbers for 2 models"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniteLM(**kwargs)


def test_chat_spec_is_refused(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"path": "/m/a", "chat_template": True}]}))
    with pytest.raises(ValueError, match="chat_template"):
        UniteLM(spec=str(spec))


def test_auto_batch_size_is_refused(members):
    model, tokenizer = members[0]
    with pytest.raises(ValueError, match="auto"):
        UniteLM(ensemble=Ensemble([model], [tokenizer]), batch_size="auto")
