#!/usr/bin/env bash
# One call on a GPU machine (the device tool, or your own box): builds the CUDA extension, environment report,
# GPU tests, compute-sanitizer over every CUDA kernel, benchmarks, plots, and auto's cuda/triton choice. Results land in $OUT (default benchmarks/results/gpu_run): the CSVs, and one tarball of logs and plots,
# so that at most 8 files come back through the device tool.
#
#   bash benchmarks/gpu_check.sh                 # tests + loss benchmark
#   BENCHES="loss siglip attention towers" bash benchmarks/gpu_check.sh
#
# Pure-Python packages the GPU machine lacks (open-clip-torch and what it imports) can travel as wheels in
# ./.wheels (see README, "Running on a GPU machine without a package index").
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FASTCLIP_GIT_SHA=${FASTCLIP_GIT_SHA:-$(git rev-parse --short=10 HEAD 2>/dev/null || cat .git_sha 2>/dev/null || echo unknown)}
PY=${PYTHON:-python}

if [ -d .wheels ] && ls .wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-index --no-deps --find-links .wheels .wheels/*.whl >"$WORK/pip.log" 2>&1 \
    || echo "wheel install failed (see pip.log)"
fi

echo "== building the CUDA extension"
start=$SECONDS
FASTCLIP_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1 \
  && echo "built in $((SECONDS - start)) s" || { echo "extension build FAILED"; tail -30 "$WORK/build.log"; }

echo "== device primitives on the GPU (the emulator's fragment layouts against the hardware's)"
ARCH=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo 90)
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
"$NVCC" -std=c++17 -arch=sm_$ARCH csrc/tests/primitives_selftest.cu -o "$WORK/primitives_selftest" \
  && "$WORK/primitives_selftest" || echo "primitives self-test FAILED"

{ $PY -m fastclip.info; nvidia-smi; } >"$WORK/info.txt" 2>&1
head -20 "$WORK/info.txt"

echo "== GPU tests"
timeout ${TEST_TIMEOUT:-300} $PY -m pytest -m gpu -q -rs -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$WORK/gpu_tests.log" | tail -25

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool"
    timeout ${SAN_TIMEOUT:-300} "$SAN" --tool $tool --error-exitcode 1 $PY tests/cuda_sanitize_case.py \
      >"$WORK/sanitizer_$tool.log" 2>&1 && echo "$tool: clean" || { echo "$tool: ERRORS"; tail -15 "$WORK/sanitizer_$tool.log"; }
  done
else
  echo "compute-sanitizer not found"
fi

for b in ${BENCHES:-loss}; do
  echo "== bench $b"
  case $b in
    loss) args=${LOSS_ARGS:---n 4096 16384 65536 262144 1048576 --d 512 --dtype bf16 --rep 10} ;;
    *) args="" ;;
  esac
  timeout ${BENCH_TIMEOUT:-240} $PY -m fastclip.cli bench "$b" $args --csv "$OUT/$b.csv" 2>"$WORK/bench_$b.err" \
    | tee "$WORK/bench_$b.log"
  tail -3 "$WORK/bench_$b.err"
  $PY benchmarks/plot.py "$OUT/$b.csv" --out "$WORK" >/dev/null 2>&1 || echo "plot of $b failed"
done

echo "== auto's cuda/triton choice from these results"
$PY benchmarks/choose_backends.py "$OUT"/loss.csv "$OUT"/attention.csv --out fastclip/data/backend_choice.json \
  && cp fastclip/data/backend_choice.json "$OUT/backend_choice.json"

tar czf "$OUT/logs_and_plots.tgz" -C "$WORK" .
ls -la "$OUT"
