"""Tests of the cross-tokenizer tables (SPEC section 1), checked against the tokenizers' own behaviour.

References are derived here, independently of unite_ext: a token's bytes come from the tokenizer's own
decoder (decoding [anchor, token] and removing the anchor's text) and, where that decoding is lossy
(half a UTF-8 character), from a byte mapping built here from the `tokenizers` ByteLevel pre-tokenizer or
from the ``<0xNN>`` piece names; mid-text encodings come from the transformers tokenizer's ``encode``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import subprocess
import sys
import time
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import unite_ext.vocab as vocab_module
from unite_ext.toy_tokenizers import (
    SAMPLE_TEXTS,
    SIMPLE_CHAT_TEMPLATE,
    train_byte_level_bpe,
    train_sentencepiece_bpe,
)
from unite_ext.vocab import VocabTables

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
SENTENCEPIECE_BYTE_FALLBACK = "sentencepiece_byte_fallback"

# What the tests know about the real tokenizer files (the code under test must detect it).
REAL_KINDS = {
    "qwen2": BYTE_LEVEL,
    "llama3": BYTE_LEVEL,
    "gpt2": BYTE_LEVEL,
    "gpt_neox": BYTE_LEVEL,
    "llama2": SENTENCEPIECE_BYTE_FALLBACK,
    "mistral": SENTENCEPIECE_BYTE_FALLBACK,
    "mistral_v03": SENTENCEPIECE_BYTE_FALLBACK,
}
LOGITS = {  # config.vocab_size of the models these tokenizers belong to
    "qwen2": 151936,
    "llama3": 128256,
    "gpt2": 50257,
    "gpt_neox": 50432,
    "llama2": 32000,
    "mistral": 32000,
    "mistral_v03": 32768,
}
CHAT_EOS = {"qwen2": [151643], "llama3": [128009]}  # end tokens from the generation configs
REAL_SETS = [
    ("qwen2", "llama3"),
    ("qwen2", "mistral"),
    ("llama3", "mistral"),
    ("qwen2", "llama3", "mistral"),
    ("gpt2", "llama2"),
    ("gpt_neox", "mistral_v03"),
]
SAMPLE_SIZE = 2000
EDGE_TEXTS = [
    b" James",
    b"   three leading spaces",
    b"\n\nnewlines\n",
    b"\r\nwindows line\r\n",
    b"multiple    spaces and\ttabs\t\t",
    b" ",
    b"\n",
    "日本語のテキスト，你好".encode(),
    "🙂👍🏽 🇫🇷 👨‍👩‍👧".encode(),
    "caf\u00e9 and cafe\u0301 \u2014 em dash".encode(),  # the second e-acute is not NFC
    "x \u2014".encode()[:-1],  # ends inside an em dash
    b"\xe2\x80",  # half an em dash
    b"\x80abc\xff",  # stray continuation byte and 0xFF
    b"<|endoftext|> <s> </s> <unk>",  # special-token strings are text here
    b"",
]


# ---------------------------------------------------------------------- independent references


def byte_level_alphabet_from_library() -> dict[str, int]:
    """Byte-level character -> byte, read from the `tokenizers` ByteLevel pre-tokenizer: it maps every
    byte of a text to one character. Text covers every byte that occurs in UTF-8; the 13 others (0xC0,
    0xC1, 0xF5-0xFF) take the remaining alphabet characters in order (GPT-2 numbers them in byte order)."""
    chars = [chr(c) for c in range(0x100)]
    chars += [chr(c) for c in range(0x100, 0x800, 0x40)]  # lead bytes 0xC4-0xDF
    chars += [chr(c << 12 | 0x800) for c in range(16) if c != 0xD]  # lead bytes 0xE0-0xEF (no surrogates)
    chars += ["\ud7ff", *(chr(c) for c in (0x10000, 0x40000, 0x80000, 0xC0000, 0x100000))]  # 0xED, 0xF0-0xF4
    text = "".join(chars)
    mapped = "".join(
        piece
        for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(
            text
        )
    )
    data = text.encode("utf-8")
    assert len(mapped) == len(data)
    table = dict(zip(mapped, data, strict=True))
    assert len(set(table.values())) == len(table) == 256 - 13
    rest_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - set(table))
    rest_bytes = sorted(set(range(256)) - set(table.values()))
    table.update(zip(rest_chars, rest_bytes, strict=True))
    return table


BYTE_LEVEL_TABLE = byte_level_alphabet_from_library()


def mapped_token_bytes(token: str, kind: str) -> bytes:
    """Bytes of a token string by the documented rules of its kind (used where decoding is lossy)."""
    if kind == BYTE_LEVEL:
        return bytes(BYTE_LEVEL_TABLE[c] for c in token)
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass
class ModelReference:
    """What a tokenizer itself says about its tokens."""

    tokenizer: PreTrainedTokenizerFast
    kind: str
    token_bytes: list[bytes | None]  # per id below len(tokenizer); None for special tokens
    special_ids: set[int]
    anchor: int  # the id of "a", put before a token to decode it in mid-text position
    normalizes_to_nfc: bool
    sentencepiece_anchor: str  # a character outside the vocabulary (see mid_text_encoding)

    @classmethod
    def create(cls, tokenizer: PreTrainedTokenizerFast, kind: str) -> ModelReference:
        backend = tokenizer.backend_tokenizer
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        anchor = backend.token_to_id("a")
        anchor_text = backend.decode([anchor])
        assert anchor_text == "a"
        ids = list(range(len(tokenizer)))
        decoded = backend.decode_batch([[anchor, i] for i in ids], skip_special_tokens=False)
        tokens = tokenizer.convert_ids_to_tokens(ids)
        table: list[bytes | None] = []
        for i, text, token in zip(ids, decoded, tokens, strict=True):
            assert text.startswith(anchor_text)
            text = text[len(anchor_text) :]
            if i in special:
                table.append(None)
            elif "\ufffd" in text:  # lossy: half a character; take the bytes from the token string
                exact = mapped_token_bytes(token, kind)
                assert exact.decode("utf-8", "replace") == text, (i, token)
                table.append(exact)
            else:
                table.append(text.encode("utf-8"))
        normalizer = json.loads(backend.to_str())["normalizer"]
        outside = next(ch for ch in ("\n", "\x00", "\x01") if backend.token_to_id(ch) is None)
        return cls(tokenizer, kind, table, special, anchor, "NFC" in json.dumps(normalizer), outside)

    def bytes_of(self, ids: list[int]) -> bytes | None:
        """The bytes these ids decode to; None if one is special or missing (-1)."""
        pieces = [self.token_bytes[i] if i >= 0 else None for i in ids]
        return None if None in pieces else b"".join(pieces)  # type: ignore[arg-type]

    def mid_text_encoding(self, data: bytes) -> list[int] | None:
        """The tokenizer's encoding of ``data`` in mid-text position; None where the transformers
        tokenizer changes the text (NFC normalisation)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # SPEC: valid runs are encoded as text, the bytes that are not valid UTF-8 as byte tokens.
            ids: list[int] = []
            for piece in _utf8_runs(data):
                if isinstance(piece, int):
                    ids.append(self.byte_token(piece))
                elif (run := self.mid_text_encoding(piece)) is None:
                    return None
                else:
                    ids.extend(run)
            return ids
        if self.normalizes_to_nfc and unicodedata.normalize("NFC", text) != text:
            return None
        if self.kind == BYTE_LEVEL:
            return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        # SentencePiece: after a character outside the vocabulary (a byte-fallback or unknown piece, which
        # no merge involves) a text is in mid-text position, without the dummy-prefix space.
        anchor = self.sentencepiece_anchor
        prefix = self.tokenizer.encode(anchor, add_special_tokens=False, split_special_tokens=True)
        ids = self.tokenizer.encode(anchor + text, add_special_tokens=False, split_special_tokens=True)
        assert ids[: len(prefix)] == prefix, (text, ids, prefix)
        return ids[len(prefix) :]

    def byte_token(self, byte: int) -> int:
        """The id of the token for this single byte; -1 if the vocabulary lacks it."""
        if self.kind == BYTE_LEVEL:
            token = next(c for c, b in BYTE_LEVEL_TABLE.items() if b == byte)
        else:
            token = f"<0x{byte:02X}>"
        token_id = self.tokenizer.backend_tokenizer.token_to_id(token)
        return -1 if token_id is None else token_id


