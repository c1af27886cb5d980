"""An exponential moving average of a model's weights (``optim.ema_decay`` in fine-tuning).

After every optimizer step, ``ema = d * ema + (1 - d) * w`` for every floating-point entry of the
model's state dict: the parameters and the BatchNorm running statistics, so that the averaged
weights come with statistics of their own time span (integer buffers, such as BatchNorm's batch
counter, are copied). The average starts at the weights after the first step. With ``d`` = 0.98 it
spans about 1 / (1 - d) = 50 steps.

The run evaluates and exports the average, not the last weights: :meth:`WeightEMA.applied` swaps it in
for the evaluation, and the checkpoint keeps both (``model``: the last weights, which a resumed run
continues from; ``ema``: the average, which :func:`evaluated_state` returns to every reader of the
fine-tuned model: ``upreid extract``, ``export-onnx``, ``init`` from a fine-tuned run).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class WeightEMA:
    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.state: dict | None = None
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current state into the average (the first call copies it)."""
        current = model.state_dict()
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in current.items()}
        else:
            if current.keys() != self.state.keys():
                raise RuntimeError("WeightEMA: the model's state dict changed its entries since the average began")
            if any(self.state[k].device != v.device for k, v in current.items()):    # resumed from a CPU copy
                self.state = {k: self.state[k].to(v.device) for k, v in current.items()}
            floats = [k for k, v in current.items() if v.is_floating_point()]
            if floats:
                torch._foreach_lerp_([self.state[k] for k in floats], [current[k].detach() for k in floats],
                                     1.0 - self.decay)
            for k, v in current.items():
                if not v.is_floating_point():
                    self.state[k].copy_(v)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block the model holds the averaged weights; its own come back afterwards, also on
        an error. A no-op before the first update."""
        if self.state is None:
            yield model
            return
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        """Continue a saved average (the decay is this object's: a resumed run may change it)."""
        self.updates = int(saved.get("updates", 0))
        state = saved.get("state")
        self.state = None if state is None else {k: v.detach().clone() for k, v in state.items()}


def evaluated_state(checkpoint: dict) -> dict:
    """The weights a fine-tuning checkpoint's run evaluated: the moving average when the run kept one
    (``optim.ema_decay`` > 0), else the last weights."""
    ema = checkpoint.get("ema") or {}
    return ema.get("state") or checkpoint["model"]
