"""Pre-training runs: exact resume after SIGTERM, after SIGKILL mid-run and after SIGKILL during a
checkpoint write (torch and DALI pipelines), and a two-process gloo run through torchrun."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import PRETRAIN_FAST, PRETRAIN_TINY, ROOT
from upreid.data.base import dali_available
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.pretrain import pretrain

pytestmark = pytest.mark.slow
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI"))]
# 6 steps over 16 images at batch 4: crosses an epoch boundary (4 steps per epoch)
RUN = ("train.steps=6", "train.checkpoint_every=100", "data.workers=0")


def assert_same_state(a: dict, b: dict):
    ma, mb = a["model"], b["model"]
    assert ma.keys() == mb.keys()
    for k in ma:  # weights, momentum encoder, BN statistics, queue and its pointer
        assert torch.equal(ma[k], mb[k]), k
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["momentum_buffer"], ob["state"][i]["momentum_buffer"]), i
    assert a["step"] == b["step"] and (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])


@pytest.fixture(scope="module")
def full_runs(images, tmp_path_factory):
    """The uninterrupted 6-step run of each backend: the reference of every resume test."""
    cache = {}

    def get(backend):
        if backend not in cache:
            from upreid.engine.config import load_config
            out = str(tmp_path_factory.mktemp(f"full_{backend}"))
            cfg = load_config("pretrain", PRETRAIN_TINY, [f"data.root={images}", f"train.output={out}",
                                                          *PRETRAIN_FAST, *RUN, f"data.backend={backend}"])
            assert pretrain(cfg)["step"] == 6
            cache[backend] = ckpt_io.load(os.path.join(out, "checkpoint.pt"))
        return cache[backend]
    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop", [3, 5])         # inside epoch 0; inside epoch 1 (the pipeline is a new one)
def test_resume_after_sigterm_is_exact(images, tmp_path, backend, stop, pretrain_cfg, full_runs):
    extra = (*RUN, f"data.backend={backend}")

    def interrupt(step, out):
        if step == stop:
            signal.raise_signal(signal.SIGTERM)   # handled by the engine: checkpoint, clean return

    part = pretrain(pretrain_cfg(images, str(tmp_path / "split"), *extra), on_step=interrupt)
    assert part["interrupted"] and part["step"] == stop
    mid = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"))
    assert mid["step"] == stop and int(mid["model"]["queue_ptr"]) == (stop * 4) % 16
    rest = pretrain(pretrain_cfg(images, str(tmp_path / "split"), *extra), resume="auto")
    assert rest["step"] == 6 and not rest["interrupted"]
    b = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"))
    assert_same_state(full_runs(backend), b)
    assert not torch.equal(b["model"]["queue"], mid["model"]["queue"])   # the run did move on
    # the metrics log continues: steps 1..stop from the first process, the rest from the resumed one
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


KILLED = textwrap.dedent("""
    import os, signal, sys
    import torch
    from upreid.engine import checkpoint
    from upreid.engine.config import load_config
    from upreid.engine.pretrain import pretrain

    mode = sys.argv[1]
    cfg = load_config("pretrain", {tiny!r}, {overrides!r})
    if mode == "mid-run":              # killed after step 3; the checkpoint of step 2 is on disk
        def on_step(step, out):
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        pretrain(cfg, on_step=on_step)
    else:                              # killed half-way through writing the checkpoint of step 4
        real = torch.save
        def save(obj, f, *a, **k):
            if obj.get("step") == 4:
                import io
                buf = io.BytesIO()
                real(obj, buf, *a, **k)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        checkpoint.torch.save = save
        pretrain(cfg)
