"""Argument checks of the training operators in Python, with the messages of ``csrc/common/checks.h``.

The pure-PyTorch references (also the fallback when ``upreid._C`` is absent) and the fake kernels run
them, so that every path rejects what the compiled operators reject, with the same words. Size checks go
through ``torch._check``, which works on symbolic shapes; the index-range check reads data and is
skipped where there is none to read (fake/meta tensors, tracing under ``torch.compile``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# ATen's names of the dtypes (what the C++ messages print).
_ATEN_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
}
FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return _ATEN_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _num(v: float) -> str:
    return f"{v:g}"  # as C++ streams a double: 0, -0.1, nan, inf


# Rank, dtype and device are static even under torch.compile: plain checks. A size can be symbolic:
# torch._check, with a message closure that holds only strings (a closure over a tensor cannot be traced
# by Dynamo, which breaks fullgraph compilation of the references).
def dim(t: Tensor, n: int, op: str, name: str, layout: str) -> None:
    if t.dim() != n:
        raise RuntimeError(f"{op}: '{name}' must be {n}-D {layout}, got shape {_shape(t)}")


def feature_dtype(t: Tensor, op: str, name: str) -> None:
    if t.dtype not in FEATURE_DTYPES:
        raise RuntimeError(f"{op}: '{name}' must be a floating tensor (float32, float16, bfloat16 or float64), "
                           f"got {_name(t.dtype)}")


def index_dtype(t: Tensor, op: str, name: str) -> None:
    if t.dtype != torch.int64:
        raise RuntimeError(f"{op}: '{name}' must be int64, got {_name(t.dtype)}")


def like(t: Tensor, name: str, ref: Tensor, ref_name: str, op: str, same_dtype: bool = True) -> None:
    if t.device != ref.device:
        raise RuntimeError(f"{op}: '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; all tensors "
                           "must be on one device")
    if same_dtype and t.dtype != ref.dtype:
        raise RuntimeError(f"{op}: '{name}' has dtype {_name(t.dtype)} but '{ref_name}' has dtype "
                           f"{_name(ref.dtype)}; feature tensors must share one dtype")


def size(t: Tensor, d: int, expected, name: str, what: str, op: str) -> None:
    msg = f"{op}: '{name}' has {t.shape[d]} {what} (shape {_shape(t)}) but {expected} were expected"
    torch._check(t.shape[d] == expected, lambda: msg)


def positive_finite(v: float, op: str, name: str) -> None:
    v = float(v)
    if not (math.isfinite(v) and v > 0.0):
        raise RuntimeError(f"{op}: '{name}' must be a finite number > 0, got {_num(v)}")


def _has_data(t: Tensor) -> bool:
    return not (t.is_meta or isinstance(t, torch._subclasses.FakeTensor)
                or torch.compiler.is_compiling())


def index_range(idx: Tensor, upper: int, op: str, name: str, upper_name: str) -> None:
    if idx.numel() == 0 or not _has_data(idx):
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= upper:
        raise RuntimeError(f"{op}: '{name}' must index rows of {upper_name} in [0, {upper}), got "
                           f"values in [{lo}, {hi}]")


def info_nce(query: Tensor, keys: Tensor, positive: Tensor, bank: Tensor | None,
             temperature: float, group_size: int, op: str = "upreid::info_nce") -> None:
    """The checks of ``check_info_nce_args`` (csrc/info_nce/info_nce.cpp), in its order."""
    dim(query, 2, op, "query", "[M, D]")
    dim(keys, 2, op, "keys", "[N, D]")
    dim(positive, 1, op, "positive", "[M]")
    feature_dtype(query, op, "query")
    like(keys, "keys", query, "query", op)
    like(positive, "positive", query, "query", op, same_dtype=False)
    index_dtype(positive, op, "positive")
    m, d, n = query.shape[0], query.shape[1], keys.shape[0]
    size(keys, 1, d, "keys", "features per row", op)
    size(positive, 0, m, "positive", "entries", op)
    positive_finite(temperature, op, "temperature")
    if group_size < 0:
        raise RuntimeError(f"{op}: 'group_size' must be >= 0 (0 = all keys), got {group_size}")
    if group_size > 0:
        torch._check(n % group_size == 0, lambda: (
            f"{op}: the number of keys ({n}) must be divisible by 'group_size' ({group_size})"))
    torch._check(m == 0 or n > 0, lambda: f"{op}: 'keys' is empty but {m} query rows need a positive key")
    index_range(positive, n, op, "positive", "keys")
    if bank is not None:
        dim(bank, 2, op, "bank", "[K, D]")
        like(bank, "bank", query, "query", op)
        size(bank, 1, d, "bank", "features per row", op)


def bank_kl(student: Tensor, teacher: Tensor, bank: Tensor, tau_student: float, tau_teacher: float,
            op: str = "upreid::bank_kl") -> None:
    """The checks of ``check_bank_kl_args`` (csrc/bank_kl/bank_kl.cpp), in its order."""
    dim(student, 2, op, "student", "[M, D]")
    dim(teacher, 2, op, "teacher", "[M, D]")
    dim(bank, 2, op, "bank", "[K, D]")
    feature_dtype(student, op, "student")
    like(teacher, "teacher", student, "student", op)
    like(bank, "bank", student, "student", op)
    m, d = student.shape[0], student.shape[1]
    size(teacher, 0, m, "teacher", "rows", op)
    size(teacher, 1, d, "teacher", "features per row", op)
    size(bank, 1, d, "bank", "features per row", op)
    positive_finite(tau_student, op, "tau_student")
    positive_finite(tau_teacher, op, "tau_teacher")
    torch._check(m == 0 or bank.shape[0] > 0, lambda: (
        f"{op}: 'bank' is empty; a distribution over zero rows is undefined"))


def no_grad_buffer(t: Tensor | None, op: str, name: str, why: str) -> None:
    """A buffer or target that receives no gradient must not ask for one (a silent None grad)."""
    if t is not None and t.requires_grad:
        raise ValueError(f"{op}: '{name}' requires grad, but {why}; pass {name}.detach()")
