"""Loss modules users import. The contrastive ones run on the fused operators of :mod:`upreid.ops`."""
from upreid.losses.contrastive import BankKL, InfoNCE, MoCoLoss, PatchInfoNCE

__all__ = ["BankKL", "InfoNCE", "MoCoLoss", "PatchInfoNCE"]
