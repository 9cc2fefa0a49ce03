"""Cross-tokenizer lookup tables (SPEC section 1): ``VocabTables``.

Every regular token of every model is identified by the bytes it adds to a text in mid-text position.
Canonical id 0 is end of sequence; ids 1.. are the distinct byte strings in ascending order, so the
canonical space does not depend on the order of the models. Per model ``i`` with ``V_i`` logits:

- ``to_canon[i]``: int32 ``[V_i]``, the canonical id of each token; 0 for its end-of-sequence ids; -1 for
  other special tokens and for padding rows beyond the tokenizer;
- ``from_canon[i]``: int32 ``[C]``, the model's own token with exactly these bytes, else the first token of
  its mid-text encoding of them; its primary end-of-sequence id for 0; -1 where it cannot represent them;
- ``seq_from_canon[i]``: ``(offsets int64 [C+1], ids int32)``, the whole mid-text encoding (CSR).

Tables are built once per set of tokenizers and cached on disk (see ``VocabTables.from_tokenizers``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from unite_ext._tokenizer_backend import (
    BackendLayout,
    MidTextEncoder,
    backend_fingerprint,
    detect_layout,
    token_bytes,
    vocabulary,
)

FORMAT_VERSION = 1  # bump when the table semantics or the cache file layout change
CACHE_ENV_VAR = "UNITE_EXT_CACHE"
_CACHE_MAGIC = b"unite_ext vocab tables\n"
_ENCODE_CHUNK = 16384  # canonical strings per progress-bar step
_TABLE_NAMES = ("to_canon", "from_canon", "seq_offsets", "seq_ids")  # fields of _ModelTables, in order


def default_cache_dir() -> Path:
    """Folder of cached tables: ``$UNITE_EXT_CACHE/vocab_tables`` if that variable is set, else
    ``$XDG_CACHE_HOME/unite_ext/vocab_tables`` (``~/.cache/unite_ext/vocab_tables``)."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return Path(root) / "vocab_tables"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "unite_ext" / "vocab_tables"


class PackedBytes:
    """A read-only list of byte strings stored as one buffer plus offsets."""

    def __init__(self, blob: bytes, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob):
            raise ValueError("byte string offsets must start at 0 and end at the buffer length")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("byte string offsets must be non-decreasing")
        self.blob = blob
        self.offsets = offsets.astype(np.int64, copy=False)
        self._bounds: list[int] = self.offsets.tolist()

    @classmethod
    def pack(cls, items: Iterable[bytes]) -> PackedBytes:
        items = list(items)
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in items], out=offsets[1:])
        return cls(b"".join(items), offsets)

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, index: int) -> bytes:
        return self.blob[self._bounds[index] : self._bounds[index + 1]]


