"""The tile engine shared by info_nce and bank_kl, in emulation: each logits tile formed once,
tensor cores above D = 128, shared-memory fallbacks, dispatch on the compiled architecture, the
cp.async column tiles."""
from __future__ import annotations

import pytest
import torch

from emu import ops as eo
from helpers import assert_tolerance, default_atol, feats, max_err
from upreid.ops import reference
from cuda_emu_common import (
    configure,
    nce_inputs,
    nce_exact,
    nce_baseline,
    run_nce,
    high_atol,
    bkl_exact,
    run_bkl,
    MARKS)

pytestmark = MARKS


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
