"""The emulated CUDA operators as torch functions on CPU tensors: what the `csrc/*/*_cuda.cpp` glue
does around the kernel launchers (contiguous inputs, accumulation-dtype outputs, zero-filled
grad_keys), then the driver in drivers/<op>.cpp, then the kernels."""
from __future__ import annotations

import ctypes

import torch

from . import load

_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_ERR = {1: "cudaErrorInvalidValue", 9: "cudaErrorInvalidConfiguration", 719: "cudaErrorLaunchFailure",
        701: "cudaErrorLaunchOutOfResources", -2: "non-finite distances"}


class EmuError(RuntimeError):
    """A launcher returned an error; the message carries the emulator's log (the first check that
    failed: a launch limit, a barrier divergence, a warp mask, a deadlock, __trap, ...)."""


def _p(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else 0)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(emu, rc: int, what: str) -> None:
    if rc != 0:
        raise EmuError(f"{what}: {_ERR.get(rc, rc)}\n{emu.errors()}")
    log = emu.errors()
    if log:
        raise EmuError(f"{what}: the emulator reported\n{log}")


_I64 = ctypes.c_int64
_DBL = ctypes.c_double


def info_nce(q, keys, pos, bank, t, g, train=False, emu=None):
    """Forward: (loss [M], lse [M], bank_mean [M, D] | None)."""
    emu = emu or load("info_nce")
    emu.clear()
    q, keys, pos = q.contiguous(), keys.contiguous(), pos.contiguous()
    bank = bank.contiguous() if bank is not None else torch.empty(0, q.shape[1], dtype=q.dtype)
    m, d = q.shape
    acc = _acc(q.dtype)
    loss, lse = torch.empty(m, dtype=acc), torch.empty(m, dtype=acc)
    bm = torch.empty(m, d, dtype=acc) if train else None
    if m > 0:
        rc = emu.lib.emu_info_nce(1 if train else 0, _DT[q.dtype], _p(q), _p(keys), _p(pos), _p(bank),
                                  _I64(m), _I64(keys.shape[0]), _I64(bank.shape[0]), _I64(d), _I64(g),
                                  _DBL(t), _p(loss), _p(lse), _p(bm), None, None, None, None, None, None, 1, 1)
        _check(emu, rc, "info_nce forward")
    return loss, lse, bm


def info_nce_backward(grad_loss, grad_lse, q, keys, pos, bank, lse, t, g, bank_mean=None, emu=None,
                      need_q=True, need_k=True):
    """Backward: (grad_query, grad_keys) in the inputs' dtypes; a gradient not asked for is None
    (its kernel output pointer is null). With bank_mean (the training variant) the bank is not read."""
    emu = emu or load("info_nce")
    emu.clear()
    m, d = q.shape
    acc = _acc(q.dtype)
    if m == 0 or d == 0:
        return torch.zeros_like(q), torch.zeros_like(keys)
    q, keys, pos = q.contiguous(), keys.contiguous(), pos.contiguous()
    train = bank_mean is not None
    bank = torch.empty(0, d, dtype=q.dtype) if (bank is None or train) else bank.contiguous()
    gl, gls, lse = (x.to(acc).contiguous() for x in (grad_loss, grad_lse, lse))
    bm = bank_mean.to(acc).contiguous() if train else None
    gq = torch.empty(m, d, dtype=acc) if need_q else None
    gk = torch.zeros(keys.shape[0], d, dtype=acc) if need_k else None
    rc = emu.lib.emu_info_nce(3 if train else 2, _DT[q.dtype], _p(q), _p(keys), _p(pos), _p(bank),
                              _I64(m), _I64(keys.shape[0]), _I64(bank.shape[0]), _I64(d), _I64(g), _DBL(t),
                              None, None, None, _p(gl), _p(gls), _p(lse), _p(bm), _p(gq), _p(gk),
                              int(need_q), int(need_k))
    _check(emu, rc, "info_nce backward")
    return (gq.to(q.dtype) if need_q else None), (gk.to(keys.dtype) if need_k else None)


