"""Camera-based BatchNorm at test time (``eval.camera_bn``, ``upreid extract --camera-bn``): each
camera's images are extracted with BatchNorm statistics of that camera's images alone; the model's own
statistics are put back; bad input is named."""
import copy
import json
import os

import numpy as np
import pytest
import torch

from upreid.data.datasets import synth
from upreid.data.records import Record
from upreid.evaluation.extract import balanced_batch_size, extract_features, recalibrate_bn
from upreid.models import ResNet

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
PRE = dict(height=64, width=32, mean=MEAN, std=STD, backend="torch", workers=0, progress=False)


def _net():
    torch.manual_seed(0)
    return ResNet(18, last_stride=1, width=8).eval()


class Pooled(torch.nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, x):
        return self.trunk(x).mean((2, 3))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_each_camera_is_extracted_with_its_own_statistics(synth_root):
    ds = synth(synth_root)
    recs = list(ds.query) + list(ds.gallery)
    model = Pooled(_net())
    before = _state(model)
    f, p, c, idx = extract_features(model, recs, camera_bn=True, return_index=True, **PRE)
    assert torch.equal(idx, torch.arange(len(recs)))
    assert p.tolist() == [r.pid for r in recs] and c.tolist() == [r.camid for r in recs]
    for k, v in model.state_dict().items():                 # the model's statistics are put back
        assert torch.equal(v, before[k]), k
    cams = sorted({r.camid for r in recs})
    assert len(cams) == 3
    for cam in cams:                                        # the same as recalibrating on that camera by hand
        ix = [i for i, r in enumerate(recs) if r.camid == cam]
        m = copy.deepcopy(model)
        recalibrate_bn(m, [recs[i] for i in ix], **PRE)
        ref, _, _ = extract_features(m, [recs[i] for i in ix], **PRE)
        torch.testing.assert_close(f[ix], ref, rtol=1e-5, atol=1e-6)
    plain, _, _ = extract_features(model, recs, **PRE)
    assert not torch.allclose(plain, f, atol=1e-3)          # it changes the features
    # a camera's features do not depend on the other cameras' images
    keep = [i for i, r in enumerate(recs) if r.camid != cams[-1]]
    g, _, _ = extract_features(model, [recs[i] for i in keep], camera_bn=True, **PRE)
    torch.testing.assert_close(g, f[keep], rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(synth_root):
    ds = synth(synth_root)
    recs = list(ds.query) + list(ds.gallery)
    model = Pooled(_net())
    before = _state(model)
    nameless = recs[:4] + [Record(recs[5].path, recs[5].pid, -1)]
    with pytest.raises(ValueError, match="needs every image's camera; 1 of 5 images"):
        extract_features(model, nameless, camera_bn=True, **PRE)
    lonely = [r for r in recs if r.camid == 0] + [next(r for r in recs if r.camid == 1)]
    with pytest.raises(ValueError, match=r"at least 2 images per camera.*\{2: 1\}"):
        extract_features(model, lonely, camera_bn=True, **PRE)
    no_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="no BatchNorm"):
        extract_features(no_bn, recs, camera_bn=True, **PRE)
    with pytest.raises(ValueError, match="at least 2 images"):
        recalibrate_bn(model, recs[:1], **PRE)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_balanced_batch_size_keeps_the_number_of_batches_and_fills_the_last():
    for n in range(1, 300):
        for bs in (1, 2, 3, 7, 64, 128):
            b = balanced_batch_size(n, bs)
            assert b <= bs and -(-n // b) == -(-n // bs), (n, bs)
            assert b == 1 or -(-n // (b - 1)) > -(-n // bs), (n, bs)   # the smallest such size
    assert balanced_batch_size(129, 128) == 65
    with pytest.raises(ValueError):
        balanced_batch_size(0, 128)


@pytest.mark.slow
def test_finetuning_evaluation_and_extract_agree_under_camera_bn(synth_root, finetune_cfg, tmp_path, capsys):
    """Fine-tuning's own evaluation with ``eval.camera_bn=true`` equals ``upreid extract --camera-bn``
    then ``upreid evaluate`` on its checkpoint, and differs from the plain evaluation."""
    from upreid.engine.finetune import finetune
    from upreid.evaluation.cli import main as evaluate_main
    from upreid.evaluation.cli_extract import main as extract_main
    run = finetune(finetune_cfg(synth_root, str(tmp_path / "ft"), "eval.camera_bn=true", "data.backend=torch",
                                "eval.ranklist_queries=0"))
    final = json.load(open(os.path.join(run["output"], "results.json")))["final"]
    npz = str(tmp_path / "f.npz")
    assert extract_main(["extract", run["checkpoint"], "--out", npz, "--camera-bn", "--backend", "torch",
                         "--device", "cpu", "--no-progress", "--workers", "0"]) == 0
    assert "camera BN" in capsys.readouterr().out
    res = str(tmp_path / "r.json")
    assert evaluate_main(["evaluate", npz, "--rerank", "both", "--json", res, "--no-progress"]) == 0
    mine = json.load(open(res))
    for mode in ("plain", "rerank"):
        for k in ("mAP", "Rank-1", "mINP"):
            assert mine[mode][k] == pytest.approx(final[mode][k], abs=1e-6), (mode, k)
    plain = str(tmp_path / "p.npz")
    assert extract_main(["extract", run["checkpoint"], "--out", plain, "--no-camera-bn", "--backend", "torch",
                         "--device", "cpu", "--no-progress", "--workers", "0"]) == 0
    with np.load(npz) as a, np.load(plain) as b:
        assert a["query_features"].shape == b["query_features"].shape
        assert not np.allclose(a["query_features"], b["query_features"], atol=1e-3)
        np.testing.assert_array_equal(a["gallery_paths"], b["gallery_paths"])


def test_extract_refuses_camera_bn_on_names_without_a_camera(tmp_path, capsys):
    from PIL import Image

    from upreid.engine import checkpoint as ckpt_io
    from upreid.evaluation.cli_extract import main as extract_main
    net = ResNet(18, width=8)
    trunk = str(tmp_path / "t.pt")
    ckpt_io.save_backbone(trunk, net.state_dict(), depth=18, width=8, last_stride=1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 32, 3), 40 * i, np.uint8)).save(folder / f"img{i}.jpg")
    code = extract_main(["extract", trunk, "--images", str(folder), "--out", str(tmp_path / "o.npz"),
                         "--camera-bn", "--backend", "torch", "--device", "cpu", "--no-progress", "--workers", "0"])
    assert code == 2
    assert "needs every image's camera; 3 of 3 images have none" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


