"""ResNet (torchvision-compatible keys, strides, IBN-a), stripe pooling, and the UP-ReID module:
fused vs reference loss terms and gradients, every switch, queue and momentum bookkeeping."""
import copy

import pytest
import torch

from upreid.models import ResNet, UPReID, load_torchvision_weights, roi_pool, stripe_boxes, view_stripes_on_original

H, W, B = 64, 32, 4
# the UP-ReID module on an injected tiny trunk (conftest's tiny_trunk): heads, queue and losses as in
# training, at a fraction of a ResNet's cost
SMALL = dict(hidden_dim=64, dim=32, patch_dim=32, queue_size=24, stripes=4)


@pytest.fixture
def small(tiny_trunk):
    """``small(**switches)``: an UP-ReID module on a fresh tiny trunk."""
    return lambda **kw: UPReID(**SMALL, **kw, trunk=tiny_trunk())


@pytest.fixture
def make_batch(upreid_batch):
    return lambda b=B, seed=0: upreid_batch(b, H, W, seed)


# ---------------------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("depth,n_keys", [(18, 120), (50, 318)])
def test_resnet_keys_match_torchvision(depth, n_keys):
    # torchvision's resnet18/50 state dicts have 122/320 entries, 2 of them fc.*, which the trunk drops
    sd = ResNet(depth).state_dict()
    assert len(sd) == n_keys
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.num_batches_tracked",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var"):
        assert key in sd, key
    if depth == 50:
        assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
        assert sd["layer3.0.conv2.weight"].shape == (256, 256, 3, 3)


