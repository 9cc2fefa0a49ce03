"""The CUDA top-k stage's logic, checked where no GPU is: ``tests/cuda_emulation/topk_emulated.cpp``
compiles the device code of ``csrc/topk_cuda.cuh`` for the CPU under a warp emulator (each GPU thread a
fiber) and compares every row, for both warp lists, with a sort written from SPEC.md steps 0-1.

It cannot see timing or memory-model faults: on a GPU, ``bench/gpu_check.sh`` runs the CUDA tests and
compute-sanitizer.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "cuda_emulation"


@pytest.mark.skipif(sys.platform != "linux", reason="the warp emulator's fibers use Linux ucontext")
def test_cuda_topk_kernels_under_the_warp_emulator(tmp_path: Path) -> None:
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("needs a C++ compiler: neither $CXX, c++ nor g++ was found")
    program = tmp_path / "topk_emulated"
    build = subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-O2",
            "-U_FORTIFY_SOURCE",  # its longjmp check refuses the switch between fiber stacks
            f"-I{EMULATION}",
            f"-I{ROOT / 'csrc'}",
            str(EMULATION / "topk_emulated.cpp"),
            "-o",
            str(program),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"the emulated kernels did not compile:\n{build.stderr[-4000:]}"
    seed = random.SystemRandom().randrange(2**31)
    run = subprocess.run([str(program), str(seed)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"seed {seed} (rerun: {program} {seed}):\n{run.stdout[-6000:]}{run.stderr}"
    assert "0 rows differ" in run.stdout
