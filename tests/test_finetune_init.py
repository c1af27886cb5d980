"""Initialising a fine-tuning trunk from every supported file format, and refusing the wrong ones."""
import pytest
import torch

from upreid.engine import checkpoint as ckpt_io
from upreid.engine.checkpoint import CheckpointError
from upreid.engine.init_weights import infer_arch, load_trunk
from upreid.engine.pretrain import export_backbone
from upreid.models import ResNet, UPReID
from upreid.models.reid import MGN


def _same(trunk: ResNet, ref: dict):
    own = trunk.state_dict()
    for k, v in ref.items():
        assert torch.equal(own[k], v), k


@pytest.fixture
def source():
    torch.manual_seed(1)
    net = ResNet(18)
    for p in net.parameters():      # distinguishable from any fresh init
        p.data.uniform_(-1, 1)
    return net.state_dict()


def test_torchvision_file_with_fc(tmp_path, source):
    path = str(tmp_path / "tv.pth")
    torch.save({**source, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    trunk = ResNet(18, last_stride=1)
    rep = load_trunk(trunk, path)
    assert rep["format"] == "torchvision" and rep["missing"] == [] and rep["unexpected"] == []
    assert rep["loaded"] == len(source)
    _same(trunk, source)


def test_torchvision_under_state_dict_with_module_prefix(tmp_path, source):
    path = str(tmp_path / "ddp.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in source.items()}}, path)
    trunk = ResNet(18)
    assert load_trunk(trunk, path)["format"] == "torchvision"
    _same(trunk, source)


def test_moco_checkpoint(tmp_path, source):
    sd = {"module.encoder_q." + k: v for k, v in source.items()}
    sd.update({"module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.encoder_q.fc.2.weight": torch.zeros(128, 512),
               "module.encoder_k.conv1.weight": torch.zeros(64, 3, 7, 7), "module.queue": torch.zeros(128, 16)})
    path = str(tmp_path / "moco.pth.tar")
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    trunk = ResNet(18)
    rep = load_trunk(trunk, path)
    assert rep["format"] == "moco" and rep["unexpected"] == [] and rep["missing"] == []
    _same(trunk, source)


def _pretrain_ckpt(tmp_path):
    torch.manual_seed(2)
    m = {"depth": 18, "last_stride": 2, "ibn": False, "dim": 16, "hidden_dim": 32, "patch_dim": 16,
         "queue_size": 8}
    model = UPReID(**m)
    path = str(tmp_path / "pre.pt")
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": 7, "config": {"model": m},
                         "model": model.state_dict()}, path)
    ref = {k[len("encoder_q.trunk."):]: v for k, v in model.state_dict().items() if k.startswith("encoder_q.trunk.")}
    return path, ref


def test_upreid_pretrain_checkpoint_and_exported_backbone(tmp_path):
    path, ref = _pretrain_ckpt(tmp_path)
    trunk = ResNet(18, last_stride=1)          # fine-tuning changes the stride, not the weights
    rep = load_trunk(trunk, path)
    assert rep["format"] == "upreid-pretrain" and rep["step"] == 7 and rep["loaded"] == len(ref)
    _same(trunk, ref)
    bb = str(tmp_path / "bb.pt")
    export_backbone(path, bb)
    trunk2 = ResNet(18, last_stride=1)
    rep2 = load_trunk(trunk2, bb)
    assert rep2["format"] == "upreid-backbone" and rep2["missing"] == []
    _same(trunk2, ref)


def test_mgn_branches_get_the_loaded_weights(tmp_path, source):
    path = str(tmp_path / "tv.pth")
    torch.save(source, path)
    from upreid.engine.finetune import initialise
    model = MGN(num_classes=5, depth=18, dim=16)
    initialise(model, path)
    for branch in (model.p1, model.p2, model.p3):
        assert torch.equal(branch[1][0].conv1.weight, source["layer4.0.conv1.weight"])
        assert torch.equal(branch[0][0].conv2.weight, source["layer3.1.conv2.weight"])
    assert model.p1[1][0].conv1.stride == (2, 2) and model.p2[1][0].conv1.stride == (1, 1)


def test_missing_and_unexpected_keys_are_reported(tmp_path, source):
    sd = dict(source)
    sd.pop("layer4.1.bn2.running_var")
    sd["layer4.1.extra.weight"] = torch.zeros(3)
    path = str(tmp_path / "partial.pth")
    torch.save(sd, path)
    rep = load_trunk(ResNet(18), path)
    assert rep["missing"] == ["layer4.1.bn2.running_var"]
    assert rep["unexpected"] == ["layer4.1.extra.weight"]


@pytest.mark.parametrize("layers", [["stem", "layer1", "layer2"], ["layer4"], ["stem"]])
def test_init_layers_take_only_the_parts_named(tmp_path, source, layers):
    """init_layers: the named parts come from the file, every other part keeps the trunk's own
    (seeded random) initialisation, and the report names the parts left random, not as missing."""
    from upreid.engine.init_weights import trunk_part
    path = str(tmp_path / "tv.pth")
    torch.save(source, path)
    torch.manual_seed(7)
    trunk = ResNet(18)
    fresh = {k: v.clone() for k, v in trunk.state_dict().items()}
    rep = load_trunk(trunk, path, layers)
    own = trunk.state_dict()
    for k in source:
        want = source[k] if trunk_part(k) in layers else fresh[k]
        assert torch.equal(own[k], want), k
    assert rep["missing"] == [] and rep["loaded"] == sum(trunk_part(k) in layers for k in source)
    assert rep["random_layers"] == [p for p in ("stem", "layer1", "layer2", "layer3", "layer4") if p not in layers]
    assert "random_layers" not in load_trunk(ResNet(18), path)


@pytest.mark.parametrize("layers", [["layer5"], [], ["stem", "stem"], "layer1"])
def test_load_trunk_refuses_init_layers_the_config_would_refuse(tmp_path, source, layers):
    path = str(tmp_path / "tv.pth")
    torch.save(source, path)
    with pytest.raises(ValueError, match=r"init_layers=.* \(from load_trunk\): must be a non-empty list of "
                                         r"distinct parts from \['stem', 'layer1', 'layer2', 'layer3', 'layer4'\]"):
        load_trunk(ResNet(18), path, layers)


def test_init_layers_still_refuse_another_architecture(tmp_path, source):
    path = str(tmp_path / "tv.pth")
    torch.save(source, path)
    with pytest.raises(CheckpointError, match="depth: file 18, config model.depth=34"):
        load_trunk(ResNet(34), path, ["stem"])


def test_mgn_branches_follow_init_layers(tmp_path, source):
    """Parts left random reach MGN's branches as the trunk's random weights, not the file's."""
    path = str(tmp_path / "tv.pth")
    torch.save(source, path)
    from upreid.engine.finetune import initialise
    model = MGN(num_classes=5, depth=18, dim=16)
    rep = initialise(model, path, ["stem", "layer1", "layer2"])
    assert rep["random_layers"] == ["layer3", "layer4"]
    assert torch.equal(model.trunk.layer2[0].conv1.weight, source["layer2.0.conv1.weight"])
    for branch in (model.p1, model.p2, model.p3):
        assert not torch.equal(branch[1][0].conv1.weight, source["layer4.0.conv1.weight"])
        assert torch.equal(branch[1][0].conv1.weight, model.trunk.layer4[0].conv1.weight)


def test_wrong_depth_is_refused(tmp_path):
    path = str(tmp_path / "r34.pth")
    torch.save(ResNet(34).state_dict(), path)
    assert infer_arch(torch.load(path))["depth"] == 34
    with pytest.raises(CheckpointError, match=r"another architecture: depth: file 34, config model.depth=18"):
        load_trunk(ResNet(18), path)


def test_wrong_normalisation_is_refused(tmp_path):
    path = str(tmp_path / "ibn.pth")
    torch.save(ResNet(18, ibn=True).state_dict(), path)
    with pytest.raises(CheckpointError, match="ibn: file True"):
        load_trunk(ResNet(18), path)


def test_not_a_resnet_and_not_a_file(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="not a ResNet"):
        load_trunk(ResNet(18), path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read: it is not a PyTorch file"):
        load_trunk(ResNet(18), str(junk))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trunk(ResNet(18), str(tmp_path / "absent.pth"))



class _NotAWeight:
    pass


def test_a_file_of_python_objects_is_refused_without_advice_to_unpickle_it(tmp_path):
    """torch's refusal advises weights_only=False (running the file's code); the message keeps only the
    specific cause and says what to do instead. A text file is named as not a PyTorch file at all."""
    path = str(tmp_path / "objects.pth")
    torch.save({"state_dict": ResNet(18).state_dict(), "extra": _NotAWeight()}, path)
    with pytest.raises(CheckpointError) as e:
        load_trunk(ResNet(18), path)
    text = str(e.value)
    assert "holds Python objects" in text and "_NotAWeight" in text and "weights_only" not in text
    for name, data in (("hello.pth", b"hello\n"), ("random.pth", bytes(range(256)) * 4)):
        (tmp_path / name).write_bytes(data)                 # the legacy unpickler's KeyError / IndexError
        with pytest.raises(CheckpointError, match="cannot be read"):
            load_trunk(ResNet(18), str(tmp_path / name))
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text("model:\n  depth: 18\n")
    with pytest.raises(CheckpointError, match="not a PyTorch file") as e:
        load_trunk(ResNet(18), str(yaml_file))
    assert "weights_only" not in str(e.value)