def _utf8_runs(data: bytes) -> list[bytes | int]:
    """Split into maximal valid UTF-8 runs (bytes) and the single bytes between them (int)."""
    pieces: list[bytes | int] = []
    start = position = 0
    while position < len(data):
        for width in (1, 2, 3, 4):
            try:
                data[position : position + width].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            if start < position:
                pieces.append(data[start:position])
            pieces.append(data[position])
            position += 1
            start = position
            continue
        position += width
    if start < position:
        pieces.append(data[start:position])
    return pieces


def canonical_id(tables: VocabTables, data: bytes) -> int:
    """Binary search of the canonical byte strings (which must be sorted)."""
    index = bisect.bisect_left(range(1, tables.num_canonical), data, key=tables.canonical_bytes) + 1
    assert index < tables.num_canonical and tables.canonical_bytes(index) == data, data
    return index


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def table_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vocab_tables")


@pytest.fixture(scope="session")
def real(tokenizer_dir: Path) -> Callable[[str], ModelReference]:
    """name -> ModelReference of the real tokenizer (loaded once)."""
    loaded: dict[str, ModelReference] = {}

    def get(name: str) -> ModelReference:
        if name not in loaded:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir / name)
            loaded[name] = ModelReference.create(tokenizer, REAL_KINDS[name])
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def real_tables(real: Callable[[str], ModelReference], table_cache: Path) -> Callable[..., VocabTables]:
    built: dict[tuple[str, ...], VocabTables] = {}

    def get(names: tuple[str, ...]) -> VocabTables:
        if names not in built:
            built[names] = VocabTables.from_tokenizers(
                [real(n).tokenizer for n in names],
                vocab_sizes=[LOGITS[n] for n in names],
                eos_token_ids=[CHAT_EOS.get(n) for n in names],
                cache_dir=table_cache,
            )
        return built[names]

    return get


