"""Registers, spills and register-bound occupancy of the fused tile kernels, from `nvcc -Xptxas -v`
output (tools/cuda_compile_check.sh feeds it the kernel build's log).

    python tools/ptxas_report.py BUILD_LOG

Prints one line per tile kernel and architecture. Fails (exit 1) when a CUDA-core tile kernel with
fp32 accumulation (SimtPolicy<T, float>, __launch_bounds__(128, 3) on sm_80 / sm_90) needs more
registers than 3 blocks of 128 threads per SM allow, or when the log holds no tile kernel at all
(the flag was lost). Only the sm_80 and sm_90 builds are checked (other parts get no cap).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

REGS_PER_SM = 65536
THREADS = 128  # kThreads of the tile kernels
MIN_BLOCKS_SIMT_F32 = 3

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def demangle(names: list[str]) -> list[str]:
    """Readable names through c++filt (binutils); the mangled ones where it is missing."""
    if shutil.which("c++filt") is None:
        return names
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse(text: str) -> list[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "spill": (0, 0)}
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["spill"] = (int(m.group(1)), int(m.group(2)))
        m = _REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            rows.append(cur)
            cur = None
    names = demangle([r["mangled"] for r in rows])
    for r, n in zip(rows, names):
        r["name"] = n
    return rows


def short(name: str) -> str:
    """'upreid::cuda::(anonymous namespace)::nce_dk_tiles<upreid::cuda::SimtPolicy<float, float> >(...)'
    -> 'nce_dk_tiles<SimtPolicy<float, float> >'"""
    name = name.replace("upreid::cuda::", "").replace("(anonymous namespace)::", "")
    name = name[5:] if name.startswith("void ") else name
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def blocks_by_regs(regs: int) -> int:
    per_thread = (regs + 7) // 8 * 8  # allocation granularity: 256 registers a warp
    return REGS_PER_SM // (per_thread * THREADS)


# Tile kernels and the capped policy, on the mangled names (no c++filt needed to decide):
# "...13nce_fwd_tilesINS0_10SimtPolicyIffEEEE...", SimtPolicy<__half, float> "10SimtPolicyI6__halffEE",
# SimtPolicy<__nv_bfloat16, float> "10SimtPolicyI13__nv_bfloat16fEE".
_TILE = re.compile(r"\d+\w+_tilesI")
_SIMT_F32 = re.compile(r"10SimtPolicyI(?:f|6__half|13__nv_bfloat16)fEE")


def main(argv: list[str]) -> int:
    text = open(argv[1], encoding="utf-8", errors="replace").read()
    rows = [r for r in parse(text) if _TILE.search(r["mangled"])]
    if not rows:
        print("ptxas_report: no tile kernel in the log (was the build run with -Xptxas -v?)")
        return 1
    bad = []
    print(f"{'arch':6} {'regs':>4} {'spill st/ld':>11} {'blocks/SM (regs)':>16}  kernel")
    for r in sorted(rows, key=lambda r: (r["arch"], short(r["name"]))):
        b = blocks_by_regs(r["regs"])
        k = short(r["name"])
        print(f"{r['arch']:6} {r['regs']:4d} {r['spill'][0]:5d}/{r['spill'][1]:<5d} {b:16d}  {k}")
        if r["arch"] in ("sm_80", "sm_90") and _SIMT_F32.search(r["mangled"]) and b < MIN_BLOCKS_SIMT_F32:
            bad.append(f"{r['arch']} {k}: {r['regs']} registers allow {b} blocks of {THREADS} threads")
    if bad:
        print("ptxas_report: FAIL, fp32-accumulating CUDA-core tile kernels below "
              f"{MIN_BLOCKS_SIMT_F32} blocks per SM:\n  " + "\n  ".join(bad))
        return 1
    print(f"ptxas_report: OK ({len(rows)} tile kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
