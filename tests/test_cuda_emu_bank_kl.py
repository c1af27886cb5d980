"""bank_kl's CUDA kernels (forward, training forward, backward), run on the CPU by the emulation
harness (tests/emu), against the fp64 references, in every precision and on both tile policies."""
from __future__ import annotations

import pytest
import torch

from emu import ops as eo
from helpers import assert_tolerance, default_atol, feats, max_err
from upreid.ops import reference
from cuda_emu_common import (
    configure,
    FP32_MODES,
    high_atol,
    HIGH_VS_MEDIUM,
    bkl_fp32,
    BKL_CASES,
    bkl_exact,
    run_bkl,
    bkl_train_exact,
    bkl_train_grad,
    MARKS)

pytestmark = MARKS


@pytest.mark.parametrize("mode", list(FP32_MODES))
@pytest.mark.parametrize("case", [(40, 150, 32), (20, 70, 129), (5, 40, 2048)], ids=["D32", "D129", "D2048"])
def test_bank_kl_fp32_matmul_precision(mode, case):
    got, ref, base, tiles = bkl_fp32(mode, case)
    policy, base_dtype = FP32_MODES[mode]
    assert tiles and all(policy in x for x in tiles), tiles
    for name, a, b, c, scale in zip(("kl", "lse_s", "lse_t", "grad"), got, ref, base, (1, 10, 10, 1)):
        atol = high_atol(b) if mode == "high" else default_atol(base_dtype, scale)
        assert_tolerance(a, b, c, atol, f"{name} {mode}")


def test_bank_kl_fp32_high_is_much_closer_than_medium():
    hi = [max_err(a, b) for a, b in zip(*bkl_fp32("high")[:2])]
    med = [max_err(a, b) for a, b in zip(*bkl_fp32("medium")[:2])]
    for name, h, m in zip(("kl", "lse_s", "lse_t", "grad"), hi, med):
        assert h * HIGH_VS_MEDIUM <= m, f"{name}: high {h:.3g} vs medium {m:.3g}"


def _inputs(case, dev, seed):
    """Configure the emulated device; student, teacher and bank rows (fp64 unit vectors) of ``case``."""
    configure("bank_kl", dev)
    m, k, d = case
    torch.manual_seed(seed)
    return feats(m, d, dtype=torch.float64), feats(m, d, dtype=torch.float64), feats(k, d, dtype=torch.float64)


def _upstream(m):
    """Upstream gradients of the KL and of the student's logsumexp (fp64, one per row)."""
    return torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)


def _torch_bank_kl(s, te, bank, dtype, gkl, gls):
    """Plain PyTorch's (kl, lse_s, lse_t, student gradient) in ``dtype``: the baseline the tolerance
    rule compares the kernels' error with."""
    sd = s.to(dtype).clone().requires_grad_()
    kl, ls, lt = reference.bank_kl(sd, te.to(dtype), bank.to(dtype), 0.1, 0.1)
    (kl.double() * gkl + ls.double() * gls).sum().backward()
    return kl, ls, lt, sd.grad


def _low_precision(test):
    """fp32 / fp16 / bf16 on the tensor-core (sm90) and the older (sm75) paths, four shapes."""
    test = pytest.mark.parametrize("case", BKL_CASES[1:5], ids=lambda c: "M{}K{}D{}".format(*c))(test)
    test = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)(test)
    return pytest.mark.parametrize("dev", ["sm90", "sm75"])(test)


@pytest.mark.parametrize("dev", ["sm90", "sm90-1sm"])
@pytest.mark.parametrize("case", BKL_CASES, ids=lambda c: "M{}K{}D{}".format(*c))
def test_bank_kl_fp64_matches_reference(case, dev):
    s, te, bank = _inputs(case, dev, 1)
    gkl, gls = _upstream(case[0])
    for a, b, name in zip(run_bkl(s, te, bank, 0.1, 0.05, gkl, gls, torch.float64),
                          bkl_exact(s, te, bank, 0.1, 0.05, gkl, gls), ("kl", "lse_s", "lse_t", "grad")):
        assert max_err(a, b) < 1e-9, f"{name}: {max_err(a, b):.3g}"