@pytest.fixture(scope="session")
def toy() -> dict[str, ModelReference]:
    texts = list(SAMPLE_TEXTS)
    return {
        "byte_level": ModelReference.create(train_byte_level_bpe(texts, 420), BYTE_LEVEL),
        "sentencepiece": ModelReference.create(
            train_sentencepiece_bpe(texts, 560), SENTENCEPIECE_BYTE_FALLBACK
        ),
        "sentencepiece_no_fallback": ModelReference.create(
            train_sentencepiece_bpe(texts, 300, byte_fallback=False), SENTENCEPIECE
        ),
    }


@pytest.fixture(scope="session")
def toy_tables(toy: dict[str, ModelReference], table_cache: Path) -> VocabTables:
    return VocabTables.from_tokenizers(
        [toy[name].tokenizer for name in ("byte_level", "sentencepiece", "sentencepiece_no_fallback")],
        vocab_sizes=[440, 560, 320],  # rows beyond the tokenizers, as in real models
        cache_dir=table_cache,
    )


# ---------------------------------------------------------------------- shared checks


def check_token_bytes(tables: VocabTables, i: int, ref: ModelReference, eos_ids: set[int]) -> None:
    """Every regular token maps to the canonical id of exactly the bytes the tokenizer decodes for it;
    EOS ids to 0; other special tokens and padding rows to -1."""
    to_canon = tables.to_canon[i].numpy()
    assert tables.vocab_sizes[i] == len(to_canon) >= len(ref.token_bytes)
    assert (to_canon[len(ref.token_bytes) :] == -1).all(), "padding rows"
    for t, expected in enumerate(ref.token_bytes):
        if t in eos_ids:
            assert to_canon[t] == 0, t
        elif expected is None:
            assert to_canon[t] == -1, t
        else:
            assert tables.canonical_bytes(int(to_canon[t])) == expected, (t, expected)


def check_canonical_sample(
    tables: VocabTables, i: int, ref: ModelReference, rng: np.random.Generator
) -> None:
    """For random canonical ids: the sequence decodes to the canonical bytes; ``from_canon`` is the
    model's own token when it has one, else the first token of the tokenizer's mid-text encoding."""
    to_canon = tables.to_canon[i].numpy()
    from_canon = tables.from_canon[i].numpy()
    offsets, ids = (t.numpy() for t in tables.seq_from_canon[i])
    owners: dict[int, list[int]] = {}
    for t in np.flatnonzero(to_canon > 0):
        owners.setdefault(int(to_canon[t]), []).append(int(t))
    count = min(SAMPLE_SIZE, tables.num_canonical - 1)
    sample = rng.choice(np.arange(1, tables.num_canonical), size=count, replace=False)
    # make sure the sample holds ids the model lacks and ids it holds several times
    duplicates = np.array([c for c, o in owners.items() if len(o) > 1][:50], dtype=np.int64)
    sample = np.unique(np.concatenate([sample, duplicates]))
    compared = 0
    for c in sample.tolist():
        data = tables.canonical_bytes(c)
        sequence = ids[offsets[c] : offsets[c + 1]].tolist()
        if c in owners:
            assert sequence == [from_canon[c]], c
            if len(owners[c]) == 1:
                assert from_canon[c] == owners[c][0]
            elif (reference := ref.mid_text_encoding(data)) is not None:
                assert len(reference) > 1 or reference[0] in owners[c]
                expected = reference[0] if len(reference) == 1 else min(owners[c])
                assert from_canon[c] == expected, (data, owners[c], reference)
        elif from_canon[c] == -1:  # the tokenizer's own encoding of these bytes does not give them back
            reference = ref.mid_text_encoding(data)
            assert reference is not None and ref.bytes_of(reference) != data, (c, data, reference)
            assert sequence == []
            continue
        else:
            assert from_canon[c] == sequence[0]
            if (reference := ref.mid_text_encoding(data)) is not None:
                assert sequence == reference, (data, sequence, reference)
                compared += 1
        assert ref.bytes_of(sequence) == data, (c, data, sequence)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        decoded = ref.tokenizer.backend_tokenizer.decode([ref.anchor, *sequence], skip_special_tokens=False)
        assert decoded == "a" + text, (data, sequence)
    assert compared > 0 or all(c in owners for c in sample.tolist())


