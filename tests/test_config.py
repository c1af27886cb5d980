"""The config system: one base.yaml of defaults per task, inheritance and overrides, a frozen result,
and every bad setting refused at load with the key, the value, its origin and what is allowed."""
import os

import pytest
import yaml

from conftest import CONFIGS, FINETUNE_TINY, PRETRAIN_TINY
from upreid.engine.cli import main as cli_main
from upreid.engine.config import Config, ConfigError, flatten, load_config
from upreid.engine.schema import SPECS, layer4_rows


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_base_yaml_holds_every_key_of_the_schema(task):
    with open(os.path.join(CONFIGS, task, "base.yaml")) as f:
        base = flatten(yaml.safe_load(f))
    assert sorted(base) == sorted(SPECS[task])
    cfg = load_config(task)                 # every default passes its own check
    assert flatten(cfg.to_dict()) == {k: (list(v) if isinstance(v, tuple) else v) for k, v in base.items()}


def test_inheritance_overrides_and_frozen(tmp_path):
    cfg = load_config("pretrain", os.path.join(CONFIGS, "pretrain", "upreid_r50.yaml"),
                      ["optim.lr=0.05", "model.gc=cosine"])
    assert cfg["model"]["depth"] == 50 and cfg.data.batch_size == 320 and cfg.optim.lr == 0.05
    assert cfg.model.gc == "cosine" and cfg.model.queue_size == 65536      # from base.yaml
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {os.path.abspath(PRETRAIN_TINY)}\nmodel:\n  stripes: 2\n")
    cfg = load_config("pretrain", str(child))
    assert cfg.model.stripes == 2 and cfg.model.depth == 18
    with pytest.raises(TypeError, match="frozen"):
        cfg["model"]["depth"] = 50
    with pytest.raises(TypeError, match="frozen"):
        cfg.train.steps = 3
    assert isinstance(cfg.data.mean, tuple) and isinstance(cfg.to_dict()["data"]["mean"], list)
    assert Config(cfg.to_dict()) == cfg
    ft = load_config("finetune", os.path.join(CONFIGS, "finetune", "mgn_r50.yaml"), ["init=x.pth"])
    assert (ft.model.arch, ft.model.pooling, ft.data.height, ft.init, ft.optim.lr) == ("mgn", "gem", 384, "x.pth", 3.5e-4)


@pytest.mark.parametrize("override,value", [
    ("optim.lr=1e-3", 0.001),                # YAML 1.1 reads 1e-3 as a string
    ("train.steps=1e3", 1000),               # an integral number where an integer is expected
    ("model.gc=off", "off"),                 # YAML 1.1 reads a bare off as false
    ("data.root=2024", "2024"),              # a path that YAML reads as a number
])
def test_values_read_as_meant(override, value):
    key = override.split("=")[0]
    assert flatten(load_config("pretrain", None, [override]).to_dict())[key] == value


