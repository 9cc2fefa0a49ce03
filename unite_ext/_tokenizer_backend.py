"""Token bytes and mid-text encoding, read from a tokenizer's `tokenizers` backend (SPEC section 1).

A tokenizer's kind is detected from its backend components (model, normalizer, pre-tokenizer, decoder),
never from a model name:

- ``"byte_level"``: BPE model, ``ByteLevel`` pre-tokenizer and decoder (GPT-2, Llama-3, Qwen2 families);
- ``"sentencepiece_byte_fallback"`` / ``"sentencepiece"``: BPE model whose pieces use ``▁`` for a space,
  with a ``Metaspace`` pre-tokenizer or a ``Replace(' ', '▁')`` normalizer (Llama-2, Mistral), with or
  without byte fallback.

Anything else is refused with a ``ValueError`` that names the component type.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Tokenizer

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
SENTENCEPIECE_BYTE_FALLBACK = "sentencepiece_byte_fallback"

SPACE_PIECE = "\u2581"  # SentencePiece's "▁"
_UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ESCAPED_BYTES = re.compile("([\udc80-\udcff]+)")  # bytes that `surrogateescape` could not decode


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: printable Latin-1 bytes stand for themselves, the other
    bytes (control characters, space, 0x7F-0xA0, 0xAD) take the code points 256, 257, ... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_to_byte = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in char_to_byte.values()]
    char_to_byte.update({chr(256 + n): b for n, b in enumerate(others)})
    return char_to_byte


BYTE_LEVEL_CHAR_TO_BYTE: dict[str, int] = _byte_level_alphabet()
BYTE_LEVEL_BYTE_TO_CHAR: dict[int, str] = {b: c for c, b in BYTE_LEVEL_CHAR_TO_BYTE.items()}
_BYTE_LEVEL_CHARS = frozenset(BYTE_LEVEL_CHAR_TO_BYTE)
_BYTE_LEVEL_TRANSLATION = {ord(c): b for c, b in BYTE_LEVEL_CHAR_TO_BYTE.items()}


def _state(component: Any) -> dict[str, Any] | None:
    """JSON description of a backend component (normalizer, pre-tokenizer, decoder)."""
    return None if component is None else json.loads(component.__getstate__())


def _parts(description: dict[str, Any] | None, list_field: str) -> list[dict[str, Any]]:
    """The members of a ``Sequence`` component (or the component itself), flattened."""
    if description is None:
        return []
    if description["type"] == "Sequence":
        return [part for member in description[list_field] for part in _parts(member, list_field)]
    return [description]


def _is_space_to_piece(part: dict[str, Any]) -> bool:
    return part["type"] == "Replace" and part["pattern"] == {"String": " "} and part["content"] == SPACE_PIECE


def _is_piece_to_space(part: dict[str, Any]) -> bool:
    return part["type"] == "Replace" and part["pattern"] == {"String": SPACE_PIECE} and part["content"] == " "


@dataclass(frozen=True)
class BackendLayout:
    """What the table builder needs to know about a backend tokenizer's pipeline.

    ``normalizer`` and ``pre_tokenizer`` are the JSON descriptions of the mid-text pipeline: the
    tokenizer's own, minus what adds a dummy prefix (SentencePiece's ``Prepend('▁')``, ``Metaspace``'s
    prepend scheme, ``ByteLevel(add_prefix_space=True)``) and minus Unicode normalization (NFC etc.), which
    would change the bytes of the text so that decoding no longer gives it back exactly.
    """

    kind: str
    byte_pieces_decode_to_bytes: bool  # SentencePiece-style decoder with ByteFallback: "<0x0A>" is b"\n"
    normalizer: dict[str, Any] | None
    pre_tokenizer: dict[str, Any] | None


def detect_layout(backend: Tokenizer) -> BackendLayout:
    """Detect the tokenizer kind from the backend's components; raise ``ValueError`` for other kinds."""
    model_type = type(backend.model).__name__  # the model's own state holds the whole vocabulary
    decoder = _state(backend.decoder)
    normalizer = _state(backend.normalizer)
    pre_tokenizer = _state(backend.pre_tokenizer)
    decoder_parts = _parts(decoder, "decoders")
    decoder_types = [part["type"] for part in decoder_parts]
    decoder_name = "None" if decoder is None else "+".join(decoder_types) or decoder["type"]

    if decoder_types and all(t == "ByteLevel" for t in decoder_types):
        kind = BYTE_LEVEL
        if not any(p["type"] == "ByteLevel" for p in _parts(pre_tokenizer, "pretokenizers")):
            raise ValueError(
                f"byte-level decoder without a ByteLevel pre-tokenizer is not supported "
                f"(pre-tokenizer {pre_tokenizer and pre_tokenizer['type']})"
            )
    elif any(_is_piece_to_space(p) or p["type"] == "Metaspace" for p in decoder_parts):
        unsupported = [
            t
            for p, t in zip(decoder_parts, decoder_types, strict=True)
            if not (_is_piece_to_space(p) or t in ("Metaspace", "ByteFallback", "Fuse", "Strip"))
        ]
        if unsupported:
            raise ValueError(
                f"unsupported tokenizer decoder type {'+'.join(unsupported)} (in {decoder_name})"
            )
        kind = (
            SENTENCEPIECE_BYTE_FALLBACK if getattr(backend.model, "byte_fallback", False) else SENTENCEPIECE
        )
    else:
        raise ValueError(
            f"unsupported tokenizer kind: decoder type {decoder_name}; supported are byte-level BPE "
            f"(ByteLevel decoder) and SentencePiece-style BPE (Metaspace or Replace('▁', ' ') decoder)"
        )
    if model_type != "BPE":
        raise ValueError(f"unsupported tokenizer model type {model_type} (decoder {decoder_name})")

    kept_normalizers = []
    for part in _parts(normalizer, "normalizers"):
        if part["type"] in _UNICODE_FORMS:
            continue
        if kind != BYTE_LEVEL and part["type"] == "Prepend" and part["prepend"] == SPACE_PIECE:
            continue
        if kind != BYTE_LEVEL and _is_space_to_piece(part):
            kept_normalizers.append(part)
            continue
        raise ValueError(f"unsupported tokenizer normalizer type {part['type']} (decoder {decoder_name})")

    pre_tokenizer_parts = []
    for part in _parts(pre_tokenizer, "pretokenizers"):
        if part["type"] == "ByteLevel":
            part = {**part, "add_prefix_space": False}
        elif part["type"] == "Metaspace":
            if part.get("replacement", SPACE_PIECE) != SPACE_PIECE:
                raise ValueError(f"unsupported Metaspace replacement {part['replacement']!r}")
            part = {**part, "prepend_scheme": "never"}
            part.pop("add_prefix_space", None)  # older serialisation of the prepend scheme
        pre_tokenizer_parts.append(part)

    if kind != BYTE_LEVEL and not (
        kept_normalizers or any(p["type"] == "Metaspace" for p in pre_tokenizer_parts)
    ):
        raise ValueError(
            f"SentencePiece-style decoder {decoder_name} without a Metaspace pre-tokenizer or "
            f"Replace(' ', '▁') normalizer is not supported"
        )
    return BackendLayout(
        kind=kind,
        byte_pieces_decode_to_bytes=kind == BYTE_LEVEL or "ByteFallback" in decoder_types,
        normalizer={"type": "Sequence", "normalizers": kept_normalizers} if kept_normalizers else None,
        pre_tokenizer=(
            {"type": "Sequence", "pretokenizers": pre_tokenizer_parts} if pre_tokenizer_parts else None
        ),
    )


