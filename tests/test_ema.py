"""The weight average of fine-tuning (``optim.ema_decay``): its arithmetic, and that the run evaluates,
saves and exports the average while a resumed run continues from the last weights."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from upreid.engine import checkpoint as ckpt_io
from upreid.engine.ema import WeightEMA, evaluated_state
from upreid.engine.finetune import finetune


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def test_the_average_follows_its_formula_and_copies_integer_buffers():
    m = small_model()
    ema = WeightEMA(0.75)
    ema.update(m)                                   # the first update copies
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
        m[1].running_mean.fill_(2.0)
        m[1].num_batches_tracked.fill_(7)
    ema.update(m)
    w1 = m.state_dict()
    for k, v in ema.state.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * w0[k] + 0.25 * w1[k])
        else:
            assert torch.equal(v, w1[k]) and int(v) == 7     # counters are copied, not averaged
    assert ema.updates == 2
    assert not torch.equal(ema.state["0.weight"], w1["0.weight"])     # a copy, not the live tensors


def test_applied_swaps_the_average_in_and_restores_the_weights_even_on_error():
    m = small_model()
    ema = WeightEMA(0.5)
    with ema.applied(m) as same:                    # before any update: nothing to apply
        assert same is m
    ema.update(m)
    with torch.no_grad():
        m[0].weight.add_(3.0)
    ema.update(m)
    own = m[0].weight.detach().clone()
    with ema.applied(m):
        torch.testing.assert_close(m[0].weight, own - 1.5)
    assert torch.equal(m[0].weight, own)
    with pytest.raises(KeyError):
        with ema.applied(m):
            raise KeyError("boom")
    assert torch.equal(m[0].weight, own)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="ema decay must be in \\(0, 1\\)"):
        WeightEMA(decay)


def test_the_config_refuses_a_decay_of_one():
    from upreid.engine.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        load_config("finetune", None, ["optim.ema_decay=1"])
    assert load_config("finetune", None, []).optim.ema_decay == 0.0      # off by default


def test_a_saved_average_continues_and_a_changed_model_is_refused():
    m = small_model()
    a = WeightEMA(0.9)
    a.update(m)
    b = WeightEMA(0.9)
    b.load_state_dict({k: (v if k != "state" else {n: t.clone() for n, t in v.items()})
                       for k, v in a.state_dict().items()})
    for e in (a, b):
        e.update(m)
    assert b.updates == a.updates == 2
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])
    with pytest.raises(RuntimeError, match="changed its entries"):
        a.update(nn.Linear(2, 2))


def test_evaluated_state_prefers_the_average():
    assert evaluated_state({"model": {"w": 1}}) == {"w": 1}
    assert evaluated_state({"model": {"w": 1}, "ema": {"state": {"w": 2}}}) == {"w": 2}


def test_the_run_evaluates_and_exports_the_average(synth_root, tmp_path, finetune_cfg):
    """results.json holds the metrics of the averaged weights (recomputed here from the checkpoint's
    "ema" entry), the last weights stay in "model", and upreid extract reads the average."""
    from upreid.evaluation.extract import extract_to_npz
    from upreid.evaluation.feature_model import load_feature_model
    out = tmp_path / "run"
    s = finetune(finetune_cfg(synth_root, str(out), "optim.ema_decay=0.5", "eval.rerank=false",
                              "eval.ranklist_queries=0", "data.flip_test=false"))
    ck = ckpt_io.load(str(out / "checkpoint.pt"), expect="upreid-finetune")
    assert ck["ema"]["updates"] == s["step"] == 4 and ck["ema"]["decay"] == 0.5
    differs = [k for k in ck["model"] if ck["model"][k].is_floating_point()
               and not torch.equal(ck["model"][k], ck["ema"]["state"][k])]
    assert differs                                   # the average is not the last weights
    model, info = load_feature_model(str(out / "checkpoint.pt"))
    assert info["ema"] is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["ema"]["state"][k]), k
    npz = str(tmp_path / "f.npz")
    extract_to_npz(str(out / "checkpoint.pt"), npz, backend="torch", progress=False)
    from upreid.evaluation import evaluate
    with np.load(npz) as z:
        res = evaluate(*(torch.as_tensor(z[k]) for k in ("query_features", "gallery_features", "query_pids",
                                                          "gallery_pids", "query_camids", "gallery_camids")),
                       metric="cosine", progress=False)
    saved = json.load(open(out / "results.json"))["final"]["plain"]
    assert res["mAP"] == pytest.approx(saved["mAP"], abs=1e-6)
    # the last weights score otherwise: what was evaluated is the average
    model.load_state_dict(ck["model"])
    recs = None
    from upreid.evaluation.extract import extract_features, split_rows
    from upreid.data.datasets import synth
    ds = synth(synth_root)
    recs = list(ds.query) + list(ds.gallery)
    (fq, qp, qc, _), (fg, gp, gc, _) = split_rows(
        extract_features(model, recs, height=info["height"], width=info["width"], mean=info["mean"],
                         std=info["std"], backend="torch", workers=0, progress=False, return_index=True),
        len(ds.query))
    raw = evaluate(fq, fg, qp, gp, qc, gc, metric="cosine", progress=False)
    assert raw["mAP"] != pytest.approx(saved["mAP"], abs=1e-9)
