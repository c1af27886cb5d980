"""upreid::info_nce against the pure-PyTorch reference: values, gradients, precisions, shapes."""
import pytest
import torch

from conftest import devices
from helpers import LOW, assert_tolerance, default_atol, feats, max_err
from upreid.ops import info_nce, reference


def make(m, n, k, d, group, dtype, device, normalize=True):
    q = feats(m, d, dtype=dtype, device=device, normalize=normalize)
    keys = feats(n, d, dtype=dtype, device=device, normalize=normalize)
    pos = torch.randint(0, max(n, 1), (m,), device=device)
    bank = feats(k, d, dtype=dtype, device=device, normalize=normalize) if k is not None else None
    return q, keys, pos, bank


def run(fn, q, keys, pos, bank, t, g, w_loss, w_lse, **kw):
    """Forward, then backward of sum(w_loss * loss + w_lse * lse): exercises both output grads."""
    q = q.detach().clone().requires_grad_()
    keys = keys.detach().clone().requires_grad_()
    loss, lse = fn(q, keys, pos, bank, t, g, **kw)
    (loss.double() * w_loss + lse.double() * w_lse).sum().backward()
    return loss, lse, q.grad, keys.grad


def exact(q, keys, pos, bank, t, g, w_loss, w_lse):
    b64 = bank.double() if bank is not None else None
    return run(reference.info_nce, q.double(), keys.double(), pos, b64, t, g, w_loss, w_lse)


