"""Shared pieces of the CUDA emulation tests (test_cuda_emu_*.py): the emulated devices, the marks,
the fp64 references and the runners of info_nce and bank_kl. The kernels are rebuilt from csrc/ whenever
a source changes; race mode and the harness's self-tests are in test_cuda_emu_race.py."""
from __future__ import annotations

import pytest
import torch

import emu
from emu import ops as eo
from helpers import feats
from upreid.ops import reference

why = emu.available()
MARKS = [pytest.mark.cuda_emu, pytest.mark.slow, pytest.mark.skipif(why is not None, reason=why or "")]


# Emulated devices: sm_90 with 132 SMs (tensor-core policy for fp16/bf16, many column splits), the
# same with one SM (a single split), and sm_75 (CUDA-core policy for fp16/bf16).
DEVICES = {"sm90": dict(major=9, sms=132), "sm90-1sm": dict(major=9, sms=1), "sm75": dict(major=7, minor=5, sms=40)}


def configure(lib: str, dev: str):
    """The emulated device `dev`, fp32 at "highest" precision (PyTorch's default)."""
    e = emu.load(lib)
    e.configure(**DEVICES[dev])
    return e


# ---- info_nce --------------------------------------------------------------------------------------

def nce_inputs(m, n, k, d, dtype, seed=0):
    torch.manual_seed(seed)
    q, keys = feats(m, d), feats(n, d)
    bank = feats(k, d) if k else None
    pos = torch.randint(0, n, (m,))
    return [t.to(torch.float64) if t is not None else None for t in (q, keys, bank)] + [pos]


def nce_exact(q, keys, bank, pos, t, g, gl, gls):
    """fp64 reference values, gradients and the training forward's bank_mean."""
    q = q.double().clone().requires_grad_()
    keys = keys.double().clone().requires_grad_()
    b = bank.double() if bank is not None else None
    loss, lse = reference.info_nce(q, keys, pos, b, t, g)
    (loss * gl + lse * gls).sum().backward()
    if b is not None:
        p_bank = torch.softmax(torch.cat([_key_logits(q, keys, pos, t, g), q.detach() @ b.T / t], 1), 1)
        bank_mean = p_bank[:, keys.shape[0]:] @ b
    else:
        bank_mean = torch.zeros_like(q)
    return loss.detach(), lse.detach(), q.grad, keys.grad, bank_mean.detach()


