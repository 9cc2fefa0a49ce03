from pathlib import Path

import pytest
from shared_data import TOKENIZERS_VARIABLE, real_tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """Folder of real tokenizer files (../shared/tokenizers); tests using it skip without it."""
    folder = real_tokenizer_dir()
    if not folder.is_dir():
        pytest.skip(f"real tokenizer files not found at {folder} (set {TOKENIZERS_VARIABLE} to their folder)")
    return folder
