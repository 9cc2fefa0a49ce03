"""The benchmark scripts of ``bench/`` run to their end at tiny sizes (nothing is timed here): they reach
into the decoding loop's internals, which would otherwise change under them unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unite_ext.decode import _decodes_recurrent

BENCH = Path(__file__).resolve().parent.parent / "bench"

# Each script with arguments that make it quick; the decoding benches fall back to tokenizers trained on
# the spot where the real tokenizer files are absent.
RUNS = {
    "batching": "bench_batching.py --rows 4 --batch-size 2 --new-tokens 4 --repeats 1",
    "batching_lfm2": "bench_batching.py --rows 3 --batch-size 2 --new-tokens 4 --repeats 1 --second lfm2",
    "decode": "bench_decode.py --new-tokens 4 --repeats 1",
    "prefill": "bench_prefill.py --batch-sizes 2 --copies 1 --new-tokens 2 --repeats 1 --hidden-size 32",
    "scoring": (
        "bench_scoring.py --documents 1 --copies 1 --questions 2 --subjects 2 --budgets 256 --repeats 1 "
        "--hidden-size 32"
    ),
    "local_attention": "bench_local_attention.py --batch-sizes 2 --new-tokens 4 --repeats 1 --windows 8",
    "cache_copy": "bench_cache_copy.py --prompt-tokens 16 --repeats 1",
}


def run_bench(arguments: list[str], cache: Path) -> None:
    """Runs a bench script in ``bench/`` and checks that it ends well, having printed its figures."""
    environment = {**os.environ, "UNITE_EXT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *arguments], cwd=BENCH, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()


@pytest.mark.parametrize("name", list(RUNS))
def test_bench_runs(name: str, tmp_path: Path) -> None:
    if name == "scoring":
        pytest.importorskip("lm_eval")
    if name in ("batching_lfm2", "cache_copy") and not _decodes_recurrent("lfm2"):
        pytest.skip("the recurrent benches need a transformers release that decodes LFM2")
    run_bench(RUNS[name].split(), tmp_path)


@pytest.mark.parametrize("script", ["bench_rollbacks.py", "bench_vocab.py"])
def test_tokenizer_benches_run(script: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    run_bench([script, "--tokenizer-dir", str(tokenizer_dir)], tmp_path)
