"""Pure-PyTorch references of every upreid operator.

They are the single source of truth for the tests, the baselines of the benchmarks and the fallback
when the compiled extension is absent. They are written the obvious way, materialising the full
logits matrix, and differentiate through plain autograd.

``compute_dtype`` selects the precision of the matrix products and reductions; by default the inputs'
own dtype is used, which is what a user writing these losses by hand would get (and the baseline of
the low-precision tolerance rule). Outputs are float32 (float64 for float64 inputs), like the ops.

They reject what the operators reject, with the operators' messages (:mod:`upreid.ops._checks`).
"""
from __future__ import annotations

import torch
from torch import Tensor

import upreid.ops._checks as _checks


def _out_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def info_nce(
    query: Tensor,
    keys: Tensor,
    positive: Tensor,
    bank: Tensor | None = None,
    temperature: float = 0.1,
    group_size: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference of ``upreid::info_nce``: returns (loss [M], lse [M])."""
    _checks.info_nce(query, keys, positive, bank, temperature, group_size)
    cd = compute_dtype or query.dtype
    q = query.to(cd) / temperature                      # [M, D]
    logits_k = q @ keys.to(cd).T                        # [M, N]
    n = keys.shape[0]
    if group_size not in (0, n):
        group = torch.arange(n, device=keys.device) // group_size            # [N]
        same = group.unsqueeze(0) == (positive // group_size).unsqueeze(1)  # [M, N]
        logits_k = logits_k.masked_fill(~same, float("-inf"))
    parts = [logits_k]
    if bank is not None:
        parts.append(q @ bank.to(cd).T)                 # [M, K]
    logits = torch.cat(parts, dim=1)                    # [M, N + K]
    lse = torch.logsumexp(logits, dim=1)
    pos = logits_k.gather(1, positive.unsqueeze(1)).squeeze(1)
    out = _out_dtype(query)
    return (lse - pos).to(out), lse.to(out)


def bank_kl(
    student: Tensor,
    teacher: Tensor,
    bank: Tensor,
    tau_student: float = 0.1,
    tau_teacher: float = 0.1,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of ``upreid::bank_kl``: (KL(p_teacher || p_student) [M], lse_student, lse_teacher)."""
    _checks.bank_kl(student, teacher, bank, tau_student, tau_teacher)
    cd = compute_dtype or student.dtype
    b = bank.to(cd)
    a = (student.to(cd) / tau_student) @ b.T           # [M, K]
    c = (teacher.to(cd).detach() / tau_teacher) @ b.T  # [M, K]
    lse_a = torch.logsumexp(a, dim=1)
    lse_c = torch.logsumexp(c, dim=1)
    log_p = c - lse_c.unsqueeze(1)
    log_r = a - lse_a.unsqueeze(1)
    kl = (log_p.exp() * (log_p - log_r)).sum(dim=1)
    out = _out_dtype(student)
    return kl.to(out), lse_a.to(out), lse_c.to(out)


# Evaluation operators (inference only): NumPy transcriptions of the original algorithms.
from upreid.ops.reference_eval import (  # noqa: E402
    k_reciprocal_rerank,
    k_reciprocal_rerank_dense,
    rank_metrics,
)

__all__ = ["bank_kl", "info_nce", "k_reciprocal_rerank", "k_reciprocal_rerank_dense", "rank_metrics"]
