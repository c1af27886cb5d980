"""The UP-ReID objective as one module, for any encoder pair (METHOD.md 1):

    L = L_cl + lambda_gc L_gc + lambda_ic L_ic

- ``L_cl``: MoCo's instance contrast of view 1's query against view 2's key and the queue (both
  directions averaged when ``symmetric``);
- ``L_gc``: global consistency of both views' queries with the original image's key, ``"bank_kl"``
  (KL between their softmaxes over the queue, teacher = original) or ``"cosine"`` (2 - 2 cos);
- ``L_ic``: intrinsic contrast of each view's patch embeddings against the embeddings of the same
  regions of the original (the other patches of the image are the negatives).

:class:`upreid.models.UPReID` computes the embeddings (query and momentum encoders, stripes, the
aligned regions) and calls this module; a user with another architecture can call it directly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from upreid.losses.contrastive import BankKL, MoCoLoss, PatchInfoNCE

GC_MODES = ("bank_kl", "cosine", "off")


class UPReIDLoss(nn.Module):
    """``forward(q1, q2, k2, bank, *, k1=None, k_orig=None, patches=None, patches_orig=None)`` -> dict
    with ``loss`` (the total) and its terms ``loss_cl``, ``loss_gc`` (when ``gc`` is on), ``loss_ic``
    (when ``ic``).

    - ``q1``, ``q2``: the query embeddings of the two views ``[B, D]``; ``k2``: the key of view 2
      ``[B, D]`` (``k1``, view 1's, when ``symmetric``); ``bank``: the queue ``[K, D]`` as it was before
      this step's keys are written. All L2-normalised, as MoCo's heads give them.
    - ``k_orig``: the key of the un-augmented original ``[B, D]`` (needed when ``gc`` is on).
    - ``patches``: both views' patch embeddings ``[2B, P, Dp]`` (view 1's rows, then view 2's);
      ``patches_orig``: the embeddings of the same regions on the original, in the same order
      (needed when ``ic``).

    The keys, the bank and the original's embeddings are targets: they are detached here, and only the
    queries and the views' patch embeddings receive a gradient. Temperatures: ``temperature`` for the
    instance contrast and the default of the other two.
    ``impl``: ``"fused"`` (the compiled operators) or ``"reference"`` (plain PyTorch)."""

    def __init__(self, temperature: float = 0.1, *, gc: str = "bank_kl", ic: bool = True,
                 lambda_gc: float = 1.0, lambda_ic: float = 1.0, gc_tau_student: float | None = None,
                 gc_tau_teacher: float | None = None, ic_temperature: float | None = None,
                 ic_negatives: str = "image", symmetric: bool = False, impl: str = "fused"):
        super().__init__()
        if gc not in GC_MODES:
            raise ValueError(f"UPReIDLoss: gc must be one of {GC_MODES}, got {gc!r}")
        for name, lam in (("lambda_gc", lambda_gc), ("lambda_ic", lambda_ic)):
            if not lam >= 0:
                raise ValueError(f"UPReIDLoss: {name} must be >= 0, got {lam}")
        self.gc, self.ic, self.symmetric = gc, bool(ic), bool(symmetric)
        self.lambda_gc, self.lambda_ic = float(lambda_gc), float(lambda_ic)
        def tau(t):   # None: the instance contrast's; any given value is validated, 0 included
            return temperature if t is None else t
        self.loss_cl = MoCoLoss(temperature, impl=impl)
        self.loss_gc = BankKL(tau(gc_tau_student), tau(gc_tau_teacher), impl=impl)
        self.loss_ic = PatchInfoNCE(tau(ic_temperature), negatives=ic_negatives, impl=impl)

    def set_impl(self, impl: str) -> None:
        for loss in (self.loss_cl, self.loss_gc, self.loss_ic):
            loss.impl = impl

    def forward(self, q1: Tensor, q2: Tensor, k2: Tensor, bank: Tensor, *, k1: Tensor | None = None,
                k_orig: Tensor | None = None, patches: Tensor | None = None,
                patches_orig: Tensor | None = None) -> dict:
        missing = [name for name, t, need in (("k1", k1, self.symmetric), ("k_orig", k_orig, self.gc != "off"),
                                              ("patches", patches, self.ic), ("patches_orig", patches_orig, self.ic))
                   if need and t is None]
        if missing:
            raise ValueError(f"UPReIDLoss: {', '.join(missing)} needed (gc={self.gc!r}, ic={self.ic}, "
                             f"symmetric={self.symmetric})")
        # the momentum encoder's outputs are targets: whatever produced them, no gradient reaches them
        k1, k2, bank = (None if t is None else t.detach() for t in (k1, k2, bank))
        k_orig, patches_orig = (None if t is None else t.detach() for t in (k_orig, patches_orig))
        out = {}
        loss_cl = self.loss_cl(q1, k2, bank)
        if self.symmetric:
            loss_cl = 0.5 * (loss_cl + self.loss_cl(q2, k1, bank))
        out["loss_cl"] = total = loss_cl
        if self.gc != "off":
            queries, teacher = torch.cat([q1, q2]), torch.cat([k_orig, k_orig])                    # [2B, D]
            if self.gc == "bank_kl":
                loss_gc = self.loss_gc(queries, teacher, bank)                         # mean over 2B rows
            else:
                loss_gc = (2 - 2 * (queries * teacher.detach()).sum(1)).mean()
            out["loss_gc"] = loss_gc
            total = total + self.lambda_gc * loss_gc
        if self.ic:
            loss_ic = self.loss_ic(patches, patches_orig)
            out["loss_ic"] = loss_ic
            total = total + self.lambda_ic * loss_ic
        out["loss"] = total
        return out

    def extra_repr(self) -> str:
        return (f"gc={self.gc!r}, ic={self.ic}, lambda_gc={self.lambda_gc}, lambda_ic={self.lambda_ic}, "
                f"symmetric={self.symmetric}")

