"""Pre-training runs: exact resume after a SIGTERM, and a two-process gloo run through torchrun."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from test_engine import FAST, cfg_for, write_images
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.pretrain import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")), n=16)


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
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"]


@pytest.mark.parametrize("backend", ["torch", "dali"])   # the two upreid.data pipelines
def test_resume_after_sigterm_is_exact(images, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    # 6 steps over 16 images at batch 4: crosses an epoch boundary (4 steps per epoch)
    extra = ("train.steps=6", "train.checkpoint_every=100", "data.workers=0", f"data.backend={backend}")
    full = pretrain(cfg_for(images, str(tmp_path / "full"), *extra))
    assert full["step"] == 6 and not full["interrupted"]

    def interrupt(step, out):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)   # handled by the engine: checkpoint, clean return

    part = pretrain(cfg_for(images, str(tmp_path / "split"), *extra), on_step=interrupt)
    assert part["interrupted"] and part["step"] == 3
    mid = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"))
    assert mid["step"] == 3 and int(mid["model"]["queue_ptr"]) == (3 * 4) % 16
    rest = pretrain(cfg_for(images, str(tmp_path / "split"), *extra), resume="auto")
    assert rest["step"] == 6 and not rest["interrupted"]

    a = ckpt_io.load(str(tmp_path / "full" / "checkpoint.pt"))
    b = ckpt_io.load(str(tmp_path / "split" / "checkpoint.pt"))
    assert_same_state(a, b)
    assert not torch.equal(a["model"]["queue"], mid["model"]["queue"])   # the run did move on
    # the metrics log continues: steps 1..3 from the first process, 4..6 from the resumed one
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_engine import cfg_for
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

    cfg = cfg_for({images!r}, {out!r}, "train.steps=2", "train.checkpoint_every=100",
                  "model.queue_size=32", "data.backend=simple")
    summary = pretrain(cfg)
    rank = int(os.environ["RANK"])
    m = captured["model"]
    torch.save({{"state": {{k: v.clone() for k, v in m.state_dict().items()}}, "keys": seen,
                "summary": {{k: summary[k] for k in ("step", "world", "rank")}}}},
               os.path.join({out!r}, f"rank{{rank}}.pt"))
    dist.destroy_process_group()
""")


def test_two_process_gloo_run(images, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(__file__), images=images, out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # --standalone: torchrun's own store binds port 0 and its workers join it; no port is chosen
    # ahead of time for another process to take first.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "--local_addr=127.0.0.1", str(script)],
        env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
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
