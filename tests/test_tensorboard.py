"""TensorBoard: the event file a short pre-training run writes holds the scalars of metrics.jsonl at
the same steps (read back with TensorBoard's own reader)."""
import json
import os

import pytest

from upreid.data.testing import write_tiny
from upreid.engine.config import load_config
from upreid.engine.logging_utils import MetricsWriter
from upreid.engine.pretrain import pretrain

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_scalars(folder: str) -> dict:
    acc = EventAccumulator(os.path.join(folder, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_writer_scalars_at_their_steps(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(5, {"loss": 1.5, "lr": 0.1, "note": "text is not a scalar"})
    w.write(10, {"loss": 0.75, "eval/plain/mAP": 0.25})
    w.close()
    assert read_scalars(str(tmp_path)) == {"loss": [(5, 1.5), (10, 0.75)], "lr": [(5, pytest.approx(0.1))],
                                           "eval/plain/mAP": [(10, 0.25)]}


@pytest.mark.slow
def test_short_pretraining_run_writes_its_scalars(tmp_path):
    write_tiny(str(tmp_path / "img"), n=16, ids=4, size=(64, 32))
    cfg = load_config("pretrain", os.path.join(ROOT, "configs", "pretrain", "tiny_cpu.yaml"),
                      [f"data.root={tmp_path}/img", f"train.output={tmp_path}/run", "train.steps=3",
                       "train.log_every=2", "train.progress=false", "data.backend=torch", "model.queue_size=16",
                       "data.batch_size=4"])
    pretrain(cfg)
    out = str(tmp_path / "run")
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [x["step"] for x in lines]
    assert steps == [1, 2, 3]                    # first step, every log_every, the last
    scalars = read_scalars(out)
    for tag in ("loss", "lr"):
        assert tag in scalars, sorted(scalars)
    for tag, events in scalars.items():
        want = [(x["step"], x[tag]) for x in lines if isinstance(x.get(tag), (int, float))]
        assert [s for s, _ in events] == [s for s, _ in want], tag
        assert [v for _, v in events] == pytest.approx([v for _, v in want], rel=1e-6), tag
