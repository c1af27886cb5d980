"""ONNX export of the fine-tuned feature extractor, checked with onnxruntime on synthetic images."""
import os

import numpy as np
import pytest
import torch

from upreid.engine import checkpoint as ckpt_io
from upreid.engine.finetune import build_model
from upreid.engine.config import load_config
from upreid.export.cli import main as export_main
from upreid.export.onnx import export_onnx, onnx_features, read_metadata, sample_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "finetune", "tiny_cpu.yaml")


def finetune_checkpoint(path, *overrides):
    """A fine-tuning checkpoint of an untrained tiny BoT (BN statistics moved off their init)."""
    cfg = load_config("finetune", TINY, ["data.root=unused", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt_io.save_atomic({"format": "upreid-finetune", "version": ckpt_io.VERSION, "step": 3, "config": cfg.to_dict(),
                         "num_classes": 7, "model": model.state_dict()}, path)
    return model.eval(), cfg


@pytest.mark.slow
def test_onnx_round_trip_matches_pytorch_with_dynamic_batch(tmp_path, capsys, caplog):
    import logging
    ckpt, out = str(tmp_path / "ft.pt"), str(tmp_path / "reid.onnx")
    model, cfg = finetune_checkpoint(ckpt)
    caplog.set_level(logging.INFO)
    assert export_main(["export-onnx", ckpt, out]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    # the exporter's pass-by-pass INFO lines and warnings stay out of the user's terminal
    chatter = [r.name for r in caplog.records if r.name.startswith(("onnx_ir", "onnxscript", "torch.onnx"))]
    assert not chatter, chatter[:5]
    d = cfg["data"]
    meta = read_metadata(out)
    assert meta == {"height": d["height"], "width": d["width"], "mean": list(d["mean"]), "std": list(d["std"]),
                    "feat_dim": 512, "source_format": "upreid-finetune", "flip_test": d["flip_test"], "camera_bn": False}
    import onnxruntime as ort
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, d["height"], d["width"]]
    for n in (1, 5):                                     # batch sizes other than the export example's
        images = sample_images(n, d["height"], d["width"], d["mean"], d["std"], seed=10 + n)
        with torch.no_grad():
            want = model(images).numpy()
        got = onnx_features(out, images.numpy())
        assert got.shape == (n, 512)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # an existing file is not replaced without --overwrite
    assert export_main(["export-onnx", ckpt, out]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # an opset the exporter cannot produce is refused, not silently replaced by its own
    other = str(tmp_path / "o11.onnx")
    assert export_main(["export-onnx", ckpt, other, "--opset", "11"]) == 2
    assert "asked for opset 11, but the exporter wrote opset" in capsys.readouterr().err
    assert not os.path.exists(other) and not os.path.exists(other + ".tmp.onnx")


def test_a_camera_bn_run_is_exported_with_its_flag_and_a_warning(tmp_path, caplog):
    import logging
    ckpt, out = str(tmp_path / "ft.pt"), str(tmp_path / "reid.onnx")
    finetune_checkpoint(ckpt, "eval.camera_bn=true")
    with caplog.at_level(logging.WARNING, logger="upreid.export"):
        export_onnx(ckpt, out)
    assert read_metadata(out)["camera_bn"] is True
    assert "evaluated with camera-based BN" in caplog.text


def test_bad_input_is_named(tmp_path, capsys):
    absent = str(tmp_path / "absent.pt")
    assert export_main(["export-onnx", absent, str(tmp_path / "x.onnx")]) == 2
    assert "absent.pt' does not exist" in capsys.readouterr().err
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="not a ResNet checkpoint"):
        export_onnx(str(tmp_path / "other.pth"), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="'check_batch' must be >= 1, got 0"):
        export_onnx(absent, str(tmp_path / "x.onnx"), check_batch=0)
    with pytest.raises(ValueError, match="'height' must be at least 1 pixel"):
        export_onnx(absent, str(tmp_path / "x.onnx"), height=0)
    assert not os.path.exists(tmp_path / "x.onnx")
    assert export_main(["export-onnx", absent, str(tmp_path / "missing" / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "OUT.onnx" in err and "does not exist" in err and "Traceback" not in err
