"""info_nce's CUDA kernels (forward, training forward, backward), run on the CPU by the emulation
harness (tests/emu), against the fp64 references: both tile policies, one and many column splits,
tile-edge shapes, every group mode, fp64/fp32/fp16/bf16, each fp32 matmul precision."""
from __future__ import annotations

import pytest
import torch

from emu import ops as eo
from helpers import assert_tolerance, default_atol, max_err
from cuda_emu_common import (
    configure,
    nce_inputs,
    nce_exact,
    nce_baseline,
    run_nce,
    NCE_CASES,
    NCE_IDS,
    FP32_MODES,
    high_atol,
    nce_fp32,
    HIGH_VS_MEDIUM,
    MARKS)

pytestmark = MARKS


@pytest.mark.parametrize("dev", ["sm90", "sm90-1sm"])
@pytest.mark.parametrize("train", [False, True], ids=["plain", "train"])
@pytest.mark.parametrize("case", NCE_CASES, ids=NCE_IDS)
def test_info_nce_fp64_matches_reference(case, train, dev):
    configure("info_nce", dev)
    m, n, k, d, g = case
    if train and k == 0:
        pytest.skip("the training variant needs a bank")
    q, keys, bank, pos = nce_inputs(m, n, k, d, torch.float64)
    gl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    got = run_nce(q, keys, bank, pos, 0.2, g, gl, gls, torch.float64, train)
    ref = nce_exact(q, keys, bank, pos, 0.2, g, gl, gls)
    names = ("loss", "lse", "grad_query", "grad_keys", "bank_mean")
    for name, a, b in zip(names, got, ref):
        if a is None:
            continue
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        assert max_err(a, b) < 1e-9, f"{name}: {max_err(a, b):.3g}"


