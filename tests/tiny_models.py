"""Tiny causal LMs with random weights, built from configs of real architectures (no downloads).

They are small enough for CPU tests (hidden size 32 to 64, 2 layers) and keep the real vocabulary size
of whichever tokenizer they are paired with, so that tokenization-dependent code paths are exercised.
Weights use a larger initialisation scale than the architectures' defaults so that the next-token
distributions are peaked and greedy generations do not collapse into one repeated token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from unite_ext.toy_tokenizers import (
    SAMPLE_TEXTS,
    SIMPLE_CHAT_TEMPLATE,
    train_byte_level_bpe,
    train_sentencepiece_bpe,
)

# gemma2 alternates sliding-window and full-attention layers; llama4 (mixture of experts) has chunked ones.
ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "gemma2", "llama4")

# Scale of the normal initialisation of all weights (HF default is 0.02, which gives near-uniform logits).
INITIALIZER_RANGE = 0.2


def tiny_config(
    architecture: str,
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    eos_token_id: int | list[int] | None = None,
    bos_token_id: int | None = None,
    **overrides: Any,
) -> PretrainedConfig:
    """Config of a tiny model of `architecture` (one of `ARCHITECTURES`) with `vocab_size` logits.

    `overrides` are further config arguments (e.g. `sliding_window`, `attn_implementation`).
    """
    common = {
        "vocab_size": vocab_size,
        "initializer_range": INITIALIZER_RANGE,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        **overrides,
    }
    if architecture == "gpt2":
        return GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    decoder = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads // 2,  # grouped-query attention, as in the real models
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": 1024,
        **common,
    }
    if architecture == "llama":
        return LlamaConfig(**decoder)
    if architecture == "qwen2":
        return Qwen2Config(**decoder)
    if architecture == "mistral":
        return MistralConfig(**decoder)
    if architecture == "gemma2":
        return Gemma2Config(**decoder)
    if architecture == "llama4":
        return Llama4TextConfig(intermediate_size_mlp=2 * hidden_size, num_local_experts=2, **decoder)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gemma2": Gemma2ForCausalLM,
    "llama4": Llama4ForCausalLM,
}


def tiny_causal_lm(
    architecture: str,
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    eos_token_id: int | list[int] | None = None,
    bos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> PreTrainedModel:
    """A tiny causal LM with random weights drawn with `seed`, in eval mode.

    `eos_token_id` goes into both the config and the generation config (as Hugging Face checkpoints do);
    `overrides` go to `tiny_config`.
    """
    config = tiny_config(
        architecture,
        vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[architecture](config)
    model.generation_config = GenerationConfig(eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    return model.to(dtype).eval()


# Pieces of the recurrent configs below: a gated-delta-net layer next to a full-attention one (Qwen3-Next,
# Qwen3.5), a mixture of two experts that every token uses (no routing choice for rounding to flip), and
# Mamba-2 layers in the names the Granite/Bamba/Falcon-H1 configs give them.
_LINEAR_ATTENTION = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_num_value_heads": 2,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "head_dim": 8,
}
_TWO_EXPERTS = {"num_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
_MAMBA = {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_expand": 2}

# `tiny_auto_model` overrides for the recurrent (hybrid) models the ensemble decodes: linear attention,
# convolutions, Mamba-2 layers, next to full attention.
RECURRENT_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen3_next": {**_LINEAR_ATTENTION, **_TWO_EXPERTS, "shared_expert_intermediate_size": 16},
    "qwen3_5_text": _LINEAR_ATTENTION,
    "qwen3_5_moe_text": {**_LINEAR_ATTENTION, **_TWO_EXPERTS, "shared_expert_intermediate_size": 16},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], **_TWO_EXPERTS, "num_dense_layers": 1},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], **_MAMBA},
    "falcon_h1": {**_MAMBA, "mamba_d_ssm": 64, "head_dim": 8},
    "bamba": {"attn_layer_indices": [1], **_MAMBA},
    "nemotron_h": {
        "hybrid_override_pattern": "M*",
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "n_groups": 1,
        "ssm_state_size": 8,
        "expand": 2,
        "head_dim": 8,
    },
    "mamba2": {"num_heads": 4, "head_dim": 16, "n_groups": 1, "state_size": 8, "expand": 2},
}


def tiny_auto_model(model_type: str, tokenizer, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random model of any Hugging Face `model_type` (through `AutoConfig`, whose common argument
    names every config maps), sized for `tokenizer`; `overrides` are further config arguments."""
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "initializer_range": INITIALIZER_RANGE,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": None,  # some configs' default is beyond a tiny vocabulary
    }
    config = AutoConfig.for_model(model_type, **{**sizes, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    return model.eval()


def tiny_model_for_tokenizer(architecture: str, tokenizer, *, seed: int = 0, **kwargs) -> PreTrainedModel:
    """A tiny model whose vocabulary size and end token are those of `tokenizer`."""
    return tiny_causal_lm(
        architecture,
        len(tokenizer),
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **kwargs,
    )


def save_tiny_checkpoint(folder: Path, tokenizer_kind: str, seed: int) -> Path:
    """A tiny random Llama-style model and a tokenizer trained here ("byte" or "sentencepiece"), saved as a
    Hugging Face folder."""
    trainers = {"byte": train_byte_level_bpe, "sentencepiece": train_sentencepiece_bpe}
    tokenizer = trainers[tokenizer_kind](list(SAMPLE_TEXTS), 400, chat_template=SIMPLE_CHAT_TEMPLATE)
    tiny_model_for_tokenizer("llama", tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
