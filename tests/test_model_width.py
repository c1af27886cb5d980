"""`model.width`: a narrower ResNet of the same structure, carried through config, export and init."""
import pytest
import torch

from upreid.engine.checkpoint import CheckpointError
from upreid.engine.config import ConfigError, load_config
from upreid.engine.init_weights import infer_arch, load_trunk
from upreid.models import ResNet, UPReID
from upreid.models.reid import reid_model_from_config


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_width_is_a_checked_setting_of_both_tasks(task):
    assert load_config(task, None, [])["model"]["width"] == 64          # the published ResNet by default
    assert load_config(task, None, ["model.width=32"])["model"]["width"] == 32
    with pytest.raises(ConfigError, match=r"model.width=33 .*must be even"):
        load_config(task, None, ["model.width=33"])
    with pytest.raises(ConfigError, match="model.width"):
        load_config(task, None, ["model.width=0"])


def test_models_built_from_config_have_the_width():
    pcfg = load_config("pretrain", None, ["model.depth=18", "model.width=16", "model.hidden_dim=32",
                                          "model.queue_size=8"])
    m = UPReID.from_config(pcfg["model"].to_dict() if hasattr(pcfg["model"], "to_dict") else dict(pcfg["model"]))
    assert m.encoder_q.trunk.conv1.out_channels == 16 and m.encoder_q.trunk.out_channels == 128
    fcfg = load_config("finetune", None, ["model.depth=18", "model.width=16"])
    bot = reid_model_from_config(fcfg["model"], num_classes=3)
    assert bot.trunk.width == 16 and bot.feat_dim == 128


def test_width_is_inferred_from_a_file_and_a_mismatch_refused(tmp_path):
    path = str(tmp_path / "narrow.pth")
    src = ResNet(18, width=16)
    torch.save(src.state_dict(), path)
    assert infer_arch(torch.load(path))["width"] == 16
    trunk = ResNet(18, width=16, last_stride=1)
    assert load_trunk(trunk, path)["missing"] == []
    assert torch.equal(trunk.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match=r"width: file 16, config model.width=64"):
        load_trunk(ResNet(18), path)
