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
    assert extract_main(["extract", run["checkpoint"], "--out", plain, "--backend", "torch", "--device", "cpu",
                         "--no-progress", "--workers", "0"]) == 0
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
