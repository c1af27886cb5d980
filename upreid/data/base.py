"""What every loader shares: the kinds and backends, epoch bookkeeping, and the per-step stream the
trainer consumes. The DALI and torch pipelines import this module; :mod:`upreid.data.loader` builds
them. Imports run one way: base -> pipelines -> loader."""
from __future__ import annotations

import logging
from typing import Callable, Iterator, List, Sequence

from .imageio import BadImageError, check_policy
from .records import Record

log = logging.getLogger("upreid.data")

KINDS = ("pretrain", "finetune", "eval")
BACKENDS = ("auto", "dali", "torch")

# How many DALI pipelines ran in this process: the torch fallback spawns (instead of forking) its
# workers once one has, because DALI's thread pools do not survive a fork.
_dali_pipelines_built = 0


def note_dali_pipeline_built() -> None:
    global _dali_pipelines_built
    _dali_pipelines_built += 1


def dali_pipelines_built() -> int:
    return _dali_pipelines_built


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def resolve_backend(backend: str) -> str:
    """'auto' -> 'dali' when DALI is installed, else 'torch'; other names are checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "torch"
    return backend


class BaseLoader:
    """Epoch bookkeeping shared by the backends. A loader is also a context manager that closes it."""

    backend = "base"

    def close(self) -> None:
        """Release what the loader holds beyond its own object (worker processes); no-op here."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __init__(self, kind: str, records: Sequence[Record], sampler, aug, *, seed: int, on_bad_image: str,
                 rank: int, world: int):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not records:
            raise ValueError(f"{kind} loader: no records (the split is empty)")
        self.kind, self.records, self.sampler, self.aug = kind, list(records), sampler, aug
        self.seed, self.on_bad_image = seed, check_policy(on_bad_image)
        self.rank, self.world = rank, world
        self.epoch = 0
        self.summary: dict = {}

    def __len__(self) -> int:
        return len(self.sampler.batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _whole_batch_failed(self, paths: List[str]) -> None:
        """Every image of one batch failed (``on_bad_image='skip'``). One process skips the batch: its
        step takes the next one. Under DDP that rank would then take every later step one batch ahead
        of the others and end its epochs a step early (epoch-end checkpoints and evaluations at
        different steps on different ranks), so stop there and name the files."""
        if self.world > 1:
            raise BadImageError(paths[0], f"every image of a {self.kind} batch on rank {self.rank} of {self.world} "
                                f"failed ({len(paths)}: {paths[:4]})",
                                hint="on_bad_image='skip' cannot drop a whole batch under DDP, where the ranks "
                                     "must step together: fix or remove these files")

    def _finish_epoch(self, samples: int, batches: int, skipped: List[str], stopped: bool = False) -> None:
        """Log the epoch's counts and keep them in ``summary``; also when the consumer stops early (the
        last step of a run ends its iteration at a batch, not at the epoch's end), so that the last epoch's
        skipped images are named too."""
        self.summary = {"epoch": self.epoch, "samples": samples, "batches": batches,
                        "skipped": len(skipped), "skipped_paths": list(skipped),
                        "not_drawn": self.sampler.dropped(self.epoch), "backend": self.backend}
        msg = (f"{self.kind} epoch {self.epoch} (rank {self.rank}/{self.world}, {self.backend}): {samples} samples "
               f"in {batches} batches, {len(skipped)} bad images skipped")
        if skipped:
            msg += f" (e.g. {skipped[:3]})"
        if self.summary["not_drawn"]:
            msg += f", {self.summary['not_drawn']} images not drawn by the sampler this epoch"
        total = len(self.sampler.batches(self.epoch)) if stopped else batches   # (a sampler may not cache)
        if batches < total:
            msg += f" (the consumer stopped after {batches} of the epoch's {total} batches)"
        log.info(msg)
        self.epoch += 1


class StepStream:
    """An epoch loader as the trainer's stream of steps: ``(epoch, index in the epoch, batch)`` from
    global step ``start_step`` on, with ``steps_in_epoch(e)`` batches taken from epoch ``e`` (at most
    the sampler's). Resuming inside an epoch iterates past the batches already consumed (their
    randomness is keyed by the position in the epoch, so the batches that follow are the ones the
    interrupted run would have seen)."""

    def __init__(self, loader, steps_in_epoch: Callable[[int], int], start_step: int = 0):
        self.loader, self.steps_in_epoch, self.start_step = loader, steps_in_epoch, start_step

    def position(self, step: int) -> tuple:
        """(epoch, batch index) of global step ``step``."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def __iter__(self) -> Iterator[tuple]:
        epoch, offset = self.position(self.start_step)
        if offset:
            log.info("resuming inside epoch %d: passing over its first %d batches", epoch, offset)
        while True:
            n = self.steps_in_epoch(epoch)
            self.loader.set_epoch(epoch)
            it = iter(self.loader)
            try:
                for i in range(n):      # not one batch more: a shorter epoch stops the loader where it is used
                    try:
                        batch = next(it)
                    except StopIteration:
                        break
                    if i >= offset:
                        yield epoch, i, batch
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            offset, epoch = 0, epoch + 1
