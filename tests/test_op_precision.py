"""fp32 matmul precision (torch.set_float32_matmul_precision) on the CPU: every product of the CPU
kernels is an ATen matmul, so they follow PyTorch's own CPU policy (oneDNN: "medium" may use bf16
where the CPU has it), and stay within the tolerance rule of plain PyTorch under the same setting."""
import pytest
import torch

from helpers import assert_tolerance, feats, max_err
from upreid.ops import HAS_EXTENSION, bank_kl, info_nce, reference

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")


@pytest.fixture(params=["highest", "high", "medium"])
def precision(request):
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(prev)


def nce(fn, q, k, pos, b):
    q = q.detach().clone().requires_grad_()
    loss, _ = fn(q, k, pos, b, 0.1, 0)
    loss.double().sum().backward()
    return loss, q.grad


def test_info_nce_follows_the_matmul_precision(precision):
    torch.manual_seed(0)
    q, k, b = feats(64, 64), feats(64, 64), feats(2000, 64)
    pos = torch.randint(0, 64, (64,))
    got = nce(info_nce, q, k, pos, b)
    base = nce(reference.info_nce, q, k, pos, b)
    exact = nce(reference.info_nce, q.double(), k.double(), pos, b.double())
    for name, a, bl, e in zip(("loss", "grad_query"), got, base, exact):
        assert_tolerance(a, e, bl, 1e-4, f"{precision} {name}")
    if precision == "highest":
        assert max_err(got[0], exact[0]) < 1e-4


def test_bank_kl_follows_the_matmul_precision(precision):
    torch.manual_seed(0)
    s, t, b = feats(64, 64), feats(64, 64), feats(3000, 64)
    got = bank_kl(s, t, b)[0]
    base = reference.bank_kl(s, t, b)[0]
    exact = reference.bank_kl(s.double(), t.double(), b.double())[0]
    assert_tolerance(got, exact, base, 1e-4, precision)
    if precision == "highest":
        assert max_err(got, exact) < 1e-5
