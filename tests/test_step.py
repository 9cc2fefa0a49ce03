"""The ensemble step (SPEC.md section 2): compiled op and PyTorch reference against a float64 oracle.

The oracle (tests/step_oracle.py) is plain Python written from SPEC, sharing no code with unite_ext. Every
numeric test runs on "cpu" and "cuda" (skipped without a GPU); a few tests are CUDA-only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from step_oracle import OracleRow, oracle_step
from torch import Tensor

import unite_ext
from unite_ext import EnsembleStep
from unite_ext._step_inputs import MAX_MODELS
from unite_ext.benchmark import synthetic_tables

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA GPU: torch.cuda.is_available() is False"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON))]
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEP_FUNCTIONS: dict[str, Callable[..., EnsembleStep]] = {
    "op": unite_ext.ensemble_step,
    "reference": unite_ext.reference.ensemble_step,
}
RANDOM_CASES = 40
PROB_TOLERANCE = 1e-5  # SPEC: union_probs (and model_probs) within 1e-5 absolute of float64
TOP1_RELATIVE_TOLERANCE = 1e-5
BIG_VOCABS = (151936, 128256)  # Qwen2, Llama-3


@dataclass
class StepCase:
    """Inputs of one step, on the CPU; ``call`` moves them to a device."""

    description: str
    logits: list[Tensor]
    to_canon: list[Tensor]
    from_canon: list[Tensor]
    k: int
    weights: list[float] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    uniforms: Tensor | None = None

    def oracle(self) -> list[OracleRow]:
        return oracle_step(
            self.logits,
            self.to_canon,
            self.from_canon,
            self.k,
            self.weights,
            self.temperature,
            self.top_p,
            self.uniforms,
        )

    def tables(self, device: str) -> tuple[list[Tensor], list[Tensor]]:
        return [t.to(device) for t in self.to_canon], [t.to(device) for t in self.from_canon]

    def call(self, step: Callable[..., EnsembleStep], device: str) -> EnsembleStep:
        result = step(
            [x.to(device) for x in self.logits],
            self.tables(device),
            k=self.k,
            weights=self.weights,
            temperature=self.temperature,
            top_p=self.top_p,
            uniforms=None if self.uniforms is None else self.uniforms.to(device),
        )
        return EnsembleStep(*(t.cpu() for t in result))


# ---------------------------------------------------------------------------------------------- inputs


def _random_tables(
    rng: random.Random, generator: torch.Generator, vocab_sizes: list[int]
) -> tuple[str, list[Tensor], list[Tensor]]:
    """Either tables shaped like real ones or arbitrary in-range tables (SPEC defines both)."""
    if rng.random() < 0.65:
        num_canonical = rng.randint(max(vocab_sizes) + 1, 2 * max(vocab_sizes) + 4)
        pool = rng.choice([1, 2, 4, None])
        to_canon, from_canon = synthetic_tables(
            vocab_sizes,
            num_canonical,
            generator,
            eos_tokens=rng.choice([1, 2]),
            special_tokens=rng.randint(0, 3),
            subtoken_pool=pool,
            represented=rng.choice([0.3, 0.7, 1.0]),
        )
        return f"realistic tables C={num_canonical} pool={pool}", to_canon, from_canon
    num_canonical = rng.randint(1, 2 * max(vocab_sizes) + 4)
    to_canon = [
        torch.randint(-1, num_canonical, (v,), generator=generator, dtype=torch.int32) for v in vocab_sizes
    ]
    from_canon = [
        torch.randint(-1, v, (num_canonical,), generator=generator, dtype=torch.int32) for v in vocab_sizes
    ]
    return f"random tables C={num_canonical}", to_canon, from_canon


def _damage_rows(rng: random.Random, logits: Tensor, to_canon: Tensor) -> None:
    """Put NaN, +inf and -inf into some rows, in place (step 0 of SPEC)."""
    batch, vocab = logits.shape
    for b in range(batch):
        draw = rng.random()
        if draw < 0.04:
            logits[b, rng.randrange(vocab)] = math.nan
        elif draw < 0.07:
            logits[b, rng.randrange(vocab)] = math.inf
        elif draw < 0.10:
            logits[b] = -math.inf
        elif draw < 0.13:  # only special tokens (to_canon -1) keep finite logits
            logits[b, to_canon >= 0] = -math.inf
        elif draw < 0.30:
            logits[b, torch.rand(vocab) < 0.4] = -math.inf


SMALL_VOCABS = (1, 2, 3, 6, 10, 31, 64, 100, 300)


def random_case(
    seed: int,
    dtype: torch.dtype,
    vocab_choices: Sequence[int] = SMALL_VOCABS,
    models: int | None = None,
    k: int | None = None,
) -> StepCase:
    """A random step: N 1..4 (or ``models``), B 1..65, unequal vocabularies from ``vocab_choices`` (by
    default small ones, some below k), k 1..64 (or ``k``), ties, NaN/inf."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    n = models or rng.randint(1, 4)
    batch = rng.choice([1, 2, 3, 7, 16, 33, 65])
    vocab_sizes = [rng.choice(vocab_choices) for _ in range(n)]
    k = k or rng.choice([1, 1, 2, 4, 10, 33, 64])
    table_kind, to_canon, from_canon = _random_tables(rng, generator, vocab_sizes)
    integer_logits = rng.random() < 0.6  # small integers: ties everywhere
    logits = []
    for i, vocab in enumerate(vocab_sizes):
        if integer_logits:
            x = torch.randint(-4, 5, (batch, vocab), generator=generator).float()
        else:
            x = torch.randn(batch, vocab, generator=generator) * 3
        x = x.to(dtype)
        _damage_rows(rng, x, to_canon[i])
        logits.append(x)
    weights = None
    if rng.random() < 0.6:
        weights = [rng.uniform(0.1, 3.0) for _ in range(n)]
        if n > 1 and rng.random() < 0.5:
            weights[rng.randrange(n)] = 0.0
    temperature = rng.choice([0.0, 0.0, 0.0, 0.5, 1.0, 2.0])
    top_p = rng.choice([0.3, 0.9, 1.0])  # also given to greedy steps, which must ignore it
    uniforms = None
    if temperature > 0:
        uniforms = torch.rand(batch, generator=generator)
        uniforms[0] = 0.0
    description = (
        f"seed={seed} {dtype} N={n} B={batch} V={vocab_sizes} k={k} {table_kind} "
        f"{'integer' if integer_logits else 'real'} logits weights={weights} T={temperature} top_p={top_p}"
    )
    return StepCase(description, logits, to_canon, from_canon, k, weights, temperature, top_p, uniforms)