# ---------------------------------------------------------------------- real tokenizers


@pytest.mark.parametrize("names", REAL_SETS, ids="+".join)
def test_real_tables_match_tokenizers(
    names: tuple[str, ...], real: Callable[[str], ModelReference], real_tables: Callable[..., VocabTables]
) -> None:
    tables = real_tables(names)
    assert tables.kinds == [REAL_KINDS[n] for n in names]
    assert tables.vocab_sizes == [LOGITS[n] for n in names]
    assert tables.canonical_bytes(0) == b"" and tables.eos_id == 0
    canonical = [tables.canonical_bytes(c) for c in range(1, tables.num_canonical)]
    assert all(a < b for a, b in zip(canonical, canonical[1:], strict=False)), "ascending, distinct"
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        ref = real(name)
        eos = {ref.tokenizer.eos_token_id, *CHAT_EOS.get(name, [])}
        check_token_bytes(tables, i, ref, eos)
        try:
            check_canonical_sample(tables, i, ref, rng)
        except AssertionError as error:
            raise AssertionError(f"model {name}, sample seed {seed}: {error}") from error
    every_token = set().union(*({b for b in real(n).token_bytes if b} for n in names))
    assert set(canonical) == every_token, "one canonical id per distinct regular token"


def test_spec_examples(
    real: Callable[[str], ModelReference], real_tables: Callable[..., VocabTables]
) -> None:
    gpt2, llama2 = real("gpt2").tokenizer, real("llama2").tokenizer
    tables = real_tables(("gpt2", "llama2"))
    token = llama2.convert_tokens_to_ids
    c_james = canonical_id(tables, b" James")
    assert tables.from_canon[1][c_james] == token("\u2581James") == 5011
    assert tables.from_canon[1][canonical_id(tables, b"\n")] == token("<0x0A>") == 13
    c_1990 = canonical_id(tables, b" 1990")
    assert tables.from_canon[0][c_1990] == gpt2.convert_tokens_to_ids("\u01201990")  # GPT-2 has " 1990"
    assert tables.from_canon[1][c_1990] == token("\u2581") == 29871  # Llama-2 splits digits
    offsets, ids = tables.seq_from_canon[1]
    assert ids[offsets[c_1990] : offsets[c_1990 + 1]].tolist() == [
        token(p) for p in ["\u2581", "1", "9", "9", "0"]
    ]
    c_space = canonical_id(tables, b" ")
    assert tables.to_canon[1][35] == tables.to_canon[1][29871] == c_space  # <0x20> and ▁
    assert tables.from_canon[1][c_space] == 29871  # the id that the mid-text encoding of " " gives

    qwen2 = real("qwen2").tokenizer
    triple = real_tables(("qwen2", "llama3", "mistral"))
    assert triple.from_canon[0][canonical_id(triple, b" James")] == qwen2.convert_tokens_to_ids("\u0120James")
    em_dash = canonical_id(triple, "\u2014".encode())
    assert triple.canonical_bytes(
        int(triple.to_canon[0][qwen2.convert_tokens_to_ids("\u00e2\u0122\u0136")])
    ) == ("\u2014".encode())
    assert triple.decode([em_dash, 0, canonical_id(triple, b"\n")]) == "\u2014\n".encode()


