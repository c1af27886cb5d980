#!/usr/bin/env bash
# CUDA compile check for CI (no GPU needed; nvcc required):
#   1. configure + build the CMake target upreid_cuda_kernels: every csrc/*/*_kernel.cu by nvcc
#      alone, for sm_75, sm_80 and sm_90 (no torch involved; sm_75: the CUDA-core fallbacks of T4-class
#      parts must still build), with ptxas's register report checked by
#      tools/ptxas_report.py (fp32 CUDA-core tile kernels: 3 blocks per SM);
#   2. compile every csrc/*/*_cuda.cpp torch glue file with the host compiler (-fsyntax-only) against
#      the installed torch headers and the CUDA runtime headers, with -DUPREID_WITH_CUDA.
# Prints "cuda_compile_check: OK" or "cuda_compile_check: FAIL (...)"; exits non-zero on failure.
set -uo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR="${UPREID_CUDA_CHECK_DIR:-build/cuda-check}"
JOBS="${UPREID_CUDA_CHECK_JOBS:-2}"
failed=()
mkdir -p "$BUILD_DIR"
LOG="$BUILD_DIR/logs"
mkdir -p "$LOG"

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  echo "cuda_compile_check: FAIL (nvcc not found)"
  exit 1
fi

# --- 1. kernels, nvcc only ---------------------------------------------------------------------
generator=()
# ninja prints each command's output whole; make -jN may interleave two ptxas reports
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); else JOBS=1; fi
echo "== [1/2] nvcc: csrc/*/*_kernel.cu for sm_75, sm_80, sm_90 (CMake target upreid_cuda_kernels)"
if cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="75;80;90" -DUPREID_WITH_TORCH=OFF \
      -DCMAKE_CUDA_FLAGS="-Xptxas -v" \
      >"$LOG/configure.log" 2>&1 || { cat "$LOG/configure.log"; false; }; then
  # A clean build, so that ptxas reports every kernel (its -v output is the register report below).
  cmake --build "$BUILD_DIR" --target clean >/dev/null 2>&1 || true
  if ! cmake --build "$BUILD_DIR" --target upreid_cuda_kernels -j "$JOBS" >"$LOG/kernels.log" 2>&1; then
    grep -v "^ptxas info\|bytes stack frame\|^ *$" "$LOG/kernels.log" | tail -n 60
    failed+=("kernels")
  else
    echo "== registers and spills of the tile kernels (ptxas)"
    python tools/ptxas_report.py "$LOG/kernels.log" || failed+=("register budget")
  fi
else
  failed+=("cmake configure")
fi

# --- 2. torch glue, host compiler ----------------------------------------------------------------
echo "== [2/2] host compiler: csrc/*/*_cuda.cpp against the installed torch headers"
read -r -d '' PY <<'PYEOF'
import os, torch
from torch.utils.cpp_extension import include_paths, CUDA_HOME
print(" ".join(include_paths()))
print(CUDA_HOME or "")
print(os.path.isfile(os.path.join(include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")))
PYEOF
if info="$(python -c "$PY" 2>/dev/null)"; then
  torch_inc=$(sed -n 1p <<<"$info")
  cuda_home=$(sed -n 2p <<<"$info")
  has_macros=$(sed -n 3p <<<"$info")
  cuda_inc=""
  for cand in "${CUDA_HOME:-}" "$cuda_home" "$(dirname "$(dirname "$NVCC")")" /usr/local/cuda; do
    if [ -n "$cand" ] && [ -f "$cand/include/cuda_runtime.h" ]; then cuda_inc="$cand/include"; break; fi
  done
  if [ -z "$cuda_inc" ]; then
    failed+=("CUDA include dir not found")
  else
    flags=(-std=c++20 -fsyntax-only -Wall -Wextra -DUPREID_WITH_CUDA=1 -Icsrc -isystem "$cuda_inc")
    for p in $torch_inc; do flags+=(-isystem "$p"); done
    # A CPU-only torch lacks this generated header (only Windows export macros live there).
    if [ "$has_macros" != "True" ]; then flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE); fi
    CXX_BIN="${CXX:-g++}"
    pids=()
    for f in csrc/*/*_cuda.cpp; do
      [ -e "$f" ] || continue
      echo "   $CXX_BIN $f"
      "$CXX_BIN" "${flags[@]}" "$f" >"$LOG/$(basename "$f").log" 2>&1 &
      pids+=("$!:$f")
    done
    for pf in "${pids[@]}"; do
      if ! wait "${pf%%:*}"; then
        cat "$LOG/$(basename "${pf#*:}").log"
        failed+=("${pf#*:}")
      elif [ -s "$LOG/$(basename "${pf#*:}").log" ]; then
        cat "$LOG/$(basename "${pf#*:}").log"  # warnings
      fi
    done
  fi
else
  failed+=("torch not importable (glue check needs its headers)")
fi

if [ "${#failed[@]}" -eq 0 ]; then
  echo "cuda_compile_check: OK (kernels for sm_75+sm_80+sm_90, glue files)"
  exit 0
fi
echo "cuda_compile_check: FAIL (${failed[*]})"
exit 1
