"""The four external checkpoint layouts (LUPerson MoCo v2, fast-reid, torchreid, torchvision): each is
recognised, named in the log and loads into the fine-tuning trunk; anything else is refused with the
formats tried and the first keys found."""
import pytest
import torch

from upreid.engine.checkpoint import CheckpointError
from upreid.engine.init_weights import load_trunk
from upreid.models import ResNet
from upreid.models.checkpoint_formats import CheckpointFormatError, convert


@pytest.fixture(scope="module")
def trunk_state():
    torch.manual_seed(1)
    net = ResNet(18, ibn=True)
    for p in net.parameters():      # distinguishable from any fresh init
        p.data.uniform_(-1, 1)
    return net.state_dict()


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def luperson_moco(state):
    """What main_moco.py saves: the DDP-wrapped MoCo module (query and key encoders with their MLP
    heads, the queue) under state_dict, beside epoch / arch / optimizer."""
    sd = prefixed(state, "module.encoder_q.")
    sd.update(prefixed(state, "module.encoder_k."))
    for enc in ("encoder_q", "encoder_k"):
        sd.update({f"module.{enc}.fc.0.weight": torch.zeros(512, 512), f"module.{enc}.fc.0.bias": torch.zeros(512),
                   f"module.{enc}.fc.2.weight": torch.zeros(128, 512), f"module.{enc}.fc.2.bias": torch.zeros(128)})
    sd.update({"module.queue": torch.zeros(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def fastreid_final(state):
    """fast-reid's model_final.pth: the meta-architecture's state dict (pixel mean / std buffers,
    backbone.*, heads.*) under model, beside the optimizer, scheduler and iteration."""
    sd = {"pixel_mean": torch.zeros(1, 3, 1, 1), "pixel_std": torch.ones(1, 3, 1, 1)}
    sd.update(prefixed(state, "backbone."))
    sd.update({"heads.pool_layer.p": torch.tensor([3.0]), "heads.bottleneck.0.weight": torch.ones(512),
               "heads.bottleneck.0.bias": torch.zeros(512), "heads.bottleneck.0.running_mean": torch.zeros(512),
               "heads.bottleneck.0.running_var": torch.ones(512),
               "heads.bottleneck.0.num_batches_tracked": torch.tensor(0), "heads.weight": torch.zeros(751, 512)})
    return {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 3},
            "iteration": 1234}


def torchreid_ckpt(state, module=True):
    """torchreid's save_checkpoint: state_dict (DataParallel-prefixed when trained on several GPUs,
    with the classifier) beside epoch, rank1 and the optimizer."""
    sd = {**state, "classifier.weight": torch.zeros(751, 512), "classifier.bias": torch.zeros(751)}
    return {"state_dict": prefixed(sd, "module.") if module else sd, "epoch": 60, "rank1": 0.873,
            "optimizer": {"state": {}, "param_groups": []}}


def torchvision_file(state):
    return {**state, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}


CASES = {
    "moco": luperson_moco,
    "fastreid": fastreid_final,
    "torchreid": torchreid_ckpt,
    "torchvision": torchvision_file,
}


@pytest.mark.parametrize("name", CASES)
def test_each_format_is_recognised_and_converted(name, trunk_state):
    fmt, state = convert(CASES[name](trunk_state), "f.pth")
    assert fmt == name
    assert set(state) == set(trunk_state)
    assert all(torch.equal(state[k], v) for k, v in trunk_state.items())


@pytest.mark.parametrize("name", CASES)
def test_each_format_loads_into_the_trunk_and_is_logged(name, trunk_state, tmp_path, caplog):
    path = str(tmp_path / f"{name}.pth")
    torch.save(CASES[name](trunk_state), path)
    trunk = ResNet(18, last_stride=1, ibn=True)
    with caplog.at_level("INFO"):
        rep = load_trunk(trunk, path)
    assert rep["format"] == name and rep["missing"] == [] and rep["unexpected"] == []
    assert rep["loaded"] == len(trunk_state)
    own = trunk.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trunk_state.items())
    assert f"recognised as a {name} checkpoint" in caplog.text


def test_torchreid_without_module_prefix_and_bare_with_classifier(trunk_state):
    assert convert(torchreid_ckpt(trunk_state, module=False), "f")[0] == "torchreid"
    fmt, state = convert({**trunk_state, "classifier.weight": torch.zeros(3, 512)}, "f")
    assert fmt == "torchreid" and "classifier.weight" not in state


def test_fastreid_checkpoint_of_another_depth_is_refused(tmp_path):
    path = str(tmp_path / "r34.pth")
    torch.save(fastreid_final(ResNet(34).state_dict()), path)
    with pytest.raises(CheckpointError, match=r"\(fastreid\) holds another architecture: depth: file 34"):
        load_trunk(ResNet(18), path)


def test_unknown_layout_lists_the_formats_tried_and_the_first_keys(tmp_path):
    obj = {"model": {"encoder.weight": torch.zeros(2)}, "iteration": 3}
    with pytest.raises(CheckpointFormatError) as e:
        convert(obj, "x.pth")
    msg = str(e.value)
    assert "'x.pth': not a ResNet checkpoint" in msg
    for name in CASES:
        assert f"{name} (" in msg
    assert "['model', 'iteration', 'model.encoder.weight']" in msg
    path = str(tmp_path / "tensor.pth")
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=r"tried: upreid-pretrain, upreid-backbone, upreid-finetune.*Found a Tensor"):
        load_trunk(ResNet(18), path)


def test_heads_without_a_backbone_are_not_mistaken_for_a_trunk():
    with pytest.raises(CheckpointFormatError, match="fastreid"):
        convert({"model": {"backbone.head.weight": torch.zeros(2), "heads.weight": torch.zeros(2)}}, "h.pth")
