"""Projection heads of the UP-ReID encoders (MoCo v2 style MLPs) and stripe pooling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLPHead(nn.Module):
    """``Linear(in, hidden) - ReLU - Linear(hidden, out)``, L2-normalised output (MoCo v2's head,
    2048-2048-128 on ResNet-50). Works on ``[..., in]``: the global head sees ``[B, C]``, the patch head
    ``[B, P, C]``."""

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc2(self.relu(self.fc1(x)))        # [..., out]
        return F.normalize(z.float(), dim=-1)       # fp32 from here on (losses, queue)


def stripe_boxes(stripes: int, device=None) -> Tensor:
    """The P horizontal stripes of an image as normalised boxes (y0, x0, y1, x1): ``[P, 4]``."""
    edges = torch.linspace(0, 1, stripes + 1, device=device)
    return torch.stack([edges[:-1], torch.zeros(stripes, device=device), edges[1:],
                        torch.ones(stripes, device=device)], dim=1)


def roi_pool(fmap: Tensor, boxes: Tensor, samples: int = 2, max_height: float = 1.0) -> Tensor:
    """RoIAlign-style average pooling of normalised boxes, written with ``grid_sample``.

    ``fmap [B, C, h, w]``, ``boxes [B, R, 4]`` as normalised (y0, x0, y1, x1) of the image that
    produced ``fmap``. Each box is cut into a regular grid of bins, ``samples`` per feature cell for a
    box of height ``max_height`` (the tallest the caller passes; a stripe is at most 1/P) and full
    width; every bin centre is sampled bilinearly and the samples are averaged: returns ``[B, R, C]``.
    The grid size depends on shapes only (no data-dependent sync, compiles without graph breaks).
    Points outside the map take the border value (crop boxes lie inside the image).
    """
    b, c, h, w = fmap.shape
    r = boxes.shape[1]
    ny = max(samples, math.ceil(h * max_height * samples))
    nx = max(samples, w * samples)
    ty = (torch.arange(ny, device=fmap.device, dtype=torch.float32) + 0.5) / ny          # [ny]
    tx = (torch.arange(nx, device=fmap.device, dtype=torch.float32) + 0.5) / nx          # [nx]
    boxes = boxes.float()
    y = boxes[..., 0:1] + (boxes[..., 2:3] - boxes[..., 0:1]) * ty                      # [B, R, ny]
    x = boxes[..., 1:2] + (boxes[..., 3:4] - boxes[..., 1:2]) * tx                      # [B, R, nx]
    gy = (y * 2 - 1).unsqueeze(-1).expand(b, r, ny, nx)                                 # [B, R, ny, nx]
    gx = (x * 2 - 1).unsqueeze(-2).expand(b, r, ny, nx)
    grid = torch.stack([gx, gy], dim=-1).reshape(b, r * ny, nx, 2)                      # [B, R*ny, nx, 2]
    grid = grid.to(fmap.dtype)
    sampled = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.view(b, c, r, ny * nx).mean(-1).transpose(1, 2)                      # [B, R, C]


def view_stripes_on_original(boxes: Tensor, flips: Tensor, stripes: int) -> Tensor:
    """Map the P stripes of augmented views onto the original image.

    ``boxes [B, 4]``: each view's crop box in the original (normalised y0, x0, y1, x1); ``flips [B]``:
    whether the view was mirrored after cropping. Stripe i of the view covers rows i/P..(i+1)/P of the
    crop and its full width, so in the original it is rows ``y0 + (y1-y0) i/P .. y0 + (y1-y0)(i+1)/P``
    and columns ``x0..x1``. A horizontal flip mirrors columns only: the stripe's column span is the
    whole crop either way, so the region is unchanged (the flag is kept in the signature so that a
    stripe layout that does not span the full width, or vertical stripes, map correctly here).
    Returns ``[B, P, 4]``.
    """
    s = stripe_boxes(stripes, boxes.device).to(boxes.dtype)                # [P, 4] in view coords
    y0, x0, y1, x1 = boxes.unbind(-1)                                      # [B] each
    hh, ww = (y1 - y0)[:, None], (x1 - x0)[:, None]                        # [B, 1]
    sx0 = torch.where(flips[:, None].bool(), 1 - s[None, :, 3], s[None, :, 1])   # mirror x in the crop
    sx1 = torch.where(flips[:, None].bool(), 1 - s[None, :, 1], s[None, :, 3])
    return torch.stack([y0[:, None] + hh * s[None, :, 0], x0[:, None] + ww * sx0,
                        y0[:, None] + hh * s[None, :, 2], x0[:, None] + ww * sx1], dim=-1)  # [B, P, 4]
