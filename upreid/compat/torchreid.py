"""``evaluate_rank`` and ``re_ranking`` with the signatures and return values of torchreid 0.2.5
(``torchreid.reid.metrics.rank`` and ``torchreid.reid.utils.rerank``), computed by upreid's
operators.

    # from torchreid.reid.metrics.rank import evaluate_rank
    # from torchreid.reid.utils.rerank import re_ranking
    from upreid.compat.torchreid import evaluate_rank, re_ranking

Ties are ordered by index (a stable sort), in the ranking and in re-ranking's neighbour lists; the
originals' NumPy quicksort leaves that order unspecified.
"""
from __future__ import annotations

import numpy as np
import torch

from upreid.compat._rank import CUHK03_MESSAGE, as_array, per_query_metrics
from upreid.ops.rerank import k_reciprocal_rerank_dense

__all__ = ["evaluate_rank", "re_ranking"]


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False,
                  use_cython=True):
    """CMC and mAP under the Market1501 protocol (see :func:`upreid.compat.fastreid.evaluate_rank`
    for the arguments; ``use_cython`` is ignored, ``use_metric_cuhk03=True`` is not supported).

    Returns:
        ``(all_cmc, mAP)``: the CMC curve (numpy float32, ``min(max_rank, num_gallery)`` entries) and
        the mean AP over the valid queries (a float).

    Raises:
        AssertionError: "Error: all query identities do not appear in gallery", as torchreid.
    """
    del use_cython
    if use_metric_cuhk03:
        raise NotImplementedError(f"upreid.compat.torchreid.evaluate_rank: {CUHK03_MESSAGE}")
    cmc, ap, _ = per_query_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                                   "upreid.compat.torchreid.evaluate_rank")
    return cmc, float(ap.astype(np.float64).mean())


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of precomputed distances, exact.

    Args:
        q_g_dist: ``(num_query, num_gallery)``; q_q_dist: ``(num_query, num_query)``;
            g_g_dist: ``(num_gallery, num_gallery)`` distances (numpy arrays or tensors).
        k1, k2, lambda_value: as in the paper (20, 6, 0.3).

    Returns:
        the re-ranked ``(num_query, num_gallery)`` distance, a numpy float32 array.

    Starting from features, :func:`upreid.ops.rerank.k_reciprocal_rerank` gives the same result
    without any ``N x N`` matrix.
    """
    op = "upreid.compat.torchreid.re_ranking"
    mats = {}
    for name, x in (("q_g_dist", q_g_dist), ("q_q_dist", q_q_dist), ("g_g_dist", g_g_dist)):
        a = as_array(x, name, op, 2)
        mats[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32 if a.dtype != np.float64
                                                           else np.float64))
    q, g = mats["q_g_dist"].shape
    for name, want in (("q_q_dist", (q, q)), ("g_g_dist", (g, g))):
        if tuple(mats[name].shape) != want:
            raise ValueError(f"{op}: '{name}' must have shape {want} to match q_g_dist {(q, g)}, "
                             f"got {tuple(mats[name].shape)}")
    dtype = torch.promote_types(torch.promote_types(mats["q_g_dist"].dtype, mats["q_q_dist"].dtype),
                                mats["g_g_dist"].dtype)
    out = k_reciprocal_rerank_dense(*(mats[n].to(dtype) for n in ("q_g_dist", "q_q_dist", "g_g_dist")),
                                    int(k1), int(k2), float(lambda_value))
    return out.numpy()
