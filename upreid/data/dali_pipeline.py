"""NVIDIA DALI pipelines for pre-training, fine-tuning and evaluation (GPU decode with
``device="mixed"`` where CUDA exists, ``device="cpu"`` with ``device_id=None`` anywhere).

Samples enter through an ``external_source`` fed by the same samplers as the torch fallback (so P x K
batches, sharding and ordered evaluation are identical); the bytes are checked cheaply before DALI
sees them so that a bad file is named (or skipped) instead of failing a batch. A file that passes
those checks but fails inside DALI's decoder invalidates the pipeline: the loader then finds it by
decoding the pending batches' files one by one, names it, and (``on_bad_image='skip'``) skips and
counts it, rebuilds the pipeline and goes on with the epoch. Random parameters
follow :mod:`upreid.data.augment` with DALI's random operators: crop boxes and erasing rectangles are
computed with DALI arithmetic and returned as outputs, grayscale is ``hsv(saturation=0)`` (DALI has
no grayscale operator), and coin flips are cast before arithmetic (``coin_flip`` has no float type).
Per-sample branches (grayscale, blur, erasing, colour jitter) use DALI conditionals, so only the
selected samples pay for them; the colour jitter's ops are built only when ``color_p > 0``. Tensors
reach torch through the DALI PyTorch plugin.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Iterator, List

import numpy as np
import torch

from upreid.utils.deps import MissingDependencyError

from .augment import color_params, crop_size
from .base import BaseLoader, note_dali_pipeline_built
from .imageio import BadImageError, read_bytes

log = logging.getLogger(__name__)

INSTALL_HINT = ("NVIDIA DALI is not installed. Install the wheel matching your CUDA, e.g. "
                "`pip install nvidia-dali-cuda120` (the plain `nvidia-dali` name on PyPI is not the real "
                "package; CPU pipelines work without a GPU), or use backend='torch'")


def import_dali():
    """Import DALI lazily; a clear ImportError when it is missing."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
    except ImportError as e:
        raise MissingDependencyError(f"{INSTALL_HINT} ({e})") from None
    return dali, fn, types, dmath


class _Source:
    """Batch callable for ``external_source(batch_info=True)``: one epoch of (encoded bytes, index,
    pid, camid) batches; raising StopIteration ends DALI's epoch. The epoch's batches are taken from
    the sampler when DALI asks for iteration 0, i.e. after the iterator's reset, so ``set_epoch``
    called between epochs is honoured. ``fed`` holds the record indices of every batch handed to DALI
    since iteration 0 (what to probe when the pipeline fails); after a rebuild mid-epoch, ``resume``
    is fed from iteration 0 instead of a new epoch. Files DALI's decoder failed on (``undecodable``,
    path -> reason) are skipped or named like the files the structural check refuses."""

    def __init__(self, loader: "DaliLoader"):
        self.loader = loader
        self.skipped: List[str] = []
        self.batches = iter(())
        self.fed: List[List[int]] = []
        self.skipped_at: List[int] = []   # len(skipped) once each batch of ``fed`` was taken (its skips included)
        self.resume = None
        self.undecodable: dict = {}

    def __call__(self, info):
        if info.iteration == 0:
            if self.resume is not None:           # a pipeline rebuilt mid-epoch goes on where it failed
                self.batches, self.resume = self.resume, None
            else:
                self.batches = iter(self.loader.sampler.batches(self.loader.epoch))
                self.skipped = []
            self.fed, self.skipped_at = [], []
        recs = self.loader.records
        skip = self.loader.on_bad_image == "skip"
        while True:
            idx = next(self.batches)      # StopIteration ends the epoch
            enc, keep = [], []
            for i in idx:
                try:
                    reason = self.undecodable.get(recs[i].path)
                    if reason is not None:
                        raise BadImageError(recs[i].path, reason)
                    enc.append(read_bytes(recs[i].path))
                    keep.append(i)
                except BadImageError:
                    if not skip:
                        raise
                    self.skipped.append(recs[i].path)
            if keep:
                break
            self.loader._whole_batch_failed([recs[i].path for i in idx])
        self.fed.append(keep)
        self.skipped_at.append(len(self.skipped))
        out = (enc, [np.array(i, np.int64) for i in keep])
        if self.loader.kind == "pretrain":        # labels are not used: do not ship them
            return out
        return out + ([np.array(recs[i].pid, np.int64) for i in keep],
                      [np.array(recs[i].camid, np.int64) for i in keep])