PRETRAIN_ERRORS = [
    ("model.detph=18", "unknown pretrain config key 'model.detph' (from the command line); did you mean 'model.depth'"),
    ("model.lr=0.1", "did you mean 'optim.lr'"),
    ("model.gc=kl", "model.gc='kl' (from the command line): must be one of ['bank_kl', 'cosine', 'off']"),
    ("model.stripes=many", "model.stripes='many' (from the command line): must be an integer >= 1"),
    ("depth", "must look like key=value"),
    ("train.steps=1.5", "train.steps=1.5 (from the command line): must be null or an integer >= 1"),
    ("train.device=gpu", "train.device='gpu' (from the command line): must be one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("data.batch_size=0", "data.batch_size=0 (from the command line): must be an integer >= 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0 (from the command line): must be an integer >= 1"),
    ("train.log_every=0", "train.log_every=0 (from the command line): must be an integer >= 1"),
    ("model.temperature=0", "model.temperature=0 (from the command line): must be a number > 0"),
    ("model.gc_tau_student=0", "model.gc_tau_student=0 (from the command line): must be null or a number > 0"),
    ("model.ic_temperature=-1", "must be null or a number > 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 (from the command line): must be an integer >= 0"),
    ("optim.warmup_epochs=-0.5", "optim.warmup_epochs=-0.5 (from the command line): must be a number >= 0"),
    ("data.mean=[0.5, 0.5]", "data.mean=[0.5, 0.5] (from the command line): must be a list of 3 numbers"),
    ("data.std=[0.2, 0, 0.2]", "data.std=[0.2, 0, 0.2] (from the command line): must be a list of 3 numbers, each > 0"),
    ("data.backend=simple", "data.backend='simple' (from the command line): must be one of ['auto', 'dali', 'torch']"),
    ("data.on_bad_image=ignore", "must be one of ['error', 'skip']"),
    ("data.erasing_area=[0.5, 0.1]", "must be a list [min, max] with 0 < min <= max <= 1"),
    ("data.flip_p=1.5", "data.flip_p=1.5 (from the command line): must be a number >= 0 and <= 1"),
    ("train.progress=maybe", "must be true or false"),
    ("optim.min_lr=1", "optim.min_lr=1.0 is above optim.lr=0.05"),
    ("model.stripes=5", "model.stripes=5 does not fit the layer-4 feature map, which has 4 rows at data.height=64 "
                        "and model.last_stride=1 (model.stripes from the command line, data.height from "
                        "tiny_cpu.yaml, model.last_stride from tiny_cpu.yaml)"),
]


@pytest.mark.parametrize("override,message", PRETRAIN_ERRORS)
def test_pretrain_settings_refused_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("pretrain", PRETRAIN_TINY, [override])
    assert message in str(e.value)


def test_stripes_error_suggests_last_stride_1_only_where_it_is_2():
    with pytest.raises(ConfigError) as e:
        load_config("pretrain", PRETRAIN_TINY, ["model.stripes=5"])          # tiny_cpu: last_stride 1
    assert "model.last_stride=1," not in str(e.value) and "or model.ic=off" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("pretrain", PRETRAIN_TINY, ["model.stripes=5", "model.last_stride=2"])
    assert "a larger data.height, model.last_stride=1, or model.ic=off" in str(e.value)


FINETUNE_ERRORS = [
    ("loss.label_smoothing=1", "loss.label_smoothing=1 (from the command line): must be a number >= 0 and < 1"),
    ("loss.label_smoothing=-0.1", "must be a number >= 0 and < 1"),
    ("loss.margn=0.3", "did you mean 'loss.margin'"),
    ("model.arch=pcb", "model.arch='pcb' (from the command line): must be one of ['bot', 'mgn']"),
    ("data.p=1", "data.p=1 (from the command line): must be an integer >= 2"),
    ("data.dataset=market", "data.dataset='market' (from the command line): must be one of ['market1501',"),
    ("eval.k1=0", "eval.k1=0 (from the command line): must be an integer >= 1"),
    ("eval.lambda_value=2", "eval.lambda_value=2 (from the command line): must be a number >= 0 and <= 1"),
    ("eval.ranklist_top=0", "must be an integer >= 1"),
    ("eval.metric=l1", "must be one of ['cosine', 'euclidean']"),
    ("eval.every=-1", "must be an integer >= 0"),
    ("optim.milestones=[90, 40]", "must be a list of increasing integers >= 1"),
    ("optim.warmup_epochs=-1", "must be a number >= 0"),
    ("data.eval_batch_size=0", "must be an integer >= 1"),
    ("eval.k2=30", "eval.k2=30 is above eval.k1 + 1 = 21 (eval.k2 from the command line, eval.k1 from"),
    ("init_layers=[stem, layer5]", "init_layers=['stem', 'layer5'] (from the command line): must be a non-empty "
                                   "list of distinct parts from ['stem', 'layer1', 'layer2', 'layer3', 'layer4']"),
    ("init_layers=[]", "must be a non-empty list of distinct parts"),
    ("init_layers=[layer1, layer1]", "must be a non-empty list of distinct parts"),
    ("init_layers=layer1", "must be a non-empty list of distinct parts"),
    ("init_layers=[stem]", "init_layers=['stem'] (init_layers from the command line, init from"),
]


@pytest.mark.parametrize("override,message", FINETUNE_ERRORS)
def test_finetune_settings_refused_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("finetune", FINETUNE_TINY, [override])
    assert message in str(e.value)


def test_init_layers_are_put_in_trunk_order_and_need_an_init_file():
    cfg = load_config("finetune", FINETUNE_TINY, ["init=trunk.pt", "init_layers=[layer2, stem, layer1]"])
    assert list(cfg.init_layers) == ["stem", "layer1", "layer2"]
    with pytest.raises(ConfigError, match="selects parts of an init file, but init is 'random'"):
        load_config("finetune", FINETUNE_TINY, ["init=random", "init_layers=[stem]"])


def test_k2_is_checked_only_where_re_ranking_runs():
    cfg = load_config("finetune", FINETUNE_TINY, ["eval.rerank=false", "eval.k2=30"])
    assert cfg.eval.k2 == 30


def test_on_bad_image_is_a_setting_of_both_tasks():
    assert load_config("pretrain", None, ["data.on_bad_image=skip"]).data.on_bad_image == "skip"
    assert load_config("finetune", None, ["data.on_bad_image=skip"]).data.on_bad_image == "skip"


def test_errors_in_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown pretrain config key 'optim.learning_rate' \(from bad.yaml\)"):
        load_config("pretrain", str(bad))
    value = tmp_path / "value.yaml"
    value.write_text("train:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=r"train.log_every=0 \(from value.yaml\): must be an integer >= 1"):
        load_config("finetune", str(value))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# caf\xe9\ntrain:\n  steps: 2\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file '.*latin.yaml' is not UTF-8 text \(byte 5"):
        load_config("pretrain", str(latin))
    with pytest.raises(ConfigError, match=r"config file '.*absent.yaml' does not exist"):
        load_config("pretrain", str(tmp_path / "absent.yaml"))
    # a recipe path written relative to the checkout, used from another folder: the package's copy is named
    with pytest.raises(ConfigError, match=r"configs/pretrain/tiny_cpu.yaml' does not exist; the package's recipe of "
                                          r"that name is .*configs/pretrain/tiny_cpu.yaml"):
        load_config("pretrain", str(tmp_path / "configs" / "pretrain" / "tiny_cpu.yaml"))
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("_base_: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"config file '.*nothere.yaml' \(the _base_ of '.*orphan.yaml'\) does not exist"):
        load_config("pretrain", str(orphan))
    with pytest.raises(ConfigError, match=r"unknown pretrain config key 'init' \(from base.yaml\); 'init' is a "
                                          r"finetune setting: is this a finetune config\?"):
        load_config("pretrain", FINETUNE_TINY)
    loop = tmp_path / "loop.yaml"
    loop.write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config("pretrain", str(loop))


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    assert cli_main(["pretrain", "--config", PRETRAIN_TINY, "train.stpes=3", f"train.output={tmp_path}/o"]) == 1
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert cli_main(["finetune", "--config", FINETUNE_TINY, "eval.k2=0", f"train.output={tmp_path}/f"]) == 1
    assert "eval.k2=0 (from the command line): must be an integer >= 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "f")
    assert cli_main(["finetune", "--print-config", "train.epochs=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 3


def test_layer4_rows_match_the_model():
    import torch

    from upreid.models import ResNet
    assert layer4_rows(256, 2) == 8 and layer4_rows(256, 1) == 16 and layer4_rows(64, 1) == 4
    for height, stride in ((100, 2), (70, 1), (64, 2)):                # every stage rounds up
        net = ResNet(18, last_stride=stride).eval()
        with torch.no_grad():
            assert net(torch.zeros(1, 3, height, 32)).shape[2] == layer4_rows(height, stride)


def test_base_must_be_one_path(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match="_base_ must be one file path"):
        load_config("finetune", str(f))


def test_recipes_are_found_in_the_checkout_first_then_in_an_installed_copy(tmp_path):
    """A non-editable install (a wheel) puts the recipes under <prefix>/share/upreid/configs; the first
    root holding both tasks' base.yaml wins, and with none the checkout's path is named."""
    from upreid.engine.config import config_roots, find_config_root
    roots = [str(tmp_path / n) for n in ("checkout", "prefix", "user")]
    for r in roots[1:]:
        for task in ("pretrain", "finetune"):
            os.makedirs(os.path.join(r, task))
            open(os.path.join(r, task, "base.yaml"), "w").close()
    os.makedirs(os.path.join(roots[0], "pretrain"))           # a half checkout does not count
    open(os.path.join(roots[0], "pretrain", "base.yaml"), "w").close()
    assert find_config_root(roots) == roots[1]
    assert find_config_root([roots[0]]) == roots[0]
    got = config_roots()
    assert got[0] == CONFIGS and all(r.endswith(os.path.join("share", "upreid", "configs")) for r in got[1:])
    import sys
    import sysconfig

    import upreid
    pkg = os.path.dirname(os.path.abspath(upreid.__file__))
    up = os.path.dirname
    share = os.path.join("share", "upreid", "configs")
    for data in (sys.prefix, sysconfig.get_path("data"),     # the environment, its scheme's data path,
                 up(up(up(up(pkg)))),                         # --prefix P: P/lib/pythonX.Y/site-packages/upreid
                 up(pkg)):                                    # --target T: T/upreid
        assert os.path.join(data, share) in got, data


def test_the_wheel_installs_every_recipe():
    """pyproject's data-files take every YAML under configs/ (a new recipe is not forgotten)."""
    import glob
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(CONFIGS)
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        data_files = tomllib.load(f)["tool"]["setuptools"]["data-files"]
    installed = {os.path.relpath(p, root) for pats in data_files.values() for pat in pats
                 for p in glob.glob(os.path.join(root, pat))}
    every = {os.path.relpath(p, root) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)}
    assert installed == every and every
    for dest, pats in data_files.items():
        for pat in pats:
            assert dest == "share/upreid/" + os.path.dirname(pat), (dest, pat)


def test_missing_defaults_are_named_with_where_they_were_looked_for(tmp_path, monkeypatch):
    from upreid.engine import config as cfgmod
    monkeypatch.setattr(cfgmod, "CONFIG_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"the defaults of finetune \('.*nowhere/finetune/base\.yaml'\) are missing, "
                                          r"and no installed copy was found in .*share/upreid/configs.*"
                                          r"editable install.*pip install --no-build-isolation \."):
        load_config("finetune", None, ["data.root=/x"])


def test_dataset_names_are_read_as_the_parsers_read_them():
    """data.dataset takes the names build_dataset takes (any case, '_' for '-'), stored in one spelling;
    a near miss gets a suggestion, and MSMT17's versions are pointed at the one name."""
    for typed, stored in (("Market1501", "market1501"), ("CUHK03_NP/labeled", "cuhk03-np/labeled"),
                          ("msmt17", "msmt17")):
        assert load_config("finetune", FINETUNE_TINY, [f"data.dataset={typed}"])["data"]["dataset"] == stored
    for typed, hint in (("market", "did you mean 'market1501'?"), ("cuhk03", "did you mean 'cuhk03-np'?"),
                        ("MSMT17_V2", "MSMT17 V1 and V2 are both data.dataset=msmt17")):
        with pytest.raises(ConfigError, match=f"data.dataset='{typed}'.*must be one of .*{hint.replace('?', '[?]')}"):
            load_config("finetune", FINETUNE_TINY, [f"data.dataset={typed}"])
    with pytest.raises(ConfigError, match=r"must be one of \[[^]]*\]$"):
        load_config("finetune", FINETUNE_TINY, ["data.dataset=imagenet"])


def test_a_bare_recipe_name_as_base_points_at_the_package_recipe(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: tiny_cpu.yaml\ntrain:\n  epochs: 2\n")
    for folder in ("mine", "configs"):             # also in a folder of one's own called configs
        os.makedirs(tmp_path / folder, exist_ok=True)
        (tmp_path / folder / "mine.yaml").write_text("_base_: tiny_cpu.yaml\ntrain:\n  epochs: 2\n")
        with pytest.raises(ConfigError, match=r"the _base_ of .*mine.yaml.*does not exist; the package's recipes "
                                              r"of that name: .*finetune/tiny_cpu.yaml, .*pretrain/tiny_cpu.yaml "
                                              r"\(give the path of the one for this task\)"):
            load_config("finetune", str(tmp_path / folder / "mine.yaml"))