@cache
def random_case_with_oracle(seed: int, dtype: torch.dtype) -> tuple[StepCase, list[OracleRow]]:
    case = random_case(seed, dtype)
    return case, case.oracle()


def random_cases(dtype: torch.dtype) -> list[tuple[StepCase, list[OracleRow]]]:
    offset = 1000 * DTYPES.index(dtype)
    return [random_case_with_oracle(offset + seed, dtype) for seed in range(RANDOM_CASES)]


@cache
def random_step_outputs(impl: str, dtype: torch.dtype, device: str) -> list[EnsembleStep]:
    """Outputs of ``impl`` for random_cases(dtype), computed once for the tests that compare them."""
    return [case.call(STEP_FUNCTIONS[impl], device) for case, _ in random_cases(dtype)]


@cache
def big_vocab_case(dtype: torch.dtype, sampling: bool) -> tuple[StepCase, list[OracleRow]]:
    """Qwen2 + Llama-3 sized vocabularies; rows: real logits, integer logits (huge ties), a NaN row,
    finite logits only at one end of the vocabulary, a +inf as the very last logit."""
    generator = torch.Generator().manual_seed(7)
    to_canon, from_canon = synthetic_tables(BIG_VOCABS, 250_000, generator, special_tokens=300, eos_tokens=2)
    logits = []
    for vocab in BIG_VOCABS:
        x = torch.randn(3, vocab, generator=generator) * 3
        x[1] = torch.randint(-6, 7, (vocab,), generator=generator).float()
        logits.append(x)
    logits = [torch.cat([x, torch.randn(2, x.shape[1], generator=generator) * 3]).to(dtype) for x in logits]
    logits[1][2, 12345] = math.nan
    logits[0][3, :-1000] = -math.inf
    logits[1][3, 40000:] = -math.inf
    logits[0][4, -1] = math.inf
    k, temperature, top_p = (10, 1.0, 0.9) if sampling else (64, 0.0, 1.0)
    uniforms = torch.tensor([0.25, 0.5, 0.75, 0.1, 0.9]) if sampling else None
    description = f"big vocabularies {BIG_VOCABS} {dtype} k={k} T={temperature} top_p={top_p}"
    case = StepCase(description, logits, to_canon, from_canon, k, [0.4, 0.6], temperature, top_p, uniforms)
    return case, case.oracle()


# ---------------------------------------------------------------------------------------------- checks


@dataclass
class Tally:
    """What the comparisons covered, so that a test can insist on enough checked rows and edge cases."""

    rows: int = 0
    choice_rows: int = 0  # rows whose choice is defined by SPEC
    choice_checked: int = 0  # of those, rows whose next_canon had to match exactly
    sampled_checked: int = 0
    ties_broken: int = 0  # exact ties at the top of p(u) that the smaller id had to win
    left_out: int = 0
    nobody_usable: int = 0
    shares_with_own: int = 0
    shares_without_own: int = 0
    k_above_vocab: int = 0

    def add(self, row: OracleRow, sampling: bool) -> None:
        self.rows += 1
        self.left_out += row.status != 0
        self.nobody_usable += not row.union
        self.shares_with_own += row.shares_with_own
        self.shares_without_own += row.shares_without_own
        if row.choice_defined:
            self.choice_rows += 1
            self.choice_checked += row.choice_exact
            self.sampled_checked += sampling and row.choice_exact
            top = sorted(row.union_probs, reverse=True)[:2]
            self.ties_broken += not sampling and row.choice_exact and len(top) == 2 and top[0] == top[1]


def _close(got: float, want: float, absolute: float, relative: float = 0.0) -> bool:
    return abs(got - want) <= absolute + relative * abs(want)


