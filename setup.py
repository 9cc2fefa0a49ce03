"""Builds unite_ext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

UNITE_EXT_CUDA=1 forces the CUDA build (an error if it cannot be done), UNITE_EXT_CUDA=0 skips it.
Install with `pip install --no-build-isolation .` so that the build uses the torch already installed
(an isolated build would fetch another torch and produce a library that does not match it).
"""

import importlib.util
import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Architectures built when no GPU is visible (the build machine may have none): Ampere, Ada, Hopper.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def want_cuda() -> bool:
    choice = os.environ.get("UNITE_EXT_CUDA", "auto")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if choice == "1" and not available:
        raise RuntimeError(
            f"UNITE_EXT_CUDA=1 but torch has CUDA {torch.version.cuda} and nvcc was found at {CUDA_HOME}"
        )
    return available if choice == "auto" else choice == "1"


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the CUDA libraries that pip's torch wheels ship (cuSPARSE, cuBLAS...), which a bare
    CUDA toolkit may lack."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(str(p) for root in spec.submodule_search_locations for p in Path(root).glob("*/include"))


def extension():
    sources = [f"csrc/{name}" for name in ("torch_bindings.cpp", "step_cpu.cpp", "python_module.cpp")]
    # -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP
    # (torch's own libgomp serves it at run time).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fvisibility=hidden"]
    link_flags = ["-fopenmp"]
    if not want_cuda():
        return CppExtension(
            "unite_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return CUDAExtension(
        "unite_ext._C",
        sources + ["csrc/step_cuda.cu"],
        include_dirs=pip_cuda_include_dirs(),
        define_macros=[("UNITE_EXT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=link_flags,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
