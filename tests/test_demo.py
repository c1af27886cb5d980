"""`upreid demo --tiny`: the whole chain through the command, everything under one folder."""
import json
import os

import pytest
from PIL import Image

from upreid.engine.cli import main
from upreid.engine.ranklist import ranklist_size


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--tiny", "--out", out, "--no-progress", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert f"everything is in {out}" in text
    names = ("raw-pixel NN", "colour-hist NN", "LDA on pixels", "UP-ReID, no FT", "random init", "UP-ReID init")
    for name in names:     # each method without and with re-ranking: 5 numbers after the name and yes/no
        rows = [line[len(name):].split() for line in text.splitlines() if line.startswith(name)]
        assert [r[0] for r in rows] == ["no", "yes"], name
        assert all(len(r) == 6 and all(0.0 <= float(x) <= 100.0 for x in r[1:]) for r in rows), rows
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert list(summary["results"]) == ["pixels", "histogram", "lda", "frozen", "random", "upreid"]
    for name, res in summary["results"].items():
        for mode in ("plain", "rerank"):
            assert 0.0 < res[mode]["mAP"] <= 1.0, (name, mode)
    assert summary["results"]["lda"]["settings"]["dims"] in (32, 64, 128, 256)
    # re-ranking settings follow the split: k1 = images per query identity (rounded), k2 = 0.3 k1
    rr = summary["rerank"]
    assert rr["k1"] == max(2, round(rr["images_per_identity"])) and rr["k2"] == max(1, round(0.3 * rr["k1"]))
    assert f"k1={rr['k1']}, k2={rr['k2']}" in text
    cfg = json.load(open(os.path.join(out, "finetune_upreid", "results.json")))["config"]["eval"]
    assert (cfg["k1"], cfg["k2"]) == (rr["k1"], rr["k2"])
    assert summary["seconds"]["total"] > 0
    # --seed reaches the pre-training and both fine-tunings; the line under the table names it
    assert summary["seed"] == 1 and "(no re-ranking; seed 1," in text
    import yaml
    assert yaml.safe_load(open(os.path.join(out, "pretrain", "config.yaml")))["train"]["seed"] == 1
    for run in ("finetune_upreid", "finetune_random"):
        assert json.load(open(os.path.join(out, run, "results.json")))["config"]["train"]["seed"] == 1
    # the line under the table: UP-ReID init against random init and LDA, from the same numbers
    res = {k: summary["results"][k]["plain"] for k in ("upreid", "random", "lda")}
    line = next(x for x in text.splitlines() if x.startswith("pre-training, UP-ReID init - random init:"))
    want = [100 * (res["upreid"][k] - res[other][k]) for other in ("random", "lda") for k in ("mAP", "Rank-1")]
    got = [float(t) for t in line.replace(",", " ").replace(";", " ").split() if t[0] in "+-" and t[1:2].isdigit()]
    assert got == pytest.approx(want, abs=0.006), (line, want)
    assert line in open(os.path.join(out, "summary.txt")).read()
    assert sorted(os.listdir(out)) == ["curves_finetune.png", "curves_pretrain.png", "data", "finetune_random",
                                       "finetune_upreid", "pretrain", "summary.json", "summary.txt"]
    for png in ("curves_finetune.png", "curves_pretrain.png"):
        with Image.open(os.path.join(out, png)) as im:
            assert im.format == "PNG" and im.size[0] > 400
    init = json.load(open(os.path.join(out, "finetune_upreid", "init.json")))
    assert init["format"] == "upreid-backbone" and init["loaded"] > 0
    assert json.load(open(os.path.join(out, "finetune_random", "init.json")))["format"] == "random"
    for run in ("finetune_upreid", "finetune_random"):
        with Image.open(os.path.join(out, run, "ranklist.png")) as im:
            assert im.format == "PNG" and im.size == ranklist_size(8, 10)   # demo: 8 queries, top 10
    assert main(["demo", "--tiny", "--out", out]) == 1                      # not into a non-empty folder
    assert "not empty" in capsys.readouterr().err