def token_bytes(token: str, layout: BackendLayout) -> bytes:
    """The bytes that token string ``token`` adds to a text in mid-text position, as the decoder of a
    tokenizer with this layout produces them."""
    if layout.kind == BYTE_LEVEL:
        # The ByteLevel decoder maps a token through the table only if every character is in it.
        if _BYTE_LEVEL_CHARS.issuperset(token):
            return bytes(token.translate(_BYTE_LEVEL_TRANSLATION), "latin-1")
        return token.encode("utf-8")
    if layout.byte_pieces_decode_to_bytes:
        match = _BYTE_PIECE.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)])
    return token.replace(SPACE_PIECE, " ").encode("utf-8")


def vocabulary(backend: Tokenizer) -> tuple[list[str | None], dict[int, AddedToken]]:
    """Token string of every id below the tokenizer's length (``None`` for unused ids), and the added
    tokens by id."""
    added = backend.get_added_tokens_decoder()
    strings: dict[int, str] = {i: t for t, i in backend.get_vocab(with_added_tokens=False).items()}
    strings.update({i: t.content for i, t in added.items()})
    length = max(strings, default=-1) + 1
    table: list[str | None] = [None] * length
    for i, t in strings.items():
        table[i] = t
    return table, added


def backend_fingerprint(backend: Tokenizer) -> bytes:
    """Digest of everything in the backend that the tables depend on: the model (vocabulary, merges,
    options), normalizer, pre-tokenizer, decoder and added tokens. Truncation and padding settings, which
    transformers changes on the backend between calls, are left out."""
    digest = hashlib.sha256()
    for component in (backend.model, backend.normalizer, backend.pre_tokenizer, backend.decoder):
        state = b"null" if component is None else component.__getstate__()
        digest.update(len(state).to_bytes(8, "little") + state)
    for token_id, token in sorted(backend.get_added_tokens_decoder().items()):
        flags = (token.special, token.normalized, token.lstrip, token.rstrip, token.single_word)
        digest.update(repr((token_id, token.content, flags)).encode("utf-8"))
    return digest.digest()