def bank_kl(s, te, bank, ts, tt, emu=None):
    """Forward: (kl, lse_student, lse_teacher), each [M]."""
    emu = emu or load("bank_kl")
    emu.clear()
    s, te, bank = s.contiguous(), te.contiguous(), bank.contiguous()
    m, d = s.shape
    acc = _acc(s.dtype)
    kl, ls, lt = (torch.empty(m, dtype=acc) for _ in range(3))
    if m > 0:
        rc = emu.lib.emu_bank_kl(0, _DT[s.dtype], _p(s), _p(te), _p(bank), _I64(m), _I64(bank.shape[0]), _I64(d),
                                 _DBL(ts), _DBL(tt), _p(kl), _p(ls), _p(lt), None, None, None, None, None)
        _check(emu, rc, "bank_kl forward")
    return kl, ls, lt


def bank_kl_train(s, te, bank, ts, tt, emu=None):
    """Training forward: (kl, lse_student, lse_teacher, mean_student, mean_teacher)."""
    emu = emu or load("bank_kl")
    emu.clear()
    s, te, bank = s.contiguous(), te.contiguous(), bank.contiguous()
    m, d = s.shape
    acc = _acc(s.dtype)
    kl, ls, lt = (torch.empty(m, dtype=acc) for _ in range(3))
    ms, mt = torch.empty(m, d, dtype=acc), torch.empty(m, d, dtype=acc)
    if m > 0:
        rc = emu.lib.emu_bank_kl_train(_DT[s.dtype], _p(s), _p(te), _p(bank), _I64(m), _I64(bank.shape[0]),
                                       _I64(d), _DBL(ts), _DBL(tt), _p(kl), _p(ls), _p(lt), _p(ms), _p(mt))
        _check(emu, rc, "bank_kl training forward")
    return kl, ls, lt, ms, mt


def bank_kl_backward(grad_kl, grad_lse_s, s, te, bank, lse_s, lse_t, ts, tt, emu=None):
    """Backward: grad_student in the student's dtype."""
    emu = emu or load("bank_kl")
    emu.clear()
    m, d = s.shape
    acc = _acc(s.dtype)
    if m == 0 or d == 0:
        return torch.zeros_like(s)
    s, te, bank = s.contiguous(), te.contiguous(), bank.contiguous()
    gkl, gls, ls, lt = (x.to(acc).contiguous() for x in (grad_kl, grad_lse_s, lse_s, lse_t))
    gs = torch.empty(m, d, dtype=acc)
    rc = emu.lib.emu_bank_kl(1, _DT[s.dtype], _p(s), _p(te), _p(bank), _I64(m), _I64(bank.shape[0]), _I64(d),
                             _DBL(ts), _DBL(tt), None, None, None, _p(gkl), _p(gls), _p(ls), _p(lt), _p(gs))
    _check(emu, rc, "bank_kl backward")
    return gs.to(s.dtype)


def rank_metrics(dist, q_pids, g_pids, q_camids, g_camids, max_rank, emu=None):
    """(cmc [max_rank], ap [Q], inp [Q], valid [Q], bytes of global scratch pass 2 used)."""
    emu = emu or load("rank")
    emu.clear()
    dist = dist.contiguous()
    q, g = dist.shape
    ids = [x.to(torch.int64).contiguous() for x in (q_pids, g_pids, q_camids, g_camids)]
    cmc, ap, inp = torch.empty(max_rank), torch.empty(q), torch.empty(q)
    valid = torch.empty(q, dtype=torch.bool)
    used = _I64(0)
    rc = emu.lib.emu_rank_metrics(_DT[dist.dtype], _p(dist), _I64(q), _I64(g), _I64(max_rank), *map(_p, ids),
                                  _p(cmc), _p(ap), _p(inp), _p(valid), ctypes.byref(used))
    _check(emu, rc, "rank_metrics")
    return cmc, ap, inp, valid, used.value


