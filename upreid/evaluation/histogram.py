"""Histograms of positive and negative query-gallery distances, accumulated block by block as the
evaluation computes them (never the whole ``[Q, G]`` matrix at once).

Under the evaluation protocol a *positive* is a gallery item of the query's identity from another
camera; a *negative* is an item of another identity; items of the query's identity and camera are
left out, as they are from the metrics.
"""
from __future__ import annotations

import torch
from torch import Tensor


class DistanceHistogram:
    """Counts of positive and negative distances in ``bins`` equal bins over ``[lo, hi]`` (values
    outside are counted in the first or last bin)."""

    def __init__(self, lo: float, hi: float, bins: int = 100):
        if bins < 1:
            raise ValueError(f"DistanceHistogram: 'bins' must be >= 1, got {bins}")
        if not hi > lo:
            raise ValueError(f"DistanceHistogram: need lo < hi, got [{lo}, {hi}]")
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.positive = torch.zeros(bins, dtype=torch.float64)
        self.negative = torch.zeros(bins, dtype=torch.float64)

    def _count(self, values: Tensor) -> Tensor:
        v = values.float().clamp(self.lo, self.hi)
        return torch.histc(v, self.bins, self.lo, self.hi).double().cpu()

    def add(self, dist: Tensor, q_pids: Tensor, g_pids: Tensor, q_camids: Tensor, g_camids: Tensor) -> None:
        """Add a block of distances ``dist [q, G]`` of queries ``q_pids [q]`` against the gallery."""
        same_id = q_pids[:, None] == g_pids[None, :]                              # [q, G]
        same_cam = q_camids[:, None] == g_camids[None, :]                         # [q, G]
        self.positive += self._count(dist[same_id & ~same_cam])
        self.negative += self._count(dist[~same_id])

    def edges(self) -> list:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64).tolist()

    def to_dict(self) -> dict:
        """``edges`` (bins + 1 floats), ``positive`` and ``negative`` counts (ints)."""
        return {"edges": self.edges(), "positive": [int(c) for c in self.positive.tolist()],
                "negative": [int(c) for c in self.negative.tolist()]}


def distance_range(metric: str, rerank: bool, qf: Tensor, gf: Tensor) -> tuple[float, float]:
    """Bounds every distance of the evaluation lies in: re-ranked distances in [0, 1], ``1 - cos``
    in [0, 2], Euclidean in [0, max |q| + max |g|]."""
    if rerank:
        return 0.0, 1.0
    if metric == "cosine":
        return 0.0, 2.0
    top = float(qf.float().norm(dim=1).max() + gf.float().norm(dim=1).max())
    return 0.0, max(top, 1e-6)