def _key_logits(q, keys, pos, t, g):
    s = q.detach() @ keys.T / t
    n = keys.shape[0]
    if g not in (0, n):
        grp = torch.arange(n) // g
        s = s.masked_fill(grp.unsqueeze(0) != (pos // g).unsqueeze(1), float("-inf"))
    return s


def nce_baseline(q, keys, bank, pos, t, g, gl, gls, dtype):
    """Plain PyTorch in `dtype` (the tolerance rule's baseline)."""
    qd = q.to(dtype).clone().requires_grad_()
    kd = keys.to(dtype).clone().requires_grad_()
    loss, lse = reference.info_nce(qd, kd, pos, bank.to(dtype) if bank is not None else None, t, g)
    (loss.double() * gl + lse.double() * gls).sum().backward()
    return loss.detach(), lse.detach(), qd.grad, kd.grad


def run_nce(q, keys, bank, pos, t, g, gl, gls, dtype, train):
    qd, kd = q.to(dtype), keys.to(dtype)
    bd = bank.to(dtype) if bank is not None else None
    loss, lse, bm = eo.info_nce(qd, kd, pos, bd, t, g, train=train)
    gq, gk = eo.info_nce_backward(gl, gls, qd, kd, pos, bd, lse, t, g, bank_mean=bm)
    return loss, lse, gq, gk, bm


NCE_CASES = [  # M, N, K (0: no bank), D, group_size
    (1, 5, 17, 3, 1),          # M = 1, MoCo
    (64, 64, 64, 16, 0),       # exact tile multiples
    (65, 63, 130, 33, 0),      # one past / short of the tiles
    (33, 44, 200, 128, 4),     # D = 128: one tensor-core chunk
    (20, 8, 0, 1, 8),          # D = 1, K = 0, one group spanning every key
    (37, 37, 0, 59, 37),       # K = 0, group_size = N (all keys)
    (70, 70, 90, 129, 7),      # D just past a chunk
    (6, 12, 9, 2048, 3),       # wide features
]


NCE_IDS = ["M{}N{}K{}D{}g{}".format(*c) for c in NCE_CASES]


# fp32 inputs by torch.get_float32_matmul_precision(): the tile policy each setting takes on an sm_90
# device, and the plain-PyTorch baseline of DESIGN's tolerance rule.
FP32_MODES = {"highest": ("SimtPolicy<float, float>", torch.float32),
              "high": ("TcSplitPolicy", torch.float32),
              "medium": ("TcPolicy<__nv_bfloat16, float>", torch.bfloat16)}


# "high" (split-bf16: hi + lo bf16 parts, three tensor-core products) keeps ~16 significant bits per
# operand. Its stated bound: DESIGN's rule against the fp32 baseline with an allowance of 2^-15 of the
# output's largest magnitude (+1e-6 for outputs near 0). Measured worst case: 1.4e-5 relative
# (all-keys grad_keys), README "Precision".
HIGH_REL = 2.0 ** -15


def high_atol(exact) -> float:
    return HIGH_REL * exact.abs().max().item() + 1e-6


def nce_fp32(mode, case, train, t=0.1, dev="sm90"):
    """(outputs, fp64 reference, tile launches) of info_nce fp32 at precision `mode`."""
    e = configure("info_nce", dev)
    e.set_fp32_precision(mode)
    m, n, k, d, g = case
    q, keys, bank, pos = nce_inputs(m, n, k, d, torch.float32)
    gl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    qf, kf, bf = (x.float() if x is not None else None for x in (q, keys, bank))
    loss, lse, bm = eo.info_nce(qf, kf, pos, bf, t, g, train=train)
    tiles = [s for s in e.launches() if "_tiles" in s]  # forward, then backward
    gq, gk = eo.info_nce_backward(gl, gls, qf, kf, pos, bf, lse, t, g, bank_mean=bm)
    tiles += [s for s in e.launches() if "_tiles" in s]
    ref = nce_exact(q, keys, bank, pos, t, g, gl, gls)
    base = nce_baseline(q, keys, bank, pos, t, g, gl, gls, FP32_MODES[mode][1])
    return (loss, lse, gq, gk, bm), ref, base, tiles


# "high" must be much closer to fp64 than "medium": at least this factor on every output (measured:
# 350x to 860x on info_nce, 530x to 750x on bank_kl). TF32 would give about 8x (10 vs 7 mantissa bits).
HIGH_VS_MEDIUM = 50


def bkl_fp32(mode, case=(40, 150, 32), seed=3):
    e = configure("bank_kl", "sm90")
    e.set_fp32_precision(mode)
    m, k, d = case
    torch.manual_seed(seed)
    s, te, bank = feats(m, d, dtype=torch.float64), feats(m, d, dtype=torch.float64), feats(k, d, dtype=torch.float64)
    gkl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    got = run_bkl(s, te, bank, 0.1, 0.05, gkl, gls, torch.float32)
    ref = bkl_exact(s, te, bank, 0.1, 0.05, gkl, gls)
    base_dtype = FP32_MODES[mode][1]
    sd = s.to(base_dtype).clone().requires_grad_()
    kl, ls, lt = reference.bank_kl(sd, te.to(base_dtype), bank.to(base_dtype), 0.1, 0.05)
    (kl.double() * gkl + ls.double() * gls).sum().backward()
    return got, ref, (kl, ls, lt, sd.grad), [x for x in e.launches() if "_tiles" in x]


# ---- bank_kl ---------------------------------------------------------------------------------------

BKL_CASES = [(1, 7, 3), (64, 64, 16), (65, 130, 33), (33, 300, 128), (20, 70, 129), (5, 40, 2048)]


def bkl_exact(s, te, bank, ts, tt, gkl, gls):
    sd = s.double().clone().requires_grad_()
    kl, ls, lt = reference.bank_kl(sd, te.double(), bank.double(), ts, tt)
    (kl * gkl + ls * gls).sum().backward()
    return kl.detach(), ls.detach(), lt.detach(), sd.grad


def run_bkl(s, te, bank, ts, tt, gkl, gls, dtype):
    sd, td, bd = s.to(dtype), te.to(dtype), bank.to(dtype)
    kl, ls, lt = eo.bank_kl(sd, td, bd, ts, tt)
    gs = eo.bank_kl_backward(gkl, gls, sd, td, bd, ls, lt, ts, tt)
    return kl, ls, lt, gs


def bkl_train_exact(s, te, bank, ts, tt):
    """fp64: kl, lse_s, lse_t and the expected bank vectors E_r[b], E_p[b] of the training forward."""
    s, te, b = s.double(), te.double(), bank.double()
    kl, ls, lt = reference.bank_kl(s, te, b, ts, tt)
    return kl, ls, lt, torch.softmax(s @ b.T / ts, 1) @ b, torch.softmax(te @ b.T / tt, 1) @ b


def bkl_train_grad(gkl, gls, mean_s, mean_t, ts):
    """The elementwise backward of _bank_kl_train (bank_kl_train_backward in ATen)."""
    gkl, gls = gkl.unsqueeze(1), gls.unsqueeze(1)
    return ((gkl + gls) * mean_s.double() - gkl * mean_t.double()) / ts
