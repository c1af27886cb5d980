"""Loss modules users import. The contrastive ones run on the fused operators of :mod:`upreid.ops`;
:class:`UPReIDLoss` is the whole pre-training objective on them; :class:`TripletLoss` and
:class:`CrossEntropyLabelSmooth` are fine-tuning's (BoT)."""
from upreid.losses.contrastive import BankKL, InfoNCE, MoCoLoss, PatchInfoNCE
from upreid.losses.objective import UPReIDLoss
from upreid.losses.reid import CrossEntropyLabelSmooth, TripletLoss, batch_hard_triplet, cross_entropy_ls

__all__ = ["BankKL", "InfoNCE", "MoCoLoss", "PatchInfoNCE", "UPReIDLoss", "TripletLoss", "CrossEntropyLabelSmooth",
           "batch_hard_triplet", "cross_entropy_ls"]
