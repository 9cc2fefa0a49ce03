"""Memory and time of the lm-eval backend's scoring in one forward pass per batch or in several
(`max_pass_tokens`).

Two tiny random models (the Qwen2-style and Llama-style pair of `bench_decode.py`) score long documents
with `UniteLM.loglikelihood_rolling` (the GSM8K prompt of `unite eval` repeated, a different first word per
document), once per pass budget: "one pass" reads each batch of rows in a single forward pass, as the
backend did before passes, a number is `max_pass_tokens`. A scoring pass holds the logits of all its
positions (tokens x vocabulary, 151936 for the Qwen2 vocabulary), which dominate the memory (their
log-sum-exps are taken `LOGSUMEXP_CHUNK_ELEMENTS` logits at a time). "rows/pass" is how many
rows the first model's longest batch reads at once, "passes" how many passes that batch takes; "peak MiB"
and "vs one pass" are as in `bench_prefill.py`. The scores must be the same (they are compared). A second
table times multiple-choice requests whose choices share a row and whose batches share a few-shot prompt
(`multiple_choice`), a third questions of several few-shot prompts (`subjects`).

    python bench/bench_scoring.py [--device cpu|cuda] [--documents 8] [--copies 2] [--batch-size 8]
                                  [--questions 16] [--subjects 4] [--budgets 16384 4096 1024] [--repeats 2]
                                  [--hidden-size 256] [--layers 2] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
from unittest import mock

import torch
from bench_decode import PROMPTS, versus
from bench_prefill import ONE_PASS, add_model_options, counting_reads, measured, tiny_pair
from lm_eval.api.instance import Instance
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import unite_ext.decode
from unite_ext.decode import PREFIX_GROUP_TOKENS, SHARED_PREFIX_MIN_SAVING, Ensemble
from unite_ext.lm_eval import UniteLM


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--copies", type=int, default=2, help="copies of the GSM8K prompt per document")
    parser.add_argument("--batch-size", type=int, default=8, help="UniteLM batch_size")
    parser.add_argument("--questions", type=int, default=16, help="multiple-choice questions")
    parser.add_argument("--subjects", type=int, default=4, help="few-shot prompts among the questions")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[16384, 4096, 1024], help="max_pass_tokens values"
    )
    add_model_options(parser, repeats=2)
    args = parser.parse_args()
    description, toks, models = tiny_pair(args)
    # Documents that differ in their first word (their last token is only predicted, not read).
    texts = [f"{n}. {PROMPTS['gsm8k'] * args.copies}" for n in range(args.documents)]
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in texts]
    for model in models:
        model.config.max_position_embeddings = 1 << 15  # RoPE reaches past the tiny configs' 1024
    # Every document is one window of the backend's maximum length.
    width = max(len(tok(text)["input_ids"]) for tok in toks for text in texts)
    budgets = [ONE_PASS, *args.budgets]
    backends = {
        budget: UniteLM(
            ensemble=Ensemble(models, toks, max_pass_tokens=budget),
            batch_size=args.batch_size,
            max_length=width + 1,
        )
        for budget in budgets
    }
    backends[ONE_PASS].loglikelihood_rolling(requests[:1], disable_tqdm=True)  # warm-up
    print(
        f"device {args.device}, tokenizers {description}, hidden size {args.hidden_size}, {args.layers} "
        f"layers, {args.documents} documents of up to {width} tokens, batch size {args.batch_size}, torch "
        f"threads {torch.get_num_threads()}, median of {args.repeats} runs"
    )
    header = (
        f"{'budget':>9} {'rows/pass':>9} {'passes':>6} | {'s/run':>7} {'vs one pass':>11} {'peak MiB':>9}"
    )
    print(header, "-" * len(header), sep="\n")
    times: dict[int, list[float]] = {budget: [] for budget in budgets}
    peaks: dict[int, list[int]] = {budget: [] for budget in budgets}
    scores = {}
    for _ in range(args.repeats):
        for budget in budgets:
            run = functools.partial(backends[budget].loglikelihood_rolling, requests, disable_tqdm=True)
            seconds, most, scores[budget] = measured(run, args.device)
            times[budget].append(seconds)
            peaks[budget].append(most)
    for budget in budgets:
        for got, expected in zip(scores[budget], scores[ONE_PASS], strict=True):
            assert math.isclose(got, expected, rel_tol=1e-4), f"passes of {budget} tokens changed a score"
        name = "one pass" if budget == ONE_PASS else str(budget)
        rows = max(1, min(args.batch_size, args.documents, budget // width))  # as UniteLM.score_tokens
        passes = -(-width // budget) if rows == 1 else 1
        print(
            f"{name:>9} {rows:>9} {passes:>6} | {statistics.median(times[budget]):>7.3f} "
            f"{versus(times, budget, ONE_PASS):>11} {statistics.median(peaks[budget]) / 2**20:>9.0f}"
        )
    multiple_choice(args, models, toks)
    subjects(args, models, toks)


# Choices of one token each (as MMLU's) and of several (as ARC's or HellaSwag's).
CHOICES = {
    "one token": [" A", " B", " C", " D"],
    "several": [
        " 71 rolls.",
        " 59 rolls are left.",
        " 97 rolls are sold.",
        " 14 x 12 = 168 rolls, 168 - 97 = 71.",
    ],
}


def multiple_choice(
    args: argparse.Namespace, models: list[PreTrainedModel], toks: list[PreTrainedTokenizerBase]
) -> None:
    """Questions of four choices after the GSM8K prompt (a different last word each): "shared" are the
    harness's requests, which read their context once (one-token choices share its row outright, longer
    ones read their other tokens from copies of its cache) and share the is_greedy generation of their
    context (which ends once its text has decided every choice), and whose batches read the GSM8K prompt,
    their common prefix, once; "no prefix" are the same
    requests with each context read whole (`SHARED_PREFIX_MIN_SAVING` out of reach); "distinct" starts
    each choice's context with a mark of its own ("(A3) "), so that every request reads its whole text
    and generates on its own, as every request did before contexts were shared. "rows" and "tokens" are
    what the first model read."""
    ensemble = Ensemble(models, toks)
    cases = [("one token", False), ("one token", True), ("several", False), ("several", True)]
    print(f"\n{args.questions} questions of 4 choices, batch size {args.batch_size}")
    header = (
        f"{'choices':>9} {'is_greedy':>9} {'requests':>9} | {'rows':>5} {'tokens':>7} {'s/run':>7} "
        f"{'vs distinct':>11}"
    )
    print(header, "-" * len(header), sep="\n")
    for kind, greedy in cases:
        lm = UniteLM(ensemble=ensemble, batch_size=args.batch_size, greedy_check=greedy)
        setups = {  # the mark that starts each choice's context, and SHARED_PREFIX_MIN_SAVING
            "shared": ([""] * 4, SHARED_PREFIX_MIN_SAVING),
            "no prefix": ([""] * 4, ONE_PASS),
            "distinct": (["(A{n}) ", "(B{n}) ", "(C{n}) ", "(D{n}) "], SHARED_PREFIX_MIN_SAVING),
        }
        workloads = {
            name: (
                [
                    Instance(
                        "loglikelihood", {}, (f"{mark.format(n=n)}{PROMPTS['gsm8k']} {n}\nAnswer:", choice), 0
                    )
                    for n in range(args.questions)
                    for mark, choice in zip(marks, CHOICES[kind], strict=True)
                ],
                {"SHARED_PREFIX_MIN_SAVING": saving},
            )
            for name, (marks, saving) in setups.items()
        }
        times, counts = time_workloads(args, lm, workloads)
        for name in workloads:
            print(
                f"{kind:>9} {'yes' if greedy else 'no':>9} {name:>9} | {counts[name]['rows']:>5} "
                f"{counts[name]['tokens']:>7} {statistics.median(times[name]):>7.3f} "
                f"{versus(times, name, 'distinct'):>11}"
            )


def subjects(
    args: argparse.Namespace, models: list[PreTrainedModel], toks: list[PreTrainedTokenizerBase]
) -> None:
    """Questions of `--subjects` few-shot prompts (the GSM8K prompt after a line naming the subject, as
    MMLU's prompts name theirs), of lengths that interleave the subjects when sorted by width, with
    one-token choices: "grouped" batches the contexts of a subject together (their first
    `PREFIX_GROUP_TOKENS` tokens agree), so that a batch reads its prompt once; "by width" sorts them by
    width alone (`PREFIX_GROUP_TOKENS` out of reach), so that a batch mixes subjects."""
    lm = UniteLM(ensemble=Ensemble(models, toks), batch_size=args.batch_size, greedy_check=False)
    requests = [
        Instance(
            "loglikelihood",
            {},
            (
                f"Questions about subject {s}.\n{PROMPTS['gsm8k']}{' And then?' * ((n + s) % 9)}\nAnswer:",
                choice,
            ),
            0,
        )
        for s in range(args.subjects)
        for n in range(args.questions // args.subjects)
        for choice in CHOICES["one token"]
    ]
    workloads = {
        "grouped": (requests, {"PREFIX_GROUP_TOKENS": PREFIX_GROUP_TOKENS}),
        "by width": (requests, {"PREFIX_GROUP_TOKENS": ONE_PASS}),
    }
    times, counts = time_workloads(args, lm, workloads)
    print(f"\n{args.subjects} subjects, {args.questions} questions of 4 one-token choices in all")
    header = f"{'batches':>8} | {'rows':>5} {'tokens':>7} {'s/run':>7} {'vs by width':>11}"
    print(header, "-" * len(header), sep="\n")
    for name in workloads:
        print(
            f"{name:>8} | {counts[name]['rows']:>5} {counts[name]['tokens']:>7} "
            f"{statistics.median(times[name]):>7.3f} {versus(times, name, 'by width'):>11}"
        )


def time_workloads(
    args: argparse.Namespace, lm: UniteLM, workloads: dict[str, tuple[list[Instance], dict[str, int]]]
) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:
    """Times `lm.loglikelihood` on each workload (its requests, with the `unite_ext.decode` constants it
    names set to its values), the workloads in turn, `--repeats` times after a warm-up; returns the times,
    and the rows and tokens the first model read."""
    times: dict[str, list[float]] = {name: [] for name in workloads}
    counts: dict[str, dict[str, int]] = {name: {} for name in workloads}
    for requests, _ in workloads.values():
        lm.loglikelihood(requests[:8], disable_tqdm=True)  # warm-up: the first runs are slower
    for _ in range(args.repeats):
        for name, (requests, constants) in workloads.items():
            run = functools.partial(lm.loglikelihood, requests, disable_tqdm=True)
            with contextlib.ExitStack() as patches:
                for constant, value in constants.items():
                    patches.enter_context(mock.patch.object(unite_ext.decode, constant, value))
                counts[name] = patches.enter_context(counting_reads())
                seconds, _, _ = measured(run, args.device)
            times[name].append(seconds)
    return times, counts


if __name__ == "__main__":
    main()
