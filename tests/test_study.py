"""benchmarks/study_pretrain.py: the statistics of the study table, and a tiny end-to-end run."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import study_pretrain as study  # noqa: E402


def _rows(variant, maps):
    return [{"variant": variant, "seed": i, "mAP": m, "Rank-1": m, "mAP_rerank": m, "Rank-1_rerank": m}
            for i, m in enumerate(maps)]


def test_differences_flag_only_what_exceeds_two_standard_errors():
    rows = _rows("random", [0.20, 0.21, 0.19]) + _rows("moco", [0.30, 0.31, 0.29]) + _rows("moco+gc", [0.30, 0.33, 0.28])
    text = study.differences(rows)
    line = next(x for x in text.splitlines() if x.startswith("| moco - random | mAP"))
    # difference +10.00, SE = sqrt(1/3 + 1/3) = 0.816 -> 2 SE = 1.63
    assert "+10.00" in line and "| 1.63 |" in line and line.endswith("yes |")
    line = next(x for x in text.splitlines() if x.startswith("| moco+gc - moco | mAP"))
    assert "+0.33" in line and line.endswith("no |")
    table = study.table(rows)
    assert "| random | 3 | 20.00 ± 1.00 (20.00, 21.00, 19.00)" in table


def test_between_share_is_zero_for_equal_group_means_and_one_for_constant_groups():
    import torch
    from benchmarks.feature_shares import between_share
    labels = torch.tensor([0, 0, 1, 1])
    assert between_share(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), labels) == 0.0
    assert between_share(torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 1.0], [0.0, 1.0]]), labels) == pytest.approx(1.0)
    # half the variance between the groups: means +-1 on a spread of +-1 within them
    x = torch.tensor([[2.0], [0.0], [-2.0], [0.0]])
    assert between_share(x, labels) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no variance"):
        between_share(torch.ones(4, 2), labels)


@pytest.mark.slow
def test_tiny_study_writes_table_chart_and_resumes(tmp_path, capsys):
    work = str(tmp_path / "study")
    args = ["--scale", "tiny", "--seeds", "0", "1", "--variants", "random", "moco", "--work", work, "--csv", ""]
    assert study.main(args) == 0
    out = capsys.readouterr().out
    assert "| random | 2 |" in out and "| moco | 2 |" in out and "| moco - random | mAP |" in out
    from PIL import Image
    with Image.open(os.path.join(work, "study.png")) as im:
        assert im.format == "PNG"
    assert sum(1 for _ in open(os.path.join(work, "runs.jsonl"))) == 4
    assert study.main(args) == 0                      # every run is kept: nothing runs again
    assert "seed 0:" not in capsys.readouterr().out
    rows = [__import__("json").loads(x) for x in open(os.path.join(work, "runs.jsonl"))]
    assert all(0.0 < r["probe_bn_mAP"] <= 1.0 for r in rows)
    probe_csv = str(tmp_path / "probe.csv")
    assert study.main(args[:-2] + ["--reprobe", "--probe-csv", probe_csv]) == 0
    out = capsys.readouterr().out
    assert "| random | 2 |" in out and "| moco | 2 |" in out
    import csv
    got = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(open(probe_csv))}
    assert set(got) == {("random", 0), ("random", 1), ("moco", 0), ("moco", 1)}
    for r in rows:       # the same trunks probed again: the same numbers as the runs recorded
        g = got[(r["variant"], r["seed"])]
        assert float(g["probe_mAP"]) == pytest.approx(r["probe_mAP"], abs=1e-6)
        assert float(g["probe_bn_mAP"]) == pytest.approx(r["probe_bn_mAP"], abs=1e-6)
    # camera BN on the same runs: the plain numbers are the runs' own, the camera-BN ones are in range
    from benchmarks import study_camera_bn as cbn
    cbn_csv, cbn_table = str(tmp_path / "cbn.csv"), str(tmp_path / "cbn.md")
    assert cbn.main(["--scale", "tiny", "--work", work, "--seeds", "0", "1", "--variants", "random", "moco",
                     "--train", "--epochs", "1", "--csv", cbn_csv, "--table", cbn_table]) == 0
    got = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(open(cbn_csv))}
    assert set(got) == {("random", 0), ("random", 1), ("moco", 0), ("moco", 1)}
    for r in rows:
        g = got[(r["variant"], r["seed"])]
        assert float(g["ft_mAP"]) == pytest.approx(r["mAP"], abs=1e-6)
        assert float(g["trunk_mAP"]) == pytest.approx(r["frozen_mAP"], abs=1e-6)
        assert 0.0 < float(g["ft_cbn_mAP"]) <= 1.0 and 0.0 < float(g["trunk_cbn_mAP"]) <= 1.0
        assert 0.0 < float(g["cbn_ft_mAP"]) <= 1.0
        assert int(g["short_epochs"]) == 1 and 0.0 < float(g["short_mAP"]) <= 1.0
        assert 0.0 < float(g["short_cbn_mAP"]) <= 1.0 and 0.0 <= float(g["short_cbn_Rank-1"]) <= 1.0
        short = __import__("json").load(open(os.path.join(work, f"{r['variant']}_s{r['seed']}", "finetune_e1",
                                                          "results.json")))
        assert short["config"]["train"]["epochs"] == 1 and short["config"]["optim"]["milestones"] == [1]
        saved = __import__("json").load(open(os.path.join(work, f"{r['variant']}_s{r['seed']}", "finetune_cbn",
                                                          "results.json")))
        assert saved["config"]["model"]["camera_bn"] and saved["config"]["eval"]["camera_bn"]
        assert saved["init"]["format"] == ("random" if r["variant"] == "random" else "upreid-backbone")
        own = __import__("yaml").safe_load(open(os.path.join(work, f"{r['variant']}_s{r['seed']}", "finetune",
                                                             "config.yaml")))
        assert saved["config"]["data"] == own["data"] and saved["config"]["optim"] == own["optim"]   # its recipe
    text = open(cbn_table).read()
    assert "| moco | 2 |" in text and "| random: camera BN - plain | ft_mAP |" in text and "LDA on pixels" in text
    assert "| moco - random, camera BN in training too | ft_mAP |" in text
    assert "| moco - random, shorter fine-tuning, camera BN | short_mAP |" in text and "fine-tuned again for 1 epochs" in text
    assert float(g["lda_cam_Rank-1"]) > 0.0 and "LDA on camera-centred pixels:" in text
    with pytest.raises(SystemExit):
        cbn.main(["--scale", "tiny", "--work", work, "--epochs", "0", "--csv", ""])
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err
    assert cbn.main(["--scale", "tiny", "--work", work, "--seeds", "7", "--csv", ""]) == 1   # no such runs
    assert "run benchmarks/study_pretrain.py" in capsys.readouterr().err
    # camera and identity shares of the same trunks: one row each, shares in (0, 1), the table printed
    from benchmarks import feature_shares as fs
    fs_csv = str(tmp_path / "shares.csv")
    assert fs.main(["--scale", "tiny", "--work", work, "--seeds", "0", "1", "--variants", "random", "moco",
                    "--csv", fs_csv]) == 0
    got = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(open(fs_csv))}
    assert set(got) == {("random", 0), ("random", 1), ("moco", 0), ("moco", 1)}
    assert all(0.0 < float(r["camera_share"]) < 1.0 and 0.0 < float(r["identity_share"]) < 1.0
               and int(r["cameras"]) == 3 for r in got.values())
    assert "| moco | 2 |" in capsys.readouterr().out
    # a work folder of another recipe is not reused as this one's
    import dataclasses
    from upreid.engine import demo
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "TINY", dataclasses.replace(demo.TINY, finetune_color=0.0))
        with pytest.raises(SystemExit, match="holds runs of another recipe"):
            study.main(args)


def test_demo_report_names_a_folder_without_a_demo(tmp_path, capsys):
    from benchmarks import demo_report
    assert demo_report.main([str(tmp_path), "--csv", str(tmp_path / "d.csv"), "--pictures", ""]) == 1
    err = capsys.readouterr().err
    assert "summary.json" in err and f"run `upreid demo --out {tmp_path}` first" in err
    assert not (tmp_path / "d.csv").exists()          # nothing half-written


def test_study_csv_gains_new_columns_without_losing_old_rows(tmp_path):
    """A CSV written before the probe columns existed is rewritten with the full header, then appended."""
    import csv
    path = tmp_path / "s.csv"
    old = study.FIELDS[:-2]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({k: ("random" if k == "variant" else "1") for k in old})
    study.append_csv(str(path), {"variant": "moco", "mAP": 0.5, "probe_mAP": 0.25})
    rows = list(csv.DictReader(open(path, newline="")))
    assert list(rows[0]) == study.FIELDS
    assert [r["variant"] for r in rows] == ["random", "moco"]
    assert rows[0]["probe_mAP"] == "" and rows[1]["probe_mAP"] == "0.25" and rows[0]["mAP"] == "1"
    bad = tmp_path / "bad.csv"
    bad.write_text("variant,colour\nrandom,red\n")
    with pytest.raises(ValueError, match=r"columns \['colour'\] are not this script's"):
        study.append_csv(str(bad), {"variant": "moco"})
    assert bad.read_text() == "variant,colour\nrandom,red\n"       # left as it was


def test_table_shows_a_dash_where_older_runs_lack_a_column():
    rows = _rows("random", [0.20, 0.21])
    line = next(x for x in study.table(rows).splitlines() if x.startswith("| random |"))
    assert line.endswith("| - | - |")


def test_report_reads_the_current_recipe_rows_of_the_csv(tmp_path, capsys):
    """--report runs nothing: the rows at the scale's current recipe (another scale string is left out,
    a repeated variant and seed counts once, its last row), table and chart where asked."""
    import dataclasses
    from upreid.engine import demo
    now = "tiny:" + ",".join(f"{k}={v}" for k, v in dataclasses.asdict(demo.TINY).items())
    path = str(tmp_path / "s.csv")
    for scale, variant, seed, m in [(now, "random", 0, 0.20), (now, "random", 1, 0.22), (now, "upreid-sbn", 0, 0.5),
                                    (now, "upreid-sbn", 1, 0.30), (now, "upreid-sbn", 0, 0.40),
                                    ("tiny:older", "random", 2, 0.90)]:
        study.append_csv(path, {"scale": scale, "variant": variant, "seed": seed, "mAP": m, "Rank-1": m,
                                "mAP_rerank": m, "Rank-1_rerank": m, "probe_mAP": m})
    table, chart = tmp_path / "t.md", tmp_path / "c.png"
    args = ["--report", "--scale", "tiny", "--seeds", "0", "1", "2", "--csv", path, "--table", str(table),
            "--plot", str(chart), "--work", str(tmp_path / "unused")]
    assert study.main(args) == 0
    text = table.read_text()
    assert "| random | 2 | 21.00 ± 1.41 (20.00, 22.00)" in text                # not the older scale's 90
    assert "| upreid-sbn | 2 | 35.00 ± 7.07 (40.00, 30.00)" in text            # the last seed-0 row
    assert "| upreid-sbn - random | mAP | +14.00 |" in text
    assert chart.exists() and not (tmp_path / "unused").exists()
    assert study.main(["--report", "--scale", "cpu", "--csv", path, "--table", str(table)]) == 1
    assert "no rows at the current cpu scale" in capsys.readouterr().out


@pytest.mark.slow
def test_oracle_study_pretrains_on_labelled_pools_and_compares_with_the_study(tmp_path, capsys, monkeypatch):
    """benchmarks/study_oracle.py at the tiny scale with tiny pools: each labelled pool is written
    (identities disjoint from the demo's, its query and gallery the demo's), pre-trained on, probed and
    fine-tuned; the table puts the study's rows beside them."""
    from benchmarks import study_oracle as oracle
    monkeypatch.setattr(oracle, "POOLS", {"sup-cams": (6, "2-4", "2-4", 1), "exemplar": (None, 1, 2, 1)})
    work = str(tmp_path / "oracle")
    from upreid.engine import demo
    tag = study.scale_tag("tiny", demo.TINY)
    study_csv = str(tmp_path / "study.csv")
    for i, m in enumerate((0.2, 0.3)):
        study.append_csv(study_csv, {"scale": tag, "variant": "random", "seed": i, "mAP": m, "Rank-1": m,
                                     "frozen_mAP": 0.01, "probe_bn_mAP": 0.05})
    args = ["--scale", "tiny", "--seeds", "0", "1", "--work", work, "--csv", str(tmp_path / "o.csv"),
            "--study-csv", study_csv]
    assert oracle.main(args) == 0
    out = capsys.readouterr().out
    assert "| study: random | 2 | 1.00 ± 0.00" in out
    assert "| sup-cams | 2 |" in out and "| exemplar | 2 |" in out and "| sup-cams | mAP |" in out
    pool = os.path.join(work, "sup-cams_s0", "pool")
    names = os.listdir(os.path.join(pool, "bounding_box_train"))
    assert len({n[:4] for n in names}) == 6 and len({n.split("_")[1][:2] for n in names}) >= 2
    assert sorted(os.listdir(os.path.join(pool, "query"))) == sorted(os.listdir(os.path.join(work, "data", "query")))
    ex = os.listdir(os.path.join(work, "exemplar_s0", "pool", "bounding_box_train"))
    assert len(ex) == 2 * len(os.listdir(os.path.join(work, "data", "unlabeled", "000")))
    import csv
    rows = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert len(rows) == 4 and all(0.0 <= float(r["mAP"]) <= 1.0 and int(r["pretrain_steps"]) > 0 for r in rows)


