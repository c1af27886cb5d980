"""Loads the compiled extension `upreid._C`, whose import registers torch.ops.upreid.*.

When the extension is absent (a source checkout that was never built), every op in upreid.ops falls
back to its pure-PyTorch reference and says so once.
"""
from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger("upreid")

try:
    from upreid import _C  # noqa: F401

    HAS_EXTENSION = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only in unbuilt checkouts
    HAS_EXTENSION = False
    _IMPORT_ERROR = exc

_warned = False


def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled into `upreid._C`."""
    return HAS_EXTENSION and bool(torch.ops.upreid._built_with_cuda())


def _kernel_table() -> dict[tuple[str, str], bool]:
    ops = ("info_nce", "_info_nce_train", "bank_kl", "_bank_kl_train", "rank_metrics",
           "k_reciprocal_rerank", "k_reciprocal_rerank_dense")
    return {
        (op, key): HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(f"upreid::{op}", key)
        for op in ops for key in ("CPU", "CUDA")
    }


# Read once at import (registrations are static), a plain dict so torch.compile traces lookups.
_KERNELS = _kernel_table()


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether torch.ops.upreid.<op> has a kernel for this device type (CPU, CUDA)."""
    return _KERNELS.get((op, "CUDA" if device.type == "cuda" else "CPU"), False)


def use_extension(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels can serve these tensors; warns once when falling back."""
    global _warned
    if not HAS_EXTENSION:
        if not _warned:
            warnings.warn(
                f"upreid._C is not built ({_IMPORT_ERROR}); using the pure-PyTorch references. "
                "Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned = True
        return False
    if any(t.is_cuda for t in tensors) and not built_with_cuda():
        raise RuntimeError(
            "upreid._C was built without CUDA kernels but got CUDA tensors; rebuild on a machine "
            "whose torch has CUDA (or set UPREID_CUDA=1 to force the CUDA build)"
        )
    return True