# ----------------------------------------------------------------------------- camera BN in training
def test_camera_batchnorm_equals_batchnorm_on_each_cameras_images():
    """Output, gradients and running statistics of CameraBatchNorm against nn.BatchNorm2d run on each
    camera's images separately; plain BatchNorm without cameras and in eval mode."""
    from upreid.models.group_bn import CameraBatchNorm, camera_groups
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 5) * 2 + 1
    cams = torch.tensor([5, 2, 5, 5, 7, 2, 7, 5, 2, 2])                # unequal groups, unsorted ids
    bn = CameraBatchNorm(3, momentum=0.25)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xa = x.clone().requires_grad_()
    with camera_groups(bn, cams):
        y = bn(xa)
    assert bn.groups_of_batch is None                                     # cleared after the block
    w = torch.randn_like(y)
    (y * w).sum().backward()
    ref = torch.nn.BatchNorm2d(3, momentum=0.25)
    ref.load_state_dict({k: v for k, v in bn.state_dict().items() if "running" not in k and "num_batches" not in k},
                        strict=False)
    xb = x.clone().requires_grad_()
    out = torch.empty_like(x)
    means, variances = [], []
    for c in cams.unique():
        m = cams == c
        r = torch.nn.BatchNorm2d(3, momentum=0.25)
        r.load_state_dict(ref.state_dict())
        r.weight, r.bias = ref.weight, ref.bias                           # shared parameters
        o = r(xb[m])
        out = out.index_put((m.nonzero()[:, 0],), o)
        means.append(x[m].mean((0, 2, 3)))
        variances.append(x[m].var((0, 2, 3), unbiased=True))
    (out * w).sum().backward()
    torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, 0.25 * torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.75 + 0.25 * torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    plain = torch.nn.BatchNorm2d(3, momentum=0.25)
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), plain(x))                           # no cameras: plain BatchNorm
    bn.eval(), plain.eval()
    with camera_groups(bn, cams):
        torch.testing.assert_close(bn(x), plain(x))                       # eval: the running statistics
    bn.train()
    with camera_groups(bn, cams):
        with torch.no_grad():
            yb = bn(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), y.detach(), atol=0.1)
    with camera_groups(bn, cams[:4]), pytest.raises(ValueError, match="4 camera ids for a batch of 10"):
        bn(x)
    pooled = torch.randn(4, 3, 1, 1)                 # [B, C, 1, 1] (MGN's reductions): plain BatchNorm
    plain.train()
    plain.load_state_dict(bn.state_dict())
    with camera_groups(bn, torch.tensor([0, 1, 1, 2])):
        torch.testing.assert_close(bn(pooled), plain(pooled))
    torch.testing.assert_close(bn.running_var, plain.running_var)
    with pytest.raises(ValueError, match=r"camids must be \[B\]"):
        with camera_groups(bn, cams.view(2, 5)):
            pass