def _as_int32_vector(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32 or tensor.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor")
    return tensor


def _check_range(tensor: torch.Tensor, low: int, high: int, name: str) -> None:
    if tensor.numel() and (int(tensor.min()) < low or int(tensor.max()) > high):
        raise ValueError(f"{name} values must lie in {low}..{high}")


class VocabTables:
    """Maps between N models' token ids and one canonical token space (SPEC section 1).

    Build with ``VocabTables.from_tokenizers``; direct construction from tensors is for tests and for
    tables made elsewhere.

    Args:
        to_canon: per model an int32 tensor ``[V_i]`` with values in -1..C-1.
        from_canon: per model an int32 tensor ``[C]`` with values in -1..V_i-1.
        seq_from_canon: per model ``(offsets int64 [C+1], ids int32)``; default: the single token
            ``from_canon[i][c]`` (none where it is -1).
        byte_strings: the bytes of each canonical id (``b""`` for 0); default: unknown, and
            ``canonical_bytes``/``decode`` raise.
        kinds: tokenizer kind per model (see ``unite_ext._tokenizer_backend``); default ``"unspecified"``.
    """

    eos_id: int = 0

    def __init__(
        self,
        to_canon: Sequence[torch.Tensor],
        from_canon: Sequence[torch.Tensor],
        seq_from_canon: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        byte_strings: Sequence[bytes] | PackedBytes | None = None,
        kinds: Sequence[str] | None = None,
    ) -> None:
        if len(to_canon) == 0 or len(to_canon) != len(from_canon):
            raise ValueError("to_canon and from_canon must hold one tensor per model (at least one)")
        self.to_canon = [_as_int32_vector(t, f"to_canon[{i}]") for i, t in enumerate(to_canon)]
        self.from_canon = [_as_int32_vector(t, f"from_canon[{i}]") for i, t in enumerate(from_canon)]
        num_canonical = self.from_canon[0].numel()
        if num_canonical < 1:
            raise ValueError("from_canon tensors must have at least one entry (canonical id 0, EOS)")
        for i, (to_table, from_table) in enumerate(zip(self.to_canon, self.from_canon, strict=True)):
            if from_table.numel() != num_canonical:
                raise ValueError(
                    f"from_canon[{i}] has {from_table.numel()} entries, expected {num_canonical}"
                )
            _check_range(to_table, -1, num_canonical - 1, f"to_canon[{i}]")
            _check_range(from_table, -1, to_table.numel() - 1, f"from_canon[{i}]")
        if seq_from_canon is None:
            seq_from_canon = [self._single_token_sequences(t) for t in self.from_canon]
        if len(seq_from_canon) != len(self.to_canon):
            raise ValueError("seq_from_canon must hold one (offsets, ids) pair per model")
        self.seq_from_canon = [
            self._checked_sequences(offsets, ids, num_canonical, self.to_canon[i].numel(), i)
            for i, (offsets, ids) in enumerate(seq_from_canon)
        ]
        if byte_strings is not None and len(byte_strings) != num_canonical:
            raise ValueError(f"byte_strings has {len(byte_strings)} entries, expected {num_canonical}")
        if byte_strings is None or isinstance(byte_strings, PackedBytes):
            self._byte_strings = byte_strings
        else:
            self._byte_strings = PackedBytes.pack(byte_strings)
        self.kinds: list[str] = list(kinds) if kinds is not None else ["unspecified"] * len(self.to_canon)
        if len(self.kinds) != len(self.to_canon):
            raise ValueError("kinds must hold one entry per model")
        self._encoders: list[MidTextEncoder] | None = None

    @staticmethod
    def _single_token_sequences(from_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = from_table >= 0
        offsets = torch.zeros(from_table.numel() + 1, dtype=torch.int64, device=from_table.device)
        offsets[1:] = torch.cumsum(present.to(torch.int64), 0)
        return offsets, from_table[present]

    @staticmethod
    def _checked_sequences(
        offsets: torch.Tensor, ids: torch.Tensor, num_canonical: int, vocab_size: int, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        name = f"seq_from_canon[{index}]"
        if offsets.dtype != torch.int64 or offsets.shape != (num_canonical + 1,):
            raise ValueError(f"{name} offsets must be an int64 tensor of shape [{num_canonical + 1}]")
        _as_int32_vector(ids, f"{name} ids")
        if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel() or bool((offsets.diff() < 0).any()):
            raise ValueError(f"{name} offsets must rise from 0 to the number of ids")
        _check_range(ids, 0, vocab_size - 1, f"{name} ids")
        return offsets, ids

    # ------------------------------------------------------------------ building

    @classmethod
    def from_tokenizers(
        cls,
        tokenizers: Sequence[Any],
        vocab_sizes: Sequence[int | None] | None = None,
        eos_token_ids: Sequence[int | Sequence[int] | None] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> VocabTables:
        """Build (or load from the cache) the tables for these tokenizers, in this order.

        Args:
            tokenizers: transformers fast tokenizers (anything with ``backend_tokenizer``) or
                ``tokenizers.Tokenizer`` objects, one per model.
            vocab_sizes: the number of logits of each model, normally its ``config.vocab_size``;
                default (or ``None`` for one model): the tokenizer's length. Rows beyond the tokenizer
                map to -1.
            eos_token_ids: end-of-sequence ids per model in addition to the tokenizer's
                ``eos_token_id`` (e.g. a chat model's end-of-turn token from its generation config);
                an int, a list of ints or ``None`` per model. The tokenizer's ``eos_token_id`` (else the
                first one given) is the model's primary EOS id, ``from_canon[i][0]``.
            cache_dir: folder of the on-disk cache; default ``default_cache_dir()``. The file name is a
                hash of everything the tables depend on; a file that does not match it or cannot be read
                is rebuilt with a warning, never used.
        """
        if isinstance(tokenizers, (str, bytes)) or len(tokenizers) == 0:
            raise ValueError("tokenizers must be a non-empty sequence of tokenizers")
        count = len(tokenizers)
        sizes = _per_model(vocab_sizes, count, "vocab_sizes")
        extra_eos = _per_model(eos_token_ids, count, "eos_token_ids")
        specs = [
            _ModelSpec.create(i, tokenizer, sizes[i], extra_eos[i]) for i, tokenizer in enumerate(tokenizers)
        ]
        unique = {spec.key: spec for spec in reversed(specs)}  # first occurrence wins
        set_key = _digest([FORMAT_VERSION, *sorted(unique)])
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = folder / f"vocab_tables_{set_key[:40]}.pt"

        tables = _load_cached(path, set_key, specs) if path.exists() else None
        if tables is None:
            canonical, per_model = _build_tables(list(unique.values()))
            tables = _assemble(canonical, per_model, specs)
            _save_cache(path, set_key, canonical, per_model)
        tables._encoders = [spec.encoder for spec in specs]
        return tables

    # ------------------------------------------------------------------ queries

    @property
    def num_models(self) -> int:
        return len(self.to_canon)

    @property
    def num_canonical(self) -> int:
        """``C``: the number of canonical ids, EOS (0) included."""
        return self.from_canon[0].numel()

    @property
    def vocab_sizes(self) -> list[int]:
        """``V_i``: the number of logits of each model."""
        return [t.numel() for t in self.to_canon]

    @property
    def device(self) -> torch.device:
        return self.to_canon[0].device

    def to(self, device: torch.device | str) -> VocabTables:
        """A copy with every tensor on ``device`` (byte strings and encoders stay on the host, shared)."""
        moved = copy.copy(self)
        moved.to_canon = [t.to(device) for t in self.to_canon]
        moved.from_canon = [t.to(device) for t in self.from_canon]
        moved.seq_from_canon = [(o.to(device), i.to(device)) for o, i in self.seq_from_canon]
        return moved

    def _bytes_table(self) -> PackedBytes:
        if self._byte_strings is None:
            raise RuntimeError("these tables were built without canonical byte strings")
        return self._byte_strings

    def canonical_bytes(self, c: int) -> bytes:
        """The bytes of canonical id ``c`` (``b""`` for EOS, id 0)."""
        table = self._bytes_table()
        if not 0 <= c < len(table):
            raise ValueError(f"canonical id {c} out of range 0..{len(table) - 1}")
        return table[c]

    def decode(self, canonical_ids: Iterable[int] | torch.Tensor) -> bytes:
        """The concatenated bytes of these canonical ids; EOS (0) adds nothing."""
        table = self._bytes_table()
        ids = canonical_ids.tolist() if isinstance(canonical_ids, torch.Tensor) else list(canonical_ids)
        for c in ids:
            if not 0 <= c < len(table):
                raise ValueError(f"canonical id {c} out of range 0..{len(table) - 1}")
        return b"".join(table[c] for c in ids)

    def encode_mid_text(self, model_index: int, data: bytes) -> list[int]:
        """Model ``model_index``'s mid-text encoding of ``data`` (SPEC section 1): no BOS, no special
        tokens, no dummy-prefix space; bytes that are not valid UTF-8 become byte tokens. Decoding the
        result gives back ``data`` exactly, except where the tokenizer cannot represent it (a
        SentencePiece tokenizer without byte fallback gives its unknown token there)."""
        if self._encoders is None:
            raise RuntimeError("encode_mid_text needs tables built with VocabTables.from_tokenizers")
        if not 0 <= model_index < len(self._encoders):
            raise ValueError(f"model_index {model_index} out of range 0..{len(self._encoders) - 1}")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return self._encoders[model_index].encode(bytes(data))

    def __repr__(self) -> str:
        return (
            f"VocabTables(num_models={self.num_models}, num_canonical={self.num_canonical}, "
            f"vocab_sizes={self.vocab_sizes}, kinds={self.kinds}, device={self.device})"
        )


# ---------------------------------------------------------------------- inputs


def _per_model(values: Sequence[Any] | None, count: int, name: str) -> list[Any]:
    if values is None:
        return [None] * count
    if isinstance(values, (str, bytes)) or len(values) != count:
        raise ValueError(f"{name} must hold one entry per tokenizer ({count})")
    return list(values)


def _digest(parts: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _int_list(value: Any, name: str) -> list[int]:
    items = [] if value is None else [value] if isinstance(value, int) else list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int, a list of ints or None")
    return items


@dataclass
class _ModelSpec:
    """One tokenizer with what its tables depend on."""

    index: int
    backend: Tokenizer
    layout: BackendLayout
    vocab_size: int
    eos_ids: list[int]
    primary_eos: int | None
    key: str
    encoder: MidTextEncoder

    @classmethod
    def create(cls, index: int, tokenizer: Any, vocab_size: int | None, extra_eos: Any) -> _ModelSpec:
        backend = (
            tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        )
        if not isinstance(backend, Tokenizer):
            raise TypeError(
                f"tokenizers[{index}] must be a fast tokenizer (with backend_tokenizer) or a "
                f"tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        try:
            layout = detect_layout(backend)
        except ValueError as error:
            raise ValueError(f"tokenizers[{index}]: {error}") from error
        if vocab_size is None:
            own_length = len(tokenizer) if tokenizer is not backend else 0
            vocab_size = max(backend.get_vocab_size(with_added_tokens=True), own_length)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_sizes[{index}] must be a positive int, got {vocab_size!r}")
        own_eos = getattr(tokenizer, "eos_token_id", None)
        given = _int_list(extra_eos, f"eos_token_ids[{index}]")
        eos_ids = sorted({*([own_eos] if own_eos is not None else []), *given})
        for eos in eos_ids:
            if not 0 <= eos < vocab_size:
                raise ValueError(
                    f"eos_token_ids[{index}]: id {eos} is outside the vocabulary 0..{vocab_size - 1}"
                )
        primary = own_eos if own_eos is not None else (given[0] if given else None)
        key = _digest(
            [FORMAT_VERSION, layout.kind, backend_fingerprint(backend), vocab_size, eos_ids, primary]
        )
        return cls(index, backend, layout, vocab_size, eos_ids, primary, key, MidTextEncoder(backend, layout))


# ---------------------------------------------------------------------- building


@dataclass
class _ModelTables:
    to_canon: np.ndarray  # int32 [V]
    from_canon: np.ndarray  # int32 [C]
    seq_offsets: np.ndarray  # int64 [C+1]
    seq_ids: np.ndarray  # int32


def _regular_token_bytes(spec: _ModelSpec) -> list[bytes | None]:
    """Bytes of every regular token of the model by id (``None`` for special and unused ids)."""
    strings, added = vocabulary(spec.backend)
    control = {i for i, token in added.items() if token.special}
    unknown = spec.backend.model.unk_token
    if unknown and spec.backend.token_to_id(unknown) is not None:
        control.add(spec.backend.token_to_id(unknown))
    table: list[bytes | None] = [
        None if s is None or i in control else token_bytes(s, spec.layout) or None
        for i, s in enumerate(strings)
    ]
    beyond = [i for i in range(spec.vocab_size, len(table)) if table[i] is not None]
    if beyond:
        raise ValueError(
            f"vocab_sizes[{spec.index}] = {spec.vocab_size} is smaller than the tokenizer: regular token "
            f"{beyond[0]} has no logit"
        )
    regular_eos = [e for e in spec.eos_ids if e < len(table) and table[e] is not None]
    if regular_eos:
        raise ValueError(f"eos_token_ids[{spec.index}]: id {regular_eos[0]} is a regular text token")
    return table


def _build_tables(specs: list[_ModelSpec]) -> tuple[PackedBytes, dict[str, _ModelTables]]:
    token_bytes_by_model = [_regular_token_bytes(spec) for spec in specs]
    distinct = set().union(*({b for b in table if b is not None} for table in token_bytes_by_model))
    canonical_list = [b"", *sorted(distinct)]
    canonical_id = {b: c for c, b in enumerate(canonical_list)}
    canonical = PackedBytes.pack(canonical_list)
    per_model = {
        spec.key: _model_tables(spec, table, canonical, canonical_id)
        for spec, table in zip(specs, token_bytes_by_model, strict=True)
    }
    return canonical, per_model


def _model_tables(
    spec: _ModelSpec, token_table: list[bytes | None], canonical: PackedBytes, canonical_id: dict[bytes, int]
) -> _ModelTables:
    num_canonical = len(canonical)
    regular = [(i, canonical_id[b]) for i, b in enumerate(token_table) if b is not None]
    token_ids = np.array([i for i, _ in regular], dtype=np.int64)
    token_cids = np.array([c for _, c in regular], dtype=np.int64)
    to_canon = np.full(spec.vocab_size, -1, dtype=np.int32)
    to_canon[token_ids] = token_cids
    to_canon[spec.eos_ids] = 0

    # Lowest own id per canonical id; the mid-text encoding decides between several own ids.
    order = np.lexsort((token_ids, token_cids))
    owned_cids, first, counts = np.unique(token_cids[order], return_index=True, return_counts=True)
    from_canon = np.full(num_canonical, -1, dtype=np.int64)
    from_canon[owned_cids] = token_ids[order][first]
    is_owned = np.zeros(num_canonical, dtype=bool)
    is_owned[owned_cids] = True
    is_owned[0] = True
    from_canon[0] = -1 if spec.primary_eos is None else spec.primary_eos
    to_encode = np.concatenate([owned_cids[counts > 1], np.flatnonzero(~is_owned)]).tolist()

    encodings = _encode_canonical(spec, [canonical[c] for c in to_encode])
    lengths = (from_canon >= 0).astype(np.int64)
    multi_token: dict[int, list[int]] = {}
    for c, ids in zip(to_encode, encodings, strict=True):
        pieces = [token_table[t] for t in ids]
        exact = bool(ids) and None not in pieces and b"".join(pieces) == canonical[c]
        if not exact:
            if spec.encoder.has_all_byte_tokens:
                raise RuntimeError(
                    f"tokenizers[{spec.index}]: mid-text encoding of {canonical[c]!r} gives {ids}, which "
                    f"does not decode to these bytes"
                )
            continue  # the model cannot represent these bytes: -1, no sequence
        if is_owned[c]:
            if len(ids) == 1:
                from_canon[c] = ids[0]
            continue
        from_canon[c] = ids[0]
        lengths[c] = len(ids)
        multi_token[c] = ids

    seq_offsets = np.zeros(num_canonical + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    seq_ids = np.empty(int(seq_offsets[-1]), dtype=np.int32)
    single = np.flatnonzero(lengths == 1)
    seq_ids[seq_offsets[single]] = from_canon[single]
    for c, ids in multi_token.items():
        seq_ids[seq_offsets[c] : seq_offsets[c + 1]] = ids
    return _ModelTables(to_canon, from_canon.astype(np.int32), seq_offsets, seq_ids)


def _encode_canonical(spec: _ModelSpec, items: list[bytes]) -> list[list[int]]:
    encodings: list[list[int]] = []
    chunks = range(0, len(items), _ENCODE_CHUNK)
    for start in tqdm(
        chunks, desc=f"vocab tables: encoding for model {spec.index}", disable=None, leave=False
    ):
        encodings.extend(spec.encoder.encode_many(items[start : start + _ENCODE_CHUNK]))
    return encodings


def _assemble(
    canonical: PackedBytes, per_model: dict[str, _ModelTables], specs: list[_ModelSpec]
) -> VocabTables:
    tables = [per_model[spec.key] for spec in specs]
    return VocabTables(
        to_canon=[torch.from_numpy(t.to_canon) for t in tables],
        from_canon=[torch.from_numpy(t.from_canon) for t in tables],
        seq_from_canon=[(torch.from_numpy(t.seq_offsets), torch.from_numpy(t.seq_ids)) for t in tables],
        byte_strings=canonical,
        kinds=[spec.layout.kind for spec in specs],
    )


# ---------------------------------------------------------------------- cache


def _save_cache(path: Path, set_key: str, canonical: PackedBytes, per_model: dict[str, _ModelTables]) -> None:
    payload = {
        "format": FORMAT_VERSION,
        "set_key": set_key,
        "canonical_blob": torch.frombuffer(bytearray(canonical.blob), dtype=torch.uint8)
        if canonical.blob
        else torch.empty(0, dtype=torch.uint8),
        "canonical_offsets": torch.from_numpy(canonical.offsets),
        "models": {
            key: {name: torch.from_numpy(getattr(tables, name)) for name in _TABLE_NAMES}
            for key, tables in per_model.items()
        },
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(_CACHE_MAGIC + hashlib.sha256(data).digest() + data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        warnings.warn(f"could not write the vocabulary table cache {path}: {error}", stacklevel=3)


def _load_cached(path: Path, set_key: str, specs: list[_ModelSpec]) -> VocabTables | None:
    """The cached tables, or ``None`` (with a warning) when the file is corrupt or stale."""
    try:
        raw = path.read_bytes()
        header = len(_CACHE_MAGIC)
        if raw[:header] != _CACHE_MAGIC:
            raise ValueError("not a vocabulary table file")
        data = raw[header + 32 :]
        if hashlib.sha256(data).digest() != raw[header : header + 32]:
            raise ValueError("checksum mismatch")
        payload = torch.load(io.BytesIO(data), weights_only=True)
        if payload["format"] != FORMAT_VERSION or payload["set_key"] != set_key:
            raise ValueError("made for other tokenizers or another format version")
        canonical = PackedBytes(
            payload["canonical_blob"].numpy().tobytes(), payload["canonical_offsets"].numpy()
        )
        per_model = {
            spec.key: _ModelTables(*(payload["models"][spec.key][name].numpy() for name in _TABLE_NAMES))
            for spec in specs
        }
        for spec in specs:
            if per_model[spec.key].to_canon.shape != (spec.vocab_size,):
                raise ValueError("table size does not match the vocabulary size")
        return _assemble(canonical, per_model, specs)
    except Exception as error:  # any unreadable file is rebuilt, whatever the reason
        warnings.warn(f"ignoring the vocabulary table cache {path} ({error}); rebuilding it", stacklevel=3)
        return None
