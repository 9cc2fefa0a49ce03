"""``unite demo``: two tiny language models with different tokenizers, each knowing part of a made-up world,
answer questions about it alone and as a UNITE ensemble.

The world is a list of made-up creatures, each with a home, a food and a friend ("The zorblat lives in
Quendor."). Model A reads about the first 60% of the creatures, model B about the last 60%, so the middle
fifth is known to both and every other creature to one of them. Each model has its own tokenizer, trained
here on what it reads: a byte-level BPE for A, a SentencePiece-style BPE with byte fallback for B, of
different sizes, so the answers are split into different tokens. Both are small Llama-style models trained
from scratch on the questions and answers they read ("Q: Where does the zorblat live? A: Quendor.").

A model that never read about a creature can only guess its answers. Trained with label smoothing, it is
seldom as sure of a guess as the model that read the fact is of the answer, so the averaged distribution
mostly follows the model that knows. Because the other model's choices can end a token in the middle of a
word, each model also learns to go on from such boundaries (``DemoSettings.resegment_probability``).

The demo asks every question to A alone, B alone and the ensemble (greedy decoding; a single model goes
through the same `Ensemble` code with one member) and scores exact match of the generated text, up to the
end token or a newline, against the answer. It also replays the logits recorded while decoding through the
compiled ensemble step and the pure-PyTorch reference, to time both on the same inputs.

The first run trains the tokenizers and models and caches them with the world in
``$UNITE_EXT_CACHE/demo`` (default ``~/.cache/unite_ext/demo``), in a folder named by a hash of
`DemoSettings`; a rerun with the same settings loads them and only evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from . import reference
from ._step_inputs import MAX_K, check_int
from .benchmark import median_seconds
from .cli import add_step_options
from .decode import Ensemble, StepTrace
from .defaults import DEFAULT_K, DEFAULT_SYNC
from .step import ensemble_step
from .tasks.evaluation import format_table
from .toy_tokenizers import train_byte_level_bpe, train_sentencepiece_bpe
from .vocab import VocabTables, default_cache_dir

CACHE_FORMAT = 1  # bump when the cached files or how they are made change
MIN_ENTITIES = 5  # so that each group (A only, both, B only) holds at least one creature
STOP = "\n"
EVAL_BATCH_SIZE = 64  # questions decoded together
# Training always uses this many CPU threads, so that a seed's models do not depend on the number of cores.
TRAINING_THREADS = 2


# ---------------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Relation:
    """One kind of fact: its question and statement templates, and whether its values are names."""

    name: str
    question: str  # with {entity}
    statement: str  # with {entity} and {value}
    capitalised: bool


RELATIONS = (
    Relation("home", "Where does the {entity} live?", "The {entity} lives in {value}.", True),
    Relation("food", "What does the {entity} eat?", "The {entity} eats {value}.", False),
    Relation("friend", "Who is the friend of the {entity}?", "The friend of the {entity} is {value}.", True),
)
_RELATIONS_BY_NAME = {relation.name: relation for relation in RELATIONS}

# Made-up words are syllables of an onset, a vowel and a coda.
_ONSETS = ("z", "qu", "bl", "gr", "m", "t", "v", "sn", "fl", "dr", "k", "p", "l", "th", "s", "br")
_VOWELS = ("a", "e", "i", "o", "u", "or", "ee", "ai", "ou", "y")
_CODAS = ("", "n", "r", "l", "t", "m", "x", "sh", "k", "nd")
SYLLABLES_PER_WORD = 2


@dataclass(frozen=True)
class Fact:
    """One fact of the world and which models read it ("A", "B" or "AB")."""

    entity: str
    relation: str
    value: str
    known_by: str

    @property
    def prompt(self) -> str:
        question = _RELATIONS_BY_NAME[self.relation].question.format(entity=self.entity)
        return f"Q: {question} A:"

    @property
    def answer(self) -> str:
        """The text that should follow the prompt (before the end token)."""
        return f" {self.value}."

    @property
    def statement(self) -> str:
        return _RELATIONS_BY_NAME[self.relation].statement.format(entity=self.entity, value=self.value)


GROUPS = {"A only": "A", "both": "AB", "B only": "B"}  # column title -> Fact.known_by


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the world, the tokenizers and the trained models (the cache key).

    Defaults: seed 0; 300 facts (100 creatures with 3 facts each); 12 values per relation; each model
    reads 60% of the creatures; 800 AdamW steps of 32 questions, learning rate 3e-3 (warm-up then cosine
    decay), weight decay 0.1, label smoothing 0.1; 10% of the answer tokens split at a random byte while
    training (``resegment_probability``); Llama-style models with hidden size 64 and 2 layers; at most
    384 tokens for A's byte-level BPE and 420 for B's SentencePiece-style BPE (256 and 259 of them are the
    byte and special tokens).
    """

    seed: int = 0
    num_facts: int = 300
    values_per_relation: int = 12
    known_fraction: float = 0.6
    train_steps: int = 800
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    label_smoothing: float = 0.1
    resegment_probability: float = 0.1
    hidden_size: int = 64
    num_layers: int = 2
    vocab_size_a: int = 384
    vocab_size_b: int = 420

    def __post_init__(self) -> None:
        min_facts = MIN_ENTITIES * len(RELATIONS)
        if self.num_facts < min_facts:
            raise ValueError(f"num_facts must be at least {min_facts}, got {self.num_facts}")
        if not 2 <= self.values_per_relation <= 200:
            raise ValueError(f"values_per_relation must be in 2..200, got {self.values_per_relation}")
        if not 0.5 < self.known_fraction < 1:
            raise ValueError(
                f"known_fraction must be in (0.5, 1) so that each model knows creatures the other does "
                f"not and some both know, got {self.known_fraction}"
            )
        for name in ("train_steps", "batch_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.resegment_probability < 1:
            raise ValueError(f"resegment_probability must be in [0, 1), got {self.resegment_probability}")

    def cache_key(self) -> str:
        text = json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _made_up_words(rng: random.Random, count: int, capitalised: bool, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(SYLLABLES_PER_WORD)
        )
        if word not in taken:  # names are compared without case: no creature is also a value
            taken.add(word)
            words.append(word.capitalize() if capitalised else word)
    return words


def build_world(settings: DemoSettings) -> list[Fact]:
    """The facts, creature by creature: every relation of each creature, up to ``num_facts`` facts.

    Model A knows the first ``known_fraction`` of the creatures, model B the last ``known_fraction``.
    """
    rng = random.Random(settings.seed)
    taken: set[str] = set()
    values = {
        r.name: _made_up_words(rng, settings.values_per_relation, r.capitalised, taken) for r in RELATIONS
    }
    num_entities = math.ceil(settings.num_facts / len(RELATIONS))
    entities = _made_up_words(rng, num_entities, False, taken)
    known_count = math.ceil(settings.known_fraction * num_entities)
    facts: list[Fact] = []
    for index, entity in enumerate(entities):
        known_by = ("A" if index < known_count else "") + ("B" if index >= num_entities - known_count else "")
        for relation in RELATIONS:
            facts.append(Fact(entity, relation.name, rng.choice(values[relation.name]), known_by))
    return facts[: settings.num_facts]


# ------------------------------------------------------------------------------------------------ training


@dataclass
class DemoModel:
    """One trained member: its name, tokenizer and model."""

    name: str
    tokenizer: PreTrainedTokenizerFast
    model: LlamaForCausalLM


def _training_texts(facts: Sequence[Fact]) -> list[str]:
    return [fact.prompt + fact.answer for fact in facts]


def _new_model(tokenizer: PreTrainedTokenizerFast, settings: DemoSettings) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=4 * settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


class _Examples:
    """Token ids of a model's training questions and answers, as the decoding loop will see them.

    The prompt is encoded by the tokenizer (with its BOS rule); the answer is the tokenizer's mid-text
    encoding of its bytes followed by the end token, which is what ``Ensemble(sync="exact")`` feeds back.
    With ``resegment_probability`` some answer tokens are split at a random byte and both parts encoded on
    their own (a deterministic form of BPE dropout), so that the model also knows how to go on from the
    token boundaries that the other model's choices can put in the middle of a word.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, facts: Sequence[Fact], resegment: float):
        self.tables = VocabTables.from_tokenizers([tokenizer])
        self.to_canon = self.tables.to_canon[0].tolist()
        self.eos = int(tokenizer.eos_token_id)
        self.pad = self.eos
        self.resegment = resegment
        self.prompts = [tokenizer(fact.prompt)["input_ids"] for fact in facts]
        self.answers = [self.tables.encode_mid_text(0, fact.answer.encode("utf-8")) for fact in facts]

    def _resegmented(self, answer: list[int], rng: random.Random) -> list[int]:
        ids: list[int] = []
        for token in answer:
            data = self.tables.canonical_bytes(self.to_canon[token])
            if len(data) > 1 and rng.random() < self.resegment:
                cut = rng.randrange(1, len(data))
                ids += self.tables.encode_mid_text(0, data[:cut]) + self.tables.encode_mid_text(0, data[cut:])
            else:
                ids.append(token)
        return ids

    def batch(self, rows: Sequence[int], rng: random.Random) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, labels)``, right-padded; labels are -100 except on the answer."""
        sequences = []
        for row in rows:
            answer = self._resegmented(self.answers[row], rng) + [self.eos]
            sequences.append((self.prompts[row], answer))
        length = max(len(p) + len(a) for p, a in sequences)
        input_ids = torch.full((len(rows), length), self.pad)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100)
        for i, (prompt, answer) in enumerate(sequences):
            end = len(prompt) + len(answer)
            input_ids[i, :end] = torch.tensor(prompt + answer)
            mask[i, :end] = 1
            labels[i, len(prompt) : end] = torch.tensor(answer)
        return input_ids, mask, labels


