"""``upreid::k_reciprocal_rerank`` and ``upreid::k_reciprocal_rerank_dense``: exact k-reciprocal
re-ranking (Zhong et al., CVPR 2017) as inference-only operators (typed wrappers, fake kernels).

Both equal the original algorithm (row-normalised squared distance, top-(k1+1) neighbours,
k-reciprocal sets with the half-k1 expansion rule, Gaussian weights, local query expansion over the
k2 nearest, Jaccard distance through the inverted index, blend with the original distance), with one
definition the original leaves open: neighbours are ordered by ascending squared distance and ties by
ascending index (a stable sort). The features path never allocates an ``N x N`` matrix.
"""
from __future__ import annotations

import torch
from torch import Tensor

import upreid.ops._dispatch as _dispatch
import upreid.ops._lib as _lib
import upreid.ops.reference_eval as reference
from upreid.ops import _checks


def k_reciprocal_rerank(
    features: Tensor,
    num_query: int,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    impl: str = "fused",
) -> Tensor:
    """Re-ranked query-gallery distance from features.

    Args:
        features: ``[N, D]`` float tensor (fp32, fp16, bf16 or fp64), the ``num_query`` query rows
            first, then the gallery. Distances are Euclidean; L2-normalise the rows first for the
            cosine convention.
        num_query: number of query rows, in ``(0, N)``.
        k1: size of the k-reciprocal neighbourhood (>= 1), 20 in the paper.
        k2: size of the local query expansion, in ``[1, k1 + 1]``, 6 in the paper.
        lambda_value: weight of the original distance in the blend, in ``[0, 1]``.
        impl: ``"fused"`` (the compiled operator) or ``"reference"`` (dense NumPy, O(N^2) memory).

    Returns:
        ``[num_query, N - num_query]`` fp32 final distance (smaller is more similar).
    """
    return _dispatch.call("k_reciprocal_rerank", impl, _fused, _reference,
                          (features, num_query, k1, k2, lambda_value), cpu_fallback=True)


def _fused(features, num_query, k1, k2, lambda_value):
    x = features
    if x.dim() == 2 and x.is_floating_point() and x.numel() > 0:
        # The operator's distances |x|^2 + |y|^2 - 2 x.y are computed in fp32 (fp64 for fp64 features).
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(x)                     # no [N, D] temporary, as abs() would make
            big = max(-float(lo), float(hi))
            limit = (torch.finfo(acc).max / max(1, x.shape[1])) ** 0.5 / 4
            if big > limit and big != float("inf"):
                raise RuntimeError(f"upreid::k_reciprocal_rerank: the features are finite but too large for "
                                   f"{'fp64' if acc == torch.float64 else 'fp32'} distances (largest magnitude "
                                   f"{big:.3g}, above {limit:.3g} for D = {x.shape[1]}): L2-normalise or rescale "
                                   "them")
        # Distances do not change under a translation; moving the origin into the data first keeps them
        # accurate for features far from it (all offset by 1000 left errors of 0.3 and other top-10s).
        # The new origin is the row nearest the mean, not the mean itself: subtracting a row keeps
        # features that are exact in fp32 exact (copies stay copies, equal distances stay equal). Low
        # precision is widened first, as the operator would, so that fp16 features still give exactly
        # what their fp32 values give. One [N, D] copy; the score |x|^2 - 2 x.mean needs none.
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).contiguous()
        score = torch.linalg.vector_norm(x, dim=1) ** 2 - 2 * (x @ x.mean(0))
        x = x - x.index_select(0, score.argmin().view(1))
    return torch.ops.upreid.k_reciprocal_rerank(x, int(num_query), int(k1), int(k2), float(lambda_value))


def _reference(features, num_query, k1, k2, lambda_value):
    return reference.k_reciprocal_rerank(features, num_query, k1, k2, lambda_value).float()


def k_reciprocal_rerank_dense(
    q_g: Tensor,
    q_q: Tensor,
    g_g: Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    impl: str = "fused",
) -> Tensor:
    """Re-ranking with the original signature: distances ``q_g [Q, G]``, ``q_q [Q, Q]``,
    ``g_g [G, G]`` (one dtype and device) -> ``[Q, G]`` fp32. Compatibility path: the inputs are
    dense already, so it needs their memory, unlike the features path."""
    return _dispatch.call("k_reciprocal_rerank_dense", impl, _fused_dense, _reference_dense,
                          (q_g, q_q, g_g, k1, k2, lambda_value), cpu_fallback=True)


def _fused_dense(q_g, q_q, g_g, k1, k2, lambda_value):
    return torch.ops.upreid.k_reciprocal_rerank_dense(
        q_g, q_q, g_g, int(k1), int(k2), float(lambda_value))


def _reference_dense(q_g, q_q, g_g, k1, k2, lambda_value):
    return reference.k_reciprocal_rerank_dense(q_g, q_q, g_g, k1, k2, lambda_value).float()


if _lib.HAS_EXTENSION:

    @torch.library.register_fake("upreid::k_reciprocal_rerank")
    def _rerank_fake(features, num_query, k1, k2, lambda_value):
        _checks.rerank_features(features, num_query, k1, k2, lambda_value)   # those that need no data
        n = features.shape[0]
        return features.new_empty((num_query, n - num_query), dtype=torch.float32)

    @torch.library.register_fake("upreid::k_reciprocal_rerank_dense")
    def _rerank_dense_fake(q_g, q_q, g_g, k1, k2, lambda_value):
        _checks.rerank_dense(q_g, q_q, g_g, k1, k2, lambda_value)
        return q_g.new_empty(q_g.shape, dtype=torch.float32)
