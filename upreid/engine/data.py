"""The pre-training loader the engine consumes, and its torch fallback.

Interface (narrow, so that any pipeline fits): an iterator of dicts, per rank, per step::

    original [B, 3, H, W] float   the image resized and normalised only
    view1, view2 [B, 3, H, W]     LUP-augmented views (RandomResizedCrop, flip, grayscale, blur, erasing)
    box1, box2 [B, 4] float       each view's crop box in the original, normalised (y0, x0, y1, x1)
    flip1, flip2 [B] float        1 where the view was mirrored after cropping

By default (``data.backend`` auto / dali / torch) the pipelines of :mod:`upreid.data` serve it through
:class:`EpochStream`. ``data.backend=simple`` selects the small Pillow + torch loader kept here
(deterministic by (seed, epoch, image index), so the batch at global step s is a pure function of s).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class ShardedStepSampler:
    """Batches of (epoch, index) for one rank, starting at global step ``start_step``.

    Every epoch is one permutation of the dataset drawn from (seed, epoch); step s of an epoch takes
    the s-th block of ``world * batch`` indices and rank r its r-th slice. The last partial global
    batch of an epoch is dropped (so every rank runs the same number of steps).
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 start_step: int = 0):
        self.n, self.batch, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch "
                             f"({batch_size} per rank x {world} ranks); lower data.batch_size")
        self.start_step = start_step

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, s = divmod(step, self.steps_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            lo = (s * self.world + self.rank) * self.batch
            yield [(epoch, int(i)) for i in perm[lo:lo + self.batch]]
            step += 1


class PretrainImages(Dataset):
    """Torch fallback of the pre-training pipeline: item ``(epoch, index)`` -> one sample dict."""

    def __init__(self, paths: list, height: int = 256, width: int = 128, seed: int = 0,
                 crop_scale_min: float = 0.2, grayscale_p: float = 0.2, blur_p: float = 0.5,
                 flip_p: float = 0.5, erasing_p: float = 0.5, erasing_area=(0.02, 0.6),
                 blur_sigma=(0.1, 2.0), mean=(0.3525, 0.3106, 0.3140), std=(0.2660, 0.2522, 0.2505)):
        self.paths, self.size, self.seed = list(paths), (height, width), seed
        self.scale_min, self.gray_p, self.blur_p, self.flip_p = crop_scale_min, grayscale_p, blur_p, flip_p
        self.erase_p, self.erase_area, self.sigma = erasing_p, tuple(erasing_area), tuple(blur_sigma)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: str) -> Tensor:
        from PIL import Image
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot read image {path!r}: {e}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)   # [3, h, w]

    def _resize(self, img: Tensor) -> Tensor:
        return F.interpolate(img[None], size=self.size, mode="bilinear", align_corners=False,
                             antialias=True)[0].clamp_(0, 1)

    def _crop_box(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box (scale (min, 1), aspect w/h in (3/4, 4/3), 10 tries, else whole)."""
        area = h * w
        for _ in range(10):
            target = area * rng.uniform(self.scale_min, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                return top, left, ch, cw
        return 0, 0, h, w

    def _view(self, img: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
        _, h, w = img.shape
        top, left, ch, cw = self._crop_box(rng, h, w)
        box = torch.tensor([top / h, left / w, (top + ch) / h, (left + cw) / w])
        v = self._resize(img[:, top:top + ch, left:left + cw])
        flip = rng.random() < self.flip_p
        if flip:
            v = v.flip(-1)
        if rng.random() < self.gray_p:
            v = (0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2]).expand(3, -1, -1).clone()
        if rng.random() < self.blur_p:
            v = gaussian_blur(v, rng.uniform(*self.sigma))
        v = (v - self.mean) / self.std
        if rng.random() < self.erase_p:
            v = random_erase(v, rng, self.erase_area)
        return v, box, torch.tensor(float(flip))

    def __getitem__(self, item) -> dict:
        epoch, index = item
        rng = np.random.default_rng([self.seed, epoch, index])
        img = self._load(self.paths[index])
        v1, b1, f1 = self._view(img, rng)
        v2, b2, f2 = self._view(img, rng)
        original = (self._resize(img) - self.mean) / self.std
        return {"original": original, "view1": v1, "view2": v2, "box1": b1, "box2": b2,
                "flip1": f1, "flip2": f2}


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    out = F.pad(img[None], (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def random_erase(img: Tensor, rng: np.random.Generator, area=(0.02, 0.6), ratio=(0.3, 3.3)) -> Tensor:
    _, h, w = img.shape
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        eh, ew = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            img = img.clone()
            img[:, top:top + eh, left:left + ew] = 0
            return img
    return img


def list_images(root) -> list:
    """Pre-training image paths through the data layer's unlabeled-set parser (folder tree or list)."""
    from upreid.data import DatasetError, unlabeled
    if root in (None, ""):
        raise DatasetError("data.root is not set: pass data.root=DIR (a folder tree of person images, "
                           "or a list file of image paths); `upreid synth --root DIR` makes a test set")
    return [r.path for r in unlabeled(str(root), progress=False).train]


class EpochStream:
    """Adapts an epoch loader of :mod:`upreid.data` (``set_epoch`` + one epoch per iteration) to the
    engine's endless per-step stream starting at global step ``start_step``. Resuming inside an epoch
    iterates past the batches already consumed (their randomness is keyed by the position in the
    epoch, so the batches that follow are the ones the interrupted run would have seen)."""

    def __init__(self, loader, steps_per_epoch: int, start_step: int):
        self.loader, self.steps_per_epoch, self.start_step = loader, steps_per_epoch, start_step

    def __iter__(self):
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        if offset:
            log.info("resuming inside epoch %d: passing over its first %d batches", epoch, offset)
        while True:
            self.loader.set_epoch(epoch)
            for i, batch in enumerate(self.loader):
                if i >= offset:
                    yield batch
            offset, epoch = 0, epoch + 1


def build_loader(cfg: dict, world: int, rank: int, start_step: int, seed: int, device=None):
    """The per-rank pre-training iterator (see the module docstring), its steps per epoch and the
    number of images. ``data.backend``: ``auto``/``dali``/``torch`` use the pipelines of
    :mod:`upreid.data` (auto = DALI when installed); ``simple`` uses :class:`PretrainImages` here."""
    d = cfg["data"]
    paths = list_images(d["root"])
    if d["backend"] != "simple":
        from upreid.data import Record
        from upreid.data.loader import build_loader as data_loader
        aug = {"height": d["height"], "width": d["width"], "crop_scale": [d["crop_scale_min"], 1.0],
               "grayscale_p": d["grayscale_p"], "blur_p": d["blur_p"], "blur_sigma": d["blur_sigma"],
               "flip_p": d["flip_p"], "erasing_p": d["erasing_p"], "erasing_area": d["erasing_area"],
               "mean": d["mean"], "std": d["std"]}
        loader = data_loader("pretrain", [Record(p, -1, -1) for p in paths], batch_size=d["batch_size"],
                             backend=d["backend"], device=str(device or "cpu"), aug=aug, seed=seed, rank=rank,
                             world=world, workers=max(1, d["workers"]) if d["backend"] != "torch" else d["workers"])
        spe = loader.sampler.steps
        return EpochStream(loader, spe, start_step), spe, len(paths)
    ds = PretrainImages(paths, d["height"], d["width"], seed, d["crop_scale_min"], d["grayscale_p"],
                        d["blur_p"], d["flip_p"], d["erasing_p"], d["erasing_area"], d["blur_sigma"],
                        d["mean"], d["std"])
    sampler = ShardedStepSampler(len(ds), d["batch_size"], world, rank, seed, start_step)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=d["workers"], pin_memory=torch.cuda.is_available(),
                        persistent_workers=False, prefetch_factor=4 if d["workers"] > 0 else None)
    return loader, sampler.steps_per_epoch, len(ds)
