"""Loss modules: fused and reference agree, and both agree with the textbook formulations."""
import pytest
import torch
import torch.nn.functional as F

from conftest import devices
from helpers import feats, max_err
from upreid.losses import BankKL, InfoNCE, MoCoLoss, PatchInfoNCE


@pytest.mark.parametrize("device", devices())
def test_moco_loss_equals_cross_entropy_formulation(device):
    q, k, queue = feats(32, 16, device=device, requires_grad=True), feats(32, 16, device=device), feats(500, 16, device=device)
    ours = MoCoLoss(temperature=0.2)(q, k, queue)
    # MoCo's own formulation: logits [l_pos, l_neg], label 0.
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.T
    textbook = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / 0.2, torch.zeros(32, dtype=torch.long, device=device))
    assert abs(ours.item() - textbook.item()) < 1e-5
    g1 = torch.autograd.grad(ours, q)[0]
    g2 = torch.autograd.grad(textbook, q)[0]
    assert max_err(g1, g2) < 1e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_patch_info_nce_equals_cross_entropy(negatives, device):
    b, p, d = 6, 4, 12
    u, v = feats(b, p, d, device=device, requires_grad=True), feats(b, p, d, device=device, requires_grad=True)
    ours = PatchInfoNCE(0.1, negatives=negatives, reduction="none")(u, v)
    assert ours.shape == (b, p)
    if negatives == "image":  # per image: a P x P classification of its own stripes
        logits = torch.einsum("bpd,bqd->bpq", u, v) / 0.1
        textbook = F.cross_entropy(logits.reshape(b * p, p), torch.arange(p, device=device).repeat(b), reduction="none")
    else:
        logits = u.reshape(b * p, d) @ v.reshape(b * p, d).T / 0.1
        textbook = F.cross_entropy(logits, torch.arange(b * p, device=device), reduction="none")
    assert max_err(ours.reshape(-1), textbook) < 1e-5
    ga = torch.autograd.grad(ours.sum(), (u, v))
    gb = torch.autograd.grad(textbook.sum(), (u, v))
    for a, c in zip(ga, gb):
        assert max_err(a, c) < 1e-5


@pytest.mark.parametrize("device", devices())
def test_bank_kl_equals_kl_div(device):
    s, t, bank = feats(20, 8, device=device, requires_grad=True), feats(20, 8, device=device, requires_grad=True), feats(300, 8, device=device)
    ours = BankKL(0.1, 0.07)(s, t, bank)
    textbook = F.kl_div(F.log_softmax(s @ bank.T / 0.1, 1), F.log_softmax(t @ bank.T / 0.07, 1),
                        log_target=True, reduction="batchmean")
    assert abs(ours.item() - textbook.item()) < 1e-5
    ours.backward()
    assert t.grad is None, "the teacher is a target: no gradient"
    g = torch.autograd.grad(F.kl_div(F.log_softmax(s @ bank.T / 0.1, 1), F.log_softmax(t.detach() @ bank.T / 0.07, 1),
                                     log_target=True, reduction="batchmean"), s)[0]
    assert max_err(s.grad, g) < 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_and_reference_modules_agree(reduction):
    q, keys, bank = feats(40, 32, requires_grad=True), feats(40, 32), feats(900, 32)
    pos = torch.randperm(40)
    outs = []
    for impl in ("fused", "reference"):
        q.grad = None
        out = InfoNCE(0.1, group_size=4, reduction=reduction, impl=impl)(q, keys, pos, bank)
        out.sum().backward()
        outs.append((out.detach(), q.grad.clone()))
    assert outs[0][0].shape == outs[1][0].shape
    assert max_err(outs[0][0], outs[1][0]) < 1e-4 and max_err(outs[0][1], outs[1][1]) < 1e-5


def test_normalize_option():
    q, k, queue = feats(8, 16, normalize=False), feats(8, 16, normalize=False), feats(40, 16)
    a = MoCoLoss(0.2, normalize=True)(q, k, queue)
    b = MoCoLoss(0.2)(F.normalize(q, dim=-1), F.normalize(k, dim=-1), queue)
    assert torch.allclose(a, b)
    assert "normalize=True" in repr(MoCoLoss(normalize=True))
