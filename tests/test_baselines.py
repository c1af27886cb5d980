"""Pixel baselines, the re-ranking settings rule and the training-curve reader."""
import json

import numpy as np
import pytest

from upreid.evaluation.baselines import LinearMetric, colour_histograms, select_linear_metric
from upreid.evaluation.plots import plot_curves, read_metrics
from upreid.evaluation.rerank_settings import images_per_identity, rerank_settings


def _blobs(ids=12, per_id=6, dim=40, noise=0.3, nuisance=5.0, seed=0):
    """Identities that differ on a few dimensions, hidden under a large nuisance (a 'camera') shared
    across identities: nearest neighbour on raw values is dominated by the nuisance, a linear metric
    learned on labelled rows removes it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim)) * np.r_[np.ones(5), np.zeros(dim - 5)]
    cam_dirs = rng.normal(size=(3, dim)) * nuisance
    x, pids, cams = [], [], []
    for i in range(ids):
        for j in range(per_id):
            c = j % 3
            x.append(centres[i] + cam_dirs[c] + noise * rng.normal(size=dim))
            pids.append(i + 1)
            cams.append(c)
    return np.array(x, np.float32), np.array(pids), np.array(cams)


def test_linear_metric_removes_a_shared_nuisance():
    from upreid.evaluation.baselines import _retrieval_map
    x, p, c = _blobs()
    train, test = p <= 6, p > 6
    raw = _retrieval_map(x[test], p[test], c[test])
    lm = LinearMetric(dims=20, shrinkage=0.1).fit(x[train], p[train])
    learned = _retrieval_map(lm.transform(x[test]), p[test], c[test])
    assert raw < 0.5 and learned > 0.9, (raw, learned)
    assert lm.transform(x).shape == (len(x), 5)          # C - 1 directions


def test_linear_metric_settings_are_chosen_on_the_training_rows():
    x, p, c = _blobs()
    sel = select_linear_metric(x, p, c, dims=(2, 20), shrinkage=(0.1,))
    assert set(sel["scores"]) == {"2,0.1", "20,0.1"}
    assert sel["dims"] == 20 and sel["scores"]["20,0.1"] > sel["scores"]["2,0.1"]


def test_linear_metric_refuses_bad_settings():
    with pytest.raises(ValueError, match="dims must be >= 1"):
        LinearMetric(0, 0.1)
    with pytest.raises(ValueError, match=r"shrinkage must be in \[0, 1\]"):
        LinearMetric(4, 1.5)
    with pytest.raises(ValueError, match="at least 2 identities"):
        LinearMetric(4, 0.1).fit(np.zeros((3, 4)), np.array([1, 1, 1]))


def test_colour_histograms_count_every_pixel():
    img = np.zeros((2, 3 * 4 * 2), np.float32)
    img[1, :8] = 1.0                                      # image 1: the red channel saturated
    h = colour_histograms(img, bins=4)
    assert h.shape == (2, 64)
    np.testing.assert_allclose((h ** 2).sum(1), 1.0)      # square roots of normalised counts
    assert h[0, 0] == 1.0 and h[1, 3 * 16] == 1.0         # black; (r=3, g=0, b=0)


def test_rerank_rule_gives_the_published_settings_at_market_size():
    # Market1501's test split: 750 identities, 3368 queries, about 13,100 gallery images of them
    q = np.repeat(np.arange(1, 751), [5 if i < 368 else 4 for i in range(750)])[:3368]
    g = np.concatenate([np.repeat(np.arange(1, 751), 18)[:13100], np.zeros(2800, int)])
    rr = rerank_settings(q, g)
    assert (rr["k1"], rr["k2"]) == (22, 7) and rr["lambda_value"] == 0.3


def test_rerank_rule_follows_a_small_gallery():
    q = np.array([1, 1, 2, 2, 0, -1])                     # distractor and junk queries do not count
    g = np.array([1, 1, 1, 2, 2, 2, 2, 0, 0, 0])
    assert images_per_identity(q, g) == pytest.approx((5 + 6) / 2)
    assert rerank_settings(q, g)["k1"] == 6 and rerank_settings(q, g)["k2"] == 2
    with pytest.raises(ValueError, match="no query identity"):
        images_per_identity([0, -1], g)


def test_curves_are_drawn_and_a_bad_log_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / i}) for i in range(1, 6))
                   + "\n" + json.dumps({"step": 5, "eval/plain/mAP": 0.5}) + "\n")
    assert len(read_metrics(str(log))) == 6
    out = plot_curves(str(tmp_path / "c.png"), {"run": str(log)}, {"loss": "loss", "acc": "accuracy"})
    from PIL import Image
    with Image.open(out) as im:
        assert im.format == "PNG"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        read_metrics(str(bad))


def test_unknown_baseline_is_named():
    from upreid.evaluation.baselines import pixel_baselines
    with pytest.raises(ValueError, match=r"unknown baselines \['sift'\]; choose from pixels, histogram, lda"):
        pixel_baselines(None, 64, 32, names=("pixels", "sift"))



def test_frozen_trunk_row_scores_an_exported_trunk(tmp_path, synth_root):
    """The demo's "no fine-tuning" row: a trunk file's pooled, flip-averaged features of query and
    gallery, scored like the pixel rows; the same numbers as `upreid extract` + `upreid evaluate`."""
    import torch
    from upreid.data.datasets import synth
    from upreid.engine import checkpoint as ckpt_io
    from upreid.evaluation.baselines import frozen_trunk_baseline, score_features
    from upreid.evaluation.extract import extract_to_npz
    from upreid.models.resnet import ResNet
    torch.manual_seed(0)
    trunk = ResNet(18, last_stride=1, width=8)
    bb = str(tmp_path / "bb.pt")
    ckpt_io.save_backbone(bb, trunk.state_dict(), depth=18, width=8, last_stride=1, step=1)
    ds = synth(synth_root)
    rr = {"k1": 4, "k2": 2, "lambda_value": 0.3}
    res = frozen_trunk_baseline(ds, bb, 64, 32, flip=True, rerank=rr, linear_probe=True)
    assert set(res) == {"plain", "rerank", "lda"}
    assert 0.0 < res["lda"]["mAP"] <= 1.0 and res["lda"]["settings"]["dims"] in (32, 64, 128, 256)
    extract_to_npz(bb, str(tmp_path / "f.npz"), data=f"synth:{synth_root}", height=64, width=32, flip=True,
                   backend="torch", last_stride=1, progress=False, workers=0)
    z = np.load(str(tmp_path / "f.npz"))
    ref = score_features(z["query_features"], z["gallery_features"], z["query_pids"], z["gallery_pids"],
                         z["query_camids"], z["gallery_camids"], metric="cosine", rerank=rr)
    for mode in ("plain", "rerank"):
        assert res[mode]["mAP"] == pytest.approx(ref[mode]["mAP"], abs=1e-6)
        np.testing.assert_allclose(res[mode]["cmc"], ref[mode]["cmc"], atol=1e-6)
        assert len(res[mode]["cmc"]) == 20


def test_recalibrate_bn_sets_population_statistics_and_restores_the_model(synth_root, tmp_path):
    """Precise BN: every BatchNorm's running statistics become the average of its batch statistics over
    the images (mean, unbiased variance), the weights stay, momenta and train/eval modes are restored."""
    import torch
    from upreid.data.datasets import synth
    from upreid.data.loader import build_loader
    from upreid.evaluation.extract import recalibrate_bn
    from upreid.models.resnet import ResNet
    torch.manual_seed(0)
    net = ResNet(18, last_stride=1, width=8).eval()
    net.layer1[0].bn1.momentum = 0.3
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    recs = synth(synth_root).train[:8]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    n = recalibrate_bn(net, recs, height=64, width=32, mean=mean, std=std, batch_size=4, backend="torch",
                       workers=0, progress=False)
    assert n == sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert not net.training and not any(m.training for m in net.modules())
    assert net.layer1[0].bn1.momentum == 0.3 and net.bn1.momentum == 0.1
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    aug = {"height": 64, "width": 32, "flip_test": False, "mean": mean, "std": std}
    x = torch.cat([b["images"] for b in build_loader("eval", recs, batch_size=4, backend="torch", device="cpu",
                                                      aug=aug, workers=0)])
    with torch.no_grad():
        y = net.conv1(x)                                   # the first BN's input
    torch.testing.assert_close(net.bn1.running_mean, y.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    var = (y[:4].var((0, 2, 3), unbiased=True) + y[4:].var((0, 2, 3), unbiased=True)) / 2
    torch.testing.assert_close(net.bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(net.layer4[1].bn2.running_var, torch.ones_like(net.layer4[1].bn2.running_var))
    with pytest.raises(ValueError, match="no images"):
        recalibrate_bn(net, [], height=64, width=32, mean=mean, std=std)
    # a bad image midway: the error names it, and the statistics of before are put back
    from upreid.data.imageio import BadImageError
    from upreid.data.records import Record
    from upreid.data.testing import corrupt_files
    bad = next(iter(corrupt_files(str(tmp_path)).values()))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(BadImageError, match=bad.replace(".", r"\.")):
        recalibrate_bn(net, recs[:4] + [Record(bad, 0, 0)], height=64, width=32, mean=mean, std=std, batch_size=4,
                       backend="torch", workers=0, progress=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net.bn1.momentum == 0.1 and not net.training
