"""UP-ReID (Yang et al., CVPR 2022): MoCo v2 pre-training with intra-identity regularisation.

One file, in the spirit of MoCo's ``builder.py``. Per sample the data pipeline gives the original image
x_o (resized, normalised), two augmented views x_1, x_2, and each view's crop box (normalised y0, x0,
y1, x1 in the original) and flip flag. Losses (METHOD.md section 3):

  L_cl  instance contrast: q_1 = f_q(x_1) against k_2 = f_k(x_2) and the queue (optionally symmetric)
  L_gc  global consistency: the views' bank distributions follow the original's (bank_kl), or cosine
  L_ic  intrinsic patch contrast: stripe i of a view against the same body region of the original
        (its stripe mapped through the crop box, RoIAlign-pooled from f_k's layer-4 map of x_o),
        the other stripes of the image (or of the batch) as negatives

L = L_cl + lambda_gc L_gc + lambda_ic L_ic. All three run on the fused operators of upreid.losses.

Shuffle-BN (MoCo): BatchNorm statistics shared by a query and its key leak which key is the positive.
Under DDP the key encoder's batch is shuffled across ranks (each rank's BN sees other ranks' images).
``bn_groups = G > 1`` emulates G devices within each rank (upreid.models.group_bn): the query encoder's
BN statistics are computed per view in G consecutive groups of B / G (2G groups over the 2B images),
the key encoder's in G groups of B / G after a seeded random permutation of the batch (one rank), or
of the rank's slice of the cross-rank shuffle (DDP, which already mixes it); keys and layer-4 maps are
put back in batch order. ``G = 1`` is plain BN: the query's two views one BN batch of 2B.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upreid.losses.objective import GC_MODES, UPReIDLoss
from upreid.utils.distributed import batch_shuffle, batch_unshuffle, concat_all_gather, world_size
from upreid.models.group_bn import SeededPermutation, check_groups, convert_group_bn
from upreid.models.heads import MLPHead, roi_pool, stripe_boxes, view_stripes_on_original
from upreid.models.resnet import ResNet, check_trunk

IC_MODES = ("aligned", "unaligned", "off")
BATCH_KEYS = ("original", "view1", "view2", "box1", "box2", "flip1", "flip2")


class Encoder(nn.Module):
    """Trunk (a ResNet unless injected) + global head (+ patch head when the patch contrast is on)."""

    def __init__(self, trunk: nn.Module, hidden_dim: int, dim: int, patch_dim: int | None):
        super().__init__()
        c = check_trunk(trunk, "UPReID")
        self.trunk = trunk
        self.head = MLPHead(c, hidden_dim, dim)
        self.patch_head = MLPHead(c, hidden_dim, patch_dim) if patch_dim else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fmap = self.trunk(x)                                   # [B, C, h, w]
        z = self.head(fmap.mean(dim=(2, 3)))                   # [B, D], L2-normalised fp32
        return fmap, z


class UPReID(nn.Module):
    """The pre-training module. ``trunk`` is the feature extractor of f_q (f_k is its copy): any module
    mapping ``[B, 3, H, W]`` to ``[B, C, h, w]`` with ``out_channels = C``, as MoCo's builder takes its
    encoder. Without one, ``depth``, ``last_stride`` and ``ibn`` build a ResNet (the config path)."""

    def __init__(self, depth: int = 50, last_stride: int = 2, ibn: bool = False, width: int = 64, dim: int = 128,
                 hidden_dim: int = 2048, patch_dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.1, symmetric: bool = False,
                 gc: str = "bank_kl", gc_tau_student: float | None = None,
                 gc_tau_teacher: float | None = None, lambda_gc: float = 1.0, ic: str = "aligned",
                 ic_negatives: str = "image", ic_temperature: float | None = None,
                 lambda_ic: float = 1.0, stripes: int = 4, roi_samples: int = 2,
                 loss_impl: str = "fused", shuffle_bn: bool = True, bn_groups: int = 1,
                 trunk: nn.Module | None = None):
        super().__init__()
        if gc not in GC_MODES:
            raise ValueError(f"UPReID: gc must be one of {GC_MODES}, got {gc!r}")
        if ic not in IC_MODES:
            raise ValueError(f"UPReID: ic must be one of {IC_MODES}, got {ic!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"UPReID: momentum must be in [0, 1], got {momentum}")
        if queue_size < 1 or stripes < 1:
            raise ValueError(f"UPReID: queue_size and stripes must be >= 1, got {queue_size}, {stripes}")
        try:
            self.bn_groups = check_groups(bn_groups)
        except ValueError:
            raise ValueError(f"UPReID: bn_groups must be an integer >= 1 (1 = plain BatchNorm), got {bn_groups!r}") \
                from None
        self.m, self.ic, self.stripes = momentum, ic, stripes
        self.roi_samples, self.shuffle_bn, self.temperature = roi_samples, shuffle_bn, temperature

        if trunk is None:
            trunk = ResNet(depth, last_stride=last_stride, ibn=ibn, width=width)
        self.encoder_q = Encoder(trunk, hidden_dim, dim, patch_dim if ic != "off" else None)
        self.encoder_k = copy.deepcopy(self.encoder_q)          # f_k: EMA of f_q, never gets a gradient
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        if self.bn_groups > 1:  # G virtual devices: the query's 2B images (2 views) in 2G groups, keys in G
            convert_group_bn(self.encoder_q, 2 * self.bn_groups)
            convert_group_bn(self.encoder_k, self.bn_groups)

        # The queue of keys (K x D) and its write pointer are buffers: saved, moved, never trained.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))   # [K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # The permutations of the key encoder's batch (shuffle-BN across ranks under DDP; bn_groups > 1 on
        # one rank): a generator of its own, saved in the state dict, so that a resumed run draws the same
        # ones. Seeded from the global generator (after every weight is drawn) when bn_groups > 1; with
        # plain BN from 0, which leaves the global stream as it was (single-device runs draw nothing).
        self.key_shuffle = SeededPermutation(None if self.bn_groups > 1 else 0)

        self.criterion = UPReIDLoss(temperature, gc=gc, ic=ic != "off", lambda_gc=lambda_gc, lambda_ic=lambda_ic,
                                    gc_tau_student=gc_tau_student, gc_tau_teacher=gc_tau_teacher,
                                    ic_temperature=ic_temperature, ic_negatives=ic_negatives, symmetric=symmetric,
                                    impl=loss_impl)

    @classmethod
    def from_config(cls, cfg: dict, trunk: nn.Module | None = None) -> "UPReID":
        """From a config's ``model`` section; ``trunk`` replaces the ResNet it describes."""
        return cls(**cfg, trunk=trunk)

    def set_loss_impl(self, impl: str) -> None:
        self.criterion.set_impl(impl)

    # the objective's terms (modules of ``criterion``), by their names in the paper's equation
    loss_cl = property(lambda self: self.criterion.loss_cl)
    loss_gc = property(lambda self: self.criterion.loss_gc)
    loss_ic = property(lambda self: self.criterion.loss_ic)

    # The objective's settings live in ``criterion`` alone; the model reads (and a user may set) them here.
    def _criterion_setting(name: str):
        return property(lambda self: getattr(self.criterion, name),
                        lambda self, value: setattr(self.criterion, name, value))
    gc = _criterion_setting("gc")
    symmetric = _criterion_setting("symmetric")
    lambda_gc = _criterion_setting("lambda_gc")
    lambda_ic = _criterion_setting("lambda_ic")
    del _criterion_setting

    # ---------------------------------------------------------------- momentum encoder and queue
    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q, one fused foreach kernel over all parameters."""
        q = [p.detach() for p in self.encoder_q.parameters()]
        k = list(self.encoder_k.parameters())
        torch._foreach_lerp_(k, q, 1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: Tensor) -> None:
        """Write the keys of all ranks ([W*B, D]) at the pointer, FIFO, wrapping around."""
        keys = concat_all_gather(keys).to(self.queue.dtype)              # [W*B, D]
        n, size = keys.shape[0], self.queue.shape[0]
        keys = keys[-size:]                                              # a batch larger than the queue
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    @torch.no_grad()
    def _keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """f_k(x) with shuffle-BN: (layer-4 map [B, C, h, w], key [B, D]), row i from image i. Across ranks
        under DDP; on one rank with bn_groups > 1, a seeded permutation spreads the batch over the
        groups (with bn_groups = 1 a permutation would not change the statistics: none is drawn)."""
        if self.shuffle_bn and world_size() > 1:
            x, unshuffle = batch_shuffle(x, self.key_shuffle)           # the saved generator: resumable
            fmap, k = self.encoder_k(x)                                  # BN in bn_groups groups of the slice
            return batch_unshuffle(fmap, unshuffle), batch_unshuffle(k, unshuffle)
        if self.shuffle_bn and self.bn_groups > 1:
            perm = self.key_shuffle(x.shape[0], x.device)                # [B]
            fmap, k = self.encoder_k(x[perm])                            # group j: images perm[jB/G:(j+1)B/G]
            inv = torch.argsort(perm)                                    # inv[i]: the row image i went to
            return fmap[inv], k[inv]
        return self.encoder_k(x)

    def _stripes(self, fmap: Tensor, boxes: Tensor) -> Tensor:
        """RoIAlign-pool normalised boxes [B, P, 4] from fmap: [B, P, C]."""
        return roi_pool(fmap, boxes, self.roi_samples, max_height=1.0 / self.stripes)

    # ---------------------------------------------------------------- forward
    def forward(self, batch: dict) -> dict:
        missing = [k for k in ("original", "view1", "view2") if k not in batch]
        if missing:
            raise KeyError(f"UPReID.forward: batch lacks {missing}; expected keys {BATCH_KEYS}")
        x1, x2, xo = batch["view1"], batch["view2"], batch["original"]  # [B, 3, H, W] each
        b = x1.shape[0]
        if b % self.bn_groups:
            raise ValueError(f"UPReID: a batch of {b} images cannot be cut into bn_groups={self.bn_groups} "
                             f"BatchNorm groups of equal size; use a batch size (per rank) divisible by "
                             f"{self.bn_groups}, or another model.bn_groups")
        bank = self.queue.clone()        # [K, D]; a copy: the fused backward reads it after enqueue

        # Query encoder on both views at once: one BN batch of 2B augmented images, or (bn_groups = G > 1)
        # 2G groups of B / G, G per view.
        fq, zq = self.encoder_q(torch.cat([x1, x2]))                    # [2B, C, h, w], [2B, D]
        q1, q2 = zq[:b], zq[b:]                                         # [B, D]

        with torch.no_grad():
            self.momentum_update()
            fk2, k2 = self._keys(x2)                                    # [B, D]
            k1 = self._keys(x1)[1] if self.symmetric else None          # [B, D]
            need_original = self.gc != "off" or self.ic != "off"
            fo, ko = self._keys(xo) if need_original else (None, None)  # [B, C, h, w], [B, D]

        # (c) the patch embeddings of the intrinsic contrast: the stripes of each view, and the same regions
        # of the original (the views' stripes mapped onto it when aligned)
        u = v = None
        if self.ic != "off":
            own = stripe_boxes(self.stripes, x1.device).expand(2 * b, -1, -1)          # [2B, P, 4]
            u = self.encoder_q.patch_head(self._stripes(fq, own))                     # [2B, P, Dp]
            with torch.no_grad():
                if self.ic == "aligned":
                    for k in ("box1", "box2"):
                        if k not in batch:
                            raise KeyError(f"UPReID.forward: ic='aligned' needs '{k}' (crop boxes) in the "
                                           "batch; use ic='unaligned' for a pipeline without boxes")
                    flips = [batch.get(k, torch.zeros(b, device=x1.device)) for k in ("flip1", "flip2")]
                    regions = torch.cat([
                        view_stripes_on_original(batch["box1"].float(), flips[0], self.stripes),
                        view_stripes_on_original(batch["box2"].float(), flips[1], self.stripes)])  # [2B, P, 4]
                else:
                    regions = own
                v = self.encoder_k.patch_head(self._stripes(torch.cat([fo, fo]), regions))  # [2B, P, Dp]

        # (a) instance contrast + (b) global consistency of both views with the original + (c)
        out = self.criterion(q1, q2, k2, bank, k1=k1, k_orig=ko, patches=u, patches_orig=v)
        if u is not None:
            with torch.no_grad():
                out["patch_pos_sim"] = (u * v).sum(-1).mean()

        with torch.no_grad():
            out["pos_sim"] = (q1 * k2).sum(1).mean()
            if ko is not None:  # entropy of the original's distribution over the bank (a few rows)
                p = F.softmax(ko[:64] @ bank.T / self.loss_gc.tau_teacher, dim=1)      # [<=64, K]
                out["bank_entropy"] = -(p * torch.log(p.clamp_min(1e-30))).sum(1).mean()
            self.dequeue_and_enqueue(torch.cat([k2, k1]) if self.symmetric else k2)
        return out

    def backbone_state_dict(self) -> dict:
        """The query trunk's weights, torchvision-style keys (what fine-tuning loads)."""
        return {k: v.detach().clone() for k, v in self.encoder_q.trunk.state_dict().items()}