def test_independent_moco_views_geometry(monkeypatch):
    """The cross-check's own augmentation: a full-image crop without the random pixel changes is the
    normalised image itself, and with the flip its mirror."""
    import torch
    from benchmarks import crosscheck_moco as cc
    monkeypatch.setattr(cc, "CROP", (1.0, 1.0))
    monkeypatch.setattr(cc, "RATIO", (0.5, 0.5))       # any aspect: a full-area crop is clamped to the image
    for name in ("GRAY_P", "BLUR_P", "ERASE_P"):
        monkeypatch.setattr(cc, name, 0.0)
    x = torch.randint(0, 256, (3, 3, 16, 8), dtype=torch.uint8)
    norm = (x.float() / 255 - torch.tensor(cc.MEAN).view(1, 3, 1, 1)) / torch.tensor(cc.STD).view(1, 3, 1, 1)
    monkeypatch.setattr(cc, "FLIP_P", 0.0)
    assert torch.allclose(cc.views(x, torch.Generator().manual_seed(0)), norm, atol=1e-5)
    monkeypatch.setattr(cc, "FLIP_P", 1.0)
    assert torch.allclose(cc.views(x, torch.Generator().manual_seed(0)), norm.flip(-1), atol=1e-5)
    monkeypatch.setattr(cc, "ERASE_P", 1.0)
    erased = cc.views(x, torch.Generator().manual_seed(0))
    assert all(((erased[i] == 0).all(0)).any() for i in range(3))     # a region set to the mean pixel


