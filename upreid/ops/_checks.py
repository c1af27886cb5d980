"""Argument checks of the training operators in Python, with the messages of ``csrc/common/checks.h``.

The pure-PyTorch references (also the fallback when ``upreid._C`` is absent) and the fake kernels run
them, so that every path rejects what the compiled operators reject, with the same words. Size checks go
through :func:`require` (``torch._check`` while compiling, which works on symbolic shapes); the
index-range check reads data and is
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
# require() below.
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


def require(cond, message) -> None:
    """``cond`` or RuntimeError(``message()``). While torch.compile traces, a plain ``torch._check``
    (which takes symbolic shapes) without the message: formatting a symbolic size in a message cannot be
    traced, and a message closure over tensors breaks a full graph."""
    if torch.compiler.is_compiling():
        torch._check(cond)
    elif not cond:
        raise RuntimeError(message())


def size(t: Tensor, d: int, expected, name: str, what: str, op: str) -> None:
    require(t.shape[d] == expected,
            lambda: f"{op}: '{name}' has {t.shape[d]} {what} (shape {_shape(t)}) but {expected} were expected")


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
        require(n % group_size == 0,
                lambda: f"{op}: the number of keys ({n}) must be divisible by 'group_size' ({group_size})")
    require(m == 0 or n > 0, lambda: f"{op}: 'keys' is empty but {m} query rows need a positive key")
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
    require(m == 0 or bank.shape[0] > 0, lambda: f"{op}: 'bank' is empty; a distribution over zero rows is undefined")


def plain_number(v, op: str, name: str) -> None:
    """The fused operators take temperatures as numbers: a tensor asking for a gradient would silently
    get none."""
    if isinstance(v, Tensor) and v.requires_grad:
        raise ValueError(f"{op}: '{name}' is a tensor that requires grad, but the fused operator takes it as a "
                         "number and no gradient would reach it; pass a float, or impl='reference' to learn it")


def no_grad_buffer(t: Tensor | None, op: str, name: str, why: str) -> None:
    """A buffer or target that receives no gradient must not ask for one (a silent None grad)."""
    if t is not None and t.requires_grad:
        raise ValueError(f"{op}: '{name}' requires grad, but {why}; pass {name}.detach()")


# ------------------------------------------------------------------- evaluation operators (fakes)
def rerank_params(k1: int, k2: int, lambda_value: float, op: str) -> None:
    """``check_params`` of csrc/rerank/rerank.cpp."""
    if k1 < 1:
        raise RuntimeError(f"{op}: 'k1' must be >= 1, got {k1}")
    if not 1 <= k2 <= k1 + 1:
        raise RuntimeError(f"{op}: 'k2' must be in [1, k1 + 1] = [1, {k1 + 1}], got {k2}")
    if not (math.isfinite(lambda_value) and 0.0 <= lambda_value <= 1.0):
        raise RuntimeError(f"{op}: 'lambda_value' must be in [0, 1], got {_num(lambda_value)}")


def rerank_features(features: Tensor, num_query: int, k1: int, k2: int, lambda_value: float,
                    op: str = "upreid::k_reciprocal_rerank") -> None:
    """The data-free checks of ``check_rerank_features_args``, in its order (the fake kernel runs them)."""
    dim(features, 2, op, "features", "[N, D] (queries first, then gallery)")
    feature_dtype(features, op, "features")
    n = features.shape[0]
    require(0 < num_query < n, lambda: (f"{op}: 'num_query' must be in (0, N) = (0, {n}) so that queries and "
                                        f"gallery are both non-empty, got {num_query}"))
    rerank_params(k1, k2, lambda_value, op)


def rerank_dense(q_g: Tensor, q_q: Tensor, g_g: Tensor, k1: int, k2: int, lambda_value: float,
                 op: str = "upreid::k_reciprocal_rerank_dense") -> None:
    """The data-free checks of ``check_rerank_dense_args``, in its order."""
    dim(q_g, 2, op, "q_g", "[Q, G]")
    dim(q_q, 2, op, "q_q", "[Q, Q]")
    dim(g_g, 2, op, "g_g", "[G, G]")
    feature_dtype(q_g, op, "q_g")
    like(q_q, "q_q", q_g, "q_g", op)
    like(g_g, "g_g", q_g, "q_g", op)
    q, g = q_g.shape[0], q_g.shape[1]
    require(q > 0, lambda: f"{op}: no queries ('q_g' has shape {_shape(q_g)})")
    require(g > 0, lambda: f"{op}: the gallery is empty ('q_g' has shape {_shape(q_g)})")
    size(q_q, 0, q, "q_q", "rows", op)
    size(q_q, 1, q, "q_q", "columns", op)
    size(g_g, 0, g, "g_g", "rows", op)
    size(g_g, 1, g, "g_g", "columns", op)
    rerank_params(k1, k2, lambda_value, op)


def rank_metrics(distmat: Tensor, q_pids: Tensor, g_pids: Tensor, q_camids: Tensor, g_camids: Tensor,
                 max_rank: int, op: str = "upreid::rank_metrics") -> None:
    """The data-free checks of ``check_rank_metrics_args``, in its order."""
    dim(distmat, 2, op, "distmat", "[Q, G]")
    feature_dtype(distmat, op, "distmat")
    q, g = distmat.shape[0], distmat.shape[1]
    if max_rank < 1:
        raise RuntimeError(f"{op}: 'max_rank' must be >= 1, got {max_rank}")
    require(g > 0 or q == 0, lambda: (f"{op}: the gallery is empty ('distmat' has shape {_shape(distmat)}); at "
                                      "least one gallery item is needed"))
    rows, cols = "distmat rows (queries)", "distmat columns (gallery)"
    for t, n, name, n_name in ((q_pids, q, "q_pids", rows), (g_pids, g, "g_pids", cols),
                               (q_camids, q, "q_camids", rows), (g_camids, g, "g_camids", cols)):
        dim(t, 1, op, name, "[n]")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise RuntimeError(f"{op}: '{name}' must be an integer tensor, got {_name(t.dtype)}")
        require(t.shape[0] == n, lambda: f"{op}: '{name}' has {t.shape[0]} entries but {n_name} has {n}; the "
                                         "lengths must match")
    for name, t in (("q_pids", q_pids), ("g_pids", g_pids), ("q_camids", q_camids), ("g_camids", g_camids)):
        like(t, name, distmat, "distmat", op, same_dtype=False)
