"""Pure NumPy references of the evaluation operators: the single source of truth for their tests,
benchmarks and the fallback when the extension is absent.

* :func:`k_reciprocal_rerank_dense` transcribes the original k-reciprocal re-ranking (Zhong et al.,
  CVPR 2017) from the algorithm, dense ``N x N`` as the original, with one deliberate change: every
  sort is stable, so ties are ordered by index (the original's quicksort leaves them unspecified).
* :func:`k_reciprocal_rerank` feeds it the Euclidean distances of features (queries first).
* :func:`rank_metrics` is the sort-based CMC / AP / INP of torchreid and fast-reid, with a stable
  sort (ties by gallery index).

These need ``O(N^2)`` memory (about 8 GB of float64 per matrix at Market1501 size): tests use them on
small inputs only.
"""
from __future__ import annotations

import numpy as np
import torch

from upreid.ops import _checks


def _np(x, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def check_rerank_params(k1: int, k2: int, lambda_value: float, op: str) -> None:
    """The operators' checks of k1, k2 and lambda, as the references' ValueError."""
    try:
        _checks.rerank_params(k1, k2, lambda_value, op)
    except RuntimeError as e:
        raise ValueError(str(e)) from None


def _check_finite(x: np.ndarray, op: str, name: str) -> None:
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{op}: '{name}' contains NaN or Inf; every value must be finite")


def k_reciprocal_rerank_dense(q_g, q_q, g_g, k1: int = 20, k2: int = 6,
                              lambda_value: float = 0.3) -> torch.Tensor:
    """Re-ranked distance ``[Q, G]`` (float64) from distances ``q_g [Q, G]``, ``q_q``, ``g_g``."""
    op = "reference.k_reciprocal_rerank_dense"
    q_g, q_q, g_g = _np(q_g, np.float64), _np(q_q, np.float64), _np(g_g, np.float64)
    Q, G = q_g.shape
    if Q == 0 or G == 0:
        raise ValueError(f"{op}: queries and gallery must be non-empty, got q_g {q_g.shape}")
    if q_q.shape != (Q, Q) or g_g.shape != (G, G):
        raise ValueError(f"{op}: q_q {q_q.shape} / g_g {g_g.shape} do not match q_g {q_g.shape}")
    check_rerank_params(k1, k2, lambda_value, op)
    for name, x in (("q_g", q_g), ("q_q", q_q), ("g_g", g_g)):
        _check_finite(x, op, name)
    N = Q + G

    # The original squares the distances, divides each column by its maximum and transposes:
    # row i of `dist` is column i of the squared block matrix over its maximum.
    sq = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2  # [N, N]
    colmax = sq.max(axis=0)
    dist = (sq / np.where(colmax > 0, colmax, 1.0)).T  # [N, N]
    rank = np.argsort(dist, axis=1, kind="stable")  # ties: ascending index
    k = min(k1 + 1, N)
    half = int(np.around(k1 / 2.0)) + 1  # numpy rounds half to even

    def reciprocal(i: int, size: int) -> np.ndarray:
        forward = rank[i, :size]
        backward = rank[forward, :size]  # [size, size]
        return forward[(backward == i).any(axis=1)]

    V = np.zeros((N, N))
    for i in range(N):
        recip = reciprocal(i, k)
        members = [recip]
        for c in recip:
            cand = reciprocal(int(c), half)
            if len(np.intersect1d(cand, recip)) > 2.0 / 3 * len(cand):
                members.append(cand)
        expanded = np.unique(np.concatenate(members))
        weight = np.exp(-dist[i, expanded])
        V[i, expanded] = weight / weight.sum()
    if k2 != 1:  # local query expansion over the k2 nearest rows
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(N)])

    inverted = [np.nonzero(V[:, c])[0] for c in range(N)]
    jaccard = np.ones((Q, N))
    for i in range(Q):
        tmin = np.zeros(N)
        for c in np.nonzero(V[i])[0]:
            rows = inverted[c]
            tmin[rows] += np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1.0 - tmin / (2.0 - tmin)
    final = jaccard * (1.0 - lambda_value) + dist[:Q] * lambda_value
    return torch.from_numpy(np.ascontiguousarray(final[:, Q:]))


