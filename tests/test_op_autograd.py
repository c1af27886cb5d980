"""Autograd contract of the training operators: only the gradients asked for are computed, double
backward is a clear error, a bank asking for a gradient is an error, CPU backward is reproducible."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import feats, max_err
from upreid.ops import HAS_EXTENSION, bank_kl, info_nce, reference

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")


class RecordOps(TorchDispatchMode):
    """Records the upreid ops (and their arguments) dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "upreid":
            self.calls.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))


def nce_inputs(group, bank=True, m=12, n=12, d=8):
    q = feats(m, d, dtype=torch.float64)
    k = feats(n, d, dtype=torch.float64)
    pos = torch.randint(0, n, (m,))
    b = feats(30, d, dtype=torch.float64) if bank else None
    return q, k, pos, b


@pytest.mark.parametrize("group", [0, 1, 3])
@pytest.mark.parametrize("bank", [True, False])
@pytest.mark.parametrize("want", ["query", "keys", "both"])
def test_info_nce_computes_only_the_gradients_asked_for(group, bank, want):
    q, k, pos, b = nce_inputs(group, bank)
    full_q, full_k = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss, lse = reference.info_nce(full_q, full_k, pos, b, 0.2, group)
    (loss.sum() + 0.5 * lse.sum()).backward()

    q.requires_grad_(want in ("query", "both"))
    k.requires_grad_(want in ("keys", "both"))
    with RecordOps() as rec:
        loss, lse = info_nce(q, k, pos, b, 0.2, group)
        (loss.sum() + 0.5 * lse.sum()).backward()
    backward_calls = [(name, args) for name, args in rec.calls if name.endswith("_backward")]
    assert len(backward_calls) == 1
    name, args = backward_calls[0]
    flags = (list(args) + [True, True])[9:11]  # need_grad_query/keys (trailing defaults are dropped)
    assert flags == [q.requires_grad, k.requires_grad], (name, flags)
    if q.requires_grad:
        assert max_err(q.grad, full_q.grad) < 1e-10
    else:
        assert q.grad is None
    if k.requires_grad:
        assert max_err(k.grad, full_k.grad) < 1e-10
    else:
        assert k.grad is None


