"""The CUDA kernels, run on the CPU by the emulation harness (tests/emu), against the fp64
references: every kernel source, both tile policies (tensor-core WMMA and CUDA-core SIMT), one and
many column splits, tile-edge shapes, every group mode, fp64/fp32/fp16/bf16.

Functional mode here; race mode (ThreadSanitizer) and the harness's self-tests in
test_cuda_emu_race.py. The kernels are rebuilt from csrc/ whenever a source changes.
"""
from __future__ import annotations

import pytest
import torch

import emu
from emu import ops as eo
from helpers import assert_tolerance, default_atol, feats, max_err
from upreid.ops import reference

why = emu.available()
pytestmark = [pytest.mark.cuda_emu, pytest.mark.slow, pytest.mark.skipif(why is not None, reason=why or "")]

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
    assert "TcPolicy<__half, __half>" in many and "TcPolicy<__half, __half>" in one, (many, one)
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


# Each logits tile is formed once when D fits one output pass (D <= 128): the training forward does
# 2 products per tile (S = Q C^T, then O += P C), the backward 2, bank_kl's backward 3 (two logits
# tiles, one output). The emulator counts warp mma_sync calls (tensor cores) and completed block
# barriers (CUDA cores: staging D chunk dc costs one barrier for dc = 0 and two after, so a tile
# whose logits are formed once costs 2 * nD barriers, and each re-formation nD more).
def _one_block_counts(e, run):
    run()
    return e.counts()


