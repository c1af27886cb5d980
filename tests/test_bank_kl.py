"""upreid::bank_kl against the pure-PyTorch reference."""
import pytest
import torch

from conftest import devices
from helpers import assert_tolerance, default_atol, feats, max_err
from upreid.ops import bank_kl, reference


def run(fn, s, t, bank, ts, tt, w_kl, w_lse):
    s = s.detach().clone().requires_grad_()
    kl, ls, lt = fn(s, t, bank, ts, tt)
    (kl.double() * w_kl + ls.double() * w_lse).sum().backward()
    return kl, ls, lt, s.grad


CASES = [(1, 7, 3), (37, 300, 59), (300, 2600, 16), (9, 50, 2048), (20, 20, 1)]  # M, K, D


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}D{}".format(*c))
@pytest.mark.parametrize("taus", [(0.1, 0.1), (0.2, 0.05), (1.0, 3.0)])
def test_matches_reference_fp64(case, taus, device):
    m, k, d = case
    s, t, b = (feats(n, d, dtype=torch.float64, device=device) for n in (m, m, k))
    w1, w2 = (torch.randn(m, dtype=torch.float64, device=device) for _ in range(2))
    got = run(bank_kl, s, t, b, *taus, w1, w2)
    ref = run(reference.bank_kl, s, t, b, *taus, w1, w2)
    for name, a, e in zip(("kl", "lse_student", "lse_teacher", "grad_student"), got, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert max_err(a, e) < 1e-9, f"{name}: {max_err(a, e)}"
    assert (got[0] >= -1e-9).all(), "KL must be non-negative"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_tolerance(dtype, device):
    m, k, d = 70, 3000, 32
    s, t, b = (feats(n, d, dtype=dtype, device=device) for n in (m, m, k))
    w1, w2 = (torch.rand(m, dtype=torch.float64, device=device) for _ in range(2))
    got = run(bank_kl, s, t, b, 0.1, 0.05, w1, w2)
    ex = run(reference.bank_kl, s.double(), t.double(), b.double(), 0.1, 0.05, w1, w2)
    base = run(reference.bank_kl, s, t, b, 0.1, 0.05, w1, w2)
    assert got[3].dtype == dtype and got[0].dtype == torch.float32
    for name, a, e, bl in zip(("kl", "lse_student", "lse_teacher", "grad_student"), got, ex, base):
        assert_tolerance(a, e, bl, default_atol(dtype), name)


def test_identical_distributions_give_zero():
    s = feats(10, 8, dtype=torch.float64)
    b = feats(100, 8, dtype=torch.float64)
    kl, ls, lt = bank_kl(s, s, b, 0.1, 0.1)
    assert kl.abs().max().item() < 1e-12 and torch.allclose(ls, lt)


def test_teacher_gets_no_gradient_and_extreme_temperatures():
    s = feats(12, 16, requires_grad=True)
    t = feats(12, 16)
    b = feats(4000, 16)
    kl, _, _ = bank_kl(s, t, b, 0.01, 0.01)
    ref, _, _ = reference.bank_kl(s.double(), t.double(), b.double(), 0.01, 0.01)
    assert torch.isfinite(kl).all() and max_err(kl, ref) <= 1e-4 * ref.abs().max().item()
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_empty_rows():
    s = torch.empty(0, 4, requires_grad=True)
    out = bank_kl(s, torch.empty(0, 4), feats(3, 4), 0.1, 0.1)
    assert all(o.shape == (0,) for o in out)
    out[0].sum().backward()
    assert s.grad.shape == (0, 4)


def test_gradcheck_fp64():
    s = feats(4, 5, dtype=torch.float64, requires_grad=True)
    t = feats(4, 5, dtype=torch.float64)
    b = feats(11, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: bank_kl(s, t, b, 0.3, 0.7)[:2], (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}D{}".format(*c))
def test_train_variant_returns_the_expected_bank_vectors(case):
    """_bank_kl_train: the plain op's outputs plus E_r[b] and E_p[b] ([M, D]) of both distributions."""
    m, k, d = case
    s, t, b = (feats(n, d, dtype=torch.float64) for n in (m, m, k))
    kl, ls, lt, mean_s, mean_t = torch.ops.upreid._bank_kl_train(s, t, b, 0.2, 0.05)
    for got, want in zip((kl, ls, lt), torch.ops.upreid.bank_kl(s, t, b, 0.2, 0.05)):
        assert max_err(got, want) < 1e-10
    assert max_err(mean_s, torch.softmax(s @ b.T / 0.2, dim=1) @ b) < 1e-12
    assert max_err(mean_t, torch.softmax(t @ b.T / 0.05, dim=1) @ b) < 1e-12


def test_training_uses_the_train_variant_and_inference_the_plain_op():
    """With a student gradient the wrapper runs _bank_kl_train (its backward never sees the bank);
    without one the plain forward, which needs no [M, D] accumulators."""
    from test_op_autograd import RecordOps

    s, t, b = feats(6, 8), feats(6, 8), feats(40, 8)
    with RecordOps() as rec:
        bank_kl(s.clone().requires_grad_(), t, b)[0].sum().backward()
        with torch.no_grad():
            bank_kl(s.clone().requires_grad_(), t, b)
    names = [name for name, _ in rec.calls]
    assert names == ["_bank_kl_train", "_bank_kl_train_backward", "bank_kl"]
    assert not any(a is b for _, args in rec.calls[1:2] for a in args), "backward got the bank"


def test_train_backward_argument_errors():
    s, v = feats(6, 8), torch.zeros(6)
    with pytest.raises(RuntimeError, match=r"'mean_teacher' has shape \[6, 7\] but 'student' has shape \[6, 8\]"):
        torch.ops.upreid._bank_kl_train_backward(v, v, s, feats(6, 8), feats(6, 7), 0.1)
    with pytest.raises(RuntimeError, match=r"'grad_kl' has 5 entries"):
        torch.ops.upreid._bank_kl_train_backward(torch.zeros(5), v, s, s, s, 0.1)
    with pytest.raises(RuntimeError, match=r"'tau_student' must be a finite number > 0"):
        torch.ops.upreid._bank_kl_train_backward(v, v, s, s, s, 0.0)