def test_end_of_sequence_and_padding(real_tables: Callable[..., VocabTables]) -> None:
    tables = real_tables(("qwen2", "llama3", "mistral"))
    qwen, llama3, mistral = (t.numpy() for t in tables.to_canon)
    assert qwen[151643] == qwen[151645] == 0  # <|endoftext|>, <|im_end|>
    assert qwen[151644] == -1  # <|im_start|>
    assert (qwen[151646:] == -1).all() and len(qwen) == 151936  # logits beyond the tokenizer
    assert llama3[128001] == llama3[128009] == 0  # <|end_of_text|>, <|eot_id|> (given)
    assert llama3[128000] == -1 and (np.delete(llama3[128000:], [1, 9]) == -1).all()
    assert mistral[2] == 0 and mistral[0] == mistral[1] == -1
    assert [int(f[0]) for f in tables.from_canon] == [151645, 128001, 2]  # the tokenizers' eos_token_id
    for offsets, _ in tables.seq_from_canon:
        assert offsets[1] == 1  # one EOS token


def test_model_order_does_not_change_the_canonical_space(
    real: Callable[[str], ModelReference], real_tables: Callable[..., VocabTables], tmp_path: Path
) -> None:
    names = ("qwen2", "llama3", "mistral")
    forward = real_tables(names)
    order = [2, 0, 1]
    backward = VocabTables.from_tokenizers(
        [real(names[i]).tokenizer for i in order],
        vocab_sizes=[LOGITS[names[i]] for i in order],
        eos_token_ids=[CHAT_EOS.get(names[i]) for i in order],
        cache_dir=tmp_path,  # built afresh, not read from the first build's cache
    )
    assert backward.num_canonical == forward.num_canonical
    assert backward.decode(range(backward.num_canonical)) == forward.decode(range(forward.num_canonical))
    for position, i in enumerate(order):
        assert torch.equal(backward.to_canon[position], forward.to_canon[i])
        assert torch.equal(backward.from_canon[position], forward.from_canon[i])
        for a, b in zip(backward.seq_from_canon[position], forward.seq_from_canon[i], strict=True):
            assert torch.equal(a, b)


def test_sentencepiece_layouts_give_the_same_tables(
    real: Callable[[str], ModelReference], tokenizer_dir: Path, tmp_path: Path
) -> None:
    """The Llama-2 tokenizer.json file uses a Prepend + Replace normalizer; transformers 5 loads it with
    a Metaspace pre-tokenizer instead (4.x keeps the file's). Both are the same tokenizer mid-text."""
    normalizer_layout = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir / "llama2")
    assert "Prepend" in str(normalizer_layout.backend_tokenizer.normalizer)
    # Built here, as transformers 5 builds it, so that either transformers version sees both layouts.
    metaspace = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir / "llama2")
    metaspace.backend_tokenizer.normalizer = None
    metaspace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    loaded = real("llama2").tokenizer.backend_tokenizer
    if loaded.normalizer is None:  # this transformers rebuilds the layout: it must be the one built above
        assert str(loaded.pre_tokenizer) == str(metaspace.backend_tokenizer.pre_tokenizer)
        assert str(loaded.decoder) == str(metaspace.backend_tokenizer.decoder)
    a = VocabTables.from_tokenizers([metaspace], cache_dir=tmp_path)
    b = VocabTables.from_tokenizers([normalizer_layout], cache_dir=tmp_path)
    assert a.kinds == b.kinds == [SENTENCEPIECE_BYTE_FALLBACK]
    assert len(list(tmp_path.iterdir())) == 2  # two layouts, two cache entries
    for x, y in [
        (a.to_canon[0], b.to_canon[0]),
        (a.from_canon[0], b.from_canon[0]),
        *zip(a.seq_from_canon[0], b.seq_from_canon[0], strict=True),
    ]:
        assert torch.equal(x, y)
    for data in EDGE_TEXTS:
        assert a.encode_mid_text(0, data) == b.encode_mid_text(0, data)


@pytest.mark.parametrize("name", ["qwen2", "llama3", "mistral", "llama2", "gpt2"])
def test_encode_mid_text_edge_cases(
    name: str, real: Callable[[str], ModelReference], real_tables: Callable[..., VocabTables]
) -> None:
    names = ("gpt2", "llama2") if name in ("gpt2", "llama2") else ("qwen2", "llama3", "mistral")
    tables = real_tables(names)
    check_mid_text_encoding(tables, names.index(name), real(name))


def check_mid_text_encoding(tables: VocabTables, i: int, ref: ModelReference) -> None:
    for data in EDGE_TEXTS:
        ids = tables.encode_mid_text(i, data)
        assert ref.bytes_of(ids) == data, (data, ids)  # exact, no dummy prefix, no special tokens
        expected = ref.mid_text_encoding(data)
        if expected is not None:
            assert ids == expected, (data, ids, expected)
        else:
            assert ref.kind == BYTE_LEVEL and "cafe\u0301" in data.decode()  # Qwen2's NFC normaliser
    assert tables.encode_mid_text(i, b"\xe2\x80") == [ref.byte_token(0xE2), ref.byte_token(0x80)]