CASES = [  # M, N, K (None = no bank), D, group_size
    (37, 37, None, 59, 0),
    (64, 64, 300, 16, 1),
    (33, 44, 2500, 24, 4),     # bank spans two column tiles at this M
    (300, 300, 700, 8, 0),     # several row blocks, several threads
    (300, 600, None, 8, 6),
    (1, 5, 17, 3, 1),          # batch 1
    (20, 8, 10, 1, 8),         # D = 1, one group spanning every key
    (6, 12, 9, 2048, 3),       # wide features
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}N{}K{}D{}g{}".format(*c))
def test_matches_reference_fp64(case, device):
    m, n, k, d, g = case
    q, keys, pos, bank = make(m, n, k, d, g, torch.float64, device)
    w1, w2 = torch.randn(m, dtype=torch.float64, device=device), torch.randn(m, dtype=torch.float64, device=device)
    got = run(info_nce, q, keys, pos, bank, 0.2, g, w1, w2)
    ref = exact(q, keys, pos, bank, 0.2, g, w1, w2)
    for name, a, b in zip(("loss", "lse", "grad_query", "grad_keys"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert max_err(a, b) < 1e-9, f"{name}: {max_err(a, b)}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "M{}N{}K{}D{}g{}".format(*c))
def test_low_precision_tolerance(case, dtype, device):
    m, n, k, d, g = case
    q, keys, pos, bank = make(m, n, k, d, g, dtype, device)
    w1 = torch.rand(m, dtype=torch.float64, device=device)
    w2 = torch.rand(m, dtype=torch.float64, device=device)
    got = run(info_nce, q, keys, pos, bank, 0.1, g, w1, w2)
    ex = exact(q, keys, pos, bank, 0.1, g, w1, w2)
    base = run(reference.info_nce, q, keys, pos, bank, 0.1, g, w1, w2)  # plain PyTorch in `dtype`
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    for name, a, e, b in zip(("loss", "lse", "grad_query", "grad_keys"), got, ex, base):
        assert_tolerance(a, e, b, default_atol(dtype), name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("temperature", [0.01, 0.05, 1.0, 10.0])
def test_extreme_temperatures_stay_finite(temperature, device):
    q, keys, pos, bank = make(40, 40, 3000, 32, 0, torch.float32, device)
    w1, w2 = torch.ones(40, dtype=torch.float64, device=device), torch.zeros(40, dtype=torch.float64, device=device)
    got = run(info_nce, q, keys, pos, bank, temperature, 0, w1, w2)
    ref = exact(q, keys, pos, bank, temperature, 0, w1, w2)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert max_err(a, b) <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("device", devices())
def test_unnormalised_large_logits(device):
    # |q . k| / t up to ~ 10^4: a naive exp overflows, the online logsumexp must not.
    q, keys, pos, bank = make(16, 16, 500, 64, 1, torch.float32, device, normalize=False)
    loss, lse = info_nce(q * 3, keys * 3, pos, bank * 3, 0.01, 1)
    ref_loss, ref_lse = reference.info_nce(q.double() * 3, keys.double() * 3, pos, bank.double() * 3, 0.01, 1)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    assert max_err(lse, ref_lse) / ref_lse.abs().max().item() < 1e-5


@pytest.mark.parametrize("device", devices())
def test_empty_query_rows(device):
    q = torch.empty(0, 8, device=device, requires_grad=True)
    keys = feats(4, 8, device=device, requires_grad=True)
    pos = torch.empty(0, dtype=torch.long, device=device)
    loss, lse = info_nce(q, keys, pos, feats(5, 8, device=device), 0.1, 1)
    assert loss.shape == (0,) and lse.shape == (0,)
    loss.sum().backward()
    assert q.grad.shape == (0, 8) and torch.equal(keys.grad, torch.zeros_like(keys))


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(device):
    q = feats(24, 64, device=device)[:, ::2]          # [24, 32], stride 2
    keys = feats(32, 24, device=device).t()           # [24, 32], transposed
    bank = feats(100, 64, device=device)[::2, ::2]    # [50, 32]
    pos = torch.arange(24, device=device).flip(0)[::1]
    assert not q.is_contiguous() and not keys.is_contiguous() and not bank.is_contiguous()
    got = info_nce(q, keys, pos, bank, 0.1, 1)
    ref = reference.info_nce(q.double(), keys.double(), pos, bank.double(), 0.1, 1)
    for a, b in zip(got, ref):
        assert max_err(a, b) < 1e-5


def test_group_semantics_by_hand():
    # Two groups of 2 keys; row 0's positive is key 3, so its candidates are keys 2 and 3 only.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    keys = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    loss, lse = info_nce(q, keys, torch.tensor([3]), None, 1.0, 2)
    expected_lse = torch.logsumexp(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    assert torch.allclose(lse, expected_lse.view(1))
    assert torch.allclose(loss, (expected_lse - 1.0).view(1))
    # group_size 1 (MoCo): the positive alone plus the bank.
    bank = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    loss, lse = info_nce(q, keys, torch.tensor([3]), bank, 1.0, 1)
    assert torch.allclose(lse, torch.logsumexp(torch.tensor([1.0, 2.0], dtype=torch.float64), 0).view(1))


def test_gradcheck_fp64():
    for g, k in ((0, 7), (1, 9), (3, None)):
        q = feats(5, 4, dtype=torch.float64, requires_grad=True)
        keys = feats(6, 4, dtype=torch.float64, requires_grad=True)
        bank = feats(k, 4, dtype=torch.float64) if k else None
        pos = torch.tensor([0, 5, 2, 3, 1])

        def f(q, keys):
            loss, lse = info_nce(q, keys, pos, bank, 0.5, g)
            return loss, lse

        assert torch.autograd.gradcheck(f, (q, keys), eps=1e-6, atol=1e-7)


def _op_info_nce(q, keys, pos, bank, t, g):
    return torch.ops.upreid.info_nce(q, keys, pos, bank, t, g)


def _op_info_nce_train(q, keys, pos, bank, t, g):
    loss, lse, _ = torch.ops.upreid._info_nce_train(q, keys, pos, bank, t, g)
    return loss, lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("path", ["recompute", "train"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}N{}K{}D{}g{}".format(*c))
def test_both_backward_paths_match_reference(case, path, device):
    """The public wrapper picks the training variant (bank mean saved in the forward) when a
    gradient is needed; the plain op recomputes the bank tiles in its backward. Both are exact."""
    from upreid.ops import _lib
    if path == "train" and not _lib.has_kernel("_info_nce_train", torch.device(device)):
        pytest.skip(f"no _info_nce_train kernel for {device}")
    m, n, k, d, g = case
    q, keys, pos, bank = make(m, n, k, d, g, torch.float64, device)
    w1, w2 = torch.randn(m, dtype=torch.float64, device=device), torch.randn(m, dtype=torch.float64, device=device)
    fn = _op_info_nce if path == "recompute" else _op_info_nce_train
    got = run(fn, q, keys, pos, bank, 0.3, g, w1, w2)
    ref = exact(q, keys, pos, bank, 0.3, g, w1, w2)
    for name, a, b in zip(("loss", "lse", "grad_query", "grad_keys"), got, ref):
        assert max_err(a, b) < 1e-9, f"{name}: {max_err(a, b)}"


def test_train_variant_bank_mean_is_softmax_weighted_bank():
    q, keys, pos, bank = make(9, 9, 40, 6, 1, torch.float64, "cpu")
    _, _, bank_mean = torch.ops.upreid._info_nce_train(q, keys, pos, bank, 0.2, 1)
    logits = torch.cat([(q * keys[pos]).sum(1, keepdim=True), q @ bank.T], 1) / 0.2
    p = logits.softmax(1)[:, 1:]
    assert max_err(bank_mean, p @ bank) < 1e-12
