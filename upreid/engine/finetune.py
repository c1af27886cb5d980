"""Supervised fine-tuning (BoT or MGN) on a labelled ReID dataset as a task of the trainer: one
process, or one per device under ``torchrun``.

``finetune(cfg, resume=...)`` builds the dataset (:func:`upreid.data.build_dataset`), the P x K loader
of :mod:`upreid.data`, the model (:mod:`upreid.models.reid`) initialised from ``cfg["init"]``
(:mod:`upreid.engine.init_weights`), Adam (or SGD) with linear warm-up and step decay applied per
iteration on the fractional epoch, and trains with label-smoothed ID loss + batch-hard triplet. It
checkpoints every ``train.checkpoint_every`` epochs, at the end and on SIGTERM/SIGINT (mid-epoch); a
resumed run continues exactly. Evaluation (:class:`upreid.engine.finetune_eval.EvalHook`) runs every
``eval.every`` epochs and at the end (with and without re-ranking); the final metrics go to
``results.json`` and the rank lists to ``ranklist.png``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from torch import nn

from upreid.data.base import StepStream
from upreid.engine.ema import WeightEMA
from upreid.engine.finetune_eval import EvalHook
from upreid.engine.init_weights import FINETUNE_FORMAT, load_trunk
from upreid.engine.task import Hook, Task
from upreid.engine.trainer import Trainer, param_groups
from upreid.losses.reid import batch_hard_triplet, cross_entropy_ls
from upreid.models.group_bn import camera_groups, convert_camera_bn
from upreid.models.reid import reid_model_from_config

log = logging.getLogger("upreid.finetune")


def lr_factor(epoch: float, warmup: float, warmup_factor: float, milestones, gamma: float) -> float:
    """BoT schedule on a fractional epoch: linear from ``warmup_factor`` to 1 over ``warmup`` epochs,
    times ``gamma`` per milestone passed."""
    w = 1.0 if warmup <= 0 or epoch >= warmup else warmup_factor + (1 - warmup_factor) * epoch / warmup
    return w * gamma ** sum(epoch >= m for m in milestones)


def build_model(cfg, num_classes: int) -> nn.Module:
    """The fine-tuning model; under ``model.camera_bn`` its BatchNorm2d layers take each camera's
    statistics in training (:class:`upreid.models.group_bn.CameraBatchNorm`)."""
    model = reid_model_from_config(cfg["model"], num_classes)
    if cfg["model"].get("camera_bn"):
        convert_camera_bn(model)
    return model


def initialise(model: nn.Module, init, layers=None) -> dict:
    """Load the trunk parts ``layers`` (default all) of the file ``init`` into ``model``'s trunk (and
    MGN's branches); the report goes to ``init.json``."""
    if init in (None, "", "random"):
        return {"format": "random", "loaded": 0, "missing": [], "unexpected": []}
    report = load_trunk(model.trunk, str(init), layers)
    if hasattr(model, "sync_branches"):
        model.sync_branches()
    return report


def load_dataset(cfg):
    from upreid.data import DatasetError, build_dataset
    d = cfg["data"]
    if d["root"] in (None, ""):
        raise DatasetError("data.root is not set: pass data.root=DIR (and data.dataset=NAME); "
                           "`upreid synth --root DIR` writes a synthetic set (data.dataset=synth)")
    return build_dataset(d["dataset"], str(d["root"]))


class EmaHook(Hook):
    """Folds the weights into the moving average after every step."""

    def __init__(self, ema: WeightEMA):
        self.ema = ema

    def after_step(self, trainer) -> None:
        self.ema.update(trainer.model)


