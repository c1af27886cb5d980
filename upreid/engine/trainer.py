"""The one training loop of upreid: pre-training and fine-tuning are two tasks on it.

The :class:`Trainer` owns what every run needs: the device and the process group, AMP and the
gradient scaler, DDP, the stop signal (SIGTERM/SIGINT become a checkpoint at the next step boundary),
the non-finite loss check, checkpoint and exact resume (weights, optimizer, scaler, RNG states, data
position), metrics (``metrics.jsonl``, TensorBoard) and the progress bar. A task
(:class:`upreid.engine.tasks.Task`) brings the model, the data stream, the loss and the learning rate
of a step; :class:`upreid.engine.hooks.Hook` objects add the rest (evaluation, results files).

The run's position is one integer, the global step; a task maps it to (epoch, batch) through its
stream, so a run resumed at step s sees the batches the uninterrupted run saw after step s.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

import torch
from torch import nn

from upreid.engine import checkpoint as ckpt_io
from upreid.engine.config import ConfigError, dump_config
from upreid.engine.logging_utils import MetricsWriter
from upreid.engine.resume import check_resume
from upreid.utils import distributed as dist

log = logging.getLogger("upreid.trainer")
CHECKPOINT_NAME = "checkpoint.pt"
# What a finished run leaves that a new run in the same folder (--overwrite) must not inherit: the
# checkpoints (a later --resume would continue the old run) and the final evaluation's files (they
# would describe the old run until the new one ends). metrics.jsonl, config.yaml and init.json are
# rewritten at the start; TensorBoard purges the old steps itself.
PREVIOUS_RUN_FILES = (CHECKPOINT_NAME, f"{CHECKPOINT_NAME}.tmp", f"{CHECKPOINT_NAME}.prev", f"{CHECKPOINT_NAME}.prev.tmp",
                      "results.json", "ranklist.png", "cmc.png", "distances.png")


class NonFiniteLossError(RuntimeError):
    pass


class RunExistsError(RuntimeError):
    pass


class OutputError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ helpers
def resolve_device(spec: str) -> torch.device:
    """``train.device`` -> this process's device (``cuda`` means ``cuda:LOCAL_RANK`` under torchrun)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but CUDA is not available here; use train.device=cpu "
                          "or auto")
    index = int(spec.split(":")[1]) if ":" in spec else dist.local_rank()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={spec!r}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s) (0..{torch.cuda.device_count() - 1})")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def check_output(path: str) -> None:
    """Refuse an output folder that cannot be created, before any work (nothing is created here)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == os.path.abspath(path) and not os.path.isdir(probe):
        raise OutputError(f"train.output={path!r} is a file, not a folder")
    if not os.path.isdir(probe):
        raise OutputError(f"train.output={path!r} cannot be created: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"train.output={path!r} cannot be created or written: no write permission in {probe!r}")


def param_groups(model: nn.Module, weight_decay: float, trunk_lr_mult: float = 1.0, new_layers=()) -> list:
    """Weight decay on weights, none on BN parameters and biases (the usual practice for 1-d tensors).

    ``trunk_lr_mult`` != 1 splits the parameters in two: those of the modules named in ``new_layers``
    (the heads an initialisation does not provide) learn at the schedule's lr, every other parameter
    at ``trunk_lr_mult`` times it. Each group's ``lr_mult`` scales the lr in :meth:`Trainer._step`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def pair(params, mult):
        return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr_mult": mult},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_mult": mult}]
    if trunk_lr_mult == 1.0:
        return pair([p for _, p in named], 1.0)
    new = tuple(f"{m}." for m in new_layers)
    unknown = [m for m in new_layers if not hasattr(model, m)]
    if unknown or not any(n.startswith(new) for n, _ in named):   # the heads would learn at the trunk's rate
        raise ValueError(f"optim.trunk_lr_mult={trunk_lr_mult}: {type(model).__name__} "
                         + (f"has no layers named {unknown}" if unknown else
                            "names no new layer with trainable parameters (NEW_LAYERS)")
                         + "; the heads cannot be told from the trunk")
    return (pair([p for n, p in named if not n.startswith(new)], float(trunk_lr_mult))
            + pair([p for n, p in named if n.startswith(new)], 1.0))


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the current step and returns.
    A second Ctrl-C stops at once."""

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
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


PROGRESS_LINE_S = 30.0     # seconds between progress log lines where no bar is drawn (see Trainer.run)


def _duration(seconds: float) -> str:
    if seconds != seconds:                 # nan: no pace yet
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def exit_status(summary: dict) -> int:
    """The exit status of a command whose run a signal stopped: 128 + the signal (130 for Ctrl-C, 143 for
    SIGTERM), the shell's convention; SIGTERM on a rank that stopped because another rank was signalled."""
    return 128 + int(summary.get("signal") or signal.SIGTERM)


