"""Augmentation settings and the random-parameter rules shared by the DALI pipelines and the torch
fallback. Both draw every random quantity with the same single-shot formulas below (no rejection
loops, which a GPU pipeline cannot express), so their distributions agree exactly; only the random
streams differ.

RandomResizedCrop (``crop_attempts`` = N draws, torchvision's 10 by default): attempt ``i`` draws an area
fraction ``s_i ~ U(scale)`` and an aspect ``r_i = exp(U(log ratio))`` (w/h in pixels), normalised size
``w_i = sqrt(s_i r_i H/W)``, ``h_i = sqrt(s_i W/(r_i H))``. The first attempt that fits (``w_i <= 1`` and
``h_i <= 1``) is the crop; when none does, the last one clamped to the image (``min(1, .)`` on both
sides; torchvision takes a centre crop there, and tests the fit on sizes rounded to pixels). All N are drawn whatever happens, and the choice is arithmetic, so a GPU pipeline expresses it
without a loop. Position uniform in the remaining room. N = 1 is a single draw clamped to the image:
on a 2:1 person image it clamps 62 % of the draws to the full width, and the mean crop covers 51 % of
the image against 37 % with 10 attempts (docs/data.md). The crop box is reported as normalised
``(y0, x0, y1, x1)`` in the
original image; a view's flip flag says it was mirrored *after* cropping, so view column ``u`` in
[0, 1] shows original column ``x0 + (1 - u if flip else u) * (x1 - x0)``.

Random erasing (single shot): area ``a ~ U(area) * H * W``, aspect ``r = exp(U(log ratio))`` (h/w),
``eh = min(H, round(sqrt(a r)))``, ``ew = min(W, round(sqrt(a / r)))``, top-left uniform in the room
(``floor(u * (H - eh + 1))``); the region is set to ``fill`` after normalisation (0 = the mean pixel).

Colour jitter (single shot, off by default; a camera's white balance, exposure and contrast): with
probability ``color_p``, per-channel gains ``g_c ~ U(color_gain)``, brightness ``b ~ U(color_brightness)``
and contrast ``k ~ U(color_contrast)`` map the resized uint8 image ``x`` (mean ``m`` over all pixels and
channels) to ``floor(((x - m) k + m) g_c b + 0.5)`` clamped to [0, 255], before any flip, shift,
grayscale, blur or erasing (pre-training: the two views, not the original). The draws are reported as
``(g_r, g_g, g_b, b, k)``, all ones when not applied. At ``color_p = 0`` nothing is drawn or built, so
every other random stream is that of a run without the option.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import numpy as np

LUP_MEAN = (0.3525, 0.3106, 0.3140)
LUP_STD = (0.2660, 0.2522, 0.2505)
LUMA = (0.299, 0.587, 0.114)       # ITU-R 601 luma, what DALI's hsv(saturation=0) keeps
COLOR_GAIN = (0.75, 1.3)           # colour jitter ranges (used when color_p > 0)
COLOR_BRIGHTNESS = (0.6, 1.35)
COLOR_CONTRAST = (0.7, 1.2)
NO_COLOR = (1.0, 1.0, 1.0, 1.0, 1.0)
MAX_CROP_ATTEMPTS = 100            # each attempt is two draws and a few arithmetic nodes per view in DALI


@dataclasses.dataclass
class PretrainAug:
    """LUP augmentation (METHOD.md 2) for the two views; the original is resized and normalised only.
    Colour jitter (``color_p``, not in LUP) comes after the crop, before grayscale."""
    height: int = 256
    width: int = 128
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    crop_attempts: int = 10       # RandomResizedCrop draws until one fits (torchvision: 10; 1 = one draw, clamped)
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    erasing_p: float = 0.5
    erasing_area: Tuple[float, float] = (0.02, 0.6)
    erasing_ratio: Tuple[float, float] = (0.3, 3.3)
    color_p: float = 0.0
    color_gain: Tuple[float, float] = COLOR_GAIN
    color_brightness: Tuple[float, float] = COLOR_BRIGHTNESS
    color_contrast: Tuple[float, float] = COLOR_CONTRAST
    mean: Tuple[float, float, float] = LUP_MEAN
    std: Tuple[float, float, float] = LUP_STD

    def validate(self) -> "PretrainAug":
        _check_color(self)
        _check_range("crop_scale", self.crop_scale, 0, 1)
        a = self.crop_attempts
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= MAX_CROP_ATTEMPTS:
            raise ValueError(f"crop_attempts must be an integer in 1..{MAX_CROP_ATTEMPTS} (torchvision draws 10), "
                             f"got {a!r}")
        _check_range("erasing_area", self.erasing_area, 0, 1)
        for name in ("grayscale_p", "blur_p", "flip_p", "erasing_p"):
            _check_prob(name, getattr(self, name))
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be 0 < lo <= hi, got {self.blur_sigma}")
        return self


@dataclasses.dataclass
class FinetuneAug:
    """BoT fine-tuning augmentation: resize, (colour jitter, off by default), flip, pad + random crop,
    normalise, random erasing."""
    height: int = 256
    width: int = 128
    flip_p: float = 0.5
    pad: int = 10
    erasing_p: float = 0.5
    erasing_area: Tuple[float, float] = (0.02, 0.4)
    erasing_ratio: Tuple[float, float] = (0.3, 3.3)
    color_p: float = 0.0
    color_gain: Tuple[float, float] = COLOR_GAIN
    color_brightness: Tuple[float, float] = COLOR_BRIGHTNESS
    color_contrast: Tuple[float, float] = COLOR_CONTRAST
    mean: Tuple[float, float, float] = LUP_MEAN
    std: Tuple[float, float, float] = LUP_STD

    def validate(self) -> "FinetuneAug":
        _check_color(self)
        _check_prob("flip_p", self.flip_p)
        _check_prob("erasing_p", self.erasing_p)
        _check_range("erasing_area", self.erasing_area, 0, 1)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        return self


@dataclasses.dataclass
class EvalAug:
    """Evaluation: resize and normalise; ``flip_test`` adds a mirrored copy of every image."""
    height: int = 256
    width: int = 128
    flip_test: bool = False
    mean: Tuple[float, float, float] = LUP_MEAN
    std: Tuple[float, float, float] = LUP_STD

    def validate(self) -> "EvalAug":
        return self


def _check_prob(name, p):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_color(aug) -> None:
    _check_prob("color_p", aug.color_p)
    for name in ("color_gain", "color_brightness", "color_contrast"):
        _check_range(name, getattr(aug, name), 0, None)


def _check_range(name, r, lo, hi):
    """``r`` = (min, max) with lo < min <= max (<= hi; None: no upper bound)."""
    if len(r) != 2 or not (lo < r[0] <= r[1] and (hi is None or r[1] <= hi)):
        bound = "" if hi is None else f" <= {hi}"
        raise ValueError(f"{name} must be ({lo} < min <= max{bound}), got {tuple(r)}")


def crop_size(u_areas: Sequence, u_ratios: Sequence, h, w, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), *,
              exp=math.exp, sqrt=math.sqrt, minimum=min, as_float=float):
    """The normalised (height, width) of the RandomResizedCrop from one (area, aspect) pair of U(0, 1)
    draws per attempt: the first attempt that fits in the image, else the last clamped to it (the
    module's docstring). Arithmetic only, so that the same code builds the DALI graph: pass DALI's
    ``exp``, ``sqrt``, ``min`` and a cast of a boolean node to float (``h``, ``w`` then nodes too)."""
    if len(u_areas) != len(u_ratios) or len(u_areas) == 0:
        raise ValueError(f"crop_size: one area and one aspect draw per attempt, got {len(u_areas)} and "
                         f"{len(u_ratios)}")
    llo, lhi = math.log(ratio[0]), math.log(ratio[1])
    bh = bw = None
    for ua, ur in reversed(list(zip(u_areas, u_ratios))):    # the earliest attempt that fits wins
        s = scale[0] + ua * (scale[1] - scale[0])
        r = exp(llo + ur * (lhi - llo))
        cw, ch = sqrt(s * r * h / w), sqrt(s * w / (r * h))
        if bw is None:                                        # the last attempt: clamped to the image
            bh, bw = minimum(1.0, ch), minimum(1.0, cw)
        else:
            fit = as_float((cw <= 1.0) & (ch <= 1.0))
            bh, bw = fit * ch + (1.0 - fit) * bh, fit * cw + (1.0 - fit) * bw
    return bh, bw


def crop_box(u_area, u_ratio, u_y: float, u_x: float, h: int, w: int,
             scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[float, float, float, float]:
    """The RandomResizedCrop box, normalised (y0, x0, y1, x1): ``u_area`` and ``u_ratio`` are one U(0, 1)
    draw each per attempt (a number: one attempt), ``u_y`` and ``u_x`` place it (:func:`crop_size`)."""
    areas, ratios = np.atleast_1d(u_area).tolist(), np.atleast_1d(u_ratio).tolist()
    bh, bw = crop_size(areas, ratios, h, w, scale, ratio)
    y0, x0 = u_y * (1.0 - bh), u_x * (1.0 - bw)
    return y0, x0, y0 + bh, x0 + bw


def erase_box(u_area: float, u_ratio: float, u_y: float, u_x: float, h: int, w: int,
              area=(0.02, 0.4), ratio=(0.3, 3.3)) -> Tuple[int, int, int, int]:
    """The single-shot random-erasing rectangle from four U(0, 1) draws: (top, left, eh, ew) pixels."""
    a = (area[0] + u_area * (area[1] - area[0])) * h * w
    r = math.exp(math.log(ratio[0]) + u_ratio * (math.log(ratio[1]) - math.log(ratio[0])))
    eh = min(h, math.floor(math.sqrt(a * r) + 0.5))
    ew = min(w, math.floor(math.sqrt(a / r) + 0.5))
    top = min(h - eh, math.floor(u_y * (h - eh + 1)))
    left = min(w - ew, math.floor(u_x * (w - ew + 1)))
    return top, left, eh, ew


def color_params(u, aug) -> Tuple[float, float, float, float, float]:
    """The colour jitter's (g_r, g_g, g_b, brightness, contrast) from five U(0, 1) draws."""
    def at(r, v):
        return r[0] + v * (r[1] - r[0])
    g = aug.color_gain
    return at(g, u[0]), at(g, u[1]), at(g, u[2]), at(aug.color_brightness, u[3]), at(aug.color_contrast, u[4])


def gaussian_kernel(sigma: float) -> np.ndarray:
    """1-D Gaussian taps with radius ceil(3 sigma), as DALI's gaussian_blur uses by default."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def from_config(kind: str, cfg: dict | None = None):
    """Build the augmentation settings of ``kind`` ('pretrain', 'finetune', 'eval') from a dict;
    unknown keys are an error with a suggestion."""
    import difflib

    cls = {"pretrain": PretrainAug, "finetune": FinetuneAug, "eval": EvalAug}[kind]
    cfg = dict(cfg or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for k in cfg:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            raise ValueError(f"unknown {kind} augmentation option {k!r}"
                             + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(names)}"))
    for k, v in cfg.items():
        if isinstance(v, list):
            cfg[k] = tuple(v)
    return cls(**cfg).validate()
