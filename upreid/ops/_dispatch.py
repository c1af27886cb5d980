"""The one dispatch path of the ``upreid.ops`` wrappers.

* :func:`call` picks the implementation: ``impl="reference"``, the compiled operator, the reference
  when ``upreid._C`` is absent, or (evaluation ops) the CPU kernel for a device this build has no
  kernel for, with the tensors copied there and back.
* Autocast: every operator has a policy (:data:`AUTOCAST`), registered as its Autocast kernel and
  applied alike to the reference fallback, so that both compute in the same dtype:

  - ``LOWER``: floating inputs are cast to the autocast dtype (bf16/fp16), as for a matmul; the
    kernels accumulate in fp32 and return fp32 (info_nce);
  - ``FP32``: floating inputs are cast to fp32 (bank_kl: a KL between two close distributions is a
    small difference of large terms, which bf16-rounded logits would swamp);
  - ``KEEP``: no cast, the op runs in its inputs' dtype exactly as outside autocast (evaluation ops
    and the backward ops).

  float64 tensors are never cast. Inside every op autocast is off, so its internal products follow
  the op's dtype, not the autocast state.
* :func:`forbid_double_backward` gives a backward op an autograd formula that raises, instead of the
  silent zeros a second-order gradient through the fused kernels would otherwise be.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

import upreid.ops._lib as _lib

FUSED, REFERENCE, VIA_CPU = "fused", "reference", "via_cpu"
LOWER, FP32, KEEP = "lower", "fp32", "keep"

AUTOCAST = {
    "info_nce": LOWER, "_info_nce_train": LOWER,
    "bank_kl": FP32, "_bank_kl_train": FP32,
    "_info_nce_backward": KEEP, "_info_nce_train_backward": KEEP,
    "_bank_kl_backward": KEEP, "_bank_kl_train_backward": KEEP,
    "rank_metrics": KEEP, "k_reciprocal_rerank": KEEP, "k_reciprocal_rerank_dense": KEEP,
}
_AUTOCAST_DEVICES = ("cpu", "cuda")

_warned_devices: set = set()


def route(op: str, impl: str, tensors: Sequence[Tensor], cpu_fallback: bool = False) -> str:
    """FUSED, REFERENCE or VIA_CPU for these inputs (``tensors[0]`` decides the device)."""
    if impl == "reference":
        return REFERENCE
    if impl != "fused":
        raise ValueError(f"{op}: impl must be 'fused' or 'reference', got {impl!r}")
    device = tensors[0].device
    if cpu_fallback and device.type != "cpu" and not _lib.has_kernel(op, device):
        if device.type not in _warned_devices:
            _warned_devices.add(device.type)
            warnings.warn(f"upreid.ops.{op}: no {device.type} kernel in this build; computing on "
                          "the CPU", RuntimeWarning, stacklevel=4)
        return VIA_CPU
    if not _lib.use_extension(*tensors):
        return REFERENCE
    return FUSED


def call(op: str, impl: str, fused: Callable, reference: Callable, args: Sequence,
         cpu_fallback: bool = False):
    """Runs ``fused(*args)`` or ``reference(*args)`` as :func:`route` decides."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    how = route(op, impl, tensors, cpu_fallback)
    if how == FUSED:
        return fused(*args)
    if how == REFERENCE:
        return autocast_reference(op, reference, args)
    device = tensors[0].device
    out = call(op, "fused", fused, reference,
               [a.cpu() if isinstance(a, Tensor) else a for a in args])
    if isinstance(out, Tensor):
        return out.to(device)
    return tuple(t.to(device) for t in out)


def _cast_dtype(policy: str, device_type: str) -> torch.dtype | None:
    if policy == LOWER:
        return torch.get_autocast_dtype(device_type)
    return torch.float32 if policy == FP32 else None


def _cast(args: Sequence, dtype: torch.dtype | None, device_type: str) -> list:
    if dtype is None:
        return list(args)
    return [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point()
            and a.dtype != torch.float64 and a.device.type == device_type else a for a in args]


def autocast_reference(op: str, reference: Callable, args: Sequence):
    """The reference under the op's autocast policy (inputs cast as the op's are, autocast off)."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    device_type = tensors[0].device.type if tensors else "cpu"
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return reference(*args)
    cast = _cast(args, _cast_dtype(AUTOCAST[op], device_type), device_type)
    with torch.autocast(device_type, enabled=False):
        return reference(*cast)


def _register_autocast(lib: torch.library.Library, name: str, policy: str, device_type: str):
    op = getattr(torch.ops.upreid, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def impl(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*_cast(args, _cast_dtype(policy, device_type), device_type))

    # The C++ dispatcher's kernel (eager) and the Python dispatcher's (tracing, torch.compile).
    lib.impl(name, lambda _keyset, *args: impl(*args), key_name, with_keyset=True)
    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(impl)


def register_autocast_policies() -> None:
    lib = torch.library.Library("upreid", "IMPL")
    for name, policy in AUTOCAST.items():
        if not hasattr(torch.ops.upreid, name):
            continue
        for device_type in _AUTOCAST_DEVICES:
            _register_autocast(lib, name, policy, device_type)
    _LIBS.append(lib)  # a Library deregisters its kernels when collected


_LIBS: list = []


def forbid_double_backward(name: str, op: str) -> None:
    """Autograd formula of a backward op: a second-order gradient through it is an error."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: double backward (a gradient of its gradient) is not supported by the fused "
            "kernels; use impl='reference' for higher-order gradients")

    torch.library.register_autograd(f"upreid::{name}", backward, setup_context=setup_context)


def needs(ctx, *indices: int) -> list[bool]:
    """ctx.needs_input_grad at these input positions."""
    return [bool(ctx.needs_input_grad[i]) for i in indices]
