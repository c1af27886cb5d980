"""The Pillow + torch fallback loader (used without DALI, or with backend='torch').

Randomness is a pure function of (seed, rank, epoch, position in the epoch), so results do not depend
on the number of workers and a resumed run reproduces its batches.
"""
from __future__ import annotations

import atexit
import functools
import os
import sys
import weakref
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .base import BaseLoader, dali_pipelines_built
from .imageio import BadImageError, decode_pil
from .transforms import SAMPLE_FNS


class _Samples(Dataset):
    def __init__(self, kind, records, aug, seed, rank):
        self.kind, self.records, self.aug = kind, records, aug
        self.seed, self.rank = seed, rank
        self.fn = SAMPLE_FNS[kind]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        epoch, pos, index = key
        rec = self.records[index]
        try:
            img = decode_pil(rec.path)
        except BadImageError as e:
            # Reported, not raised: a worker process's exception reaches the main process re-wrapped as a
            # RuntimeError carrying a traceback; the loader raises (or counts) it there, under its own type.
            return {"_bad": rec.path, "_reason": e.reason}
        rng = np.random.default_rng([self.seed, 9, self.rank, epoch, pos])
        out = self.fn(img, rng, self.aug)
        out["index"] = torch.tensor(index, dtype=torch.int64)
        if self.kind != "pretrain":
            out["pids"] = torch.tensor(rec.pid, dtype=torch.int64)
            out["camids"] = torch.tensor(rec.camid, dtype=torch.int64)
        return out


def _collate(items):
    good = [it for it in items if "_bad" not in it]
    bad = [(it["_bad"], it["_reason"]) for it in items if "_bad" in it]
    batch = default_collate(good) if good else {}
    batch["_skipped"] = bad
    return batch


class _EpochBatches:
    """Batch sampler of the loader's current epoch: lists of (epoch, position, index) keys. It is
    iterated in the main process at the start of every epoch, so one DataLoader (and its persistent
    workers) serves all epochs. It holds its loader weakly: a strong reference would make a cycle
    (loader -> DataLoader -> batch sampler -> loader), so a dropped loader's worker processes would be
    shut down by whatever later garbage collection finds the cycle, at an arbitrary point of the
    program, instead of when the loader goes."""

    def __init__(self, loader):
        self.loader = weakref.proxy(loader)

    def __iter__(self):
        epoch, pos = self.loader.epoch, 0
        for b in self.loader.sampler.batches(epoch):
            yield [(epoch, pos + j, i) for j, i in enumerate(b)]
            pos += len(b)

    def __len__(self):
        return len(self.loader.sampler.batches(self.loader.epoch))


def _worker_init(_, spawned: bool = False):
    torch.set_num_threads(1)
    if spawned:
        # A spawned worker ends with sys.exit(), i.e. a full interpreter teardown that runs the C++
        # static destructors of every loaded library; one of them can meet a thread that is still
        # running and abort ("terminate called without an active exception", seen once in 11 full
        # test runs), which the main process then reports from close() as "DataLoader worker ...
        # killed by signal: Aborted". A forked worker never gets there: it leaves with os._exit()
        # right after multiprocessing's own cleanup. Leave the same way: by the time atexit handlers
        # run, multiprocessing has flushed the queues and joined its threads. The status is the one
        # the process was leaving with (spawn's entry point ends in sys.exit(exitcode)), so a worker
        # whose loop failed still reports it; leaving any other way (not through sys.exit) reports 1.
        _exit_status["code"] = 1
        sys.exit = functools.partial(_exit_recording_status, sys.exit)
        atexit.register(lambda: os._exit(_exit_status["code"]))


_exit_status = {"code": 1}


def _exit_recording_status(real_exit, code=None):
    """``sys.exit`` in a spawned worker: remembers the status for the atexit handler that ends the
    process with ``os._exit`` (``None`` is 0, an int itself, anything else 1, as the interpreter maps it)."""
    _exit_status["code"] = 0 if code is None else code if isinstance(code, int) else 1
    real_exit(code)


class TorchLoader(BaseLoader):
    backend = "torch"

    def __init__(self, kind, records, sampler, aug, *, device, seed, on_bad_image, rank, world, workers=2,
                 prefetch=2):
        super().__init__(kind, records, sampler, aug, seed=seed, on_bad_image=on_bad_image, rank=rank, world=world)
        self.device = torch.device(device)
        self.workers, self.prefetch = workers, prefetch
        self.dataset = _Samples(kind, self.records, aug, seed, rank)
        self._dl = None

    def _dataloader(self) -> DataLoader:
        if self._dl is None:
            # workers forked after DALI has been loaded in this process crash (DALI's thread pools do
            # not survive fork: a forked worker aborts at exit, "terminate called without an active
            # exception"): spawn them then (slower start; needs the __main__ guard). Loaded, not only
            # built by this package: a pipeline of any other code counts too.
            dali_loaded = dali_pipelines_built() or "nvidia.dali" in sys.modules
            ctx = "spawn" if self.workers and dali_loaded else None
            self._dl = DataLoader(self.dataset, batch_sampler=_EpochBatches(self), collate_fn=_collate,
                                  num_workers=self.workers, multiprocessing_context=ctx,
                                  worker_init_fn=functools.partial(_worker_init, spawned=ctx == "spawn")
                                  if self.workers else None,
                                  persistent_workers=self.workers > 0, pin_memory=self.device.type == "cuda",
                                  prefetch_factor=self.prefetch if self.workers else None)
        return self._dl

    def close(self) -> None:
        """Shut the worker processes down now (they persist across epochs); a later epoch starts new ones."""
        dl, self._dl = self._dl, None
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __iter__(self) -> Iterator[dict]:
        samples, n_batches, skipped = 0, 0, []
        for batch in self._dataloader():
            failed = batch.pop("_skipped")
            if failed and self.on_bad_image == "error":
                raise BadImageError(*failed[0])
            bad = [path for path, _ in failed]
            skipped += bad
            if not batch:
                self._whole_batch_failed(bad)
                continue
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            samples += len(batch["index"])
            n_batches += 1
            try:
                yield batch
            except GeneratorExit:       # the consumer stopped here: the run's last step, or a shorter epoch
                self._finish_epoch(samples, n_batches, skipped, stopped=True)
                raise
        self._finish_epoch(samples, n_batches, skipped)