def test_convert_camera_bn_keeps_the_state_dict_and_leaves_batchnorm1d():
    from upreid.models.group_bn import CameraBatchNorm, camera_groups, convert_camera_bn
    from upreid.models.reid import build_reid_model
    torch.manual_seed(0)
    model = build_reid_model("bot", 5, depth=18, width=8, last_stride=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    convert_camera_bn(model)
    kinds = {type(m) for m in model.modules()}
    assert CameraBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds and torch.nn.BatchNorm1d in kinds
    assert {id(p) for p in model.parameters()} == params
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(6, 3, 64, 32)
    model.train()
    with camera_groups(model, torch.tensor([0, 0, 0, 1, 1, 1])):
        a = model(x)["triplet"][0]
    with camera_groups(model, torch.tensor([0, 1, 0, 1, 0, 1])):      # other groups, other features
        b = model(x)["triplet"][0]
    assert not torch.allclose(a, b, atol=1e-4)
    plain = torch.nn.Linear(3, 3)
    with camera_groups(plain, torch.tensor([0, 1])):                    # no such layer: nothing to set
        pass


def test_mgn_trains_under_camera_bn():
    """MGN's reductions see pooled [B, C, 1, 1] maps, where a camera may hold one image: they stay plain."""
    from upreid.models.group_bn import camera_groups, convert_camera_bn
    from upreid.models.reid import build_reid_model
    torch.manual_seed(0)
    model = convert_camera_bn(build_reid_model("mgn", 4, depth=18, width=8, dim=16)).train()
    x = torch.randn(5, 3, 64, 32, requires_grad=True)
    with camera_groups(model, torch.tensor([3, 0, 3, 1, 0])):          # camera 1 holds one image
        out = model(x)
    loss = sum(z.sum() for z in out["logits"]) + sum(f.pow(2).sum() for f in out["triplet"])
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_camera_bn_batches_follow_the_batch_size_and_one_split_uses_both_splits_statistics(synth_root, tmp_path):
    from upreid.engine import checkpoint as ckpt_io
    from upreid.evaluation.extract import _eval_loader, camera_bn_features, extract_to_npz
    ds = synth(synth_root)
    recs = list(ds.query) + list(ds.gallery)
    model = Pooled(_net())
    sizes = []

    def make_loader(sub, batch_size):
        sizes.append(batch_size)
        return _eval_loader(sub, 64, 32, MEAN, STD, False, batch_size, "torch", "cpu", 0)
    f, _, _, _ = camera_bn_features(model, recs, make_loader, progress=False, batch_size=4)
    assert sizes and max(sizes) <= 4
    ref, _, _ = extract_features(model, recs, camera_bn=True, batch_size=4, **PRE)
    torch.testing.assert_close(f, ref)
    trunk = str(tmp_path / "t.pt")
    ckpt_io.save_backbone(trunk, model.trunk.state_dict(), depth=18, width=8, last_stride=1)
    kw = dict(data=f"synth:{synth_root}", height=64, width=32, backend="torch", workers=0, progress=False,
              camera_bn=True, flip=False)
    extract_to_npz(trunk, str(tmp_path / "both.npz"), **kw)
    extract_to_npz(trunk, str(tmp_path / "q.npz"), split="query", **kw)
    with np.load(tmp_path / "both.npz") as a, np.load(tmp_path / "q.npz") as b:
        np.testing.assert_allclose(b["features"], a["query_features"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b["paths"], a["query_paths"])


def test_finetuning_refuses_camera_bn_before_training_when_a_camera_cannot_be_estimated(
        synth_root, finetune_cfg, tmp_path, monkeypatch):
    from upreid.data.records import Record
    from upreid.engine import finetune as ft
    real = ft.load_dataset

    def one_query_without_camera(cfg):
        d = real(cfg)
        d.query[0] = Record(d.query[0].path, d.query[0].pid, -1)
        return d
    monkeypatch.setattr(ft, "load_dataset", one_query_without_camera)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="camera BN needs every image's camera; 1 of .* query and gallery"):
        ft.finetune(finetune_cfg(synth_root, str(out), "eval.camera_bn=true", "data.backend=torch"))
    assert not (out / "checkpoint.pt").exists()


def test_camera_bn_in_training_needs_it_at_evaluation(synth_root, finetune_cfg, tmp_path):
    from upreid.engine.schema import ConfigError
    with pytest.raises(ConfigError, match="model.camera_bn=true with eval.camera_bn=false"):
        finetune_cfg(synth_root, str(tmp_path), "model.camera_bn=true")


@pytest.mark.slow
def test_finetuning_with_camera_bn_trains_evaluates_and_extracts_the_same(synth_root, finetune_cfg, tmp_path, capsys):
    """``model.camera_bn=true``: training batches are normalised per camera (the features differ from a
    plain run of the same seed), the checkpoint loads into a plain model, ``upreid extract`` applies
    camera BN by default for it and reproduces the run's numbers, and resuming with another setting is
    refused."""
    from upreid.engine.checkpoint import CheckpointError
    from upreid.engine.finetune import finetune
    from upreid.evaluation.cli import main as evaluate_main
    from upreid.evaluation.cli_extract import main as extract_main
    common = ("eval.camera_bn=true", "data.backend=torch", "eval.ranklist_queries=0")
    cbn = finetune(finetune_cfg(synth_root, str(tmp_path / "cbn"), "model.camera_bn=true", *common))
    plain = finetune(finetune_cfg(synth_root, str(tmp_path / "plain"), *common))
    a = torch.load(cbn["checkpoint"], weights_only=False)["model"]
    b = torch.load(plain["checkpoint"], weights_only=False)["model"]
    assert set(a) == set(b)
    assert not torch.allclose(a["trunk.layer1.0.bn1.running_mean"], b["trunk.layer1.0.bn1.running_mean"])
    npz = str(tmp_path / "f.npz")
    assert extract_main(["extract", cbn["checkpoint"], "--out", npz, "--backend", "torch", "--device", "cpu",
                         "--no-progress", "--workers", "0"]) == 0
    assert "camera BN" in capsys.readouterr().out                       # the run's eval.camera_bn
    res = str(tmp_path / "r.json")
    assert evaluate_main(["evaluate", npz, "--json", res, "--no-progress"]) == 0
    final = json.load(open(os.path.join(cbn["output"], "results.json")))["final"]
    assert json.load(open(res))["plain"]["mAP"] == pytest.approx(final["plain"]["mAP"], abs=1e-6)
    assert extract_main(["extract", cbn["checkpoint"], "--out", npz, "--no-camera-bn", "--backend", "torch",
                         "--device", "cpu", "--no-progress", "--workers", "0", "--overwrite"]) == 0
    assert "camera BN" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="model.camera_bn"):
        finetune(finetune_cfg(synth_root, str(tmp_path / "cbn"), *common), resume=cbn["checkpoint"])


