"""``evaluate_rank`` with the signature and return values of fast-reid 1.4
(``fastreid.evaluation.rank.evaluate_rank``), computed by upreid's sort-free operator.

    # from fastreid.evaluation.rank import evaluate_rank
    from upreid.compat.fastreid import evaluate_rank

Ranks follow ascending distance with ties by ascending gallery index (a stable sort; the original's
NumPy quicksort leaves the order of ties unspecified).
"""
from __future__ import annotations

from upreid.compat._rank import CUHK03_MESSAGE, per_query_metrics

__all__ = ["evaluate_rank"]


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False,
                  use_cython=True):
    """CMC, AP and INP under the Market1501 protocol (per query, gallery items with the query's
    identity and camera are dropped).

    Args:
        distmat: ``(num_query, num_gallery)`` distances (numpy array or tensor), smaller = closer.
        q_pids, g_pids, q_camids, g_camids: 1-D integer identities and cameras.
        max_rank: CMC length; capped at the gallery size, as in fast-reid.
        use_metric_cuhk03: the classic CUHK03 single-shot protocol; not supported (raises
            ``NotImplementedError``).
        use_cython: accepted and ignored (it only picks fast-reid's implementation).

    Returns:
        ``(all_cmc, all_AP, all_INP)``: numpy float32 arrays, ``all_cmc[r]`` the fraction of valid
        queries matched within rank ``r + 1``; ``all_AP`` and ``all_INP`` one entry per valid query
        (a query with a match in the gallery), in query order. ``np.mean(all_AP)`` is the mAP.

    Raises:
        AssertionError: "Error: all query identities do not appear in gallery", as fast-reid.
    """
    del use_cython
    if use_metric_cuhk03:
        raise NotImplementedError(f"upreid.compat.fastreid.evaluate_rank: {CUHK03_MESSAGE}")
    return per_query_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                             "upreid.compat.fastreid.evaluate_rank")
