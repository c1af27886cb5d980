"""Per-sample transforms of the torch fallback (Pillow for geometry, torch for pixel arithmetic).

Each function takes the decoded PIL image and a ``numpy.random.Generator`` and returns the sample
dict the loaders collate; the random draws follow :mod:`upreid.data.augment`, so the DALI pipelines
produce the same distributions. Geometry uses Pillow's bilinear resampling with a float source
box (antialiased when shrinking) on an edge-padded image, which matches DALI's ``resize`` with a
relative ROI, borders included (see :func:`resize`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .augment import (LUMA, NO_COLOR, EvalAug, FinetuneAug, PretrainAug, color_params, crop_box, erase_box,
                      gaussian_kernel)


def _to_uint8_array(img) -> np.ndarray:
    return np.array(img, dtype=np.uint8)  # a writable copy


def normalize(arr: np.ndarray, mean, std) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32, (x / 255 - mean) / std."""
    t = torch.from_numpy(np.array(arr, copy=True, order="C")).permute(2, 0, 1).float()
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255
    return (t - m) / s


def grayscale_u8(arr: np.ndarray) -> np.ndarray:
    y = arr.astype(np.float32) @ np.asarray(LUMA, np.float32)
    y = np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    return np.repeat(y[..., None], 3, axis=2)


