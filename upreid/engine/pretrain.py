"""The UP-ReID pre-training loop: one process, or one per device under ``torchrun``.

``pretrain(cfg, resume=...)`` builds the model, the loader, SGD with a warm-up + cosine schedule, and
steps until ``train.steps`` (or ``train.epochs`` worth of steps). It checkpoints atomically every
``train.checkpoint_every`` steps, at the end, and when SIGTERM/SIGINT arrives; a resumed run continues
exactly (weights, momentum encoder, queue, optimizer, scheduler, scaler, RNG states, data position).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from upreid.engine import checkpoint as ckpt_io
from upreid.engine.config import dump_config
from upreid.engine.data import build_loader
from upreid.engine.logging_utils import MetricsWriter
from upreid.models import UPReID

log = logging.getLogger("upreid.pretrain")
CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    pass


class RunExistsError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ setup helpers
def setup_distributed(device_cfg: str) -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs,
    gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_cfg == "auto" else device_cfg.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device_cfg!r} but CUDA is not available")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(total: int, warmup: int, min_ratio: float):
    """Linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _all_ranks_any(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the current step and returns."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers (the caller stops us otherwise)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------- trainer
def pretrain(cfg: dict, resume: str | None = None, overwrite: bool = False, on_step=None) -> dict:
    """Run (or continue) a pre-training; returns a summary dict (``step``, ``interrupted``,
    ``checkpoint``, ``metrics``). ``on_step(step, metrics)`` is called after every step (tests)."""
    t = cfg["train"]
    rank, world, device = setup_distributed(t["device"])
    is_main = rank == 0
    out_dir = t["output"]
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)

    # Resume source first: a bad checkpoint must fail before anything is written.
    state = None
    if resume:
        resume = ckpt_path if resume == "auto" else resume
        state = ckpt_io.load(resume)
        differing = ckpt_io.check_compatible(state, cfg["model"], resume)
        if differing and is_main:
            log.warning("resuming with changed settings: %s", ", ".join(f"model.{k}" for k in differing))
    elif os.path.exists(ckpt_path) and not overwrite:
        raise RunExistsError(f"{ckpt_path!r} exists: pass --resume to continue that run, --overwrite to "
                             "start over in the same folder, or another train.output")

    seed_everything(t["seed"])                      # same initial weights and queue on every rank
    model = UPReID.from_config(cfg["model"])
    start_step = int(state["step"]) if state else 0
    loader, steps_per_epoch, n_images = build_loader(cfg, world, rank, start_step, t["seed"], device)
    total = int(t["steps"]) if t["steps"] else int(t["epochs"]) * steps_per_epoch
    if total <= 0:
        raise ValueError(f"nothing to do: {total} total steps (train.steps / train.epochs)")

    amp = t["amp"] if t["amp"] != "auto" else ("bf16" if device.type == "cuda" else "off")
    channels_last = t["channels_last"] if t["channels_last"] != "auto" else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)

    o = cfg["optim"]
    # No weight decay on BN and biases (the usual MoCo/LUPerson practice for 1-d parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": o["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}], lr=o["lr"], momentum=o["momentum"])
    warmup = int(o["warmup_steps"] or round(o["warmup_epochs"] * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, o["min_lr"] / o["lr"] if o["lr"] else 0))
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))

    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            ckpt_io.set_rng_state(rngs[rank])
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG states reseeded "
                        "(the data order and augmentations still follow the step)", len(rngs), world)
            seed_everything(t["seed"] * 1000 + rank + start_step)
        if is_main:
            log.info("resumed from %s at step %d/%d", resume, start_step, total)
    else:
        seed_everything(t["seed"] * 1000 + rank)    # rank-specific streams from here on

    net: nn.Module = model
    if t["compile"]:
        model.encoder_q.compile()
        model.encoder_k.compile()
    if world > 1:
        # Buffers are not broadcast: the queue is identical on all ranks by construction (gathered
        # keys), and BN statistics stay per rank (rank 0's are saved) as in MoCo.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        dump_config(cfg, os.path.join(out_dir, "config.yaml"))
    writer = MetricsWriter(out_dir, enabled=is_main)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "off" else contextlib.nullcontext())
    global_batch = cfg["data"]["batch_size"] * world

    def save(step: int) -> None:
        rng = _gather_objects(ckpt_io.rng_state(), world)
        if is_main:
            ckpt_io.save_atomic({
                "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": step, "config": cfg,
                "world_size": world, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
            }, ckpt_path)
        if world > 1:
            dist.barrier()

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start_step, disable=not (is_main and t["progress"]),
               desc="pretrain", unit="step", dynamic_ncols=True)
    step, last_saved, interrupted = start_step, start_step if state else -1, False
    metrics: dict = {}
    it = iter(loader)
    net.train()
    tick, tick_step, data_time = time.perf_counter(), step, 0.0
    try:
        with _StopFlag() as stop:
            while step < total:
                t0 = time.perf_counter()
                batch = next(it)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                for k in ("original", "view1", "view2"):
                    batch[k] = batch[k].contiguous(memory_format=memory_format)
                data_time += time.perf_counter() - t0

                with autocast:
                    out = net(batch)
                loss = out["loss"]
                if _all_ranks_any(not bool(torch.isfinite(loss.detach())), device):
                    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.items() if k.startswith("loss"))
                    kept = (f"the last good checkpoint {ckpt_path!r} (step {last_saved}) is kept"
                            if last_saved >= 0 else "no checkpoint was written yet")
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} ({terms}); stopping. {kept}. Lower optim.lr, "
                        "raise optim.warmup_steps, or check the data; resume with --resume.")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if o["grad_clip"]:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                bar.update(1)

                if step % t["log_every"] == 0 or step == total or step == start_step + 1:
                    now = time.perf_counter()
                    rate = (step - tick_step) * global_batch / max(now - tick, 1e-9)
                    metrics = {k: float(v.detach()) for k, v in out.items()}
                    metrics.update(lr=sched.get_last_lr()[0], samples_per_s=rate, epoch=step / steps_per_epoch,
                                   data_frac=data_time / max(now - tick, 1e-9))
                    writer.write(step, metrics)
                    bar.set_postfix({**{k.replace("loss_", ""): f"{metrics[k]:.3f}" for k in metrics
                                        if k.startswith("loss")}, "lr": f"{metrics['lr']:.3g}",
                                     "samples/s": f"{rate:.1f}"}, refresh=False)
                    tick, tick_step, data_time = now, step, 0.0
                if on_step is not None:
                    on_step(step, out)
                if step % t["checkpoint_every"] == 0 and step < total:
                    save(step)
                    last_saved = step
                if _all_ranks_any(stop.signal is not None, device) and step < total:
                    save(step)
                    last_saved, interrupted = step, True
                    if is_main:
                        log.warning("interrupted (signal) at step %d/%d; checkpoint %s written; continue "
                                    "with --resume", step, total, ckpt_path)
                    break
            if not interrupted and last_saved != step:
                save(step)
                last_saved = step
    finally:
        bar.close()
        writer.close()
        del it
    return {"step": step, "total": total, "interrupted": interrupted, "checkpoint": ckpt_path,
            "metrics": metrics, "images": n_images, "rank": rank, "world": world}


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
    arch = {"depth": m["depth"], "last_stride": m["last_stride"], "ibn": m["ibn"]}
    ckpt_io.save_atomic({"format": ckpt_io.BACKBONE_FORMAT, "version": ckpt_io.VERSION, "arch": arch,
                         "step": state["step"], "state_dict": trunk}, out_path)
    return {"arch": arch, "tensors": len(trunk), "step": state["step"]}


def load_backbone(path: str, **overrides):
    """Build a :class:`upreid.models.ResNet` from an exported backbone file (``overrides`` e.g.
    ``last_stride=1`` for fine-tuning)."""
    from upreid.models import ResNet
    obj = ckpt_io.load(path, expect=ckpt_io.BACKBONE_FORMAT)
    arch = {**obj["arch"], **overrides}
    net = ResNet(arch["depth"], last_stride=arch["last_stride"], ibn=arch["ibn"])
    net.load_state_dict(obj["state_dict"])
    return net
