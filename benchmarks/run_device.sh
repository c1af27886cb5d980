#!/usr/bin/env bash
# GPU machine run: build upreid with its CUDA kernels, run the test suite (CUDA tests included),
# then the operator benchmarks. Everything is logged into OUTDIR (run.log, build.log, tests.log,
# bench*.log) and the benchmark rows go to OUTDIR/results.csv.
#
#   bash benchmarks/run_device.sh OUTDIR
#
# Env: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (build parallelism), BENCH_EXTRA (extra
# bench_ops.py runs, default "--dtype bfloat16 --shapes full"; empty to skip).
set -uo pipefail
OUT="${1:?usage: benchmarks/run_device.sh OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
exec > >(tee -a "$OUT/run.log") 2>&1

echo "== environment"
date -u
git rev-parse HEAD 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
nvcc --version 2>/dev/null | tail -1 || true
python -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'

export UPREID_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

echo "== build (UPREID_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
python -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1
rc=$?
tail -n 30 "$OUT/build.log"
if [ $rc -ne 0 ]; then
  echo "run_device: FAIL (build, see build.log)"
  exit 1
fi
python -c 'import torch, upreid.ops as o; print("built_with_cuda:", o.built_with_cuda())'

status=0
echo "== tests"
python -m pytest -x tests -m "not slow" -q -rs 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: tests FAILED"; status=1; }

echo "== benchmarks"
python benchmarks/bench_ops.py --device cuda --csv "$OUT/results.csv" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: benchmark FAILED"; status=1; }
BENCH_EXTRA="${BENCH_EXTRA---dtype bfloat16 --shapes full}"
if [ -n "$BENCH_EXTRA" ]; then
  # shellcheck disable=SC2086
  python benchmarks/bench_ops.py --device cuda $BENCH_EXTRA --csv "$OUT/results.csv" 2>&1 | tee "$OUT/bench_extra.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: extra benchmark FAILED"; status=1; }
fi

[ $status -eq 0 ] && echo "run_device: OK" || echo "run_device: FAIL"
exit $status
