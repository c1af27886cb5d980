"""Feature extraction: features of records (a dataset split, or any image folder) through the data
layer's evaluation pipeline (DALI or the Pillow + torch fallback), optionally flip-averaged, written
as the ``.npz`` that ``upreid evaluate`` reads.

``.npz`` layouts written by :func:`extract_to_npz`:

* query and gallery of a dataset: ``query_features, gallery_features, query_pids, gallery_pids,
  query_camids, gallery_camids`` (``upreid evaluate`` reads it as is), plus ``query_paths`` and
  ``gallery_paths``;
* one split, or an image folder: ``features, pids, camids, paths`` (pids / cameras parsed from
  Market-style names such as ``0002_c1s1_000451_03.jpg``, -1 where a name does not follow it).
"""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

log = logging.getLogger("upreid.evaluation")

SPLITS = ("query+gallery", "query", "gallery", "train")


def extract_features(model, records, *, height: int, width: int, mean, std, batch_size: int = 128,
                     flip: bool = False, backend: str = "auto", device="cpu", amp: str = "off",
                     workers: int = 2, progress: bool = True, desc: str = "features",
                     return_index: bool = False) -> tuple:
    """Features ``[N, D]`` (fp32, CPU) of ``records`` in their order, with their pids and camids
    (int64 tensors). ``flip``: average with the features of the mirrored images. ``amp``: 'off',
    'bf16' or 'fp16' autocast. ``return_index``: see :func:`features_from_loader`."""
    loader = _eval_loader(records, height, width, mean, std, flip, batch_size, backend, device, workers)
    return features_from_loader(model, loader, device=device, amp=amp, progress=progress, desc=desc,
                                return_index=return_index)


def _eval_loader(records, height, width, mean, std, flip, batch_size, backend, device, workers):
    """The evaluation pipeline's loader of ``records`` (resized, normalised; ``flip``: mirrored too)."""
    from upreid.data.loader import build_loader
    aug = {"height": height, "width": width, "flip_test": flip, "mean": list(mean), "std": list(std)}
    return build_loader("eval", records, batch_size=batch_size, backend=backend, device=torch.device(device).type,
                        aug=aug, workers=workers)


