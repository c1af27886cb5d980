from __future__ import annotations

from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str, owner: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_impl(impl: str, owner: str) -> str:
    if impl not in ("fused", "reference"):
        raise ValueError(f"{owner}: impl must be 'fused' or 'reference', got {impl!r}")
    return impl


def reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values