def test_independent_moco_crosscheck_runs_and_compares_with_the_study(tmp_path, capsys):
    """benchmarks/crosscheck_moco.py at the tiny scale: it pre-trains (the trunk moves off its
    initialisation), probes and fine-tunes, writes a row per seed, and puts the study's rows beside."""
    import csv

    import torch
    from benchmarks import crosscheck_moco as cc
    from upreid.engine import demo
    tag = study.scale_tag("tiny", demo.TINY)
    study_csv = str(tmp_path / "study.csv")
    for v in ("random", "moco"):
        for i, m in enumerate((0.2, 0.3)):
            study.append_csv(study_csv, {"scale": tag, "variant": v, "seed": i, "mAP": m, "Rank-1": m,
                                         "probe_mAP": 0.05, "probe_bn_mAP": 0.05})
    work = str(tmp_path / "cc")
    assert cc.main(["--scale", "tiny", "--seeds", "0", "1", "--work", work, "--csv", str(tmp_path / "c.csv"),
                    "--study-csv", study_csv]) == 0
    out = capsys.readouterr().out
    assert "| study: moco (the package) | 2 |" in out and "| moco, independent | 2 |" in out
    assert "| moco | mAP |" in out
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [int(r["seed"]) for r in rows] == [0, 1]
    assert all(0.0 <= float(r["probe_bn_mAP"]) <= 1.0 and float(r["final_loss"]) > 0 for r in rows)
    trunk = torch.load(os.path.join(work, "moco-independent_s0", "trunk.pt"), weights_only=False)["state_dict"]
    torch.manual_seed(0)
    from upreid.models.resnet import ResNet
    init = ResNet(demo.TINY.pretrain_depth, last_stride=1, width=demo.TINY.width).state_dict()
    assert not torch.equal(trunk["conv1.weight"], init["conv1.weight"])