@pytest.mark.parametrize("op", ["_info_nce_backward", "_info_nce_train_backward"])
def test_backward_ops_return_empty_for_skipped_gradients(op):
    q, k, pos, b = nce_inputs(0)
    if op == "_info_nce_backward":
        _, lse = torch.ops.upreid.info_nce(q, k, pos, b, 0.2, 0)
        extra = (b, lse)
    else:
        _, lse, bank_mean = torch.ops.upreid._info_nce_train(q, k, pos, b, 0.2, 0)
        extra = (lse, bank_mean)
    fn = getattr(torch.ops.upreid, op)
    ones, zeros = torch.ones(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    gq, gk = fn(ones, zeros, q, k, pos, *extra, 0.2, 0, True, False)
    gq_all, gk_all = fn(ones, zeros, q, k, pos, *extra, 0.2, 0)
    assert gk.shape == (0, 8) and gq.shape == q.shape
    assert torch.equal(gq, gq_all)
    gq, gk = fn(ones, zeros, q, k, pos, *extra, 0.2, 0, False, True)
    assert gq.shape == (0, 8) and torch.equal(gk, gk_all)


def test_info_nce_train_is_used_only_when_the_query_needs_a_gradient():
    """Keys-only gradients never involve the bank: the plain forward, no bank_mean pass."""
    q, k, pos, b = nce_inputs(0)
    for q_grad, expected in ((True, "_info_nce_train"), (False, "info_nce")):
        with RecordOps() as rec:
            info_nce(q.clone().requires_grad_(q_grad), k.clone().requires_grad_(), pos, b, 0.2, 0)
        assert rec.calls[0][0] == expected


def double_backward(fn, x):
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    (g * g).sum().backward()


@pytest.mark.parametrize("bank", [True, False])  # with a bank the training variant runs
def test_info_nce_double_backward_is_an_error(bank):
    q, k, pos, b = nce_inputs(0, bank)
    fn = lambda x: info_nce(x, k, pos, b, 0.2, 0)[0].sum()  # noqa: E731
    with pytest.raises(RuntimeError, match=r"upreid::info_nce: double backward .* not supported"):
        double_backward(fn, q.clone().requires_grad_())
    # The reference supports it, as the message says.
    x = q.clone().requires_grad_()
    double_backward(lambda x: info_nce(x, k, pos, b, 0.2, 0, impl="reference")[0].sum(), x)
    assert x.grad is not None and x.grad.abs().max() > 0


@pytest.mark.parametrize("train", [True, False])
def test_bank_kl_double_backward_is_an_error(train, monkeypatch):
    from upreid.ops import _lib
    if not train:  # force the plain op (whose backward revisits the bank)
        monkeypatch.setitem(_lib._KERNELS, ("_bank_kl_train", "CPU"), False)
    s, t, b = feats(5, 8, dtype=torch.float64), feats(5, 8, dtype=torch.float64), feats(20, 8, dtype=torch.float64)
    fn = lambda x: bank_kl(x, t, b)[0].sum()  # noqa: E731
    with pytest.raises(RuntimeError, match=r"upreid::bank_kl: double backward .* not supported"):
        double_backward(fn, s.clone().requires_grad_())


def test_create_graph_first_order_gradients_are_still_right():
    """create_graph=True alone is fine: only differentiating the gradient again is refused."""
    q, k, pos, b = nce_inputs(0)
    x = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(info_nce(x, k, pos, b, 0.2, 0)[0].sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad(reference.info_nce(x, k, pos, b, 0.2, 0)[0].sum(), x)
    assert max_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("op", ["info_nce", "_info_nce_train"])
def test_bank_requiring_grad_is_an_error_on_the_raw_op(op):
    q, k, pos, b = nce_inputs(1)
    with pytest.raises(ValueError, match=r"upreid::info_nce: 'bank' requires grad, but the bank is a "
                                         r"buffer that receives no gradient; pass bank.detach\(\)"):
        getattr(torch.ops.upreid, op)(q.requires_grad_(), k, pos, b.requires_grad_(), 0.2, 1)


@pytest.mark.parametrize("op", ["bank_kl", "_bank_kl_train"])
@pytest.mark.parametrize("which", ["teacher", "bank"])
def test_bank_kl_targets_requiring_grad_are_an_error_on_the_raw_op(op, which):
    args = {"student": feats(5, 8, requires_grad=True), "teacher": feats(5, 8), "bank": feats(20, 8)}
    args[which].requires_grad_()
    with pytest.raises(ValueError, match=rf"upreid::bank_kl: '{which}' requires grad"):
        getattr(torch.ops.upreid, op)(args["student"], args["teacher"], args["bank"], 0.1, 0.1)


@pytest.mark.parametrize("group", [0, 1, 4])
def test_cpu_backward_is_deterministic(group):
    """Under torch.use_deterministic_algorithms(True) the CPU backward runs (no alert) and two runs
    agree bit for bit, though grad_keys is accumulated from several threads' row blocks."""
    torch.manual_seed(0)
    q, k = feats(700, 16), feats(700, 16)
    pos, b = torch.randint(0, 700, (700,)), feats(900, 16)

    def grads():
        x, y = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss, _ = info_nce(x, y, pos, b, 0.1, group)
        loss.sum().backward()
        return x.grad, y.grad

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_group_grad_keys_alerts_under_deterministic_mode():
    q, k = feats(8, 16, device="cuda", requires_grad=True), feats(8, 16, device="cuda", requires_grad=True)
    loss, _ = info_nce(q, k, torch.arange(8, device="cuda"), None, 0.1, 2)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="upreid::info_nce backward on CUDA"):
            loss.sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev)
