#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one go: build, CUDA tests, compute-sanitizer, benchmarks, and a
# summary table last. Run from the repository root; logs go to $LOGS (default /tmp/unite_gpu_check) and,
# where $OUT names a folder whose files come back (the device tool's), into one archive $OUT/logs.tar.gz,
# renewed after each step (that tool returns at most 8 files).
#   bash bench/device_carry.sh        # beforehand, where ../shared is: tokenizer files into .device_carry/
#   bash bench/gpu_check.sh           # on the GPU machine, with .device_carry/ sent along
set -u
LOGS=${LOGS:-/tmp/unite_gpu_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Without the real tokenizer files the decode tests that need them skip, and bench_decode.py falls back
# to tokenizers trained on the spot.
if [ -d .device_carry/tokenizers ]; then
  export UNITE_EXT_TOKENIZERS=$PWD/.device_carry/tokenizers
  echo "tokenizers: $UNITE_EXT_TOKENIZERS"
else
  echo "tokenizers: no .device_carry/tokenizers (bench/device_carry.sh makes it); their tests will skip"
fi
PY=${PYTHON:-python3}
# Seconds the whole check may take: a step that would start too late is skipped and the summary still
# printed (the device tool stops a call at 600 s). Steps run in order of importance.
BUDGET=${GPU_CHECK_BUDGET:-570}
rows=()

archive_logs() {
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/logs.tar.gz" -C "$LOGS" .; fi
}

# step NAME TIMEOUT COMMAND...: runs COMMAND with its output in $LOGS/NAME.log and records the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    rows+=("| $name | skipped (GPU_CHECK_BUDGET=$BUDGET s spent) | 0 s |")
    echo "== $name: skipped"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  archive_logs
  rows+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | $((SECONDS - start)) s |")
  echo "== $name: rc=$rc"
  tail -n 4 "$LOGS/$name.log"
  return $rc
}

# The sanitizer and ncu where the PATH lacks them.
for tools in /usr/local/cuda/bin /opt/nvidia/nsight-compute/*; do
  [ -d "$tools" ] && PATH=$PATH:$tools
done
card=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
echo "card: $card"
# The system compiler: a toolchain that links libstdc++ statically (seen under /opt/gcc) turns every
# exception thrown by the op's argument checks into a crash.
compilers=()
[ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ] && compilers=(CC=/usr/bin/gcc CXX=/usr/bin/g++)
step build 240 env MAX_JOBS=16 "${compilers[@]}" "$PY" -m pip install --no-build-isolation --no-deps -e . || {
  printf '%s\n' "${rows[@]}"
  exit 1
}
# The CUDA tests.
step cuda_tests 200 "$PY" -m pytest tests/test_step.py -q --maxfail=15 -p no:cacheprovider
# The targets first (N = 2, bf16, B = 1 and 64), then the sanitizers.
step bench_target 90 "$PY" bench/bench_step.py --device cuda --models 2 --dtypes bfloat16 --batch-sizes 1,64 \
  --out "$LOGS/bench_target.md"
# Where the time of those steps goes, kernel by kernel (the profiler's timings; ncu below may lack counters).
step timeline 60 "$PY" bench/gpu_exercise.py --timeline
step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" bench/gpu_exercise.py
step racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" bench/gpu_exercise.py
step bench_step 150 "$PY" bench/bench_step.py --device cuda --out "$LOGS/bench_step.md"
# Hardware counters of the step's kernels (some virtual machines refuse ncu the counters: then it fails alone).
step ncu 150 ncu --clock-control none --kernel-name regex:"topk|union" --section SpeedOfLight \
  --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
  --section MemoryWorkloadAnalysis --section SourceCounters "$PY" bench/gpu_exercise.py --profile
if [ -f bench/bench_decode.py ] && [ -z "${SKIP_DECODE:-}" ]; then
  step decode_cuda_tests 150 "$PY" -m pytest tests/test_decode.py -q -k "cuda or devices" -p no:cacheprovider
  step bench_decode 120 "$PY" bench/bench_decode.py --device cuda --new-tokens 64 256
fi

echo
echo "## GPU check on $card ($(date -u +%Y-%m-%d))"
echo "| step | result | time |"
echo "| --- | --- | --- |"
printf '%s\n' "${rows[@]}"
grep -H -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS"/memcheck*.log "$LOGS"/racecheck*.log 2>/dev/null
for table in "$LOGS/bench_target.md" "$LOGS/timeline.log" "$LOGS/bench_step.md"; do
  [ -f "$table" ] && cat "$table"
done
