"""The supervised ReID losses of fine-tuning (BoT): label-smoothed cross entropy on the identity logits
and the batch-hard triplet loss on the features, as functions and as modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cross_entropy_ls(logits: Tensor, target: Tensor, epsilon: float = 0.1) -> Tensor:
    """Label-smoothed cross entropy (BoT: epsilon 0.1), computed in fp32."""
    return F.cross_entropy(logits.float(), target, label_smoothing=epsilon)


def batch_hard_triplet(feats: Tensor, pids: Tensor, margin: float | None = 0.3) -> Tensor:
    """Batch-hard triplet loss (Hermans et al.) on Euclidean distances: for each anchor the farthest
    positive and the closest negative of the batch. ``margin=None``: the soft margin log(1 + e^x)."""
    f = feats.float()
    sq = f.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * f @ f.t()).clamp_min(1e-12).sqrt()   # [B, B]
    same = pids[:, None] == pids[None, :]
    hardest_pos = (dist * same).max(1).values                                    # [B]
    hardest_neg = dist.masked_fill(same, float("inf")).min(1).values             # [B]
    valid = torch.isfinite(hardest_neg)
    if not bool(valid.any()):
        return f.sum() * 0.0
    diff = (hardest_pos - hardest_neg)[valid]
    return F.softplus(diff).mean() if margin is None else F.relu(diff + margin).mean()


class CrossEntropyLabelSmooth(nn.Module):
    """``forward(logits [B, C], pids [B])``: :func:`cross_entropy_ls` with ``epsilon`` in [0, 1)."""

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"CrossEntropyLabelSmooth: epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = float(epsilon)

    def forward(self, logits: Tensor, pids: Tensor) -> Tensor:
        return cross_entropy_ls(logits, pids, self.epsilon)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


class TripletLoss(nn.Module):
    """``forward(features [B, D], pids [B])``: :func:`batch_hard_triplet` (``margin=None``: soft margin).
    A batch with no negative for any anchor gives 0 (with a graph, so backward still runs)."""

    def __init__(self, margin: float | None = 0.3):
        super().__init__()
        if margin is not None and not margin > 0:
            raise ValueError(f"TripletLoss: margin must be > 0 or None (soft margin), got {margin}")
        self.margin = None if margin is None else float(margin)

    def forward(self, features: Tensor, pids: Tensor) -> Tensor:
        return batch_hard_triplet(features, pids, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
