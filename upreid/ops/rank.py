"""``upreid::rank_metrics``: CMC / AP / INP of a query-gallery distance matrix without sorting the
gallery (typed wrapper, fake kernel; inference only).

Convention of torchreid / fast-reid: per query, gallery items with the query's pid and camera are
dropped; AP is non-interpolated; CMC counts the first correct match; INP = (number of positives) /
(rank of the hardest positive); queries without a valid positive are invalid. Ranks follow ascending
distance with ties broken by ascending gallery index (a stable sort).
"""
from __future__ import annotations

import torch
from torch import Tensor

import upreid.ops._dispatch as _dispatch
import upreid.ops._lib as _lib
import upreid.ops.reference_eval as reference
from upreid.ops import _checks


def rank_metrics(
    distmat: Tensor,
    q_pids: Tensor,
    g_pids: Tensor,
    q_camids: Tensor,
    g_camids: Tensor,
    max_rank: int = 50,
    impl: str = "fused",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-query ranking metrics.

    Args:
        distmat: ``[Q, G]`` float distances (smaller = more similar), finite.
        q_pids, q_camids: ``[Q]`` integer identities and cameras of the queries.
        g_pids, g_camids: ``[G]`` integer identities and cameras of the gallery (G >= 1).
        max_rank: length of the CMC curve.
        impl: ``"fused"`` (the compiled operator, O(G log P) per query) or ``"reference"`` (sort).

    Returns:
        ``(cmc, ap, inp, valid)``: ``cmc [max_rank]`` fp32, ``cmc[r]`` = fraction of valid queries
        whose first match has rank ``<= r`` (0-based); ``ap [Q]`` and ``inp [Q]`` fp32 (0 for invalid
        queries); ``valid [Q]`` bool. mAP and mINP are the means of ``ap`` and ``inp`` over ``valid``.
    """
    return _dispatch.call("rank_metrics", impl, _fused, reference.rank_metrics,
                          (distmat, q_pids, g_pids, q_camids, g_camids, max_rank),
                          cpu_fallback=True)


def _fused(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    return torch.ops.upreid.rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, int(max_rank))


if _lib.HAS_EXTENSION:

    @torch.library.register_fake("upreid::rank_metrics")
    def _rank_metrics_fake(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
        _checks.rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)   # those that need no data
        q = distmat.shape[0]
        f32 = torch.float32
        return (distmat.new_empty((max_rank,), dtype=f32), distmat.new_empty((q,), dtype=f32),
                distmat.new_empty((q,), dtype=f32), distmat.new_empty((q,), dtype=torch.bool))