class RunInterrupted(Exception):
    """A run stopped by SIGTERM / SIGINT before its end (its checkpoint written), where the caller
    needed it finished: a chain of runs (``upreid demo``, the studies) stops here rather than going on
    with a half-trained model. Not a RuntimeError: code that handles errors does not take it for one.
    ``exit_code``: :func:`exit_status` of the run."""

    def __init__(self, what: str, summary: dict):
        self.what, self.step, self.total = what, summary.get("step"), summary.get("total")
        self.checkpoint = summary.get("checkpoint")
        self.exit_code = exit_status(summary)
        super().__init__(f"{what} was interrupted (signal) at step {self.step}/{self.total}; its checkpoint is "
                         f"{self.checkpoint}")


def finished(summary: dict, what: str) -> dict:
    """``summary`` (a run's) when the run reached its end; :class:`RunInterrupted` when a signal stopped it."""
    if summary.get("interrupted"):
        raise RunInterrupted(what, summary)
    return summary


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Runs ``task`` under ``cfg`` (see the module docstring). ``resume``: None, ``"auto"`` (the
    checkpoint in ``train.output``) or a checkpoint path; ``overwrite`` starts over in a folder that
    holds a run; ``on_step(step, out)`` is called after every step (tests)."""

    def __init__(self, task, cfg, resume: str | None = None, overwrite: bool = False, on_step=None):
        self.task, self.cfg, self.on_step = task, cfg, on_step
        self.resume, self.overwrite = resume, overwrite
        t = cfg["train"]
        self.out_dir = t["output"]
        self.ckpt_path = os.path.join(self.out_dir, CHECKPOINT_NAME)
        self.hooks: list = []
        self.step, self.total, self.interrupted, self.stop_signal = 0, 0, False, None
        self.metrics: dict = {}
        self.last_saved = -1

    # -------------------------------------------------------------------- setup
    def _load_resume_state(self) -> dict | None:
        if self.resume:
            path = self.ckpt_path if self.resume == "auto" else self.resume
            state = ckpt_io.load(path, expect=self.task.format)
            check_resume(self.task.name, state, self.cfg, path)
            saved_world = state.get("world_size")
            if saved_world is not None and saved_world != self.world:
                # data.batch_size is per process: another count is another global batch, so the saved step
                # would be read against other epoch lengths (an epoch replayed or skipped, the schedule moved)
                raise ckpt_io.CheckpointError(
                    f"checkpoint {path!r} was written by {saved_world} process(es), this run has {self.world}: "
                    f"the step's place in the data depends on the number of processes (the batch is per "
                    f"process); resume with {saved_world} (e.g. torchrun --nproc_per_node={saved_world}), or "
                    "start a new run")
            threads = state.get("threads")
            if threads is not None and threads != torch.get_num_threads():
                log.warning("the checkpoint was written with %d CPU threads, this run has %d: the resumed run "
                            "is exact only at the same thread count (set OMP_NUM_THREADS=%d)", threads,
                            torch.get_num_threads(), threads)
            self.resume = path
            return state
        if os.path.exists(self.ckpt_path) and not self.overwrite:
            raise RunExistsError(f"{self.ckpt_path!r} exists: pass --resume to continue that run, --overwrite "
                                 "to start over in the same folder, or another train.output")
        return None

    def _setup(self) -> dict | None:
        t = self.cfg["train"]
        check_output(self.out_dir)
        self.device = resolve_device(t["device"])
        self.rank, self.world = dist.setup(self.device)
        self.is_main = self.rank == 0
        state = self._load_resume_state()        # a bad checkpoint fails before anything is written
        self.start_step = int(state["step"]) if state else 0

        ckpt_io.seed_everything(t["seed"])       # the same initial weights on every rank
        self.task.setup(self, state)             # model, data (from start_step), total steps, hooks
        self.amp = t["amp"] if t["amp"] != "auto" else ("bf16" if self.device.type == "cuda" else "off")
        cl = t["channels_last"] if t["channels_last"] != "auto" else self.device.type == "cuda"
        self.memory_format = torch.channels_last if cl else torch.contiguous_format
        self.model = self.task.model.to(self.device, memory_format=self.memory_format)
        if t["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.optimizer = self.task.optimizer(self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.amp == "fp16"))
        if state:
            self._restore(state)
        else:
            ckpt_io.seed_everything(t["seed"] * 1000 + self.rank)   # rank-specific streams from here on
        self.net = self.model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **self.task.ddp_options())
        self.step = self.start_step
        self.last_saved = self.start_step if state else -1
        return state

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, fresh):
            group.update(hyper)                  # the config's hyper-parameters apply (changes were listed)
        if state.get("scaler") or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state.get("scaler") or {})
        else:   # amp=fp16 now, bf16 or off when the checkpoint was written: no loss scale was saved
            log.warning("the checkpoint holds no fp16 loss scale (it ran with train.amp=%s): the scaler starts "
                        "afresh", state.get("config", {}).get("train", {}).get("amp", "?"))
        self.task.load_state(state)
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            ckpt_io.set_rng_state(rngs[self.rank])
        else:   # a checkpoint without RNG states (the world size itself was checked when it was read)
            log.warning("checkpoint holds %d RNG states, this run has %d ranks: RNG states reseeded "
                        "(the data order and augmentations still follow the step)", len(rngs), self.world)
            ckpt_io.seed_everything(self.cfg["train"]["seed"] * 1000 + self.rank + self.start_step)
        if self.is_main:
            log.info("resumed from %s at step %d/%d", self.resume, self.start_step, self.total)

    def _start_files(self) -> None:
        if not self.is_main:
            return
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"train.output={self.out_dir!r} cannot be created: {e.strerror or e}") from None
        if self.overwrite and not self.resume:
            gone = [n for n in PREVIOUS_RUN_FILES if os.path.isfile(os.path.join(self.out_dir, n))]
            for name in gone:
                os.remove(os.path.join(self.out_dir, name))
            if gone:
                log.info("--overwrite: removed the previous run's %s from %s", ", ".join(gone), self.out_dir)
        dump_config(self.cfg, os.path.join(self.out_dir, "config.yaml"))

    # -------------------------------------------------------------------- checkpoint
    def save(self) -> None:
        rng = dist.gather_objects(ckpt_io.rng_state())
        if self.is_main:
            epoch, batch = self.task.position(self.step)
            ckpt_io.save_atomic({
                "format": self.task.format, "version": ckpt_io.VERSION, "step": self.step, "epoch": epoch,
                "batch": batch, "config": self.cfg.to_dict(), "world_size": self.world,
                "threads": torch.get_num_threads(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                **self.task.state()}, self.ckpt_path, keep_previous=True)
        dist.barrier()
        self.last_saved = self.step

    def _non_finite(self, out: dict) -> NonFiniteLossError:
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.items() if k.startswith("loss"))
        kept = (f"the last good checkpoint {self.ckpt_path!r} (step {self.last_saved}) is kept"
                if self.last_saved >= 0 else "no checkpoint was written yet")
        return NonFiniteLossError(f"non-finite loss at step {self.step + 1} ({terms}); stopping. {kept}. "
                                  f"{self.task.non_finite_advice}; resume with --resume.")

    # -------------------------------------------------------------------- the loop
    def _step(self, batch) -> dict:
        lr = self.task.lr(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
                    if self.amp != "off" else contextlib.nullcontext())
        with autocast:
            out = self.task.forward(self.net, batch)
        loss = out["loss"]
        if dist.any_rank(not bool(torch.isfinite(loss.detach())), self.device):
            raise self._non_finite(out)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.cfg["optim"]["grad_clip"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        out["lr"] = lr
        return out

    def _progress_line(self) -> None:
        """The bar's content as a log line: step, losses, lr, throughput and the time left at that pace."""
        m = self.metrics
        rate = m["samples_per_s"] / max(1, self.task.batch_size * self.world)        # steps per second
        left = (self.total - self.step) / rate if rate > 0 else float("nan")
        shown = {"lr": f"{m['lr']:.3g}", **self.task.postfix(m)}
        terms = ", ".join(f"{k} {v}" for k, v in shown.items())
        log.info("%s step %d/%d (%.0f%%): %s, %.1f samples/s, %s left", self.task.name, self.step,
                 self.total, 100.0 * self.step / max(1, self.total), terms, m["samples_per_s"], _duration(left))

    def _call(self, name: str, *args) -> None:
        for h in self.hooks:
            getattr(h, name)(self, *args)

    def run(self) -> dict:
        state = self._setup()
        t = self.cfg["train"]
        every, unit = t["checkpoint_every"], self.task.checkpoint_unit
        self._start_files()
        self.writer = MetricsWriter(self.out_dir, enabled=self.is_main, keep_until=self.start_step if state else 0)
        from upreid.utils.progress import bar
        self.bar = bar(total=self.total, initial=self.step, enabled=self.is_main and t["progress"],
                        desc=self.task.name, unit="step", dynamic_ncols=True)
        # no bar drawn (output piped or redirected) but progress wanted: a log line now and then instead
        lines = self.is_main and t["progress"] and self.bar.disable
        stream = iter(self.task.stream)
        tick, tick_step, data_time = time.perf_counter(), self.step, 0.0
        last_line = tick
        try:
            with StopFlag() as stop:
                self._call("before_train")
                while self.step < self.total:
                    t0 = time.perf_counter()
                    epoch, index, batch = next(stream)
                    batch = self.task.to_device(batch, self.device, self.memory_format)
                    data_time += time.perf_counter() - t0
                    out = self._step(batch)
                    self.bar.update(1)
                    epoch_end = index + 1 == self.task.steps_in_epoch(epoch)
                    if (self.step % t["log_every"] == 0 or self.step == self.total or epoch_end
                            or self.step == self.start_step + 1):
                        now = time.perf_counter()
                        span = max(now - tick, 1e-9)
                        self.metrics = {**self.task.metrics(out, batch), "lr": out["lr"],
                                        "epoch": epoch + (index + 1) / self.task.steps_in_epoch(epoch),
                                        "samples_per_s": (self.step - tick_step) * self.task.batch_size * self.world / span,
                                        "data_frac": data_time / span}
                        self.writer.write(self.step, self.metrics)
                        self.bar.set_postfix(self.task.postfix(self.metrics), refresh=False)
                        if lines and (now - last_line >= PROGRESS_LINE_S or self.step == self.total):
                            self._progress_line()
                            last_line = now
                        tick, tick_step, data_time = now, self.step, 0.0
                    if self.on_step is not None:
                        self.on_step(self.step, out)
                    self._call("after_step")
                    if epoch_end:
                        self._call("after_epoch", epoch + 1)
                    if self.step < self.total and (self.step % every == 0 if unit == "step"
                                                   else epoch_end and (epoch + 1) % every == 0):
                        self.save()
                    if dist.any_rank(stop.signal is not None, self.device) and self.step < self.total:
                        if self.last_saved != self.step:
                            self.save()
                        self.interrupted = True
                        self.stop_signal = stop.signal      # None on a rank that followed another's signal
                        if self.is_main:
                            log.warning("interrupted (signal) at step %d/%d; checkpoint %s written; continue "
                                        "with --resume", self.step, self.total, self.ckpt_path)
                        break
                stream.close()      # the last epoch's data summary (skipped images) now, not after the evaluation
                if not self.interrupted:
                    if self.last_saved != self.step:
                        self.save()
                    self._call("after_train")
        finally:
            self.bar.close()
            self.writer.close()
            del stream
        return {"step": self.step, "total": self.total, "epoch": self.task.position(self.step)[0],
                "interrupted": self.interrupted, "signal": self.stop_signal, "checkpoint": self.ckpt_path,
                "metrics": self.metrics,
                "rank": self.rank, "world": self.world, "output": self.out_dir, **self.task.summary()}

