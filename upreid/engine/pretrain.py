"""UP-ReID pre-training as a task of the trainer: one process, or one per device under ``torchrun``.

``pretrain(cfg, resume=...)`` builds the model (:class:`upreid.models.UPReID`), the pre-training
loader of :mod:`upreid.data` and SGD with a linear warm-up and a cosine schedule, and steps until
``train.steps`` (or ``train.epochs`` worth of steps). It checkpoints every ``train.checkpoint_every``
steps, at the end, and on SIGTERM/SIGINT; a resumed run continues exactly (weights, momentum encoder,
queue, optimizer, scaler, RNG states, data position). :func:`export_backbone` writes the query trunk
for fine-tuning.
"""
from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist

from upreid.data.base import StepStream
from upreid.engine import checkpoint as ckpt_io
from upreid.engine.task import Task
from upreid.engine.trainer import NonFiniteLossError, RunExistsError, Trainer, param_groups  # noqa: F401
from upreid.models import UPReID
from upreid.utils.distributed import world_size

log = logging.getLogger("upreid.pretrain")


def lr_lambda(total: int, warmup: int, min_ratio: float):
    """Linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def list_images(root) -> list:
    """Pre-training records through the data layer's unlabeled-set parser (folder tree or list)."""
    from upreid.data import DatasetError, unlabeled
    if root in (None, ""):
        raise DatasetError("data.root is not set: pass data.root=DIR (a folder tree of person images, "
                           "or a list file of image paths); `upreid synth --root DIR` makes a test set")
    records = unlabeled(str(root), progress=False).train
    log.info("pre-training on %d images from %s", len(records), root)
    return records


class PretrainTask(Task):
    name = "pretrain"
    format = ckpt_io.FORMAT
    checkpoint_unit = "step"
    non_finite_advice = "Lower optim.lr, raise optim.warmup_steps, or check the data"
    VIEWS = ("original", "view1", "view2")

    def setup(self, trainer, state) -> None:
        from upreid.data.loader import loader_from_config
        cfg, t = self.cfg, self.cfg["train"]
        self.model = UPReID.from_config(cfg["model"])
        records = list_images(cfg["data"]["root"])
        loader = loader_from_config("pretrain", records, cfg["data"], device=trainer.device.type, seed=t["seed"],
                                    rank=trainer.rank, world=trainer.world)
        spe = loader.sampler.steps
        self.stream = StepStream(loader, lambda epoch: spe, trainer.start_step)
        self.images, self.batch_size = len(records), cfg["data"]["batch_size"]
        trainer.total = int(t["steps"]) if t["steps"] else int(t["epochs"]) * spe
        o = cfg["optim"]
        warmup = int(o["warmup_steps"] or round(o["warmup_epochs"] * spe))
        self._lr = lr_lambda(trainer.total, warmup, o["min_lr"] / o["lr"])
        if t["compile"]:
            self.model.encoder_q.compile()
            self.model.encoder_k.compile()

    def optimizer(self, model):
        o = self.cfg["optim"]
        return torch.optim.SGD(param_groups(model, o["weight_decay"]), lr=o["lr"], momentum=o["momentum"])

    def ddp_options(self) -> dict:
        # Buffers are not broadcast: the queue is identical on all ranks by construction (gathered
        # keys), and BN statistics stay per rank (rank 0's are saved) as in MoCo.
        return {"broadcast_buffers": False}

    def lr(self, step: int) -> float:
        return self.cfg["optim"]["lr"] * self._lr(step)

    def to_device(self, batch, device, memory_format):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for k in self.VIEWS:
            batch[k] = batch[k].contiguous(memory_format=memory_format)
        return batch

    def forward(self, net, batch):
        g, b = self.cfg["model"]["bn_groups"], batch["view1"].shape[0]
        keep = b - b % g if b % g and b > g else b
        if world_size() > 1 and self.cfg["data"]["on_bad_image"] == "skip":
            # A rank whose batch lost skipped images is short, and the keys' all-gather needs the same
            # count on every rank: all cut to the shortest (one small all-reduce a step, only here).
            n = torch.tensor([keep], device=batch["view1"].device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            keep = int(n)
        if keep < b:
            # images skipped (data.on_bad_image=skip) left a short batch (here or on another rank) or one
            # that the BN groups do not divide: drop its last few images rather than stop the run (the
            # config check keeps full batches whole)
            log.warning("a batch of %d images (skipped images) is cut to %d (model.bn_groups=%d%s)", b, keep, g,
                        ", the shortest batch of all ranks" if world_size() > 1 else "")
            batch = {k: v[:keep] for k, v in batch.items()}
        return net(batch)

    def summary(self) -> dict:
        return {"images": self.images}


def pretrain(cfg, resume: str | None = None, overwrite: bool = False, on_step=None) -> dict:
    """Run (or continue) a pre-training; returns a summary dict (``step``, ``interrupted``,
    ``checkpoint``, ``metrics``, ...). ``on_step(step, out)`` is called after every step (tests)."""
    return Trainer(PretrainTask(cfg), cfg, resume=resume, overwrite=overwrite, on_step=on_step).run()


def export_backbone(ckpt_path: str, out_path: str, overwrite: bool = False) -> dict:
    """Write the query trunk of a pre-training checkpoint as a backbone file for fine-tuning:
    ``{"format": "upreid-backbone", "arch": {depth, last_stride, ibn}, "state_dict": ...}`` with
    torchvision-style keys (``conv1.weight``, ``layer1.0.conv1.weight``, ...)."""
    if os.path.exists(out_path) and not overwrite:
        raise RunExistsError(f"{out_path!r} exists; pass --overwrite to replace it")
    state = ckpt_io.load(ckpt_path)
    prefix = "encoder_q.trunk."
    trunk = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not trunk:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt_path!r} holds no query trunk ({prefix}*)")
    m = state["config"]["model"]
    arch = ckpt_io.save_backbone(out_path, trunk, depth=m["depth"], width=m.get("width", 64),
                                 last_stride=m["last_stride"], ibn=m["ibn"], step=state["step"])
    return {"arch": arch, "tensors": len(trunk), "step": state["step"]}


def load_backbone(path: str, **overrides):
    """Build a :class:`upreid.models.ResNet` from an exported backbone file (``overrides`` e.g.
    ``last_stride=1`` for fine-tuning)."""
    from upreid.models import ResNet
    obj = ckpt_io.load(path, expect=ckpt_io.BACKBONE_FORMAT)
    arch = {**obj["arch"], **overrides}
    net = ResNet(arch["depth"], last_stride=arch["last_stride"], ibn=arch["ibn"], width=arch.get("width", 64))
    net.load_state_dict(obj["state_dict"])
    return net
