"""Speed of the decoding loop (`unite_ext.Ensemble`) on two tiny random models at batch size 1.

For 64, 256 and 512 new tokens it prints:

- the ensemble's tokens per second (ensemble steps per second), for sync="exact" and sync="fast";
- the floor: the members' own per-token decode steps (each model decoding greedily on its own with
  its KV cache), run in turn as in the ensemble, since the models share one CPU; the overhead is how
  much longer an ensemble step takes than one step of every member;
- the fed floor: the same, but each model is fed at every step as many tokens as the ensemble fed it
  (counted in a greedy run, roll-backs not replayed; "fed/step" is their sum over the models). A chosen
  token that a model lacks as a whole is fed to it as several of its tokens, and exact sync re-feeds a
  re-encoded tail; the overhead over the fed floor is the loop's own cost;
- the time of `ensemble_step` alone on logits of the same shapes (part of the overhead: it reads every
  logit, so with real vocabularies and tiny models it costs about as much as a model's output layer);
- a loop in the style of the published code: every step calls `generate(max_new_tokens=1)` on each
  model with the published generation settings (logits, scores and hidden states returned); the first
  model keeps its KV cache, the second is given the whole text again (the first model's tokens decoded
  and re-encoded by its tokenizer) and no cache. It uses the same `ensemble_step` for the union and the
  average, so only the loop differs (the published code's own top-k, which copies the whole logits rows
  into Python lists every step, is not counted).

Prompt: by default the GSM8K 4-shot prompt of `unite eval` with one question (the paper's setting, a few
hundred tokens), or --prompt short (one short sentence).

Tokenizers: Qwen2 (151,936 logits) and Llama-2 from ../shared/tokenizers (or $UNITE_EXT_TOKENIZERS) when
present, else (or with --tokenizers trained) two tokenizers trained here (byte-level and SentencePiece BPE,
2000 tokens at most). Timings are medians over --repeats runs; overheads and speed-ups are medians of the
ratios of runs made one after the other.

    python bench/bench_decode.py [--device cpu|cuda] [--new-tokens 64 256 512] [--repeats 3]
                                 [--hidden-size 64] [--layers 2] [--threads N] [--tokenizers real|trained]
                                 [--prompt gsm8k|short] [--second llama|<recurrent model type>]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny model builders

from shared_data import real_tokenizer_dir  # noqa: E402
from tiny_models import RECURRENT_OVERRIDES, tiny_auto_model, tiny_causal_lm  # noqa: E402

from unite_ext.decode import Ensemble  # noqa: E402
from unite_ext.step import ensemble_step  # noqa: E402
from unite_ext.tasks.gsm8k import Gsm8k, question_block  # noqa: E402
from unite_ext.toy_tokenizers import SAMPLE_TEXTS, train_byte_level_bpe, train_sentencepiece_bpe  # noqa: E402
from unite_ext.vocab import VocabTables  # noqa: E402

PROMPTS = {
    "gsm8k": Gsm8k().header()
    + question_block(
        "A baker fills 14 trays with 12 rolls each and sells 97 rolls by noon. How many rolls are left?"
    ),
    "short": "The history of the city begins",
}


def load_tokenizers(kind: str) -> tuple[str, list[PreTrainedTokenizerBase], list[int]]:
    """(description, tokenizers, logits per model) for `kind` "real" (falls back to "trained" when the
    tokenizer files are absent) or "trained"."""
    folder = real_tokenizer_dir()
    if kind == "real" and folder.is_dir():
        from transformers import AutoTokenizer

        toks = [AutoTokenizer.from_pretrained(folder / name) for name in ("qwen2", "llama2")]
        return "qwen2+llama2", toks, [151936, len(toks[1])]
    texts = list(SAMPLE_TEXTS)
    toks = [train_byte_level_bpe(texts, vocab_size=2000), train_sentencepiece_bpe(texts, vocab_size=2000)]
    return "trained byte-level+sentencepiece", toks, [len(t) for t in toks]


def build_models(
    toks: list[PreTrainedTokenizerBase],
    vocab_sizes: list[int],
    hidden_size: int,
    layers: int,
    device: str,
    second: str,
) -> list[PreTrainedModel]:
    """A Qwen2-style model and a `second` one: Llama-style, or a recurrent model type."""

    def attention_model(architecture: str, i: int) -> PreTrainedModel:
        size, eos = vocab_sizes[i], toks[i].eos_token_id
        return tiny_causal_lm(
            architecture, size, seed=i, hidden_size=hidden_size, num_layers=layers, eos_token_id=eos
        )

    if second == "llama":
        other = attention_model("llama", 1)
    else:
        sizes = {
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": layers,
        }
        other = tiny_auto_model(second, toks[1], seed=1, **{**RECURRENT_OVERRIDES[second], **sizes})
    return [attention_model("qwen2", 0).to(device), other.to(device)]


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


def ensemble_decode(ensemble: Ensemble, prompt: str, new_tokens: int) -> int:
    return ensemble.generate([prompt], max_new_tokens=new_tokens, progress=False)[0].num_steps


@torch.inference_mode()
def members_decode(
    ensemble: Ensemble, prompt: str, new_tokens: int, feeds: list[list[int]] | None = None
) -> int:
    """Every model decoding greedily on its own, called as the ensemble calls it (cache, mask, positions)
    and in turn, one token each per step, as in the ensemble; with `feeds` ([step][model], from
    `fed_token_counts`), as many tokens each step as the ensemble fed that model instead.

    In turn rather than one model after the other: timed apart, a small model's weights stay in the
    CPU's last-level cache between its steps, which they cannot do when the models alternate.
    """
    states = []
    for member in ensemble.members:
        prompt_ids = member.tokenizer(prompt)["input_ids"]
        device = member.input_device
        states.append(
            {
                "input_ids": torch.tensor([prompt_ids], device=device),
                "attention_mask": torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
                "position_ids": torch.arange(len(prompt_ids), device=device)[None],
                # A recurrent model builds its own cache, as in the ensemble.
                member.cache_argument: None if member.recurrent else DynamicCache(),
            }
        )
    steps = new_tokens if feeds is None else len(feeds) + 1
    for step in range(steps):
        for i, (member, state) in enumerate(zip(ensemble.members, states, strict=True)):
            output = member.model(**state, use_cache=True, logits_to_keep=1)
            state[member.cache_argument] = getattr(output, member.cache_argument)
            logits = output.logits[:, -1]
            count = 1 if feeds is None or step == steps - 1 else feeds[step][i]
            state["input_ids"] = logits.argmax(-1, keepdim=True).expand(1, count)
            state["attention_mask"] = torch.cat(
                [state["attention_mask"], state["input_ids"].new_ones(1, count)], 1
            )
            state["position_ids"] = (
                state["position_ids"][:, -1:] + 1 + torch.arange(count, device=logits.device)
            )
    return steps


def fed_token_counts(ensemble: Ensemble, prompt: str, new_tokens: int) -> list[list[int]]:
    """How many tokens the ensemble feeds each model after each step of a greedy run ([step][model])."""
    counts: list[list[int]] = [[] for _ in ensemble.members]
    hooks = [
        member.model.register_forward_pre_hook(
            lambda module, args, kwargs, calls=calls: calls.append(kwargs["input_ids"].shape[1]),
            with_kwargs=True,
        )
        for member, calls in zip(ensemble.members, counts, strict=True)
    ]
    try:
        ensemble.generate([prompt], max_new_tokens=new_tokens, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [list(step) for step in zip(*(calls[1:] for calls in counts), strict=True)]  # [1:]: the prompt


def step_only(logits: list[torch.Tensor], tables: VocabTables, steps: int) -> int:
    """`ensemble_step` and the read of its choice, as in the loop, on fixed logits."""
    for _ in range(steps):
        ensemble_step(logits, tables, k=10).next_canon.tolist()
    return steps


# The published code's generation settings, one token per `generate` call.
PUBLISHED_GENERATION = {
    "num_beams": 1,
    "do_sample": False,
    "max_new_tokens": 1,
    "output_hidden_states": True,
    "output_scores": True,
    "output_logits": True,
    "return_dict_in_generate": True,
    "use_cache": True,
}


@torch.inference_mode()
def published_style_decode(ensemble: Ensemble, prompt: str, new_tokens: int) -> int:
    """The published code's loop at batch size 1, with the fused step in place of its Python top-k."""
    first, second = ensemble.members
    device = first.input_device
    tables = ensemble.tables.to(device)
    configs = [GenerationConfig(pad_token_id=m.pad_token_id, **PUBLISHED_GENERATION) for m in (first, second)]
    cache = DynamicCache()  # the first model's; `generate` extends it in place
    ids = torch.tensor([first.tokenizer(prompt)["input_ids"]], device=device)
    for _ in range(new_tokens):
        out_first = first.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=configs[0],
            **{first.cache_argument: cache},
        )
        # The second model sees the whole text again: the first model's tokens decoded, then re-encoded.
        whole = second.tokenizer(first.tokenizer.decode(ids[0]), return_tensors="pt").to(device)
        out_second = second.model.generate(**whole, generation_config=configs[1])
        chosen = ensemble_step([out_first.logits[0], out_second.logits[0]], tables, k=10)
        ids = torch.cat([ids, chosen.next_ids[0].view(1, 1)], 1)
    return new_tokens


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over repeats of the ratio of two runs made one after the other (the machine's speed drifts)."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def versus(times: dict, name: object, base: object) -> str:
    """`ratio` of run `name` to run `base` as "1.234x", blank for the base itself."""
    return "" if name == base else f"{ratio(times, name, base):.3f}x"


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
    parser.add_argument(
        "--second",
        choices=("llama", *sorted(RECURRENT_OVERRIDES)),
        default="llama",
        help="the second model: Llama-style (default) or a recurrent model type, whose rollbacks (exact "
        "sync) read the row's tokens again",
    )
    parser.add_argument(
        "--prompt",
        choices=tuple(PROMPTS),
        default="gsm8k",
        help="gsm8k: the 4-shot GSM8K prompt with one question (default); short: one short sentence",
    )
    args = parser.parse_args()
    prompt = PROMPTS[args.prompt]
    if args.threads:
        torch.set_num_threads(args.threads)

    description, toks, vocab_sizes = load_tokenizers(args.tokenizers)
    models = build_models(toks, vocab_sizes, args.hidden_size, args.layers, args.device, args.second)
    ensembles = {sync: Ensemble(models, toks, sync=sync) for sync in ("exact", "fast")}
    reference = ensembles["exact"]
    for ensemble in ensembles.values():  # warm up (tables on the device, allocator, kernels)
        ensemble.generate([prompt], max_new_tokens=8, progress=False)
    published_style_decode(reference, prompt, 4)
    step_logits = [torch.randn(1, size, device=args.device) for size in vocab_sizes]
    step_tables = reference.tables.to(args.device)
    step_seconds = statistics.median(
        timed(lambda: step_only(step_logits, step_tables, 50), args.device) for _ in range(args.repeats)
    )

    print(
        f"device {args.device}, tokenizers {description}, logits {vocab_sizes}, models qwen2+{args.second}, "
        f"hidden {args.hidden_size}, {args.layers} layers, torch threads {torch.get_num_threads()}"
    )
    prompt_tokens = [len(m.tokenizer(prompt)["input_ids"]) for m in reference.members]
    print(f"prompt {args.prompt}: {prompt_tokens} tokens")
    print(f"batch 1, k=10, median of {args.repeats} runs; ensemble_step alone: {step_seconds * 1e3:.3f} ms")
    header = (
        f"{'new':>5} {'sync':>5} | {'tok/s':>6} {'ms/step':>8} | {'floor ms':>8} {'overhead':>8} | "
        f"{'fed/step':>8} {'fed floor':>9} {'overhead':>8} | {'published tok/s':>15} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for new_tokens in args.new_tokens:
        feeds = {sync: fed_token_counts(e, prompt, new_tokens) for sync, e in ensembles.items()}
        runs: dict[str, Callable[[], int]] = {
            "floor": lambda n=new_tokens: members_decode(reference, prompt, n),
            "published": lambda n=new_tokens: published_style_decode(reference, prompt, n),
        }
        for sync, ensemble in ensembles.items():
            runs[sync] = lambda e=ensemble, n=new_tokens: ensemble_decode(e, prompt, n)
            runs[f"fed {sync}"] = lambda f=feeds[sync], n=new_tokens: members_decode(reference, prompt, n, f)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, args.device))
        median = {name: statistics.median(values) for name, values in times.items()}
        for sync in ("exact", "fast"):
            fed = f"fed {sync}"
            fed_per_step = sum(map(sum, feeds[sync])) / max(1, len(feeds[sync]))
            print(
                f"{new_tokens:>5} {sync:>5} | {1 / median[sync]:>6.1f} {median[sync] * 1e3:>8.3f} | "
                f"{median['floor'] * 1e3:>8.3f} {ratio(times, sync, 'floor') - 1:>+8.1%} | "
                f"{fed_per_step:>8.2f} {median[fed] * 1e3:>9.3f} {ratio(times, sync, fed) - 1:>+8.1%} | "
                f"{1 / median['published']:>15.1f} {ratio(times, 'published', sync):>6.1f}x"
            )


if __name__ == "__main__":
    main()
