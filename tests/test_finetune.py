"""Fine-tuning end to end on a tiny synthetic set: pretrain -> export -> finetune -> evaluate, the
CLI, exact resume after SIGTERM, and a resume against another model refused."""
import json
import os
import signal

import pytest
import torch
from PIL import Image

from conftest import FINETUNE_TINY, PRETRAIN_TINY
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.checkpoint import CheckpointError
from upreid.engine.cli import main
from upreid.engine.config import load_config
from upreid.engine.finetune import finetune
from upreid.engine.pretrain import export_backbone, pretrain
from upreid.engine.ranklist import ranklist_size


@pytest.mark.slow
def test_pretrain_export_finetune_evaluate(synth_root, tmp_path, finetune_cfg):
    pcfg = load_config("pretrain", PRETRAIN_TINY,
                       [f"data.root={synth_root}/unlabeled", f"train.output={tmp_path}/pre", "train.steps=2",
                        "train.progress=false", "data.backend=torch", "model.queue_size=16", "model.width=16"])
    pre = pretrain(pcfg)
    bb = str(tmp_path / "backbone.pt")
    info = export_backbone(pre["checkpoint"], bb)

    out = str(tmp_path / "ft")
    s = finetune(finetune_cfg(synth_root, out, f"init={bb}"))
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
    out = str(tmp_path / "cli")
    rc = main(["finetune", "--config", FINETUNE_TINY, f"data.root={synth_root}", f"train.output={out}",
               "train.epochs=1", "train.max_steps_per_epoch=1", "data.p=4", "eval.rerank=false",
               "train.progress=false", "model.width=16"])
    text = capsys.readouterr().out
    assert rc == 0 and "without re-ranking" in text and "with re-ranking" not in text.replace("without", "")
    assert json.load(open(os.path.join(out, "init.json")))["format"] == "random"
    assert main(["finetune", "--config", FINETUNE_TINY, f"data.root={synth_root}", f"train.output={out}"]) == 1
    assert "--resume" in capsys.readouterr().err       # an existing run is not overwritten silently