def train_model(
    name: str,
    tokenizer: PreTrainedTokenizerFast,
    facts: Sequence[Fact],
    settings: DemoSettings,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> DemoModel:
    """Train a new model on the questions and answers of ``facts`` (AdamW, warm-up then cosine decay)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = _new_model(tokenizer, settings).to(device)
    examples = _Examples(tokenizer, facts, settings.resegment_probability)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    warmup = max(1, settings.train_steps // 10)

    def learning_rate_factor(step: int) -> float:
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * step / settings.train_steps))
        return min(1.0, (step + 1) / warmup) * decay

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    model.train()
    bar = tqdm(range(settings.train_steps), desc=f"train {name}", unit="step", disable=not progress)
    for _ in bar:
        rows = [rng.randrange(len(facts)) for _ in range(settings.batch_size)]
        input_ids, mask, labels = (t.to(device) for t in examples.batch(rows, rng))
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=settings.label_smoothing,
        )
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return DemoModel(name, tokenizer, model.eval())


def default_cache_root() -> Path:
    """Folder of the demo's cached worlds and models: ``demo`` next to the vocabulary-table cache
    (``$UNITE_EXT_CACHE/demo``, else ``$XDG_CACHE_HOME/unite_ext/demo``, ``~/.cache/unite_ext/demo``)."""
    return default_cache_dir().parent / "demo"


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """Hide transformers' progress bars (one per file of a few hundred kilobytes when saving or loading)."""
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def _save(folder: Path, facts: Sequence[Fact], models: Sequence[DemoModel], settings: DemoSettings) -> None:
    """Write everything to a new folder beside ``folder``, then rename it: a cache folder is complete."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    world = {"settings": asdict(settings), "facts": [asdict(fact) for fact in facts]}
    (partial / "world.json").write_text(json.dumps(world, indent=1), encoding="utf-8")
    with _without_transformers_bars():
        for member in models:
            member.model.save_pretrained(partial / member.name)
            member.tokenizer.save_pretrained(partial / member.name)
    try:
        partial.rename(folder)
    except OSError:  # another run finished the same folder first
        shutil.rmtree(partial, ignore_errors=True)


def _load(folder: Path, device: torch.device) -> tuple[list[Fact], list[DemoModel]]:
    world = json.loads((folder / "world.json").read_text(encoding="utf-8"))
    facts = [Fact(**fact) for fact in world["facts"]]
    with _without_transformers_bars():
        models = [
            DemoModel(
                name,
                PreTrainedTokenizerFast.from_pretrained(folder / name),
                LlamaForCausalLM.from_pretrained(folder / name).to(device).eval(),
            )
            for name in ("A", "B")
        ]
    return facts, models


def prepare(
    settings: DemoSettings, device: torch.device, cache_root: Path | None = None, progress: bool = True
) -> tuple[list[Fact], list[DemoModel], Path, bool]:
    """The world and the two models, loaded from the cache or made (and cached).

    Returns ``(facts, [model A, model B], cache folder, whether they were trained now)``.
    """
    folder = (cache_root if cache_root is not None else default_cache_root()) / settings.cache_key()
    if (folder / "world.json").is_file():
        return *_load(folder, device), folder, False
    facts = build_world(settings)
    known = {name: [fact for fact in facts if name in fact.known_by] for name in ("A", "B")}
    tokenizers = {
        "A": train_byte_level_bpe(_training_texts(known["A"]), settings.vocab_size_a),
        "B": train_sentencepiece_bpe(_training_texts(known["B"]), settings.vocab_size_b),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        models = [
            train_model(
                name, tokenizers[name], known[name], settings, settings.seed * 2 + i, device, progress
            )
            for i, name in enumerate(("A", "B"))
        ]
    finally:
        torch.set_num_threads(threads)
    _save(folder, facts, models, settings)
    return facts, models, folder, True


# ---------------------------------------------------------------------------------------------- evaluation


def is_exact_match(generated: str, answer: str) -> bool:
    """Whether the generated text (already cut at the end token or the stop string) is the answer,
    ignoring surrounding whitespace; an empty answer never matches."""
    expected = answer.strip()
    return bool(expected) and generated.strip() == expected


@dataclass(frozen=True)
class SystemResult:
    """How one system (a single model or the ensemble) did on every question."""

    name: str
    texts: list[str]  # generated answer per fact, in the world's order
    correct: list[bool]
    accuracy: float
    group_accuracy: dict[str, float]  # GROUPS title -> accuracy on those facts
    mean_union_size: float  # candidates per ensemble step (k for a single model)
    generated_tokens: int
    tokens_per_second: float  # generated tokens (ensemble steps) per second of decoding
    fused_step_seconds: float  # compiled ensemble step, per decoding step, on the recorded logits
    reference_step_seconds: float  # pure-PyTorch reference on the same logits
    same_choice: float  # fraction of rows where both steps chose the same token


def _replay_steps(
    logits: list[list[Tensor]], tables: VocabTables, k: int, device: torch.device, repeats: int = 3
) -> tuple[float, float, float, float]:
    """Mean union size, seconds per step of the fused op and of the reference, and their agreement."""
    fused = [ensemble_step(step, tables, k=k) for step in logits]
    expected = [reference.ensemble_step(step, tables, k=k) for step in logits]
    union_sizes = torch.cat([(out.union_ids >= 0).sum(1) for out in fused]).float()
    same = torch.cat([a.next_canon == b.next_canon for a, b in zip(fused, expected, strict=True)]).float()

    def run_all(step_fn: Callable[..., object]) -> Callable[[], None]:
        def run() -> None:
            for step in logits:
                step_fn(step, tables, k=k)

        return run

    fused_s = median_seconds(run_all(ensemble_step), device, repeats, warmup=1) / len(logits)
    reference_s = median_seconds(run_all(reference.ensemble_step), device, repeats, warmup=1) / len(logits)
    return union_sizes.mean().item(), fused_s, reference_s, same.mean().item()


def evaluate_system(
    name: str,
    members: Sequence[DemoModel],
    facts: Sequence[Fact],
    k: int,
    sync: str,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = True,
) -> SystemResult:
    """Ask every question to ``members`` (one model, or several as a UNITE ensemble), greedy decoding."""
    ensemble = Ensemble([m.model for m in members], [m.tokenizer for m in members], k=k, sync=sync)
    recorded: list[list[Tensor]] = []

    def record(trace: StepTrace) -> None:
        recorded.append(list(trace.logits))

    # Each step adds at least one byte: the longest answer and the end token always fit.
    max_new_tokens = max(len(fact.answer.encode("utf-8")) for fact in facts) + 1
    start = time.perf_counter()
    generations = ensemble.generate(
        [fact.prompt for fact in facts],
        max_new_tokens=max_new_tokens,
        stop=STOP,
        batch_size=batch_size,
        on_step=record,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    correct = [is_exact_match(g.text, fact.answer) for g, fact in zip(generations, facts, strict=True)]
    group_accuracy = {}
    for title, known_by in GROUPS.items():
        in_group = [ok for ok, fact in zip(correct, facts, strict=True) if fact.known_by == known_by]
        group_accuracy[title] = sum(in_group) / len(in_group) if in_group else float("nan")
    device = recorded[0][0].device
    union_size, fused_s, reference_s, same = _replay_steps(recorded, ensemble.tables.to(device), k, device)
    tokens = sum(g.num_steps for g in generations)
    return SystemResult(
        name=name,
        texts=[g.text for g in generations],
        correct=correct,
        accuracy=sum(correct) / len(correct),
        group_accuracy=group_accuracy,
        mean_union_size=union_size,
        generated_tokens=tokens,
        tokens_per_second=tokens / seconds,
        fused_step_seconds=fused_s,
        reference_step_seconds=reference_s,
        same_choice=same,
    )


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` measured."""

    settings: DemoSettings
    facts: list[Fact]
    systems: list[SystemResult]  # model A, model B, the ensemble
    cache_folder: Path
    trained: bool  # False when the models came from the cache
    k: int
    sync: str
    device: str


def _resolve_device(device: str | torch.device | None) -> torch.device:
    resolved = torch.device(device if device is not None else "cpu")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(resolved)!r} was asked for but CUDA is not available")
    return resolved