def _dali_reason(err: BaseException) -> str:
    """The line of a DALI error that says what failed (its message starts with a traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    keep = [ln for ln in after if "no longer valid" not in ln] or lines[-1:]
    return keep[0].rstrip(" :") if keep else type(err).__name__


def find_undecodable(paths: List[str], device: str = "cpu", device_id=None) -> dict:
    """Decode each file alone with DALI's image decoder; ``{path: reason}`` of those that fail. A
    failure invalidates a DALI pipeline, so the probe pipeline is rebuilt after each one."""
    dali, fn, types, _ = import_dali()
    gpu = device == "gpu"

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=device_id if gpu else None,
                       prefetch_queue_depth=1)
    def probe():
        enc = fn.external_source(name="enc", dtype=types.UINT8)
        return fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)

    bad, pipe = {}, None
    for path in paths:
        if pipe is None:
            pipe = probe()
            pipe.build()
        try:
            pipe.feed_input("enc", [read_bytes(path)])
            pipe.run()
        except BadImageError as e:
            bad[path] = e.reason
        except Exception as e:                    # DALI's decoder failed: this pipeline is spent
            bad[path] = f"passes the header checks but DALI's image decoder fails on it ({_dali_reason(e)})"
            pipe = None
    return bad


def _uniform(fn, types):
    return fn.random.uniform(range=[0.0, 1.0], dtype=types.FLOAT)


def _coin(fn, types, p):
    c = fn.random.coin_flip(probability=float(p))
    return fn.cast(c, dtype=types.BOOL), fn.cast(c, dtype=types.FLOAT)


def _normalize(fn, types, img, aug, mirror=None):
    kw = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[m * 255 for m in aug.mean], std=[s * 255 for s in aug.std], **kw)


def _erase(fn, types, dmath, img, aug, h, w):
    """Single-shot random erasing (augment.erase_box); returns the image and the normalised box."""
    do, dof = _coin(fn, types, aug.erasing_p)
    ua, ur, uy, ux = (_uniform(fn, types) for _ in range(4))
    lo, hi = aug.erasing_area
    area = (lo + ua * (hi - lo)) * float(h * w)
    llo, lhi = math.log(aug.erasing_ratio[0]), math.log(aug.erasing_ratio[1])
    r = dmath.exp(llo + ur * (lhi - llo))
    eh = dmath.min(float(h), dmath.floor(dmath.sqrt(area * r) + 0.5))
    ew = dmath.min(float(w), dmath.floor(dmath.sqrt(area / r) + 0.5))
    top = dmath.min(float(h) - eh, dmath.floor(uy * (float(h) - eh + 1.0)))
    left = dmath.min(float(w) - ew, dmath.floor(ux * (float(w) - ew + 1.0)))
    if do:
        img = fn.erase(img, anchor=fn.stack(top, left), shape=fn.stack(eh, ew), axis_names="HW", fill_value=0.0)
    else:
        img = img
    box = fn.stack(top / float(h), left / float(w), (top + eh) / float(h), (left + ew) / float(w)) * dof
    return img, box


def _color(fn, types, dmath, img, aug):
    """Single-shot colour jitter (augment's rule) of a uint8 HWC image; returns the image and the draws
    (g_r, g_g, g_b, brightness, contrast), all ones where not applied. Only built when color_p > 0."""
    do, dof = _coin(fn, types, aug.color_p)
    gr, gg, gb, b, k = color_params([_uniform(fn, types) for _ in range(5)], aug)   # DALI arithmetic
    if do:
        x = fn.cast(img, dtype=types.FLOAT)
        m = fn.reductions.mean(x)
        img = fn.cast(dmath.clamp(dmath.floor(((x - m) * k + m) * fn.stack(gr, gg, gb) * b + 0.5), 0.0, 255.0),
                      dtype=types.UINT8)
    else:
        img = img
    params = fn.stack(gr, gg, gb, b, k) * dof + (1.0 - dof)
    return img, params


def _pretrain_view(fn, types, dmath, img, H, W, aug):
    ua, ur, uy, ux = (_uniform(fn, types) for _ in range(4))
    more = []                    # the attempts after the first: one operator for all (none for one attempt)
    if aug.crop_attempts > 1:
        extra = fn.random.uniform(range=[0.0, 1.0], shape=[2 * (aug.crop_attempts - 1)], dtype=types.FLOAT)
        more = [extra[i] for i in range(2 * (aug.crop_attempts - 1))]
    bh, bw = crop_size([ua, *more[0::2]], [ur, *more[1::2]], H, W, aug.crop_scale, aug.crop_ratio,
                       exp=dmath.exp, sqrt=dmath.sqrt, minimum=dmath.min,
                       as_float=lambda b: fn.cast(b, dtype=types.FLOAT))
    y0 = uy * (1.0 - bh)
    x0 = ux * (1.0 - bw)
    v = fn.resize(img, size=[aug.height, aug.width], roi_start=fn.stack(y0, x0),
                  roi_end=fn.stack(y0 + bh, x0 + bw), roi_relative=True)
    color = None
    if aug.color_p > 0:
        v, color = _color(fn, types, dmath, v, aug)
    gray, grayf = _coin(fn, types, aug.grayscale_p)
    if gray:
        v = fn.hsv(v, saturation=0.0)
    else:
        v = v
    blur, blurf = _coin(fn, types, aug.blur_p)
    sigma = aug.blur_sigma[0] + _uniform(fn, types) * (aug.blur_sigma[1] - aug.blur_sigma[0])
    if blur:
        v = fn.gaussian_blur(v, sigma=sigma)
    else:
        v = v
    flip, flipf = _coin(fn, types, aug.flip_p)
    v = _normalize(fn, types, v, aug, mirror=fn.cast(flip, dtype=types.INT32))
    v, erase = _erase(fn, types, dmath, v, aug, aug.height, aug.width)
    box = fn.stack(y0, x0, y0 + bh, x0 + bw)
    return (v, box, flipf, grayf, sigma * blurf, erase) + ((color,) if color is not None else ())


OUTPUTS = {
    "pretrain": ["original", "view1", "box1", "flip1", "gray1", "sigma1", "erase1",
                 "view2", "box2", "flip2", "gray2", "sigma2", "erase2", "index"],
    "finetune": ["images", "flip", "shift", "erase", "index", "pids", "camids"],
    "eval": ["images", "index", "pids", "camids"],
}


def output_names(kind: str, aug) -> list:
    """The pipeline's outputs in order: OUTPUTS, plus the colour draws when colour jitter is on and the
    mirrored images under flip_test."""
    names = list(OUTPUTS[kind])
    if getattr(aug, "color_p", 0) > 0:
        if kind == "pretrain":
            names.insert(names.index("erase1") + 1, "color1")
            names.insert(names.index("erase2") + 1, "color2")
        else:
            names.append("color")
    if kind == "eval" and aug.flip_test:
        names.insert(1, "images_flipped")
    return names


def build_pipeline(kind: str, source, aug, *, batch_size: int, device: str, threads: int, seed: int,
                   prefetch: int = 2, device_id=None):
    """The DALI pipeline of ``kind``; ``device`` 'cpu' (device_id None) or 'gpu'."""
    dali, fn, types, dmath = import_dali()
    gpu = device == "gpu"

    @dali.pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id if gpu else None,
                       seed=seed, prefetch_queue_depth=prefetch, enable_conditionals=True,
                       exec_dynamic=True)
    def pipe():
        n_out = 2 if kind == "pretrain" else 4
        enc, idx, *labels = fn.external_source(source=source, num_outputs=n_out, batch=True, batch_info=True,
                                               dtype=[types.UINT8] + [types.INT64] * (n_out - 1))
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if kind == "pretrain":
            shape = fn.peek_image_shape(enc, dtype=types.FLOAT)     # [H, W, C] before decoding
            H, W = shape[0], shape[1]
            original = _normalize(fn, types, fn.resize(img, size=[aug.height, aug.width]), aug)
            v1 = _pretrain_view(fn, types, dmath, img, H, W, aug)
            v2 = _pretrain_view(fn, types, dmath, img, H, W, aug)
            return (original, *v1, *v2, idx)
        resized = fn.resize(img, size=[aug.height, aug.width])
        if kind == "finetune":
            color = ()
            if aug.color_p > 0:
                resized, c = _color(fn, types, dmath, resized, aug)
                color = (c,)
            flip, flipf = _coin(fn, types, aug.flip_p)
            p = aug.pad
            offsets = [float(v) for v in range(-p, p + 1)]
            dy = fn.random.uniform(values=offsets)
            dx = fn.random.uniform(values=offsets)
            v = fn.slice(resized, start=fn.cast(fn.stack(dy, dx), dtype=types.INT32),
                         shape=[aug.height, aug.width], axis_names="HW", out_of_bounds_policy="pad",
                         fill_values=0)
            v = _normalize(fn, types, v, aug, mirror=fn.cast(flip, dtype=types.INT32))
            v, erase = _erase(fn, types, dmath, v, aug, aug.height, aug.width)
            # mirroring after the shift == shifting the mirrored image by -dx: report the latter
            shift = fn.stack(dy, dx * (1.0 - 2.0 * flipf))
            return (v, flipf, shift, erase, idx, *labels, *color)
        images = _normalize(fn, types, resized, aug)
        if aug.flip_test:
            return (images, _normalize(fn, types, resized, aug, mirror=1), idx, *labels)
        return (images, idx, *labels)

    return pipe()


class DaliLoader(BaseLoader):
    backend = "dali"

    def __init__(self, kind, records, sampler, aug, *, batch_size, device, seed, on_bad_image, rank, world,
                 threads=2, prefetch=2):
        super().__init__(kind, records, sampler, aug, seed=seed, on_bad_image=on_bad_image, rank=rank, world=world)
        import_dali()
        self.device = torch.device(device)
        self.dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        self.batch_size = max(len(b) for b in sampler.batches(0)) if kind == "pretrain" else batch_size
        if kind == "finetune":
            self.batch_size = sampler.p * sampler.k
        self.threads, self.prefetch = threads, prefetch
        self.output_map = output_names(kind, aug)
        self._source = _Source(self)
        self._iter = None
        self.rebuilds = 0

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        dev_id = self._device_id()
        # Seeded by the epoch: every epoch runs on a pipeline of its own (see __iter__). A pipeline rebuilt
        # after a decoder failure gets its own random stream (not the epoch's start again).
        seed = (self.seed * 7919 + self.rank + 104729 * self.rebuilds + 15485863 * self.epoch) % (2 ** 31)
        self.pipe = build_pipeline(self.kind, self._source, self.aug, batch_size=self.batch_size,
                                   device=self.dali_device, threads=self.threads, seed=seed,
                                   prefetch=self.prefetch, device_id=dev_id)
        note_dali_pipeline_built()
        self.pipe.build()
        self._iter = DALIGenericIterator(self.pipe, self.output_map, last_batch_policy=LastBatchPolicy.PARTIAL,
                                         auto_reset=False, prepare_first_batch=False)

    def _device_id(self):
        if self.dali_device != "gpu":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _recover(self, pending: List[List[int]], err: BaseException) -> None:
        """DALI failed inside the pipeline (which is then unusable) on one of the ``pending`` batches
        (fed, not delivered): find the files its decoder fails on, one by one, and name them; with
        on_bad_image='skip', rebuild the pipeline and go on with the epoch from the failed batch."""
        self._iter, self.pipe = None, None
        paths = [self.records[i].path for b in pending for i in b]
        bad = find_undecodable(paths, self.dali_device, self._device_id())
        if not bad:
            raise RuntimeError(f"DALI failed on a batch whose {len(paths)} files each decode alone "
                               f"(e.g. {paths[:3]}): {_dali_reason(err)}") from err
        log.warning("DALI's decoder fails on %d file(s): %s", len(bad), sorted(bad)[:3])
        self._source.undecodable.update(bad)
        if self.on_bad_image != "skip":
            path = next(p for p in paths if p in bad)
            raise BadImageError(path, bad[path]) from None
        # the pending batches again (the source now skips and counts the bad files), then the rest
        self._source.resume = itertools.chain(pending, self._source.batches)
        self.rebuilds += 1
        self._build()

    def __iter__(self) -> Iterator[dict]:
        # Every epoch on a fresh pipeline seeded by (seed, rank, epoch): its random stream then depends on
        # the epoch alone. A run resumed in a later epoch (which passes over the epoch's consumed batches)
        # and an epoch cut short (train.max_steps_per_epoch: the old pipeline has batches of it in flight)
        # leave every following epoch as the uninterrupted run has it. A rebuild takes 5-70 ms on a CPU.
        self._iter, self.pipe = None, None
        self._source.resume = None
        self.rebuilds = 0
        self._build()
        samples, n_batches, delivered = 0, 0, 0       # delivered: by this pipeline since its iteration 0
        while True:
            try:
                out = next(self._iter)
            except StopIteration:
                break
            except BadImageError:
                self._iter = None                     # the next epoch starts on a fresh pipeline
                raise
            except Exception as e:                    # a DALI failure: this pipeline is no longer valid
                self._recover(self._source.fed[delivered:], e)
                delivered = 0
                continue
            delivered += 1
            batch = {k: v.to(self.device, non_blocking=True) for k, v in out[0].items()}
            samples += len(batch["index"])
            n_batches += 1
            try:
                yield batch
            except GeneratorExit:       # the consumer stopped here: the run's last step, or a shorter epoch
                # only the files of the batches delivered (delivered >= 1 here): DALI has taken (and checked)
                # some beyond them
                upto = self._source.skipped_at[delivered - 1]
                self._finish_epoch(samples, n_batches, list(self._source.skipped[:upto]), stopped=True)
                raise
        self._finish_epoch(samples, n_batches, list(self._source.skipped))
