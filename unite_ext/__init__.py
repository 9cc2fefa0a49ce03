"""unite_ext: token-level ensembling of LLMs with different tokenizers (UNITE, top-k union)."""

from . import reference
from ._step_inputs import EnsembleStep
from .decode import Ensemble, Generation, StepTrace
from .step import ensemble_step, ensemble_step_across_devices, topk_stats, union_average
from .vocab import VocabTables

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
