"""unite_ext: token-level ensembling of LLMs with different tokenizers (UNITE, top-k union)."""

from typing import TYPE_CHECKING, Any

from . import reference
from ._step_inputs import EnsembleStep
from .step import ensemble_step, ensemble_step_across_devices, topk_stats, union_average
from .vocab import VocabTables

if TYPE_CHECKING:
    from .decode import Ensemble, Generation, StepTrace

# The decoding loop imports transformers, which takes seconds: it is imported on first use, so that the
# step alone (and `unite --help`) starts without it.
_DECODE_NAMES = ("Ensemble", "Generation", "StepTrace")


def __getattr__(name: str) -> Any:
    if name in _DECODE_NAMES:
        from . import decode

        return getattr(decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Ensemble",
    "EnsembleStep",
    "Generation",
    "StepTrace",
    "VocabTables",
    "ensemble_step",
    "ensemble_step_across_devices",
    "reference",
    "topk_stats",
    "union_average",
]
