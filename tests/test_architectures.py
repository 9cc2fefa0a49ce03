"""The decoding loop on many Hugging Face architectures: batched, exact sync, against fresh forward passes.

Each case builds two tiny random models of one architecture from its config (one per trained tokenizer),
decodes four prompts of different lengths in batches of two, the rows ending at different steps so that
waiting rows join a batch whose other row is decoding, and checks every row's logits at every step against
a fresh pass over the row's tokens. Local-attention models get windows (or chunks) of 6 tokens, so
that masked cache slots fall inside them, and their layers drop every key out of reach as soon as they can
(no rollback margin). The prompts are read three positions at a time (passes of 6 tokens), so the shorter
rows feed nothing in the first passes. Architectures that the installed transformers lacks are skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from decode_checks import PROMPTS, Recorder, reference_value, steps_with_slots_between_tokens
from tiny_models import tiny_auto_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import unite_ext.decode
from unite_ext.decode import Ensemble

WINDOW = {"sliding_window": 6}
# model type -> config arguments beyond the tiny sizes (windows, and sizes the defaults get wrong when small)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "mistral": WINDOW,
    "mixtral": {**WINDOW, "num_local_experts": 4},
    "gemma": {"head_dim": 8},
    "gemma2": {**WINDOW, "head_dim": 8},
    "gemma3_text": {**WINDOW, "head_dim": 8},
    "phi3": WINDOW,
    "olmo2": {},
    "granite": {},
    "cohere2": WINDOW,
    "starcoder2": WINDOW,
    "gpt_neox": {},
    "falcon": {},
    "bloom": {},
    "opt": {},
    "gpt_oss": {**WINDOW, "num_local_experts": 4},
    "smollm3": {},
    "glm4": {},
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "moe_intermediate_size": 16,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
    },
}


def tiny_pair(
    toy_tokenizers: dict, monkeypatch: pytest.MonkeyPatch, model_type: str, seed: int
) -> tuple[list[PreTrainedTokenizerBase], list[PreTrainedModel]]:
    """The two toy tokenizers and a tiny `model_type` model for each (skips when transformers lacks it);
    local-attention layers drop every key out of reach as soon as they can."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type} models")
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_ROLLBACK_MARGIN", 0)
    monkeypatch.setattr(unite_ext.decode, "_LOCAL_TRIM_SLOTS", 1)
    toks = [toy_tokenizers["toy_byte"], toy_tokenizers["toy_sp"]]
    models = [
        tiny_auto_model(model_type, t, seed=seed + n, **ARCHITECTURES[model_type]) for n, t in enumerate(toks)
    ]
    return toks, models


def stagger_row_ends(monkeypatch: pytest.MonkeyPatch, gap: int) -> None:
    """Row `r` ends at step 8 + gap * r (at most max_new_tokens), so that rows leave and join batches."""
    advance = unite_ext.decode._Row.advance

    def staggered(
        row: unite_ext.decode._Row, token: bytes | None, settings: unite_ext.decode._Settings
    ) -> None:
        most = min(settings.max_new_tokens, 8 + gap * row.index)
        advance(row, token, dataclasses.replace(settings, max_new_tokens=most))

    monkeypatch.setattr(unite_ext.decode._Row, "advance", staggered)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_batched_decoding_gives_fresh_pass_logits(toy_tokenizers, monkeypatch, model_type: str) -> None:
    toks, models = tiny_pair(toy_tokenizers, monkeypatch, model_type, seed=50)
    stagger_row_ends(monkeypatch, 5)  # rows end at steps 8, 13, 18 and 23
    ensemble = Ensemble(models, toks, k=4, sync="exact", max_pass_tokens=6)
    recorder = Recorder(keep_logits=True)
    # Sampled, so that rows pick different tokens even where tiny random models would repeat one.
    ensemble.generate(
        PROMPTS, max_new_tokens=24, do_sample=True, seed=0, batch_size=2, on_step=recorder, progress=False
    )
    assert steps_with_slots_between_tokens(recorder, models, "cpu") > 0
    assert any(min(trace.steps) == 0 < max(trace.steps) for trace in recorder.traces)  # rows joined


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_prompts_read_their_common_prefix_once(toy_tokenizers, monkeypatch, model_type: str) -> None:
    """Prompts with a common prefix (a few-shot prompt) read it once, in a row of its own whose cache every
    row then copies, in a new batch and in the rows that join it; every row's logits at every step equal
    a fresh pass over its tokens."""
    toks, models = tiny_pair(toy_tokenizers, monkeypatch, model_type, seed=70)
    monkeypatch.setattr(unite_ext.decode, "SHARED_PREFIX_MIN_SAVING", 1)
    shared: list[bool] = []  # per new batch of every model: whether its rows read a common prefix once
    new_batch = unite_ext.decode._new_batch

    def spy_new_batch(member, prompts: list[list[int]], *args):
        run, feeds = new_batch(member, prompts, *args)
        shared.append(feeds != prompts)
        return run, feeds

    monkeypatch.setattr(unite_ext.decode, "_new_batch", spy_new_batch)
    stagger_row_ends(monkeypatch, 3)  # rows end at steps 8, 11, ..., 23
    ensemble = Ensemble(models, toks, k=4, sync="exact", max_pass_tokens=6)
    recorder = Recorder(keep_logits=True)
    prompts = [f"{PROMPTS[3]} {end}" for end in [*PROMPTS, "Yes", "No, twice"]]
    ensemble.generate(
        prompts, max_new_tokens=24, do_sample=True, seed=0, batch_size=4, on_step=recorder, progress=False
    )
    assert shared.count(True) == 2 * len(models)  # the first 4 rows, then 2 that join them
    steps_with_slots_between_tokens(recorder, models, "cpu")
    assert any(min(trace.steps) == 0 < max(trace.steps) for trace in recorder.traces)  # rows joined


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_scoring_gives_unpadded_log_likelihoods(toy_tokenizers, monkeypatch, model_type: str) -> None:
    """The lm-eval backend's scoring: each context is read once, in passes of 6 tokens, and the choices of
    several tokens read their rest in rows of their own from copies of its cache (masked slots between a
    row's tokens); contexts with a common prefix, in one batch, read it once and their rests from copies
    of its cache. Every score equals a float64 pass over the request's own tokens."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from unite_ext.lm_eval import UniteLM

    toks, models = tiny_pair(toy_tokenizers, monkeypatch, model_type, seed=60)
    monkeypatch.setattr(unite_ext.decode, "SHARED_PREFIX_MIN_SAVING", 1)
    ensemble = Ensemble(models, toks, max_pass_tokens=6)
    lm = UniteLM(ensemble=ensemble, batch_size=4, greedy_check=False)
    prefixed = UniteLM(ensemble=Ensemble(models, toks), batch_size=6, greedy_check=False)
    contexts = [PROMPTS[0], PROMPTS[3]]
    contexts += [f"{PROMPTS[3]} {PROMPTS[0]}{end}" for end in (" Paris", " not Lyon, 42")]  # a common prefix
    pairs = [(c, choice) for c in contexts for choice in (" a", " Paris, and then Lyon", " 42 more lines")]
    values = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in pairs[:6]])
    values += prefixed.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in pairs[6:]])
    for (context, choice), (value, _) in zip(pairs, values, strict=True):
        assert value == pytest.approx(reference_value(ensemble, context, choice), abs=1e-4)