@pytest.mark.parametrize("d", [96, 128, 256])
def test_info_nce_forms_each_logits_tile_once(d):
    """D <= 128 on both policies; D = 256 on the tensor cores (TcWide keeps O in shared memory)."""
    m, n, k = 64, 64, 256  # one row block, MoCo (the columns are the bank), one split
    q, keys, bank, pos = nce_inputs(m, n, k, d, torch.float64)
    gl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    # tensor cores (bf16): one product of a [64 x 64] tile over D is 4 warps x (D/16) x 4 mma_sync
    e = configure("info_nce", "sm90-1sm")
    qb, kb, bb = q.bfloat16(), keys.bfloat16(), bank.bfloat16()
    _, mma = _one_block_counts(e, lambda: eo.info_nce(qb, kb, pos, bb, 0.1, 1, train=True))
    assert all(("TcWide" in x) == (d > 128) for x in e.launches() if "_tiles" in x), e.launches()
    per_product = (k // 64) * 4 * (-(-d // 16)) * 4
    assert mma == 2 * per_product, (mma, per_product)
    lse = eo.info_nce(qb, kb, pos, bb, 0.1, 1)[1]
    _, mma = _one_block_counts(e, lambda: eo.info_nce_backward(gl, gls, qb, kb, pos, bb, lse, 0.1, 1))
    assert mma == 2 * per_product, (mma, per_product)
    if d > 128:
        return  # the CUDA cores take D/128 passes above 128
    # CUDA cores (fp32 at "highest"): 32-wide tiles and D chunks
    e = configure("info_nce", "sm90-1sm")
    qf, kf, bf = q.float(), keys.float(), bank.float()
    bars, _ = _one_block_counts(e, lambda: eo.info_nce(qf, kf, pos, bf, 0.1, 1, train=True))
    n_d, tiles = -(-d // 32), k // 32
    assert bars == tiles * 2 * n_d, (bars, tiles, n_d)
    lse = eo.info_nce(qf, kf, pos, bf, 0.1, 1)[1]
    bars, _ = _one_block_counts(e, lambda: eo.info_nce_backward(gl, gls, qf, kf, pos, bf, lse, 0.1, 1))
    assert bars == tiles * 2 * n_d, (bars, tiles, n_d)


@pytest.mark.parametrize("d", [128, 256])
def test_bank_kl_backward_forms_each_logits_tile_once(d):
    m, k = 64, 256
    torch.manual_seed(5)
    s, te, bank = feats(m, d), feats(m, d), feats(k, d)
    gkl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    e = configure("bank_kl", "sm90-1sm")
    sb, tb, bb = s.bfloat16(), te.bfloat16(), bank.bfloat16()
    _, ls, lt = eo.bank_kl(sb, tb, bb, 0.1, 0.05)
    _, mma = _one_block_counts(e, lambda: eo.bank_kl_backward(gkl, gls, sb, tb, bb, ls, lt, 0.1, 0.05))
    per_product = (k // 64) * 4 * (d // 16) * 4
    assert mma == 3 * per_product, (mma, per_product)
    if d > 128:
        return
    _, ls, lt = eo.bank_kl(s, te, bank, 0.1, 0.05)
    bars, _ = _one_block_counts(e, lambda: eo.bank_kl_backward(gkl, gls, s, te, bank, ls, lt, 0.1, 0.05))
    assert bars == (k // 32) * 2 * (d // 32), bars


@pytest.mark.parametrize("dtype,small", [(torch.bfloat16, 100 * 1024), (torch.float32, 160 * 1024)], ids=str)
def test_tensor_cores_above_d128_without_room_for_shared_output(dtype, small):
    """A device whose shared memory cannot hold TcWide's output (`small` opt-in: bf16 100 KB, fp32 at
    "high" (split-bf16, two planes) 160 KB) takes the register policy with one output pass per 128
    features (the logits formed twice at D = 200), and stays within the tolerance rule."""
    m, n, k, d, g = 40, 40, 150, 200, 0
    q, keys, bank, pos = nce_inputs(m, n, k, d, dtype)
    gl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    ref = nce_exact(q, keys, bank, pos, 0.1, g, gl, gls)
    base = nce_baseline(q, keys, bank, pos, 0.1, g, gl, gls, dtype)
    for optin, wide in ((232448, True), (small, False)):
        e = configure("info_nce", "sm90")
        e.configure(major=9, sms=8, smem_optin=optin)
        e.set_fp32_precision("high")
        got = run_nce(q, keys, bank, pos, 0.1, g, gl, gls, dtype, True)
        tiles = [x for x in e.launches() if "_tiles" in x]
        assert tiles and all(("TcWide" in x) == wide for x in tiles), tiles
        for name, a, b, c, scale in zip(("loss", "lse", "grad_query", "grad_keys"), got, ref, base, (10, 10, 1, 1)):
            atol = high_atol(b) if dtype == torch.float32 else default_atol(dtype, scale)
            assert_tolerance(a, b, c, atol, f"{name} {dtype} optin={optin}")
        assert max_err(got[4], ref[4]) <= (high_atol(ref[4]) if dtype == torch.float32 else default_atol(dtype, 2))
    torch.manual_seed(6)
    s, te, bk = feats(m, d, dtype=torch.float64), feats(m, d, dtype=torch.float64), feats(k, d, dtype=torch.float64)
    gkl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    ref = bkl_exact(s, te, bk, 0.1, 0.05, gkl, gls)
    sd = s.to(dtype).clone().requires_grad_()
    kl, ls, lt = reference.bank_kl(sd, te.to(dtype), bk.to(dtype), 0.1, 0.05)
    (kl.double() * gkl + ls.double() * gls).sum().backward()
    for optin, wide in ((232448, True), (small, False)):
        e = configure("bank_kl", "sm90")
        e.configure(major=9, sms=8, smem_optin=optin)
        e.set_fp32_precision("high")
        got = run_bkl(s, te, bk, 0.1, 0.05, gkl, gls, dtype)
        tiles = [x for x in e.launches() if "bkl_bwd_tiles" in x]
        assert tiles and all(("TcWide" in x) == wide for x in tiles), tiles
        atol = high_atol(ref[3]) if dtype == torch.float32 else default_atol(dtype, 1)
        assert_tolerance(got[3], ref[3], sd.grad, atol, f"grad_student {dtype} optin={optin}")


def test_fp32_high_needs_room_for_two_planes():
    """An sm_86-class device (99 KB of shared memory a block) keeps fp32 "high" on the CUDA cores:
    split-bf16's bank_kl backward needs 155 KB."""
    torch.manual_seed(7)
    s, te, bank = feats(20, 24, dtype=torch.float64), feats(20, 24, dtype=torch.float64), feats(70, 24, dtype=torch.float64)
    gkl, gls = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    for optin, policy in ((99 * 1024, "SimtPolicy<float, float>"), (164 * 1024, "TcSplitPolicy")):
        e = configure("bank_kl", "sm90")
        e.configure(major=8, minor=6 if optin < 100 * 1024 else 0, sms=8, smem_optin=optin)
        e.set_fp32_precision("high")
        got = run_bkl(s, te, bank, 0.1, 0.05, gkl, gls, torch.float32)
        tiles = [x for x in e.launches() if "_tiles" in x]
        assert tiles and all(policy in x for x in tiles), (optin, tiles)
        ref = bkl_exact(s, te, bank, 0.1, 0.05, gkl, gls)
        assert max_err(got[3], ref[3]) <= high_atol(ref[3])


def test_info_nce_dispatch_follows_the_compiled_architecture():
    """An sm_90 device running code built for sm_75 must not take the tensor-core kernels (they are
    compiled out there and would trap)."""
    e = configure("info_nce", "sm90")
    e.configure(major=9, sms=8, binary_arch=75)
    q, keys, bank, pos = nce_inputs(20, 20, 70, 16, torch.float64)
    loss, lse, _ = eo.info_nce(q.bfloat16(), keys.bfloat16(), pos, bank.bfloat16(), 0.1, 0)
    tiles = [s for s in e.launches() if "nce_fwd_tiles" in s]
    assert tiles and "SimtPolicy<__nv_bfloat16, float>" in tiles[0], e.launches()
    ref = reference.info_nce(q, keys, pos, bank, 0.1, 0)[0]
    assert max_err(loss, ref) < 0.1


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


# "high" must be much closer to fp64 than "medium": at least this factor on every output (measured:
# 350x to 860x on info_nce, 530x to 750x on bank_kl). TF32 would give about 8x (10 vs 7 mantissa bits).
HIGH_VS_MEDIUM = 50


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


@pytest.mark.parametrize("d,dtype,optin,copies", [
    (128, torch.bfloat16, None, True), (200, torch.float16, None, True),
    (20, torch.bfloat16, None, False), (128, torch.float32, None, False), (128, torch.bfloat16, 99 * 1024, False)],
    ids=["bf16-D128", "f16-D200-wide", "bf16-D20-unaligned", "f32-cuda-cores", "bf16-99KB-device"])
def test_column_tiles_arrive_by_cp_async(d, dtype, optin, copies):
    """Tensor cores with 16-byte rows: every column tile's first D chunk is copied by cp.async, the
    next tile's while the current one is formed (double-buffered); 5 tiles, two row blocks, the last
    row block and tile partial. Rows whose D * size is not a multiple of 16 bytes, the CUDA-core
    policy, and a device whose shared memory cannot hold the second column buffer (99 KB, as sm_86
    and sm_89) load synchronously. The results match the reference either way."""
    e = configure("bank_kl", "sm90-1sm")
    if optin:
        e.configure(major=8, minor=6, sms=1, smem_optin=optin)
    m, k = 100, 300
    torch.manual_seed(0)
    s, te, bank = (feats(n, d, dtype=torch.float64) for n in (m, m, k))
    ref = reference.bank_kl(s, te, bank, 0.1, 0.07)
    out = eo.bank_kl(s.to(dtype), te.to(dtype), bank.to(dtype), 0.1, 0.07)
    pieces = -(-min(d, 128) // (16 // dtype.itemsize))  # 16-byte pieces of a row's first chunk
    assert e.async_copies() == (2 * k * pieces if copies else 0)  # each row block copies every bank row
    base = reference.bank_kl(s.to(dtype), te.to(dtype), bank.to(dtype), 0.1, 0.07)
    for o, r, b, name in zip(out, ref, base, ("kl", "lse_s", "lse_t")):
        assert_tolerance(o, r, b, default_atol(dtype), name)



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


def test_info_nce_extreme_temperatures_and_large_logits():
    configure("info_nce", "sm90")
    q, keys, bank, pos = nce_inputs(40, 40, 100, 24, torch.float64)
    for t, scale in ((0.01, 1.0), (10.0, 1.0), (1.0, 1e4)):
        gl, gls = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
        got = run_nce(q * scale, keys, bank, pos, t, 0, gl, gls, torch.float64, True)
        ref = nce_exact(q * scale, keys, bank, pos, t, 0, gl, gls)
        for a, b in zip(got[:4], ref[:4]):
            assert max_err(a, b) <= 1e-9 * max(1.0, b.abs().max().item()), (t, scale)


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


@pytest.mark.parametrize("dev", ["sm90", "sm90-1sm"])
@pytest.mark.parametrize("case", BKL_CASES, ids=lambda c: "M{}K{}D{}".format(*c))
def test_bank_kl_fp64_matches_reference(case, dev):
    configure("bank_kl", dev)
    m, k, d = case
    torch.manual_seed(1)
    s, te, bank = feats(m, d, dtype=torch.float64), feats(m, d, dtype=torch.float64), feats(k, d, dtype=torch.float64)
    gkl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    for a, b, name in zip(run_bkl(s, te, bank, 0.1, 0.05, gkl, gls, torch.float64),
                          bkl_exact(s, te, bank, 0.1, 0.05, gkl, gls), ("kl", "lse_s", "lse_t", "grad")):
        assert max_err(a, b) < 1e-9, f"{name}: {max_err(a, b):.3g}"


@pytest.mark.parametrize("dev", ["sm90", "sm75"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BKL_CASES[1:5], ids=lambda c: "M{}K{}D{}".format(*c))
def test_bank_kl_low_precision_tolerance(case, dtype, dev):
    configure("bank_kl", dev)
    m, k, d = case
    torch.manual_seed(2)
    s, te, bank = feats(m, d, dtype=torch.float64), feats(m, d, dtype=torch.float64), feats(k, d, dtype=torch.float64)
    gkl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    got = run_bkl(s, te, bank, 0.1, 0.1, gkl, gls, dtype)
    ref = bkl_exact(s, te, bank, 0.1, 0.1, gkl, gls)
    sd = s.to(dtype).clone().requires_grad_()
    kl, ls, lt = reference.bank_kl(sd, te.to(dtype), bank.to(dtype), 0.1, 0.1)
    (kl.double() * gkl + ls.double() * gls).sum().backward()
    base = (kl, ls, lt, sd.grad)
    for name, a, b, c, scale in zip(("kl", "lse_s", "lse_t", "grad"), got, ref, base, (1, 10, 10, 1)):
        assert_tolerance(a, b, c, default_atol(dtype, scale), f"{name} {dtype}")


def bkl_train_exact(s, te, bank, ts, tt):
    """fp64: kl, lse_s, lse_t and the expected bank vectors E_r[b], E_p[b] of the training forward."""
    s, te, b = s.double(), te.double(), bank.double()
    kl, ls, lt = reference.bank_kl(s, te, b, ts, tt)
    return kl, ls, lt, torch.softmax(s @ b.T / ts, 1) @ b, torch.softmax(te @ b.T / tt, 1) @ b


def bkl_train_grad(gkl, gls, mean_s, mean_t, ts):
    """The elementwise backward of _bank_kl_train (bank_kl_train_backward in ATen)."""
    gkl, gls = gkl.unsqueeze(1), gls.unsqueeze(1)
    return ((gkl + gls) * mean_s.double() - gkl * mean_t.double()) / ts


@pytest.mark.parametrize("dev", ["sm90", "sm90-1sm"])
@pytest.mark.parametrize("case", BKL_CASES, ids=lambda c: "M{}K{}D{}".format(*c))
def test_bank_kl_train_fp64_matches_reference(case, dev):
    """The training forward (student and teacher rows stacked in one tile pass) and the gradient its
    expected bank vectors give, against fp64."""
    configure("bank_kl", dev)
    m, k, d = case
    torch.manual_seed(1)
    s, te, bank = feats(m, d, dtype=torch.float64), feats(m, d, dtype=torch.float64), feats(k, d, dtype=torch.float64)
    got = eo.bank_kl_train(s, te, bank, 0.1, 0.05)
    ref = bkl_train_exact(s, te, bank, 0.1, 0.05)
    for name, a, b in zip(("kl", "lse_s", "lse_t", "mean_s", "mean_t"), got, ref):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        assert max_err(a, b) < 1e-9, f"{name}: {max_err(a, b):.3g}"
    gkl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    grad = bkl_train_grad(gkl, gls, got[3], got[4], 0.1)
    assert max_err(grad, bkl_exact(s, te, bank, 0.1, 0.05, gkl, gls)[3]) < 1e-9


@pytest.mark.parametrize("dev", ["sm90", "sm75"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BKL_CASES[1:5], ids=lambda c: "M{}K{}D{}".format(*c))
def test_bank_kl_train_low_precision_tolerance(case, dtype, dev):
    configure("bank_kl", dev)
    m, k, d = case
    torch.manual_seed(2)
    s, te, bank = feats(m, d, dtype=torch.float64), feats(m, d, dtype=torch.float64), feats(k, d, dtype=torch.float64)
    got = eo.bank_kl_train(s.to(dtype), te.to(dtype), bank.to(dtype), 0.1, 0.1)
    ref = bkl_train_exact(s, te, bank, 0.1, 0.1)
    base = reference.bank_kl(s.to(dtype), te.to(dtype), bank.to(dtype), 0.1, 0.1)
    for name, a, b, c, scale in zip(("kl", "lse_s", "lse_t"), got, ref, base, (1, 10, 10)):
        assert_tolerance(a, b, c, default_atol(dtype, scale), f"{name} {dtype}")
    for name, a, b in zip(("mean_s", "mean_t"), got[3:], ref[3:]):  # expectations of unit vectors
        assert max_err(a, b) <= default_atol(dtype, 2), name
    # the gradient the training path gives, by the rule against plain PyTorch's gradient
    gkl, gls = torch.randn(m, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    sd = s.to(dtype).clone().requires_grad_()
    kl, ls, _ = reference.bank_kl(sd, te.to(dtype), bank.to(dtype), 0.1, 0.1)
    (kl.double() * gkl + ls.double() * gls).sum().backward()
    assert_tolerance(bkl_train_grad(gkl, gls, got[3], got[4], 0.1), bkl_exact(s, te, bank, 0.1, 0.1, gkl, gls)[3],
                     sd.grad, default_atol(dtype, 1), f"grad {dtype}")


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


@pytest.mark.parametrize("d", [128, 256])
def test_bank_kl_train_forms_each_logits_tile_once(d):
    """Student and teacher rows share the row block: 2 products per bank tile (logits, O)."""
    m, k = 32, 256  # 2m = 64 stacked rows: one row block
    torch.manual_seed(8)
    s, te, bank = feats(m, d), feats(m, d), feats(k, d)
    e = configure("bank_kl", "sm90-1sm")
    eo.bank_kl_train(s.bfloat16(), te.bfloat16(), bank.bfloat16(), 0.1, 0.05)
    _, mma = e.counts()
    assert mma == 2 * (k // 64) * 4 * (d // 16) * 4, mma


# ---- rank_metrics ----------------------------------------------------------------------------------

def rank_inputs(q, g, ids, cams, dtype, seed=0, ties=False):
    torch.manual_seed(seed)
    dist = torch.rand(q, g, dtype=torch.float64)
    if ties:
        dist = torch.round(dist * 16) / 16
    return (dist.to(dtype), torch.randint(0, ids, (q,)), torch.randint(0, ids, (g,)),
            torch.randint(0, cams, (q,)), torch.randint(0, cams, (g,)))


def check_rank(args, max_rank):
    cmc, ap, inp, valid, used = eo.rank_metrics(*args, max_rank)
    rc, rap, rinp, rvalid = reference.rank_metrics(*[a.numpy() if a.dtype != torch.bfloat16 else a.float().numpy()
                                                    for a in args], max_rank)
    rvalid = torch.as_tensor(rvalid)
    assert torch.equal(valid, rvalid)
    assert max_err(cmc, torch.as_tensor(rc)) < 1e-6
    assert max_err(ap[valid], torch.as_tensor(rap)[rvalid]) < 1e-6
    assert max_err(inp[valid], torch.as_tensor(rinp)[rvalid]) < 1e-6
    return used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q,g,ids,cams,max_rank,ties", [(1, 1, 1, 1, 1, False), (7, 50, 5, 3, 10, True),
                                                        (40, 300, 30, 6, 50, False), (9, 257, 4, 2, 300, True)])
def test_rank_metrics_shared_memory_path(q, g, ids, cams, max_rank, ties, dtype):
    configure("rank", "sm90")
    assert check_rank(rank_inputs(q, g, ids, cams, dtype, ties=ties), max_rank) == 0


def test_rank_metrics_global_scratch_path():
    """More than 2048 positives per query: pass 2 keeps them in global scratch."""
    configure("rank", "sm90-1sm")
    assert check_rank(rank_inputs(3, 9000, 2, 3, torch.float32, ties=True), 20) > 0


def test_rank_metrics_non_finite_is_reported():
    configure("rank", "sm90")
    dist, *ids = rank_inputs(4, 30, 3, 2, torch.float32)
    dist[2, 5] = float("nan")
    with pytest.raises(eo.EmuError, match="non-finite"):
        eo.rank_metrics(dist, *ids, 5)


# ---- k_reciprocal_rerank ---------------------------------------------------------------------------

def clustered(n, d, ids, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(ids, d, dtype=torch.float64)[torch.randint(0, ids, (n,))]
    return x + 0.6 * torch.randn(n, d, dtype=torch.float64)


def check_rerank(out, expected, atol):
    err = (out.double() - torch.as_tensor(expected)).abs().max().item()
    assert err <= atol, f"max error {err:.3g}"


RERANK = [(8, 3, 4, 20, 6), (12, 5, 3, 1, 1), (40, 7, 5, 3, 2), (60, 9, 6, 5, 6), (90, 20, 8, 7, 1),
          (150, 31, 16, 20, 6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,q,d,k1,k2", RERANK)
def test_rerank_features_match_reference(n, q, d, k1, k2, dtype):
    configure("rerank", "sm90")
    x = clustered(n, d, max(2, n // 8))
    out, _ = eo.rerank_features(x.to(dtype), q, k1, k2, 0.3)
    check_rerank(out, reference.k_reciprocal_rerank(x, q, k1, k2, 0.3), 1e-5 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("n,q,d,k1,k2", RERANK[2:])
def test_rerank_dense_matches_reference(n, q, d, k1, k2):
    configure("rerank", "sm90")
    x = clustered(n, d, max(2, n // 8), seed=3)
    dist = torch.cdist(x, x) ** 2
    qg, qq, gg = dist[:q, q:], dist[:q, :q], dist[q:, q:]
    out, _ = eo.rerank_dense(qg, qq, gg, k1, k2, 0.3)
    check_rerank(out, reference.k_reciprocal_rerank_dense(qg, qq, gg, k1, k2, 0.3), 1e-5)


def grid_features(n, d, ids, seed, dtype):
    """Features on a 1/4 grid with duplicates: every squared distance is exact in fp32 and fp64 alike
    (small multiples of 1/16), so exact ties occur and the order by index must decide them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(4 * clustered(n, d, ids, seed)) / 4
    x = x.clamp(-3, 3)
    x[n // 3:n // 3 + 12] = x[n // 3]  # a dozen copies of one image
    x[1] = x[n - 1]
    return x[torch.randperm(n, generator=g)].to(dtype)


def exact_sq_distances(x):
    xd = x.double()
    return (xd[:, None, :] - xd[None, :, :]).pow(2).sum(-1)


@pytest.mark.parametrize("panels", [1, 2, 3, 4, 5, 8, 33])
def test_rerank_schedule_meets_every_panel_pair_once(panels):
    """The rounds of the features path: each unordered pair of panels in exactly one round, no panel
    twice in a round (two blocks of a launch never feed one list), at most one bye per round."""
    configure("rerank", "sm90")
    rounds = eo.rerank_schedule(panels)
    assert len(rounds) == (0 if panels == 1 else panels + panels % 2 - 1)
    seen = []
    for pairs in rounds:
        real = [(a, b) for a, b in pairs if b < panels]
        assert all(0 <= a < b for a, b in pairs)
        assert len(pairs) - len(real) == panels % 2
        members = [m for pair in real for m in pair]
        assert len(members) == len(set(members)), pairs
        seen += real
    assert sorted(seen) == [(a, b) for a in range(panels) for b in range(a + 1, panels)]


@pytest.mark.parametrize("prec", ["highest", "high"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,q,k1", [(64, 9, 20), (65, 9, 20), (150, 31, 20), (200, 40, 100), (330, 50, 6)])
def test_rerank_neighbor_lists_are_exact(n, q, k1, dtype, prec):
    """Stage 1 on exactly representable distances: the features path (upper-triangle tiles in rounds:
    one panel, a one-row second panel, an odd panel count with byes, lists longer than a warp; fp32 at
    "high" on the split-bf16 tensor cores, exact on these values) and the dense path give the exact
    top-(k1 + 1) lists with ties by index, the row maxima and the raw query-gallery distances, bit
    for bit."""
    configure("rerank", "sm90").set_fp32_precision(prec)
    x = grid_features(n, 8, max(2, n // 10), seed=n, dtype=dtype)
    k = min(k1 + 1, n)
    d2 = exact_sq_distances(x)
    # The dense path squares its inputs: give it the features' squared distances (exact squares).
    dense = tuple(t.to(dtype) for t in (d2[:q, q:], d2[:q, :q], d2[q:, q:]))
    for args, dist in (({"x": x}, d2), ({"dense": dense}, d2 * d2)):
        val, idx = torch.sort(dist, dim=1, stable=True)
        nbr, nbr_d2, rowmax, out = eo.rerank_neighbors(num_query=q, k1=k1, **args)
        assert torch.equal(nbr, idx[:, :k].int()), ("features" if "x" in args else "dense")
        assert torch.equal(nbr_d2.double(), val[:, :k])
        assert torch.equal(rowmax.double(), dist.max(dim=1).values)
        assert torch.equal(out.double(), dist[:q, q:].float().double())


@pytest.mark.parametrize("prec,dev,tc", [("highest", "sm90", False), ("high", "sm90", True),
                                         ("medium", "sm90", True), ("high", "sm75", False)])
def test_rerank_fp32_distances_follow_matmul_precision(prec, dev, tc):
    """fp32 features: "highest" keeps the distance tiles on the CUDA cores; "high" and "medium" take
    split-bf16 tensor cores (three WMMA products per fragment and 16-wide k step: 8 warps x 2
    fragments x 3 x 2 steps per 32 staged features of each tile) where the device and the build have
    them, not on sm_75. Every setting stays within 1e-4 of the fp64 reference with the same top-10
    rankings up to near ties."""
    e = configure("rerank", dev)
    e.set_fp32_precision(prec)
    n, q, d = 300, 50, 128
    x = torch.nn.functional.normalize(clustered(n, d, 40, seed=7), dim=1)
    out, _ = eo.rerank_features(x.float(), q, 20, 6, 0.3)
    panels = -(-n // 64)
    _, mma = e.counts()
    assert mma == (panels * (panels + 1) // 2 * 8 * 2 * 3 * 2 * -(-d // 32) if tc else 0)
    expected = torch.as_tensor(reference.k_reciprocal_rerank(x, q, 20, 6, 0.3))
    check_rerank(out, expected, 1e-4)
    a = torch.argsort(out.double(), dim=1, stable=True)[:, :10]
    b = torch.argsort(expected, dim=1, stable=True)[:, :10]
    for r, c in zip(*torch.nonzero(a != b, as_tuple=True)):
        assert abs(expected[r, a[r, c]] - expected[r, b[r, c]]) <= 1e-4  # a near tie


def test_rerank_features_compute_each_tile_once():
    """The features path forms each tile of the upper triangle once: the diagonal launch, then one
    launch per round with half the panels' worth of blocks; every tile costs 2 barriers per staged
    16-wide D chunk and 2 more (tile complete, lists fed): T (T + 1) / 2 tiles, not T^2."""
    e = configure("rerank", "sm90")
    n, d, panels = 330, 40, 6
    eo.rerank_neighbors(x=clustered(n, d, 30), num_query=50, k1=20)
    pair_launches = [s for s in e.launches() if "pair_neighbors_kernel" in s]
    assert len(pair_launches) == 1 + (panels - 1), pair_launches
    assert "grid=6,1,1" in pair_launches[0] and all("grid=3,1,1" in s for s in pair_launches[1:])
    barriers, _ = e.counts()
    tiles = panels * (panels + 1) // 2
    assert barriers == tiles * (2 * -(-d // 16) + 2)


def test_rerank_large_k1_uses_global_scratch():
    """k1 = 130: the reciprocal-set and expansion buffers outgrow shared memory (global slices)."""
    configure("rerank", "sm90")
    x = clustered(200, 8, 10, seed=4)
    out, used = eo.rerank_features(x, 30, 130, 6, 0.3)
    assert used > 0
    check_rerank(out, reference.k_reciprocal_rerank(x, 30, 130, 6, 0.3), 1e-5)


def test_rerank_wide_gallery_jaccard_in_global_scratch():
    """A gallery row that does not fit in the device's shared memory (here a device with 16 KB):
    the Jaccard stage keeps it in global scratch."""
    e = configure("rerank", "sm90")
    e.configure(major=9, sms=4, smem_optin=16 * 1024)
    x = clustered(2100, 3, 100, seed=5)
    out, used = eo.rerank_features(x, 40, 3, 1, 0.3)
    assert used >= (2100 - 40) * 8
    check_rerank(out, reference.k_reciprocal_rerank(x, 40, 3, 1, 0.3), 1e-5)
