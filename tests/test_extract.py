"""``upreid extract`` then ``upreid evaluate`` reproduce fine-tuning's own numbers; extraction from
trunk-only formats and image folders; bad input named."""
import json
import os

import numpy as np
import pytest
import torch

from upreid.data.synthetic import SynthConfig, generate
from upreid.engine.finetune import finetune
from upreid.engine.config import load_config
from upreid.evaluation.cli import load_features
from upreid.evaluation.cli import main as evaluate_main
from upreid.evaluation.cli_extract import main as extract_main
from upreid.evaluation.extract import extract_to_npz, folder_records
from upreid.models import ResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "finetune", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    generate(root, SynthConfig(ids=12, cameras=3, unlabeled=0, height=64, width=32, distractors=4, junk=2),
             workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ft"))
    cfg = load_config("finetune", TINY, [f"data.root={synth_root}", f"train.output={out}", "data.p=4", "data.k=4",
                                      "train.epochs=1", "train.max_steps_per_epoch=2", "train.progress=false",
                                      "data.backend=torch", "eval.ranklist_queries=2", "data.flip_test=true",
                                      "eval.k1=8", "eval.k2=2"])
    return finetune(cfg)


@pytest.mark.slow
def test_extract_then_evaluate_reproduces_finetuning(run, tmp_path, capsys):
    npz = str(tmp_path / "feats.npz")
    ckpt = run["checkpoint"]
    assert extract_main(["extract", ckpt, "--out", npz, "--backend", "torch", "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "flip on" in text                             # the run's data.flip_test
    cfg = json.load(open(os.path.join(run["output"], "results.json")))["config"]["eval"]
    assert (f"the run's own evaluation: upreid evaluate {npz} --rerank both --k1 {cfg['k1']} --k2 {cfg['k2']} "
            f"--lambda {cfg['lambda_value']}") in text
    with np.load(npz) as z:
        assert {"query_paths", "gallery_paths"} <= set(z.files) and z["query_features"].dtype == np.float32
    res_json = str(tmp_path / "res.json")
    assert evaluate_main(["evaluate", npz, "--rerank", "both", "--json", res_json, "--no-progress", "--k1",
                          str(cfg["k1"]), "--k2", str(cfg["k2"]), "--lambda", str(cfg["lambda_value"])]) == 0
    mine = json.load(open(res_json))
    theirs = json.load(open(os.path.join(run["output"], "results.json")))["final"]
    for png in ("cmc.png", "distances.png", "ranklist.png"):     # fine-tuning's evaluation pictures
        assert os.path.getsize(os.path.join(run["output"], png)) > 1000, png
    assert sum(theirs["rerank"]["distances"]["positive"]) == sum(mine["rerank"]["distances"]["positive"]) > 0
    for mode in ("plain", "rerank"):
        for k in ("mAP", "mINP", "Rank-1", "Rank-5", "Rank-10"):
            assert mine[mode][k] == pytest.approx(theirs[mode][k], abs=1e-6), (mode, k)
        assert mine[mode]["num_query"] == theirs[mode]["num_query"]
    # --no-flip changes the features (so the flag reaches the pipeline)
    npz2 = str(tmp_path / "noflip.npz")
    assert extract_main(["extract", ckpt, "--out", npz2, "--backend", "torch", "--no-progress", "--no-flip",
                         "--split", "query", "--device", "cpu"]) == 0
    a, b = load_features(npz)["query_features"], np.load(npz2)["features"]
    assert a.shape == b.shape and not np.allclose(a, b)


def test_trunk_only_fastreid_file_and_image_folder(synth_root, tmp_path):
    torch.manual_seed(0)
    state = ResNet(18).state_dict()
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": {**{"backbone." + k: v for k, v in state.items()}, "heads.weight": torch.zeros(5, 512)}},
               path)
    out = str(tmp_path / "folder.npz")
    s = extract_to_npz(path, out, images=os.path.join(synth_root, "query"), height=64, width=32, backend="torch",
                       progress=False)
    assert s["format"] == "fastreid" and s["feat_dim"] == 512
    recs = folder_records(os.path.join(synth_root, "query"))
    with np.load(out) as z:
        assert z["features"].shape == (len(recs), 512)
        assert list(z["paths"]) == [r.path for r in recs]
        assert (z["pids"] >= 0).all() and (z["camids"] >= 0).all()      # Market-style names parsed
        np.testing.assert_array_equal(z["pids"], [r.pid for r in recs])


def test_folder_names_outside_the_market_pattern_get_minus_one(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 16)).save(tmp_path / "person.jpg")
    Image.new("RGB", (8, 16)).save(tmp_path / "0007_c2s1_000001_00.jpg")
    recs = {os.path.basename(r.path): (r.pid, r.camid) for r in folder_records(str(tmp_path))}
    assert recs == {"person.jpg": (-1, -1), "0007_c2s1_000001_00.jpg": (7, 1)}


def test_bad_input_is_named(tmp_path, capsys):
    torch.save({"state_dict": ResNet(18).state_dict()}, tmp_path / "tv.pth")
    tv = str(tmp_path / "tv.pth")
    rc = extract_main(["extract", tv, "--out", str(tmp_path / "x.npz"), "--no-progress"])
    assert rc == 2 and "names no dataset; pass --data NAME:ROOT" in capsys.readouterr().err
    rc = extract_main(["extract", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "x.npz"), "--images",
                       str(tmp_path)])
    assert rc == 2 and "checkpoint" in (err := capsys.readouterr().err) and "absent.pt' does not exist" in err
    rc = extract_main(["extract", tv, "--out", str(tmp_path / "x.npz"), "--images", str(tmp_path / "nothing")])
    assert rc == 2 and "extract --images" in capsys.readouterr().err and not os.path.exists(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="'split' must be one of"):
        extract_to_npz(tv, str(tmp_path / "x.npz"), data=str(tmp_path), split="val")


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_an_unreadable_image_is_named_or_skipped_and_listed(tmp_path, capsys, backend):
    """A truncated JPEG: by default one line naming the file and the option to skip it (no traceback,
    no file); with --on-bad-image skip, every other image has its row and the skipped one is listed."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from PIL import Image
    torch.save({"state_dict": ResNet(18).state_dict()}, tmp_path / "tv.pth")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 16), (40 * i, 20, 90)).save(imgs / f"000{i}_c1s1_000001_00.jpg")
    bad = imgs / "0002_c1s1_000001_00.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "x.npz"
    base = ["extract", str(tmp_path / "tv.pth"), "--out", str(out), "--images", str(imgs), "--height", "16",
            "--width", "8", "--backend", backend, "--device", "cpu", "--no-progress"]
    rc = extract_main(base)
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "--on-bad-image skip" in err and "on_bad_image=" not in err, err
    assert "Traceback" not in err and not out.exists()
    assert extract_main(base + ["--on-bad-image", "skip"]) == 0
    cap = capsys.readouterr()
    # an existing file is not replaced without --overwrite
    assert extract_main(base + ["--on-bad-image", "skip"]) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert extract_main(base + ["--on-bad-image", "skip", "--overwrite"]) == 0
    cap = capsys.readouterr()
    assert "skipped 1 unreadable images image(s)" in cap.err and str(bad) in cap.err, cap.err
    assert "4 images features" in cap.out
    with np.load(out) as z:
        assert z["features"].shape[0] == 4 and str(bad) not in list(z["paths"])
        assert list(z["pids"]) == [0, 1, 3, 4]


@pytest.mark.parametrize("opts,message", [
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--device", "meta"], "--device 'meta': only cpu and cuda are supported"),
    (["--height", "0"], "'height' must be at least 1 pixel"),
    (["--width", "-2"], "'width' must be at least 1 pixel"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, opts, message):
    """Refused with one line naming the option, before the model is loaded or any image read; a size of 0
    is not silently read as "the checkpoint's"."""
    torch.save({"state_dict": ResNet(18).state_dict()}, tmp_path / "tv.pth")
    out = tmp_path / "x.npz"
    rc = extract_main(["extract", str(tmp_path / "tv.pth"), "--out", str(out), "--images", str(tmp_path), *opts])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and not out.exists(), err


def test_output_folder_is_created_and_a_missing_package_is_one_line(tmp_path, capsys, monkeypatch):
    torch.save({"state_dict": ResNet(18).state_dict()}, tmp_path / "tv.pth")
    write_images = __import__("upreid.data.testing", fromlist=["write_tiny"]).write_tiny
    write_images(str(tmp_path / "imgs"), n=4, ids=2)
    out = tmp_path / "feats" / "sub" / "x.npz"
    rc = extract_main(["extract", str(tmp_path / "tv.pth"), "--out", str(out), "--images", str(tmp_path / "imgs"),
                       "--height", "64", "--width", "32", "--backend", "torch", "--no-progress"])
    assert rc == 0 and out.is_file(), capsys.readouterr().err
    from upreid.data import dali_pipeline
    from upreid.utils.deps import MissingDependencyError

    def missing():
        raise MissingDependencyError(dali_pipeline.INSTALL_HINT)
    monkeypatch.setattr(dali_pipeline, "import_dali", missing)
    rc = extract_main(["extract", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "y.npz"), "--images",
                       str(tmp_path / "imgs"), "--height", "64", "--width", "32", "--backend", "dali", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "NVIDIA DALI is not installed" in err and "Traceback" not in err, err


def test_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    torch.save({"state_dict": ResNet(18).state_dict()}, tmp_path / "tv.pth")
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path, "is a folder; give a file name"),
                         (tmp_path / "afile" / "x.npz", "is a file, not a folder")):
        rc = extract_main(["extract", str(tmp_path / "tv.pth"), "--out", str(out), "--images", str(tmp_path / "none")])
        err = capsys.readouterr().err
        assert rc == 2 and f"--out {str(out)!r}" in err and message in err, err


def test_exported_backbone_features_are_the_pooled_trunk_on_lup_normalised_images(tmp_path):
    from upreid.data.augment import LUP_MEAN, LUP_STD
    from upreid.data.imageio import decode_pil
    from upreid.data.testing import write_tiny
    from upreid.data.transforms import normalize, resize
    from upreid.engine import checkpoint as ckpt_io
    recs = write_tiny(str(tmp_path / "img"), n=5, ids=2, size=(64, 32))
    torch.manual_seed(3)
    trunk = ResNet(18, last_stride=2)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
    bb = str(tmp_path / "bb.pt")
    ckpt_io.save_backbone(bb, trunk.state_dict(), depth=18, last_stride=2, step=1)
    out = str(tmp_path / "f.npz")
    s = extract_to_npz(bb, out, images=str(tmp_path / "img"), height=64, width=32, backend="torch", progress=False,
                       flip=True, last_stride=2)
    assert s["format"] == "upreid-backbone" and s["flip"]
    images = torch.stack([normalize(np.asarray(resize(decode_pil(r.path), 64, 32)), LUP_MEAN, LUP_STD)
                          for r in sorted(recs)])
    with torch.no_grad():
        trunk.eval()
        want = (trunk(images).mean((2, 3)) + trunk(images.flip(3)).mean((2, 3))) / 2     # [5, 512]
    np.testing.assert_allclose(np.load(out)["features"], want.numpy(), atol=1e-5)


@pytest.mark.slow
def test_dali_and_fallback_pipelines_give_the_same_features(tmp_path, caplog):
    pytest.importorskip("nvidia.dali")
    from upreid.data.testing import write_tiny
    write_tiny(str(tmp_path / "img"), n=6, ids=2, size=(64, 32))
    torch.save(ResNet(18).state_dict(), tmp_path / "tv.pth")
    feats = {}
    for backend in ("torch", "dali"):        # in-process torch loading first: no fork after DALI's threads
        out = str(tmp_path / f"{backend}.npz")
        caplog.clear()
        with caplog.at_level("INFO"):
            extract_to_npz(str(tmp_path / "tv.pth"), out, images=str(tmp_path / "img"), height=64, width=32,
                           backend=backend, workers=0 if backend == "torch" else 1, flip=True, progress=False)
        assert f"rank 0/1, {backend}): 6 samples" in caplog.text       # the loader's epoch summary
        feats[backend] = np.load(out)["features"]
    assert feats["torch"].shape == (6, 512)
    np.testing.assert_allclose(feats["dali"], feats["torch"], atol=1e-4)


def test_a_relative_data_root_recorded_by_the_run_is_explained(synth_root, tmp_path, monkeypatch):
    """The run recorded data.root as typed: from another folder a relative one is not found, and the error
    says where the path came from and how to pass the dataset (before: only 'folder ... does not exist')."""
    from upreid.data import DatasetError
    from upreid.evaluation.extract import _dataset_records
    info = {"dataset": "synth", "root": "data/synth", "format": "upreid-finetune"}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"read synth from data.root 'data/synth' \(a relative path, read from the "
                                           r"folder the command runs in\).*pass --data synth:ROOT"):
        _dataset_records(None, info, "query")
    os.makedirs(tmp_path / "data")
    os.symlink(synth_root, tmp_path / "data" / "synth")
    assert len(_dataset_records(None, info, "query")["query"]) > 0           # found where it is meant
