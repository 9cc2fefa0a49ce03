"""The lm-evaluation-harness backend ``UniteLM`` on tiny random models."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
from collections import defaultdict

import numpy as np
import pytest
import torch
import transformers

import unite_ext.decode

lm_eval = pytest.importorskip("lm_eval")

from decode_checks import Recorder, common_prefix, reference_loglikelihood, reference_value  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tiny_models import (  # noqa: E402
    RECURRENT_OVERRIDES,
    save_tiny_checkpoint,
    tiny_auto_model,
    tiny_model_for_tokenizer,
)

from unite_ext.decode import Ensemble, Generation, _decodes_recurrent  # noqa: E402
from unite_ext.lm_eval import UniteLM, combine_loglikelihoods  # noqa: E402
from unite_ext.toy_tokenizers import (  # noqa: E402
    SAMPLE_TEXTS,
    SIMPLE_CHAT_TEMPLATE,
    train_byte_level_bpe,
    train_sentencepiece_bpe,
)


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


@pytest.fixture
def reads(monkeypatch) -> dict[int, list[list[int]]]:
    """Every row each model reads (model index -> the feeds of its `_ModelBatch.read` calls)."""
    seen: dict[int, list[list[int]]] = defaultdict(list)
    read = unite_ext.decode._ModelBatch.read

    def spy_read(run: unite_ext.decode._ModelBatch, feeds: list[list[int]], keep: int):
        seen[run.member.index].extend(feeds)
        return read(run, feeds, keep)

    monkeypatch.setattr(unite_ext.decode._ModelBatch, "read", spy_read)
    return seen


def complete_characters(data: bytes) -> str:
    """The text of `data` that no further bytes can change: what every extension of it decodes to (the
    bytes of an unfinished character are left out)."""
    extensions = (b"A", b"\x80\x80\x80", b"\xbf\xbf\xbf", b"\x90\x80\x80")
    return os.path.commonprefix([(data + more).decode(errors="replace") for more in extensions])


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
    which leave it empty); generation reads each row of a batch alone and gives the texts of one row at a
    time."""
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


def test_is_greedy_waits_for_a_character_split_over_steps(members, monkeypatch):
    """A character whose bytes come in several steps decides a choice only once complete: the greedy check
    neither stops at its first bytes nor reads them as a replacement character."""
    models, tokenizers = zip(*members, strict=True)
    ensemble = Ensemble(list(models), list(tokenizers))
    lm = UniteLM(ensemble=ensemble)
    steps = [b" \xe6", b"\x9d\xb1", b"\xe4\xba", b"\xac", b"!!"]  # " 東京!!", a step at a time
    ends: list[int] = []

    def scripted(prompts: list[str], max_new_tokens: int, stop_when, **settings) -> list[Generation]:
        generations = []
        for row in range(len(prompts)):
            text, n = b"", 0
            for piece in steps[:max_new_tokens]:
                text, n = text + piece, n + 1
                if stop_when(row, text):
                    break
            ends.append(n)
            generations.append(Generation(text.decode(errors="replace"), len(text), n, "stop"))
        return generations

    monkeypatch.setattr(ensemble, "generate", scripted)
    pairs = [("Where?", " 東京"), ("Where?", " 東西"), ("Where?", " 東"), ("When?", " 東京!")]
    assert lm.greedy_flags(pairs) == [True, False, True, True]
    assert ends == [4, 5]


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


SCORING_CASES = [
    ("gpt2+llama", {}),  # the two members: absolute positions and RoPE, two tokenizers
    ("mistral", {"sliding_window": 6, "attn_implementation": "eager"}),
    ("lfm2", RECURRENT_OVERRIDES["lfm2"]),
]


def scoring_models(members, architecture: str, overrides: dict) -> tuple[list, list]:
    """The models and tokenizers of a SCORING_CASES case (skipped where transformers refuses it)."""
    if architecture == "gpt2+llama":
        return [model for model, _ in members], [tokenizer for _, tokenizer in members]
    if architecture in RECURRENT_OVERRIDES and not _decodes_recurrent(architecture):
        pytest.skip(f"transformers {transformers.__version__} is too old for {architecture} (refused)")
    _, tokenizer = members[0]
    maker = tiny_auto_model if architecture in RECURRENT_OVERRIDES else tiny_model_for_tokenizer
    return [maker(architecture, tokenizer, seed=9, **overrides)], [tokenizer]


