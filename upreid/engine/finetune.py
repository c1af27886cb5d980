"""Supervised fine-tuning (BoT or MGN) on a labelled ReID dataset: one process, or one per device
under ``torchrun``.

``finetune(cfg, resume=...)`` builds the dataset (:func:`upreid.data.build_dataset`), the P x K
fine-tuning loader of :mod:`upreid.data`, the model (:mod:`upreid.models.reid`) initialised from
``cfg["init"]`` (:mod:`upreid.engine.init_weights`), Adam (or SGD) with linear warm-up and step decay
applied per iteration on the fractional epoch, and trains with label-smoothed ID loss + batch-hard
triplet. It checkpoints atomically every ``train.checkpoint_every`` epochs, at the end and on
SIGTERM/SIGINT (mid-epoch); a resumed run continues exactly (weights, optimizer, scaler, RNG states,
epoch and batch position). Evaluation runs every ``eval.every`` epochs and at the end (with and
without re-ranking); the final metrics go to ``results.json`` and the rank lists to ``ranklist.png``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from upreid.engine import checkpoint as ckpt_io
from upreid.engine.config import dump_config
from upreid.engine.finetune_eval import loader_workers, run_evaluation, summarise
from upreid.engine.init_weights import FINETUNE_FORMAT, load_trunk
from upreid.engine.logging_utils import MetricsWriter
from upreid.engine.pretrain import (NonFiniteLossError, RunExistsError, _all_ranks_any, _gather_objects,
                                    _StopFlag, seed_everything, setup_distributed)
from upreid.models.reid import batch_hard_triplet, build_reid_model, cross_entropy_ls

log = logging.getLogger("upreid.finetune")
CHECKPOINT_NAME = "checkpoint.pt"
STRUCTURAL = ("arch", "depth", "ibn", "neck", "mgn_dim")


def lr_factor(epoch: float, warmup: float, warmup_factor: float, milestones, gamma: float) -> float:
    """BoT schedule on a fractional epoch: linear from ``warmup_factor`` to 1 over ``warmup`` epochs,
    times ``gamma`` per milestone passed."""
    w = 1.0 if warmup <= 0 or epoch >= warmup else warmup_factor + (1 - warmup_factor) * epoch / warmup
    return w * gamma ** sum(epoch >= m for m in milestones)


def build_model(cfg: dict, num_classes: int) -> nn.Module:
    m = cfg["model"]
    return build_reid_model(m["arch"], num_classes, depth=m["depth"], last_stride=m["last_stride"], ibn=m["ibn"],
                            neck=m["neck"], pooling=m["pooling"], gem_p=m["gem_p"],
                            test_feature=m["test_feature"], **({"dim": m["mgn_dim"]} if m["arch"] == "mgn" else {}))


def initialise(model: nn.Module, init) -> dict:
    if init in (None, "", "random"):
        return {"format": "random", "loaded": 0, "missing": [], "unexpected": []}
    report = load_trunk(model.trunk, str(init))
    if hasattr(model, "sync_branches"):
        model.sync_branches()
    return report


def load_dataset(cfg: dict):
    from upreid.data import DatasetError, build_dataset
    d = cfg["data"]
    if d["root"] in (None, ""):
        raise DatasetError("data.root is not set: pass data.root=DIR (and data.dataset=NAME); "
                           "`upreid synth --root DIR` writes a synthetic set (data.dataset=synth)")
    return build_dataset(d["dataset"], str(d["root"]))


def _optimizer(model: nn.Module, o: dict) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if o["name"] == "adam":
        return torch.optim.Adam(groups, lr=o["lr"])
    return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"])


def finetune(cfg: dict, resume: str | None = None, overwrite: bool = False, on_step=None) -> dict:
    """Run (or continue) a fine-tuning; returns a summary (``step``, ``epoch``, ``interrupted``,
    ``checkpoint``, ``results``, ``init``). ``on_step(step, metrics)`` after every step (tests)."""
    t, o, d = cfg["train"], cfg["optim"], cfg["data"]
    rank, world, device = setup_distributed(t["device"])
    is_main = rank == 0
    out_dir = t["output"]
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)

    state = None
    if resume:
        resume = ckpt_path if resume == "auto" else resume
        state = ckpt_io.load(resume, expect=FINETUNE_FORMAT)
        saved = state["config"]["model"]
        diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {cfg['model'][k]!r}" for k in STRUCTURAL
                if saved.get(k) != cfg["model"][k]]
        if diff:
            raise ckpt_io.CheckpointError(f"checkpoint {resume!r} is from another model: " + "; ".join(diff))
    elif os.path.exists(ckpt_path) and not overwrite:
        raise RunExistsError(f"{ckpt_path!r} exists: pass --resume to continue that run, --overwrite to "
                             "start over in the same folder, or another train.output")

    dataset = load_dataset(cfg)
    num_classes = len({r.pid for r in dataset.train})
    seed_everything(t["seed"])                                   # same initial weights on every rank
    model = build_model(cfg, num_classes)
    init_report = initialise(model, cfg["init"]) if state is None else state.get("init", {})

    from upreid.data.loader import build_loader
    aug = {k: d[k] for k in ("height", "width", "flip_p", "pad", "erasing_p", "erasing_area", "mean", "std")}
    loader = build_loader("finetune", dataset.train, batch_size=d["p"] * d["k"], backend=d["backend"],
                          device=device.type, aug=aug, seed=t["seed"], rank=rank, world=world, p=d["p"], k=d["k"],
                          workers=loader_workers(d))
    cap = t["max_steps_per_epoch"]
    epochs = int(t["epochs"])
    per_epoch = [min(len(loader.sampler.batches(e)), cap or 10**9) for e in range(epochs)]
    if epochs <= 0 or min(per_epoch) == 0:
        raise ValueError(f"nothing to do: {epochs} epochs of {per_epoch[:1]} steps (train.epochs, data.p x data.k)")
    total = sum(per_epoch)

    amp = t["amp"] if t["amp"] != "auto" else ("bf16" if device.type == "cuda" else "off")
    channels_last = t["channels_last"] if t["channels_last"] != "auto" else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    opt = _optimizer(model, o)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    epoch, offset, step, history = 0, 0, 0, []
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, offset, step, history = int(state["epoch"]), int(state["batch"]), int(state["step"]), list(state["history"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            ckpt_io.set_rng_state(rngs[rank])
        else:
            seed_everything(t["seed"] * 1000 + rank + step)
        if is_main:
            log.info("resumed from %s at epoch %d, batch %d (step %d/%d)", resume, epoch, offset, step, total)
    else:
        seed_everything(t["seed"] * 1000 + rank)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        dump_config(cfg, os.path.join(out_dir, "config.yaml"))
        if init_report:
            with open(os.path.join(out_dir, "init.json"), "w") as f:
                json.dump(init_report, f, indent=2)
    writer = MetricsWriter(out_dir, enabled=is_main)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "off" else contextlib.nullcontext())
    l = cfg["loss"]

    def save(ep: int, batch: int) -> None:
        rng = _gather_objects(ckpt_io.rng_state(), world)
        if is_main:
            ckpt_io.save_atomic({
                "format": FINETUNE_FORMAT, "version": ckpt_io.VERSION, "step": step, "epoch": ep, "batch": batch,
                "config": cfg, "world_size": world, "num_classes": num_classes, "init": init_report,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng, "history": history}, ckpt_path)
        if world > 1:
            dist.barrier()

    def evaluate_now(final: bool) -> dict | None:
        res = None
        if is_main:
            res = run_evaluation(model, dataset, cfg, device, amp, rerank=final and cfg["eval"]["rerank"],
                                 ranklist_path=os.path.join(out_dir, "ranklist.png") if final else None)
            writer.write(step, {f"eval/{k}": v for k, v in summarise(res).items()})
        if world > 1:
            dist.barrier()
        return res

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, disable=not (is_main and t["progress"]), desc="finetune",
               unit="step", dynamic_ncols=True)
    interrupted, metrics = False, {}
    tick, tick_step = time.perf_counter(), step
    try:
        with _StopFlag() as stop:
            while epoch < epochs and not interrupted:
                loader.set_epoch(epoch)
                n = per_epoch[epoch]
                net.train()
                for i, batch in enumerate(loader):
                    if i >= n:
                        break
                    if i < offset:
                        continue
                    lr = o["lr"] * lr_factor(epoch + i / n, o["warmup_epochs"], o["warmup_factor"],
                                             o["milestones"], o["gamma"])
                    for g in opt.param_groups:
                        g["lr"] = lr
                    images = batch["images"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
                    pids = batch["pids"].to(device, non_blocking=True).long()
                    with autocast:
                        out = net(images)
                    loss_id = sum(cross_entropy_ls(z, pids, l["label_smoothing"]) for z in out["logits"]) / len(out["logits"])
                    loss_tri = sum(batch_hard_triplet(f, pids, l["margin"]) for f in out["triplet"]) / len(out["triplet"])
                    loss = l["id_weight"] * loss_id + l["triplet_weight"] * loss_tri
                    if _all_ranks_any(not bool(torch.isfinite(loss.detach())), device):
                        raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step + 1} (id "
                                                 f"{float(loss_id):.4g}, triplet {float(loss_tri):.4g}); lower "
                                                 "optim.lr or check the data; resume with --resume")
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if o["grad_clip"]:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
                    scaler.step(opt)
                    scaler.update()
                    step += 1
                    bar.update(1)
                    if step % t["log_every"] == 0 or i + 1 == n:
                        now = time.perf_counter()
                        acc = float((out["logits"][0].argmax(1) == pids).float().mean())
                        metrics = {"loss": float(loss.detach()), "loss_id": float(loss_id.detach()), "loss_triplet": float(loss_tri.detach()),
                                   "acc": acc, "lr": lr, "epoch": epoch + (i + 1) / n,
                                   "samples_per_s": (step - tick_step) * images.shape[0] * world / max(now - tick, 1e-9)}
                        writer.write(step, metrics)
                        bar.set_postfix({"id": f"{metrics['loss_id']:.3f}", "tri": f"{metrics['loss_triplet']:.3f}",
                                         "acc": f"{acc:.2f}", "lr": f"{lr:.2g}"}, refresh=False)
                        tick, tick_step = now, step
                    if on_step is not None:
                        on_step(step, {"loss": loss.detach()})
                    if _all_ranks_any(stop.signal is not None, device) and not (i + 1 == n and epoch + 1 == epochs):
                        save(epoch, i + 1) if i + 1 < n else save(epoch + 1, 0)
                        interrupted = True
                        if is_main:
                            log.warning("interrupted (signal) at step %d/%d; checkpoint %s written; continue "
                                        "with --resume", step, total, ckpt_path)
                        break
                if interrupted:
                    break
                epoch, offset = epoch + 1, 0
                ev = cfg["eval"]["every"]
                if ev and epoch % ev == 0 and epoch < epochs:
                    res = evaluate_now(final=False)
                    if res is not None:
                        history.append({"epoch": epoch, **summarise(res)})
                if epoch % t["checkpoint_every"] == 0 and epoch < epochs:
                    save(epoch, 0)
            results = None
            if not interrupted:
                save(epoch, 0)
                results = evaluate_now(final=True)
                if is_main:
                    payload = {"final": results, "history": history, "init": init_report, "epochs": epochs,
                               "steps": step, "config": cfg}
                    tmp = os.path.join(out_dir, "results.json.tmp")
                    with open(tmp, "w") as f:
                        json.dump(payload, f, indent=2)
                    os.replace(tmp, os.path.join(out_dir, "results.json"))
    finally:
        bar.close()
        writer.close()
    return {"step": step, "total": total, "epoch": epoch, "interrupted": interrupted, "checkpoint": ckpt_path,
            "results": results, "init": init_report, "metrics": metrics, "rank": rank, "world": world,
            "output": out_dir}