@torch.no_grad()
def features_from_loader(model, loader, *, device, amp: str = "off", progress: bool = True,
                         desc: str = "features", return_index: bool = False) -> tuple:
    """The features of an evaluation loader's images, back in record order (the loader's
    ``index``), averaged with the mirrored images' where the batches carry them. ``return_index``:
    also the positions of the records they belong to (ascending), which leave out any image the
    loader skipped (``on_bad_image=skip``), so that row ``i`` is record ``index[i]``."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "off" else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    feats, pids, camids, index = [], [], [], []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            with autocast:
                f = model(batch["images"].to(device)).float()                         # [B, D]
                if "images_flipped" in batch:
                    f = (f + model(batch["images_flipped"].to(device)).float()) / 2
            feats.append(f.cpu())
            pids.append(batch["pids"].cpu())
            camids.append(batch["camids"].cpu())
            index.append(batch["index"].cpu())
    finally:
        model.train(was_training)
    index = torch.cat(index)
    order = torch.argsort(index)
    out = torch.cat(feats)[order], torch.cat(pids)[order].long(), torch.cat(camids)[order].long()
    return out + (index[order].long(),) if return_index else out


@torch.no_grad()
def recalibrate_bn(model, records, *, height: int, width: int, mean, std, batch_size: int = 128,
                   backend: str = "auto", device="cpu", workers: int = 2, progress: bool = True) -> int:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` as the plain average of its
    batch statistics over ``records`` (un-augmented: the evaluation pipeline's images), the "precise
    BN" of a trained network; the weights are untouched. Returns the number of BatchNorm layers recalibrated.

    Why: a trunk's stored statistics are bookkeeping, not learning. A random-initialised trunk's are
    mean 0 / variance 1, a pre-trained one's an EMA over augmented views; a linear probe of their
    features compares those as much as the weights. Recalibrated on the same images, two trunks
    differ only by what their weights learned. If it fails midway, the stored statistics are put back."""
    from tqdm.auto import tqdm
    if not records:
        raise ValueError("recalibrate_bn: no images to estimate the BatchNorm statistics on")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    loader = _eval_loader(records, height, width, mean, std, False, batch_size, backend, device, workers)
    was_training, saved = model.training, [(m, m.momentum, m.training) for m in bns]
    stats = [{k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num_batches"))}
             for m in bns]
    done = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None            # cumulative moving average: the plain mean over the batches
            m.train()
        for batch in tqdm(loader, desc="BN statistics", unit="batch", leave=False, disable=not progress):
            model(batch["images"].to(device))
        done = True
    finally:
        for (m, momentum, training), st in zip(saved, stats):
            if not done:
                m.load_state_dict(st, strict=False)
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return len(bns)


def folder_records(root: str) -> list:
    """Every image under ``root`` (a folder tree, or a list file of paths), sorted, with pid and
    0-based camera parsed from Market-style names (-1 where a name does not follow that pattern)."""
    from upreid.data.datasets import MARKET_PATTERN, unlabeled
    from upreid.data.records import Record

    out = []
    for r in unlabeled(root, name="extract --images", progress=False).train:
        m = MARKET_PATTERN.match(os.path.basename(r.path))
        out.append(Record(r.path, int(m.group(1)), int(m.group(2)) - 1) if m else r)
    return out


def save_npz(path: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file + rename); no pickled objects."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dataset_records(data: str | None, info: dict, split: str) -> dict:
    from upreid.data import DatasetError, build_dataset
    from upreid.data.datasets import parse_spec
    if data:
        name, root = parse_spec(data)
    elif info.get("root"):
        name, root = info["dataset"], info["root"]      # the fine-tuning run's own dataset
    else:
        raise DatasetError(f"extract: the {info['format']} checkpoint names no dataset; pass --data "
                           "NAME:ROOT (e.g. market1501:/data/Market-1501) or --images DIR")
    ds = build_dataset(name, str(root))
    names = ("query", "gallery") if split == "query+gallery" else (split,)
    return {s: getattr(ds, s) for s in names}


def extract_to_npz(checkpoint: str, out: str, *, data: str | None = None, images: str | None = None,
                   split: str = "query+gallery", flip: bool | None = None, height: int | None = None,
                   width: int | None = None, backend: str = "auto", device: str = "cpu", batch_size: int = 128,
                   workers: int = 2, amp: str = "off", last_stride: int = 1, progress: bool = True) -> dict:
    """Extract and write features (see the module docstring); returns a summary (``out``,
    ``format``, ``counts`` per split, ``feat_dim``, ``flip``, ``height``, ``width``). Image size,
    normalisation and flip default to the checkpoint's (a fine-tuning run's config)."""
    from upreid.evaluation.feature_model import load_feature_model
    from upreid.utils.cli_checks import check_image_size
    if split not in SPLITS:
        raise ValueError(f"extract: 'split' must be one of {SPLITS}, got {split!r}")
    if data and images:
        raise ValueError("extract: pass either --data (a dataset) or --images (a folder), not both")
    if not os.path.isfile(checkpoint):
        raise ValueError(f"extract: checkpoint {checkpoint!r} does not exist")
    check_image_size("extract", height, width)
    groups = {"images": folder_records(images)} if images else None
    model, info = load_feature_model(checkpoint, last_stride=last_stride)
    model.to(device)
    groups = groups or _dataset_records(data, info, split)
    for name, recs in groups.items():
        if not recs:
            raise ValueError(f"extract: the {name} split is empty")
    pre = {"height": info["height"] if height is None else height, "width": info["width"] if width is None else width,
           "mean": info["mean"],
           "std": info["std"], "flip": info["flip_test"] if flip is None else flip}
    arrays = {}
    for name, recs in groups.items():
        f, p, c, idx = extract_features(model, recs, **pre, batch_size=batch_size, backend=backend, device=device,
                                        amp=amp, workers=workers, progress=progress, desc=f"{name} features",
                                        return_index=True)
        prefix = f"{name}_" if len(groups) == 2 else ""
        arrays[f"{prefix}features"] = f.numpy()
        arrays[f"{name}_pids" if prefix else "pids"] = p.numpy()
        arrays[f"{name}_camids" if prefix else "camids"] = c.numpy()
        arrays[f"{prefix}paths"] = np.array([recs[i].path for i in idx.tolist()])
    save_npz(out, arrays)
    counts = {name: len(recs) for name, recs in groups.items()}
    log.info("wrote %s: %s features of dimension %d", out, counts, info["feat_dim"])
    return {"out": out, "format": info["format"], "counts": counts, "feat_dim": info["feat_dim"],
            "flip": pre["flip"], "height": pre["height"], "width": pre["width"]}