# ---------------------------------------------------------------------- tokenizers trained here


def test_toy_tables_match_tokenizers(toy: dict[str, ModelReference], toy_tables: VocabTables) -> None:
    assert toy_tables.kinds == [BYTE_LEVEL, SENTENCEPIECE_BYTE_FALLBACK, SENTENCEPIECE]
    rng = np.random.default_rng()
    for i, name in enumerate(["byte_level", "sentencepiece", "sentencepiece_no_fallback"]):
        ref = toy[name]
        check_token_bytes(toy_tables, i, ref, {ref.tokenizer.eos_token_id})
        check_canonical_sample(toy_tables, i, ref, rng)
    for i, name in enumerate(["byte_level", "sentencepiece"]):
        check_mid_text_encoding(toy_tables, i, toy[name])


def test_sentencepiece_without_byte_fallback(toy: dict[str, ModelReference], toy_tables: VocabTables) -> None:
    """Bytes outside its vocabulary cannot be represented: -1 and an empty sequence."""
    ref = toy["sentencepiece_no_fallback"]
    c = canonical_id(toy_tables, b"\xe2")  # a byte token of the byte-level model
    assert toy_tables.from_canon[2][c] == -1
    offsets, _ = toy_tables.seq_from_canon[2]
    assert offsets[c] == offsets[c + 1]
    # the tokenizer itself reads unknown text as its unknown token
    unknown = ref.tokenizer.unk_token_id
    assert toy_tables.encode_mid_text(2, "\u00a7".encode()) == [unknown]
    assert ref.tokenizer.encode("\n\u00a7", add_special_tokens=False)[-1] == unknown


def test_toy_tokenizers_are_deterministic_fast_and_usable() -> None:
    texts = list(SAMPLE_TEXTS)
    for train, size in [(train_byte_level_bpe, 400), (train_sentencepiece_bpe, 500)]:
        start = time.perf_counter()
        first = train(texts, size, chat_template=SIMPLE_CHAT_TEMPLATE)
        assert time.perf_counter() - start < 1.0
        second = train(texts, size, chat_template=SIMPLE_CHAT_TEMPLATE)
        assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
        assert 300 < len(first) <= size
        text = "Hello James, 1990 \u2014 \u4f60\u597d!\n  x"
        assert first.decode(first.encode(text, add_special_tokens=False)) == text
        chat = first.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        assert chat == f"<|user|>\nHi{first.eos_token}\n<|assistant|>\n"
    sentencepiece = train_sentencepiece_bpe(texts, 500)
    assert sentencepiece.convert_ids_to_tokens([0, 1, 2, 3, 258]) == [
        "<unk>",
        "<s>",
        "</s>",
        "<0x00>",
        "<0xFF>",
    ]
    assert sentencepiece("Hello").input_ids[0] == sentencepiece.bos_token_id == 1
    assert sentencepiece.eos_token_id == 2
    byte_level = train_byte_level_bpe(texts, 400)
    assert byte_level.eos_token_id == 0 and byte_level("Hello").input_ids[0] != 0


def test_toy_training_is_deterministic_across_processes() -> None:
    """The `tokenizers` trainer keeps hash maps whose order changes between processes."""
    script = (
        "import hashlib\n"
        "from unite_ext.toy_tokenizers import SAMPLE_TEXTS, train_byte_level_bpe, train_sentencepiece_bpe\n"
        "for train in (train_byte_level_bpe, train_sentencepiece_bpe):\n"
        "    text = train(list(SAMPLE_TEXTS), 450).backend_tokenizer.to_str()\n"
        "    print(hashlib.sha256(text.encode()).hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[1]
    other_process = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    this_process = [
        hashlib.sha256(train(list(SAMPLE_TEXTS), 450).backend_tokenizer.to_str().encode()).hexdigest()
        for train in (train_byte_level_bpe, train_sentencepiece_bpe)
    ]
    assert other_process == this_process


# ---------------------------------------------------------------------- cache


def _toy_build(tokenizers: list, cache_dir: Path, **kwargs) -> VocabTables:
    return VocabTables.from_tokenizers(tokenizers, cache_dir=cache_dir, **kwargs)


def _same_tables(a: VocabTables, b: VocabTables) -> bool:
    pairs = [*zip(a.to_canon, b.to_canon, strict=True), *zip(a.from_canon, b.from_canon, strict=True)]
    pairs += [
        (x, y)
        for p, q in zip(a.seq_from_canon, b.seq_from_canon, strict=True)
        for x, y in zip(p, q, strict=True)
    ]
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in pairs) and a.decode(
        range(a.num_canonical)
    ) == b.decode(range(b.num_canonical))