def _demo_summary(**run):
    res = {k: 0.5 for k in ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")}
    return {"scale": {"ids": 24}, "rerank": {"k1": 4, "k2": 1}, "threads": 8, "cuda": True,
            "results": {"upreid": {"plain": res, "rerank": res}}, "seconds": {"total": 10.0}, **run}


def test_demo_report_labels_rows_with_the_demo_runs_machine(tmp_path, capsys):
    """A GPU demo's summary reported on another machine: its rows carry the run's device, commit and
    time, not the reporting machine's (which need not have CUDA at all)."""
    import csv
    import json

    from benchmarks import demo_report
    run = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "torch": "2.9.0+cu128",
           "timestamp": "2025-01-02T03:04:05+00:00", "load_avg_1m": 1.5}
    (tmp_path / "summary.json").write_text(json.dumps(_demo_summary(**run)))
    path = tmp_path / "d.csv"
    assert demo_report.main([str(tmp_path), "--csv", str(path), "--pictures", ""]) == 0
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == 2 and "note:" not in capsys.readouterr().out
    for r in rows:
        assert {k: r[k] for k in run} == {k: str(v) for k, v in run.items()} and r["threads"] == "8"


def test_demo_report_keeps_a_tiny_demo_out_of_the_published_results(tmp_path, capsys):
    import dataclasses
    import json

    from benchmarks import demo_report
    from upreid.engine.demo import TINY
    csv_path = demo_report.RESULTS / "demo.csv"
    before = csv_path.read_bytes() if csv_path.exists() else None
    (tmp_path / "summary.json").write_text(json.dumps({**_demo_summary(), "scale": dataclasses.asdict(TINY)}))
    assert demo_report.main([str(tmp_path)]) == 1
    assert "--tiny" in capsys.readouterr().err
    assert (csv_path.read_bytes() if csv_path.exists() else None) == before          # nothing written
    assert demo_report.main([str(tmp_path), "--csv", str(tmp_path / "d.csv"), "--pictures", ""]) == 0