def mismatches(got: EnsembleStep, case: StepCase, expected: list[OracleRow]) -> list[str]:
    """Every disagreement of ``got`` with the oracle, as readable lines (empty when all agree)."""
    n, batch, width = len(case.logits), case.logits[0].shape[0], len(case.logits) * case.k
    shapes = {
        "next_canon": ((batch,), torch.int64),
        "next_ids": ((n, batch), torch.int64),
        "union_ids": ((batch, width), torch.int64),
        "union_probs": ((batch, width), torch.float32),
        "model_probs": ((n, batch, width), torch.float32),
        "top1_prob": ((n, batch), torch.float32),
        "status": ((batch,), torch.int32),
    }
    errors = []
    for name, (shape, dtype) in shapes.items():
        value = getattr(got, name)
        if tuple(value.shape) != shape or value.dtype != dtype:
            errors.append(f"{name}: {tuple(value.shape)} {value.dtype}, expected {shape} {dtype}")
    if errors:
        return errors
    from_canon = [t.tolist() for t in case.from_canon]
    for b, row in enumerate(expected):
        size = len(row.union)

        def error(message: str, b: int = b) -> None:
            errors.append(f"row {b}: {message}")

        if got.status[b].item() != row.status:
            error(f"status {got.status[b].item()} != {row.status}")
        union = got.union_ids[b].tolist()
        if union != row.union + [-1] * (width - size):
            error(f"union_ids {union} != {row.union}")
        for i in range(n):
            top1 = got.top1_prob[i, b].item()
            if not _close(top1, row.top1_prob[i], 1e-7, TOP1_RELATIVE_TOLERANCE):
                error(f"top1_prob[{i}] {top1} != {row.top1_prob[i]}")
        if row.probs_defined:
            for i in range(n):
                probs = got.model_probs[i, b].tolist()
                want = (row.model_probs[i] if row.union else []) + [0.0] * (width - size)
                if not all(_close(g, w, PROB_TOLERANCE) for g, w in zip(probs, want, strict=True)):
                    error(f"model_probs[{i}] {probs} != {want}")
        if row.choice_defined:
            probs = got.union_probs[b].tolist()
            want = row.union_probs + [0.0] * (width - size)
            if not all(_close(g, w, PROB_TOLERANCE) for g, w in zip(probs, want, strict=True)):
                error(f"union_probs {probs} != {want}")
            choice = got.next_canon[b].item()
            if choice not in row.allowed_choices:
                error(f"next_canon {choice} != {row.next_canon} (allowed: {sorted(row.allowed_choices)})")
        # next_ids is the table lookup of whatever next_canon is, in every row.
        choice = got.next_canon[b].item()
        want_ids = [from_canon[i][choice] if choice >= 0 else -1 for i in range(n)]
        if got.next_ids[:, b].tolist() != want_ids:
            error(f"next_ids {got.next_ids[:, b].tolist()} != {want_ids} for next_canon {choice}")
    return errors


def assert_matches(got: EnsembleStep, case: StepCase, expected: list[OracleRow], label: str) -> None:
    errors = mismatches(got, case, expected)
    if errors:
        shown = "\n  ".join(errors[:8])
        raise AssertionError(f"{label}: {case.description}\n  {shown}\n  ({len(errors)} mismatches)")


# ---------------------------------------------------------------------------------------------- tests


def test_oracle_matches_hand_computed_step() -> None:
    """The oracle itself against values worked out by hand from SPEC (see hand_case)."""
    case = hand_case(temperature=0.0)
    rows = case.oracle()
    assert rows[0].union == [1, 2, 3]
    assert rows[0].union_probs == pytest.approx([29 / 60, 21 / 60, 10 / 60], abs=1e-7)
    assert rows[0].model_probs[0] == pytest.approx([1 / 6, 1 / 2, 1 / 3], abs=1e-7)
    assert rows[0].model_probs[1] == pytest.approx([4 / 5, 1 / 5, 0.0], abs=1e-7)
    assert rows[0].next_canon == 1
    assert rows[0].top1_prob == pytest.approx([3 / 6, 4 / (5 + math.exp(10))], rel=1e-7)
    assert rows[0].shares_with_own


def hand_case(temperature: float, top_p: float = 1.0, uniform: float = 0.0) -> StepCase:
    """Two models, canonical ids 0 EOS, 1 "a", 2 "b", 3 "ab"; k=2; equal weights.

    Model 0 tokens: "a" "b" "ab" EOS; logits 0, ln 3, ln 2, -inf: top-2 "b", "ab"; m = ln 3.
    Model 1 tokens: "a" "b" <special>; logits ln 4, 0, 10: top-2 "a", "b" (the special is no candidate);
    it lacks "ab", whose first sub-token is "a": "a" and "ab" share token 0, and "a" (its own) gets it.
    U = {1, 2, 3}. q0 = (1/3, 1, 2/3) / 2 -> (1/6, 1/2, 1/3); q1 = (1, 1/4, 0) / (5/4) -> (4/5, 1/5, 0).
    p = (29/60, 21/60, 10/60). top1: model 0 3/(1+3+2); model 1 4/(4+1+e^10) (the full vocabulary).
    """
    logits = [
        torch.tensor([[0.0, math.log(3), math.log(2), -math.inf]]),
        torch.tensor([[math.log(4), 0.0, 10.0]]),
    ]
    to_canon = [torch.tensor([1, 2, 3, 0], dtype=torch.int32), torch.tensor([1, 2, -1], dtype=torch.int32)]
    from_canon = [
        torch.tensor([3, 0, 1, 2], dtype=torch.int32),
        torch.tensor([-1, 0, 1, 0], dtype=torch.int32),
    ]
    uniforms = torch.tensor([uniform]) if temperature > 0 else None
    return StepCase(
        "hand-computed step", logits, to_canon, from_canon, 2, [1.0, 1.0], temperature, top_p, uniforms
    )