def test_camera_bn_at_batch_size_one_and_with_unreadable_images(synth_root, tmp_path):
    """A batch size of 1 estimates each camera's statistics on batches of 2 (as a batch size of 2 does;
    the extraction itself does not depend on the batching); a camera whose images are all unreadable but
    one is named."""
    from upreid.data.testing import corrupt_files
    from upreid.evaluation.extract import camera_bn_features
    ds = synth(synth_root)
    recs = list(ds.query) + list(ds.gallery)
    model = Pooled(_net())
    one, _, _ = extract_features(model, recs, camera_bn=True, batch_size=1, **PRE)
    two, _, _ = extract_features(model, recs, camera_bn=True, batch_size=2, **PRE)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    bad = list(corrupt_files(str(tmp_path)).values())
    cam0 = [r for r in recs if r.camid == 0][:1]
    broken = cam0 + [Record(p, 1, 0) for p in bad[:2]] + [r for r in recs if r.camid != 0]

    def make_loader(sub, batch_size):
        from upreid.data.loader import build_loader
        aug = {"height": 64, "width": 32, "flip_test": False, "mean": MEAN, "std": STD}
        return build_loader("eval", sub, batch_size=batch_size, backend="torch", device="cpu", aug=aug, workers=0,
                            on_bad_image="skip")
    with pytest.raises(ValueError, match=r"statistics of camera 1 \(3 images\) could not be estimated"):
        camera_bn_features(model, broken, make_loader, progress=False)


def test_frozen_trunk_baseline_applies_camera_bn(synth_root, tmp_path):
    from upreid.engine import checkpoint as ckpt_io
    from upreid.evaluation.baselines import frozen_trunk_baseline, score_features
    from upreid.evaluation.extract import split_rows
    from upreid.evaluation.feature_model import load_feature_model
    ds = synth(synth_root)
    trunk = str(tmp_path / "t.pt")
    ckpt_io.save_backbone(trunk, _net().state_dict(), depth=18, width=8, last_stride=1)
    got = frozen_trunk_baseline(ds, trunk, 64, 32, flip=False, camera_bn=True)["plain"]
    plain = frozen_trunk_baseline(ds, trunk, 64, 32, flip=False)["plain"]
    model, info = load_feature_model(trunk)
    both = extract_features(model, list(ds.query) + list(ds.gallery), height=64, width=32, mean=info["mean"],
                            std=info["std"], workers=0, progress=False, camera_bn=True, return_index=True)
    (fq, qp, qc, _), (fg, gp, gc, _) = split_rows(both, len(ds.query))
    want = score_features(fq, fg, qp, gp, qc, gc, metric="cosine")["plain"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-9) and got["mAP"] != pytest.approx(plain["mAP"], abs=1e-6)
