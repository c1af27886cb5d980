"""The emulation harness checks itself, then checks the kernels for races.

* The emulator's checks fire on kernels with known defects (selftest/selftest_kernel.cu): barrier
  divergence, warp masks, deadlock, launch limits, __trap, shared-memory overrun and poisoning.
* Race mode (ThreadSanitizer, one OS thread per CUDA thread) reports a missing barrier: in the
  self-test kernels, and in a copy of the real kernels with one barrier deleted; functional mode
  fails a copy of a real kernel whose arithmetic is perturbed.
* Every real kernel, run small in race mode on both tile policies: no race, no emulator error.
"""
from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

import emu
from emu import ops as eo
from helpers import feats, max_err
from upreid.ops import reference

why = emu.available()
pytestmark = [pytest.mark.cuda_emu, pytest.mark.slow, pytest.mark.skipif(why is not None, reason=why or "")]


def selftest(case, threads=64, grid=(1, 1), smem=0, optin=0, out=None, a=None, b=None, c=None):
    e = emu.load("selftest")
    e.configure()
    e.clear()
    out = out if out is not None else torch.zeros(4096, dtype=torch.int32)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else 0)  # noqa: E731
    rc = e.lib.emu_selftest(case, grid[0], grid[1], threads, ctypes.c_size_t(smem), optin, ptr(out), ptr(a),
                            ptr(b), ptr(c))
    return rc, e.errors(), out


@pytest.mark.parametrize("case,message", [
    (0, "__syncthreads divergence"),
    (1, "excludes the lane itself"),
    (2, "reads lane 20, which is not in the mask"),
    (3, "exited"),
    (4, "deadlock"),
    (6, "__trap()"),
])
def test_emulator_reports_defective_kernels(case, message):
    rc, log, _ = selftest(case)
    assert rc == 719 and message in log, (rc, log)  # cudaErrorLaunchFailure


def test_emulator_runs_correct_collectives():
    rc, log, out = selftest(5, threads=96)
    assert rc == 0 and log == ""
    assert torch.all(out[:96] == sum(range(32)))


@pytest.mark.parametrize("threads,grid,smem,optin,message", [
    (2048, (1, 1), 0, 0, "exceeds the device limit (1024"),
    (32, (1, 70000), 0, 0, "y, z <= 65535"),
    (32, (1, 1), 64 * 1024, 0, "need cudaFuncSetAttribute"),
])
def test_emulator_enforces_launch_limits(threads, grid, smem, optin, message):
    rc, log, _ = selftest(8, threads=threads, grid=grid, smem=smem, optin=optin)
    assert rc != 0 and message in log, (rc, log)


def test_emulator_poisons_shared_memory_and_guards_its_end():
    out = torch.zeros(8, dtype=torch.int32)
    rc, log, out = selftest(8, threads=32, smem=64 * 1024, optin=64 * 1024, out=out)  # opted in: allowed
    assert rc == 0 and log == ""
    assert out[0].item() == -1 and out[1].item() == -1  # 0xffffffff: static and dynamic poisoned
    rc, log, _ = selftest(7, threads=32, smem=100)
    assert rc == 719 and "wrote past the end of its 100 bytes of dynamic shared memory" in log


def test_wmma_stand_in_multiplies():
    torch.manual_seed(0)
    a, b = torch.randn(16, 16).half(), torch.randn(16, 16).half()
    c = torch.randn(16, 16)
    out = torch.zeros(16, 16)
    rc, log, out = selftest(13, threads=32, out=out, a=a, b=b, c=c)
    assert rc == 0 and log == ""
    assert max_err(out, a.double() @ b.double() + c.double()) < 1e-5


# ---- race mode ---------------------------------------------------------------------------------------

def test_race_mode_sees_missing_barriers_in_self_tests():
    # 9/10: a value published in shared memory without/with __syncthreads (two warps);
    # 11/12: WMMA fragments stored and read back by other lanes without/with __syncwarp (one warp)
    for case, racy, threads in ((9, True, 64), (10, False, 64), (11, True, 32), (12, False, 32)):
        rc, races, out, err = emu.run_race("selftest", [f"case={case}", f"threads={threads}"])
        assert rc == 0 and "status=0" in out, (case, out, err[-2000:])
        assert (races > 0) == racy, (case, races, err[-3000:])


def _copy_without(tmp_path, rel: str, line_text: str, occurrence: int = 0):
    """A copy of csrc/ with one line (the `occurrence`-th containing line_text) deleted."""
    dst = tmp_path / "csrc"
    shutil.copytree(emu.CSRC, dst)
    path = dst / rel
    lines = path.read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line_text in line]
    assert len(hits) > occurrence, f"{line_text!r} not found in {rel}"
    del lines[hits[occurrence]]
    path.write_text("".join(lines))
    return dst