# (temperature, top_p, r, choice): T=1 cumulative 29/60, 50/60, 1; T=0.5 P ~ p^2: 841, 1282, 1382 (/1382).
HAND_SAMPLES = [
    (1.0, 1.0, 0.0, 1),
    (1.0, 1.0, 0.48, 1),
    (1.0, 1.0, 0.49, 2),
    (1.0, 1.0, 0.92, 3),
    (1.0, 0.8, 0.6, 2),  # nucleus {1, 2}, mass 50/60: 0.6 * 50/60 = 0.5 > 29/60
    (1.0, 0.8, 0.5, 1),  # 0.5 * 50/60 = 0.4167 < 29/60
    (1.0, 0.4, 0.99, 1),  # nucleus {1}
    (0.5, 1.0, 0.92, 2),  # 0.92 < 1282/1382 = 0.9276
    (0.5, 1.0, 0.93, 3),
    (2.0, 1.0, 0.45, 2),  # P ~ sqrt(p): cumulative 0.3983, 0.7280, 1
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
def test_hand_computed_step(impl: str, device: str) -> None:
    case = hand_case(temperature=0.0)
    got = case.call(STEP_FUNCTIONS[impl], device)
    assert got.union_ids.tolist() == [[1, 2, 3, -1]]
    torch.testing.assert_close(got.union_probs, torch.tensor([[29 / 60, 21 / 60, 10 / 60, 0.0]]))
    want_model = torch.tensor([[[1 / 6, 1 / 2, 1 / 3, 0.0]], [[4 / 5, 1 / 5, 0.0, 0.0]]])
    torch.testing.assert_close(got.model_probs, want_model)
    torch.testing.assert_close(got.top1_prob, torch.tensor([[0.5], [4 / (5 + math.exp(10))]]))
    assert got.next_canon.tolist() == [1]
    assert got.next_ids.tolist() == [[0], [0]]
    assert got.status.tolist() == [0]
    for temperature, top_p, uniform, choice in HAND_SAMPLES:
        sampled = hand_case(temperature, top_p, uniform).call(STEP_FUNCTIONS[impl], device)
        assert sampled.next_canon.tolist() == [choice], (temperature, top_p, uniform)
        assert hand_case(temperature, top_p, uniform).oracle()[0].next_canon == choice


# (temperature, top_p, r, choice) for p = (1/2, 1/2) over canonical ids (3, 5): every sum is exact in float32.
EXACT_BOUNDARY_SAMPLES = [
    (1.0, 1.0, 0.5, 5),  # r * total = 1/2 = cumulative of id 3, which does not exceed it
    (1.0, 1.0, 0.4999, 3),
    (0.5, 1.0, 0.5, 5),
    (1.0, 0.5, 0.9, 3),  # the cumulative 1/2 reaches top_p = 1/2: the nucleus is {3}
    (1.0, 0.5001, 0.9, 5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
def test_sampling_at_exact_boundaries(impl: str, device: str) -> None:
    """The choice is the first candidate whose cumulative P exceeds r * total; the nucleus reaches top_p."""
    to_canon = [torch.tensor([5, 3], dtype=torch.int32)]
    from_canon = [torch.tensor([-1, -1, -1, 1, -1, 0], dtype=torch.int32)]
    for temperature, top_p, uniform, choice in EXACT_BOUNDARY_SAMPLES:
        case = StepCase(
            "two equal candidates",
            [torch.tensor([[1.0, 1.0]])],
            to_canon,
            from_canon,
            2,
            None,
            temperature,
            top_p,
            torch.tensor([uniform]),
        )
        got = case.call(STEP_FUNCTIONS[impl], device)
        assert got.next_canon.tolist() == [choice], (temperature, top_p, uniform)
        assert case.oracle()[0].next_canon == choice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
def test_random_steps_match_float64_oracle(impl: str, dtype: torch.dtype, device: str) -> None:
    tally = Tally()
    outputs = random_step_outputs(impl, dtype, device)
    for (case, expected), got in zip(random_cases(dtype), outputs, strict=True):
        assert_matches(got, case, expected, f"{impl} on {device}")
        for row in expected:
            tally.add(row, case.temperature > 0)
        tally.k_above_vocab += any(case.k > x.shape[1] for x in case.logits)
    # The comparisons must have covered the cases they are meant for, not skipped them.
    assert tally.choice_checked >= 0.9 * tally.choice_rows, tally
    assert tally.choice_rows >= 0.8 * tally.rows, tally
    assert tally.sampled_checked >= 50, tally
    assert tally.ties_broken >= 10, tally
    assert tally.left_out >= 20 and tally.nobody_usable >= 3, tally
    assert tally.shares_with_own >= 10 and tally.shares_without_own >= 10, tally
    assert tally.k_above_vocab >= 5, tally


def assert_steps_agree(got: EnsembleStep, want: EnsembleStep, expected: list[OracleRow], label: str) -> None:
    """Ids and status exact, probabilities within 1e-5, the choice exact unless the oracle allows others."""
    for name in ("union_ids", "status"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"{name}: {label}"
    for name in ("union_probs", "model_probs", "top1_prob"):
        difference = (getattr(got, name) - getattr(want, name)).abs().max().item()
        assert difference <= PROB_TOLERANCE, f"{name} differs by {difference}: {label}"
    exact = torch.tensor([row.allowed_choices in ({row.next_canon}, set()) for row in expected])
    assert torch.equal(got.next_canon[exact], want.next_canon[exact]), f"next_canon: {label}"
    assert torch.equal(got.next_ids[:, exact], want.next_ids[:, exact]), f"next_ids: {label}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_agrees_with_reference_in_every_row(dtype: torch.dtype, device: str) -> None:
    """Also in the rows that SPEC leaves open, which the oracle skips: a usable model whose q_i(u) are all 0
    (its tokens for the union are -1 or -inf), or usable models whose weights are all 0."""
    open_rows = 0
    op, reference = random_step_outputs("op", dtype, device), random_step_outputs("reference", dtype, device)
    outputs = zip(op, reference, strict=True)
    for (case, expected), (got, want) in zip(random_cases(dtype), outputs, strict=True):
        assert_steps_agree(got, want, expected, case.description)
        open_rows += sum(not row.choice_defined for row in expected)
    assert open_rows >= 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy_fp32", "sampling_bf16"])
@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
def test_big_vocabularies_match_float64_oracle(impl: str, sampling: bool, device: str) -> None:
    case, expected = big_vocab_case(torch.bfloat16 if sampling else torch.float32, sampling)
    assert [row.status for row in expected] == [0, 0, 2, 0, 1]
    assert all(row.choice_exact for row in expected)
    assert_matches(case.call(STEP_FUNCTIONS[impl], device), case, expected, f"{impl} on {device}")


def many_models_case(models: int, dtype: torch.dtype) -> StepCase:
    """A fresh random step with ``models`` models (up to MAX_MODELS) at k = 64: a union of up to 1,024
    tokens, which the CUDA union kernel gathers in several passes (as many models as fit its shared
    memory: 7 of 8, 2 of 16)."""
    return random_case(random.SystemRandom().randrange(2**31), dtype, models=models, k=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("models", [8, MAX_MODELS])
def test_many_models_match_float64_oracle(models: int, device: str) -> None:
    case = many_models_case(models, torch.float32)
    assert_matches(case.call(unite_ext.ensemble_step, device), case, case.oracle(), f"op on {device}")


def test_cpu_results_do_not_depend_on_the_thread_count() -> None:
    """The CPU kernel cuts rows into fixed chunks, so one thread and several give identical bits."""
    case, _ = big_vocab_case(torch.float32, sampling=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = case.call(unite_ext.ensemble_step, "cpu")
        torch.set_num_threads(max(2, threads))
        several = case.call(unite_ext.ensemble_step, "cpu")
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(EnsembleStep._fields, one, several, strict=True):
        assert torch.equal(a, b), name


def left_out_case(weights: list[float] | None) -> StepCase:
    """Rows that exercise step 0; model 0 has a special token at column 2, model 1 at column 2."""
    to_canon = [
        torch.tensor([1, 2, -1, 0], dtype=torch.int32),
        torch.tensor([2, 3, -1, 1], dtype=torch.int32),
    ]
    from_canon = [
        torch.tensor([3, 0, 1, -1], dtype=torch.int32),
        torch.tensor([-1, 3, 0, 1], dtype=torch.int32),
    ]
    inf, nan = math.inf, math.nan
    model0 = [
        [1.0, 2.0, nan, 0.0],  # NaN in a special token: left out
        [1.0, 2.0, 0.0, 0.0],
        [-inf, -inf, -inf, -inf],  # no finite logit: left out
        [1.0, 2.0, 0.0, 0.0],
        [nan, 2.0, 0.0, 0.0],  # both left out below
        [-inf, -inf, -inf, 3.0],  # one finite logit (EOS, canonical 0): usable
        [0.5, 0.5, 0.5, 0.5],
    ]
    model1 = [
        [1.0, 2.0, 0.0, 0.0],
        [inf, 2.0, 0.0, 0.0],  # +inf: left out
        [1.0, 2.0, 0.0, 0.0],
        [-inf, -inf, 5.0, -inf],  # only the special token is finite: left out
        [-inf, -inf, -inf, -inf],
        [0.0, 1.0, -inf, 2.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    logits = [torch.tensor(model0), torch.tensor(model1)]
    return StepCase(f"left-out models, weights={weights}", logits, to_canon, from_canon, 3, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", [None, [0.0, 1.0], [1.0, 0.0]], ids=["uniform", "w0=0", "w1=0"])
@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
def test_left_out_models(impl: str, weights: list[float] | None, device: str) -> None:
    case = left_out_case(weights)
    got = case.call(STEP_FUNCTIONS[impl], device)
    assert got.status.tolist() == [1, 2, 1, 2, 3, 0, 0]
    # Nobody usable (row 4): fixed outputs.
    assert got.next_canon[4].item() == -1 and got.next_ids[:, 4].tolist() == [-1, -1]
    assert (got.union_ids[4] == -1).all() and (got.union_probs[4] == 0).all()
    assert (got.model_probs[:, 4] == 0).all() and (got.top1_prob[:, 4] == 0).all()
    # A left-out model has zeros in model_probs and top1_prob and proposes nothing.
    assert (got.model_probs[0, [0, 2]] == 0).all() and (got.top1_prob[0, [0, 2]] == 0).all()
    assert (got.model_probs[1, [1, 3]] == 0).all() and (got.top1_prob[1, [1, 3]] == 0).all()
    assert got.union_ids[0, :3].tolist() == [1, 2, 3]  # model 1's top-3 only (no special token)
    if weights == [0.0, 1.0]:
        # Model 0 does not vote but proposes: its top token (EOS, canonical 0) is a candidate in row 5.
        assert got.union_ids[5].tolist()[:4] == [0, 1, 2, 3]
        torch.testing.assert_close(got.union_probs[5], got.model_probs[1, 5])
    expected = case.oracle()
    checked = [b for b, row in enumerate(expected) if row.choice_defined]
    if weights is None:
        assert checked == list(range(7))
    assert_matches(got, case, expected, f"{impl} on {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
def test_one_model_equals_its_renormalised_softmax(impl: str, device: str) -> None:
    """N=1: p(u) is the model's softmax over its own top-k, ranked by logit; a large batch."""
    generator = torch.Generator().manual_seed(3)
    to_canon, from_canon = synthetic_tables([500], 800, generator, special_tokens=20)
    logits = torch.randn(300, 500, generator=generator) * 3
    got = StepCase("one model", [logits], to_canon, from_canon, 8).call(STEP_FUNCTIONS[impl], device)
    regular = to_canon[0] >= 0
    masked = logits.masked_fill(~regular, -math.inf).double()
    top_values, top_ids = masked.topk(8, dim=1)
    want = torch.softmax(top_values, dim=1)
    canon = to_canon[0][top_ids].long()
    order = canon.argsort(dim=1)
    assert torch.equal(got.union_ids[:, :8], canon.gather(1, order))
    torch.testing.assert_close(got.union_probs[:, :8].double(), want.gather(1, order), atol=1e-6, rtol=0)
    assert torch.equal(got.next_canon, canon[:, 0])
    torch.testing.assert_close(
        got.top1_prob[0].double(),
        torch.softmax(logits.double(), 1).gather(1, top_ids[:, :1])[:, 0],
        rtol=TOP1_RELATIVE_TOLERANCE,
        atol=1e-7,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stages_compose_to_the_fused_op(dtype: torch.dtype, device: str) -> None:
    """topk_stats per model, then union_average: exactly ensemble_step's outputs; topk_ids are the T_i."""
    for case, expected in random_cases(dtype)[:20]:
        logits = [x.to(device) for x in case.logits]
        tables = case.tables(device)
        uniforms = None if case.uniforms is None else case.uniforms.to(device)
        options = dict(
            weights=case.weights, temperature=case.temperature, top_p=case.top_p, uniforms=uniforms
        )
        stats = [unite_ext.topk_stats(x, t, case.k) for x, t in zip(logits, tables[0], strict=True)]
        staged = unite_ext.union_average(logits, tables, stats, **options)
        fused = unite_ext.ensemble_step(logits, tables, k=case.k, **options)
        for name in EnsembleStep._fields:
            assert torch.equal(getattr(staged, name), getattr(fused, name)), f"{name}: {case.description}"
        for i, (topk_ids, topk_logits, _) in enumerate(stats):
            want = [row.topk[i] + [-1] * (case.k - len(row.topk[i])) for row in expected]
            assert topk_ids.tolist() == want, f"topk_ids of model {i}: {case.description}"
            found = topk_ids >= 0
            gathered = logits[i].float().gather(1, topk_ids.clamp(min=0))
            assert torch.equal(topk_logits[found], gathered[found]), (
                f"topk_logits of model {i}: {case.description}"
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_across_devices_equals_the_fused_op(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model but the first takes the other-device path (stand-in logits filled from its candidates'
    tokens), on one CPU: the float64 oracle's step, and exactly ensemble_step's outputs; NaN/+inf rows,
    k > V and ties included."""
    for case, expected in random_cases(dtype):
        tables = case.tables("cpu")
        first = case.logits[0]
        monkeypatch.setattr(unite_ext.step, "_enters_whole", lambda x, device, first=first: x is first)
        options = dict(
            k=case.k,
            weights=case.weights,
            temperature=case.temperature,
            top_p=case.top_p,
            uniforms=case.uniforms,
        )
        staged = unite_ext.ensemble_step_across_devices(case.logits, [tables] * len(case.logits), **options)
        assert_matches(staged, case, expected, "across devices")
        fused = unite_ext.ensemble_step(case.logits, tables, **options)
        for name in EnsembleStep._fields:
            assert torch.equal(getattr(staged, name), getattr(fused, name)), f"{name}: {case.description}"


@cuda_only
@pytest.mark.parametrize("first_device", ["cuda", "cpu"])
def test_step_across_cpu_and_cuda(first_device: str) -> None:
    """Models alternate between the GPU and the CPU, the step on the first model's device: the same step
    as ensemble_step there (top1_prob within tolerance: each model's row sum is taken on its own device)."""
    other = "cpu" if first_device == "cuda" else "cuda"
    for case, expected in random_cases(torch.bfloat16):
        devices = [first_device if i % 2 == 0 else other for i in range(len(case.logits))]
        uniforms = None if case.uniforms is None else case.uniforms.to(first_device)
        got = unite_ext.ensemble_step_across_devices(
            [x.to(d) for x, d in zip(case.logits, devices, strict=True)],
            [case.tables(d) for d in devices],
            k=case.k,
            weights=case.weights,
            temperature=case.temperature,
            top_p=case.top_p,
            uniforms=uniforms,
        )
        assert all(t.device.type == first_device for t in got)
        want = case.call(unite_ext.ensemble_step, first_device)
        assert_steps_agree(EnsembleStep(*(t.cpu() for t in got)), want, expected, case.description)


def test_step_across_devices_refuses_bad_arguments() -> None:
    logits, tables = _valid_inputs()
    with pytest.raises(ValueError, match="batch size"):
        unite_ext.ensemble_step_across_devices([logits[0], logits[1][:1]], [tables, tables])
    with pytest.raises(ValueError, match="one per model"):
        unite_ext.ensemble_step_across_devices(logits, [tables])
    if HAS_CUDA:
        cuda_tables = ([t.cuda() for t in tables[0]], [t.cuda() for t in tables[1]])
        with pytest.raises(ValueError, match="tables\\[1\\] are on cuda"):
            unite_ext.ensemble_step_across_devices(logits, [tables, cuda_tables])


@pytest.mark.parametrize("device", DEVICES)
def test_uniforms_drawn_from_generator(device: str) -> None:
    """Without uniforms, sampling draws torch.rand(B) from the generator (reproducible with a seed)."""
    case, _ = random_case_with_oracle(5, torch.float32)
    logits = [x.to(device) for x in case.logits]
    batch = logits[0].shape[0]
    options = dict(k=case.k, temperature=1.0, top_p=0.9)
    drawn = unite_ext.ensemble_step(
        logits, case.tables(device), generator=torch.Generator(device).manual_seed(11), **options
    )
    uniforms = torch.rand(batch, generator=torch.Generator(device).manual_seed(11), device=device)
    given = unite_ext.ensemble_step(logits, case.tables(device), uniforms=uniforms, **options)
    assert torch.equal(drawn.next_canon, given.next_canon)


# ---------------------------------------------------------------------------------------------- errors


def _valid_inputs() -> tuple[list[Tensor], tuple[list[Tensor], list[Tensor]]]:
    to_canon = [torch.tensor([1, 2, 0], dtype=torch.int32), torch.tensor([2, -1, 1, 3], dtype=torch.int32)]
    from_canon = [
        torch.tensor([2, 0, 1, -1], dtype=torch.int32),
        torch.tensor([-1, 2, 0, 3], dtype=torch.int32),
    ]
    return [torch.randn(2, 3), torch.randn(2, 4)], (to_canon, from_canon)


def _call_with(step: Callable[..., EnsembleStep], change: str, options: dict) -> None:
    logits, (to_canon, from_canon) = _valid_inputs()
    meta = torch.device("meta")  # a second device that every machine has
    if change == "fewer tables":
        to_canon, from_canon = to_canon[:1], from_canon[:1]
    elif change == "logits on two devices":
        logits[1] = logits[1].to(meta)
    elif change == "tables on another device":
        from_canon[1] = from_canon[1].to(meta)
    elif change == "unequal batch sizes":
        logits[1] = torch.randn(3, 4)
    elif change == "width differs from table":
        logits[1] = torch.randn(2, 5)
    elif change == "integer logits":
        logits[0] = torch.zeros(2, 3, dtype=torch.int64)
    elif change == "1-D logits":
        logits[0] = torch.randn(3)
    step(logits, (to_canon, from_canon), **{"k": 2, **options})


# (what is wrong, keyword arguments of the call, error type, message)
INVALID_INPUTS = [
    (
        "fewer tables",
        {},
        ValueError,
        r"tables describe 1 \(to_canon\) and 1 \(from_canon\) models but logits has 2",
    ),
    ("logits on two devices", {}, ValueError, r"logits\[1\] is on meta but logits\[0\] is on cpu"),
    (
        "tables on another device",
        {},
        ValueError,
        r"tables.from_canon\[1\] is on meta but the logits are on cpu",
    ),
    ("unequal batch sizes", {}, ValueError, r"logits\[1\] has batch size 3 but logits\[0\] has 2"),
    ("width differs from table", {}, ValueError, r"logits\[1\] has 5 columns but tables.to_canon\[1\] has 4"),
    (
        "integer logits",
        {},
        TypeError,
        r"logits\[0\] has dtype torch.int64; expected float32, bfloat16 or float16",
    ),
    ("1-D logits", {}, ValueError, r"logits\[0\] must be a 2-D \[B, V\] tensor"),
    ("k=0", {"k": 0}, ValueError, r"k must be an integer in 1..64, got 0"),
    ("k=65", {"k": 65}, ValueError, r"k must be an integer in 1..64, got 65"),
    ("negative weight", {"weights": [1.0, -0.5]}, ValueError, r"weights must be finite and >= 0"),
    ("zero weights", {"weights": [0.0, 0.0]}, ValueError, r"weights are all zero"),
    ("one weight", {"weights": [1.0]}, ValueError, r"weights has 1 entries but there are 2 models"),
    ("top_p=0", {"top_p": 0.0, "temperature": 1.0}, ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    ("top_p=1.5", {"top_p": 1.5, "temperature": 1.0}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ("negative temperature", {"temperature": -1.0}, ValueError, r"temperature must be finite and >= 0"),
    (
        "uniforms shape",
        {"temperature": 1.0, "uniforms": torch.rand(3)},
        ValueError,
        r"uniforms must be a float32",
    ),
]


@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
@pytest.mark.parametrize(
    ("change", "options", "error", "message"), INVALID_INPUTS, ids=[c[0] for c in INVALID_INPUTS]
)
def test_invalid_inputs_are_refused(impl: str, change: str, options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _call_with(STEP_FUNCTIONS[impl], change, options)


def test_compiled_op_checks_its_own_arguments() -> None:
    """Called directly (bypassing the Python checks), the op refuses bad arguments instead of crashing."""
    logits, (to_canon, from_canon) = _valid_inputs()
    op = torch.ops.unite_ext.ensemble_step
    with pytest.raises(RuntimeError, match="unite_ext"):
        op(logits, to_canon, from_canon, 0, [0.5, 0.5], 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="unite_ext"):
        op(logits, to_canon, from_canon, 2, [0.0, 0.0], 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="unite_ext"):
        op([logits[0], torch.randn(2, 5)], to_canon, from_canon, 2, [0.5, 0.5], 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="unite_ext"):
        op(logits, to_canon, from_canon, 2, [0.5, 0.5], 1.0, 1.0, None)  # sampling without uniforms
    with pytest.raises(RuntimeError, match="unite_ext"):
        torch.ops.unite_ext.topk_stats(logits[0], to_canon[0], 65)


# ------------------------------------------------------------------------------- torch.library, compile


def _op_samples(device: str) -> list[tuple[str, tuple]]:
    samples = []
    for seed, dtype in [(3, torch.float32), (1000, torch.bfloat16)]:  # a sampling and a greedy step
        case, _ = random_case_with_oracle(seed, dtype)
        logits = [x.to(device) for x in case.logits]
        to_canon, from_canon = case.tables(device)
        n = len(logits)
        weights = [1.0 / n] * n if case.weights is None else [w / sum(case.weights) for w in case.weights]
        uniforms = None if case.uniforms is None else case.uniforms.to(device)
        choice = (weights, case.temperature, case.top_p, uniforms)
        stats = [unite_ext.topk_stats(x, t, case.k) for x, t in zip(logits, to_canon, strict=True)]
        samples.append(("topk_stats", (logits[0], to_canon[0], case.k)))
        samples.append(("ensemble_step", (logits, to_canon, from_canon, case.k, *choice)))
        topk = ([s[0] for s in stats], [s[1] for s in stats])
        samples.append(("union_average", (logits, to_canon, from_canon, *topk, *choice)))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    names = set()
    for name, args in _op_samples(device):
        torch.library.opcheck(getattr(torch.ops.unite_ext, name).default, args)
        names.add(name)
    assert names == {"topk_stats", "union_average", "ensemble_step"}


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device: str) -> None:
    case, _ = random_case_with_oracle(12, torch.float32)
    tables = case.tables(device)
    generator = torch.Generator().manual_seed(0)

    def step(logits: list[Tensor], uniforms: Tensor) -> EnsembleStep:
        return unite_ext.ensemble_step(
            logits, tables, k=5, weights=[1.0] * len(logits), temperature=0.7, top_p=0.9, uniforms=uniforms
        )

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        logits = [(torch.randn(x.shape, generator=generator) * 3).to(device) for x in case.logits]
        uniforms = torch.rand(logits[0].shape[0], generator=generator).to(device)
        want, got = step(logits, uniforms), compiled(logits, uniforms)
        for name in EnsembleStep._fields:
            assert torch.equal(getattr(got, name), getattr(want, name)), name


# ---------------------------------------------------------------------------------------------- CUDA only


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    """CUDA and CPU kernels agree: ids exact, probabilities within 1e-5, the choice except near-ties."""
    cases = [*random_cases(dtype), big_vocab_case(dtype, False), big_vocab_case(dtype, True)]
    for case, expected in cases:
        on_cpu = case.call(unite_ext.ensemble_step, "cpu")
        on_cuda = case.call(unite_ext.ensemble_step, "cuda")
        assert_steps_agree(on_cuda, on_cpu, expected, case.description)


@cuda_only
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("impl", list(STEP_FUNCTIONS))
def test_cuda_graph_replay_equals_eager(impl: str, sampling: bool) -> None:
    """Capture one step with static inputs, copy new logits (and uniforms) in, replay: equals eager."""
    generator = torch.Generator().manual_seed(21)
    vocab_sizes = [5000, 3000, 800]
    to_canon, from_canon = synthetic_tables(vocab_sizes, 8000, generator, subtoken_pool=50)
    tables = ([t.cuda() for t in to_canon], [t.cuda() for t in from_canon])
    batch = 8
    static_logits = [torch.zeros(batch, v, device="cuda", dtype=torch.bfloat16) for v in vocab_sizes]
    static_uniforms = torch.zeros(batch, device="cuda")
    options = dict(k=10, weights=[0.5, 0.3, 0.2], temperature=1.0 if sampling else 0.0, top_p=0.9)
    step = STEP_FUNCTIONS[impl]

    def run_static() -> EnsembleStep:
        return step(static_logits, tables, uniforms=static_uniforms, **options)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run_static()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_static()
    for trial in range(3):
        logits = [
            (torch.randn(batch, v, generator=generator) * 3).to("cuda", torch.bfloat16) for v in vocab_sizes
        ]
        if trial == 2:
            logits[1][3, 7] = math.nan  # a left-out model in one row
        uniforms = torch.rand(batch, generator=generator).cuda()
        for static, new in zip(static_logits, logits, strict=True):
            static.copy_(new)
        static_uniforms.copy_(uniforms)
        graph.replay()
        eager = step(logits, tables, uniforms=uniforms, **options)
        torch.cuda.synchronize()
        for name in EnsembleStep._fields:
            assert torch.equal(getattr(captured, name), getattr(eager, name)), f"{name}, trial {trial}"
        if trial == 2:
            assert captured.status[3].item() == 2