class MidTextEncoder:
    """Mid-text encoding of bytes by one tokenizer (SPEC section 1): no BOS, no special tokens, no
    dummy-prefix space, and decoding the result gives back exactly the bytes wherever the tokenizer can
    represent them. Bytes that are not valid UTF-8 are encoded with the tokenizer's byte tokens.

    Built on the backend's own model (shared, not copied), so construction is cheap.
    """

    def __init__(self, backend: Tokenizer, layout: BackendLayout) -> None:
        self.layout = layout
        components = Tokenizer.from_str(
            json.dumps(
                {
                    "version": "1.0",
                    "truncation": None,
                    "padding": None,
                    "added_tokens": [],
                    "normalizer": layout.normalizer,
                    "pre_tokenizer": layout.pre_tokenizer,
                    "post_processor": None,
                    "decoder": None,
                    "model": {"type": "BPE", "vocab": {}, "merges": []},
                }
            )
        )
        tokenizer = Tokenizer(backend.model)
        tokenizer.normalizer = components.normalizer
        tokenizer.pre_tokenizer = components.pre_tokenizer
        # Added tokens are replayed in id order, which reproduces their ids; special ones are then read
        # as plain text (encode_special_tokens), like any other text the model did not mark up.
        for token_id, token in sorted(backend.get_added_tokens_decoder().items()):
            if token.special:
                tokenizer.add_special_tokens([token])
            else:
                tokenizer.add_tokens([token])
            if tokenizer.token_to_id(token.content) != token_id:
                raise RuntimeError(f"added token {token.content!r} did not keep its id {token_id}")
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.byte_token_ids: list[int | None] = [
            tokenizer.token_to_id(self._byte_token(b)) for b in range(256)
        ]
        self.unknown_id: int | None = (
            tokenizer.token_to_id(backend.model.unk_token) if backend.model.unk_token else None
        )

    def _byte_token(self, byte: int) -> str:
        if self.layout.kind == BYTE_LEVEL:
            return BYTE_LEVEL_BYTE_TO_CHAR[byte]
        return f"<0x{byte:02X}>"

    @property
    def has_all_byte_tokens(self) -> bool:
        """Whether every byte string can be encoded exactly (byte-level alphabet or byte fallback)."""
        return self.layout.kind != SENTENCEPIECE and None not in self.byte_token_ids

    def _encode_invalid_bytes(self, text: str) -> list[int]:
        """Byte tokens for the undecodable bytes that `surrogateescape` put in ``text``; a tokenizer
        without a byte's token gives its unknown token, or nothing, as its model does for unknown text."""
        ids = [self.byte_token_ids[ord(char) - 0xDC00] for char in text]
        fallback = [] if self.unknown_id is None else [self.unknown_id]
        return [i for token_id in ids for i in ([token_id] if token_id is not None else fallback)]

    def _encode_with_invalid_bytes(self, data: bytes) -> list[int]:
        ids: list[int] = []
        for index, piece in enumerate(_ESCAPED_BYTES.split(data.decode("utf-8", "surrogateescape"))):
            if index % 2:
                ids.extend(self._encode_invalid_bytes(piece))
            elif piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False).ids)
        return ids

    def encode(self, data: bytes) -> list[int]:
        """Token ids of ``data`` in mid-text position."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._encode_with_invalid_bytes(data)
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def encode_many(self, items: Sequence[bytes]) -> list[list[int]]:
        """``[self.encode(b) for b in items]``, with the valid UTF-8 items encoded in one batch."""
        results: list[list[int]] = [[] for _ in items]
        batch_positions: list[int] = []
        batch_texts: list[str] = []
        for position, data in enumerate(items):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                results[position] = self._encode_with_invalid_bytes(data)
                continue
            if text:
                batch_positions.append(position)
                batch_texts.append(text)
        encodings = self.tokenizer.encode_batch(batch_texts, add_special_tokens=False)
        for position, encoding in zip(batch_positions, encodings, strict=True):
            results[position] = encoding.ids
        return results