@pytest.fixture()
def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    build = vocab_module._build_tables

    def counting(specs):  # type: ignore[no-untyped-def]
        calls.append(len(specs))
        return build(specs)

    monkeypatch.setattr(vocab_module, "_build_tables", counting)
    return calls


def test_cache_is_used(toy: dict[str, ModelReference], tmp_path: Path, count_builds: list[int]) -> None:
    tokenizers = [toy["byte_level"].tokenizer, toy["sentencepiece"].tokenizer]
    first = _toy_build(tokenizers, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _toy_build(tokenizers, tmp_path)
        # the same tokenizer twice (two fine-tunes of one base) is built once and shares a cache entry
        third = _toy_build([tokenizers[0], tokenizers[1], tokenizers[0]], tmp_path)
    assert count_builds == [2] and _same_tables(first, second)
    assert torch.equal(third.to_canon[2], first.to_canon[0]) and third.num_canonical == first.num_canonical
    assert second.encode_mid_text(1, b" Hello") == first.encode_mid_text(1, b" Hello")


@pytest.mark.parametrize(
    "change",
    ["vocabulary", "added special token", "added text token", "pre-tokenizer", "vocab_size", "eos ids"],
)
def test_changed_inputs_invalidate_the_cache(
    change: str, toy: dict[str, ModelReference], tmp_path: Path, count_builds: list[int]
) -> None:
    base = toy["sentencepiece"].tokenizer
    logits = 600  # fixed, so that a change of the tokenizer's length alone does not tell
    before = _toy_build([base], tmp_path, vocab_sizes=[logits])
    kwargs: dict = {"vocab_sizes": [logits]}
    changed = train_sentencepiece_bpe(list(SAMPLE_TEXTS), 560)
    assert changed.backend_tokenizer.to_str() == base.backend_tokenizer.to_str()
    if change == "vocabulary":
        changed = train_sentencepiece_bpe([*SAMPLE_TEXTS, "zebra zebra zebra crossing"], 560)
    elif change == "added special token":
        changed.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>"]})
    elif change == "added text token":
        changed.add_tokens(["zebra"])
    elif change == "pre-tokenizer":
        changed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            prepend_scheme="always", split=True
        )
    elif change == "vocab_size":
        kwargs["vocab_sizes"] = [logits + 8]
    else:
        kwargs["eos_token_ids"] = [[1]]
    after = _toy_build([changed], tmp_path, **kwargs)
    assert count_builds == [1, 1], "a changed input must not be served from the cache"
    ref = ModelReference.create(changed, SENTENCEPIECE_BYTE_FALLBACK)
    check_token_bytes(after, 0, ref, {changed.eos_token_id, *kwargs.get("eos_token_ids", [[]])[0]})
    check_mid_text_encoding(after, 0, ref)
    # The same tables, built again: split=True changes no encoding here, and a new control token maps to -1
    # like the padding row it replaces.
    assert _same_tables(before, after) == (change in ("pre-tokenizer", "added special token"))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "garbage", "stale"])
