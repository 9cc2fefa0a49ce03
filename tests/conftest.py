from pathlib import Path

import pytest

SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """Folder of real tokenizer files (../shared/tokenizers); tests using it skip without it."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"real tokenizer files not found at {SHARED_TOKENIZERS}")
    return SHARED_TOKENIZERS
