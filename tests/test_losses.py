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


@pytest.mark.parametrize("gc,ic,symmetric", [("bank_kl", True, False), ("cosine", True, True),
                                             ("off", False, False), ("bank_kl", False, True)])
def test_upreid_loss_is_the_papers_sum_of_its_terms(gc, ic, symmetric):
    """L = L_cl + lambda_gc L_gc + lambda_ic L_ic, written out with the textbook formulations; only the
    queries and the views' patches get a gradient (keys, the original's key and patches are targets)."""
    from upreid.losses import UPReIDLoss
    b, d, k, p, dp = 8, 16, 200, 4, 12
    q1, q2 = feats(b, d, requires_grad=True), feats(b, d, requires_grad=True)
    k1, k2, ko, bank = feats(b, d), feats(b, d), feats(b, d, requires_grad=True), feats(k, d)
    u, v = feats(2 * b, p, dp, requires_grad=True), feats(2 * b, p, dp, requires_grad=True)
    crit = UPReIDLoss(0.2, gc=gc, ic=ic, lambda_gc=0.7, lambda_ic=1.3, gc_tau_teacher=0.05, ic_temperature=0.3,
                      symmetric=symmetric)
    out = crit(q1, q2, k2, bank, k1=k1, k_orig=ko, patches=u, patches_orig=v)

    def moco(q, key):
        logits = torch.cat([(q * key).sum(1, keepdim=True), q @ bank.T], 1) / 0.2
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    want = 0.5 * (moco(q1, k2) + moco(q2, k1)) if symmetric else moco(q1, k2)
    assert abs(out["loss_cl"].item() - want.item()) < 1e-5
    qs, teacher = torch.cat([q1, q2]), torch.cat([ko, ko]).detach()
    if gc == "bank_kl":
        want = want + 0.7 * F.kl_div(F.log_softmax(qs @ bank.T / 0.2, 1), F.log_softmax(teacher @ bank.T / 0.05, 1),
                                     log_target=True, reduction="batchmean")
    elif gc == "cosine":
        want = want + 0.7 * (2 - 2 * (qs * teacher).sum(1)).mean()
    if ic:
        logits = torch.einsum("bpd,bqd->bpq", u, v.detach()) / 0.3
        want = want + 1.3 * F.cross_entropy(logits.reshape(2 * b * p, p), torch.arange(p).repeat(2 * b))
    assert set(out) == {"loss", "loss_cl"} | ({"loss_gc"} if gc != "off" else set()) | ({"loss_ic"} if ic else set())
    assert abs(out["loss"].item() - want.item()) < 1e-5
    out["loss"].backward()
    assert ko.grad is None and v.grad is None and q1.grad is not None and (u.grad is not None) == ic
    g = torch.autograd.grad(want, q1)[0]
    assert max_err(q1.grad, g) < 1e-5


def test_upreid_loss_names_what_it_misses():
    from upreid.losses import UPReIDLoss
    q = feats(4, 8)
    with pytest.raises(ValueError, match=r"k_orig, patches, patches_orig needed \(gc='bank_kl', ic=True"):
        UPReIDLoss()(q, q, q, feats(16, 8))
    with pytest.raises(ValueError, match="k1 needed"):
        UPReIDLoss(gc="off", ic=False, symmetric=True)(q, q, q, feats(16, 8))
    with pytest.raises(ValueError, match="gc must be one of"):
        UPReIDLoss(gc="kl")
    with pytest.raises(ValueError, match="tau_student must be a finite number > 0, got 0.0"):
        UPReIDLoss(0.2, gc_tau_student=0.0)                 # 0 is a value, not "use the default"
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0.0"):
        UPReIDLoss(0.2, ic_temperature=0.0)


def test_reid_loss_modules():
    from upreid.losses import CrossEntropyLabelSmooth, TripletLoss, batch_hard_triplet
    f, pids = torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert TripletLoss(0.3)(f, pids).item() == pytest.approx(batch_hard_triplet(f, pids, 0.3).item())
    logits = torch.randn(8, 4)
    smooth = (1 - 0.1) * F.cross_entropy(logits, pids) + 0.1 * (-F.log_softmax(logits, 1).mean(1)).mean()
    assert CrossEntropyLabelSmooth(0.1)(logits, pids).item() == pytest.approx(smooth.item(), abs=1e-6)
    with pytest.raises(ValueError, match="margin must be > 0 or None"):
        TripletLoss(0.0)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\)"):
        CrossEntropyLabelSmooth(1.0)


def test_reference_losses_compile_as_one_graph():
    """impl='reference' (also the fallback without upreid._C) under torch.compile(fullgraph=True): the
    argument checks trace (their messages close over strings, not tensors), and values equal eager."""
    q, k, queue = feats(4, 8), feats(4, 8), feats(9, 8)
    for loss, args in ((InfoNCE(0.1, impl="reference"), (q, k, torch.arange(4))),
                       (MoCoLoss(0.1, impl="reference"), (q, k, queue)),
                       (BankKL(0.1, 0.2, impl="reference"), (q, k, queue)),
                       (PatchInfoNCE(0.1, impl="reference"), (feats(2, 3, 8), feats(2, 3, 8)))):
        torch._dynamo.reset()
        assert torch.allclose(torch.compile(loss, fullgraph=True)(*args), loss(*args), atol=1e-6), loss
    # a second batch size makes torch.compile recompile with symbolic sizes: the checks still trace
    compiled = torch.compile(MoCoLoss(0.1, impl="reference"), fullgraph=True)
    for b in (4, 5, 7):
        q, k = feats(b, 8), feats(b, 8)
        assert torch.allclose(compiled(q, k, queue), MoCoLoss(0.1, impl="reference")(q, k, queue), atol=1e-6)


def test_a_temperature_that_requires_grad_is_refused_by_the_fused_ops():
    """The fused operators take temperatures as numbers: a learnable one would silently get no
    gradient. The reference implementation differentiates it."""
    from upreid import ops
    from upreid.ops import HAS_EXTENSION
    if not HAS_EXTENSION:
        pytest.skip("upreid._C is not built")
    q, k, bank = feats(4, 8, requires_grad=True), feats(6, 8), feats(9, 8)
    t = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ValueError, match="'temperature' is a tensor that requires grad"):
        ops.info_nce(q, k, torch.arange(4), bank, t)
    with pytest.raises(ValueError, match="'tau_teacher' is a tensor that requires grad"):
        ops.bank_kl(q, feats(4, 8), bank, 0.1, t)
    ops.info_nce(q, k, torch.arange(4), bank, t, impl="reference")[0].sum().backward()
    assert t.grad is not None and t.grad.item() != 0


def test_upreid_model_reads_its_objective_settings_from_the_criterion():
    """The objective's settings live once, in UPReID.criterion: setting them on the model changes the
    loss (an earlier copy on the model was left behind by the criterion)."""
    from upreid.models.upreid import UPReID
    m = UPReID(depth=18, width=16, dim=16, hidden_dim=32, patch_dim=16, queue_size=32, lambda_gc=0.5)
    assert m.lambda_gc == m.criterion.lambda_gc == 0.5 and m.gc == m.criterion.gc == "bank_kl"
    m.lambda_ic, m.symmetric = 0.25, True
    assert m.criterion.lambda_ic == 0.25 and m.criterion.symmetric is True
