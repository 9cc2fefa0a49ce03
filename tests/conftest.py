from pathlib import Path

import pytest
from decode_checks import CORPUS
from shared_data import TOKENIZERS_VARIABLE, real_tokenizer_dir
from transformers import PreTrainedTokenizerBase

from unite_ext.toy_tokenizers import train_byte_level_bpe, train_sentencepiece_bpe


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """Folder of real tokenizer files (../shared/tokenizers); tests using it skip without it."""
    folder = real_tokenizer_dir()
    if not folder.is_dir():
        pytest.skip(f"real tokenizer files not found at {folder} (set {TOKENIZERS_VARIABLE} to their folder)")
    return folder


@pytest.fixture(scope="session")
def toy_tokenizers() -> dict[str, PreTrainedTokenizerBase]:
    """Byte-level and SentencePiece-style BPE tokenizers trained here on `CORPUS`."""
    return {
        "toy_byte": train_byte_level_bpe(CORPUS, vocab_size=400),
        "toy_sp": train_sentencepiece_bpe(CORPUS, vocab_size=400),
    }
