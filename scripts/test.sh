#!/usr/bin/env bash
# Sets everything up, then runs the checks: ruff, the test suite, and the C++ (LibTorch) build and test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# C++ library against LibTorch (CPU kernels), with its smoke test under ctest.
prefix=$(.venv/bin/python -c "import torch; print(torch.utils.cmake_prefix_path)")
cuda_hints=()
if [ -x /usr/local/cuda/bin/nvcc ]; then  # the CUDA torch's CMake config looks for the toolkit
  nvrtc=$(.venv/bin/python -c "import glob, nvidia, os; print((glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib', 'libnvrtc.so*')) + [''])[0])")
  cuda_hints=(-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda ${nvrtc:+-DCUDA_nvrtc_LIBRARY=$nvrtc})
fi
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH="$prefix" "${cuda_hints[@]}" >/dev/null
cmake --build cmake-build -j "$(nproc)" >/dev/null
ctest --test-dir cmake-build --output-on-failure

.venv/bin/python -m pytest -q "$@"
