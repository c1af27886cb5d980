"""Fine-tuning under torchrun: two CPU processes (gloo), MGN (whose trunk holds frozen, unused layers)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FINETUNE_TINY as TINY, ROOT
from upreid.engine import checkpoint as ckpt_io

pytestmark = pytest.mark.slow


def test_two_process_gloo_finetune(synth_root, tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # --standalone: torchrun's own store binds port 0 and its workers join it; no port is chosen
    # ahead of time for another process to take first.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "--local_addr=127.0.0.1", "-m", "upreid.engine.cli", "finetune", "--config", TINY,
         f"data.root={synth_root}", f"train.output={out}", "model.arch=mgn", "model.mgn_dim=16", "data.p=4",
         "data.k=2", "train.epochs=1", "train.max_steps_per_epoch=2", "train.progress=false", "data.backend=torch",
         "eval.rerank=false", "eval.ranklist_queries=2"],
        env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("without re-ranking") == 1          # rank 0 alone reports
    ck = ckpt_io.load(os.path.join(out, "checkpoint.pt"), expect="upreid-finetune")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])   # per-rank streams
    res = json.load(open(os.path.join(out, "results.json")))
    assert 0.0 < res["final"]["plain"]["mAP"] <= 1.0
    # resumed by another number of processes: refused (the step would be read against other epoch lengths)
    from upreid.engine.config import load_config
    from upreid.engine.finetune import finetune
    cfg = load_config("finetune", TINY, [f"data.root={synth_root}", f"train.output={out}", "model.arch=mgn",
                                         "model.mgn_dim=16", "data.p=4", "data.k=2", "train.epochs=2",
                                         "train.max_steps_per_epoch=2", "train.progress=false", "data.backend=torch",
                                         "eval.rerank=false", "eval.ranklist_queries=2"])
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    with pytest.raises(ckpt_io.CheckpointError, match=r"written by 2 process\(es\), this run has 1"):
        finetune(cfg, resume="auto")
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


def test_a_bad_gallery_image_under_ddp_stops_every_rank(synth_root, tmp_path):
    """Rank 0 alone evaluates: a bad gallery image there used to leave rank 1 waiting at a barrier for ever.
    Every rank now stops with the error, after the training is saved, and --resume evaluates it."""
    import shutil
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    bad = sorted((root / "bounding_box_test").iterdir())[2]
    bad.write_bytes(b"")
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--config", TINY, f"data.root={root}", f"train.output={out}", "data.p=4", "data.k=2", "train.epochs=1",
            "train.max_steps_per_epoch=2", "train.progress=false", "data.backend=torch", "eval.rerank=false",
            "eval.ranklist_queries=0", "model.width=16"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "--local_addr=127.0.0.1", "-m", "upreid.engine.cli", "finetune", *args],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: bad image '{bad}'") == 2, proc.stderr[-3000:]     # both ranks, one line each
    assert "is saved in" in proc.stderr and "--resume (not --overwrite) to evaluate it" in proc.stderr
    assert ckpt_io.load(os.path.join(out, "checkpoint.pt"), expect="upreid-finetune")["step"] == 2
