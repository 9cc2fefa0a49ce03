"""Tests of the decoding loop `unite_ext.Ensemble` (SPEC.md section 3) on tiny random models.

References are independent of the loop: Hugging Face `generate`, the tokenizers' own encodings, fresh
full forward passes without a cache, and the same rows decoded one by one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from decode_checks import CORPUS, PROMPTS, Recorder, common_prefix, steps_with_slots_between_tokens
from tiny_models import (
    RECURRENT_OVERRIDES,
    tiny_auto_model,
    tiny_causal_lm,
    tiny_model_for_tokenizer,
)
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

import unite_ext.decode
import unite_ext.step
import unite_ext.sync
from unite_ext.decode import Ensemble, Generation, _decodes_recurrent
from unite_ext.toy_tokenizers import train_byte_level_bpe

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
)
DEVICES = ["cpu", CUDA]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(
    tokenizer_dir: Path, toy_tokenizers: dict[str, PreTrainedTokenizerBase]
) -> dict[str, PreTrainedTokenizerBase]:
    from transformers import AutoTokenizer

    real = {
        name: AutoTokenizer.from_pretrained(tokenizer_dir / name)
        for name in ("gpt2", "qwen2", "llama2", "mistral")
    }
    return {**real, **toy_tokenizers}


def real_vocab_model(name: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A tiny model for one of the real tokenizers; Qwen2 gets its real config's 151936 logits."""
    architecture = {"gpt2": "gpt2", "qwen2": "qwen2", "llama2": "llama", "mistral": "mistral"}.get(
        name, "llama"
    )
    vocab_size = 151936 if name == "qwen2" else len(tokenizer)
    return tiny_causal_lm(
        architecture,
        vocab_size,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def hf_suppressed_tokens(ensemble: Ensemble, i: int) -> list[int]:
    """Tokens the ensemble can never emit for model `i`: special tokens and the duplicates of a byte
    string that are not its canonical representative (e.g. Llama-2's <0x41> next to "A")."""
    to_canon = ensemble.tables.to_canon[i].long()
    from_canon = ensemble.tables.from_canon[i].long()
    ids = torch.arange(to_canon.shape[0])
    duplicate = (to_canon > 0) & (from_canon[to_canon.clamp(min=0)] != ids)
    return ids[(to_canon < 0) | duplicate].tolist()


def hf_greedy(
    model: PreTrainedModel, tokenizer, prompts: list[str], max_new_tokens: int, suppress: list[int]
) -> list[list[int]]:
    """Hugging Face greedy generation of left-padded prompts; each row cut after its first end token."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.eos_token_id
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    banned = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    banned[suppress] = True
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([lambda ids, scores: scores.masked_fill(banned, float("-inf"))]),
        pad_token_id=pad,
    )
    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    rows = []
    for generated in out[:, width:].tolist():
        ends = [j for j, t in enumerate(generated) if t in eos]
        rows.append(generated[: ends[0] + 1] if ends else generated)
    return rows


def assert_matches_hf(
    generations: list[Generation],
    recorder: Recorder,
    hf_rows: list[list[int]],
    eos: int,
    tokenizer,
    byte_level: bool,
) -> None:
    for r, (generation, hf_ids) in enumerate(zip(generations, hf_rows, strict=True)):
        assert generation.num_steps == len(hf_ids), (r, generation, hf_ids)
        assert generation.finish_reason == ("eos" if hf_ids[-1] == eos else "length")
        # Before step s the model holds exactly Hugging Face's first s generated tokens.
        seen = recorder.continuations[r, 0]
        assert len(seen) == len(hf_ids)
        for s, continuation in enumerate(seen):
            assert continuation == hf_ids[:s], (r, s)
        if byte_level:  # byte-level decoding is byte-exact (SentencePiece's drops a leading space)
            text_ids = hf_ids[:-1] if hf_ids[-1] == eos else hf_ids
            assert generation.text == tokenizer.decode(text_ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gpt2", "qwen2", "llama2", "mistral"])
def test_single_model_matches_hf_generate(tokenizers, name: str, device: str) -> None:
    tokenizer = tokenizers[name]
    model = real_vocab_model(name, tokenizer, seed=1).to(device)
    byte_level = name in ("gpt2", "qwen2")
    eos = tokenizer.eos_token_id
    max_new_tokens = 12
    # sync="fast" feeds the chosen token itself, as `generate` does ("exact" would re-encode the text).
    ensemble = Ensemble([model], [tokenizer], sync="fast")
    suppress = hf_suppressed_tokens(ensemble, 0)
    hf_batched = hf_greedy(model, tokenizer, PROMPTS, max_new_tokens, suppress)
    hf_alone = [hf_greedy(model, tokenizer, [p], max_new_tokens, suppress)[0] for p in PROMPTS[:2]]
    for k in (1, 3, 10):
        ensemble = Ensemble([model], [tokenizer], k=k, sync="fast", tables=ensemble.tables)
        recorder = Recorder()
        generations = ensemble.generate(
            PROMPTS, max_new_tokens=max_new_tokens, on_step=recorder, progress=False
        )
        assert_matches_hf(generations, recorder, hf_batched, eos, tokenizer, byte_level)
        for prompt, hf_ids in zip(PROMPTS[:2], hf_alone, strict=True):
            recorder = Recorder()
            generation = ensemble.generate(
                [prompt], max_new_tokens=max_new_tokens, on_step=recorder, progress=False
            )
            assert_matches_hf(generation, recorder, [hf_ids], eos, tokenizer, byte_level)


@pytest.mark.parametrize("sync", ["exact", "fast"])
def test_two_copies_of_a_model_give_its_text(tokenizers, sync: str) -> None:
    tokenizer = tokenizers["qwen2"]
    model = real_vocab_model("qwen2", tokenizer, seed=2)
    alone = Ensemble([model], [tokenizer], sync=sync)
    twice = Ensemble([model, model], [tokenizer, tokenizer], weights=[0.3, 0.7], sync=sync)
    expected = alone.generate(PROMPTS, max_new_tokens=16, progress=False)
    assert twice.generate(PROMPTS, max_new_tokens=16, progress=False) == expected
    if sync == "fast":  # the model reads its own tokens: the text is Hugging Face's greedy text
        hf_rows = hf_greedy(model, tokenizer, PROMPTS, 16, hf_suppressed_tokens(alone, 0))
        for generation, hf_ids in zip(expected, hf_rows, strict=True):
            eos_cut = hf_ids[:-1] if hf_ids[-1] == tokenizer.eos_token_id else hf_ids
            assert generation.text == tokenizer.decode(eos_cut, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def mixed_ensemble_parts(tokenizers) -> tuple[list[PreTrainedModel], list[PreTrainedTokenizerBase]]:
    """Four architectures with four kinds of tokenizers (byte-level and SentencePiece, real and trained)."""
    names = ["qwen2", "llama2", "toy_sp", "toy_byte"]
    models = [
        real_vocab_model("qwen2", tokenizers["qwen2"], seed=4),
        real_vocab_model("llama2", tokenizers["llama2"], seed=5),
        tiny_model_for_tokenizer("mistral", tokenizers["toy_sp"], seed=6),
        tiny_model_for_tokenizer("gpt2", tokenizers["toy_byte"], seed=7),
    ]
    return models, [tokenizers[n] for n in names]


def test_batch_gives_the_rows_texts(mixed_ensemble_parts) -> None:
    models, toks = mixed_ensemble_parts
    ensemble = Ensemble(models, toks, k=5)
    first = ensemble.generate(PROMPTS, max_new_tokens=20, batch_size=4, progress=False)
    # A stop string from the middle of row 0's text makes rows finish at different steps.
    stop = first[0].text[6:8]
    batched = ensemble.generate(PROMPTS, max_new_tokens=20, stop=stop, batch_size=4, progress=False)
    one_by_one = [
        ensemble.generate([p], max_new_tokens=20, stop=stop, batch_size=1, progress=False)[0] for p in PROMPTS
    ]
    assert batched == one_by_one
    for before, after in zip(first, batched, strict=True):
        if stop in before.text:
            assert after.text == before.text[: before.text.index(stop)]
            assert after.finish_reason == "stop"
        else:
            assert after == before
    assert batched[0].finish_reason == "stop" and batched[0].num_steps < 20


@pytest.mark.parametrize("device", DEVICES)
def test_waiting_rows_join_the_batch_as_rows_finish(mixed_ensemble_parts, monkeypatch, device: str) -> None:
    """Rows finish at different steps (stop strings from different depths of the texts); once at most half
    of a batch of 4 is left, waiting rows read their prompts and join it, their caches and the batch's
    padded to end at one slot. The texts are those of rows decoded one by one, and every step's logits
    those of a fresh pass."""
    models, toks = mixed_ensemble_parts
    models = [copy.deepcopy(m).to(device) for m in models]  # the fixture's models stay on the CPU
    ensemble = Ensemble(models, toks, k=4)
    prompts = PROMPTS + [prompt.upper() for prompt in PROMPTS]
    free = ensemble.generate(prompts, max_new_tokens=24, batch_size=1, progress=False)
    stops = [g.text[2 * r + 2 : 2 * r + 5] for r, g in enumerate(free) if len(g.text) >= 2 * r + 5]
    one_by_one = ensemble.generate(prompts, max_new_tokens=24, stop=stops, batch_size=1, progress=False)
    joins: list[tuple[int, int]] = []  # (rows in the batch, rows joining) of every join
    join = unite_ext.decode._ModelBatch.join

    def spy_join(run: unite_ext.decode._ModelBatch, other: unite_ext.decode._ModelBatch) -> None:
        joins.append((len(run.prompts), len(other.prompts)))
        join(run, other)

    monkeypatch.setattr(unite_ext.decode._ModelBatch, "join", spy_join)
    freed: list[int] = []  # the leading slots that rows leaving a batch left unused
    keep_rows = unite_ext.decode._ModelBatch.keep_rows

    def spy_keep_rows(run: unite_ext.decode._ModelBatch, rows: list[int]) -> None:
        freed.append(min(run.slots[b][0] for b in rows))
        keep_rows(run, rows)
        assert min(slots[0] for slots in run.slots) == 0  # they are removed

    monkeypatch.setattr(unite_ext.decode._ModelBatch, "keep_rows", spy_keep_rows)
    recorder = Recorder(keep_logits=True)
    batched = ensemble.generate(
        prompts, max_new_tokens=24, stop=stops, batch_size=4, on_step=recorder, progress=False
    )
    assert max(freed) > 0
    assert batched == one_by_one
    assert len({g.num_steps for g in batched}) > 2
    assert joins and all(0 < left <= 2 and left + joining <= 4 for left, joining in joins)
    assert any(min(trace.steps) == 0 < max(trace.steps) for trace in recorder.traces)  # old and new rows
    steps_with_slots_between_tokens(recorder, models, device)


@pytest.mark.parametrize("device", DEVICES)
def test_prompts_that_start_alike_read_their_common_prefix_once(
    mixed_ensemble_parts, monkeypatch, device: str
) -> None:
    """Few-shot prompts of two tasks whose questions' lengths interleave: each new batch takes prompts of
    one task (their first PREFIX_GROUP_TOKENS tokens agree), not the longest ones, and reads their common
    prefix once. The texts are those of rows decoded one by one, every step's logits a fresh pass's."""
    models, toks = mixed_ensemble_parts
    models = [copy.deepcopy(m).to(device) for m in models]  # the fixture's models stay on the CPU
    ensemble = Ensemble(models, toks, k=4)
    shots = {task: f"{task}: {' '.join(CORPUS[:8])}\n" for task in ("Arithmetic", "Geography")}
    questions = {"Arithmetic": ["Why? " * 12, "Why?"], "Geography": ["Why? " * 7, "Why? " * 5]}
    prompts = [f"{shots[task]}Q: {question}\nA:" for task in shots for question in questions[task]]
    one_by_one = ensemble.generate(prompts, max_new_tokens=6, batch_size=1, progress=False)
    monkeypatch.setattr(unite_ext.decode, "SHARED_PREFIX_MIN_SAVING", 16)
    batches: list[tuple[list[list[int]], bool]] = []  # every model's new batches: prompts, prefix read once
    new_batch = unite_ext.decode._new_batch

    def spy_new_batch(member, batch_prompts: list[list[int]], *args):
        run, feeds = new_batch(member, batch_prompts, *args)
        batches.append((batch_prompts, feeds != batch_prompts))
        return run, feeds

    monkeypatch.setattr(unite_ext.decode, "_new_batch", spy_new_batch)
    recorder = Recorder(keep_logits=True)
    batched = ensemble.generate(prompts, max_new_tokens=6, batch_size=2, on_step=recorder, progress=False)
    assert batched == one_by_one
    width = unite_ext.decode.PREFIX_GROUP_TOKENS
    assert all(len(tok(shots["Geography"])["input_ids"]) > width for tok in toks)
    assert all(all(p[:width] == rows[0][:width] for p in rows) for rows, _ in batches)  # one task each
    assert all(shared for rows, shared in batches[: len(models)])  # the first batch read its prefix once
    steps_with_slots_between_tokens(recorder, models, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("sync", "lookbehind"), [("exact", 1), ("exact", 8), ("fast", 8)])
def test_continuations_match_the_tokenizers_and_a_fresh_forward(
    mixed_ensemble_parts, sync: str, lookbehind: int, device: str
) -> None:
    models, toks = mixed_ensemble_parts
    models = [copy.deepcopy(m).to(device) for m in models]  # the fixture's models stay on the CPU
    ensemble = Ensemble(models, toks, k=4, sync=sync, lookbehind=lookbehind)
    recorder = Recorder(keep_logits=True)
    # Batches of 2 rows and of 1 row: rollbacks are masked per row, or cropped when all rows agree.
    ensemble.generate(PROMPTS[:3], max_new_tokens=24, batch_size=2, on_step=recorder, progress=False)
    assert len(recorder.traces) >= 32
    rollbacks = 0
    rows_disagree = 0  # steps where rows of one batch rolled back different numbers of tokens
    for trace in recorder.traces:
        for i, (model, tokenizer) in enumerate(zip(models, toks, strict=True)):
            dropped = []
            for b, row in enumerate(trace.rows):
                generated = trace.generated[b]
                continuation = trace.tokens[i][b][trace.prompt_lengths[i][b] :]
                if sync == "exact":
                    assert continuation == ensemble.tables.encode_mid_text(i, generated), (
                        trace.steps,
                        i,
                        row,
                    )
                    text = generated.decode("utf-8", errors="replace")
                    round_trips = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
                    # Byte-level tokenizers: the plain encoding of a text that round-trips.
                    if i in (0, 3) and round_trips and text.encode() == generated:
                        assert continuation == tokenizer.encode(text, add_special_tokens=False)
                else:  # the tokens spell the generated bytes
                    canonical = ensemble.tables.to_canon[i][continuation].tolist()
                    assert ensemble.tables.decode(canonical) == generated and min(canonical, default=1) > 0
                # The cached, masked, rolled-back state gives the logits of a fresh pass over the tokens.
                with torch.no_grad():
                    ids = torch.tensor([trace.tokens[i][b]], device=model.device)
                    fresh = model(ids, logits_to_keep=1).logits[0, -1]
                torch.testing.assert_close(trace.logits[i][b], fresh, atol=2e-4, rtol=1e-4)
                step = trace.steps[b]
                previous = recorder.continuations[row, i][step - 1] if step else []
                dropped.append(len(previous) - len(common_prefix(previous, continuation)))
            rollbacks += sum(d > 0 for d in dropped)
            rows_disagree += len(set(dropped)) > 1
    if sync == "exact":
        assert rollbacks > 0 and rows_disagree > 0  # the masked (per-row) rollback path ran
    else:
        assert rollbacks == 0


# Windows and chunks of 6 tokens, well below the rows' lengths.
LOCAL_ATTENTION_CASES = [
    ("mistral", "sliding_attention", {"sliding_window": 6, "attn_implementation": "sdpa"}),  # all layers
    ("mistral", "sliding_attention", {"sliding_window": 6, "attn_implementation": "eager"}),
    ("gemma2", "sliding_attention", {"sliding_window": 6, "attn_implementation": "eager"}),  # and full
    ("qwen2", "sliding_attention", {"sliding_window": 6, "use_sliding_window": True, "max_window_layers": 1}),
    ("llama4", "chunked_attention", {"attention_chunk_size": 6, "attn_implementation": "sdpa"}),
]


def decode_pair(
    toy_tokenizers, architecture: str, overrides: dict, device: str, seed: int, **ensemble_kwargs: Any
) -> tuple[list[PreTrainedModel], Recorder, int]:
    """Decodes PROMPTS in one batch (exact sync, k=4, 24 new tokens) with two tiny `architecture` models, one
    per toy tokenizer, and checks every step's logits against a fresh pass; returns the models, the
    recorder and the count of steps with masked slots between a row's tokens."""
    toks = [toy_tokenizers["toy_byte"], toy_tokenizers["toy_sp"]]
    models = [
        tiny_model_for_tokenizer(architecture, tokenizer, seed=seed + n, **overrides).to(device)
        for n, tokenizer in enumerate(toks)
    ]
    recorder = Recorder(keep_logits=True)
    Ensemble(models, toks, k=4, sync="exact", **ensemble_kwargs).generate(
        PROMPTS, max_new_tokens=24, batch_size=4, on_step=recorder, progress=False
    )
    return models, recorder, steps_with_slots_between_tokens(recorder, models, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("architecture", "layer_type", "overrides"), LOCAL_ATTENTION_CASES)
def test_local_attention_counts_tokens_not_cache_slots(
    toy_tokenizers, architecture: str, layer_type: str, overrides: dict, device: str
) -> None:
    """Padding and rolled-back slots sit between a batch row's tokens; a window of 6 tokens must still
    hold the row's last 6 tokens, and a chunk its 6 positions, as in a fresh pass over the tokens."""
    models, recorder, uneven = decode_pair(toy_tokenizers, architecture, overrides, device, seed=30)
    assert layer_type in (getattr(models[0].config, "layer_types", None) or ["sliding_attention"])
    assert uneven > 0
    assert min(len(t) for t in recorder.traces[-1].tokens[0]) > 3 * 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin", [0, 2])
@pytest.mark.parametrize(("architecture", "layer_type", "overrides"), LOCAL_ATTENTION_CASES)
def test_local_attention_layers_drop_the_keys_out_of_reach(
    toy_tokenizers, monkeypatch, architecture: str, layer_type: str, overrides: dict, margin: int, device: str
) -> None:
    """With a rollback margin of a few tokens and trims of one slot, the local-attention layers hold about
    a window of slots, and every step's logits are still those of a fresh pass."""
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_ROLLBACK_MARGIN", margin)
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_TRIM_SLOTS", 1)
    held: list[tuple[int, int, int]] = []  # per forward pass: cache slots, local layers' and other layers'
    forward = unite_ext.decode._ModelBatch.forward

    def spy_forward(run: unite_ext.decode._ModelBatch, feeds: list[list[int]]) -> torch.Tensor:
        logits = forward(run, feeds)
        types = run.member.local_attention.layer_types
        lengths = {t: layer.keys.shape[-2] for layer, t in zip(run.cache.layers, types, strict=True)}
        held.append((run.length, lengths[layer_type], lengths.get("full_attention", run.length)))
        return logits

    monkeypatch.setattr(unite_ext.decode._ModelBatch, "forward", spy_forward)
    decode_pair(toy_tokenizers, architecture, overrides, device, seed=30)
    assert all(full == slots for slots, _, full in held)  # full-attention layers keep every slot
    # A window of 6 tokens plus the margin and the fed tokens, and the padding between them.
    assert min(slots - local for slots, local, _ in held[-8:]) > 8


@pytest.mark.parametrize(("architecture", "layer_type", "overrides"), LOCAL_ATTENTION_CASES[::2])
def test_a_rollback_past_the_kept_keys_reads_the_row_again(
    toy_tokenizers, monkeypatch, architecture: str, layer_type: str, overrides: dict
) -> None:
    """A row rolled back further than its local-attention layers' kept keys reach reads all its tokens
    again; its logits, and the other row's, are those of a fresh pass."""
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_ROLLBACK_MARGIN", 0)
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_TRIM_SLOTS", 1)
    tokenizer = toy_tokenizers["toy_byte"]
    model = tiny_model_for_tokenizer(architecture, tokenizer, seed=33, **overrides)
    generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    prompts = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (5, 9)]
    run = unite_ext.decode._ModelBatch(unite_ext.decode._Member(0, model, tokenizer), prompts, None, 8)

    def step(feeds: list[list[int]]) -> None:
        for continuation, feed in zip(run.continuations, feeds, strict=True):
            continuation.tokens.extend(feed)
        with torch.no_grad():
            logits = run.forward(feeds)
            for b, continuation in enumerate(run.continuations):
                fresh = model(torch.tensor([prompts[b] + continuation.tokens])).logits[0, -1]
                torch.testing.assert_close(logits[b], fresh, atol=2e-4, rtol=1e-4)

    with torch.no_grad():
        run.forward(prompts)
    for _ in range(12):
        step(torch.randint(3, 200, (2, 1), generator=generator).tolist())
    assert run.local_starts[layer_type] > 0
    del run.continuations[0].tokens[-8:]
    run.roll_back(0, 8)
    run.crop()
    assert run.rereads == {0}
    step([[17], [18, 19]])
    assert not run.rereads and run.slots[0][0] > run.local_starts[layer_type]
    for _ in range(3):
        step(torch.randint(3, 200, (2, 1), generator=generator).tolist())