def run_demo(
    settings: DemoSettings | None = None,
    k: int = DEFAULT_K,
    sync: str = DEFAULT_SYNC,
    device: str | torch.device | None = None,
    cache_root: Path | None = None,
    progress: bool = True,
) -> DemoResult:
    """Train (or load from the cache) the two models and evaluate A, B and their UNITE ensemble.

    Args:
        settings: world, tokenizers and training (default ``DemoSettings()``).
        k: candidates each model proposes per ensemble step (default 10).
        sync: how the models follow the generated text, "exact" (default) or "fast".
        device: where the models train and run (default "cpu").
        cache_root: folder of cached worlds and models (default `default_cache_root()`).
        progress: show progress bars (default True).
    """
    settings = settings if settings is not None else DemoSettings()
    # Checked here as well as by `Ensemble`, so that a bad option does not cost a training run first.
    check_int("k", k, 1, MAX_K)
    if sync not in ("exact", "fast"):
        raise ValueError(f'sync must be "exact" or "fast", got {sync!r}')
    resolved = _resolve_device(device)
    facts, models, folder, trained = prepare(settings, resolved, cache_root, progress)
    model_a, model_b = models
    systems = [
        evaluate_system(name, members, facts, k, sync, progress=progress)
        for name, members in (
            (f"A: byte-level BPE, {len(model_a.tokenizer)} tokens", [model_a]),
            (f"B: SentencePiece BPE, {len(model_b.tokenizer)} tokens", [model_b]),
            (f"UNITE ensemble of A and B (k={k}, sync={sync})", models),
        )
    ]
    return DemoResult(settings, facts, systems, folder, trained, k, sync, str(resolved))


