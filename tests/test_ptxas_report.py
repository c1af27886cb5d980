"""tools/ptxas_report.py: the register report of tools/cuda_compile_check.sh (no nvcc needed)."""
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ptxas_report.py"
SIMT_F32 = "_ZN6upreid4cuda12_GLOBAL__N_112nce_dk_tilesINS0_10SimtPolicyIffEEEEvNS1_11NceTileArgsIfEE"
TC_BF16 = "_ZN6upreid4cuda12_GLOBAL__N_112nce_dk_tilesINS0_8TcPolicyI13__nv_bfloat16S3_EEEEvNS1_11NceTileArgsIfEE"


def entry(mangled: str, regs: int, spill: int = 0, arch: str = "sm_90") -> str:
    return (f"ptxas info    : Compiling entry function '{mangled}' for '{arch}'\n"
            f"ptxas info    : Function properties for {mangled}\n"
            f"    0 bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads\n"
            f"ptxas info    : Used {regs} registers, used 1 barriers, 512 bytes cmem[0]\n")


def run(tmp_path, text: str):
    log = tmp_path / "kernels.log"
    log.write_text(text)
    return subprocess.run([sys.executable, str(TOOL), str(log)], capture_output=True, text=True)


def test_within_budget_passes_and_lists_each_kernel(tmp_path):
    r = run(tmp_path, entry(SIMT_F32, 168, 88) + entry(TC_BF16, 255))
    assert r.returncode == 0, r.stdout
    assert "ptxas_report: OK (2 tile kernels)" in r.stdout
    assert "168    88/88" in r.stdout and "nce_dk_tiles<SimtPolicy<float, float> >" in r.stdout


@pytest.mark.parametrize("regs", [170, 255])
def test_fp32_cuda_core_kernel_over_budget_fails(tmp_path, regs):
    """170 registers round to 176 per thread: 65536 / (176 x 128) = 2 blocks."""
    r = run(tmp_path, entry(SIMT_F32, regs) + entry(TC_BF16, 255))
    assert r.returncode == 1
    assert f"{regs} registers allow 2 blocks" in r.stdout


def test_a_log_without_tile_kernels_fails(tmp_path):
    r = run(tmp_path, "nvcc: nothing reported\n")
    assert r.returncode == 1 and "no tile kernel" in r.stdout


def test_decides_on_mangled_names_without_cpp_filt(tmp_path):
    """Without binutils' c++filt the report prints mangled names but still finds the capped kernels."""
    log = tmp_path / "kernels.log"
    log.write_text(entry(SIMT_F32, 255) + entry(TC_BF16, 255))
    env = {"PATH": str(tmp_path / "no-tools")}  # no c++filt on the path
    r = subprocess.run([sys.executable, str(TOOL), str(log)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "255 registers allow 2 blocks" in r.stdout, r.stdout + r.stderr
    log.write_text(entry(SIMT_F32, 168) + entry(TC_BF16, 255))
    r = subprocess.run([sys.executable, str(TOOL), str(log)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "OK (2 tile kernels)" in r.stdout, r.stdout + r.stderr


def test_other_architectures_are_not_capped(tmp_path):
    r = run(tmp_path, entry(SIMT_F32, 254, arch="sm_86"))
    assert r.returncode == 0, r.stdout
