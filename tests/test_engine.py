"""Engine: bad input of a run (missing data, foreign, corrupt or changed checkpoints, an existing run,
an output that cannot be created), non-finite loss handling, run outputs and backbone export."""
import json
import os

import pytest
import torch
import yaml

from conftest import CONFIGS
from upreid.data import DatasetError
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.cli import main as cli_main
from upreid.engine.config import load_config
from upreid.engine.pretrain import NonFiniteLossError, RunExistsError, export_backbone, load_backbone, pretrain
from upreid.engine.trainer import OutputError

TINY = os.path.join(CONFIGS, "pretrain", "tiny_cpu.yaml")
FAST = ["train.progress=false", "train.log_every=1"]


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A finished 2-step run (its checkpoint is the input of several tests; they must not change it)."""
    from conftest import PRETRAIN_FAST, PRETRAIN_TINY
    out = str(tmp_path_factory.mktemp("run"))
    cfg = load_config("pretrain", PRETRAIN_TINY, [f"data.root={images}", f"train.output={out}", *PRETRAIN_FAST,
                                                  "train.steps=2"])
    return out, pretrain(cfg)


@pytest.fixture
def cfg_for(pretrain_cfg):
    return pretrain_cfg


def digest(path):
    with open(path, "rb") as f:
        return f.read()


# -------------------------------------------------------------------------------------- bad input
def test_missing_data_root(tmp_path):
    with pytest.raises(DatasetError, match="data.root is not set"):
        pretrain(load_config("pretrain", TINY, [f"train.output={tmp_path}/a", *FAST]))
    with pytest.raises(DatasetError, match="does not exist"):
        pretrain(load_config("pretrain", TINY, [f"data.root={tmp_path}/nothing", f"train.output={tmp_path}/b", *FAST]))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_checkpoint_of_another_model_is_refused(trained, images, cfg_for):
    out, _ = trained
    path = os.path.join(out, "checkpoint.pt")
    before = digest(path)
    with pytest.raises(ckpt_io.CheckpointError, match="another model: model.depth: checkpoint 18, config 34"):
        pretrain(cfg_for(images, out, "model.depth=34", "train.steps=4"), resume="auto")
    with pytest.raises(ckpt_io.CheckpointError, match="another model.*model.ic"):
        pretrain(cfg_for(images, out, "model.ic=off", "train.steps=4"), resume="auto")
    with pytest.raises(ckpt_io.CheckpointError, match=r"other data settings: data.batch_size: checkpoint 4, "
                                                       r"config 2.*restore these settings"):
        pretrain(cfg_for(images, out, "data.batch_size=2", "train.steps=4"), resume="auto")
    with pytest.raises(ckpt_io.CheckpointError, match="other data settings: train.seed: checkpoint 0, config 5"):
        pretrain(cfg_for(images, out, "train.seed=5", "train.steps=4"), resume="auto")
    assert digest(path) == before


def test_checkpoint_older_than_a_setting_resumes_at_that_settings_default(caplog):
    """A checkpoint written before model.width (or any key) existed lacks it: it is compared as the
    key's default (the behaviour the code had before), so it resumes under the defaults and is still
    refused for another width."""
    from upreid.engine.config import flatten, _nest
    from upreid.engine.resume import check_resume
    cfg = load_config("pretrain", TINY, ["data.root=/x"])
    old = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in ("model.width", "model.bn_groups")}
    state = {"config": _nest(old)}
    with caplog.at_level("INFO", logger="upreid.trainer"):
        assert check_resume("pretrain", state, cfg, "ck.pt") == []
    assert "predates the settings model.bn_groups, model.width" in caplog.text
    with pytest.raises(ckpt_io.CheckpointError, match="another model: model.width: checkpoint 64, config 32"):
        check_resume("pretrain", state, load_config("pretrain", TINY, ["data.root=/x", "model.width=32"]), "ck.pt")


def test_changed_settings_are_applied_and_listed(trained, images, cfg_for, tmp_path, caplog):
    out, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(digest(os.path.join(out, "checkpoint.pt")))
    with caplog.at_level("WARNING", logger="upreid.trainer"):
        pretrain(cfg_for(images, str(run), "train.steps=3", "optim.weight_decay=0.5"), resume="auto")
    assert "optim.weight_decay: checkpoint 0.0001, config 0.5" in caplog.text
    assert "train.steps: checkpoint 2, config 3" in caplog.text
    groups = ckpt_io.load(str(run / "checkpoint.pt"))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]        # applied, not the checkpoint's


def test_corrupt_and_foreign_checkpoints(trained, images, cfg_for, tmp_path):
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


def _flip_tensor_bytes(src: str, dst: str, name: str = "encoder_q.trunk.conv1.weight") -> None:
    """Copy ``src`` with 4 KiB of one tensor's data inverted: the zip archive stays readable."""
    data = bytearray(open(src, "rb").read())
    obj = torch.load(src, weights_only=True)
    raw = obj["model"][name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw[:4096])
    assert at > 0
    data[at:at + 4096] = bytes(b ^ 0xFF for b in data[at:at + 4096])
    open(dst, "wb").write(bytes(data))


