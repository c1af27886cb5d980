"""The pure-PyTorch references (also the fallback without upreid._C) reject what the operators
reject, with the same message."""
import math

import pytest
import torch

from helpers import feats
from upreid.ops import HAS_EXTENSION, reference

needs_ext = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")


def nce_args(**kw):
    args = {"query": feats(6, 8), "keys": feats(6, 8), "positive": torch.arange(6),
            "bank": feats(10, 8), "temperature": 0.1, "group_size": 0}
    return {**args, **kw}


NCE_BAD = {
    "query 3-D": {"query": feats(6, 8, 1)},
    "keys D": {"keys": feats(6, 7)},
    "bank D": {"bank": feats(10, 9)},
    "bank 1-D": {"bank": feats(10)},
    "positive M": {"positive": torch.arange(5)},
    "positive too large": {"positive": torch.tensor([0, 1, 2, 3, 4, 6])},
    "positive negative": {"positive": torch.tensor([-1, 1, 2, 3, 4, 5])},
    "positive int32": {"positive": torch.arange(6, dtype=torch.int32)},
    "group not dividing N": {"group_size": 4},
    "negative group": {"group_size": -1},
    "zero temperature": {"temperature": 0.0},
    "negative temperature": {"temperature": -0.1},
    "nan temperature": {"temperature": math.nan},
    "inf temperature": {"temperature": math.inf},
    "keys fp64": {"keys": feats(6, 8, dtype=torch.float64)},
    "bank fp16": {"bank": feats(10, 8, dtype=torch.float16)},
    "integer query": {"query": torch.ones(6, 8, dtype=torch.int64),
                      "keys": torch.ones(6, 8, dtype=torch.int64), "bank": None},
    "no keys": {"keys": feats(0, 8), "positive": torch.zeros(6, dtype=torch.long)},
}


def error_of(fn, **kwargs) -> str:
    with pytest.raises(RuntimeError) as info:
        fn(**kwargs)
    return str(info.value)


@pytest.mark.parametrize("case", list(NCE_BAD), ids=str)
def test_info_nce_reference_rejects_what_the_op_rejects(case):
    args = nce_args(**NCE_BAD[case])
    ref = error_of(reference.info_nce, **args)
    assert ref.startswith("upreid::info_nce: "), ref
    if HAS_EXTENSION:
        assert ref == error_of(torch.ops.upreid.info_nce, **args)


def kl_args(**kw):
    args = {"student": feats(6, 8), "teacher": feats(6, 8), "bank": feats(10, 8),
            "tau_student": 0.1, "tau_teacher": 0.1}
    return {**args, **kw}


KL_BAD = {
    "teacher rows": {"teacher": feats(5, 8)},
    "teacher D": {"teacher": feats(6, 7)},
    "empty bank": {"bank": feats(0, 8)},
    "bank D": {"bank": feats(10, 3)},
    "zero tau_student": {"tau_student": 0.0},
    "inf tau_teacher": {"tau_teacher": math.inf},
    "negative tau_teacher": {"tau_teacher": -1.0},
    "teacher fp16": {"teacher": feats(6, 8).half()},
    "bank bf16": {"bank": feats(10, 8).bfloat16()},
    "student 3-D": {"student": feats(6, 8)[None]},
    "integer student": {"student": torch.ones(6, 8, dtype=torch.int32)},
}


@pytest.mark.parametrize("case", list(KL_BAD), ids=str)
def test_bank_kl_reference_rejects_what_the_op_rejects(case):
    args = kl_args(**KL_BAD[case])
    ref = error_of(reference.bank_kl, **args)
    assert ref.startswith("upreid::bank_kl: "), ref
    if HAS_EXTENSION:
        assert ref == error_of(torch.ops.upreid.bank_kl, **args)


def test_reference_accepts_what_the_op_accepts():
    """Empty query, no bank, group spanning all keys: the checks do not reject valid input."""
    loss, lse = reference.info_nce(feats(0, 4), feats(3, 4), torch.empty(0, dtype=torch.long), None,
                                   0.1, 3)
    assert loss.shape == (0,) and lse.shape == (0,)
    kl, _, _ = reference.bank_kl(feats(0, 4), feats(0, 4), feats(0, 4))
    assert kl.shape == (0,)


@needs_ext
def test_fake_kernels_reject_with_the_same_messages():
    """Under FakeTensorMode (what torch.compile traces with) the shape checks say the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = nce_args(**NCE_BAD["group not dividing N"])
    expected = error_of(reference.info_nce, **args)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        assert error_of(torch.ops.upreid.info_nce, **fake) == expected