def format_report(result: DemoResult) -> str:
    """The table printed by ``unite demo``, with a line on the world and one on the step timing."""
    facts = result.facts
    counts = {title: sum(f.known_by == known_by for f in facts) for title, known_by in GROUPS.items()}
    header = [
        "system",
        "accuracy",
        *[f"{title} ({count})" for title, count in counts.items()],
        "mean union",
        "tokens/s",
        "fused step (µs)",
        "reference step (µs)",
        "reference / fused",
    ]
    rows = [
        [
            s.name,
            f"{100 * s.accuracy:.1f}%",
            *[f"{100 * s.group_accuracy[title]:.1f}%" for title in counts],
            f"{s.mean_union_size:.1f}",
            f"{s.tokens_per_second:,.0f}",
            f"{1e6 * s.fused_step_seconds:,.1f}",
            f"{1e6 * s.reference_step_seconds:,.1f}",
            f"{s.reference_step_seconds / s.fused_step_seconds:.1f}x",
        ]
        for s in result.systems
    ]
    best_single = max(s.accuracy for s in result.systems[:-1])
    ensemble = result.systems[-1]
    lines = [
        f"World: {len(facts)} facts about {len({f.entity for f in facts})} creatures (e.g. "
        f'"{facts[0].statement}"); A read {counts["A only"] + counts["both"]} of them, '
        f"B read {counts['B only'] + counts['both']}, both read {counts['both']}.",
        f"Models {'trained now and cached in' if result.trained else 'loaded from'} {result.cache_folder}; "
        f"device {result.device}; {len(facts)} questions, greedy decoding, exact match.",
        "",
        format_table(header, rows),
        "",
        f"Ensemble - best single model: {100 * (ensemble.accuracy - best_single):+.1f} points.",
        f"Step times: one ensemble step over a batch of up to {EVAL_BATCH_SIZE} questions, compiled op and "
        "pure-PyTorch reference replayed on the logits recorded while decoding; they chose the same token "
        f"in {100 * ensemble.same_choice:.2f}% of the ensemble's rows.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="unite demo",
        description="Train two tiny models with different tokenizers on parts of a made-up world (first "
        "run only; cached), then compare each alone with their UNITE ensemble.",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    parser.add_argument(
        "--facts",
        type=int,
        default=defaults.num_facts,
        help=f"number of facts (default {defaults.num_facts})",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=defaults.train_steps,
        help=f"training steps per model (default {defaults.train_steps})",
    )
    add_step_options(parser)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``unite demo``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = DemoSettings(seed=args.seed, num_facts=args.facts, train_steps=args.train_steps)
        result = run_demo(
            settings, k=args.k, sync=args.sync, device=args.device, progress=not args.no_progress
        )
    except ValueError as error:
        print(f"unite demo: error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0