def _assert_deletion_races(tmp_path, op: str, args: list[str], rel: str, line_text: str, occurrence: int = 0):
    """The case runs race-free on the real sources and races with the line deleted."""
    rc, races, out, err = emu.run_race(op, args)
    assert rc == 0 and races == 0 and out.strip() == "status=0", (out, err[-3000:])
    broken = _copy_without(tmp_path, rel, line_text, occurrence)
    rc, races, out, err = emu.run_race(op, args, csrc=broken)
    assert races > 0, (out, err[-3000:])


def test_race_mode_catches_a_deleted_barrier_in_the_tile_loop(tmp_path):
    args = ["M=64", "N=64", "K=640", "D=16", "g=0", "dtype=f32", "sms=1"]
    _assert_deletion_races(tmp_path, "info_nce", args, "common/cuda_tiles.cuh", "__syncthreads();  // sC, sQ and the column")


def test_race_mode_catches_a_deleted_barrier_before_restaging_a_chunk(tmp_path):
    """Tensor cores above D = 128 (TcWide): the column chunks are restaged one at a time for the
    output product; without the barrier before a restage, one warp overwrites a chunk that others
    still read."""
    args = ["M=16", "N=16", "K=64", "D=140", "g=1", "dtype=bf16", "cc=9", "train=1", "sms=1"]
    _assert_deletion_races(tmp_path, "info_nce", args, "common/cuda_tiles.cuh", "__syncthreads();  // every warp is done with the staged")


def test_race_mode_catches_a_deleted_syncwarp_on_the_tensor_core_path(tmp_path):
    # fp32 at "medium" (prec=2): the WMMA policy TcPolicy<bf16, float> (fp16/bf16 inputs take mma.sync)
    args = ["M=16", "N=16", "K=64", "D=16", "g=0", "dtype=f32", "prec=2", "train=1", "sms=1"]
    # TcPolicy::store_o: the warp reads back the fragments it just stored
    src = (emu.CSRC / "common/cuda_tile_policies.cuh").read_text()
    k = src.index("__device__ static __forceinline__ void store_o")
    occurrence = src[:k].count("        __syncwarp();\n")
    _assert_deletion_races(tmp_path, "info_nce", args, "common/cuda_tile_policies.cuh", "        __syncwarp();", occurrence)


def test_race_mode_catches_a_deleted_syncwarp_on_the_mma_sync_path(tmp_path):
    """bf16 inputs (ldmatrix / mma.sync): the epilogue's lanes write W, then ldmatrix hands every lane
    other lanes' W elements for the output product; without the __syncwarp between them, a race."""
    args = ["M=16", "N=16", "K=64", "D=16", "g=0", "dtype=bf16", "cc=9", "train=1", "sms=1"]
    src = (emu.CSRC / "common/cuda_tiles.cuh").read_text()
    k = src.index("epi.tile(sS, sW, c0, wrow0, lane);")
    occurrence = src[:k].count("      __syncwarp();\n")  # the one right after the epilogue
    _assert_deletion_races(tmp_path, "info_nce", args, "common/cuda_tiles.cuh", "      __syncwarp();", occurrence)


def test_race_mode_catches_a_cp_async_copy_into_a_buffer_still_read(tmp_path):
    """The pipelined column tiles (bf16, D = 64: every row piece a copy, full tiles, two splits of 3
    and 4 tiles): without the end-of-tile barrier, a thread's prefetch of tile t + 2 overwrites the
    buffer other warps still read for tile t (the emulator poisons a copy's destination when it is
    issued)."""
    args = ["M=16", "K=448", "D=64", "dtype=bf16", "cc=9", "sms=1"]
    _assert_deletion_races(tmp_path, "bank_kl", args, "common/cuda_tiles.cuh", "__syncthreads();  // sC, sQ and the column")


def test_functional_mode_catches_a_missing_cp_async_wait(tmp_path):
    """Copies land only when a wait covers them: without the wait, the tile is read before its data
    arrives and the copies are still pending when the threads exit."""
    broken = _copy_without(tmp_path, "common/cuda_tiles.cuh", "__pipeline_wait_prior(1);")
    e = emu.load("bank_kl", csrc=broken)
    e.configure(major=9, sms=1)
    torch.manual_seed(0)
    s, te, bank = (feats(n, 32, dtype=torch.bfloat16) for n in (20, 20, 200))
    with pytest.raises(eo.EmuError, match="cp.async copies never waited for"):
        eo.bank_kl(s, te, bank, 0.1, 0.07, emu=e)


