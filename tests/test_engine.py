"""Engine: config files and overrides, bad input (missing data, unknown keys, foreign or corrupt
checkpoints, an existing run), non-finite loss handling, backbone export."""
import os

import numpy as np
import pytest
import torch
import yaml

from upreid.data import DatasetError
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.cli import main as cli_main
from upreid.engine.config import DEFAULTS, ConfigError, load_config
from upreid.engine.pretrain import NonFiniteLossError, RunExistsError, export_backbone, load_backbone, pretrain

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain")
TINY = os.path.join(CONFIGS, "tiny_cpu.yaml")
FAST = ["model.hidden_dim=64", "model.dim=32", "model.patch_dim=32", "model.queue_size=16",
        "data.batch_size=4", "train.progress=false", "train.log_every=1"]


def write_images(folder, n=16, seed=0):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48 + i % 3 * 8, 24, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"img{i:03d}.jpg"))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")))


def cfg_for(images, out, *extra):
    return load_config(TINY, [f"data.root={images}", f"train.output={out}", *FAST, *extra])


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A finished 2-step run (its checkpoint is the input of several tests; they must not change it)."""
    out = str(tmp_path_factory.mktemp("run"))
    summary = pretrain(cfg_for(images, out, "train.steps=2"))
    return out, summary


def digest(path):
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------ config
def test_base_yaml_is_the_schema():
    with open(os.path.join(CONFIGS, "base.yaml")) as f:
        assert yaml.safe_load(f) == DEFAULTS


def test_config_inheritance_and_overrides(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "upreid_r50.yaml"), ["optim.lr=0.05", "model.gc=cosine"])
    assert cfg["model"]["depth"] == 50 and cfg["data"]["batch_size"] == 256 and cfg["optim"]["lr"] == 0.05
    assert cfg["model"]["gc"] == "cosine" and cfg["model"]["queue_size"] == 65536   # from base.yaml
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {os.path.abspath(TINY)}\nmodel:\n  stripes: 2\n")
    cfg = load_config(str(child))
    assert cfg["model"]["stripes"] == 2 and cfg["model"]["depth"] == 18


@pytest.mark.parametrize("override,message", [
    ("model.detph=18", "did you mean 'model.depth'"),
    ("model.lr=0.1", "did you mean 'optim.lr'"),
    ("model.gc=kl", "must be one of"),
    ("model.stripes=many", "expected a int"),
    ("depth", "must look like key=value"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_unknown_key_in_file_and_cli(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate.*bad.yaml"):
        load_config(str(bad))
    assert cli_main(["pretrain", "--config", TINY, "train.stpes=3", f"train.output={tmp_path}/o"]) == 1
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


# -------------------------------------------------------------------------------------- bad input
def test_missing_data_root(tmp_path):
    with pytest.raises(DatasetError, match="data.root is not set"):
        pretrain(load_config(TINY, [f"train.output={tmp_path}/a", *FAST]))
    with pytest.raises(DatasetError, match="does not exist"):
        pretrain(load_config(TINY, [f"data.root={tmp_path}/nothing", f"train.output={tmp_path}/b", *FAST]))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_checkpoint_of_another_model_is_refused(trained, images):
    out, _ = trained
    path = os.path.join(out, "checkpoint.pt")
    before = digest(path)
    with pytest.raises(ckpt_io.CheckpointError, match="another model: model.depth: checkpoint 18, config 34"):
        pretrain(cfg_for(images, out, "model.depth=34", "train.steps=4"), resume="auto")
    with pytest.raises(ckpt_io.CheckpointError, match="another model.*model.ic"):
        pretrain(cfg_for(images, out, "model.ic=off", "train.steps=4"), resume="auto")
    assert digest(path) == before


def test_corrupt_and_foreign_checkpoints(trained, images, tmp_path):
    out, _ = trained
    good = digest(os.path.join(out, "checkpoint.pt"))
    run = tmp_path / "run"
    run.mkdir()
    corrupt = run / "checkpoint.pt"
    corrupt.write_bytes(good[: len(good) // 2])                    # a truncated write
    with pytest.raises(ckpt_io.CheckpointError, match="cannot be read"):
        pretrain(cfg_for(images, str(run), "train.steps=4"), resume="auto")
    assert corrupt.read_bytes() == good[: len(good) // 2]
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ckpt_io.CheckpointError, match="not an upreid-pretrain checkpoint"):
        pretrain(cfg_for(images, str(run), "train.steps=4"), resume=str(foreign))
    assert cli_main(["export-backbone", str(corrupt), str(tmp_path / "bb.pt")]) == 1
    assert not (tmp_path / "bb.pt").exists()


def test_existing_run_is_not_overwritten(trained, images):
    out, _ = trained
    before = digest(os.path.join(out, "checkpoint.pt"))
    with pytest.raises(RunExistsError, match="--resume"):
        pretrain(cfg_for(images, out, "train.steps=2"))
    assert digest(os.path.join(out, "checkpoint.pt")) == before


def test_non_finite_loss_stops_and_keeps_last_checkpoint(trained, images, tmp_path):
    out, _ = trained
    run = tmp_path / "nan"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(digest(os.path.join(out, "checkpoint.pt")))
    before = (run / "checkpoint.pt").read_bytes()
    # std 0 turns every normalised pixel into inf: the loss of step 3 is NaN
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*step 2\) is kept"):
        pretrain(cfg_for(images, str(run), "train.steps=4", "data.std=[0, 0, 0]"), resume="auto")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert ckpt_io.load(str(run / "checkpoint.pt"))["step"] == 2


# ---------------------------------------------------------------------------------------- outputs
def test_run_outputs_and_export(trained, tmp_path):
    out, summary = trained
    assert summary["step"] == 2 and not summary["interrupted"]
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2 and '"loss_ic"' in lines[0] and '"samples_per_s"' in lines[0]
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["train"]["steps"] == 2
    ckpt = ckpt_io.load(os.path.join(out, "checkpoint.pt"))
    bb = str(tmp_path / "backbone.pt")
    assert cli_main(["export-backbone", os.path.join(out, "checkpoint.pt"), bb]) == 0
    net = load_backbone(bb)
    trunk = {k[len("encoder_q.trunk."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder_q.trunk.")}
    assert net.state_dict().keys() == trunk.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trunk.items())
    assert net.last_stride == 1 and net.depth == 18
    with pytest.raises(RunExistsError):
        export_backbone(os.path.join(out, "checkpoint.pt"), bb)
