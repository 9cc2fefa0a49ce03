"""Which models make up an ensemble, and how each is loaded: model spec files and their loader.

A spec file is JSON (``.json``) or YAML (``.yaml``/``.yml``)::

    models:
      - path: /models/Llama-3-8B-Instruct    # a local folder (or a Hugging Face hub name)
        weight: 0.6                          # optional; all models or none; default uniform
        dtype: bfloat16                      # auto (default), float32, float16 or bfloat16
        device_map: cuda:0                   # optional; passed to from_pretrained (e.g. auto, cpu)
        chat_template: true                  # false (default): the prompt as it is;
                                             # true: the tokenizer's chat template;
                                             # a file name: that Jinja chat template
        chat_template_kwargs:                # optional, with chat_template only: variables of
          enable_thinking: false             # this model's template (over --chat-template-kwargs)
      - /models/Qwen2-7B-Instruct            # a bare path takes every default
    selection: ...                           # optional, ignored: written by `unite select`

Relative model paths and chat-template files are taken relative to the current directory, as on the
command line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from unite_ext.defaults import DEFAULT_K, DEFAULT_LOOKBEHIND, DEFAULT_MAX_PASS_TOKENS, DEFAULT_SYNC

DTYPES = ("auto", "float32", "float16", "bfloat16")
_MODEL_KEYS = ("path", "weight", "dtype", "device_map", "chat_template", "chat_template_kwargs")


@dataclass(frozen=True)
class ModelSpec:
    """One member of an ensemble.

    Attributes:
        path: local folder or hub name of the model and its tokenizer.
        weight: the model's vote (default ``None``: uniform over the ensemble).
        dtype: weights dtype, one of :data:`DTYPES` (default ``"auto"``: the checkpoint's).
        device_map: ``from_pretrained``'s ``device_map`` (default ``None``: CPU).
        chat_template: ``False`` (default) sends prompts as they are; ``True`` wraps each prompt as one
            user message in the tokenizer's chat template; a string names a Jinja template file used
            instead of the tokenizer's.
        chat_template_kwargs: variables of this model's chat template (e.g. ``{"enable_thinking": False}``
            for Qwen3's), which override those given to every model (``--chat-template-kwargs``); only
            with ``chat_template`` set (default ``None``: none of its own).
    """

    path: str
    weight: float | None = None
    dtype: str = "auto"
    device_map: str | None = None
    chat_template: bool | str = False
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"model path must be a non-empty string, got {self.path!r}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"model {self.path}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.weight is not None and not (
            isinstance(self.weight, (int, float))
            and not isinstance(self.weight, bool)
            and math.isfinite(self.weight)
            and self.weight >= 0
        ):
            raise ValueError(f"model {self.path}: weight must be a finite number >= 0, got {self.weight!r}")
        if not isinstance(self.chat_template, (bool, str)):
            raise ValueError(f"model {self.path}: chat_template must be true, false or a file name")
        if self.chat_template_kwargs is not None:
            if not isinstance(self.chat_template_kwargs, dict) or not all(
                isinstance(name, str) for name in self.chat_template_kwargs
            ):
                raise ValueError(
                    f"model {self.path}: chat_template_kwargs must be a mapping of variable names to values"
                )
            if self.chat_template is False:
                raise ValueError(
                    f"model {self.path}: chat_template_kwargs are variables of a chat template, "
                    "but chat_template is false"
                )

    def as_dict(self) -> dict[str, Any]:
        """The spec-file entry of this model (defaults left out)."""
        defaults = ModelSpec(self.path)
        return {k: v for k, v in asdict(self).items() if k == "path" or v != getattr(defaults, k)}


def ensemble_weights(specs: Sequence[ModelSpec]) -> list[float] | None:
    """The weights of an ensemble: ``None`` (uniform) when no model sets one; every model must set one
    otherwise, and they may not all be zero."""
    given = [s.weight is not None for s in specs]
    if not any(given):
        return None
    if not all(given):
        missing = [s.path for s in specs if s.weight is None]
        raise ValueError(f"either every model has a weight or none does; no weight for {missing}")
    weights = [float(s.weight) for s in specs]  # type: ignore[arg-type]
    if sum(weights) <= 0:
        raise ValueError("model weights are all zero")
    return weights


def parse_spec(content: Any, source: str) -> list[ModelSpec]:
    """The models of an already parsed spec file (``source`` names it in errors)."""
    if not isinstance(content, dict) or "models" not in content:
        raise ValueError(f"{source}: a model spec must be a mapping with a 'models' list")
    unknown = set(content) - {"models", "selection"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)} (allowed: models, selection)")
    entries = content["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: 'models' must be a non-empty list")
    specs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: models[{index}] must be a path or a mapping")
        unknown = set(entry) - set(_MODEL_KEYS)
        if unknown:
            raise ValueError(
                f"{source}: models[{index}] has unknown keys {sorted(unknown)} (allowed: {_MODEL_KEYS})"
            )
        if "path" not in entry:
            raise ValueError(f"{source}: models[{index}] has no 'path'")
        specs.append(ModelSpec(**entry))
    ensemble_weights(specs)
    return specs


def load_spec(path: str | Path) -> list[ModelSpec]:
    """The models listed in a spec file (JSON or YAML, see the module documentation)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model spec file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        content = json.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        content = yaml.safe_load(text)
    else:
        raise ValueError(f"{path}: a model spec file must end in .json, .yaml or .yml")
    return parse_spec(content, str(path))


def write_spec(path: str | Path, specs: Sequence[ModelSpec], selection: Any = None) -> None:
    """Write a JSON spec file that :func:`load_spec` (and ``unite eval --spec``) reads."""
    content: dict[str, Any] = {"models": [s.as_dict() for s in specs]}
    if selection is not None:
        content["selection"] = selection
    Path(path).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def uses_chat(specs: Sequence[ModelSpec]) -> bool:
    """Whether the ensemble renders prompts with chat templates.

    The ensemble renders every model's prompt the same way (plain text, or one user message in each
    model's chat template), so ``chat_template`` must be off for all models or on for all of them; each
    model may still name its own template file.
    """
    on = [s.chat_template is not False for s in specs]
    if any(on) and not all(on):
        plain = [s.path for s, c in zip(specs, on, strict=True) if not c]
        raise ValueError(f"chat_template must be set for every model or for none; it is false for {plain}")
    return all(on)


def build_ensemble(
    specs: Sequence[ModelSpec],
    *,
    k: int = DEFAULT_K,
    sync: str = DEFAULT_SYNC,
    lookbehind: int = DEFAULT_LOOKBEHIND,
    max_pass_tokens: int = DEFAULT_MAX_PASS_TOKENS,
) -> Any:
    """Load the models of ``specs`` into a :class:`unite_ext.decode.Ensemble`.

    ``k`` (default 10), ``sync`` (default ``"exact"``), ``lookbehind`` (default 8) and
    ``max_pass_tokens`` (default 16384) are the ensemble's settings. A one-model ensemble is the
    single-model baseline.
    """
    import torch

    from unite_ext.decode import Ensemble

    uses_chat(specs)
    templates = []
    for spec in specs:
        if isinstance(spec.chat_template, str):
            template = Path(spec.chat_template)
            if not template.is_file():
                raise FileNotFoundError(f"model {spec.path}: chat template file not found: {template}")
            templates.append(template.read_text(encoding="utf-8"))
        else:
            templates.append(None)
    ensemble = Ensemble.from_pretrained(
        [s.path for s in specs],
        dtype=[s.dtype if s.dtype == "auto" else getattr(torch, s.dtype) for s in specs],
        device_map=[s.device_map for s in specs],
        weights=ensemble_weights(specs),
        k=k,
        sync=sync,
        lookbehind=lookbehind,
        max_pass_tokens=max_pass_tokens,
    )
    for spec, member, template in zip(specs, ensemble.members, templates, strict=True):
        if template is not None:
            member.tokenizer.chat_template = template
        elif spec.chat_template and not member.tokenizer.chat_template:
            raise ValueError(
                f"model {spec.path}: chat_template is true but its tokenizer has no chat template"
            )
    return ensemble
