"""Shuffle-BN on one device (model.bn_groups): GroupBatchNorm against BatchNorm run on each chunk,
the conversion of a trunk, the key encoder's permutation and its inverse, the query's per-view groups,
the errors, the config check, the generator state in the state dict, and exact resume."""
import copy
import os

import pytest
import torch
from torch import nn

from upreid.models import ResNet, UPReID
from upreid.models.group_bn import GroupBatchNorm, SeededPermutation, convert_group_bn

SMALL = dict(hidden_dim=64, dim=32, patch_dim=32, queue_size=24, stripes=4)
H, W = 64, 32


def _randomise(bn):
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


# ------------------------------------------------------------------------------- GroupBatchNorm
@pytest.mark.parametrize("shape,cls", [((12, 5), nn.BatchNorm1d), ((12, 5, 7), nn.BatchNorm1d),
                                       ((12, 5, 4, 3), nn.BatchNorm2d), ((12, 5, 2, 3, 2), nn.BatchNorm3d)])
@pytest.mark.parametrize("groups", [2, 3, 4])
@pytest.mark.parametrize("momentum,affine", [(0.1, True), (None, True), (0.3, False)])
def test_group_bn_equals_bn_on_each_chunk(shape, cls, groups, momentum, affine):
    """Output, input and parameter gradients as BatchNorm run on each chunk separately; the running
    statistics as the mean of those G runs' (each from the same state): one update per forward."""
    torch.manual_seed(0)
    bn = _randomise(cls(shape[1], momentum=momentum, affine=affine))
    bn.num_batches_tracked.fill_(3)
    chunks_bn = [copy.deepcopy(bn) for _ in range(groups)]
    gbn = convert_group_bn(copy.deepcopy(bn), groups)
    assert isinstance(gbn, GroupBatchNorm) and gbn.groups == groups
    x = (torch.randn(shape) * 2 + 1).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y = gbn(x)
    ref = torch.cat([m(c) for m, c in zip(chunks_bn, xr.chunk(groups))])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(shape)
    y.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(gbn.weight.grad, sum(m.weight.grad for m in chunks_bn), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gbn.bias.grad, sum(m.bias.grad for m in chunks_bn), rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var"):
        expect = torch.stack([getattr(m, name) for m in chunks_bn]).mean(0)
        torch.testing.assert_close(getattr(gbn, name), expect, rtol=1e-5, atol=1e-6, msg=name)
    assert int(gbn.num_batches_tracked) == 4
    # plain BN on the whole batch is something else: the test can tell the two apart
    assert not torch.allclose(y, copy.deepcopy(bn)(x.detach()), atol=1e-3)


def test_group_bn_eval_and_one_group_are_plain_bn():
    torch.manual_seed(1)
    bn = _randomise(nn.BatchNorm2d(6))
    x = torch.randn(8, 6, 3, 3)
    gbn = convert_group_bn(copy.deepcopy(bn), 4).eval()
    torch.testing.assert_close(gbn(x), copy.deepcopy(bn).eval()(x))            # running statistics
    one = convert_group_bn(copy.deepcopy(bn), 1)
    torch.testing.assert_close(one(x), copy.deepcopy(bn)(x))                    # train mode, one group
    cl = x.contiguous(memory_format=torch.channels_last)                        # any memory format
    g4 = convert_group_bn(copy.deepcopy(bn), 4)
    torch.testing.assert_close(g4(cl), convert_group_bn(copy.deepcopy(bn), 4)(x))


def test_group_bn_errors():
    gbn = GroupBatchNorm(4, groups=3)
    with pytest.raises(ValueError, match="batch of 8 cannot be cut into 3 groups"):
        gbn(torch.randn(8, 4, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel and group"):
        GroupBatchNorm(4, groups=4)(torch.randn(4, 4))
    with pytest.raises(ValueError, match="integer >= 1"):
        GroupBatchNorm(4, groups=0)


def test_convert_keeps_parameters_buffers_and_state_dict():
    """A ResNet with IBN-a: every BatchNorm converted (InstanceNorm left), the same Parameter objects,
    the same state dict keys and values, the same eval-mode output."""
    torch.manual_seed(2)
    net = ResNet(18, width=8, ibn=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise(m)
    ref = copy.deepcopy(net).eval()
    params = {n: p for n, p in net.named_parameters()}
    keys = list(net.state_dict())
    n_bn = sum(type(m) is nn.BatchNorm2d for m in net.modules())
    out = convert_group_bn(net, 2)
    assert out is net
    assert sum(isinstance(m, GroupBatchNorm) for m in net.modules()) == n_bn > 0
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert any(isinstance(m, nn.InstanceNorm2d) for m in net.modules())
    assert all(p is params[n] for n, p in net.named_parameters())
    assert list(net.state_dict()) == keys
    x = torch.randn(4, 3, H, W)
    torch.testing.assert_close(net.eval()(x), ref(x))
    convert_group_bn(net, 4)                                        # regrouping a converted module
    assert {m.groups for m in net.modules() if isinstance(m, GroupBatchNorm)} == {4}


# ------------------------------------------------------------------------------- the UP-ReID module
@pytest.fixture
def pair(tiny_trunk):
    """(grouped, plain): UP-ReID modules with bn_groups=G and 1 and the same weights and queue."""
    def make(g=4, **kw):
        torch.manual_seed(3)
        grouped = UPReID(**SMALL, bn_groups=g, trunk=tiny_trunk(), **kw)
        plain = UPReID(**SMALL, bn_groups=1, trunk=tiny_trunk(), **kw)
        plain.load_state_dict(grouped.state_dict())
        return grouped, plain
    return make


def test_modules_are_converted(pair):
    grouped, plain = pair(4)
    gq = {m.groups for m in grouped.encoder_q.modules() if isinstance(m, GroupBatchNorm)}
    gk = {m.groups for m in grouped.encoder_k.modules() if isinstance(m, GroupBatchNorm)}
    assert gq == {8} and gk == {4}                     # query: 2 views x 4 groups; keys: 4 groups
    assert not any(isinstance(m, GroupBatchNorm) for m in plain.modules())
    assert set(grouped.state_dict()) == set(plain.state_dict())


def test_keys_are_unpermuted_eval(pair, upreid_batch):
    """In eval mode BN uses running statistics: with the permutation undone, bn_groups=4 gives the
    keys and layer-4 maps of plain BN, row for row."""
    grouped, plain = pair(4)
    grouped.eval(), plain.eval()
    x = upreid_batch(8, H, W, 0)["view2"]
    gen = grouped.key_shuffle.generator.get_state()
    fg, kg = grouped._keys(x)
    fp, kp = plain._keys(x)
    torch.testing.assert_close(kg, kp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fg, fp, rtol=1e-5, atol=1e-6)
    perm = torch.randperm(8, generator=torch.Generator().set_state(gen))
    assert not torch.equal(perm, torch.arange(8))       # a permutation was applied and undone


def test_keys_train_mode_are_the_shuffled_groups(pair, upreid_batch):
    """In training, key i is image i normalised with the statistics of its group in the permuted
    batch: plain BN run on each group of images perm[jB/G:(j+1)B/G]."""
    grouped, plain = pair(4)
    x = upreid_batch(8, H, W, 1)["view2"]
    perm = torch.randperm(8, generator=torch.Generator().set_state(grouped.key_shuffle.generator.get_state()))
    fg, kg = grouped._keys(x)
    fr, kr = torch.empty_like(fg), torch.empty_like(kg)
    with torch.no_grad():
        for idx in perm.view(4, 2):
            fr[idx], kr[idx] = plain.encoder_k(x[idx])
    torch.testing.assert_close(kg, kr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fg, fr, rtol=1e-5, atol=1e-6)
    # without shuffle_bn the key groups are consecutive (MoCo's per-GPU BN without the shuffle)
    noshuf, plain2 = pair(4, shuffle_bn=False)
    k_ns = noshuf._keys(x)[1]
    with torch.no_grad():
        k_cons = torch.cat([plain2.encoder_k(c)[1] for c in x.chunk(4)])
    torch.testing.assert_close(k_ns, k_cons, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(k_ns, kg, atol=1e-4)


def test_query_groups_are_per_view(pair, upreid_batch):
    grouped, plain = pair(2)
    b = upreid_batch(8, H, W, 2)
    x = torch.cat([b["view1"], b["view2"]])
    fq, zq = grouped.encoder_q(x)
    ref = [plain.encoder_q(c) for c in x.chunk(4)]            # view 1 in 2 groups, then view 2 in 2 groups
    torch.testing.assert_close(zq, torch.cat([r[1] for r in ref]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fq, torch.cat([r[0] for r in ref]), rtol=1e-5, atol=1e-6)


def test_forward_backward_and_the_batch_error(pair, upreid_batch):
    grouped, plain = pair(4)
    batch = upreid_batch(8, H, W, 3)
    out = grouped(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and grouped.encoder_q.trunk.body[0].weight.grad is not None
    out_p = plain(batch)
    assert not torch.allclose(out["loss_cl"].detach(), out_p["loss_cl"].detach())   # the groups matter
    with pytest.raises(ValueError, match=r"batch of 6 images cannot be cut into bn_groups=4"):
        grouped(upreid_batch(6, H, W, 3))
    with pytest.raises(ValueError, match="bn_groups must be an integer >= 1"):
        UPReID(**SMALL, bn_groups=0)


def test_permutation_state_is_saved_and_restored(pair):
    grouped, _ = pair(4)
    sd = grouped.state_dict()
    assert "key_shuffle._extra_state" in sd
    a = grouped.key_shuffle(16)
    other = pair(4)[0]
    other.key_shuffle(16), other.key_shuffle(16)               # moved elsewhere
    other.load_state_dict(sd)
    assert torch.equal(other.key_shuffle(16), a)
    assert not torch.equal(grouped.key_shuffle(16), a)          # the stream moves on
    old = {k: v for k, v in sd.items() if k != "key_shuffle._extra_state"}    # a checkpoint from before
    other.load_state_dict(old)                                  # strict, and accepted
    s1, s2 = SeededPermutation(5), SeededPermutation(5)
    assert torch.equal(s1(10), s2(10))


# ------------------------------------------------------------------------------- config and runs
def test_config_validation(pretrain_cfg, images, tmp_path):
    from upreid.engine.schema import ConfigError
    cfg = pretrain_cfg(images, str(tmp_path / "a"), "model.bn_groups=2")
    assert cfg["model"]["bn_groups"] == 2
    assert pretrain_cfg(images, str(tmp_path / "b"))["model"]["bn_groups"] == 1        # the default
    with pytest.raises(ConfigError, match=r"model.bn_groups=0 \(from the command line\): must be an integer >= 1"):
        pretrain_cfg(images, str(tmp_path / "c"), "model.bn_groups=0")
    with pytest.raises(ConfigError, match=r"model.bn_groups=3 does not divide data.batch_size=4"):
        pretrain_cfg(images, str(tmp_path / "d"), "model.bn_groups=3")


def test_short_batch_is_trimmed_to_the_groups(pretrain_cfg, images, tmp_path, upreid_batch):
    from upreid.engine.pretrain import PretrainTask
    task = PretrainTask(pretrain_cfg(images, str(tmp_path), "model.bn_groups=2"))
    seen = []
    assert task.forward(lambda b: seen.append(b["view1"].shape[0]) or 0, upreid_batch(3, H, W, 0)) == 0
    task.forward(lambda b: seen.append(b["view1"].shape[0]), upreid_batch(4, H, W, 0))
    assert seen == [2, 4]


def test_resume_with_groups_is_exact(images, tmp_path, pretrain_cfg):
    """SIGTERM after step 3 of 6 (16 images at batch 4: the resume is mid-epoch, the run crosses an epoch
    boundary), resume: the same weights, BN statistics and queue as the uninterrupted run. The global
    generator would not do: a DataLoader draws from it when an epoch starts, and the resumed run starts
    one where the uninterrupted run did not."""
    import signal
    from upreid.engine import checkpoint as ckpt_io
    from upreid.engine.pretrain import pretrain
    extra = ("train.steps=6", "train.checkpoint_every=100", "data.workers=0", "data.backend=torch",
             "model.bn_groups=2")
    full = pretrain(pretrain_cfg(images, str(tmp_path / "full"), *extra))
    assert full["step"] == 6

    def interrupt(step, out):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)
    part = pretrain(pretrain_cfg(images, str(tmp_path / "split"), *extra), on_step=interrupt)
    assert part["interrupted"] and part["step"] == 3
    rest = pretrain(pretrain_cfg(images, str(tmp_path / "split"), *extra), resume="auto")
    assert rest["step"] == 6
    a = ckpt_io.load(os.path.join(tmp_path / "full", "checkpoint.pt"))["model"]
    b = ckpt_io.load(os.path.join(tmp_path / "split", "checkpoint.pt"))["model"]
    assert a.keys() == b.keys() and "key_shuffle._extra_state" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