class FinetuneTask(Task):
    name = "finetune"
    format = FINETUNE_FORMAT
    checkpoint_unit = "epoch"
    non_finite_advice = "Lower optim.lr or check the data"

    def setup(self, trainer, state) -> None:
        from upreid.data.loader import loader_from_config
        cfg, t, d = self.cfg, self.cfg["train"], self.cfg["data"]
        self.dataset = load_dataset(cfg)
        if trainer.is_main:         # what was found: identities, images and cameras per split
            log.info("%s", self.dataset.summary())
        if cfg["eval"]["camera_bn"]:          # refused now, not after the training
            from upreid.evaluation.extract import check_camera_groups
            check_camera_groups(list(self.dataset.query) + list(self.dataset.gallery), "query and gallery")
        self.num_classes = len({r.pid for r in self.dataset.train})
        self.model = build_model(cfg, self.num_classes)
        self.init = initialise(self.model, cfg["init"], cfg["init_layers"]) if state is None else dict(state.get("init") or {})
        self.history: list = []
        loader = loader_from_config("finetune", self.dataset.train, d, device=trainer.device.type, seed=t["seed"],
                                    rank=trainer.rank, world=trainer.world)
        self.epochs, cap = int(t["epochs"]), t["max_steps_per_epoch"]
        self.per_epoch = [min(len(loader.sampler.batches(e)), cap or 10**9) for e in range(self.epochs)]
        if min(self.per_epoch) == 0:
            raise ValueError(f"nothing to do: an epoch of {d['p']} x {d['k']} batches has no step "
                             f"(data.p={d['p']}, data.k={d['k']}, {self.num_classes} training identities)")
        self.stream = StepStream(loader, self._steps_in_epoch, trainer.start_step)
        self.batch_size = d["p"] * d["k"]
        trainer.total = sum(self.per_epoch)
        decay = float(cfg["optim"]["ema_decay"])
        self.ema = WeightEMA(decay) if decay > 0 else None
        if self.ema is not None:
            if state is not None and state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            elif state is not None:
                log.info("the checkpoint holds no weight average (optim.ema_decay was 0): the average starts at "
                         "the weights after the next step")
            trainer.hooks.append(EmaHook(self.ema))
        trainer.hooks.append(EvalHook(self))

    def _steps_in_epoch(self, epoch: int) -> int:
        return self.per_epoch[epoch] if epoch < self.epochs else 10**9

    def optimizer(self, model):
        o = self.cfg["optim"]
        groups = param_groups(model, o["weight_decay"], o["trunk_lr_mult"], getattr(model, "NEW_LAYERS", ()))
        if o["name"] == "adam":
            return torch.optim.Adam(groups, lr=o["lr"])
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"])

    def lr(self, step: int) -> float:
        o = self.cfg["optim"]
        epoch, i = self.position(step)
        return o["lr"] * lr_factor(epoch + i / self.per_epoch[epoch], o["warmup_epochs"], o["warmup_factor"],
                                   o["milestones"], o["gamma"])

    def to_device(self, batch, device, memory_format):
        out = {"images": batch["images"].to(device, non_blocking=True).contiguous(memory_format=memory_format),
               "pids": batch["pids"].to(device, non_blocking=True).long()}
        if self.cfg["model"]["camera_bn"]:
            out["camids"] = batch["camids"].to(device, non_blocking=True).long()
        return out

    def forward(self, net, batch):
        l, pids = self.cfg["loss"], batch["pids"]
        with camera_groups(net, batch["camids"]) if "camids" in batch else contextlib.nullcontext():
            out = net(batch["images"])
        loss_id = sum(cross_entropy_ls(z, pids, l["label_smoothing"]) for z in out["logits"]) / len(out["logits"])
        loss_tri = sum(batch_hard_triplet(f, pids, l["margin"]) for f in out["triplet"]) / len(out["triplet"])
        loss = l["id_weight"] * loss_id + l["triplet_weight"] * loss_tri
        return {"loss": loss, "loss_id": loss_id, "loss_triplet": loss_tri, "logits": out["logits"][0]}

    def metrics(self, out, batch) -> dict:
        acc = float((out["logits"].argmax(1) == batch["pids"]).float().mean())
        return {"loss": float(out["loss"].detach()), "loss_id": float(out["loss_id"].detach()),
                "loss_triplet": float(out["loss_triplet"].detach()), "acc": acc}

    def postfix(self, metrics) -> dict:
        return {"id": f"{metrics['loss_id']:.3f}", "tri": f"{metrics['loss_triplet']:.3f}",
                "acc": f"{metrics['acc']:.2f}", "lr": f"{metrics['lr']:.2g}"}

    def state(self) -> dict:
        out = {"num_classes": self.num_classes, "init": self.init, "history": self.history}
        if self.ema is not None and self.ema.state is not None:
            out["ema"] = self.ema.state_dict()
        return out

    def evaluated(self, model):
        """A context in which ``model`` holds the weights the run evaluates and exports: the moving
        average under ``optim.ema_decay``, else its own."""
        return self.ema.applied(model) if self.ema is not None else contextlib.nullcontext(model)

    def load_state(self, state) -> None:
        self.history = list(state.get("history") or [])

    def summary(self) -> dict:
        return {"results": getattr(self, "results", None), "init": self.init}

    def write_init_report(self, out_dir: str) -> None:
        with open(os.path.join(out_dir, "init.json"), "w") as f:
            json.dump(self.init, f, indent=2)


def finetune(cfg, resume: str | None = None, overwrite: bool = False, on_step=None) -> dict:
    """Run (or continue) a fine-tuning; returns a summary (``step``, ``epoch``, ``interrupted``,
    ``checkpoint``, ``results``, ``init``). ``on_step(step, out)`` after every step (tests)."""
    return Trainer(FinetuneTask(cfg), cfg, resume=resume, overwrite=overwrite, on_step=on_step).run()