def euclidean_distances(a, b, same: bool = False) -> np.ndarray:
    """Euclidean distances in float64 from the differences themselves, not |a|^2 + |b|^2 - 2ab: identical
    rows are exactly 0 apart and mirrored pairs exactly equal, so duplicates tie as they do in the
    operators (the expanded form left ~1e-8 between copies, which reordered their neighbours). Row blocks
    of at most 4M differences bound the memory. ``same``: ``a is b``, the diagonal is exactly 0."""
    a, b = _np(a, np.float64), _np(b, np.float64)
    out = np.empty((a.shape[0], b.shape[0]))
    step = max(1, (1 << 22) // max(1, b.shape[0] * a.shape[1]))
    for i in range(0, a.shape[0], step):
        diff = a[i:i + step, None, :] - b[None, :, :]
        out[i:i + step] = np.sqrt((diff * diff).sum(-1))
    if same:
        np.fill_diagonal(out, 0.0)
    return out


def k_reciprocal_rerank(features, num_query: int, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> torch.Tensor:
    """Re-ranking from features ``[N, D]`` (queries first): the dense reference fed with their
    Euclidean distances (which it squares, as the original does). Float64 ``[Q, G]``."""
    op = "reference.k_reciprocal_rerank"
    x = _np(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{op}: 'features' must be 2-D [N, D], got shape {x.shape}")
    if not 0 < num_query < x.shape[0]:
        raise ValueError(f"{op}: 'num_query' must be in (0, N) = (0, {x.shape[0]}), got {num_query}")
    _check_finite(x, op, "features")
    q, g = x[:num_query], x[num_query:]
    return k_reciprocal_rerank_dense(euclidean_distances(q, g), euclidean_distances(q, q, True),
                                     euclidean_distances(g, g, True), k1, k2, lambda_value)


def rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """Sort-based CMC / AP / INP (torchreid / fast-reid convention, stable sort).

    Returns ``(cmc [max_rank] float32, ap [Q] float32, inp [Q] float32, valid [Q] bool)`` as tensors;
    ``cmc[r]`` is the fraction of valid queries whose first match has rank ``<= r``.
    """
    op = "reference.rank_metrics"
    d = _np(distmat, np.float64)
    q_pids, g_pids = _np(q_pids).astype(np.int64), _np(g_pids).astype(np.int64)
    q_camids, g_camids = _np(q_camids).astype(np.int64), _np(g_camids).astype(np.int64)
    if d.ndim != 2:
        raise ValueError(f"{op}: 'distmat' must be 2-D [Q, G], got shape {d.shape}")
    Q, G = d.shape
    if len(q_pids) != Q or len(q_camids) != Q or len(g_pids) != G or len(g_camids) != G:
        raise ValueError(f"{op}: label lengths do not match distmat {d.shape}")
    if max_rank < 1:
        raise ValueError(f"{op}: 'max_rank' must be >= 1, got {max_rank}")
    if G == 0 and Q > 0:
        raise ValueError(f"{op}: the gallery is empty")
    _check_finite(d, op, "distmat")
    order = np.argsort(d, axis=1, kind="stable")
    ap, inp, valid = np.zeros(Q), np.zeros(Q), np.zeros(Q, dtype=bool)
    hist = np.zeros(max_rank)
    for q in range(Q):
        o = order[q]
        keep = ~((g_pids[o] == q_pids[q]) & (g_camids[o] == q_camids[q]))
        matches = g_pids[o][keep] == q_pids[q]
        if not matches.any():
            continue
        pos = np.nonzero(matches)[0]  # 0-based ranks of the positives
        valid[q] = True
        ap[q] = np.mean(np.arange(1, len(pos) + 1) / (pos + 1.0))
        inp[q] = len(pos) / (pos[-1] + 1.0)
        if pos[0] < max_rank:
            hist[pos[0]] += 1
    n = valid.sum()
    cmc = np.cumsum(hist) / n if n else np.zeros(max_rank)
    return (torch.from_numpy(cmc.astype(np.float32)), torch.from_numpy(ap.astype(np.float32)),
            torch.from_numpy(inp.astype(np.float32)), torch.from_numpy(valid))
