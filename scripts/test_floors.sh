#!/usr/bin/env bash
# Runs the test suite against the oldest versions pyproject.toml accepts: every ">=" floor of its
# dependencies and of its lm_eval extra pinned exactly, in .floors/ (a virtual environment and a copy of
# the working tree). CPU kernels only: the floor torch is a CUDA 12 build, which the CUDA 13 toolkit
# cannot compile against; scripts/test.sh compiles the CUDA sources against the torch it pins.
#   PYTHON=python3.10 bash scripts/test_floors.sh   # the oldest Python too
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The dependencies of pyproject.toml and its lm_eval extra, one requirement a line; each must name its floor.
requirements=$({ sed -n '/^dependencies = \[/,/^\]/p' pyproject.toml; grep '^lm_eval = \[' pyproject.toml; } |
  grep -o '"[^"]*"' | tr -d '"')
pins=()
for requirement in $requirements; do
  [[ $requirement == *">="* && $requirement != *","* ]] || {
    echo "pyproject.toml: '$requirement' must be 'name>=floor' for the floors to be tested" >&2
    exit 1
  }
  pins+=("${requirement/>=/==}")
done
# pyarrow (under lm_eval's datasets) imports with numpy 2 only from release 26 on, without saying so.
pins+=("pyarrow<26")
echo "floors: ${pins[*]}"

# A copy of the working tree, so that its build does not replace the extension .venv loads.
root=$PWD
rm -rf .floors/src
mkdir -p .floors/src
git ls-files --cached --others --exclude-standard | while IFS= read -r path; do
  [ -e "$path" ] && printf '%s\n' "$path"
done | tar -cf - -T - | tar -xf - -C .floors/src
# The copy's ../shared is not the repository's: name the tokenizer folder the tests would have found.
export UNITE_EXT_TOKENIZERS=${UNITE_EXT_TOKENIZERS:-$root/../shared/tokenizers}

venv=$root/.floors/venv
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${pins[@]}" ninja setuptools wheel
cd .floors/src
# The test extra comes from pyproject.toml too; pip keeps the pins, which already satisfy unite_ext.
UNITE_EXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$venv/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
"$venv/bin/python" -m pip check
"$venv/bin/python" -c "import sys, torch, transformers, tokenizers; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
