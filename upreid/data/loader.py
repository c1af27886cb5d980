"""The loaders users call: ``build_loader(kind, records, ...)`` for kind 'pretrain', 'finetune' or
'eval', backed by NVIDIA DALI ('dali') or Pillow + torch ('torch'); 'auto' picks DALI when it is
installed. Both backends yield the same dicts of batch-first torch tensors:

pretrain  original, view1, view2 [B, 3, H, W]; box1, box2 [B, 4] normalised (y0, x0, y1, x1) crop
          boxes in the original; flip1, flip2, gray1, gray2, sigma1, sigma2 [B] (sigma 0 = not
          blurred); erase1, erase2 [B, 4] normalised erased rectangle (zeros = none); index [B];
          with color_p > 0 also color1, color2 [B, 5] (gains r, g, b, brightness, contrast; ones = none)
finetune  images [B, 3, H, W]; pids, camids, index [B]; flip [B]; shift [B, 2] (dy, dx) of the
          pad-and-crop; erase [B, 4]; with color_p > 0 also color [B, 5]
eval      images [B, 3, H, W] (+ images_flipped with flip_test); pids, camids, index [B]

Iterating a loader runs one epoch and advances its epoch counter (or call ``set_epoch``). After an
epoch, ``loader.summary`` holds the counts (samples, batches, skipped bad images and their paths,
images the sampler did not draw) and they are logged: nothing is dropped silently.

Both training tasks get their data through :func:`loader_from_config` (the ``data`` section of a
config). Imports run one way: :mod:`.base` -> the DALI and torch pipelines -> this module.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from .augment import from_config
from .base import BACKENDS, KINDS, BaseLoader, StepStream, dali_available, resolve_backend  # noqa: F401
from .records import Record
from .samplers import PKBatches, SequentialBatches, ShuffleBatches


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


def build_loader(kind: str, records: Sequence[Record], *, batch_size: int, backend: str = "auto",
                 device: Optional[str] = None, aug: Optional[dict] = None, seed: int = 0, rank: int = 0,
                 world: int = 1, workers: int = 2, on_bad_image: str = "error", p: Optional[int] = None,
                 k: int = 4, prefetch: int = 2):
    """Build a loader (see the module docstring). ``device``: 'cpu' or 'cuda' (default: cuda when
    available). ``aug``: a dict of augmentation options (:mod:`upreid.data.augment`). ``workers``:
    DALI threads (at least one is used) or DataLoader worker processes (0 = in this process)."""
    backend = resolve_backend(backend)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    augment = from_config(kind, aug)
    sampler = make_sampler(kind, records, batch_size, rank, world, seed, p, k)
    if backend == "dali":
        from .dali_pipeline import DaliLoader

        return DaliLoader(kind, records, sampler, augment, batch_size=batch_size, device=device, seed=seed,
                          on_bad_image=on_bad_image, rank=rank, world=world, threads=max(1, workers),
                          prefetch=prefetch)
    from .torch_pipeline import TorchLoader

    return TorchLoader(kind, records, sampler, augment, device=device, seed=seed, on_bad_image=on_bad_image,
                       rank=rank, world=world, workers=workers, prefetch=prefetch)


COLOR_KEYS = ("color_p", "color_gain", "color_brightness", "color_contrast")
# The config keys of each kind's augmentation (the ``data`` section of a task config).
_AUG_KEYS = {
    "pretrain": ("height", "width", "crop_attempts", "grayscale_p", "blur_p", "blur_sigma", "flip_p", "erasing_p",
                 "erasing_area", "mean", "std", *COLOR_KEYS),
    "finetune": ("height", "width", "flip_p", "pad", "erasing_p", "erasing_area", "mean", "std", *COLOR_KEYS),
    "eval": ("height", "width", "flip_test", "mean", "std"),
}


def aug_from_config(kind: str, d: Mapping) -> dict:
    """The augmentation options of ``kind`` from a config's ``data`` section."""
    aug = {key: d[key] for key in _AUG_KEYS[kind]}
    if kind == "pretrain":
        aug["crop_scale"] = (d["crop_scale_min"], 1.0)
    return aug


def loader_from_config(kind: str, records: Sequence[Record], d: Mapping, *, device, seed: int = 0, rank: int = 0,
                       world: int = 1):
    """The loader of ``kind`` for a config's ``data`` section (``backend``, ``workers``,
    ``on_bad_image``, the batch size of the kind and its augmentation keys)."""
    kw = dict(backend=d["backend"], device=str(device), aug=aug_from_config(kind, d), seed=seed, rank=rank,
              world=world, workers=d["workers"], on_bad_image=d["on_bad_image"])
    if kind == "pretrain":
        return build_loader(kind, records, batch_size=d["batch_size"], **kw)
    if kind == "finetune":
        return build_loader(kind, records, batch_size=d["p"] * d["k"], p=d["p"], k=d["k"], **kw)
    return build_loader(kind, records, batch_size=d["eval_batch_size"], **kw)
