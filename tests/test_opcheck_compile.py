"""The operators follow the custom-op contract: torch.library.opcheck and torch.compile(fullgraph)."""
import pytest
import torch

from conftest import devices
from helpers import feats
from upreid.losses import BankKL, MoCoLoss, PatchInfoNCE
from upreid.ops import HAS_EXTENSION, reference

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")


def info_nce_samples(device):
    for dtype in (torch.float32, torch.float64):
        for g, k in ((0, None), (1, 20), (3, 7)):
            q = feats(6, 5, dtype=dtype, device=device, requires_grad=True)
            keys = feats(9, 5, dtype=dtype, device=device, requires_grad=True)
            bank = feats(k, 5, dtype=dtype, device=device) if k else None
            pos = torch.tensor([0, 4, 8, 2, 2, 7], device=device)
            yield (q, keys, pos, bank, 0.2, g)
    yield (feats(0, 5, device=device), feats(3, 5, device=device),
           torch.empty(0, dtype=torch.long, device=device), None, 0.1, 1)


@pytest.mark.parametrize("device", devices())
def test_opcheck_info_nce(device):
    for args in info_nce_samples(device):
        torch.library.opcheck(torch.ops.upreid.info_nce.default, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_info_nce_train(device):
    from upreid.ops import _lib
    if not _lib.has_kernel("_info_nce_train", torch.device(device)):
        pytest.skip(f"no _info_nce_train kernel for {device}")
    for args in info_nce_samples(device):
        torch.library.opcheck(torch.ops.upreid._info_nce_train.default, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_bank_kl(device):
    for dtype in (torch.float32, torch.float64):
        s = feats(7, 6, dtype=dtype, device=device, requires_grad=True)
        args = (s, feats(7, 6, dtype=dtype, device=device), feats(13, 6, dtype=dtype, device=device), 0.2, 0.1)
        torch.library.opcheck(torch.ops.upreid.bank_kl.default, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_bank_kl_train(device):
    from upreid.ops import _lib
    if not _lib.has_kernel("_bank_kl_train", torch.device(device)):
        pytest.skip(f"no _bank_kl_train kernel for {device}")
    for dtype in (torch.float32, torch.float64):
        s = feats(7, 6, dtype=dtype, device=device, requires_grad=True)
        args = (s, feats(7, 6, dtype=dtype, device=device), feats(13, 6, dtype=dtype, device=device), 0.2, 0.1)
        torch.library.opcheck(torch.ops.upreid._bank_kl_train.default, args)


def test_opcheck_backward_ops():
    q, keys, pos, bank = feats(6, 5), feats(6, 5), torch.arange(6), feats(8, 5)
    loss, lse = torch.ops.upreid.info_nce(q, keys, pos, bank, 0.1, 1)
    torch.library.opcheck(torch.ops.upreid._info_nce_backward.default,
                          (torch.ones(6), torch.zeros(6), q, keys, pos, bank, lse, 0.1, 1))
    s, t = feats(6, 5), feats(6, 5)
    kl, ls, lt = torch.ops.upreid.bank_kl(s, t, bank, 0.1, 0.2)
    torch.library.opcheck(torch.ops.upreid._bank_kl_backward.default,
                          (torch.ones(6), torch.zeros(6), s, t, bank, ls, lt, 0.1, 0.2))
    _, ls, _, ms, mt = torch.ops.upreid._bank_kl_train(s, t, bank, 0.1, 0.2)
    torch.library.opcheck(torch.ops.upreid._bank_kl_train_backward.default,
                          (torch.ones(6), torch.zeros(6), s, ms, mt, 0.1))
    for need in ((True, False), (False, True)):  # a gradient not asked for: an empty [0, D]
        torch.library.opcheck(torch.ops.upreid._info_nce_backward.default,
                              (torch.ones(6), torch.zeros(6), q, keys, pos, bank, lse, 0.1, 0, *need))


def test_torch_compile_fullgraph_forward_backward():
    """One compiled step with all three fused losses: values and gradients equal eager."""
    moco, patch, gc = MoCoLoss(0.2), PatchInfoNCE(0.1), BankKL(0.1, 0.1)
    lin = torch.nn.Linear(8, 8)

    def step(x, patches, targets, keys, queue, teacher):
        q = torch.nn.functional.normalize(lin(x), dim=-1)
        return moco(q, keys, queue) + patch(patches, targets) + gc(q, teacher, queue)

    inputs = (feats(4, 8), feats(4, 3, 8, requires_grad=True), feats(4, 3, 8), feats(4, 8),
              feats(50, 8), feats(4, 8))
    eager = step(*inputs)
    eager_grads = torch.autograd.grad(eager, [lin.weight, inputs[1]])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, [lin.weight, inputs[1]])
    assert torch.allclose(out, eager, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_torch_compile_inductor():
    def f(q, keys, pos, bank):
        loss, lse = torch.ops.upreid.info_nce(q, keys, pos, bank, 0.1, 1)
        return loss.mean() + 0.01 * lse.mean()

    q = feats(8, 16, requires_grad=True)
    args = (q, feats(8, 16), torch.arange(8), feats(40, 16))
    out = torch.compile(f, fullgraph=True)(*args)
    loss, lse = reference.info_nce(*[a.double() if a.is_floating_point() else a for a in args], 0.1, 1)
    assert abs(out.item() - (loss.mean() + 0.01 * lse.mean()).item()) < 1e-5
    out.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_opcheck_backward_ops_on_strided_inputs():
    """Gradients come back contiguous whatever the inputs' strides, in the kernels and in the fakes
    (a fake that copied a transposed input's strides made inductor's backward fail its stride assert)."""
    qt, kt, st = feats(5, 6).t(), feats(5, 6).t(), feats(5, 6).t()          # [6, 5] transposed views
    pos, bank, t = torch.arange(6), feats(8, 5), feats(6, 5)
    _, lse = torch.ops.upreid.info_nce(qt, kt, pos, bank, 0.1, 1)
    torch.library.opcheck(torch.ops.upreid._info_nce_backward.default,
                          (torch.ones(6), torch.zeros(6), qt, kt, pos, bank, lse, 0.1, 1))
    _, ls, lt = torch.ops.upreid.bank_kl(st, t, bank, 0.1, 0.2)
    torch.library.opcheck(torch.ops.upreid._bank_kl_backward.default,
                          (torch.ones(6), torch.zeros(6), st, t, bank, ls, lt, 0.1, 0.2))
    _, ls, _, ms, mt = torch.ops.upreid._bank_kl_train(st, t, bank, 0.1, 0.2)
    torch.library.opcheck(torch.ops.upreid._bank_kl_train_backward.default,
                          (torch.ones(6), torch.zeros(6), st, ms, mt, 0.1))
    empty = feats(5, 0).t()                                                    # [0, 5]: the early return
    _, lse0 = torch.ops.upreid.info_nce(empty, kt, pos[:0], None, 0.1, 1)
    torch.library.opcheck(torch.ops.upreid._info_nce_backward.default,
                          (torch.ones(0), torch.zeros(0), empty, kt, pos[:0], None, lse0, 0.1, 1))


@pytest.mark.parametrize("loss", ["info_nce", "bank_kl"])
def test_torch_compile_inductor_backward_through_a_transposed_input(loss):
    from upreid import ops
    x = torch.randn(8, 5, requires_grad=True)
    keys, pos, bank, teacher = torch.randn(6, 8), torch.randint(0, 6, (5,)), torch.randn(7, 8), torch.randn(5, 8)
    if loss == "info_nce":
        def f(x):
            return ops.info_nce(x.t(), keys, pos, bank, 0.2, 0)[0].sum()
    else:
        def f(x):
            return ops.bank_kl(x.t(), teacher, bank, 0.2, 0.1)[0].sum()
    want = torch.autograd.grad(f(x), x)[0]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x), x)[0]
    assert torch.allclose(got, want, atol=1e-5)


def _error(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e).split("\n")[0]
    return None


EVAL_BAD = [
    ("k_reciprocal_rerank", lambda: (torch.randn(12, 4), 20, 5, 3, 0.3)),             # num_query >= N
    ("k_reciprocal_rerank", lambda: (torch.randn(12, 4), 3, 5, 9, 0.3)),              # k2 > k1 + 1
    ("k_reciprocal_rerank", lambda: (torch.randn(12), 3, 5, 3, 0.3)),                 # not 2-D
    ("k_reciprocal_rerank", lambda: (torch.randn(12, 4), 3, 5, 3, 1.5)),              # lambda
    ("k_reciprocal_rerank_dense", lambda: (torch.rand(3, 5), torch.rand(3, 3), torch.rand(4, 4), 5, 3, 0.3)),
    ("k_reciprocal_rerank_dense", lambda: (torch.rand(0, 5), torch.rand(0, 0), torch.rand(5, 5), 5, 3, 0.3)),
    ("k_reciprocal_rerank_dense", lambda: (torch.rand(3, 5), torch.rand(3, 3).double(), torch.rand(5, 5), 5, 3, 0.3)),
    ("rank_metrics", lambda: (torch.rand(3, 5), torch.arange(3), torch.arange(4), torch.zeros(3, dtype=torch.long),
                              torch.ones(5, dtype=torch.long), 10)),                    # g_pids too short
    ("rank_metrics", lambda: (torch.rand(3, 5), torch.arange(3.0), torch.arange(5), torch.zeros(3, dtype=torch.long),
                              torch.ones(5, dtype=torch.long), 10)),                    # float pids
    ("rank_metrics", lambda: (torch.rand(3, 5), torch.arange(3), torch.arange(5), torch.zeros(3, dtype=torch.long),
                              torch.ones(5, dtype=torch.long), 0)),                     # max_rank
]


@pytest.mark.parametrize("name,make", EVAL_BAD)
def test_evaluation_fakes_refuse_what_the_operators_refuse_in_their_words(name, make):
    """Under torch.compile the fake kernel runs first: it must give the operator's own message, not a
    shape error of its output (e.g. a negative gallery size)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = getattr(torch.ops.upreid, name)
    real = _error(lambda: op(*make()))
    assert real is not None
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in make()]
        fake = _error(lambda: op(*args))
    assert fake == real


def test_rerank_wrapper_compiles_as_one_graph():
    """The wrapper's origin shift (the row nearest the mean, picked by index_select) traces: no
    data-dependent Python integer."""
    from upreid.ops import k_reciprocal_rerank
    x = torch.randn(40, 6) + 100
    f = torch.compile(lambda f: k_reciprocal_rerank(f, 10, 8, 3), fullgraph=True)
    torch.testing.assert_close(f(x), k_reciprocal_rerank(x, 10, 8, 3), atol=1e-6, rtol=0)