@pytest.mark.parametrize("max_pass_tokens", [1, 3, 7, 40])
@pytest.mark.parametrize(("architecture", "overrides"), SCORING_CASES)
def test_scoring_reads_in_passes_of_at_most_max_pass_tokens(
    members, monkeypatch, architecture: str, overrides: dict, max_pass_tokens: int
):
    """Requests are batched by length as far as max_pass_tokens allows (a recurrent state must not read
    padding after a row's first token), and one longer than that is read alone in passes of at most that
    many tokens, its continuation's logits spread over several of them; log-sum-exps are taken a few
    positions at a time; each score still equals a float64 pass over the unpadded sequence, and rolling
    scores those of one pass."""
    models, tokenizers = scoring_models(members, architecture, overrides)
    passes: list[tuple[int, int, int]] = []  # rows, columns and positions with logits, of every pass
    read = unite_ext.decode._ModelBatch._pass

    def spy_pass(run: unite_ext.decode._ModelBatch, feeds: list[list[int]], keep: int) -> torch.Tensor:
        logits = read(run, feeds, keep)
        passes.append((len(feeds), max(map(len, feeds)), logits.shape[1]))
        return logits

    yields: list[int] = []  # passes that gave logits, per read
    read_logits = unite_ext.decode._ModelBatch.read

    def spy_read(run: unite_ext.decode._ModelBatch, feeds: list[list[int]], keep: int):
        yields.append(0)
        for item in read_logits(run, feeds, keep):
            yields[-1] += 1
            yield item

    monkeypatch.setattr(unite_ext.decode._ModelBatch, "_pass", spy_pass)
    monkeypatch.setattr(unite_ext.decode._ModelBatch, "read", spy_read)
    # Log-sum-exps over boxes of a few positions (several rows, or pieces of a row), the last ones short.
    vocabulary = max(model.config.vocab_size for model in models)
    monkeypatch.setattr(unite_ext.lm_eval, "LOGSUMEXP_CHUNK_ELEMENTS", 3 * vocabulary)
    ensemble = Ensemble(models, tokenizers, max_pass_tokens=max_pass_tokens)
    lm = UniteLM(ensemble=ensemble, batch_size=3, greedy_check=False)
    pairs = [
        ("The quick brown", " fox jumps over the lazy dog, twice."),
        ("A", " b"),
        (SAMPLE_TEXTS[0][:90], " and so on"),
        ("Numbers such as 3.14159, 42 and", " 1,000,000."),
        ("Lists:", " first item"),
    ]
    values = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    # A pass reads at least one position of every row.
    assert passes and all(
        max(columns, positions) <= max(1, max_pass_tokens // rows) for rows, columns, positions in passes
    )
    if max_pass_tokens == 40:
        assert any(rows > 1 for rows, _, _ in passes)  # short requests share a pass
    assert len(passes) > len(yields)  # long requests take several passes
    if max_pass_tokens < 40:
        assert max(yields) > 1  # a long continuation's logits come from several passes
    for (context, continuation), (value, _) in zip(pairs, values, strict=True):
        assert value == pytest.approx(reference_value(ensemble, context, continuation), abs=1e-4)
    text = [request("loglikelihood_rolling", " ".join(SAMPLE_TEXTS)[:200])]
    one_pass = Ensemble(models, tokenizers)
    assert UniteLM(ensemble=ensemble, max_length=48).loglikelihood_rolling(text) == pytest.approx(
        UniteLM(ensemble=one_pass, max_length=48).loglikelihood_rolling(text), abs=1e-4
    )


def test_choices_read_their_context_once_and_share_a_generation(members, monkeypatch, reads):
    """Multiple-choice requests (one context, several choices) read the context once, as one row whose
    last logits score every choice's first token; a choice of several tokens then reads its other tokens,
    and only those, in a row of its own (the context is read again for choices beyond the batch size). The
    is_greedy check generates once per context, and its row ends at the first step whose text covers or
    contradicts every choice. Every score still equals a float64 pass over the request's own unpadded
    tokens, every is_greedy flag the ensemble's own generation of as many steps as the choice has bytes."""
    models, tokenizers = zip(*members, strict=True)
    ensemble = Ensemble(list(models), list(tokenizers), weights=[0.3, 0.7])
    lm = UniteLM(ensemble=ensemble, batch_size=2, greedy_check=False)
    contexts = ["Question: which letter comes first?\nAnswer:", "The quick brown"]
    choices = [" a", " b", " c", " d", " the", " fox jumps", " lazy dogs sleep", " 42 more lines"]
    pairs = [(context, choice) for context in contexts for choice in choices]
    values = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for i, tokenizer in enumerate(tokenizers):
        encoded = [ensemble.tables.encode_mid_text(i, choice.encode()) for choice in choices]
        longer = [ids for ids in encoded if len(ids) > 1]
        assert 2 < len(longer) < len(choices) - 1
        rereads = -(-len(longer) // 2)  # a batch holds 2 tails: the context is read again for the others
        assert len(reads[i]) == len(contexts) * (rereads + len(longer))
        read_once = sum(len(tokenizer(context)["input_ids"]) for context in contexts)
        tokens = sum(map(len, reads[i]))
        assert tokens == rereads * read_once + len(contexts) * sum(len(ids) - 1 for ids in longer)
    for (context, choice), (value, _) in zip(pairs, values, strict=True):
        assert value == pytest.approx(reference_value(ensemble, context, choice), abs=1e-4)

    # The greedy check, with a choice that is the ensemble's own text, so that a row runs to its end.
    own = ensemble.generate(contexts, max_new_tokens=3, progress=False)
    pairs += [(context, generation.text) for context, generation in zip(contexts, own, strict=True)]
    runs: list[tuple[list[str], list[Generation]]] = []  # every generation: its prompts and results
    generate = ensemble.generate

    def spy_generate(prompts: list[str], **settings) -> list[Generation]:
        runs.append((prompts, generate(prompts, **settings)))
        return runs[-1][1]

    monkeypatch.setattr(ensemble, "generate", spy_generate)
    flags = lm.greedy_flags(pairs)
    monkeypatch.undo()
    ((prompts, generations),) = runs  # one generation, one row per context
    assert prompts == contexts
    for context, generation in zip(contexts, generations, strict=True):
        targets = [x for c, x in pairs if c == context]
        room = max(len(x.encode()) for x in targets)
        # The complete characters after each step of a generation left to run its whole room.
        recorder = Recorder(keep_logits=True)
        whole = ensemble.generate([context], max_new_tokens=room, on_step=recorder, progress=False)[0]
        assert whole.finish_reason == "length"
        texts = [bytes(t.generated[0]) for t in recorder.traces[1:]] + [whole.text.encode()]
        texts = [complete_characters(t) for t in texts]
        decided = [not any(len(t) < len(x) and x.startswith(t) for x in targets) for t in texts]
        assert generation.num_steps == decided.index(True) + 1 < room
    assert any(flags)
    for (context, choice), greedy in zip(pairs, flags, strict=True):
        own = ensemble.generate([context], max_new_tokens=len(choice.encode()), progress=False)[0].text
        assert greedy == own.startswith(choice)


@pytest.mark.parametrize("min_saving", [1, 10**9])
@pytest.mark.parametrize(("architecture", "overrides"), SCORING_CASES)
def test_rows_read_their_common_prefix_once(
    members, monkeypatch, reads, architecture: str, overrides: dict, min_saving: int
):
    """The rows of a batch that share a prefix (a few-shot prompt) read it once, in a row of its own whose
    cache every row then copies, when that saves SHARED_PREFIX_MIN_SAVING token reads or more; each row
    then reads its rest, and a longer choice its tail after that. A model that reads a row's tokens
    without masked slots between them (recurrent) reads every request whole. Every score equals a float64
    pass over the request's own unpadded tokens."""
    models, tokenizers = scoring_models(members, architecture, overrides)
    monkeypatch.setattr(unite_ext.decode, "SHARED_PREFIX_MIN_SAVING", min_saving)
    ensemble = Ensemble(models, tokenizers)
    lm = UniteLM(ensemble=ensemble, batch_size=6, greedy_check=False)  # one batch: 3 rows and their tails
    shots = SAMPLE_TEXTS[0] + "\nQ: What is 2 + 3?\nA: 5\n"
    contexts = [f"{shots}Q: {question}\nA:" for question in ("What is 1 + 1?", "Name a colour.", "Why?")]
    choices = [" 2", " blue and green"]
    pairs = [(context, choice) for context in contexts for choice in choices]
    values = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for i, tokenizer in enumerate(tokenizers):
        rows = [tokenizer(context)["input_ids"] for context in contexts]
        shared = min(len(common_prefix(rows[0], row)) for row in rows[1:])
        encoded = [ensemble.tables.encode_mid_text(i, choice.encode()) for choice in choices]
        tails = [ids[:-1] for ids in encoded if len(ids) > 1] * len(contexts)
        if models[i].config.model_type in RECURRENT_OVERRIDES:  # every request read whole, once
            expected = [row + ids[:-1] for row in rows for ids in encoded]
        elif min_saving <= (len(rows) - 1) * shared:
            expected = [rows[0][:shared]] + [row[shared:] for row in rows] + tails
        else:
            expected = rows + tails
        assert sorted(reads[i]) == sorted(expected)
    for (context, choice), (value, _) in zip(pairs, values, strict=True):
        assert value == pytest.approx(reference_value(ensemble, context, choice), abs=1e-4)


def test_rows_that_start_alike_are_batched_together(members, monkeypatch, reads):
    """Contexts of two few-shot prompts whose widths interleave (as two MMLU subjects' questions do) are
    batched by prompt, each batch reading its prompt once, not by width alone."""
    monkeypatch.setattr(unite_ext.decode, "SHARED_PREFIX_MIN_SAVING", 16)
    models, tokenizers = scoring_models(members, "gpt2+llama", {})
    ensemble = Ensemble(models, tokenizers)
    lm = UniteLM(ensemble=ensemble, batch_size=2, greedy_check=False)
    shots = {subject: f"{subject} {SAMPLE_TEXTS[0]}\n" for subject in ("Chemistry:", "History:")}
    # By width alone: the long chemistry question, the history ones, then the short chemistry one.
    questions = {"Chemistry:": ["word " * 30, "a?"], "History:": ["word " * 15, "word " * 10]}
    contexts = [f"{shots[s]}Q: {q}\nA:" for s in shots for q in questions[s]]
    values = lm.loglikelihood([request("loglikelihood", context, " 2") for context in contexts])
    for i, tokenizer in enumerate(tokenizers):
        assert len(tokenizer(shots["History:"])["input_ids"]) > unite_ext.decode.PREFIX_GROUP_TOKENS
        expected = []
        for subject in shots:
            first, second = [tokenizer(c)["input_ids"] for c in contexts if c.startswith(subject)]
            shared = len(common_prefix(first, second))
            expected += [first[:shared], first[shared:], second[shared:]]
        choice = ensemble.tables.encode_mid_text(i, b" 2")
        expected += [choice[:-1]] * len(contexts) if len(choice) > 1 else []  # read after each context
        assert sorted(reads[i]) == sorted(expected)
    for context, (value, _) in zip(contexts, values, strict=True):
        assert value == pytest.approx(reference_value(ensemble, context, " 2"), abs=1e-4)


def test_max_pass_tokens_reaches_the_ensemble(members, tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "byte", "byte", 5)
    assert UniteLM(models=str(folder), max_pass_tokens="64").ensemble.max_pass_tokens == 64  # harness: text
    with pytest.raises(ValueError, match="max_pass_tokens must be"):
        UniteLM(models=str(folder), max_pass_tokens=0)
    model, tokenizer = members[0]
    with pytest.raises(ValueError, match="max_pass_tokens=... cannot be combined with ensemble"):
        UniteLM(ensemble=Ensemble([model], [tokenizer]), max_pass_tokens=64)


@pytest.mark.parametrize("chat", [False, True])
def test_simple_evaluate_on_a_local_multiple_choice_task(tmp_path, chat):
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
    choices = (" yes", " no", " maybe")
    records = [{"q": q, "choices": list(choices), "label": label} for q, label in questions]
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
        apply_chat_template=chat,
        log_samples=True,
    )
    # Reference: every choice's mixture likelihood, computed here model by model without the harness,
    # from what the harness asks (its target delimiter " " before each choice, none with chat templates).
    # With chat, each model reads the question as one user message in its template (the tiny checkpoints'
    # SIMPLE_CHAT_TEMPLATE), the template's closing newline moved to the continuation.
    ensemble = Ensemble.from_pretrained(folders)
    expected: dict[str, list[float]] = {}
    for question, _ in questions:
        mixtures = []
        for choice in choices:
            scores = []
            for i, member in enumerate(ensemble.members):
                if chat:
                    eos = member.tokenizer.eos_token
                    context = f"<|user|>\nQuestion: {question}\nAnswer:{eos}\n<|assistant|>"
                    context_ids = member.tokenizer(context, add_special_tokens=False)["input_ids"]
                    continuation = "\n" + choice
                else:
                    context_ids = member.tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
                    continuation = " " + choice
                choice_ids = ensemble.tables.encode_mid_text(i, continuation.encode())
                scores.append(reference_loglikelihood(member.model, context_ids, choice_ids))
            mixtures.append(float(np.logaddexp(math.log(0.6) + scores[0], math.log(0.4) + scores[1])))
        expected[question] = mixtures
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(questions)
    for sample in samples:
        got = [value for ((value, _),) in sample["resps"]]
        assert got == pytest.approx(expected[sample["doc"]["q"]], abs=1e-4)
    right = sum(int(np.argmax(expected[q])) == label for q, label in questions)
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


# A second template, of another shape, that refuses system messages (as Gemma 2's and Mistral's do).
TURNS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture()
def chat_lm(members, caplog):
    """The two models with chat templates of different shapes."""
    models, tokenizers = zip(*members, strict=True)
    tokenizers = [copy.deepcopy(t) for t in tokenizers]
    tokenizers[0].chat_template, tokenizers[1].chat_template = SIMPLE_CHAT_TEMPLATE, TURNS_TEMPLATE
    return UniteLM(ensemble=Ensemble(list(models), tokenizers, weights=[0.4, 0.6]), batch_size=2)


def test_chat_contexts_are_rendered_by_each_model(chat_lm, caplog):
    lm, eos = chat_lm, "<|endoftext|>"
    tokenizers = [member.tokenizer for member in lm.members]
    question = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is fire hot?"}]
    asked = lm.apply_chat_template(question)
    assert "without its system messages" in caplog.text  # the second template refuses them
    prefilled = lm.apply_chat_template(
        [{"role": "user", "content": "Is fire hot?"}, {"role": "assistant", "content": "Answer:"}],
        add_generation_prompt=False,
    )
    # Each model's rendering, by hand from its template, with the trailing whitespace moved to the
    # continuation; the system message is gone for both.
    expected_texts = {
        asked: [
            (f"<|user|>\nIs fire hot?{eos}\n<|assistant|>", "\n yes"),
            ("[user] Is fire hot?\n[assistant]", " yes"),
        ],
        prefilled: [
            (f"<|user|>\nIs fire hot?{eos}\n<|assistant|>\nAnswer:", " yes"),
            ("[user] Is fire hot?\n[assistant] Answer:", " yes"),
        ],
    }
    values = lm.loglikelihood([request("loglikelihood", context, " yes") for context in expected_texts])
    for (value, _), texts in zip(values, expected_texts.values(), strict=True):
        scores = []
        for i, (member, (context, continuation)) in enumerate(zip(lm.members, texts, strict=True)):
            context_ids = tokenizers[i](context, add_special_tokens=False)["input_ids"]
            continuation_ids = lm.ensemble.tables.encode_mid_text(i, continuation.encode())
            scores.append(reference_loglikelihood(member.model, context_ids, continuation_ids))
        assert value == pytest.approx(
            float(np.logaddexp(math.log(0.4) + scores[0], math.log(0.6) + scores[1])), abs=1e-4
        )
    # Generation: each model reads its own rendering, as Ensemble.generate renders messages.
    settings = {"until": ["\n"], "max_gen_toks": 6}
    outputs = lm.generate_until([request("generate_until", c, dict(settings)) for c in expected_texts])
    conversations = [
        question[1:],
        [{"role": "user", "content": "Is fire hot?"}, {"role": "assistant", "content": "Answer:"}],
    ]
    assert outputs == [
        g.text
        for g in lm.ensemble.generate(messages=conversations, max_new_tokens=6, stop="\n", progress=False)
    ]


def test_chat_contexts_errors(chat_lm, members):
    lm = chat_lm
    user = [{"role": "user", "content": "Is fire hot?"}]
    with pytest.raises(ValueError, match="either ends with an assistant message"):
        lm.apply_chat_template(user, add_generation_prompt=False)
    with pytest.raises(ValueError, match="changed after apply_chat_template"):
        lm.loglikelihood([request("loglikelihood", lm.apply_chat_template(user) + " Answer:", " yes")])
    with pytest.raises(ValueError, match="named chat template"):
        lm.chat_template("tool_use")
    assert TURNS_TEMPLATE in lm.chat_template(True)
    long = [{"role": "user", "content": " ".join(SAMPLE_TEXTS) * 20}]
    with pytest.raises(ValueError, match="a conversation is not cut"):
        lm.generate_until([request("generate_until", lm.apply_chat_template(long), {"max_gen_toks": 4})])
    model, tokenizer = members[0]
    with pytest.raises(ValueError, match="has no chat template"):
        UniteLM(ensemble=Ensemble([model], [tokenizer])).apply_chat_template(user)


def test_think_end_token_keeps_the_answer_after_the_reasoning(members, monkeypatch):
    model, tokenizer = members[0]
    ensemble = Ensemble([model], [tokenizer])
    texts = ["<think>2+2 is 4\n</think>\n\n 4", "no reasoning here", "<think>a</think>b</think> c"]
    monkeypatch.setattr(
        ensemble,
        "generate",
        lambda **kw: [Generation(t, len(t), 1, "stop") for t in texts[: len(kw["prompts"])]],
    )
    lm = UniteLM(ensemble=ensemble, think_end_token="</think>")
    requests = [request("generate_until", "Q", {"until": ["\n\n"]}) for _ in texts]
    assert lm.generate_until(requests) == ["4", "no reasoning here", "c"]
    with pytest.raises(ValueError, match="needs think_end_token"):
        UniteLM(ensemble=ensemble, enable_thinking=True)
    with pytest.raises(ValueError, match="the token's text"):
        UniteLM(ensemble=ensemble, think_end_token="151668")


def test_a_chat_spec_needs_the_harness_chat_templates(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "byte", "byte", 5)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"models": [{"path": str(folder), "chat_template": True, "chat_template_kwargs": {"x": 1}}]}
        )
    )
    lm = UniteLM(spec=str(spec), greedy_check=False, enable_thinking=False)
    assert lm.template_kwargs == [{"enable_thinking": False, "x": 1}]
    shared = UniteLM(spec=str(spec), chat_template_args={"x": 2, "y": 3})
    assert shared.template_kwargs == [{"x": 1, "y": 3}]  # the spec's own win
    with pytest.raises(ValueError, match="apply_chat_template=True"):
        lm.loglikelihood([request("loglikelihood", "Is fire hot?", " yes")])
    context = lm.apply_chat_template([{"role": "user", "content": "Is fire hot?"}])
    ((value, _),) = lm.loglikelihood([request("loglikelihood", context, " yes")])
    assert math.isfinite(value)


def test_auto_batch_size_is_refused(members):
    model, tokenizer = members[0]
    with pytest.raises(ValueError, match="auto"):
        UniteLM(ensemble=Ensemble([model], [tokenizer]), batch_size="auto")
