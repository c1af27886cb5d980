"""The evaluation API: query/gallery features in, mAP / mINP / CMC out.

Convention (torchreid / fast-reid, used by all published ReID numbers): per query, gallery items
with the same identity and the same camera are dropped; identity ``junk_pid`` (-1) is removed from
query and gallery; distractors (identity 0) stay as non-matches. AP is non-interpolated, CMC counts
the first correct match, mINP uses the hardest positive. Ranks follow ascending distance, ties by
ascending gallery index. Metrics are fractions in [0, 1].
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor

from upreid.evaluation.histogram import DistanceHistogram, distance_range
from upreid.evaluation.progress import Progress
from upreid.ops.rank import rank_metrics
from upreid.ops.rerank import k_reciprocal_rerank

log = logging.getLogger("upreid.evaluation")

METRICS = ("cosine", "euclidean")


def _tensor(x, name: str, floating: bool) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if floating:
        if not t.is_floating_point():
            t = t.float()
        if t.dim() != 2:
            raise ValueError(f"evaluate: '{name}' must be 2-D [n, D], got shape {tuple(t.shape)}")
    else:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"evaluate: '{name}' must hold integers, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"evaluate: '{name}' must be 1-D [n], got shape {tuple(t.shape)}")
        t = t.long()
    return t


def pairwise_distance(qf: Tensor, gf: Tensor, metric: str) -> Tensor:
    """``[q, g]`` distances: ``1 - cos`` for "cosine", Euclidean for "euclidean" (fp32 or fp64)."""
    acc = torch.float64 if qf.dtype == torch.float64 else torch.float32
    qf, gf = qf.to(acc), gf.to(acc)
    if metric == "cosine":
        qf = torch.nn.functional.normalize(qf, dim=1)
        gf = torch.nn.functional.normalize(gf, dim=1)
        return 1.0 - qf @ gf.t()
    if metric == "euclidean":
        sq = qf.pow(2).sum(1, keepdim=True) + gf.pow(2).sum(1)[None, :] - 2.0 * qf @ gf.t()
        return sq.clamp_min_(0).sqrt_()
    raise ValueError(f"evaluate: 'metric' must be one of {METRICS}, got {metric!r}")


def evaluate(
    query_features,
    gallery_features,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    metric: str = "cosine",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    junk_pid: int | None = -1,
    chunk_size: int | None = None,
    progress: bool = True,
    distance_bins: int = 0,
) -> dict:
    """ReID evaluation of query features against gallery features.

    Args:
        query_features, gallery_features: ``[Q, D]`` and ``[G, D]`` (tensors or arrays, one device).
        q_pids, g_pids, q_camids, g_camids: integer identities and cameras.
        metric: "cosine" (rows L2-normalised; with re-ranking, Euclidean distance of the normalised
            features) or "euclidean".
        rerank: apply exact k-reciprocal re-ranking (``k1``, ``k2``, ``lambda_value``).
        max_rank: length of the CMC curve.
        junk_pid: identity removed from query and gallery before evaluation (None keeps all).
        chunk_size: queries per distance block without re-ranking (default: blocks of ~2^25
            distances), which bounds memory to ``O(chunk_size * G)``.
        progress: show a progress bar (tqdm) or log lines.
        distance_bins: when > 0, also histogram the positive and negative distances (the re-ranked
            ones with ``rerank``) in that many bins: ``distances`` in the result
            (:class:`upreid.evaluation.histogram.DistanceHistogram`).

    Returns:
        dict with ``mAP``, ``mINP``, ``Rank-1``, ``Rank-5``, ``Rank-10`` (those <= max_rank), ``cmc``
        (list of ``max_rank`` floats), ``num_query``, ``num_valid_query``, ``num_gallery``, ``seconds``
        (and ``distances`` with ``distance_bins``).
    """
    t0 = time.perf_counter()
    if metric not in METRICS:
        raise ValueError(f"evaluate: 'metric' must be one of {METRICS}, got {metric!r}")
    qf = _tensor(query_features, "query_features", True)
    gf = _tensor(gallery_features, "gallery_features", True)
    q_pids, g_pids = _tensor(q_pids, "q_pids", False), _tensor(g_pids, "g_pids", False)
    q_camids, g_camids = _tensor(q_camids, "q_camids", False), _tensor(g_camids, "g_camids", False)
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"evaluate: query_features have {qf.shape[1]} dimensions but "
                         f"gallery_features have {gf.shape[1]}")
    for name, labels, n, what in (("q_pids", q_pids, qf.shape[0], "query_features"),
                                  ("q_camids", q_camids, qf.shape[0], "query_features"),
                                  ("g_pids", g_pids, gf.shape[0], "gallery_features"),
                                  ("g_camids", g_camids, gf.shape[0], "gallery_features")):
        if labels.shape[0] != n:
            raise ValueError(f"evaluate: '{name}' has {labels.shape[0]} entries but {what} has {n} "
                             "rows; the lengths must match")
    if max_rank < 1:
        raise ValueError(f"evaluate: 'max_rank' must be >= 1, got {max_rank}")
    device = qf.device
    if junk_pid is not None:
        keep_q, keep_g = q_pids != junk_pid, g_pids != junk_pid
        qf, q_pids, q_camids = qf[keep_q], q_pids[keep_q], q_camids[keep_q]
        gf, g_pids, g_camids = gf[keep_g], g_pids[keep_g], g_camids[keep_g]
    Q, G = qf.shape[0], gf.shape[0]
    if Q == 0:
        raise ValueError("evaluate: no query left (empty, or all junk)")
    if G == 0:
        raise ValueError("evaluate: the gallery is empty (or all junk)")
    for name, f in (("query_features", qf), ("gallery_features", gf)):
        if not torch.isfinite(f).all():
            raise ValueError(f"evaluate: '{name}' contains NaN or Inf; every value must be finite")
    labels = [t.to(device) for t in (q_pids, g_pids, q_camids, g_camids)]

    ap, inp, valid = [], [], []
    cmc_hits = torch.zeros(max_rank, dtype=torch.float64)
    hist = DistanceHistogram(*distance_range(metric, rerank, qf, gf), distance_bins) if distance_bins else None

    def score(dist: Tensor, s: slice) -> None:
        c, a, i, v = rank_metrics(dist, labels[0][s], labels[1], labels[2][s], labels[3], max_rank)
        ap.append(a.cpu())
        inp.append(i.cpu())
        valid.append(v.cpu())
        cmc_hits.add_(c.cpu().double() * v.sum().item())
        if hist is not None:
            hist.add(dist, labels[0][s], labels[1], labels[2][s], labels[3])

    if rerank:
        feats = torch.cat([qf, gf])  # [Q + G, D]
        if metric == "cosine":
            feats = torch.nn.functional.normalize(feats.float() if feats.dtype in (
                torch.float16, torch.bfloat16) else feats, dim=1)
        log.info("re-ranking %d queries x %d gallery (k1=%d, k2=%d, lambda=%g)", Q, G, k1, k2,
                 lambda_value)
        tr = time.perf_counter()
        dist = k_reciprocal_rerank(feats, Q, k1, k2, lambda_value)  # [Q, G]
        log.info("re-ranking done in %.2f s", time.perf_counter() - tr)
        rows = chunk_size or max(1, (1 << 25) // G)
        with Progress(Q, "ranking", progress) as bar:
            for q0 in range(0, Q, rows):
                s = slice(q0, min(Q, q0 + rows))
                score(dist[s], s)
                bar.update(s.stop - s.start)
    else:
        rows = chunk_size or max(1, (1 << 25) // G)
        with Progress(Q, "evaluating", progress) as bar:
            for q0 in range(0, Q, rows):
                s = slice(q0, min(Q, q0 + rows))
                score(pairwise_distance(qf[s], gf, metric), s)
                bar.update(s.stop - s.start)

    ap_t, inp_t, valid_t = torch.cat(ap), torch.cat(inp), torch.cat(valid)
    n_valid = int(valid_t.sum())
    if n_valid == 0:
        raise ValueError("evaluate: no query has a positive in the gallery (same identity, other "
                         "camera); check the identities and cameras")
    cmc = (cmc_hits / n_valid).tolist()
    out = {
        "mAP": float(ap_t[valid_t].double().mean()),
        "mINP": float(inp_t[valid_t].double().mean()),
    }
    for r in (1, 5, 10):
        if r <= max_rank:
            out[f"Rank-{r}"] = cmc[r - 1]
    out.update(cmc=cmc, num_query=Q, num_valid_query=n_valid, num_gallery=G,
               seconds=time.perf_counter() - t0)
    if hist is not None:
        out["distances"] = hist.to_dict()
    return out


def format_table(result: dict, title: str | None = None) -> str:
    """Plain-text table of the headline metrics in percent."""
    keys = [k for k in ("mAP", "mINP", "Rank-1", "Rank-5", "Rank-10") if k in result]
    lines = [title] if title else []
    lines.append(" | ".join(f"{k:>7}" for k in keys))
    lines.append("-+-".join("-" * 7 for _ in keys))
    lines.append(" | ".join(f"{100.0 * result[k]:7.2f}" for k in keys))
    lines.append(f"{result['num_valid_query']} valid of {result['num_query']} queries, "
                 f"{result['num_gallery']} gallery images, {result['seconds']:.2f} s")
    return "\n".join(lines)
