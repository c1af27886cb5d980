"""Shared test helpers: random inputs and the low-precision tolerance rule of DESIGN.md."""
from __future__ import annotations

import torch

LOW = (torch.float16, torch.bfloat16)


def feats(*shape, dtype=torch.float32, device="cpu", normalize=True, requires_grad=False):
    x = torch.randn(*shape, dtype=torch.float64)
    if normalize and shape[-1] > 0:
        x = torch.nn.functional.normalize(x, dim=-1)
    x = x.to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def assert_tolerance(out, exact, baseline, atol, what=""):
    """|out - exact| <= 2 |baseline - exact| + atol, where baseline is plain PyTorch in the same
    precision as `out` and `exact` is computed in fp64."""
    err, base = max_err(out, exact), max_err(baseline, exact)
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 x baseline {base:.3g} + {atol:g}"


def default_atol(dtype, scale=1.0):
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
            torch.bfloat16: 5e-2}[dtype] * scale
