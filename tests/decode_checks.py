"""Shared pieces of the decoding-loop tests: prompts, a corpus to train tokenizers on, a recorder of the
steps, the check of a run's logits against fresh forward passes, and the reference of a continuation's
log-likelihood."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import PreTrainedModel

from unite_ext.decode import Ensemble, StepTrace

PROMPTS = [
    "The capital of France is",
    "Hi",
    " leading space and a\nnewline",
    "Ünïcödé — 東京 and emoji 🙂 in one prompt",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; ensembles must agree on the bytes.",
    'In 1990, James wrote: "hello, world" — and then 42 more lines.\n',
    "Naïve café déjà vu, 東京タワー, emoji 🙂 and tabs\tbetween words.",
    "def main():\n    return sum(x * x for x in range(10))\n",
] * 4


class Recorder:
    """Collects, per row and model, the continuation tokens the model holds before every step."""

    def __init__(self, keep_logits: bool = False):
        self.continuations: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
        self.traces: list[StepTrace] = []
        self.keep_logits = keep_logits

    def __call__(self, trace: StepTrace) -> None:
        for i, (tokens, lengths) in enumerate(zip(trace.tokens, trace.prompt_lengths, strict=True)):
            for b, row in enumerate(trace.rows):
                self.continuations[row, i].append(tokens[b][lengths[b] :])
        if self.keep_logits:
            self.traces.append(trace)


def common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def steps_with_slots_between_tokens(
    recorder: Recorder, models: list[PreTrainedModel], device: str, atol: float = 2e-4
) -> int:
    """Checks every row's logits at every recorded step against a fresh pass over the row's tokens, and
    counts the steps where rows of a batch fed or rolled back different numbers of tokens (which leaves
    masked cache slots between a row's tokens)."""
    uneven = 0
    for trace in recorder.traces:
        for i, model in enumerate(models):
            fed, dropped = set(), set()
            for b, row in enumerate(trace.rows):
                with torch.no_grad():
                    fresh = model(torch.tensor([trace.tokens[i][b]], device=device)).logits[0, -1]
                torch.testing.assert_close(trace.logits[i][b], fresh, atol=atol, rtol=1e-4)
                step = trace.steps[b]
                continuation = recorder.continuations[row, i][step]
                previous = recorder.continuations[row, i][step - 1] if step else []
                kept = len(common_prefix(previous, continuation))
                fed.add(len(continuation) - kept)
                dropped.add(len(previous) - kept)
            uneven += min(trace.steps) > 0 and (len(fed) > 1 or len(dropped) > 1)
    return uneven


def reference_loglikelihood(
    model: PreTrainedModel, context_ids: list[int], continuation_ids: list[int]
) -> float:
    """log p(continuation | context), one unpadded sequence, float64 log-softmax, position by position."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    total = 0.0
    for j, token in enumerate(continuation_ids):
        position = len(context_ids) + j - 1  # the logits that predict this token
        total += float(torch.log_softmax(logits[position], dim=-1)[token])
    return total


def reference_value(ensemble: Ensemble, context: str, continuation: str) -> float:
    """The lm-eval backend's log-likelihood of `continuation` after `context`, from float64 passes over each
    model's own unpadded tokens (the context as a prompt, the continuation as mid-text)."""
    from unite_ext.lm_eval import combine_loglikelihoods  # needs lm_eval, as its callers do

    scores = [
        reference_loglikelihood(
            member.model,
            member.tokenizer(context)["input_ids"],
            ensemble.tables.encode_mid_text(i, continuation.encode()),
        )
        for i, member in enumerate(ensemble.members)
    ]
    return combine_loglikelihoods(scores, ensemble.weights)
