"""The loaders users call: ``build_loader(kind, records, ...)`` for kind 'pretrain', 'finetune' or
'eval', backed by NVIDIA DALI ('dali') or Pillow + torch ('torch'); 'auto' picks DALI when it is
installed. Both backends yield the same dicts of batch-first torch tensors:

pretrain  original, view1, view2 [B, 3, H, W]; box1, box2 [B, 4] normalised (y0, x0, y1, x1) crop
          boxes in the original; flip1, flip2, gray1, gray2, sigma1, sigma2 [B] (sigma 0 = not
          blurred); erase1, erase2 [B, 4] normalised erased rectangle (zeros = none); index [B]
finetune  images [B, 3, H, W]; pids, camids, index [B]; flip [B]; shift [B, 2] (dy, dx) of the
          pad-and-crop; erase [B, 4]
eval      images [B, 3, H, W] (+ images_flipped with flip_test); pids, camids, index [B]

Iterating a loader runs one epoch and advances its epoch counter (or call ``set_epoch``). After an
epoch, ``loader.summary`` holds the counts (samples, batches, skipped bad images and their paths,
images the sampler did not draw) and they are logged: nothing is dropped silently.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, List, Optional, Sequence

import torch

from .augment import from_config
from .imageio import check_policy
from .records import Record
from .samplers import PKBatches, SequentialBatches, ShuffleBatches

log = logging.getLogger(__name__)

KINDS = ("pretrain", "finetune", "eval")
BACKENDS = ("auto", "dali", "torch")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def make_sampler(kind: str, records: Sequence[Record], batch_size: int, rank: int, world: int, seed: int,
                 p: Optional[int] = None, k: int = 4):
    if kind == "eval":
        return SequentialBatches(len(records), batch_size, rank, world)
    if kind == "pretrain":
        return ShuffleBatches(len(records), batch_size, rank, world, seed)
    if p is None:
        if batch_size % k:
            raise ValueError(f"finetune batch_size {batch_size} must be a multiple of K={k} (P x K sampling)")
        p = batch_size // k
    return PKBatches([r.pid for r in records], p, k, rank, world, seed)


class BaseLoader:
    """Epoch bookkeeping shared by the backends."""

    def __init__(self, kind: str, records: Sequence[Record], sampler, aug, *, seed: int, on_bad_image: str,
                 rank: int, world: int):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not records:
            raise ValueError(f"{kind} loader: no records (the split is empty)")
        self.kind, self.records, self.sampler, self.aug = kind, list(records), sampler, aug
        self.seed, self.on_bad_image = seed, check_policy(on_bad_image)
        self.rank, self.world = rank, world
        self.epoch = 0
        self.summary: dict = {}

    def __len__(self) -> int:
        return len(self.sampler.batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _finish_epoch(self, samples: int, batches: int, skipped: List[str]) -> None:
        self.summary = {"epoch": self.epoch, "samples": samples, "batches": batches,
                        "skipped": len(skipped), "skipped_paths": list(skipped),
                        "not_drawn": self.sampler.dropped(), "backend": self.backend}
        msg = (f"{self.kind} epoch {self.epoch} (rank {self.rank}/{self.world}, {self.backend}): {samples} samples "
               f"in {batches} batches, {len(skipped)} bad images skipped")
        if skipped:
            msg += f" (e.g. {skipped[:3]})"
        if self.summary["not_drawn"]:
            msg += f", {self.summary['not_drawn']} images not drawn by the sampler this epoch"
        log.info(msg)
        self.epoch += 1


def build_loader(kind: str, records: Sequence[Record], *, batch_size: int, backend: str = "auto",
                 device: Optional[str] = None, aug: Optional[dict] = None, seed: int = 0, rank: int = 0,
                 world: int = 1, workers: int = 2, on_bad_image: str = "error", p: Optional[int] = None,
                 k: int = 4, prefetch: int = 2):
    """Build a loader (see the module docstring). ``device``: 'cpu' or 'cuda' (default: cuda when
    available). ``aug``: a dict of augmentation options (:mod:`upreid.data.augment`). ``workers``:
    DALI threads or DataLoader worker processes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    augment = from_config(kind, aug)
    sampler = make_sampler(kind, records, batch_size, rank, world, seed, p, k)
    if backend == "dali":
        from .dali_pipeline import DaliLoader

        return DaliLoader(kind, records, sampler, augment, batch_size=batch_size, device=device, seed=seed,
                          on_bad_image=on_bad_image, rank=rank, world=world, threads=workers, prefetch=prefetch)
    from .torch_pipeline import TorchLoader

    return TorchLoader(kind, records, sampler, augment, device=device, seed=seed, on_bad_image=on_bad_image,
                       rank=rank, world=world, workers=workers, prefetch=prefetch)
