"""Defaults shared by the step functions, the decoding loop, model specs, the lm-eval adapter, the demo and
the command line: each written once here."""

from typing import Final

DEFAULT_K: Final = 10  # candidates each model proposes per step, as in the paper
DEFAULT_SYNC: Final = "exact"  # how models follow the text (SPEC.md section 3)
DEFAULT_LOOKBEHIND: Final = 8  # tokens re-encoded with the new bytes under exact sync
# Tokens (rows x positions, padding included) a model reads in one forward pass at most: long prompts
# are read in several passes, which bounds the activations' and attention masks' memory.
DEFAULT_MAX_PASS_TOKENS: Final = 16384