def test_corrupt_or_stale_cache_is_rebuilt_with_a_warning(
    damage: str, toy: dict[str, ModelReference], tmp_path: Path, count_builds: list[int]
) -> None:
    byte_level, sentencepiece = toy["byte_level"].tokenizer, toy["sentencepiece"].tokenizer
    expected = _toy_build([byte_level, sentencepiece], tmp_path)
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif damage == "garbage":
        path.write_bytes(b"not a table file")
    else:  # a valid file for other tokenizers (a superset of these) under this name
        other = tmp_path / "other"
        _toy_build([byte_level, sentencepiece, toy["sentencepiece_no_fallback"].tokenizer], other)
        (other_file,) = other.iterdir()
        path.write_bytes(other_file.read_bytes())
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = _toy_build([byte_level, sentencepiece], tmp_path)
    assert _same_tables(rebuilt, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _toy_build([byte_level, sentencepiece], tmp_path)  # the rewritten file is valid
    assert _same_tables(again, expected)
    assert count_builds == ([2, 3, 2] if damage == "stale" else [2, 2])


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNITE_EXT_CACHE", str(tmp_path / "root"))
    assert vocab_module.default_cache_dir() == tmp_path / "root" / "vocab_tables"
    monkeypatch.delenv("UNITE_EXT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vocab_module.default_cache_dir() == tmp_path / "xdg" / "unite_ext" / "vocab_tables"


# ---------------------------------------------------------------------- kinds and bad input


def _backend(model, decoder, pre_tokenizer=None, normalizer=None) -> Tokenizer:  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer(model)
    tokenizer.decoder = decoder
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.normalizer = normalizer
    return tokenizer


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (
            _backend(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"), decoders.WordPiece()),
            "WordPiece",
        ),
        (_backend(models.BPE({"a": 0}, []), None), "decoder type None"),
        (
            _backend(
                models.Unigram([("<unk>", 0.0), ("\u2581a", -1.0)], 0),
                decoders.Metaspace(),
                pre_tokenizers.Metaspace(),
            ),
            "model type Unigram",
        ),
        (
            _backend(
                models.BPE({"a": 0}, []),
                decoders.ByteLevel(),
                pre_tokenizers.ByteLevel(),
                normalizers.Lowercase(),
            ),
            "normalizer type Lowercase",
        ),
        (_backend(models.BPE({"a": 0}, []), decoders.CTC()), "CTC"),
    ],
)
def test_other_kinds_are_refused(backend: Tokenizer, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        VocabTables.from_tokenizers([backend], cache_dir=tmp_path)


def test_bad_arguments_are_named(toy: dict[str, ModelReference], tmp_path: Path) -> None:
    byte_level = toy["byte_level"].tokenizer
    with pytest.raises(ValueError, match="vocab_sizes"):
        VocabTables.from_tokenizers([byte_level], vocab_sizes=[1, 2], cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"vocab_sizes\[0\]"):
        VocabTables.from_tokenizers([byte_level], vocab_sizes=[len(byte_level) - 5], cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"eos_token_ids\[0\].*regular text token"):
        VocabTables.from_tokenizers([byte_level], eos_token_ids=[[100]], cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"eos_token_ids\[0\].*outside"):
        VocabTables.from_tokenizers([byte_level], eos_token_ids=[10**6], cache_dir=tmp_path)
    with pytest.raises(TypeError, match=r"tokenizers\[1\]"):
        VocabTables.from_tokenizers([byte_level, "gpt2"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizers"):
        VocabTables.from_tokenizers([], cache_dir=tmp_path)
    tables = VocabTables.from_tokenizers([byte_level], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="model_index"):
        tables.encode_mid_text(1, b"x")
    with pytest.raises(TypeError, match="data"):
        tables.encode_mid_text(0, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="canonical id"):
        tables.decode([tables.num_canonical])
    with pytest.raises(ValueError, match="canonical id"):
        tables.canonical_bytes(-1)


def test_direct_construction_from_tensors() -> None:
    to_canon = [torch.tensor([0, 1, 2, -1], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32)]
    from_canon = [torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([1, -1, 0], dtype=torch.int32)]
    tables = VocabTables(to_canon, from_canon, byte_strings=[b"", b"a", b"b"])
    assert tables.num_canonical == 3 and tables.vocab_sizes == [4, 3] and tables.kinds == ["unspecified"] * 2
    offsets, ids = tables.seq_from_canon[1]
    assert offsets.tolist() == [0, 1, 1, 2] and ids.tolist() == [1, 0]
    assert tables.decode(torch.tensor([1, 2, 0, 1])) == b"aba"
    moved = tables.to("cpu")
    assert moved is not tables and torch.equal(moved.from_canon[1], from_canon[1])
    with pytest.raises(RuntimeError, match="from_tokenizers"):
        tables.encode_mid_text(0, b"a")
    with pytest.raises(ValueError, match=r"to_canon\[0\]"):
        VocabTables([to_canon[0].long(), to_canon[1]], from_canon)
    with pytest.raises(ValueError, match=r"to_canon\[1\] values"):
        VocabTables([to_canon[0], torch.tensor([3], dtype=torch.int32)], from_canon)
    with pytest.raises(ValueError, match=r"from_canon\[1\] values"):
        VocabTables(to_canon, [from_canon[0], torch.tensor([1, 5, 0], dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"from_canon\[1\] has 2"):
        VocabTables(to_canon, [from_canon[0], from_canon[1][:2]])
    with pytest.raises(ValueError, match=r"seq_from_canon\[0\]"):
        VocabTables(
            to_canon, from_canon, seq_from_canon=[(offsets, torch.tensor([1, 7], dtype=torch.int32))] * 2
        )
