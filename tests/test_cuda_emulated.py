"""The CUDA step's logic, checked where no GPU is.

``tests/cuda_emulation/step_emulated.cpp`` compiles the device code of ``csrc/step_cuda.cuh`` for the CPU
under a warp emulator (each GPU thread a fiber; shuffles, ballots and barriers pass control between them)
and launches the kernels as the CUDA op does. On the random steps of ``test_step.py`` its outputs must
equal the CPU op's (ids exact, probabilities within 1e-5) and meet the float64 oracle. Chunks of a few
logits make the top-k merge many partial lists per row.

It cannot see timing or memory-model faults: on a GPU, ``bench/gpu_check.sh`` runs the CUDA tests and
compute-sanitizer.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from step_oracle import OracleRow
from test_step import (
    DTYPES,
    StepCase,
    assert_matches,
    assert_steps_agree,
    big_vocab_case,
    many_models_case,
    random_case,
    random_cases,
)

import unite_ext
from unite_ext import EnsembleStep
from unite_ext._step_inputs import MAX_MODELS, prepare_step_inputs

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "cuda_emulation"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # LogitType in csrc/step_cuda.cuh
# Logits per partial block: tiny ones split even the small vocabularies of the random steps into many
# chunks; 4096 is the launcher's smallest.
CHUNK_SIZES = (8, 24, 100, 4096)


@pytest.fixture(scope="module")
def emulated_step(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if sys.platform != "linux":
        pytest.skip("the warp emulator's fibers use Linux ucontext")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("needs a C++ compiler: neither $CXX, c++ nor g++ was found")
    program = tmp_path_factory.mktemp("emulation") / "step_emulated"
    command = [
        compiler,
        "-std=c++17",
        "-O2",
        "-U_FORTIFY_SOURCE",  # its longjmp check refuses the switches between fiber stacks
        f"-I{EMULATION}",
        f"-I{ROOT / 'csrc'}",
        str(EMULATION / "step_emulated.cpp"),
        "-o",
        str(program),
    ]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"the emulated kernels did not compile:\n{build.stderr[-4000:]}"
    return program


def write_case(path: Path, case: StepCase, chunk_elems: int) -> None:
    """The inputs as the op receives them, in the layout step_emulated.cpp reads."""
    inputs = prepare_step_inputs(
        case.logits,
        (case.to_canon, case.from_canon),
        case.k,
        case.weights,
        case.temperature,
        case.top_p,
        None,
        case.uniforms,
    )
    n, batch = len(inputs.logits), inputs.logits[0].shape[0]
    num_canonical = inputs.from_canon[0].shape[0]
    header = [n, batch, inputs.k, num_canonical, DTYPE_CODES[inputs.logits[0].dtype]]
    header += [chunk_elems, inputs.uniforms is not None]
    parts = [struct.pack("<7q", *header), struct.pack("<2d", inputs.temperature, inputs.top_p)]
    parts += [struct.pack(f"<{n}q", *(x.shape[1] for x in inputs.logits))]
    parts += [struct.pack(f"<{n}d", *inputs.weights)]
    parts += [x.contiguous().view(torch.uint8).numpy().tobytes() for x in inputs.logits]
    parts += [t.numpy().astype("<i4").tobytes() for t in [*inputs.to_canon, *inputs.from_canon]]
    if inputs.uniforms is not None:
        parts.append(inputs.uniforms.float().numpy().astype("<f4").tobytes())
    path.write_bytes(b"".join(parts))


def read_outputs(path: Path, n: int, batch: int, k: int) -> EnsembleStep:
    data = path.read_bytes()
    width = n * k
    fields = [
        ("<i8", (batch,)),
        ("<i8", (n, batch)),
        ("<i8", (batch, width)),
        ("<f4", (batch, width)),
        ("<f4", (n, batch, width)),
        ("<f4", (n, batch)),
        ("<i4", (batch,)),
    ]
    offset, tensors = 0, []
    for dtype, shape in fields:
        count = int(np.prod(shape))
        values = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        tensors.append(torch.from_numpy(values.copy()))
        offset += count * np.dtype(dtype).itemsize
    assert offset == len(data), f"{path}: {len(data)} bytes, expected {offset}"
    return EnsembleStep(*tensors)


class Run(NamedTuple):
    """One emulated step: the case, its float64 oracle and the logits per partial block."""

    case: StepCase
    expected: list[OracleRow]
    chunk_elems: int


def run_emulated(program: Path, folder: Path, runs: list[Run]) -> list[EnsembleStep]:
    """Runs every step in one process; returns the outputs in order."""
    arguments = []
    for index, run in enumerate(runs):
        write_case(folder / f"{index}.in", run.case, run.chunk_elems)
        arguments += [str(folder / f"{index}.in"), str(folder / f"{index}.out")]
    result = subprocess.run([str(program), *arguments], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"step_emulated failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return [
        read_outputs(folder / f"{index}.out", len(run.case.logits), run.case.logits[0].shape[0], run.case.k)
        for index, run in enumerate(runs)
    ]


def assert_runs_match(program: Path, folder: Path, runs: list[Run], cpu: bool) -> None:
    """Each emulated output meets its oracle and, with ``cpu``, equals the CPU op's."""
    for run, got in zip(runs, run_emulated(program, folder, runs), strict=True):
        label = f"emulated CUDA, chunks of {run.chunk_elems}: {run.case.description}"
        assert_matches(got, run.case, run.expected, label)
        if cpu:
            assert_steps_agree(got, run.case.call(unite_ext.ensemble_step, "cpu"), run.expected, label)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_step_equals_the_cpu_op(
    dtype: torch.dtype, emulated_step: Path, tmp_path: Path
) -> None:
    rng = random.Random()  # fresh chunk sizes each run; the label of a failure names them
    runs = [Run(case, expected, rng.choice(CHUNK_SIZES)) for case, expected in random_cases(dtype)]
    assert_runs_match(emulated_step, tmp_path, runs, cpu=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_step_on_longer_rows(dtype: torch.dtype, emulated_step: Path, tmp_path: Path) -> None:
    """Random steps with rows of 1,000 to 9,001 logits (their first 3 rows), in the launcher's chunks: several
    rounds of the partial kernel's loop per lane, with the random steps' ties, NaN, +inf and -inf."""
    seeds = [random.SystemRandom().randrange(2**31) for _ in range(4)]  # fresh; each label names its seed
    cases = [first_rows(random_case(seed, dtype, (1000, 2047, 4097, 9001)), 3) for seed in seeds]
    runs = [Run(case, case.oracle(), 2048 * (1 + i % 2)) for i, case in enumerate(cases)]
    assert_runs_match(emulated_step, tmp_path, runs, cpu=True)


def test_emulated_cuda_step_with_many_models(emulated_step: Path, tmp_path: Path) -> None:
    """8 and 16 models at k = 64: the union kernel gathers them in several passes (7 + 1, 8 x 2)."""
    cases = [
        many_models_case(models, dtype)
        for models in (8, MAX_MODELS)
        for dtype in (torch.float32, torch.float16)
    ]
    runs = [Run(case, case.oracle(), 8 * (1 + i)) for i, case in enumerate(cases)]
    assert_runs_match(emulated_step, tmp_path, runs, cpu=True)


@pytest.mark.parametrize(
    ("dtype", "sampling"), [(torch.bfloat16, False), (torch.float32, True)], ids=["bf16_k64", "fp32_sampling"]
)
def test_emulated_cuda_step_on_real_vocabulary_sizes(
    dtype: torch.dtype, sampling: bool, emulated_step: Path, tmp_path: Path
) -> None:
    """Qwen2 + Llama-3 sized rows (ties, NaN, -inf runs, +inf) in the launcher's 4096-logit chunks."""
    case, expected = big_vocab_case(dtype, sampling)
    runs = [Run(case, expected, 4096)]
    assert_runs_match(emulated_step, tmp_path, runs, cpu=False)


def first_rows(case: StepCase, rows: int) -> StepCase:
    uniforms = None if case.uniforms is None else case.uniforms[:rows]
    logits = [x[:rows] for x in case.logits]
    return dataclasses.replace(
        case, description=f"{case.description}, first {rows} rows", logits=logits, uniforms=uniforms
    )