def test_torchvision_weights_load_and_errors():
    src = ResNet(18)
    sd = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    dst = ResNet(18)
    assert load_torchvision_weights(dst, sd) == []
    assert torch.equal(dst.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    with pytest.raises(ValueError, match="not in a depth-18"):
        load_torchvision_weights(ResNet(18), ResNet(50).state_dict())
    ibn = ResNet(18, ibn=True)
    assert "layer1.0.bn1.IN.weight" in ibn.state_dict() and "layer4.0.bn1.running_mean" in ibn.state_dict()
    with pytest.raises(ValueError, match="not in a depth-18"):  # plain bn1.* keys do not exist in IBN blocks
        load_torchvision_weights(ibn, src.state_dict())


def test_resnet_strides_and_channels_last():
    x = torch.randn(2, 3, H, W)
    net = ResNet(18).eval()
    assert net(x).shape == (2, 512, 2, 1)
    assert ResNet(18, last_stride=1).eval()(x).shape == (2, 512, 4, 2)
    y = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, net(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(20)


# ---------------------------------------------------------------------------------- stripe pooling
def test_roi_pool_matches_region_mean_of_linear_map():
    h, w = 16, 8
    yy = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xx = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    fmap = torch.stack([yy, xx])[None]                                    # [1, 2, h, w]
    box = torch.tensor([[[0.25, 0.25, 0.5, 0.75]]])                       # rows 4..8, cols 2..6
    out = roi_pool(fmap, box, samples=4, max_height=0.25)[0, 0]
    # a linear map's mean over the region is its value at the centre, in pixel-centre coordinates
    torch.testing.assert_close(out, torch.tensor([6.0 - 0.5, 4.0 - 0.5]), rtol=0, atol=1e-5)


def test_stripes_mapped_through_crop_box():
    s = view_stripes_on_original(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.zeros(1), 4)
    torch.testing.assert_close(s[0], stripe_boxes(4))
    s = view_stripes_on_original(torch.tensor([[0.2, 0.1, 0.6, 0.5]]), torch.ones(1), 2)
    torch.testing.assert_close(s[0], torch.tensor([[0.2, 0.1, 0.4, 0.5], [0.4, 0.1, 0.6, 0.5]]))


# ------------------------------------------------------------------------------------ the module
def _run(model, batch):
    out = model(batch)
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("switches", [
    dict(),                                                        # bank_kl + aligned, image negatives
    dict(symmetric=True, gc="cosine", ic="unaligned", ic_negatives="batch"),
])
def test_fused_and_reference_agree_on_model(switches, small, make_batch):
    torch.manual_seed(1)
    fused = small(**switches, loss_impl="fused")
    ref = copy.deepcopy(fused)
    ref.set_loss_impl("reference")
    batch = make_batch()
    out_f, g_f = _run(fused, batch)
    out_r, g_r = _run(ref, batch)
    expect = {"loss", "loss_cl", "loss_gc", "loss_ic", "pos_sim", "patch_pos_sim", "bank_entropy"}
    assert expect <= set(out_f)
    for k in expect:
        torch.testing.assert_close(out_f[k], out_r[k], rtol=1e-4, atol=1e-5, msg=k)
    assert set(g_f) == set(g_r) and any(n.startswith("encoder_q.patch_head") for n in g_f)
    assert not any(n.startswith("encoder_k") for n in g_f)       # the key encoder gets no gradient
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_r[n], rtol=1e-3, atol=1e-5, msg=n)
    assert all(float(v) > 0 for k, v in out_f.items() if k.startswith("loss"))


def test_switches_change_the_terms(small, make_batch):
    torch.manual_seed(2)
    base = small()
    batch = make_batch()
    outs = {}
    for name, kw in {"full": {}, "gc_off": dict(gc="off"), "ic_off": dict(ic="off"),
                     "unaligned": dict(ic="unaligned"), "lambda0": dict(lambda_gc=0.0, lambda_ic=0.0)}.items():
        m = small(**kw)
        m.load_state_dict(base.state_dict(), strict=False)
        outs[name] = {k: v.detach() for k, v in m(batch).items()}
    assert "loss_gc" not in outs["gc_off"] and "loss_ic" not in outs["ic_off"]
    torch.testing.assert_close(outs["lambda0"]["loss"], outs["lambda0"]["loss_cl"])
    assert not torch.allclose(outs["full"]["loss_ic"], outs["unaligned"]["loss_ic"])  # the boxes matter
    torch.testing.assert_close(outs["full"]["loss_cl"], outs["gc_off"]["loss_cl"])
    with pytest.raises(KeyError, match="box1"):
        small()({k: v for k, v in batch.items() if not k.startswith("box")})
    with pytest.raises(ValueError, match="gc must be one of"):
        small(gc="kl")


def test_queue_fifo_and_momentum_update(small, make_batch):
    torch.manual_seed(3)
    m = small(momentum=0.9)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
    k_before = [p.clone() for p in m.encoder_k.parameters()]
    q_now = [p.clone() for p in m.encoder_q.parameters()]
    m.momentum_update()
    for k0, q, k1 in zip(k_before, q_now, m.encoder_k.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q)
    keys = torch.nn.functional.normalize(torch.randn(20, SMALL["dim"]), dim=1)
    m.queue_ptr.fill_(16)
    m.dequeue_and_enqueue(keys)                          # 20 keys at 16 in a queue of 24: wraps
    assert int(m.queue_ptr) == (16 + 20) % 24
    torch.testing.assert_close(m.queue[16:24], keys[:8])
    torch.testing.assert_close(m.queue[0:12], keys[8:20])
    q0 = m.queue.clone()
    out = m(make_batch())                                # a forward enqueues the B keys of view 2
    assert int(m.queue_ptr) == (12 + B) % 24 and not torch.equal(m.queue[12:12 + B], q0[12:12 + B])
    torch.testing.assert_close(m.queue[12 + B:], q0[12 + B:])
    assert 0 <= float(out["bank_entropy"]) <= torch.log(torch.tensor(24.0)) + 1e-4


def test_injected_trunk_and_the_config_path(tiny_trunk, make_batch):
    """An injected trunk is f_q's (f_k gets a copy), its out_channels sizes the heads, and its weights
    are the exported backbone; without one, the config's depth/last_stride/ibn build a ResNet."""
    trunk = tiny_trunk(out_channels=12)
    m = UPReID(**SMALL, trunk=trunk)
    assert m.encoder_q.trunk is trunk and m.encoder_k.trunk is not trunk
    assert m.encoder_q.head.fc1.in_features == 12 and m.encoder_q.patch_head.fc1.in_features == 12
    assert set(m.backbone_state_dict()) == set(trunk.state_dict())
    assert all(not p.requires_grad for p in m.encoder_k.parameters())
    out = m(make_batch())
    out["loss"].backward()
    assert trunk.body[0].weight.grad is not None and torch.isfinite(out["loss"])
    cfg = dict(SMALL, depth=18, last_stride=1, ibn=False)
    built = UPReID.from_config(cfg)
    assert isinstance(built.encoder_q.trunk, ResNet) and built.encoder_q.trunk.depth == 18
    assert built.encoder_q.trunk.last_stride == 1 and built.encoder_q.trunk.out_channels == 512
    assert UPReID.from_config(cfg, trunk=tiny_trunk()).encoder_q.trunk.out_channels == 16
    with pytest.raises(ValueError, match="out_channels"):
        UPReID(**SMALL, trunk=torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Module"):
        UPReID(**SMALL, trunk="resnet18")


def test_narrow_resnet_has_the_structure_of_the_full_one(tiny_resnet):
    narrow, full = tiny_resnet(), ResNet(18)
    assert [k for k in narrow.state_dict()] == [k for k in full.state_dict()]
    assert narrow.out_channels == 64 and narrow(torch.randn(1, 3, H, W)).shape == (1, 64, 2, 1)
    with pytest.raises(ValueError, match="width must be"):
        ResNet(18, width=3)
    with pytest.raises(ValueError, match="not in a depth-18|shape mismatch"):
        load_torchvision_weights(narrow, full.state_dict())