def blur_u8(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect-101 borders, rounded back to uint8 (as DALI on uint8).

    A sum of shifted slices: cheaper than a depthwise conv2d whose kernel size changes per sample."""
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    h, w = arr.shape[:2]
    mode = "reflect" if r < min(h, w) else "symmetric"     # reflect-101 needs pad < size
    x = np.pad(arr.astype(np.float32), ((r, r), (0, 0), (0, 0)), mode=mode)
    y = k[0] * x[0:h]
    for i in range(1, len(k)):
        y += k[i] * x[i:i + h]
    x = np.pad(y, ((0, 0), (r, r), (0, 0)), mode=mode)
    y = k[0] * x[:, 0:w]
    for i in range(1, len(k)):
        y += k[i] * x[:, i:i + w]
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def color_u8(arr: np.ndarray, params) -> np.ndarray:
    """Colour jitter (augment's rule): ((x - mean) k + mean) g_c b, rounded back to uint8."""
    g = np.asarray(params[:3], np.float32)
    b, k = np.float32(params[3]), np.float32(params[4])
    x = arr.astype(np.float32)
    m = np.float32(x.mean(dtype=np.float64))
    return np.clip(np.floor(((x - m) * k + m) * g * b + np.float32(0.5)), 0, 255).astype(np.uint8)


def _maybe_color(arr: np.ndarray, rng: np.random.Generator, aug):
    """(image, reported draws) of the colour jitter; draws nothing when ``aug.color_p`` is 0."""
    if aug.color_p <= 0:
        return arr, None
    u = rng.random(6)
    if u[0] >= aug.color_p:
        return arr, torch.tensor(NO_COLOR, dtype=torch.float32)
    params = color_params(u[1:], aug)
    return color_u8(arr, params), torch.tensor(params, dtype=torch.float32)


def _erase(t: torch.Tensor, u: np.ndarray, area, ratio):
    _, h, w = t.shape
    top, left, eh, ew = erase_box(u[0], u[1], u[2], u[3], h, w, area, ratio)
    t[:, top:top + eh, left:left + ew] = 0.0
    return torch.tensor([top / h, left / w, (top + eh) / h, (left + ew) / w], dtype=torch.float32)


def resize(img, height: int, width: int, box=None):
    """Bilinear resize of ``box`` (x0, y0, x1, y1 in pixels, float; the whole image by default) to
    ``height`` x ``width``, antialiased when shrinking (the triangle filter widens with the scale).

    DALI's ``resize`` and Pillow use the same triangle filter but differ at the image border: DALI
    repeats the edge pixels, Pillow drops the taps that fall outside and renormalises the rest. When
    shrinking, the filter spans several pixels, so the border rows and columns differed by up to
    ~15 grey levels. Padding the image with copies of its edge pixels (at least the filter's reach)
    before Pillow's resize gives DALI's border rule, and the two agree to rounding in both
    directions (``tests/test_data_dali.py``)."""
    from PIL import Image

    w_in, h_in = img.size
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(w_in), float(h_in))
    # Pillow's taps reach max(scale, 1) pixels beyond an output pixel's centre; one more for rounding
    py = int(math.ceil(max((y1 - y0) / height, 1.0))) + 1
    px = int(math.ceil(max((x1 - x0) / width, 1.0))) + 1
    arr = np.asarray(img)
    pad = ((py, py), (px, px)) + ((0, 0),) * (arr.ndim - 2)
    padded = Image.fromarray(np.pad(arr, pad, mode="edge"))
    return padded.resize((width, height), Image.BILINEAR, box=(x0 + px, y0 + py, x1 + px, y1 + py))


def pretrain_view(img, rng: np.random.Generator, aug: PretrainAug) -> dict:
    u = rng.random(13)
    # attempts after the first draw after the 13 (so that one attempt keeps the stream it always had)
    more = rng.random(2 * (aug.crop_attempts - 1))
    W, H = img.size
    y0, x0, y1, x1 = crop_box([u[0], *more[0::2]], [u[1], *more[1::2]], u[2], u[3], H, W, aug.crop_scale,
                              aug.crop_ratio)
    arr = _to_uint8_array(resize(img, aug.height, aug.width, (x0 * W, y0 * H, x1 * W, y1 * H)))
    arr, color = _maybe_color(arr, rng, aug)
    gray = u[4] < aug.grayscale_p
    if gray:
        arr = grayscale_u8(arr)
    sigma = 0.0
    if u[5] < aug.blur_p:
        sigma = aug.blur_sigma[0] + u[6] * (aug.blur_sigma[1] - aug.blur_sigma[0])
        arr = blur_u8(arr, sigma)
    flip = u[7] < aug.flip_p
    if flip:
        arr = arr[:, ::-1]
    t = normalize(arr, aug.mean, aug.std)
    erase = torch.zeros(4)
    if u[8] < aug.erasing_p:
        erase = _erase(t, u[9:13], aug.erasing_area, aug.erasing_ratio)
    out = {"view": t, "box": torch.tensor([y0, x0, y1, x1], dtype=torch.float32), "flip": float(flip),
           "gray": float(gray), "sigma": float(sigma), "erase": erase}
    if color is not None:
        out["color"] = color
    return out


def pretrain_sample(img, rng: np.random.Generator, aug: PretrainAug) -> dict:
    out = {"original": normalize(_to_uint8_array(resize(img, aug.height, aug.width)), aug.mean, aug.std)}
    for v in (1, 2):
        d = pretrain_view(img, rng, aug)
        out[f"view{v}"] = d["view"]
        out[f"box{v}"] = d["box"]
        for key in ("flip", "gray", "sigma"):
            out[f"{key}{v}"] = torch.tensor(d[key], dtype=torch.float32)
        out[f"erase{v}"] = d["erase"]
        if "color" in d:
            out[f"color{v}"] = d["color"]
    return out


def finetune_sample(img, rng: np.random.Generator, aug: FinetuneAug) -> dict:
    u = rng.random(8)
    arr = _to_uint8_array(resize(img, aug.height, aug.width))
    arr, color = _maybe_color(arr, rng, aug)
    flip = u[0] < aug.flip_p
    if flip:
        arr = arr[:, ::-1]
    # pad + random crop back to the same size == shift by (dy, dx) in [-pad, pad] with zero fill
    p = aug.pad
    dy = min(2 * p, int(u[1] * (2 * p + 1))) - p
    dx = min(2 * p, int(u[2] * (2 * p + 1))) - p
    if p:
        padded = np.zeros((aug.height + 2 * p, aug.width + 2 * p, 3), np.uint8)
        padded[p:p + aug.height, p:p + aug.width] = arr
        arr = padded[p + dy:p + dy + aug.height, p + dx:p + dx + aug.width]
    t = normalize(arr, aug.mean, aug.std)
    erase = torch.zeros(4)
    if u[3] < aug.erasing_p:
        erase = _erase(t, u[4:8], aug.erasing_area, aug.erasing_ratio)
    out = {"images": t, "flip": torch.tensor(float(flip)), "shift": torch.tensor([dy, dx], dtype=torch.float32),
           "erase": erase}
    if color is not None:
        out["color"] = color
    return out


def eval_sample(img, rng, aug: EvalAug) -> dict:
    arr = _to_uint8_array(resize(img, aug.height, aug.width))
    out = {"images": normalize(arr, aug.mean, aug.std)}
    if aug.flip_test:
        out["images_flipped"] = normalize(arr[:, ::-1], aug.mean, aug.std)
    return out


SAMPLE_FNS = {"pretrain": pretrain_sample, "finetune": finetune_sample, "eval": eval_sample}