# A full-attention model (2-D masks) and local-attention ones (4-D masks by position, keys dropped as the
# passes go); recurrent models are read in passes in test_recurrent_models_read_each_row_alone.
PASS_CASES = [
    ("llama", {}),
    *[(architecture, overrides) for architecture, _, overrides in LOCAL_ATTENTION_CASES[:3]],
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_pass_tokens", [1, 10])
@pytest.mark.parametrize(("architecture", "overrides"), PASS_CASES)
def test_long_feeds_are_read_in_passes_of_at_most_max_pass_tokens(
    toy_tokenizers, monkeypatch, architecture: str, overrides: dict, max_pass_tokens: int, device: str
) -> None:
    """Prompts longer than a pass holds are read in several passes over consecutive columns (one column
    of the 4 rows per pass for a budget of 1 token, 2 for 10), in which the shorter rows feed nothing at
    first; local-attention layers drop the keys out of reach between those passes. Every step's logits are
    still those of a fresh pass over the row's tokens."""
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_ROLLBACK_MARGIN", 0)
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_TRIM_SLOTS", 1)
    passes: dict[int, list[list[list[int]]]] = defaultdict(list)  # model -> each pass's feeds
    kept: dict[int, list[tuple[int, int]]] = defaultdict(list)  # model -> (fewest slots a layer holds, slots)
    read = unite_ext.decode._ModelBatch._pass

    def spy_pass(run: unite_ext.decode._ModelBatch, feeds: list[list[int]], keep: int) -> torch.Tensor:
        passes[run.member.index].append(feeds)
        logits = read(run, feeds, keep)
        kept[run.member.index].append((min(layer.keys.shape[-2] for layer in run.cache.layers), run.length))
        return logits

    monkeypatch.setattr(unite_ext.decode._ModelBatch, "_pass", spy_pass)
    models, recorder, _ = decode_pair(
        toy_tokenizers, architecture, overrides, device, seed=70, max_pass_tokens=max_pass_tokens
    )
    columns = max(1, max_pass_tokens // len(PROMPTS))
    first = recorder.traces[0]
    for i in range(len(models)):
        assert all(max(len(feed) for feed in feeds) <= columns for feeds in passes[i])
        prompts = [
            tokens[:length] for tokens, length in zip(first.tokens[i], first.prompt_lengths[i], strict=True)
        ]
        reads = -(-max(len(p) for p in prompts) // columns)  # the passes over the prompts
        assert reads > 1
        for b, prompt in enumerate(prompts):
            assert [token for feeds in passes[i][:reads] for token in feeds[b]] == prompt
        assert any(not feeds[b] for feeds in passes[i][:reads] for b in range(len(prompts)))
        trimmed = any(fewest < slots for fewest, slots in kept[i][: reads - 1])
        assert trimmed == (architecture != "llama")


def test_slot_distance_models_read_each_row_alone(toy_tokenizers) -> None:
    """MPT's ALiBi grows with the distance in cache slots: it reads each row of a batch in passes of its
    own, while the other model reads the rows together. The texts are those of rows decoded one by one,
    and every step's logits those of a fresh pass."""
    toks = [toy_tokenizers["toy_byte"], toy_tokenizers["toy_sp"]]
    models = [tiny_auto_model("mpt", toks[0], seed=40), tiny_model_for_tokenizer("llama", toks[1], seed=41)]
    ensemble = Ensemble(models, toks, k=4, sync="exact")
    one_by_one = ensemble.generate(PROMPTS, max_new_tokens=16, batch_size=1, progress=False)
    recorder = Recorder(keep_logits=True)
    with rows_per_pass(models) as rows_read:
        batched = ensemble.generate(
            PROMPTS, max_new_tokens=16, batch_size=3, on_step=recorder, progress=False
        )
    assert batched == one_by_one
    assert rows_read[0] == {1} and max(rows_read[1]) == 3
    steps_with_slots_between_tokens(recorder, models, "cpu")


@contextlib.contextmanager
def rows_per_pass(models: list[PreTrainedModel]) -> Iterator[list[set[int]]]:
    """Per model, the numbers of rows its forward passes read within the block."""
    rows: list[set[int]] = [set() for _ in models]
    hooks = [
        model.register_forward_pre_hook(
            lambda _, args, kwargs, seen=seen: seen.add(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        for seen, model in zip(rows, models, strict=True)
    ]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("mamba", {"state_size": 4, "expand": 2}),  # wrong after a cached step without cache positions
        ("jamba", {"attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 1}),  # wrong on chunks
    ],
)
def test_unchecked_recurrent_models_are_refused(toy_tokenizers, model_type: str, overrides: dict) -> None:
    tokenizer = toy_tokenizers["toy_byte"]
    try:
        model = tiny_auto_model(model_type, tokenizer, **overrides)
    except ValueError as error:  # transformers 4.x builds Jamba only with its CUDA kernels
        pytest.skip(f"transformers {transformers.__version__} builds no {model_type} model here: {error}")
    with pytest.raises(ValueError, match=rf"models\[0\].*layers, and model type '{model_type}' is not among"):
        Ensemble([model], [tokenizer])


@pytest.mark.skipif(not _decodes_recurrent("lfm2"), reason="LFM2 needs a later transformers")
def test_a_recurrent_model_that_builds_no_cache_is_an_error(toy_tokenizers, monkeypatch) -> None:
    tokenizer = toy_tokenizers["toy_byte"]
    model = tiny_auto_model("lfm2", tokenizer, **RECURRENT_OVERRIDES["lfm2"])
    forward = model.forward

    def forward_without_cache(**kwargs):
        output = forward(**kwargs)
        # The field is `cache` in later transformers releases (which log a deprecation for the old name).
        setattr(output, "cache" if "cache" in output.__dataclass_fields__ else "past_key_values", None)
        return output

    monkeypatch.setattr(model, "forward", forward_without_cache)
    with pytest.raises(RuntimeError, match=r"models\[0\].*built no cache of its own"):
        Ensemble([model], [tokenizer]).generate(PROMPTS[:1], max_new_tokens=2, progress=False)


@pytest.mark.skipif(not _decodes_recurrent("lfm2"), reason="LFM2 needs a later transformers")
def test_the_cache_goes_by_the_name_the_model_takes(toy_tokenizers, monkeypatch) -> None:
    # Later transformers releases call the cache `cache` and log a deprecation for the older
    # `past_key_values`, given or read: the loop uses the name each model's forward takes.
    logged: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, message, *a, **k: logged.append(message))
    tokenizer = toy_tokenizers["toy_byte"]
    models = [
        tiny_auto_model("lfm2", tokenizer, **RECURRENT_OVERRIDES["lfm2"]),  # builds its own cache
        tiny_model_for_tokenizer("llama", tokenizer),
    ]
    Ensemble(models, [tokenizer] * 2).generate(PROMPTS[:2], max_new_tokens=4, progress=False)
    assert not [message for message in logged if "deprecated" in str(message)]


def test_every_decoded_recurrent_model_type_is_checked() -> None:
    assert set(RECURRENT_OVERRIDES) == set(unite_ext.decode._RECURRENT_MODELS)


def test_releases_compare_by_number() -> None:
    release = unite_ext.decode._release
    assert release("5.25.0.dev0") == (5, 25, 0) and release("5") == (5, 0, 0)
    assert release("4.56.1") < release("5.7.0") < release("5.13.0") < release("5.13.1")


# Set by scripts/recurrent_floors.sh: check the recurrent models with any transformers release.
LIFT_FLOORS_VARIABLE = "UNITE_EXT_LIFT_RECURRENT_FLOORS"


class RollBackMore:
    """A synchroniser that takes back more tokens than `inner` asks for (`extra[s % len(extra)]` at step
    `s`, as many as the row keeps) and feeds them again: the same tokens, through a rollback at every
    step."""

    def __init__(self, inner: unite_ext.sync.Synchronizer, extra: tuple[int, ...]):
        self.inner = inner
        self.extra = extra
        self.steps = 0

    def extend(self, continuation, generated, canonical_id: int) -> tuple[int, list[int]]:
        rollback, feed = self.inner.extend(continuation, generated, canonical_id)
        kept = len(continuation.tokens) - len(feed)
        more = min(kept, self.extra[self.steps % len(self.extra)])
        self.steps += 1
        return rollback + more, continuation.tokens[kept - more :]


@pytest.mark.parametrize(("sync", "copies"), [("exact", True), ("exact", False), ("fast", False)])
@pytest.mark.parametrize("model_type", sorted(RECURRENT_OVERRIDES))
def test_recurrent_models_read_each_row_alone(
    toy_tokenizers, monkeypatch, model_type: str, sync: str, copies: bool
) -> None:
    """A model with recurrent layers cannot take back a token: it reads each row of a batch in passes of
    its own (the other model reads the rows together), and after a rollback (here, in exact mode, at every
    other step) goes back to its cache as it was before its last forward pass (when rollbacks are frequent
    enough to pay for copies; `copies=False` raises the bar out of reach), or reads its tokens again when
    the rollback reaches further back or there is no copy. Prompts and rereads go in passes of 4 tokens.
    Every step's logits are those of a fresh pass over the row's tokens."""
    toks = [toy_tokenizers["toy_byte"], toy_tokenizers["toy_sp"]]
    try:
        recurrent = tiny_auto_model(model_type, toks[0], seed=60, **RECURRENT_OVERRIDES[model_type])
    except (ValueError, KeyError) as error:  # unknown to this transformers, or needs a GPU kernel here
        pytest.skip(f"transformers {transformers.__version__} builds no {model_type} model here: {error}")
    models = [recurrent, tiny_model_for_tokenizer("llama", toks[1], seed=61)]
    if os.environ.get(LIFT_FLOORS_VARIABLE):  # scripts/recurrent_floors.sh: is this release exact?
        monkeypatch.setitem(unite_ext.decode._RECURRENT_MODELS, model_type, "0")
    if not _decodes_recurrent(model_type):
        floor = re.escape(unite_ext.decode._RECURRENT_MODELS[model_type])
        with pytest.raises(
            ValueError, match=rf"models\[0\].*layers, which the ensemble decodes with transformers >= {floor}"
        ):
            Ensemble(models, toks)
        return
    if not copies:
        monkeypatch.setattr(unite_ext.decode, "COPY_ROLLBACK_RATE", 1.0)
    ensemble = Ensemble(models, toks, k=4, sync=sync, max_pass_tokens=4)
    if sync == "exact":  # within the last forward pass's tokens (1), and beyond them (3); five values, so
        # that each of the four rows meets every one (a row rolled back at every step never holds a copy)
        ensemble._synchronizers[0] = RollBackMore(ensemble._synchronizers[0], extra=(1, 0, 3, 0, 0))
    # Per row of the recurrent model (its one-row batch): (first position, tokens) of each forward pass.
    passes: dict[unite_ext.decode._ModelBatch, list[tuple[int, int]]] = defaultdict(list)
    read_pass = unite_ext.decode._ModelBatch._pass

    def spy_pass(run: unite_ext.decode._ModelBatch, feeds: list[list[int]], keep: int) -> torch.Tensor:
        if run.member.index == 0:
            ((feed,), (slots,)) = feeds, run.slots
            passes[run].append((len(slots), len(feed)))
        return read_pass(run, feeds, keep)

    monkeypatch.setattr(unite_ext.decode._ModelBatch, "_pass", spy_pass)
    recorder = Recorder(keep_logits=True)
    with rows_per_pass(models) as rows_read:
        ensemble.generate(PROMPTS, max_new_tokens=12, batch_size=4, on_step=recorder, progress=False)
    assert rows_read[0] == {1} and max(rows_read[1]) == len(PROMPTS)  # the other model batches the rows
    assert len(passes) == len(PROMPTS) and max(len(trace.rows) for trace in recorder.traces) == len(PROMPTS)
    # Chunked (prompt) and step-by-step (decode) scans of a recurrence round differently: 1e-3, where a
    # state that kept rolled-back tokens is off by 1e-2 and more.
    steps_with_slots_between_tokens(recorder, models, "cpu", atol=1e-3)
    # A pass that starts before the end of the row's pass before it went back to a copy of the cache; one
    # that starts at position 0, other than the row's first, read the row again.
    restored = sum(
        0 < start < sum(before)
        for row in passes.values()
        for before, (start, _) in zip(row, row[1:], strict=False)
    )
    reread = sum(start == 0 for row in passes.values() for start, _ in row) - len(PROMPTS)
    if copies:
        assert restored >= 5 and reread >= 5, (restored, reread)
    elif sync == "exact":
        assert restored == 0 and reread >= 10, (restored, reread)
    else:  # some chosen tokens took several of the model's tokens: chunks after the first of several tokens
        assert restored == reread == 0
        growth = [
            len(b) - len(a)
            for (_, i), seen in recorder.continuations.items()
            if i == 0
            for a, b in zip(seen, seen[1:], strict=False)
        ]
        assert max(growth) >= 2


@pytest.mark.parametrize(("architecture", "layer_type", "overrides"), LOCAL_ATTENTION_CASES[::4])
def test_local_attention_over_cache_slots_is_refused(
    toy_tokenizers, architecture: str, layer_type: str, overrides: dict
) -> None:
    tokenizer = toy_tokenizers["toy_byte"]
    flex = {**overrides, "attn_implementation": "flex_attention"}
    model = tiny_model_for_tokenizer(architecture, tokenizer, **flex)
    with pytest.raises(ValueError, match=rf"models\[0\].*{layer_type} layers.*flex_attention"):
        Ensemble([model], [tokenizer])
    local = [name for name in ("sliding_window", "attention_chunk_size") if name in overrides]
    plain = tiny_model_for_tokenizer(architecture, tokenizer, **{**flex, **dict.fromkeys(local)})
    # No local attention: the 2-D mask serves every implementation (transformers 4.x's Llama 4 config keeps
    # chunked layers without a chunk size, which the model itself cannot run).
    if set(getattr(plain.config, "layer_types", None) or []) <= {"full_attention"}:
        Ensemble([plain], [tokenizer])


CONTEXT = 40  # context length of the limited models below, in tokens


@pytest.mark.parametrize("sync", ["exact", "fast"])
def test_rows_end_when_a_model_context_is_full(toy_tokenizers, sync: str) -> None:
    """A row ends ("length") at the last step before a model would read past its context length; until
    then it is the same text as with room to spare (rotary positions do not depend on that length)."""
    toks = [toy_tokenizers["toy_byte"], toy_tokenizers["toy_sp"]]

    def ensemble(context: int) -> Ensemble:
        models = [
            tiny_auto_model("llama", toks[0], seed=50, max_position_embeddings=context),
            tiny_auto_model("qwen2", toks[1], seed=51),
        ]
        return Ensemble(models, toks, k=4, sync=sync)

    recorder = Recorder(keep_logits=True)
    options = {"max_new_tokens": 60, "batch_size": 3, "progress": False}
    reference = ensemble(1024).generate(PROMPTS, on_step=recorder, **options)
    text_before = {(row, t.steps[b]): t.generated[b] for t in recorder.traces for b, row in enumerate(t.rows)}
    streamed: dict[int, str] = defaultdict(str)
    limited = ensemble(CONTEXT).generate(
        PROMPTS, stream=lambda row, delta: streamed.__setitem__(row, streamed[row] + delta), **options
    )
    full_rows = 0
    for r, (free, cut) in enumerate(zip(reference, limited, strict=True)):
        assert streamed[r] == cut.text
        prompt = len(toks[0](PROMPTS[r])["input_ids"])
        held = [prompt + len(tokens) for tokens in recorder.continuations[r, 0]]  # before each step
        steps = next((s for s in range(1, len(held)) if held[s] > CONTEXT), None)
        if steps is None:  # the row ended before the model's context was full
            assert cut == free
            continue
        full_rows += 1
        assert (cut.num_steps, cut.finish_reason) == (steps, "length"), (r, held)
        expected = text_before[r, steps]
        assert (cut.text, cut.num_bytes) == (expected.decode(errors="replace"), len(expected))
    assert full_rows >= 2
    with pytest.raises(
        ValueError, match=rf"prompt 1 encodes to \d+ tokens for models\[0\].*context length of {CONTEXT}"
    ):
        ensemble(CONTEXT).generate(["x", "y" * 200], **options)


def test_learned_positions_and_scaled_rope_past_the_context_length(toy_tokenizers) -> None:
    """GPT-2's learned positions end at its context length (one more would index out of range): its rows
    end there. A config that scales RoPE is meant to reach past `max_position_embeddings`: no limit."""
    toks = [toy_tokenizers["toy_byte"], toy_tokenizers["toy_sp"]]
    scaled = {"max_position_embeddings": CONTEXT, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    models = [
        tiny_auto_model("gpt2", toks[0], seed=52, max_position_embeddings=CONTEXT),
        tiny_auto_model("llama", toks[1], seed=53, **scaled),
    ]
    recorder = Recorder()
    generations = Ensemble(models, toks, k=4).generate(
        PROMPTS, max_new_tokens=60, batch_size=3, on_step=recorder, progress=False
    )
    assert all(g.finish_reason == "length" and g.num_steps < 60 for g in generations)
    held = [
        max(
            len(tok(prompt)["input_ids"]) + len(recorder.continuations[r, i][-1])
            for r, prompt in enumerate(PROMPTS)
        )
        for i, tok in enumerate(toks)
    ]
    assert held[0] == CONTEXT  # its last step read a full context
    generations = Ensemble(models[1:], toks[1:], k=4).generate(PROMPTS, max_new_tokens=60, progress=False)
    assert all(g.num_steps == 60 for g in generations)


def test_end_of_sequence_ends_a_row(tokenizers) -> None:
    tokenizer = tokenizers["gpt2"]
    eos = tokenizer.eos_token_id
    model = tiny_model_for_tokenizer("llama", tokenizer, seed=8)
    probe = Ensemble([model], [tokenizer], sync="fast")
    suppress = [t for t in hf_suppressed_tokens(probe, 0) if t != eos]
    hf_ids = hf_greedy(model, tokenizer, PROMPTS[:1], 12, suppress)[0]
    # Make the end token's logit a little above that of the token the model emits at step 4.
    with torch.no_grad():
        model.lm_head.weight[eos] = 1.05 * model.lm_head.weight[hf_ids[4]]
    hf_ids = hf_greedy(model, tokenizer, PROMPTS[:1], 12, suppress)[0]
    assert hf_ids[-1] == eos and len(hf_ids) < 12
    streamed: dict[int, str] = defaultdict(str)
    generation = Ensemble([model], [tokenizer], sync="fast").generate(
        PROMPTS[:1],
        max_new_tokens=12,
        stream=lambda row, delta: streamed.__setitem__(row, streamed[row] + delta),
        progress=False,
    )[0]
    assert generation.finish_reason == "eos"
    assert generation.num_steps == len(hf_ids)
    assert generation.text == tokenizer.decode(hf_ids[:-1], clean_up_tokenization_spaces=False)
    assert generation.num_bytes == len(generation.text.encode())
    assert streamed[0] == generation.text


def test_a_model_with_weight_zero_does_not_vote(mixed_ensemble_parts) -> None:
    models, toks = mixed_ensemble_parts
    for voter in (0, 1):
        alone = Ensemble([models[voter]], [toks[voter]]).generate(PROMPTS, max_new_tokens=10, progress=False)
        weights = [1.0, 0.0] if voter == 0 else [0.0, 1.0]
        pair = Ensemble(models[:2], toks[:2], weights=weights).generate(
            PROMPTS, max_new_tokens=10, progress=False
        )
        assert pair == alone


def test_stop_strings_and_length_with_streaming(mixed_ensemble_parts) -> None:
    models, toks = mixed_ensemble_parts
    ensemble = Ensemble(models[:2], toks[:2])
    full = ensemble.generate(PROMPTS, max_new_tokens=15, progress=False)
    assert all(g.finish_reason == "length" and g.num_steps == 15 for g in full)
    # A long stop string spans several steps: its beginning must not be streamed before it is complete.
    stops = [full[1].text[4:7], full[2].text[-2:], full[3].text[3:15]]
    streamed: dict[int, list[str]] = defaultdict(list)
    stopped = ensemble.generate(
        PROMPTS,
        max_new_tokens=15,
        stop=stops,
        stream=lambda row, delta: streamed[row].append(delta),
        progress=False,
    )
    for r, (before, after) in enumerate(zip(full, stopped, strict=True)):
        positions = [before.text.find(s) for s in stops if s in before.text]
        if positions:
            assert after.finish_reason == "stop"
            assert after.text == before.text[: min(positions)]
        else:
            assert after == before
        assert "".join(streamed[r]) == after.text
        assert after.num_bytes == len(after.text.encode())
    assert all(g.finish_reason == "stop" for g in stopped[1:])
    # stop_when sees every row's bytes after every step, and ends row r once they are r + 3 or more.
    seen: dict[int, list[bytes]] = defaultdict(list)

    def long_enough(row: int, generated: bytes, most: int) -> bool:
        seen[row].append(generated)
        return len(generated) >= most + row

    again = ensemble.generate(
        PROMPTS, max_new_tokens=15, stop_when=partial(long_enough, most=10**6), progress=False
    )
    assert again == full and [len(seen[r]) for r in range(len(PROMPTS))] == [15] * len(PROMPTS)
    whole, seen = dict(seen), defaultdict(list)
    ended = ensemble.generate(
        PROMPTS, max_new_tokens=15, stop_when=partial(long_enough, most=3), progress=False
    )
    for r, generation in enumerate(ended):
        assert seen[r] == whole[r][: len(seen[r])]
        assert generation.num_steps == len(seen[r]) and generation.finish_reason == "stop"
        assert generation.num_bytes == len(seen[r][-1]) >= r + 3 > len(([b""] + seen[r])[-2])
    short = ensemble.generate(PROMPTS[:2], max_new_tokens=3, progress=False)
    assert [g.num_steps for g in short] == [3, 3] and {g.finish_reason for g in short} == {"length"}
    assert [g.text for g in short] == [
        g.text for g in ensemble.generate(PROMPTS[:2], max_new_tokens=3, progress=False)
    ]


def test_sampling_is_reproducible_with_a_seed(mixed_ensemble_parts) -> None:
    models, toks = mixed_ensemble_parts
    ensemble = Ensemble(models[:2], toks[:2])

    def sample(seed: int) -> list[str]:
        out = ensemble.generate(
            PROMPTS[:3], max_new_tokens=12, do_sample=True, temperature=1.5, seed=seed, progress=False
        )
        return [g.text for g in out]

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    greedy = [g.text for g in ensemble.generate(PROMPTS[:3], max_new_tokens=12, progress=False)]
    assert sample(0) != greedy


def test_prompts_and_chat_messages_use_each_tokenizers_rules(tokenizers) -> None:
    toy = train_byte_level_bpe(CORPUS, vocab_size=400)
    toy.chat_template = CHAT_TEMPLATE
    toks = [tokenizers["qwen2"], tokenizers["llama2"], toy]
    models = [real_vocab_model("qwen2", toks[0], seed=9), real_vocab_model("llama2", toks[1], seed=10)]
    models.append(tiny_model_for_tokenizer("qwen2", toy, seed=11))
    recorder = Recorder(keep_logits=True)
    plain = Ensemble(models[:2], toks[:2])
    plain.generate(PROMPTS[:2], max_new_tokens=1, on_step=recorder, progress=False)
    first = recorder.traces[0]
    for i, tokenizer in enumerate(toks[:2]):
        for b, row in enumerate(first.rows):
            assert first.tokens[i][b] == tokenizer(PROMPTS[row])["input_ids"]  # Llama-2 adds <s>
    conversations = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Hi"}]]
    chat = Ensemble([models[0], models[2]], [toks[0], toy])
    recorder = Recorder(keep_logits=True)
    chat.generate(messages=conversations, max_new_tokens=1, on_step=recorder, progress=False)
    first = recorder.traces[0]
    for i, tokenizer in enumerate([toks[0], toy]):
        for b, row in enumerate(first.rows):
            expected = tokenizer.apply_chat_template(
                conversations[row], add_generation_prompt=True, tokenize=True
            )
            expected = (
                expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
            )
            assert first.tokens[i][b] == expected
    with pytest.raises(ValueError, match=r"tokenizers\[1\] has no chat template"):
        plain.generate(messages=conversations, max_new_tokens=1, progress=False)


def test_a_conversation_ending_with_an_assistant_message_is_continued(toy_tokenizers) -> None:
    toks = [copy.deepcopy(toy_tokenizers[name]) for name in ("toy_byte", "toy_sp")]
    for tokenizer in toks:
        tokenizer.chat_template = CHAT_TEMPLATE
    models = [tiny_model_for_tokenizer("llama", tokenizer, seed=60 + i) for i, tokenizer in enumerate(toks)]
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is"}],
        [{"role": "user", "content": "What is 2+2?"}],
    ]
    recorder = Recorder(keep_logits=True)
    Ensemble(models, toks).generate(
        messages=conversations, max_new_tokens=1, on_step=recorder, progress=False
    )
    # By hand from CHAT_TEMPLATE: the assistant's message is left open, the other gets the generation prompt.
    texts = ["<|user|>What is 2+2?\n<|assistant|>It is", "<|user|>What is 2+2?\n<|assistant|>"]
    first = recorder.traces[0]
    for i, tokenizer in enumerate(toks):
        for b, row in enumerate(first.rows):
            assert first.tokens[i][b] == tokenizer(texts[row], add_special_tokens=False)["input_ids"]


def test_chat_template_kwargs_reach_each_template(toy_tokenizers) -> None:
    """Variables for the chat templates (Qwen3's enable_thinking, say): one dict for every model, or one
    per model; each model's prompt is its own tokenizer's rendering with them."""
    toks = [copy.deepcopy(toy_tokenizers[name]) for name in ("toy_byte", "toy_sp")]
    for tokenizer in toks:
        tokenizer.chat_template = (
            CHAT_TEMPLATE + "{% if not (enable_thinking | default(true)) %} quiet{% endif %}"
        )
    models = [tiny_model_for_tokenizer("llama", tokenizer, seed=70 + i) for i, tokenizer in enumerate(toks)]
    ensemble = Ensemble(models, toks)
    conversations = [[{"role": "user", "content": "What is 2+2?"}]]

    def prompt_tokens(**kwargs) -> list[list[int]]:
        recorder = Recorder(keep_logits=True)
        ensemble.generate(
            messages=conversations, max_new_tokens=1, on_step=recorder, progress=False, **kwargs
        )
        return [tokens[0] for tokens in recorder.traces[0].tokens]

    def rendered(tokenizer, **variables) -> list[int]:
        text = tokenizer.apply_chat_template(
            conversations[0], add_generation_prompt=True, tokenize=False, **variables
        )
        assert text.endswith(" quiet") == (variables == {"enable_thinking": False})
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    quiet = {"enable_thinking": False}
    assert prompt_tokens() == [rendered(t) for t in toks]
    assert prompt_tokens(chat_template_kwargs=quiet) == [rendered(t, **quiet) for t in toks]
    assert prompt_tokens(chat_template_kwargs=[{}, quiet]) == [rendered(toks[0]), rendered(toks[1], **quiet)]
    with pytest.raises(ValueError, match="chat_template_kwargs apply to chat templates: pass messages"):
        ensemble.generate(["Hi"], chat_template_kwargs=quiet, progress=False)
    with pytest.raises(ValueError, match="chat_template_kwargs has 1 entries but there are 2 models"):
        ensemble.generate(messages=conversations, chat_template_kwargs=[quiet], progress=False)
    with pytest.raises(TypeError, match="chat_template_kwargs must be a dict"):
        ensemble.generate(messages=conversations, chat_template_kwargs=[quiet, "x"], progress=False)


def test_from_pretrained_loads_local_folders(tokenizers, tmp_path: Path) -> None:
    toks = [tokenizers["toy_byte"], tokenizers["toy_sp"]]
    models = [
        tiny_model_for_tokenizer("gpt2", toks[0], seed=12),
        tiny_model_for_tokenizer("llama", toks[1], seed=13),
    ]
    folders = []
    for n, (model, tokenizer) in enumerate(zip(models, toks, strict=True)):
        folders.append(tmp_path / f"model{n}")
        model.save_pretrained(folders[-1])
        tokenizer.save_pretrained(folders[-1])
    loaded = Ensemble.from_pretrained(folders, dtype=[torch.float32, torch.float32], k=3)
    expected = Ensemble(models, toks, k=3).generate(PROMPTS, max_new_tokens=8, progress=False)
    assert loaded.generate(PROMPTS, max_new_tokens=8, progress=False) == expected
    with pytest.raises(ValueError, match="dtype has 1 entries but there are 2 models"):
        Ensemble.from_pretrained(folders, dtype=[torch.float32])


def test_nan_logits_name_the_model(tokenizers) -> None:
    toks = [tokenizers["gpt2"], tokenizers["llama2"]]
    models = [real_vocab_model("gpt2", toks[0]), real_vocab_model("llama2", toks[1])]
    with torch.no_grad():
        models[1].lm_head.weight.fill_(float("nan"))
    ensemble = Ensemble(models, toks)
    # The other model still votes, so the text goes on ...
    assert ensemble.generate(PROMPTS[:1], max_new_tokens=2, progress=False)[0].num_steps == 2
    with torch.no_grad():
        models[0].lm_head.weight.fill_(float("nan"))
    # ... until no model is usable.
    with pytest.raises(RuntimeError, match=r"models\[0\].*models\[1\]"):
        ensemble.generate(PROMPTS[:1], max_new_tokens=2, progress=False)


def test_clear_errors(tokenizers) -> None:
    tokenizer = tokenizers["gpt2"]
    model = real_vocab_model("gpt2", tokenizer)
    ensemble = Ensemble([model], [tokenizer])
    with pytest.raises(ValueError, match="no prompts"):
        ensemble.generate()
    with pytest.raises(ValueError, match="prompts is empty"):
        ensemble.generate([])
    with pytest.raises(ValueError, match="either prompts or messages"):
        ensemble.generate(["a"], messages=[[{"role": "user", "content": "a"}]])
    with pytest.raises(ValueError, match="models is empty"):
        Ensemble([], [])
    with pytest.raises(ValueError, match="2 models but 1 tokenizers"):
        Ensemble([model, model], [tokenizer])
    with pytest.raises(ValueError, match="weights has 1 entries but there are 2 models"):
        Ensemble([model, model], [tokenizer, tokenizer], weights=[1.0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        ensemble.generate(["a"], max_new_tokens=0)
    with pytest.raises(ValueError, match="stop"):
        ensemble.generate(["a"], stop=[""])
    with pytest.raises(TypeError, match="stop_when must be a function"):
        ensemble.generate(["a"], stop_when="\n")
    with torch.device("meta"):
        meta_model = tiny_causal_lm("gpt2", len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    with pytest.raises(ValueError, match=r"models\[1\].*meta device"):
        Ensemble([model, meta_model], [tokenizer, tokenizer])
    no_end = train_byte_level_bpe(CORPUS, vocab_size=300)
    no_end.eos_token = None
    assert no_end.eos_token_id is None
    with pytest.raises(ValueError, match=r"tokenizers\[1\] has no eos_token"):
        Ensemble([model, tiny_causal_lm("llama", len(no_end))], [tokenizer, no_end])
    with pytest.raises(ValueError, match="sync"):
        Ensemble([model], [tokenizer], sync="slow")
    with pytest.raises(ValueError, match="max_pass_tokens must be an integer >= 1, got 0"):
        Ensemble([model], [tokenizer], max_pass_tokens=0)


def test_a_tokenizer_that_is_not_the_models_is_refused(tokenizers) -> None:
    """The model's own end tokens (its generation config's) must be special tokens of its tokenizer."""
    qwen = real_vocab_model("qwen2", tokenizers["qwen2"])
    qwen.generation_config.eos_token_id = [151645, 151643]  # Qwen2-Instruct's <|im_end|>, <|endoftext|>
    Ensemble([qwen], [tokenizers["qwen2"]])
    with pytest.raises(ValueError, match=r"models\[0\].*token 151645.*has 50257 tokens: is that this model"):
        Ensemble([qwen], [tokenizers["gpt2"]])
    llama = real_vocab_model("llama2", tokenizers["llama2"])
    llama.generation_config.eos_token_id = 2  # </s>
    Ensemble([llama], [tokenizers["llama2"]])
    ordinary = tokenizers["gpt2"].convert_ids_to_tokens(2)
    with pytest.raises(ValueError, match=rf"models\[1\].*token 2 .*ordinary token '{ordinary}'"):
        Ensemble([real_vocab_model("gpt2", tokenizers["gpt2"]), llama], [tokenizers["gpt2"]] * 2)


def test_the_other_device_step_in_the_loop(mixed_ensemble_parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's step for models on several devices, forced on one CPU (every model's logits go through
    a stand-in): the same texts as the fused step, greedy and sampled with a seed."""
    models, toks = mixed_ensemble_parts
    ensemble = Ensemble(models, toks, k=4)

    def texts() -> list[list[Generation]]:
        options = dict(max_new_tokens=12, batch_size=2, progress=False)
        return [
            ensemble.generate(PROMPTS, **options),
            ensemble.generate(PROMPTS, do_sample=True, temperature=1.5, seed=3, **options),
        ]

    want = texts()
    calls = []

    def across_devices(logits, tables, **options):
        calls.append(len(logits))
        return unite_ext.step.ensemble_step_across_devices(logits, [tables] * len(logits), **options)

    monkeypatch.setattr(unite_ext.step, "_enters_whole", lambda x, device: False)
    monkeypatch.setattr(unite_ext.decode, "ensemble_step", across_devices)
    assert texts() == want
    assert len(calls) >= 24 and set(calls) == {len(models)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_on_different_devices(mixed_ensemble_parts) -> None:
    models, toks = mixed_ensemble_parts
    on_cpu = Ensemble(models[:2], toks[:2]).generate(PROMPTS, max_new_tokens=10, progress=False)
    split = Ensemble([copy.deepcopy(models[0]).to("cuda"), models[1]], toks[:2])
    assert split.generate(PROMPTS, max_new_tokens=10, progress=False) == on_cpu
    # The step runs where the first model's logits are: here on the CPU.
    split = Ensemble([models[1], copy.deepcopy(models[0]).to("cuda")], [toks[1], toks[0]])
    on_cpu = Ensemble([models[1], models[0]], [toks[1], toks[0]]).generate(
        PROMPTS, max_new_tokens=10, progress=False
    )
    assert split.generate(PROMPTS, max_new_tokens=10, progress=False) == on_cpu
