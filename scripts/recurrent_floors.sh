#!/usr/bin/env bash
# Finds the transformers releases with which each recurrent model type decodes correctly: runs
# test_recurrent_models_read_each_row_alone (every step against a fresh pass) with every release given
# (default: every 5.x release the package index has), the floors of unite_ext/decode.py lifted, in
# .recurrent-floors/ (a virtual environment with .venv's torch, reusing the extension built in place), and
# prints per release the model types that failed. A type's floor (_RECURRENT_MODELS) is the release from
# which every later one passes.
#   bash scripts/recurrent_floors.sh [5.13.0 5.14.0 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
venv=.recurrent-floors
[ -x $venv/bin/python ] || python3 -m venv $venv
$venv/bin/python -m pip install -q "torch==$torch_version" pytest numpy tqdm pyyaml
releases=("$@")
if [ ${#releases[@]} -eq 0 ]; then
  read -ra releases < <($venv/bin/python -m pip index versions transformers 2>/dev/null |
    sed -n 's/^Available versions: //p' | tr -d ',' | tr ' ' '\n' | grep '^5\.' | sort -V | tr '\n' ' ')
fi
for release in "${releases[@]}"; do
  $venv/bin/python -m pip install -q "transformers==$release"
  failed=$({ UNITE_EXT_LIFT_RECURRENT_FLOORS=1 PYTHONPATH=$PWD $venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_decode.py -k recurrent_models_read_each_row_alone -rfs 2>&1 || true; } |
    sed -n 's/^FAILED [^[]*\[\([^]]*\)\].*/\1/p; s/^SKIPPED .*builds no \([a-z0-9_]*\) model.*/\1 (not in this release)/p' |
    sort -u | tr '\n' ' ')
  echo "transformers $release: ${failed:-all pass}"
done
