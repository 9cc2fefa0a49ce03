"""Defaults shared by the step functions, the decoding loop, model specs, the lm-eval adapter, the demo and
the command line: each written once here."""

from typing import Final

DEFAULT_K: Final = 10  # candidates each model proposes per step, as in the paper
DEFAULT_SYNC: Final = "exact"  # how models follow the text (SPEC.md section 3)
DEFAULT_LOOKBEHIND: Final = 8  # tokens re-encoded with the new bytes under exact sync
