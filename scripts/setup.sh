#!/usr/bin/env bash
# Sets up .venv with everything unite_ext needs and builds its compiled core. Safe to rerun.
#   UNITE_EXT_CUDA=1  build the CUDA kernels or fail (0: CPU only; unset: when nvcc and CUDA torch exist)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.14.1  # the build links against this torch; keep in step with the README

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==$TORCH_VERSION" ninja setuptools wheel
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# No build isolation: the extension must be compiled against the torch installed above.
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install -q --no-build-isolation -e ".[test,lm_eval]"
.venv/bin/python -c "import unite_ext, torch; print('unite_ext ready; torch', torch.__version__, \
'CUDA kernels:', torch.ops.unite_ext.ensemble_step.default.has_kernel_for_dispatch_key('CUDA'))"