def _interrupting(module, name, monkeypatch, at_step, signum):
    """Replace ``module.name`` (pretrain or finetune) by the real run with signal ``signum`` at ``at_step``."""
    import importlib
    import signal
    mod = importlib.import_module(module)
    real = getattr(mod, name)

    def interrupted(cfg, **kw):
        def stop(step, out):
            if step == at_step:
                signal.raise_signal(signum)
        return real(cfg, on_step=stop, **kw)
    monkeypatch.setattr(mod, name, interrupted)


@pytest.mark.parametrize("stage,signame,code", [("pretrain", "SIGINT", 130),
                                                pytest.param("finetune", "SIGTERM", 143, marks=pytest.mark.slow)])
def test_an_interrupted_demo_stops_and_says_so(stage, signame, code, tmp_path, capsys, monkeypatch):
    """Ctrl-C / SIGTERM during pre-training or a fine-tuning: the run's checkpoint is written and the demo
    stops there (exit 128 + the signal) and says where; it does not go on with a half-trained trunk or
    print a table, and an earlier demo's results in the folder (--overwrite) are gone, not left to be
    read as this run's."""
    import signal
    out = tmp_path / "demo"
    (out / "finetune_random").mkdir(parents=True)
    (out / "summary.json").write_text("{}")                  # an earlier demo's
    (out / "finetune_random" / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")                   # not the demo's: kept
    _interrupting(f"upreid.engine.{stage}", stage, monkeypatch, 2, getattr(signal, signame))
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress", "--overwrite"]) == code
    cap = capsys.readouterr()
    assert (out / "notes.txt").read_text() == "mine"
    what = "pre-training" if stage == "pretrain" else "fine-tuning from UP-ReID init"
    assert f"demo: stopped: {what} was interrupted at step 2/" in cap.err and "--overwrite" in cap.err
    assert "method" not in cap.out and not (out / "summary.json").exists() and not (out / "summary.txt").exists()
    assert (out / ("pretrain" if stage == "pretrain" else "finetune_upreid") / "checkpoint.pt").exists()
    assert not (out / "finetune_random").exists()
    if stage == "pretrain":
        assert not (out / "finetune_upreid").exists() and not (out / "pretrain" / "backbone.pt").exists()


def test_finished_passes_a_whole_run_and_names_an_interrupted_one():
    from upreid.engine.trainer import RunInterrupted, finished
    whole = {"interrupted": False, "step": 6, "total": 6}
    assert finished(whole, "x") is whole
    with pytest.raises(RunInterrupted, match=r"pre-training was interrupted \(signal\) at step 3/6; its checkpoint "
                                             r"is c\.pt"):
        finished({"interrupted": True, "step": 3, "total": 6, "checkpoint": "c.pt"}, "pre-training")


def test_demo_refuses_a_negative_seed_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--seed", "-1"]) == 1
    assert "--seed must be an integer >= 0" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("name", ["CPU", "GPU", "TINY"])
def test_every_demo_scale_gives_valid_configs(name, tmp_path):
    """The GPU scale cannot run here; its recipe must still load and say what it means."""
    from upreid.engine import demo
    from upreid.engine.config import load_config
    s = getattr(demo, name)
    rr = {"k1": 9, "k2": 3, "lambda_value": 0.3}
    p = load_config("pretrain", None, demo.pretrain_overrides(s, str(tmp_path / "u"), str(tmp_path / "p")))
    f = load_config("finetune", None, demo.finetune_overrides(s, str(tmp_path / "d"), str(tmp_path / "f"),
                                                              str(tmp_path / "bb.pt"), rerank=rr))
    assert p["model"]["width"] == f["model"]["width"] == s.width          # the exported trunk fits
    assert p["model"]["depth"] == f["model"]["depth"]
    assert p["optim"]["lr"] == s.pretrain_lr and f["optim"]["lr"] == s.finetune_lr
    assert f["optim"]["name"] == s.finetune_optim == ("adam" if name == "GPU" else "sgd")
    assert p["train"]["steps"] == s.pretrain_steps and f["train"]["epochs"] == s.finetune_epochs
    assert (f["eval"]["k1"], f["eval"]["k2"]) == (9, 3)
    assert f["data"]["erasing_p"] == s.finetune_erasing and f["data"]["flip_test"] == s.flip_test
    assert f["data"]["color_p"] == s.finetune_color > 0 and p["data"]["color_p"] == 0   # pre-training: LUP's views
    # crops: torchvision's on the GPU (the recipe); one clamped draw on the CPU, as the study was measured
    assert p["data"]["crop_attempts"] == (10 if name == "GPU" else 1)
    # the schedule rule is the one the studies use, and no key is given twice
    o = demo.finetune_overrides(s, "d", "f", None)
    assert set(demo.schedule_overrides(s.finetune_epochs)) <= set(o)
    keys = [x.split("=", 1)[0] for x in o]
    assert len(keys) == len(set(keys))
    if name == "GPU":
        assert p["model"]["depth"] == 50 and p["data"]["height"] == 256 and p["train"]["device"] == "cuda"


def test_demo_data_replaces_an_earlier_set(tmp_path):
    """--overwrite over an earlier demo (another scale): the new set holds none of the old images."""
    import dataclasses

    from upreid.data.datasets import synth, unlabeled
    from upreid.engine.demo import TINY, render_data
    data = str(tmp_path / "data")
    render_data(data, dataclasses.replace(TINY, ids=12, unlabeled=20), progress=False)
    render_data(data, dataclasses.replace(TINY, ids=6, cameras=2, unlabeled=10), progress=False)
    ds = synth(data)
    assert len({r.pid for r in ds.query}) == 3 and {r.camid for r in ds.query + ds.gallery} <= {0, 1}
    assert len(unlabeled(os.path.join(data, "unlabeled"), progress=False).train) == 10


def test_run_environment_names_the_device_commit_and_time_of_the_run():
    """What summary.json records of the run (benchmarks/demo_report.py copies it into its rows)."""
    import datetime

    import torch

    from upreid.engine.demo import run_environment
    env = run_environment("cpu")
    assert env["device"].startswith("CPU ") and env["torch"] == torch.__version__
    # the vector ISA names the machine class a CPU run is reproducible on (one model name can have two)
    assert env["device"].endswith(", " + torch.backends.cpu.get_cpu_capability())
    assert env["commit"] and datetime.datetime.fromisoformat(env["timestamp"]).tzinfo is not None
    if torch.cuda.is_available():
        assert run_environment("cuda")["device"] == torch.cuda.get_device_name()


def test_device_name_says_when_the_isa_is_unknown(monkeypatch):
    import torch

    from upreid.utils.environment import device_name

    def no_capability():
        raise RuntimeError("not available")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", no_capability)
    assert device_name("cpu").endswith(", ISA unknown")


def test_commit_stamp_ignores_the_benchmarks_own_results(tmp_path):
    """A benchmark appending its rows to a tracked results CSV does not mark its own commit dirty; a
    change of a source file does; outside a checkout the commit is unknown."""
    import subprocess

    from upreid.utils.environment import git_commit

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "benchmarks" / "results" / "rows.csv").write_text("a\n")
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    sub = str(tmp_path / "src")
    assert git_commit(sub) == head
    (tmp_path / "benchmarks" / "results" / "rows.csv").write_text("a\n1\n")
    (tmp_path / "new_untracked.txt").write_text("")
    assert git_commit(sub) == head
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert git_commit(sub) == head + "-dirty"
    assert git_commit(sub, ignore=("src", "benchmarks/results")) == head
    outside = tmp_path.parent / "not_a_checkout"
    outside.mkdir()
    assert git_commit(str(outside)) == "unknown"
