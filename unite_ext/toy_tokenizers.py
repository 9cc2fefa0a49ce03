"""Small tokenizers trained in milliseconds with the `tokenizers` library, for tests and demos.

Both trainers are deterministic (same texts and sizes, same tokenizer) and cover the two supported kinds:

- ``train_byte_level_bpe``: GPT-2 style byte-level BPE (``ByteLevel`` pre-tokenizer and decoder, all 256
  byte tokens);
- ``train_sentencepiece_bpe``: Llama-2 style SentencePiece BPE (``Metaspace`` pre-tokenizer, ``▁`` for a
  space, ``<unk>``/``<s>``/``</s>`` at ids 0-2, byte fallback pieces ``<0x00>``..``<0xFF>`` at ids 3-258,
  BOS added by the post-processor).
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# A role-tagged chat format for toy chat models: "<|user|>\nHi</s>\n<|assistant|>\n".
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SAMPLE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. James visited the museum in 1990, and again in 2024.\n"
    'He wrote: "Tokenizers split text into pieces; language models read those pieces one at a time."',
    "Numbers such as 3.14159, 42 and 1,000,000 appear in tables.\n\nLists:\n- first item\n- second item\n"
    "    indented line with four spaces\n\ttabbed line",
    "def add(a, b):\n    return a + b  # a short piece of code\n\nprint(add(2, 3))",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 你好，世界！ and an em dash — here.\n"
    "Emoji: 🙂 👍🏽 🇫🇷 and a zero-width joiner family 👨‍👩‍👧.",
    "Ensembles of language models average their predictions; the union of the top-k candidates of every "
    "model is scored by every model, and the best candidate is chosen.",
)


def _check_texts(texts: list[str]) -> None:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")


def train_byte_level_bpe(
    texts: list[str],
    vocab_size: int,
    eos_token: str = "<|endoftext|>",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer on ``texts``.

    Args:
        texts: training texts (a few paragraphs are enough; ``SAMPLE_TEXTS`` is one choice).
        vocab_size: the largest vocabulary size, at least 257 (256 byte tokens and the EOS token); a small
            corpus can give fewer tokens.
        eos_token: the end-of-sequence token, id 0, also used as BOS (as in GPT-2); no PAD token.
        chat_template: Jinja chat template; default none (``SIMPLE_CHAT_TEMPLATE`` is one choice).
    """
    _check_texts(texts)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos_token], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eos_token, eos_token=eos_token, chat_template=chat_template
    )


def train_sentencepiece_bpe(
    texts: list[str],
    vocab_size: int,
    byte_fallback: bool = True,
    unk_token: str = "<unk>",
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a Llama-2 style SentencePiece BPE tokenizer on ``texts``.

    The layout is that of the Llama-2 / Mistral tokenizer files: unknown, BOS and EOS tokens at ids 0-2,
    with ``byte_fallback`` the 256 pieces ``<0x00>``..``<0xFF>`` at ids 3-258, then the learned pieces;
    ``Metaspace`` pre-tokenizer (``▁`` for a space, one prepended at the start of a text); the
    post-processor adds BOS.

    Args:
        texts: training texts (``SAMPLE_TEXTS`` is one choice).
        vocab_size: the largest vocabulary size, at least 3 (+256 with byte fallback) plus the number of
            distinct characters of ``texts``; a small corpus can give fewer tokens.
        byte_fallback: encode characters outside the vocabulary as byte pieces (default); without it they
            become ``unk_token``.
        unk_token, bos_token, eos_token: the special tokens (defaults ``<unk>``, ``<s>``, ``</s>``).
        chat_template: Jinja chat template; default none (``SIMPLE_CHAT_TEMPLATE`` is one choice).
    """
    _check_texts(texts)
    specials = [unk_token, bos_token, eos_token]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []
    reserved = len(specials) + len(byte_pieces)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed {reserved}, got {vocab_size}")
    # Train on words ("▁" starts each), with the reserved pieces first, so that no piece spans a space.
    training = Tokenizer(models.BPE(unk_token=unk_token))
    training.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + byte_pieces, show_progress=False
    )
    training.train_from_iterator(texts, trainer)
    learned = json.loads(training.model.__getstate__())

    tokenizer = Tokenizer(
        models.BPE(
            vocab=learned["vocab"],
            merges=[tuple(merge) for merge in learned["merges"]],
            unk_token=unk_token,
            byte_fallback=byte_fallback,
            fuse_unk=True,
        )
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A",
        pair=f"{bos_token} $A {bos_token} $B",
        special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=unk_token,
        bos_token=bos_token,
        eos_token=eos_token,
        chat_template=chat_template,
    )
