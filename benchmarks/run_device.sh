#!/usr/bin/env bash
# GPU machine run: build upreid with its CUDA kernels, run the test suite (CUDA tests included),
# then the operator benchmarks. Everything is logged into OUTDIR (run.log, build.log, tests.log,
# bench*.log) and the benchmark rows go to OUTDIR/results.csv.
#
#   bash benchmarks/run_device.sh OUTDIR [STAGES]
#
# STAGES: a comma list of build, cuda-tests, tests, bench, bench-extra (default: all of them in that
# order), and two stages run only when named: bench-eval (bench_eval.py, the Market1501-sized
# workload) and bench-pretrain (bench_pretrain.py's GPU settings); their GPU run times are unknown. A device command may run 10 minutes at most: on a lease, call the stages in two or three
# commands (e.g. "build,cuda-tests", then "bench,bench-extra", then "tests"); the build stays on the
# machine while it is warm. cuda-tests runs the tests marked cuda (the kernels against references);
# tests runs the rest of the fast tier. Neither stops at the first failure: a lease reports them all.
#
# Env: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (build parallelism), BENCH_EXTRA (the
# bench-extra stage's bench_ops.py options, default "--dtype bfloat16 --shapes full").
set -uo pipefail
OUT="${1:?usage: benchmarks/run_device.sh OUTDIR [build,cuda-tests,tests,bench,bench-extra]}"
STAGES=",${2:-build,cuda-tests,tests,bench,bench-extra},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
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

status=0
if want build; then
  echo "== build (UPREID_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  python -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1
  rc=$?
  tail -n 30 "$OUT/build.log"
  if [ $rc -ne 0 ]; then
    echo "run_device: FAIL (build, see build.log)"
    exit 1
  fi
fi
python -c 'import torch, upreid.ops as o; print("built_with_cuda:", o.built_with_cuda())'

if want cuda-tests; then
  echo "== CUDA tests"
  python -m pytest tests -m cuda -q -rs --maxfail=50 2>&1 | tee "$OUT/cuda_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: CUDA tests FAILED"; status=1; }
fi
if want tests; then
  echo "== the other fast tests"
  python -m pytest tests -m "not slow and not cuda" -q -rs --maxfail=50 2>&1 | tee "$OUT/tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: tests FAILED"; status=1; }
fi

if want bench; then
  echo "== benchmarks"
  python benchmarks/bench_ops.py --device cuda --csv "$OUT/results.csv" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: benchmark FAILED"; status=1; }
fi
if want bench-extra; then
  BENCH_EXTRA="${BENCH_EXTRA---dtype bfloat16 --shapes full}"
  # shellcheck disable=SC2086
  python benchmarks/bench_ops.py --device cuda $BENCH_EXTRA --csv "$OUT/results.csv" 2>&1 | tee "$OUT/bench_extra.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: extra benchmark FAILED"; status=1; }
fi

if want bench-eval; then
  python benchmarks/bench_eval.py --device cuda --workload market1501 --reference rerank_dense,rank \
    --csv "$OUT/results.csv" 2>&1 | tee "$OUT/bench_eval.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: evaluation benchmark FAILED"; status=1; }
fi
if want bench-pretrain; then
  python benchmarks/bench_pretrain.py --device cuda --csv "$OUT/results.csv" 2>&1 | tee "$OUT/bench_pretrain.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_device: pre-training benchmark FAILED"; status=1; }
fi

[ $status -eq 0 ] && echo "run_device: OK ($STAGES)" || echo "run_device: FAIL ($STAGES)"
exit $status