def test_functional_mode_catches_perturbed_arithmetic(tmp_path):
    dst = tmp_path / "csrc"
    shutil.copytree(emu.CSRC, dst)
    p = dst / "common/cuda_utils.cuh"
    src = p.read_text()
    old = "__device__ __forceinline__ double acc_exp_precise(double x) { return exp(x); }"
    assert old in src
    p.write_text(src.replace(old, old.replace("exp(x)", "exp(x) * (1.0 + 1e-6)")))
    torch.manual_seed(0)
    q, keys, bank = feats(40, 24, dtype=torch.float64), feats(40, 24, dtype=torch.float64), feats(90, 24, dtype=torch.float64)
    pos = torch.randint(0, 40, (40,))
    ref_loss, _ = reference.info_nce(q, keys, pos, bank, 0.1, 0)
    good = eo.info_nce(q, keys, pos, bank, 0.1, 0)[0]
    bad = eo.info_nce(q, keys, pos, bank, 0.1, 0, emu=emu.load("info_nce", csrc=dst))[0]
    assert max_err(good, ref_loss) < 1e-9
    assert max_err(bad, ref_loss) > 1e-7


# Every kernel, small, in race mode: (op, arguments). Both tile policies (cc=9: tensor cores for
# fp16/bf16; cc=7: CUDA cores; prec=1: fp32 "high" on split-bf16 tensor cores), one and several
# splits, every group mode, both backward variants.
RACE_CASES = [
    ("info_nce", "M=20 N=20 K=40 D=20 g=0 dtype=f32 sms=2"),
    ("info_nce", "M=20 N=24 K=40 D=40 g=4 dtype=bf16 cc=9 train=1 sms=2"),
    ("info_nce", "M=18 N=18 K=70 D=16 g=1 dtype=f16 cc=9 sms=1"),
    ("info_nce", "M=18 N=18 K=30 D=33 g=0 dtype=f16 cc=7 train=1 sms=2"),
    ("info_nce", "M=9 N=9 K=0 D=5 g=9 dtype=f64 sms=1"),
    ("bank_kl", "M=20 K=70 D=20 dtype=f32 sms=2"),
    ("bank_kl", "M=20 K=70 D=130 dtype=bf16 cc=9 sms=2"),  # TcWide
    ("bank_kl", "M=17 K=40 D=16 dtype=f16 cc=7 sms=1"),
    ("bank_kl", "M=20 K=70 D=24 dtype=bf16 cc=9 train=1 sms=2"),  # training forward, stacked rows
    ("bank_kl", "M=9 K=40 D=40 dtype=f32 train=1 sms=1"),
    ("bank_kl", "M=20 K=400 D=32 dtype=bf16 cc=9 train=1 sms=1"),  # cp.async double buffer: 2 splits of 3-4 tiles
    ("info_nce", "M=20 N=20 K=40 D=20 g=0 dtype=f32 prec=1 train=1 sms=2"),  # fp32 "high": split-bf16
    ("bank_kl", "M=20 K=70 D=20 dtype=f32 prec=1 sms=2"),
    # CUDA cores with D > 128: two output passes, the column chunks staged again for each
    ("info_nce", "M=18 N=18 K=40 D=140 g=0 dtype=f32 train=1 sms=1"),
    ("bank_kl", "M=17 K=40 D=140 dtype=f32 sms=1"),
    # tensor cores with D > 128: O in shared memory (TcWide), chunks restaged one at a time
    ("info_nce", "M=18 N=18 K=70 D=140 g=0 dtype=bf16 cc=9 train=1 sms=1"),
    ("rank", "Q=5 G=60 max_rank=10 ids=4 cams=3 dtype=f32"),
    ("rank", "Q=3 G=40 max_rank=50 ids=2 cams=2 dtype=bf16"),
    ("rerank", "N=70 Q=8 D=8 k1=6 k2=3 dtype=f32"),  # 2 panels: the diagonal launch, one round
    ("rerank", "N=30 Q=6 D=4 k1=5 k2=1 dense=1 dtype=f64"),
    ("rerank", "N=70 Q=8 D=40 k1=6 k2=1 dtype=f32 prec=1 stage1=1"),  # fp32 "high": split-bf16 tiles
]


@pytest.mark.parametrize("op,args", RACE_CASES, ids=[f"{o}:{a.replace(' ', ',')}" for o, a in RACE_CASES])
def test_kernels_have_no_races(op, args):
    rc, races, out, err = emu.run_race(op, args.split())
    assert rc == 0, err[-3000:]
    assert out.strip() == "status=0", out
    assert races == 0, err[-4000:]
