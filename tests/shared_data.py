"""Where the real LLM tokenizer files are: ``$UNITE_EXT_TOKENIZERS`` if set, else ``../shared/tokenizers``
beside the repository. The variable lets a copy travel with the repository to a machine that has no
``../shared`` (``bench/gpu_check.sh``)."""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZERS_VARIABLE = "UNITE_EXT_TOKENIZERS"


def real_tokenizer_dir() -> Path:
    folder = os.environ.get(TOKENIZERS_VARIABLE)
    return Path(folder).resolve() if folder else Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
