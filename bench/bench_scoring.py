"""Memory and time of the lm-eval backend's scoring in one forward pass per batch or in several
(`max_pass_tokens`).

Two tiny random models (the Qwen2-style and Llama-style pair of `bench_decode.py`) score long documents
with `UniteLM.loglikelihood_rolling` (the GSM8K prompt of `unite eval` repeated, a different first word per
document), once per pass budget: "one pass" reads each batch of rows in a single forward pass, as the
backend did before passes, a number is `max_pass_tokens`. A scoring pass holds the logits of all its
positions (tokens x vocabulary, 151936 for the Qwen2 vocabulary) and their log-softmax, which dominate the
memory. "rows/pass" is how many rows the first model's longest batch reads at once, "passes" how many
passes that batch takes; "peak MiB" and "vs one pass" are as in `bench_prefill.py`. The scores must be
the same (they are compared). A second table times multiple-choice requests whose choices share a row
(`multiple_choice`).

    python bench/bench_scoring.py [--device cpu|cuda] [--documents 8] [--copies 2] [--batch-size 8]
                                  [--questions 16] [--budgets 16384 4096 1024] [--repeats 2]
                                  [--hidden-size 256] [--layers 2] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

import torch
from bench_decode import PROMPTS, versus
from bench_prefill import ONE_PASS, add_model_options, measured, tiny_pair
from lm_eval.api.instance import Instance
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unite_ext.decode import Ensemble
from unite_ext.lm_eval import UniteLM


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--copies", type=int, default=2, help="copies of the GSM8K prompt per document")
    parser.add_argument("--batch-size", type=int, default=8, help="UniteLM batch_size")
    parser.add_argument("--questions", type=int, default=16, help="multiple-choice questions")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[16384, 4096, 1024], help="max_pass_tokens values"
    )
    add_model_options(parser, repeats=2)
    args = parser.parse_args()
    description, toks, models = tiny_pair(args)
    # Documents that differ in their first word (their last token is only predicted, not read).
    texts = [f"{n}. {PROMPTS['gsm8k'] * args.copies}" for n in range(args.documents)]
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in texts]
    # Every document is one window of its models' (raised) context length.
    width = max(len(tok(text)["input_ids"]) for tok in toks for text in texts)
    for model in models:
        model.config.max_position_embeddings = width + 1
    budgets = [ONE_PASS, *args.budgets]
    backends = {
        budget: UniteLM(ensemble=Ensemble(models, toks, max_pass_tokens=budget), batch_size=args.batch_size)
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


def multiple_choice(
    args: argparse.Namespace, models: list[PreTrainedModel], toks: list[PreTrainedTokenizerBase]
) -> None:
    """Questions of four one-token choices (" A" to " D") after the GSM8K prompt: "shared" are the
    harness's requests, whose choices read the same tokens and share a row and a generation; "distinct"
    gives each choice's context a different first word, so that each request reads a row and generates
    on its own, as every request did before rows were shared. `loglikelihood` with `is_greedy`."""
    lm = UniteLM(ensemble=Ensemble(models, toks), batch_size=args.batch_size)
    letters = [" A", " B", " C", " D"]
    workloads = {
        name: [
            Instance("loglikelihood", {}, (f"{prefix(letter)}{PROMPTS['gsm8k']} {n}\nAnswer:", letter), 0)
            for n in range(args.questions)
            for letter in letters
        ]
        for name, prefix in (("shared", lambda _: ""), ("distinct", lambda letter: f"({letter.strip()}) "))
    }
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(args.repeats):
        for name, requests in workloads.items():
            run = functools.partial(lm.loglikelihood, requests, disable_tqdm=True)
            seconds, _, _ = measured(run, args.device)
            times[name].append(seconds)
    print(f"\n{args.questions} questions of {len(letters)} one-token choices, is_greedy computed")
    header = f"{'requests':>8} {'rows':>5} | {'s/run':>7} {'vs distinct':>11}"
    print(header, "-" * len(header), sep="\n")
    for name in workloads:
        rows = args.questions * (1 if name == "shared" else len(letters))
        change = versus(times, name, "distinct")
        print(f"{name:>8} {rows:>5} | {statistics.median(times[name]):>7.3f} {change:>11}")


if __name__ == "__main__":
    main()