@pytest.mark.parametrize("dev", ["sm90", "sm75"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [False, True], ids=["plain", "train"])
@pytest.mark.parametrize("case", NCE_CASES[:4] + NCE_CASES[6:7], ids=NCE_IDS[:4] + NCE_IDS[6:7])
def test_info_nce_low_precision_tolerance(case, train, dtype, dev):
    """DESIGN's rule: error vs fp64 at most 2x that of plain PyTorch in the same precision, plus a
    small allowance. sm90 runs fp16/bf16 on the tensor-core policy, sm75 on the CUDA-core one."""
    configure("info_nce", dev)
    m, n, k, d, g = case
    q, keys, bank, pos = nce_inputs(m, n, k, d, dtype)
    gl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    got = run_nce(q, keys, bank, pos, 0.1, g, gl, gls, dtype, train)
    ref = nce_exact(q, keys, bank, pos, 0.1, g, gl, gls)
    base = nce_baseline(q, keys, bank, pos, 0.1, g, gl, gls, dtype)
    for name, a, b, c, scale in zip(("loss", "lse", "grad_query", "grad_keys"), got, ref, base, (10, 10, 1, 1)):
        assert_tolerance(a, b, c, default_atol(dtype, scale), f"{name} {dtype}")
    if train and got[4] is not None:  # bank_mean: an expectation of unit vectors, |x| <= 1
        assert max_err(got[4], ref[4]) <= default_atol(dtype, 2), "bank_mean"


def test_info_nce_policies_and_splits_are_the_ones_asked_for():
    """The launch log shows the tensor-core kernels for fp16 on sm_90, the CUDA-core ones on sm_75,
    and fewer column splits on one SM than on 132."""
    q, keys, bank, pos = nce_inputs(70, 70, 3000, 32, torch.float16)

    def tiles(dev):
        e = configure("info_nce", dev)
        eo.info_nce(q.half(), keys.half(), pos, bank.half(), 0.1, 0)
        found = [s for s in e.launches() if "nce_fwd_tiles" in s]
        assert len(found) == 1, e.launches()
        return found[0]

    many, one, simt = tiles("sm90"), tiles("sm90-1sm"), tiles("sm75")
    assert "TcMmaPolicy<__half>" in many and "TcMmaPolicy<__half>" in one, (many, one)  # ldmatrix / mma.sync
    assert "SimtPolicy<__half, float>" in simt, simt
    splits = lambda s: int(s.split("grid=")[1].split(",")[1])  # noqa: E731
    assert splits(one) < splits(many), (one, many)


@pytest.mark.parametrize("train", [False, True], ids=["plain", "train"])
@pytest.mark.parametrize("g", [0, 1, 4], ids=["all-keys", "moco", "groups"])
def test_info_nce_only_the_gradients_asked_for(g, train):
    """need_grad_keys = false skips the keys' gradient (in all-keys mode the nce_dk_tiles pass is
    not launched at all) and leaves grad_query exact; need_grad_query = false likewise."""
    e = configure("info_nce", "sm90")
    q, keys, bank, pos = nce_inputs(40, 40, 100, 24, torch.float64)
    gl, gls = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    ref = nce_exact(q, keys, bank, pos, 0.2, g, gl, gls)
    _, lse, bm = eo.info_nce(q, keys, pos, bank, 0.2, g, train=train)
    gq, gk = eo.info_nce_backward(gl, gls, q, keys, pos, bank, lse, 0.2, g, bank_mean=bm, need_k=False)
    assert gk is None and max_err(gq, ref[2]) < 1e-9
    assert not any("nce_dk_tiles" in s for s in e.launches()), e.launches()
    gq, gk = eo.info_nce_backward(gl, gls, q, keys, pos, bank, lse, 0.2, g, bank_mean=bm, need_q=False)
    assert gq is None and max_err(gk, ref[3]) < 1e-9
    assert not any("nce_dq_tiles" in s for s in e.launches()), e.launches()
    assert any("nce_dk_tiles" in s for s in e.launches()) == (g == 0)


@pytest.mark.parametrize("mode", list(FP32_MODES))
@pytest.mark.parametrize("train", [False, True], ids=["plain", "train"])
def test_info_nce_fp32_matmul_precision(mode, train):
    """Each setting takes its policy and meets DESIGN's rule against its baseline: fp32 for
    "highest", bf16 for "medium"; "high" its stated bound (HIGH_REL)."""
    got, ref, base, tiles = nce_fp32(mode, (65, 63, 130, 40, 0), train)
    policy, base_dtype = FP32_MODES[mode]
    assert tiles and all(policy in s for s in tiles), tiles
    for name, a, b, c, scale in zip(("loss", "lse", "grad_query", "grad_keys"), got, ref, base, (10, 10, 1, 1)):
        assert a.dtype == torch.float32
        atol = high_atol(b) if mode == "high" else default_atol(base_dtype, scale)
        assert_tolerance(a, b, c, atol, f"{name} {mode}")


@pytest.mark.parametrize("train", [False, True], ids=["plain", "train"])
@pytest.mark.parametrize("case", NCE_CASES, ids=NCE_IDS)
def test_info_nce_fp32_high_on_every_case(case, train):
    """Split-bf16 on every shape (D = 1..2048: one and several D chunks and output passes, every
    group mode, K = 0, M = 1), within the stated bound."""
    if train and case[2] == 0:
        pytest.skip("the training variant needs a bank")
    got, ref, base, tiles = nce_fp32("high", case, train)
    assert tiles and all("TcSplitPolicy" in s for s in tiles), tiles
    for name, a, b, c in zip(("loss", "lse", "grad_query", "grad_keys"), got, ref, base):
        assert_tolerance(a, b, c, high_atol(b), f"{name} high")
    if train:
        assert max_err(got[4], ref[4]) <= high_atol(ref[4]), "bank_mean"


@pytest.mark.parametrize("train", [False, True], ids=["plain", "train"])
def test_info_nce_fp32_high_is_much_closer_than_medium(train):
    case = (65, 63, 130, 40, 0)
    errs = {}
    for mode in ("high", "medium"):
        got, ref, _, _ = nce_fp32(mode, case, train)
        errs[mode] = [max_err(a, b) for a, b in zip(got, ref) if a is not None]
    names = ("loss", "lse", "grad_query", "grad_keys", "bank_mean")
    for name, hi, med in zip(names, errs["high"], errs["medium"]):
        assert hi * HIGH_VS_MEDIUM <= med, f"{name}: high {hi:.3g} vs medium {med:.3g}"


def test_info_nce_extreme_temperatures_and_large_logits():
    configure("info_nce", "sm90")
    q, keys, bank, pos = nce_inputs(40, 40, 100, 24, torch.float64)
    for t, scale in ((0.01, 1.0), (10.0, 1.0), (1.0, 1e4)):
        gl, gls = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
        got = run_nce(q * scale, keys, bank, pos, t, 0, gl, gls, torch.float64, True)
        ref = nce_exact(q * scale, keys, bank, pos, t, 0, gl, gls)
        for a, b in zip(got[:4], ref[:4]):
            assert max_err(a, b) <= 1e-9 * max(1.0, b.abs().max().item()), (t, scale)