def _half_k(k1: int) -> int:  # rerank.h's rerank_half_k: round(k1 / 2) + 1, half to even
    return round(k1 / 2) + 1


def _rerank(n, q, d, k1, k2, lam, x, qg, qq, gg, dtype, emu):
    emu = emu or load("rerank")
    emu.clear()
    out = torch.empty(q, n - q, dtype=torch.float32)
    used = _I64(0)
    rc = emu.lib.emu_rerank(_DT[dtype], _I64(n), _I64(q), _I64(d), _I64(min(k1 + 1, n)), _I64(min(_half_k(k1), n)),
                            _I64(min(k2, n)), _I64(k2), _DBL(lam), _p(x), _p(qg), _p(qq), _p(gg), _p(out),
                            ctypes.byref(used))
    _check(emu, rc, "k_reciprocal_rerank")
    return out, used.value


def rerank_features(x, num_query, k1=20, k2=6, lam=0.3, emu=None):
    """k_reciprocal_rerank from features (fp16/bf16 go through fp32, as in the glue)."""
    x = x.to(_acc(x.dtype)).contiguous()
    return _rerank(x.shape[0], num_query, x.shape[1], k1, k2, lam, x, None, None, None, x.dtype, emu)


def rerank_dense(q_g, q_q, g_g, k1=20, k2=6, lam=0.3, emu=None):
    acc = _acc(q_g.dtype)
    qg, qq, gg = (t.to(acc).contiguous() for t in (q_g, q_q, g_g))
    q, g = qg.shape
    return _rerank(q + g, q, 0, k1, k2, lam, None, qg, qq, gg, acc, emu)


def rerank_neighbors(x=None, dense=None, num_query=1, k1=20, emu=None):
    """Stage 1 of k_reciprocal_rerank alone, from features `x` or dense (q_g, q_q, g_g): the neighbour
    lists ([N, K] indices and squared distances), the row maxima [N] and the raw query-gallery squared
    distances [Q, G]."""
    emu = emu or load("rerank")
    emu.clear()
    if x is not None:
        x = x.to(_acc(x.dtype)).contiguous()
        n, d, dtype, qg = x.shape[0], x.shape[1], x.dtype, (None, None, None)
    else:
        qg = tuple(t.to(_acc(dense[0].dtype)).contiguous() for t in dense)
        n, d, dtype = qg[0].shape[0] + qg[0].shape[1], 0, qg[0].dtype
    k = min(k1 + 1, n)
    out = torch.empty(num_query, n - num_query, dtype=torch.float32)
    nbr = torch.empty(n, k, dtype=torch.int32)
    nbr_d2, rowmax = torch.empty(n, k, dtype=dtype), torch.empty(n, dtype=dtype)
    rc = emu.lib.emu_rerank_neighbors(_DT[dtype], _I64(n), _I64(num_query), _I64(d), _I64(k), _p(x), *map(_p, qg),
                                      _p(out), _p(nbr), _p(nbr_d2), _p(rowmax))
    _check(emu, rc, "k_reciprocal_rerank (neighbours)")
    return nbr, nbr_d2, rowmax, out


def rerank_schedule(panels: int, emu=None) -> list[list[tuple[int, int]]]:
    """The features path's round-robin schedule: one list of (a, b) pairs per round."""
    emu = emu or load("rerank")
    slots = (panels + 1) // 2
    buf = (ctypes.c_int64 * max(2, 2 * slots * (panels + 1)))()
    emu.lib.emu_rerank_schedule.restype = ctypes.c_int64
    rounds = emu.lib.emu_rerank_schedule(_I64(panels), buf)
    return [[(buf[(r * slots + s) * 2], buf[(r * slots + s) * 2 + 1]) for s in range(slots)] for r in range(rounds)]

