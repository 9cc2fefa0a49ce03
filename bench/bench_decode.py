"""Speed of the decoding loop (`unite_ext.Ensemble`) on two tiny random models at batch size 1.

For 64, 256 and 512 new tokens it prints:

- the ensemble's tokens per second (ensemble steps per second), for sync="exact" and sync="fast";
- the floor: the members' own per-token decode steps (each model decoding greedily on its own with
  its KV cache), run in turn as in the ensemble, since the models share one CPU; the overhead is how
  much longer an ensemble step takes than one step of every member;
- the time of `ensemble_step` alone on logits of the same shapes (part of the overhead: it reads every
  logit, so with real vocabularies and tiny models it costs about as much as a model's output layer);
- a loop in the style of the published code: the first model keeps its cache, the second re-encodes
  the whole text every step and runs without a cache; it uses the same `ensemble_step`, so only the
  loop differs.

Tokenizers: Qwen2 (151,936 logits) and Llama-2 from ../shared/tokenizers when present, else (or with
--tokenizers trained) two tokenizers trained here (byte-level and SentencePiece BPE, 2000 tokens at
most). Timings are medians over --repeats runs.

    python bench/bench_decode.py [--device cpu|cuda] [--new-tokens 64 256 512] [--repeats 3]
                                 [--hidden-size 64] [--layers 2] [--threads N] [--tokenizers real|trained]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny model builders

from tiny_models import tiny_causal_lm  # noqa: E402

from unite_ext.decode import Ensemble  # noqa: E402
from unite_ext.step import ensemble_step  # noqa: E402
from unite_ext.toy_tokenizers import SAMPLE_TEXTS, train_byte_level_bpe, train_sentencepiece_bpe  # noqa: E402
from unite_ext.vocab import VocabTables  # noqa: E402

SHARED_TOKENIZERS = REPO.parent / "shared" / "tokenizers"
PROMPT = "The history of the city begins"


def load_tokenizers(kind: str) -> tuple[str, list[PreTrainedTokenizerBase], list[int]]:
    """(description, tokenizers, logits per model) for `kind` "real" (falls back to "trained" when the
    tokenizer files are absent) or "trained"."""
    if kind == "real" and SHARED_TOKENIZERS.is_dir():
        from transformers import AutoTokenizer

        toks = [AutoTokenizer.from_pretrained(SHARED_TOKENIZERS / name) for name in ("qwen2", "llama2")]
        return "qwen2+llama2", toks, [151936, len(toks[1])]
    texts = list(SAMPLE_TEXTS)
    toks = [train_byte_level_bpe(texts, vocab_size=2000), train_sentencepiece_bpe(texts, vocab_size=2000)]
    return "trained byte-level+sentencepiece", toks, [len(t) for t in toks]


def build_models(
    toks: list[PreTrainedTokenizerBase], vocab_sizes: list[int], hidden_size: int, layers: int, device: str
) -> list[PreTrainedModel]:
    architectures = ("qwen2", "llama")
    return [
        tiny_causal_lm(
            arch, size, seed=i, hidden_size=hidden_size, num_layers=layers, eos_token_id=tok.eos_token_id
        ).to(device)
        for i, (arch, size, tok) in enumerate(zip(architectures, vocab_sizes, toks, strict=True))
    ]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], int], device: str) -> float:
    """Seconds per step of `fn`, which returns its number of steps."""
    synchronize(device)
    start = time.perf_counter()
    steps = fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def ensemble_decode(ensemble: Ensemble, new_tokens: int) -> int:
    return ensemble.generate([PROMPT], max_new_tokens=new_tokens, progress=False)[0].num_steps


@torch.inference_mode()
def members_decode(ensemble: Ensemble, new_tokens: int) -> int:
    """Every model decoding greedily on its own, called as the ensemble calls it (cache, mask, positions)
    and in turn, one token each per step, as in the ensemble.

    In turn rather than one model after the other: timed apart, a small model's weights stay in the
    CPU's last-level cache between its steps, which they cannot do when the models alternate.
    """
    states = []
    for member in ensemble.members:
        prompt_ids = member.tokenizer(PROMPT)["input_ids"]
        device = member.input_device
        states.append(
            {
                "input_ids": torch.tensor([prompt_ids], device=device),
                "attention_mask": torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
                "position_ids": torch.arange(len(prompt_ids), device=device)[None],
                member.cache_argument: DynamicCache(),
            }
        )
    for _ in range(new_tokens):
        for member, state in zip(ensemble.members, states, strict=True):
            logits = member.model(**state, use_cache=True, logits_to_keep=1).logits[:, -1]
            state["input_ids"] = logits.argmax(-1, keepdim=True)
            state["attention_mask"] = torch.cat([state["attention_mask"], state["attention_mask"][:, :1]], 1)
            state["position_ids"] = state["position_ids"][:, -1:] + 1
    return new_tokens


def step_only(logits: list[torch.Tensor], tables: VocabTables, steps: int) -> int:
    """`ensemble_step` and the read of its choice, as in the loop, on fixed logits."""
    for _ in range(steps):
        ensemble_step(logits, tables, k=10).next_canon.tolist()
    return steps


@torch.inference_mode()
def published_style_decode(ensemble: Ensemble, new_tokens: int) -> int:
    """First model with a KV cache; the second re-encodes prompt + text and runs without a cache."""
    first, second = ensemble.members
    device = first.input_device
    tables = ensemble.tables.to(device)
    cache = DynamicCache()
    ids = torch.tensor([first.tokenizer(PROMPT)["input_ids"]], device=device)
    generated = b""
    for _ in range(new_tokens):
        logits_first = first.model(
            input_ids=ids, use_cache=True, logits_to_keep=1, **{first.cache_argument: cache}
        ).logits[:, -1]
        text = PROMPT + generated.decode("utf-8", errors="replace")
        whole = torch.tensor([second.tokenizer(text)["input_ids"]], device=device)
        logits_second = second.model(input_ids=whole, use_cache=False, logits_to_keep=1).logits[:, -1]
        chosen = ensemble_step([logits_first, logits_second], tables, k=10)
        generated += tables.canonical_bytes(int(chosen.next_canon.item()))
        ids = chosen.next_ids[0].view(1, 1)
    return new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="device of the models and the step (default cpu)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size of the models (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the models (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--tokenizers",
        choices=("real", "trained"),
        default="real",
        help="real: Qwen2 + Llama-2 from ../shared/tokenizers (default; trained when absent); "
        "trained: two small tokenizers trained here",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    description, toks, vocab_sizes = load_tokenizers(args.tokenizers)
    models = build_models(toks, vocab_sizes, args.hidden_size, args.layers, args.device)
    ensembles = {sync: Ensemble(models, toks, sync=sync) for sync in ("exact", "fast")}
    reference = ensembles["exact"]
    for ensemble in ensembles.values():  # warm up (tables on the device, allocator, kernels)
        ensemble.generate([PROMPT], max_new_tokens=8, progress=False)
    published_style_decode(reference, 4)
    step_logits = [torch.randn(1, size, device=args.device) for size in vocab_sizes]
    step_tables = reference.tables.to(args.device)
    step_seconds = statistics.median(
        timed(lambda: step_only(step_logits, step_tables, 50), args.device) for _ in range(args.repeats)
    )

    print(
        f"device {args.device}, tokenizers {description}, logits {vocab_sizes}, "
        f"hidden {args.hidden_size}, {args.layers} layers, torch threads {torch.get_num_threads()}"
    )
    print(f"batch 1, k=10, median of {args.repeats} runs; ensemble_step alone: {step_seconds * 1e3:.3f} ms")
    header = (
        f"{'new':>5} {'sync':>5} | {'ensemble tok/s':>14} {'ms/step':>8} | {'floor ms':>8} {'overhead':>8} "
        f"{'w/o step':>8} | {'published tok/s':>15} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for new_tokens in args.new_tokens:
        times: dict[str, list[float]] = {"exact": [], "fast": [], "floor": [], "published": []}
        for _ in range(args.repeats):
            for sync, ensemble in ensembles.items():
                times[sync].append(timed(lambda e=ensemble, n=new_tokens: ensemble_decode(e, n), args.device))
            times["floor"].append(timed(lambda n=new_tokens: members_decode(reference, n), args.device))
            times["published"].append(
                timed(lambda n=new_tokens: published_style_decode(reference, n), args.device)
            )
        median = {name: statistics.median(values) for name, values in times.items()}
        for sync in ("exact", "fast"):
            overhead = median[sync] / median["floor"] - 1
            loop_overhead = (median[sync] - step_seconds) / median["floor"] - 1
            print(
                f"{new_tokens:>5} {sync:>5} | {1 / median[sync]:>14.1f} {median[sync] * 1e3:>8.3f} | "
                f"{median['floor'] * 1e3:>8.3f} {overhead:>+8.1%} {loop_overhead:>+8.1%} | "
                f"{1 / median['published']:>15.1f} {median['published'] / median[sync]:>6.1f}x"
            )


if __name__ == "__main__":
    main()