""")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["mid-run", "in-checkpoint-write"])
def test_resume_after_sigkill_is_exact(images, tmp_path, backend, mode, pretrain_cfg, full_runs):
    out = tmp_path / "killed"
    extra = ("train.steps=6", "train.checkpoint_every=2", "data.workers=0", f"data.backend={backend}")
    overrides = [f"data.root={images}", f"train.output={out}", *PRETRAIN_FAST, *extra]
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tiny=PRETRAIN_TINY, overrides=overrides))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    on_disk = ckpt_io.load(str(out / "checkpoint.pt"))
    assert on_disk["step"] == 2                               # the last complete checkpoint
    if mode == "in-checkpoint-write":
        assert (out / "checkpoint.pt.tmp").exists()           # the half-written file never replaced it
    rest = pretrain(pretrain_cfg(images, str(out), *extra), resume="auto")
    assert rest["step"] == 6 and not rest["interrupted"]
    assert_same_state(full_runs(backend), ckpt_io.load(str(out / "checkpoint.pt")))
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]                        # steps after the checkpoint logged once


WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from upreid.engine.config import load_config
    from upreid.engine.pretrain import pretrain
    from upreid.models import UPReID

    seen = []
    orig = UPReID.dequeue_and_enqueue
    def spy(self, keys):
        seen.append(keys.detach().clone())       # this rank's keys, before the all-gather
        return orig(self, keys)
    UPReID.dequeue_and_enqueue = spy

    captured = {{}}
    import upreid.engine.pretrain as engine
    real = engine.UPReID.from_config
    def build(cfg):
        captured["model"] = real(cfg)
        return captured["model"]
    engine.UPReID.from_config = staticmethod(build)

    cfg = load_config("pretrain", {tiny!r}, {overrides!r})
    summary = pretrain(cfg)
    rank = int(os.environ["RANK"])
    m = captured["model"]
    torch.save({{"state": {{k: v.clone() for k, v in m.state_dict().items()}}, "keys": seen,
                "summary": {{k: summary[k] for k in ("step", "world", "rank")}}}},
               os.path.join({out!r}, f"rank{{rank}}.pt"))
    dist.destroy_process_group()
""")


def two_process_run(tmp_path, root, overrides: list[str]):
    """A pre-training on 2 gloo ranks through torchrun (tiny model, torch loader in-process); returns
    (the finished process, rank 0's and rank 1's records from WORKER, the run folder)."""
    out = tmp_path / "ddp"
    script = tmp_path / "worker.py"
    overrides = [f"data.root={root}", f"train.output={out}", *PRETRAIN_FAST, "train.checkpoint_every=100",
                 "data.backend=torch", "data.workers=0", *overrides]
    script.write_text(WORKER.format(tiny=PRETRAIN_TINY, overrides=overrides, out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # --standalone: torchrun's own store binds port 0 and its workers join it; no port is chosen
    # ahead of time for another process to take first.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "--local_addr=127.0.0.1", str(script)],
        env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True), out


def test_two_process_run_with_a_skipped_image(tmp_path):
    """data.on_bad_image=skip under DDP: the rank whose batch lost an undecodable image is short, and
    the key all-gather needs equal sizes on every rank, so every rank cuts its batch to the shortest
    (a warning says so) instead of failing or hanging in the collective."""
    from conftest import write_images
    root = write_images(str(tmp_path / "images"))
    with open(os.path.join(root, "img005.jpg"), "r+b") as f:  # a JPEG header and nothing after it
        f.truncate(200)
    proc, r0, r1, _ = two_process_run(tmp_path, root, ["train.steps=4", "model.queue_size=64",
                                                      "data.on_bad_image=skip"])
    sizes = [[k.shape[0] for k in r["keys"]] for r in (r0, r1)]
    assert sizes[0] == sizes[1] and len(sizes[0]) == 4, sizes   # every step: the same count on both ranks
    # 4 steps = 2 epochs of 16 images; the bad one is drawn once an epoch: two steps cut to 3 on both
    assert sorted(sizes[0]) == [3, 3, 4, 4], sizes
    assert int(r0["state"]["queue_ptr"]) == 2 * sum(sizes[0])
    assert "cut to 3" in proc.stderr + proc.stdout


@pytest.mark.parametrize("groups", [1, 2])      # plain BN; BN in 2 groups per rank after the cross-rank shuffle
def test_two_process_gloo_run(images, tmp_path, groups):
    _, r0, r1, out = two_process_run(tmp_path, images, ["train.steps=2", "model.queue_size=32",
                                                        f"model.bn_groups={groups}"])
    assert r0["summary"] == {"step": 2, "world": 2, "rank": 0} and r1["summary"]["rank"] == 1
    for k, v in r0["state"].items():        # parameters, momentum encoder and queue agree across ranks
        if "running_" in k or "num_batches" in k:
            continue                          # BN statistics are per rank (not broadcast), as in MoCo
        assert torch.equal(v, r1["state"][k]), k
    b = 4
    queue, ptr = r0["state"]["queue"], int(r0["state"]["queue_ptr"])
    assert ptr == 2 * 2 * b                   # 2 steps x 2 ranks x 4 keys
    for step in range(2):                     # rank order inside each gathered block
        for rank, rec in enumerate((r0, r1)):
            lo = (step * 2 + rank) * b
            torch.testing.assert_close(queue[lo:lo + b], rec["keys"][step], rtol=0, atol=1e-6)
    assert not torch.allclose(r0["keys"][0], r1["keys"][0])   # the ranks saw different images
    # only rank 0 wrote the run's files
    ck = ckpt_io.load(str(out / "checkpoint.pt"))
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert torch.equal(ck["model"]["queue"], queue)
