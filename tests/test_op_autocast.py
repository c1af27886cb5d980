"""Autocast rules of the operators (CPU bf16): info_nce computes in the autocast dtype (as a matmul),
bank_kl in fp32, the evaluation and backward ops in their inputs' dtype; the reference fallback
follows the same rules."""
import pytest
import torch
import torch.nn.functional as F

from helpers import feats, max_err
from upreid.losses import BankKL, MoCoLoss
from upreid.ops import HAS_EXTENSION, bank_kl, info_nce, k_reciprocal_rerank, rank_metrics, reference

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def as_bf16(*ts):
    return [t.bfloat16() if t is not None else None for t in ts]


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_moco_loss_with_a_fp32_queue_trains_under_bf16_autocast(impl):
    """The head's output is bf16 under autocast, the key and the queue fp32: one dtype, no crash."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 16)
    x, key, queue = torch.randn(8, 16), feats(8, 16), feats(200, 16)
    with torch.autocast(**BF16):
        q = F.normalize(head(x), dim=1)
        loss = MoCoLoss(0.2, impl=impl)(q, key, queue)
    loss.backward()
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    # The value is that of the loss on bf16-rounded inputs: accumulated in fp32 by the fused op,
    # in bf16 by the plain-PyTorch reference (as a hand-written loss would be).
    qb, kb, bb = (t.detach().bfloat16().double() for t in (q, key, queue))
    exact, _ = reference.info_nce(qb, kb, torch.arange(8), bb, 0.2, 1)
    assert abs(loss.item() - exact.mean().item()) < (1e-4 if impl == "fused" else 5e-2)


def test_info_nce_under_autocast_equals_the_op_on_autocast_dtype_inputs():
    q, k, b = feats(20, 32, requires_grad=True), feats(20, 32), feats(300, 32)
    pos = torch.randint(0, 20, (20,))
    with torch.autocast(**BF16):
        loss, lse = info_nce(q, k, pos, b, 0.1, 0)
    loss.sum().backward()
    qb = q.detach().bfloat16().requires_grad_()
    loss_b, lse_b = info_nce(qb, *as_bf16(k), pos, *as_bf16(b), 0.1, 0)
    loss_b.sum().backward()
    assert loss.dtype == torch.float32
    assert torch.equal(loss, loss_b) and torch.equal(lse, lse_b)
    assert q.grad.dtype == torch.float32 and torch.equal(q.grad, qb.grad.float())


@pytest.mark.parametrize("train", [True, False])
def test_bank_kl_keeps_fp32_accuracy_under_autocast(train):
    torch.manual_seed(0)
    s, t, b = feats(64, 32, requires_grad=train), feats(64, 32), feats(3000, 32)
    exact = reference.bank_kl(s.double(), t.double(), b.double())[0]
    outside = bank_kl(s, t, b)[0]
    with torch.autocast(**BF16):
        inside = bank_kl(s, t, b)[0]
        inside_ref = bank_kl(s, t, b, impl="reference")[0]
    assert max_err(outside, exact) < 1e-5
    assert max_err(inside, exact) < 1e-5, "fp32 inputs must not be rounded to bf16 under autocast"
    assert max_err(inside_ref, exact) < 1e-5


def test_bank_kl_under_autocast_upcasts_a_bf16_student():
    s, t, b = feats(16, 32, dtype=torch.bfloat16, requires_grad=True), feats(16, 32), feats(500, 32)
    with torch.autocast(**BF16):
        loss = BankKL(0.1, 0.1)(s, t, b)
    loss.backward()
    expected = BankKL(0.1, 0.1)(s.detach().float(), t, b)
    assert s.grad.dtype == torch.bfloat16
    assert abs(loss.item() - expected.item()) < 1e-6


def test_backward_inside_autocast_keeps_the_ops_precision():
    """A backward run inside the autocast region does not round the backward's products."""
    s, t, b = feats(32, 32, requires_grad=True), feats(32, 32), feats(2000, 32)
    bank_kl(s, t, b)[0].sum().backward()
    outside = s.grad.clone()
    s.grad = None
    with torch.autocast(**BF16):
        bank_kl(s, t, b)[0].sum().backward()
    assert max_err(s.grad, outside) < 1e-6


def test_evaluation_ops_ignore_autocast():
    torch.manual_seed(0)
    x = feats(60, 16)
    dist = torch.rand(10, 50)
    q_pids, g_pids = torch.randint(0, 5, (10,)), torch.randint(0, 5, (50,))
    q_cams, g_cams = torch.zeros(10, dtype=torch.long), torch.ones(50, dtype=torch.long)
    outside = (k_reciprocal_rerank(x, 10), rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, 5))
    with torch.autocast(**BF16):
        inside = (k_reciprocal_rerank(x, 10), rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, 5))
    assert torch.equal(inside[0], outside[0])
    for a, c in zip(inside[1], outside[1]):
        assert torch.equal(a, c)


def test_autocast_under_torch_compile():
    """torch.compile(fullgraph=True) of an autocast region with the fused loss: eager's values."""
    head = torch.nn.Linear(16, 16)
    x, key, queue = torch.randn(8, 16), feats(8, 16), feats(100, 16)

    def step(x, key, queue):
        with torch.autocast(**BF16):
            return MoCoLoss(0.2)(F.normalize(head(x), dim=1), key, queue)

    eager = step(x, key, queue)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, key, queue)
    compiled.backward()
    assert compiled.dtype == torch.float32
    assert abs(compiled.item() - eager.item()) < 1e-5
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_upreid_training_step_under_bf16_autocast(tiny_trunk, upreid_batch):
    """The pre-training step of `upreid pretrain train.amp=bf16` (all three fused losses, an fp32
    queue): forward and backward run, every loss term is finite and the head gets a gradient."""
    from upreid.models import UPReID

    torch.manual_seed(0)
    model = UPReID(hidden_dim=64, dim=32, patch_dim=32, queue_size=24, stripes=4, trunk=tiny_trunk())
    with torch.autocast(**BF16):
        out = model(upreid_batch())
    out["loss"].backward()
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss_cl", "loss_gc", "loss_ic"))
    grads = [p.grad for p in model.encoder_q.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