def test_flipped_tensor_bytes_are_refused_everywhere(trained, images, cfg_for, tmp_path, capsys):
    out, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    _flip_tensor_bytes(os.path.join(out, "checkpoint.pt"), str(run / "checkpoint.pt"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2   # torch alone accepts it
    with pytest.raises(ckpt_io.CheckpointError, match="is corrupt: its contents do not match the SHA-256"):
        pretrain(cfg_for(images, str(run), "train.steps=4"), resume="auto")
    assert cli_main(["export-backbone", str(run / "checkpoint.pt"), str(tmp_path / "bb.pt")]) == 1
    assert "is corrupt" in capsys.readouterr().err and not (tmp_path / "bb.pt").exists()
    from upreid.engine.init_weights import load_trunk
    from upreid.models import ResNet
    with pytest.raises(ckpt_io.CheckpointError, match="is corrupt"):
        load_trunk(ResNet(18, last_stride=1), str(run / "checkpoint.pt"))


# end-to-end (three runs, about 15 s on 2 cores); the digest check on load stays in the fast tier
# (test_flipped_tensor_bytes_are_refused_everywhere)
@pytest.mark.slow
def test_last_good_checkpoint_survives(images, cfg_for, tmp_path):
    run = tmp_path / "run"
    pretrain(cfg_for(images, str(run), "train.steps=2", "train.checkpoint_every=1"))
    prev = run / "checkpoint.pt.prev"
    assert ckpt_io.load(str(prev))["step"] == 1 and ckpt_io.load(str(run / "checkpoint.pt"))["step"] == 2
    _flip_tensor_bytes(str(run / "checkpoint.pt"), str(run / "checkpoint.pt"))
    with pytest.raises(ckpt_io.CheckpointError, match=r"previous checkpoint .*checkpoint.pt.prev' \(step 1\) is "
                                                       r"intact: use it instead \(a training run continues from it "
                                                       r"with --resume-from"):
        pretrain(cfg_for(images, str(run), "train.steps=3"), resume="auto")
    s = pretrain(cfg_for(images, str(run), "train.steps=3"), resume=str(prev))
    assert s["step"] == 3 and not s["interrupted"]
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [1, 2, 3]                           # step 2 was run again after step 1: logged once


def test_existing_run_is_not_overwritten(trained, images, cfg_for):
    out, _ = trained
    before = digest(os.path.join(out, "checkpoint.pt"))
    with pytest.raises(RunExistsError, match="--resume"):
        pretrain(cfg_for(images, out, "train.steps=2"))
    assert digest(os.path.join(out, "checkpoint.pt")) == before


# end-to-end (two runs); a new run's metrics.jsonl, one line a step, is checked in the fast tier by
# test_run_outputs_and_export
@pytest.mark.slow
def test_overwrite_starts_a_fresh_metrics_log(images, cfg_for, tmp_path):
    run = str(tmp_path / "run")
    pretrain(cfg_for(images, run, "train.steps=2"))
    pretrain(cfg_for(images, run, "train.steps=1"), overwrite=True)
    assert [json.loads(x)["step"] for x in open(os.path.join(run, "metrics.jsonl"))] == [1]


def test_overwrite_leaves_nothing_of_the_old_run_to_resume(images, cfg_for, tmp_path):
    """A new run over an old one (--overwrite) that dies before its first checkpoint: --resume must not
    continue the old run (its checkpoints are gone from the start), and its results do not stay behind."""
    run = str(tmp_path / "run")
    pretrain(cfg_for(images, run, "train.steps=2", "train.checkpoint_every=1"))
    assert os.path.isfile(os.path.join(run, "checkpoint.pt.prev"))
    (tmp_path / "run" / "results.json").write_text("{}")       # as a fine-tuning run leaves it
    (tmp_path / "run" / "notes.txt").write_text("mine")          # not the engine's: kept

    def die(step, out):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg_for(images, run, "train.steps=4", "train.checkpoint_every=100"), overwrite=True, on_step=die)
    assert sorted(set(os.listdir(run)) - {"tensorboard"}) == ["config.yaml", "metrics.jsonl", "notes.txt"]
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        pretrain(cfg_for(images, run, "train.steps=4"), resume="auto")


def test_output_that_cannot_be_created(images, cfg_for, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"train.output=.*file/run' cannot be created: .*file' is a file"):
        pretrain(cfg_for(images, str(blocker / "run"), "train.steps=1"))
    assert cli_main(["pretrain", "--config", TINY, f"data.root={images}", f"train.output={blocker}"]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


def test_cuda_requested_without_cuda(images, cfg_for, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(Exception, match=r"train.device='cuda' but CUDA is not available"):
        pretrain(cfg_for(images, str(tmp_path / "r"), "train.device=cuda", "train.steps=1"))
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(trained, images, cfg_for, tmp_path, monkeypatch):
    out, _ = trained
    run = tmp_path / "nan"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(digest(os.path.join(out, "checkpoint.pt")))
    before = (run / "checkpoint.pt").read_bytes()
    from upreid.models import UPReID
    forward = UPReID.forward

    def nan_forward(self, batch):                  # the loss of step 3 (the first after resuming) is NaN
        res = forward(self, batch)
        return {**res, "loss": res["loss"] * float("nan")}
    monkeypatch.setattr(UPReID, "forward", nan_forward)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*step 2\) is kept"):
        pretrain(cfg_for(images, str(run), "train.steps=4"), resume="auto")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert ckpt_io.load(str(run / "checkpoint.pt"))["step"] == 2


def test_thread_count_is_recorded_and_checked(trained, images, cfg_for, tmp_path, caplog):
    out, _ = trained
    assert ckpt_io.load(os.path.join(out, "checkpoint.pt"))["threads"] == torch.get_num_threads()
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(digest(os.path.join(out, "checkpoint.pt")))
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level("WARNING", logger="upreid.trainer"):
            pretrain(cfg_for(images, str(run), "train.steps=3"), resume="auto")
    finally:
        torch.set_num_threads(threads)
    assert f"written with {threads} CPU threads, this run has {threads + 1}" in caplog.text


def test_cli_overrides_after_resume(trained, images, tmp_path, capsys):
    out, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(digest(os.path.join(out, "checkpoint.pt")))
    from conftest import PRETRAIN_FAST
    rc = cli_main(["pretrain", "--config", TINY, f"data.root={images}", "--resume", f"train.output={run}",
                   *PRETRAIN_FAST, "train.steps=3"])
    assert rc == 0 and "finished at step 3/3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--resume", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


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


@pytest.mark.parametrize("before,after,refused", [
    (["model.pooling=gem"], ["model.pooling=avg"], "model.pooling: checkpoint 'gem', config 'avg'"),
    (["model.pooling=avg"], ["model.pooling=gem"], "model.pooling: checkpoint 'avg', config 'gem'"),
    (["model.pooling=gem"], ["model.pooling=gem", "model.gem_p=6"], "model.gem_p: checkpoint 3.0, config 6.0"),
    (["model.pooling=avg"], ["model.pooling=avg", "model.gem_p=6"], None),   # p unused without GeM
])
def test_fine_tuning_resume_checks_the_pooling(before, after, refused):
    """GeM saves its p in the checkpoint: another pooling is another model (its state would not load), and another
    p under GeM would be silently overwritten by the checkpoint's."""
    from upreid.engine.resume import check_resume
    tiny = os.path.join(CONFIGS, "finetune", "tiny_cpu.yaml")
    state = {"config": load_config("finetune", tiny, ["data.root=/x"] + before).to_dict()}
    cfg = load_config("finetune", tiny, ["data.root=/x"] + after)
    if refused is None:
        assert check_resume("finetune", state, cfg, "ck.pt") == ["model.gem_p: checkpoint 3.0, config 6.0"]
    else:
        with pytest.raises(ckpt_io.CheckpointError, match="another model: " + refused.replace("(", r"\(")):
            check_resume("finetune", state, cfg, "ck.pt")


def test_a_missing_optional_package_is_one_line_not_a_traceback(images, tmp_path, capsys, monkeypatch):
    """data.backend=dali without DALI: the install hint as the run's one error line (exit status 1)."""
    from upreid.data import dali_pipeline
    from upreid.utils.deps import MissingDependencyError

    def missing():
        raise MissingDependencyError(dali_pipeline.INSTALL_HINT)
    monkeypatch.setattr(dali_pipeline, "import_dali", missing)
    rc = cli_main(["pretrain", "--config", TINY, f"data.root={images}", f"train.output={tmp_path / 'run'}",
                   "data.backend=dali", "train.steps=1"])
    err = capsys.readouterr().err
    assert rc == 1 and "NVIDIA DALI is not installed" in err and "Traceback" not in err, err



def test_fine_tuning_resume_refuses_other_init_layers_and_takes_old_checkpoints_as_all():
    """init_layers decides the weights a run started from: another value is another run. A checkpoint
    from before the key ran with the whole file, the default."""
    from upreid.engine.resume import check_resume
    tiny = os.path.join(CONFIGS, "finetune", "tiny_cpu.yaml")
    saved = load_config("finetune", tiny, ["data.root=/x", "init=a.pt", "init_layers=[stem,layer1]"]).to_dict()
    with pytest.raises(ckpt_io.CheckpointError, match=r"other data settings: init_layers: checkpoint \['stem', "
                                                      r"'layer1'\], config \['stem', 'layer1', 'layer2', 'layer3', "
                                                      r"'layer4'\]"):
        check_resume("finetune", {"config": saved}, load_config("finetune", tiny, ["data.root=/x", "init=a.pt"]),
                     "ck.pt")
    old = load_config("finetune", tiny, ["data.root=/x", "init=a.pt"]).to_dict()
    del old["init_layers"]
    assert check_resume("finetune", {"config": old}, load_config("finetune", tiny, ["data.root=/x", "init=a.pt"]),
                        "ck.pt") == []


def test_fine_tuning_resume_refuses_another_epoch_length():
    """The step's epoch and batch follow from train.max_steps_per_epoch: another value would replay
    or skip data (and move the schedule), so it is refused like the other data settings."""
    from upreid.engine.resume import check_resume
    tiny = os.path.join(CONFIGS, "finetune", "tiny_cpu.yaml")
    state = {"config": load_config("finetune", tiny, ["data.root=/x", "train.max_steps_per_epoch=2"]).to_dict()}
    with pytest.raises(ckpt_io.CheckpointError, match="other data settings: train.max_steps_per_epoch: checkpoint 2, "
                                                      "config None"):
        check_resume("finetune", state, load_config("finetune", tiny, ["data.root=/x"]), "ck.pt")


def test_checkpoint_older_than_crop_attempts_ran_with_one_draw():
    """data.crop_attempts came with a default (10) other than the behaviour before it (one clamped draw):
    a checkpoint without it resumes with data.crop_attempts=1 and is refused under the new default."""
    from upreid.engine.config import flatten, _nest
    from upreid.engine.resume import check_resume
    one = load_config("pretrain", TINY, ["data.root=/x", "data.crop_attempts=1"])
    state = {"config": _nest({k: v for k, v in flatten(one.to_dict()).items() if k != "data.crop_attempts"})}
    assert check_resume("pretrain", state, one, "ck.pt") == []
    with pytest.raises(ckpt_io.CheckpointError, match="other data settings: data.crop_attempts: checkpoint 1, "
                                                      "config 10"):
        check_resume("pretrain", state, load_config("pretrain", TINY, ["data.root=/x"]), "ck.pt")


@pytest.mark.parametrize("value", ["0", "101", "2.5"])
def test_config_refuses_crop_attempts_outside_its_range(value):
    from upreid.engine.config import ConfigError
    with pytest.raises(ConfigError, match=rf"data.crop_attempts={value} \(from the command line\): must be an "
                                          r"integer >= 1 and <= 100"):
        load_config("pretrain", TINY, ["data.root=/x", f"data.crop_attempts={value}"])


@pytest.mark.parametrize("color_p,refused", [(0.0, False), (0.5, True)])
def test_resume_refuses_other_colour_ranges_only_while_the_jitter_is_on(color_p, refused):
    """At data.color_p = 0 no colour jitter is drawn, so other ranges leave the data stream as it was: the
    change is applied (and listed); with the jitter on, it is another data stream and refused."""
    from upreid.engine.resume import check_resume
    tiny = os.path.join(CONFIGS, "finetune", "tiny_cpu.yaml")
    base = ["data.root=/x", f"data.color_p={color_p}"]
    state = {"config": load_config("finetune", tiny, base).to_dict()}
    cfg = load_config("finetune", tiny, base + ["data.color_gain=[0.5,1.5]"])
    if refused:
        with pytest.raises(ckpt_io.CheckpointError, match="other data settings: data.color_gain"):
            check_resume("finetune", state, cfg, "ck.pt")
    else:
        applied = check_resume("finetune", state, cfg, "ck.pt")
        assert len(applied) == 1 and applied[0].startswith("data.color_gain: checkpoint"), applied


def test_resume_with_fp16_from_a_run_without_a_loss_scale(trained, images, cfg_for, tmp_path, caplog):
    """A run written with amp off (or bf16) has no loss-scaler state: resuming it with train.amp=fp16
    (e.g. on a GPU without bf16) starts the scaler afresh with a warning instead of failing."""
    import shutil
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    with caplog.at_level("WARNING", logger="upreid.trainer"):
        s = pretrain(cfg_for(images, str(run), "train.steps=3", "train.amp=fp16"), resume="auto")
    assert s["step"] == 3 and "no fp16 loss scale (it ran with train.amp=auto)" in caplog.text
