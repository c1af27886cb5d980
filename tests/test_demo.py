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
    assert main(["demo", "--tiny", "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"everything is in {out}" in text
    rows = [line for line in text.splitlines() if line.startswith(("UP-ReID", "random"))]
    assert len(rows) == 4 and all(len(r.split()) == 7 for r in rows)      # 2 inits x (plain, re-rank)
    summary = json.load(open(os.path.join(out, "summary.json")))
    for name in ("UP-ReID", "random"):
        for mode in ("plain", "rerank"):
            assert 0.0 < summary["results"][name][mode]["mAP"] <= 1.0
    assert summary["seconds"]["total"] > 0
    assert sorted(os.listdir(out)) == ["data", "finetune_random", "finetune_upreid", "pretrain", "summary.json",
                                       "summary.txt"]
    init = json.load(open(os.path.join(out, "finetune_upreid", "init.json")))
    assert init["format"] == "upreid-backbone" and init["loaded"] > 0
    assert json.load(open(os.path.join(out, "finetune_random", "init.json")))["format"] == "random"
    for run in ("finetune_upreid", "finetune_random"):
        with Image.open(os.path.join(out, run, "ranklist.png")) as im:
            assert im.format == "PNG" and im.size == ranklist_size(8, 10)   # demo: 8 queries, top 10
    assert main(["demo", "--tiny", "--out", out]) == 1                      # not into a non-empty folder
    assert "not empty" in capsys.readouterr().err