def test_demo_report_records_the_seed_and_keeps_other_seeds_pictures_out_of_the_readme(tmp_path, capsys):
    """Rows carry the demo's --seed (a CSV from before the column is widened, its old rows kept); a
    non-zero seed's pictures would replace the seed-0 pictures the README shows, so they are refused there."""
    import csv
    import json

    from benchmarks import demo_report
    path = tmp_path / "d.csv"
    old = demo_report.FIELDS[:-1]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({"method": "upreid", "mAP": "43.45"})
    run = {"device": "CPU", "commit": "abc1234", "torch": "2", "timestamp": "t", "load_avg_1m": 1.0}
    (tmp_path / "summary.json").write_text(json.dumps(_demo_summary(seed=3, **run)))
    csv_before = demo_report.RESULTS / "demo.csv"
    before = csv_before.read_bytes() if csv_before.exists() else None
    assert demo_report.main([str(tmp_path), "--csv", str(path)]) == 1        # pictures into benchmarks/results
    assert "`upreid demo --seed 3` run" in capsys.readouterr().err
    assert (csv_before.read_bytes() if csv_before.exists() else None) == before
    assert len(list(csv.DictReader(open(path, newline="")))) == 1            # nothing appended by the refusal
    assert demo_report.main([str(tmp_path), "--csv", str(path), "--pictures", ""]) == 0
    rows = list(csv.DictReader(open(path, newline="")))
    assert [r["seed"] for r in rows] == ["", "3", "3"] and rows[0]["mAP"] == "43.45"


def test_demo_report_notes_an_old_summary_without_the_run_fields(tmp_path, capsys):
    import csv
    import json

    import torch

    from benchmarks import demo_report
    (tmp_path / "summary.json").write_text(json.dumps(_demo_summary()))     # "cuda": true, no device
    path = tmp_path / "d.csv"
    assert demo_report.main([str(tmp_path), "--csv", str(path), "--pictures", ""]) == 0
    assert "predates the run's device/commit/time fields" in capsys.readouterr().out
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == 2 and all(r["commit"] and r["threads"] == "8" for r in rows)
    if not torch.cuda.is_available():
        assert rows[0]["device"] == "a CUDA GPU (name not recorded)"


def test_csv_rows_warn_when_runs_come_from_two_devices(tmp_path, capsys):
    """Seeds do not reproduce across CPU classes: a report that mixes them says so and names them."""
    path = tmp_path / "s.csv"
    study.append_csv(str(path), {"scale": "x", "variant": "random", "seed": 0, "device": "CPU A x2, AVX2"})
    study.append_csv(str(path), {"scale": "x", "variant": "random", "seed": 1, "device": "CPU A x2, AVX2"})
    assert len(study.csv_rows(str(path), "x")) == 2 and "warning" not in capsys.readouterr().err
    study.append_csv(str(path), {"scale": "x", "variant": "upreid", "seed": 0, "device": "CPU A x2, AVX512"})
    assert len(study.csv_rows(str(path), "x")) == 3
    err = capsys.readouterr().err
    assert "from 2 devices (CPU A x2, AVX2; CPU A x2, AVX512)" in err
