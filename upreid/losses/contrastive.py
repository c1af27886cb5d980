"""Contrastive losses built on the fused ``info_nce`` and ``bank_kl`` operators.

Each module takes ``impl="fused"`` (the compiled operator, the logits never materialised) or
``impl="reference"`` (plain PyTorch, for checking and benchmarking), and a ``reduction`` of
``"mean"``, ``"sum"`` or ``"none"``. Inputs are expected L2-normalised (as MoCo's heads produce);
pass ``normalize=True`` to have the module do it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upreid.losses._reduce import check_impl, check_reduction, reduce
from upreid.ops import bank_kl, info_nce


class _Contrastive(nn.Module):
    def __init__(self, temperature: float, reduction: str, impl: str, normalize: bool):
        super().__init__()
        name = type(self).__name__
        if not (temperature > 0 and temperature < float("inf")):
            raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)
        self.reduction = check_reduction(reduction, name)
        self.impl = check_impl(impl, name)
        self.normalize = normalize

    def _norm(self, *ts: Tensor) -> tuple[Tensor, ...]:
        return tuple(F.normalize(t, dim=-1) if self.normalize else t for t in ts)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, impl={self.impl!r}, "
                f"normalize={self.normalize}")


class InfoNCE(_Contrastive):
    """General InfoNCE: ``forward(query [M, D], keys [N, D], positive [M], bank [K, D] | None)``.

    ``group_size`` selects the key negatives of each row: 0 = all keys, 1 = only the positive,
    P = the keys of the positive's group of P (see :func:`upreid.ops.info_nce`).
    """

    def __init__(self, temperature: float = 0.1, group_size: int = 0, reduction: str = "mean",
                 impl: str = "fused", normalize: bool = False):
        super().__init__(temperature, reduction, impl, normalize)
        if group_size < 0:
            raise ValueError(f"InfoNCE: group_size must be >= 0, got {group_size}")
        self.group_size = int(group_size)

    def forward(self, query: Tensor, keys: Tensor, positive: Tensor,
                bank: Tensor | None = None) -> Tensor:
        query, keys = self._norm(query, keys)
        loss, _ = info_nce(query, keys, positive, bank, self.temperature, self.group_size, self.impl)
        return reduce(loss, self.reduction)


class MoCoLoss(_Contrastive):
    """MoCo's instance contrast: ``forward(query [B, D], key [B, D], queue [K, D])``.

    Row i's positive is ``key[i]``; the negatives are the queue rows. The queue is a buffer: pass it
    detached (a queue that requires grad is an error).
    """

    def __init__(self, temperature: float = 0.2, reduction: str = "mean", impl: str = "fused",
                 normalize: bool = False):
        super().__init__(temperature, reduction, impl, normalize)

    def forward(self, query: Tensor, key: Tensor, queue: Tensor | None) -> Tensor:
        if query.shape != key.shape:
            raise ValueError(f"MoCoLoss: query {tuple(query.shape)} and key {tuple(key.shape)} "
                             "must have the same shape [B, D]")
        query, key = self._norm(query, key)
        positive = torch.arange(query.shape[0], device=query.device)
        loss, _ = info_nce(query, key, positive, queue, self.temperature, 1, self.impl)
        return reduce(loss, self.reduction)


class PatchInfoNCE(_Contrastive):
    """Intrinsic contrast among the stripes (patches) of each image.

    ``forward(patches [B, P, D], targets [B, P, D], bank=None)``: stripe i of image b in ``patches``
    (an augmented view) has stripe i of image b in ``targets`` (the original image, the same body
    region) as its positive. Negatives: ``"image"`` = the other stripes of the same image (group
    contrast, the UP-ReID default), ``"batch"`` = every stripe of every image in the batch.
    """

    def __init__(self, temperature: float = 0.1, negatives: str = "image", reduction: str = "mean",
                 impl: str = "fused", normalize: bool = False):
        super().__init__(temperature, reduction, impl, normalize)
        if negatives not in ("image", "batch"):
            raise ValueError(f"PatchInfoNCE: negatives must be 'image' or 'batch', got {negatives!r}")
        self.negatives = negatives

    def forward(self, patches: Tensor, targets: Tensor, bank: Tensor | None = None) -> Tensor:
        if patches.dim() != 3 or patches.shape != targets.shape:
            raise ValueError(
                f"PatchInfoNCE: patches {tuple(patches.shape)} and targets {tuple(targets.shape)} "
                "must both be [B, P, D]"
            )
        b, p, d = patches.shape
        patches, targets = self._norm(patches, targets)
        query = patches.reshape(b * p, d)                                  # [B*P, D]
        keys = targets.reshape(b * p, d)                                   # [B*P, D]
        positive = torch.arange(b * p, device=patches.device)
        group = p if self.negatives == "image" else 0
        loss, _ = info_nce(query, keys, positive, bank, self.temperature, group, self.impl)
        if self.reduction == "none":
            return loss.view(b, p)
        return reduce(loss, self.reduction)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", negatives={self.negatives!r}"


class BankKL(nn.Module):
    """Global consistency: ``forward(student [M, D], teacher [M, D], bank [K, D])`` returns
    ``KL(softmax(teacher . bank / tau_teacher) || softmax(student . bank / tau_student))``.

    The teacher (the original image's key) is a target: it is detached here, and only the student
    receives a gradient.
    """

    def __init__(self, tau_student: float = 0.1, tau_teacher: float = 0.1, reduction: str = "mean",
                 impl: str = "fused", normalize: bool = False):
        super().__init__()
        for name, tau in (("tau_student", tau_student), ("tau_teacher", tau_teacher)):
            if not (tau > 0 and tau < float("inf")):
                raise ValueError(f"BankKL: {name} must be a finite number > 0, got {tau}")
        self.tau_student, self.tau_teacher = float(tau_student), float(tau_teacher)
        self.reduction = check_reduction(reduction, "BankKL")
        self.impl = check_impl(impl, "BankKL")
        self.normalize = normalize

    def forward(self, student: Tensor, teacher: Tensor, bank: Tensor) -> Tensor:
        if self.normalize:
            student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        kl, _, _ = bank_kl(student, teacher.detach(), bank, self.tau_student, self.tau_teacher,
                           self.impl)
        return reduce(kl, self.reduction)

    def extra_repr(self) -> str:
        return (f"tau_student={self.tau_student}, tau_teacher={self.tau_teacher}, "
                f"reduction={self.reduction!r}, impl={self.impl!r}")
