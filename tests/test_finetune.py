"""Fine-tuning end to end on a tiny synthetic set: pretrain -> export -> finetune -> evaluate, the
CLI, exact resume after SIGTERM, and a resume against another model refused."""
import json
import os
import signal

import pytest
import torch
from PIL import Image

from upreid.data.synthetic import SynthConfig, generate
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.checkpoint import CheckpointError
from upreid.engine.config import load_config
from upreid.engine.finetune import finetune
from upreid.engine.finetune_config import load_finetune_config
from upreid.engine.pretrain import export_backbone, pretrain
from upreid.engine.ranklist import ranklist_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "finetune", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    generate(root, SynthConfig(ids=16, cameras=3, unlabeled=32, height=64, width=32, distractors=6, junk=2),
             workers=1, progress=False)
    return root


def ft_cfg(root, out, *extra):
    return load_finetune_config(TINY, [f"data.root={root}", f"train.output={out}", "data.p=4", "data.k=4",
                                       "train.epochs=2", "train.max_steps_per_epoch=2", "train.progress=false",
                                       "data.backend=torch", "eval.ranklist_queries=3", *extra])


def test_pretrain_export_finetune_evaluate(synth_root, tmp_path):
    pcfg = load_config(os.path.join(ROOT, "configs", "pretrain", "tiny_cpu.yaml"),
                       [f"data.root={synth_root}/unlabeled", f"train.output={tmp_path}/pre", "train.steps=2",
                        "train.progress=false", "data.backend=torch", "model.queue_size=16"])
    pre = pretrain(pcfg)
    bb = str(tmp_path / "backbone.pt")
    info = export_backbone(pre["checkpoint"], bb)

    out = str(tmp_path / "ft")
    s = finetune(ft_cfg(synth_root, out, f"init={bb}"))
    assert s["step"] == 4 and s["epoch"] == 2 and not s["interrupted"]
    assert s["init"]["format"] == "upreid-backbone" and s["init"]["loaded"] == info["tensors"]
    assert s["init"]["missing"] == [] and s["init"]["unexpected"] == []
    for mode in ("plain", "rerank"):
        r = s["results"][mode]
        assert 0.0 < r["mAP"] <= 1.0 and 0.0 <= r["Rank-1"] <= r["Rank-5"] <= r["Rank-10"] <= 1.0
        assert r["num_query"] > 0 and r["num_valid_query"] == r["num_query"]
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["final"]["plain"]["mAP"] == pytest.approx(s["results"]["plain"]["mAP"])
    with Image.open(os.path.join(out, "ranklist.png")) as im:
        assert im.size == ranklist_size(3, 10)
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert any("loss_triplet" in x for x in lines) and any("eval/rerank/mAP" in x for x in lines)
    # the fine-tuned trunk started from the exported weights and moved away from them
    ft = ckpt_io.load(os.path.join(out, "checkpoint.pt"), expect="upreid-finetune")
    start = torch.load(bb, weights_only=True)["state_dict"]["layer1.0.conv1.weight"]
    delta = (ft["model"]["trunk.layer1.0.conv1.weight"] - start).abs()
    assert 0 < delta.max() < 0.1 * start.abs().max()


def test_cli_finetune_random_init(synth_root, tmp_path, capsys):
    from upreid.engine.cli_finetune import main
    out = str(tmp_path / "cli")
    rc = main(["finetune", "--config", TINY, f"data.root={synth_root}", f"train.output={out}", "train.epochs=1",
               "train.max_steps_per_epoch=1", "data.p=4", "eval.rerank=false", "train.progress=false"])
    text = capsys.readouterr().out
    assert rc == 0 and "without re-ranking" in text and "with re-ranking" not in text.replace("without", "")
    assert json.load(open(os.path.join(out, "init.json")))["format"] == "random"
    assert main(["finetune", "--config", TINY, f"data.root={synth_root}", f"train.output={out}"]) == 1
    assert "--resume" in capsys.readouterr().err       # an existing run is not overwritten silently


def test_resume_after_sigterm_is_exact(synth_root, tmp_path):
    extra = ("eval.rerank=false", "eval.ranklist_queries=0", "train.max_steps_per_epoch=3")
    full = finetune(ft_cfg(synth_root, str(tmp_path / "full"), *extra))
    assert full["step"] == 6

    def interrupt(step, out):
        if step == 2:                                   # mid-epoch
            signal.raise_signal(signal.SIGTERM)

    part = finetune(ft_cfg(synth_root, str(tmp_path / "split"), *extra), on_step=interrupt)
    assert part["interrupted"] and part["step"] == 2
    mid = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"), expect="upreid-finetune")
    assert (mid["epoch"], mid["batch"]) == (0, 2)
    rest = finetune(ft_cfg(synth_root, str(tmp_path / "split"), *extra), resume="auto")
    assert rest["step"] == 6 and not rest["interrupted"]
    a = ckpt_io.load(str(tmp_path / "full" / "checkpoint.pt"), expect="upreid-finetune")
    b = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"), expect="upreid-finetune")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert rest["results"]["plain"]["mAP"] == pytest.approx(full["results"]["plain"]["mAP"], abs=1e-9)

    with pytest.raises(CheckpointError, match="another model: model.depth"):
        finetune(ft_cfg(synth_root, str(tmp_path / "split"), *extra, "model.depth=34"), resume="auto")
