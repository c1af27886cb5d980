"""The two extension points of :class:`upreid.engine.trainer.Trainer`.

A :class:`Task` is what differs between pre-training and fine-tuning: the model, the data stream,
the optimizer, the loss and learning rate of a step, the metrics it logs and the entries it adds to
a checkpoint. A :class:`Hook` runs at fixed points of the loop (before training, after a step, after
an epoch, after training) and sees the trainer; evaluation and results files are hooks.
"""
from __future__ import annotations

import torch

from upreid.data.base import StepStream


class Hook:
    def before_train(self, trainer) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def after_epoch(self, trainer, epoch: int) -> None:
        """``epoch`` epochs are complete."""

    def after_train(self, trainer) -> None:
        """The run finished (not interrupted) and its last checkpoint is written."""


class Task:
    name = "task"
    format = "upreid-task"                  # the checkpoint's format
    checkpoint_unit = "step"                # train.checkpoint_every counts steps or epochs
    non_finite_advice = "Lower optim.lr or check the data"

    def __init__(self, cfg):
        self.cfg = cfg
        self.model: torch.nn.Module | None = None
        self.stream: StepStream | None = None
        self.batch_size = 0                 # samples per step and rank

    # --- built by setup(trainer, state): model, stream, trainer.total, trainer.hooks
    def setup(self, trainer, state: dict | None) -> None:
        raise NotImplementedError

    def optimizer(self, model) -> torch.optim.Optimizer:
        raise NotImplementedError

    def ddp_options(self) -> dict:
        return {}

    # --- the position of a global step
    def steps_in_epoch(self, epoch: int) -> int:
        return self.stream.steps_in_epoch(epoch)

    def position(self, step: int) -> tuple:
        return self.stream.position(step)

    # --- one step
    def lr(self, step: int) -> float:
        raise NotImplementedError

    def to_device(self, batch: dict, device, memory_format) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def forward(self, net, batch: dict) -> dict:
        """The step's outputs: ``loss`` (the scalar to minimise) and any other ``loss_*`` terms."""
        raise NotImplementedError

    def metrics(self, out: dict, batch: dict) -> dict:
        return {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}

    def postfix(self, metrics: dict) -> dict:
        return {k.replace("loss_", ""): f"{v:.3f}" for k, v in metrics.items() if k.startswith("loss")}

    # --- checkpoint entries and the run's summary
    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        return {}
