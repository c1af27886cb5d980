"""optim.trunk_lr_mult: the initialised layers learn at a fraction of the lr, the new heads at the lr;
the optimizer's groups, a fine-tuning that freezes the trunk at 0, and what resume accepts."""
import os

import pytest
import torch

from conftest import CONFIGS, FINETUNE_TINY
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.config import ConfigError, load_config
from upreid.engine.finetune import finetune
from upreid.engine.resume import check_resume
from upreid.engine.trainer import param_groups
from upreid.models.reid import MGN, BoT
from upreid.models.resnet import ResNet


def _groups_by_name(model, mult):
    groups = param_groups(model, 5e-4, mult, model.NEW_LAYERS)
    where = {id(p): g for g in groups for p in g["params"]}
    return groups, {n: where[id(p)] for n, p in model.named_parameters() if p.requires_grad}, where


@pytest.mark.parametrize("arch", ["bot", "mgn"])
def test_groups_split_the_initialised_layers_from_the_new_heads(arch):
    model = (BoT(10, depth=18, width=16) if arch == "bot" else MGN(10, depth=18, width=16, dim=32))
    params = [p for p in model.parameters() if p.requires_grad]
    plain = param_groups(model, 5e-4)
    assert len(plain) == 2 and all(g["lr_mult"] == 1.0 for g in plain)
    groups, by_name, where = _groups_by_name(model, 0.1)
    assert len(groups) == 4 and len(where) == len(params) == sum(len(g["params"]) for g in groups)  # each once
    heads = [n for n in by_name if not n.startswith(("trunk.", "p1.", "p2.", "p3."))]   # what no init provides
    expected = {"bot": {"neck.bn.weight", "classifier.weight"},
                "mgn": {"reduce.0.conv.weight", "reduce.7.bn.bias", "classifiers.7.weight"}}[arch]
    assert expected <= set(heads) and len(heads) < len(by_name)
    for name, g in by_name.items():
        assert g["lr_mult"] == (1.0 if name in heads else 0.1), name
        p = dict(model.named_parameters())[name]
        assert g["weight_decay"] == (5e-4 if p.ndim > 1 else 0.0), name
    assert any(n.startswith("trunk.") for n in by_name) and all(
        by_name[n]["lr_mult"] == 0.1 for n in by_name if n.startswith(("trunk.", "p1.", "p2.", "p3.")))


@pytest.mark.slow
def test_a_zero_multiplier_keeps_the_initialised_weights(synth_root, tmp_path, finetune_cfg):
    torch.manual_seed(3)
    trunk = ResNet(18, last_stride=1, width=16)
    init = str(tmp_path / "trunk.pt")
    ckpt_io.save_backbone(init, trunk.state_dict(), depth=18, width=16, last_stride=1)
    finetune(finetune_cfg(synth_root, str(tmp_path / "ft"), f"init={init}", "optim.trunk_lr_mult=0",
                          "eval.rerank=false"))
    saved = ckpt_io.load(os.path.join(tmp_path, "ft", "checkpoint.pt"), expect="upreid-finetune")
    ft = saved["model"]
    start = trunk.state_dict()
    weights = [k for k in start if k.endswith("weight") or k.endswith("bias")]
    assert weights and all(torch.equal(ft[f"trunk.{k}"], start[k]) for k in weights)
    assert not torch.equal(ft["trunk.bn1.running_mean"], start["bn1.running_mean"])   # BN statistics still follow
    lr = [g["lr"] for g in saved["optimizer"]["param_groups"]]
    assert lr[0] == lr[1] == 0.0 and lr[2] == lr[3] > 0                              # the heads learned


def test_resume_accepts_another_fraction_but_not_another_layout():
    tiny = os.path.join(CONFIGS, "finetune", "tiny_cpu.yaml")

    def state(*o):
        return {"config": load_config("finetune", tiny, ["data.root=/x", *o]).to_dict()}
    now = load_config("finetune", tiny, ["data.root=/x", "optim.trunk_lr_mult=0.2"])
    assert check_resume("finetune", state("optim.trunk_lr_mult=0.1"), now, "ck.pt") == [
        "optim.trunk_lr_mult: checkpoint 0.1, config 0.2"]
    with pytest.raises(ckpt_io.CheckpointError, match="another optimizer layout: optim.trunk_lr_mult: checkpoint 1.0"):
        check_resume("finetune", state(), now, "ck.pt")
    old = state()                                   # a checkpoint from before the setting existed: taken as 1
    del old["config"]["optim"]["trunk_lr_mult"]
    assert check_resume("finetune", old, load_config("finetune", tiny, ["data.root=/x"]), "ck.pt") == []
    with pytest.raises(ConfigError, match="optim.trunk_lr_mult"):
        load_config("finetune", FINETUNE_TINY, ["data.root=/x", "optim.trunk_lr_mult=-1"])


def test_heads_that_cannot_be_found_are_refused():
    model = BoT(10, depth=18, width=16)
    with pytest.raises(ValueError, match=r"has no layers named \['nek'\]"):
        param_groups(model, 5e-4, 0.1, ("nek", "classifier"))
    with pytest.raises(ValueError, match="names no new layer with trainable parameters"):
        param_groups(model, 5e-4, 0.1, ())
    assert len(param_groups(model, 5e-4, 1.0, ())) == 2          # at 1 nothing needs telling apart
    plain = BoT(10, depth=18, width=16, neck=False)                # no BNNeck: the classifier is the head
    groups, by_name, _ = _groups_by_name(plain, 0.1)
    assert by_name["classifier.weight"]["lr_mult"] == 1.0 and len(groups) == 4
