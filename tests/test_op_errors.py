"""Bad input gets a clear error that names the argument."""
import math

import pytest
import torch

from helpers import feats
from upreid.losses import BankKL, InfoNCE, MoCoLoss, PatchInfoNCE
from upreid.ops import bank_kl, info_nce


def good():
    return feats(6, 8), feats(6, 8), torch.arange(6), feats(10, 8)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda a: {**a, "query": feats(6, 8, 1)}, r"'query' must be 2-D"),
        (lambda a: {**a, "keys": feats(6, 7)}, r"'keys' has 7 features per row .* but 8 were expected"),
        (lambda a: {**a, "bank": feats(10, 9)}, r"'bank' has 9 features per row"),
        (lambda a: {**a, "positive": torch.arange(5)}, r"'positive' has 5 entries"),
        (lambda a: {**a, "positive": torch.tensor([0, 1, 2, 3, 4, 6])}, r"'positive' must index rows of keys in \[0, 6\), got values in \[0, 6\]"),
        (lambda a: {**a, "positive": torch.tensor([-1, 1, 2, 3, 4, 5])}, r"'positive' must index rows of keys"),
        (lambda a: {**a, "positive": torch.arange(6, dtype=torch.int32)}, r"'positive' must be int64"),
        (lambda a: {**a, "group_size": 4}, r"number of keys \(6\) must be divisible by 'group_size' \(4\)"),
        (lambda a: {**a, "group_size": -1}, r"'group_size' must be >= 0"),
        (lambda a: {**a, "temperature": 0.0}, r"'temperature' must be a finite number > 0"),
        (lambda a: {**a, "temperature": -0.1}, r"'temperature' must be a finite number > 0"),
        (lambda a: {**a, "temperature": math.nan}, r"'temperature' must be a finite number > 0"),
        (lambda a: {**a, "temperature": math.inf}, r"'temperature' must be a finite number > 0"),
        (lambda a: {**a, "keys": feats(6, 8, dtype=torch.float64)}, r"'keys' has dtype Double but 'query' has dtype Float"),
        (lambda a: {**a, "query": torch.ones(6, 8, dtype=torch.int64), "keys": torch.ones(6, 8, dtype=torch.int64), "bank": None}, r"'query' must be a floating tensor"),
        (lambda a: {**a, "keys": feats(0, 8)}, r"'keys' is empty"),
        (lambda a: {**a, "bank": feats(10, 8).requires_grad_()}, r"'bank' requires grad"),
    ],
)
def test_info_nce_errors(mutate, pattern):
    q, k, p, b = good()
    args = mutate({"query": q, "keys": k, "positive": p, "bank": b, "temperature": 0.1, "group_size": 0})
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        info_nce(**args)


def test_info_nce_meta_device_mismatch_names_devices():
    q, k, p, b = good()
    with pytest.raises(RuntimeError, match=r"'keys' is on meta but 'query' is on cpu"):
        torch.ops.upreid.info_nce(q, k.to("meta"), p, b, 0.1, 0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"teacher": feats(5, 8)}, r"'teacher' has 5 rows"),
        ({"bank": feats(0, 8)}, r"'bank' is empty"),
        ({"bank": feats(10, 3)}, r"'bank' has 3 features per row"),
        ({"tau_student": 0.0}, r"'tau_student' must be a finite number > 0"),
        ({"tau_teacher": math.inf}, r"'tau_teacher' must be a finite number > 0"),
        ({"teacher": feats(6, 8).half()}, r"'teacher' has dtype Half but 'student' has dtype Float"),
        ({"teacher": feats(6, 8).requires_grad_()}, r"'teacher' requires grad"),
        ({"student": feats(6, 8)[None]}, r"'student' must be 2-D"),
    ],
)
def test_bank_kl_errors(kwargs, pattern):
    args = {"student": feats(6, 8), "teacher": feats(6, 8), "bank": feats(10, 8),
            "tau_student": 0.1, "tau_teacher": 0.1, **kwargs}
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        bank_kl(**args)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        InfoNCE(temperature=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        MoCoLoss(reduction="avg")
    with pytest.raises(ValueError, match="impl must be 'fused' or 'reference'"):
        BankKL(impl="triton")
    with pytest.raises(ValueError, match="negatives must be 'image' or 'batch'"):
        PatchInfoNCE(negatives="all")
    with pytest.raises(ValueError, match=r"must both be \[B, P, D\]"):
        PatchInfoNCE()(feats(4, 3, 8), feats(4, 2, 8))
    with pytest.raises(ValueError, match="must have the same shape"):
        MoCoLoss()(feats(4, 8), feats(3, 8), feats(10, 8))