def test_cli_interrupted_run_exits_with_the_signal(synth_root, tmp_path, capsys, monkeypatch):
    """SIGTERM mid-run: the checkpoint is written, the command says how to continue and exits 143 (128 +
    SIGTERM), so a shell chain (`upreid finetune ... && upreid extract ...`) stops there."""
    import upreid.engine.finetune as ft
    real = ft.finetune

    def interrupted(cfg, **kw):
        def stop(step, out):
            if step == 1:
                signal.raise_signal(signal.SIGTERM)
        return real(cfg, on_step=stop, **kw)
    monkeypatch.setattr(ft, "finetune", interrupted)
    out = tmp_path / "cli"
    rc = main(["finetune", "--config", FINETUNE_TINY, f"data.root={synth_root}", f"train.output={out}",
               "train.epochs=1", "train.max_steps_per_epoch=2", "data.p=4", "eval.rerank=false",
               "train.progress=false", "model.width=16"])
    assert rc == 128 + signal.SIGTERM
    assert "finetune interrupted at step 1/2" in capsys.readouterr().out and (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("setting", ["unset", "1"])
def test_progress_lines_where_no_bar_is_drawn(synth_root, tmp_path, finetune_cfg, caplog, monkeypatch, setting):
    """Output not a terminal (as under pytest): the run logs its progress (step, losses, lr, pace, time
    left) every PROGRESS_LINE_S and at the end; where a bar is drawn (UPREID_PROGRESS=1), no lines."""
    import logging

    from upreid.engine import trainer
    monkeypatch.setattr(trainer, "PROGRESS_LINE_S", 0.0)
    if setting == "unset":
        monkeypatch.delenv("UPREID_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("UPREID_PROGRESS", setting)
    cfg = finetune_cfg(synth_root, str(tmp_path / "run"), "train.progress=true", "train.log_every=1",
                       "eval.rerank=false", "eval.ranklist_queries=0")
    with caplog.at_level(logging.INFO, logger="upreid.trainer"):
        s = finetune(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finetune step ")]
    if setting == "1":
        assert lines == []
        return
    assert len(lines) == s["step"] == 4, lines
    assert lines[-1].startswith("finetune step 4/4 (100%): lr ") and lines[-1].endswith(" left")
    assert "id " in lines[0] and "tri " in lines[0] and "samples/s" in lines[0] and "step 1/4 (25%)" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("ema", ["0.0", "0.6"])
def test_resume_after_sigterm_is_exact(synth_root, tmp_path, finetune_cfg, ema):
    """Also the weight average (optim.ema_decay): saved with the checkpoint and continued exactly."""
    extra = ("eval.rerank=false", "eval.ranklist_queries=0", "train.max_steps_per_epoch=3", "eval.every=1",
             f"optim.ema_decay={ema}")
    full = finetune(finetune_cfg(synth_root, str(tmp_path / "full"), *extra))
    assert full["step"] == 6

    def interrupt(step, out):
        if step == 2:                                   # mid-epoch
            signal.raise_signal(signal.SIGTERM)

    part = finetune(finetune_cfg(synth_root, str(tmp_path / "split"), *extra), on_step=interrupt)
    assert part["interrupted"] and part["step"] == 2
    mid = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"), expect="upreid-finetune")
    assert (mid["epoch"], mid["batch"]) == (0, 2)
    rest = finetune(finetune_cfg(synth_root, str(tmp_path / "split"), *extra), resume="auto")
    assert rest["step"] == 6 and not rest["interrupted"]
    a = ckpt_io.load(str(tmp_path / "full" / "checkpoint.pt"), expect="upreid-finetune")
    b = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"), expect="upreid-finetune")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert ("ema" in a) == ("ema" in b) == (ema != "0.0")
    if ema != "0.0":
        assert a["ema"]["updates"] == b["ema"]["updates"] == 6
        for k in a["model"]:
            assert torch.equal(a["ema"]["state"][k], b["ema"]["state"][k]), k
    assert rest["results"]["plain"]["mAP"] == pytest.approx(full["results"]["plain"]["mAP"], abs=1e-9)
    assert [h["epoch"] for h in b["history"]] == [h["epoch"] for h in a["history"]] == [1]
    steps = [json.loads(x)["step"] for x in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [json.loads(x)["step"] for x in open(tmp_path / "full" / "metrics.jsonl")]

    with pytest.raises(CheckpointError, match="another model: model.depth"):
        finetune(finetune_cfg(synth_root, str(tmp_path / "split"), *extra, "model.depth=34"), resume="auto")
    with pytest.raises(CheckpointError, match="other data settings: data.p: checkpoint 4, config 2"):
        finetune(finetune_cfg(synth_root, str(tmp_path / "split"), *extra, "data.p=2"), resume="auto")


def test_bad_images_skipped_when_asked(synth_root, tmp_path, finetune_cfg, capsys):
    """data.on_bad_image reaches the loaders of both training and evaluation."""
    import shutil
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    firsts = {}
    for path in sorted((root / "bounding_box_train").iterdir()):     # the first image of every identity
        firsts.setdefault(path.name.split("_")[0], path)
    for path in firsts.values():
        path.write_bytes(b"")
    from upreid.data.imageio import BadImageError
    with pytest.raises(BadImageError, match=r"bad image .*bounding_box_train.*the file is empty.*on_bad_image"):
        finetune(finetune_cfg(str(root), str(tmp_path / "err"), "train.epochs=1", "train.max_steps_per_epoch=8"))
    # the command line names its own setting, not the Python argument; one line, no traceback
    rc = main(["finetune", "--config", FINETUNE_TINY, f"data.root={root}", f"train.output={tmp_path / 'cli'}",
               "train.epochs=1", "train.max_steps_per_epoch=1", "data.p=4", "train.progress=false",
               "model.width=16", "data.backend=torch", "data.workers=2"])
    err = capsys.readouterr().err
    assert rc == 1 and "error: bad image" in err and "the file is empty" in err, err
    assert "set data.on_bad_image=skip" in err and "on_bad_image='skip'" not in err and "Traceback" not in err
    s = finetune(finetune_cfg(str(root), str(tmp_path / "skip"), "train.epochs=1", "train.max_steps_per_epoch=8",
                              "data.on_bad_image=skip", "eval.rerank=false", "eval.ranklist_queries=0"))
    assert not s["interrupted"] and s["results"]["plain"]["num_query"] > 0


def test_rank_lists_name_the_right_images_when_some_were_skipped(synth_root, tmp_path, finetune_cfg, monkeypatch):
    """With data.on_bad_image=skip, a skipped query or gallery image has no feature row: the rank-list
    picture must still put each row's own image beside it (every frame's colour agrees with the
    identities in the file names), not the next record's."""
    import shutil
    from upreid.engine import finetune_eval
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    bad = [sorted((root / "query").iterdir())[0], sorted((root / "bounding_box_test").iterdir())[0]]
    for path in bad:
        path.write_bytes(b"")
    drawn = {}

    def capture(out, query_paths, gallery_paths, lists, top=10, **kw):
        drawn.update(query=query_paths, gallery=gallery_paths, lists=lists)
    monkeypatch.setattr(finetune_eval, "draw_ranklist", capture)
    finetune(finetune_cfg(str(root), str(tmp_path / "run"), "train.epochs=1", "train.max_steps_per_epoch=2",
                          "data.on_bad_image=skip", "eval.rerank=false", "eval.ranklist_queries=8"))
    pid = lambda p: int(os.path.basename(p).split("_")[0])  # noqa: E731
    assert drawn and not {str(b) for b in bad} & set(map(str, drawn["query"] + drawn["gallery"]))
    for q, (idx, matches) in zip(drawn["query"], drawn["lists"]):
        assert matches == [pid(drawn["gallery"][i]) == pid(q) for i in idx]


def test_a_bad_gallery_image_met_after_training_keeps_the_training(synth_root, tmp_path, finetune_cfg, caplog):
    """A bad query or gallery image is met only by the evaluation after training: the error says that the
    training is saved and that --resume evaluates it without training again, and it does."""
    import shutil

    from upreid.data.imageio import BadImageError
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    bad = sorted((root / "bounding_box_test").iterdir())[3]
    bad.write_bytes(b"")
    over = ("train.epochs=1", "train.max_steps_per_epoch=2", "eval.rerank=false", "eval.ranklist_queries=0")
    import logging
    with pytest.raises(BadImageError, match=r"the file is empty.*the training up to step 2 is saved in .*"
                                            r"checkpoint\.pt.*--resume \(not --overwrite\) to evaluate it") as info, \
            caplog.at_level(logging.INFO, logger="upreid.finetune"):
        finetune(finetune_cfg(str(root), str(tmp_path / "run"), *over))
    # the dataset as found, before training: identities, images and cameras per split
    assert "split    |   # ids |  # images | # cameras" in caplog.text and "  query    |" in caplog.text
    assert info.value.path == str(bad)
    assert ckpt_io.load(str(tmp_path / "run" / "checkpoint.pt"), expect=None)["step"] == 2
    assert not (tmp_path / "run" / "results.json").exists()
    steps = []
    s = finetune(finetune_cfg(str(root), str(tmp_path / "run"), *over, "data.on_bad_image=skip"), resume="auto",
                 on_step=lambda step, out: steps.append(step))
    assert steps == [] and s["step"] == 2 and not s["interrupted"]          # evaluated, not trained again
    assert s["results"]["plain"]["num_gallery"] > 0 and (tmp_path / "run" / "results.json").exists()
    saved = json.load(open(tmp_path / "run" / "results.json"))["final"]["plain"]["skipped_images"]
    assert saved == {"query": [], "gallery": [str(bad)]}