@_low_precision
def test_bank_kl_low_precision_tolerance(case, dtype, dev):
    s, te, bank = _inputs(case, dev, 2)
    gkl, gls = _upstream(case[0])
    got = run_bkl(s, te, bank, 0.1, 0.1, gkl, gls, dtype)
    ref = bkl_exact(s, te, bank, 0.1, 0.1, gkl, gls)
    base = _torch_bank_kl(s, te, bank, dtype, gkl, gls)
    for name, a, b, c, scale in zip(("kl", "lse_s", "lse_t", "grad"), got, ref, base, (1, 10, 10, 1)):
        assert_tolerance(a, b, c, default_atol(dtype, scale), f"{name} {dtype}")


@pytest.mark.parametrize("dev", ["sm90", "sm90-1sm"])
@pytest.mark.parametrize("case", BKL_CASES, ids=lambda c: "M{}K{}D{}".format(*c))
def test_bank_kl_train_fp64_matches_reference(case, dev):
    """The training forward (student and teacher rows stacked in one tile pass) and the gradient its
    expected bank vectors give, against fp64."""
    s, te, bank = _inputs(case, dev, 1)
    got = eo.bank_kl_train(s, te, bank, 0.1, 0.05)
    ref = bkl_train_exact(s, te, bank, 0.1, 0.05)
    for name, a, b in zip(("kl", "lse_s", "lse_t", "mean_s", "mean_t"), got, ref):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        assert max_err(a, b) < 1e-9, f"{name}: {max_err(a, b):.3g}"
    gkl, gls = _upstream(case[0])
    grad = bkl_train_grad(gkl, gls, got[3], got[4], 0.1)
    assert max_err(grad, bkl_exact(s, te, bank, 0.1, 0.05, gkl, gls)[3]) < 1e-9


@_low_precision
def test_bank_kl_train_low_precision_tolerance(case, dtype, dev):
    s, te, bank = _inputs(case, dev, 2)
    got = eo.bank_kl_train(s.to(dtype), te.to(dtype), bank.to(dtype), 0.1, 0.1)
    ref = bkl_train_exact(s, te, bank, 0.1, 0.1)
    base = reference.bank_kl(s.to(dtype), te.to(dtype), bank.to(dtype), 0.1, 0.1)
    for name, a, b, c, scale in zip(("kl", "lse_s", "lse_t"), got, ref, base, (1, 10, 10)):
        assert_tolerance(a, b, c, default_atol(dtype, scale), f"{name} {dtype}")
    for name, a, b in zip(("mean_s", "mean_t"), got[3:], ref[3:]):  # expectations of unit vectors
        assert max_err(a, b) <= default_atol(dtype, 2), name
    # the gradient the training path gives, by the rule against plain PyTorch's gradient
    gkl, gls = _upstream(case[0])
    assert_tolerance(bkl_train_grad(gkl, gls, got[3], got[4], 0.1), bkl_exact(s, te, bank, 0.1, 0.1, gkl, gls)[3],
                     _torch_bank_kl(s, te, bank, dtype, gkl, gls)[3], default_atol(dtype, 1), f"grad {dtype}")


@pytest.mark.parametrize("mode", list(FP32_MODES))
def test_bank_kl_train_fp32_matmul_precision(mode):
    e = configure("bank_kl", "sm90")
    e.set_fp32_precision(mode)
    torch.manual_seed(3)
    s, te, bank = feats(40, 32, dtype=torch.float64), feats(40, 32, dtype=torch.float64), feats(150, 32, dtype=torch.float64)
    got = eo.bank_kl_train(s.float(), te.float(), bank.float(), 0.1, 0.05)
    policy, base_dtype = FP32_MODES[mode]
    tiles = [x for x in e.launches() if "_tiles" in x]
    assert tiles and all(policy in x for x in tiles), tiles
    ref = bkl_train_exact(s, te, bank, 0.1, 0.05)
    base = reference.bank_kl(s.to(base_dtype), te.to(base_dtype), bank.to(base_dtype), 0.1, 0.05)
    for name, a, b, c, scale in zip(("kl", "lse_s", "lse_t"), got, ref, base, (1, 10, 10)):
        atol = high_atol(b) if mode == "high" else default_atol(base_dtype, scale)
        assert_tolerance(a, b, c, atol, f"{name} {mode}")
    for a, b in zip(got[3:], ref[3:]):
        assert max_err(a, b) <= (high_atol(b) if mode == "high" else default_atol(base_dtype, 2))
