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
                     return_index: bool = False, camera_bn: bool = False, on_bad_image: str = "error") -> tuple:
    """Features ``[N, D]`` (fp32, CPU) of ``records`` in their order, with their pids and camids
    (int64 tensors). ``flip``: average with the features of the mirrored images. ``amp``: 'off',
    'bf16' or 'fp16' autocast. ``return_index``: see :func:`features_from_loader`. ``camera_bn``:
    BatchNorm statistics of each camera's images (:func:`camera_bn_features`). ``on_bad_image``:
    'error' (raise :class:`upreid.data.imageio.BadImageError`) or 'skip' (the image has no row; see
    ``return_index``)."""
    if camera_bn:
        out = camera_bn_features(
            model, records, lambda sub, batch_size: _eval_loader(sub, height, width, mean, std, flip, batch_size,
                                                                 backend, device, workers, on_bad_image),
            device=device, amp=amp, progress=progress, desc=desc, batch_size=batch_size)
        return out if return_index else out[:3]
    loader = _eval_loader(records, height, width, mean, std, flip, batch_size, backend, device, workers, on_bad_image)
    return features_from_loader(model, loader, device=device, amp=amp, progress=progress, desc=desc,
                                return_index=return_index)


def _eval_loader(records, height, width, mean, std, flip, batch_size, backend, device, workers,
                 on_bad_image: str = "error"):
    """The evaluation pipeline's loader of ``records`` (resized, normalised; ``flip``: mirrored too)."""
    from upreid.data.loader import build_loader
    aug = {"height": height, "width": width, "flip_test": flip, "mean": list(mean), "std": list(std)}
    return build_loader("eval", records, batch_size=batch_size, backend=backend, device=torch.device(device).type,
                        aug=aug, workers=workers, on_bad_image=on_bad_image)


@torch.no_grad()
def features_from_loader(model, loader, *, device, amp: str = "off", progress: bool = True,
                         desc: str = "features", return_index: bool = False) -> tuple:
    """The features of an evaluation loader's images, back in record order (the loader's
    ``index``), averaged with the mirrored images' where the batches carry them. ``return_index``:
    also the positions of the records they belong to (ascending), which leave out any image the
    loader skipped (``on_bad_image=skip``), so that row ``i`` is record ``index[i]``."""
    from upreid.utils.progress import bar

    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "off" else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    feats, pids, camids, index = [], [], [], []
    try:
        for batch in bar(loader, enabled=progress, desc=desc, unit="batch", leave=False):
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
def balanced_batch_size(n: int, batch_size: int) -> int:
    """The smallest batch size that cuts ``n`` images into no more batches than ``batch_size`` does, so
    that the last batch is as full as it can be: precise BN averages the batches' statistics with equal
    weights (129 images at 128 become 65 + 64, not 128 + 1; a batch of one image gives a BatchNorm1d
    no variance to measure)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"balanced_batch_size: need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    batches = -(-n // batch_size)
    return -(-n // batches)


def recalibrate_bn(model, records, *, height: int, width: int, mean, std, batch_size: int = 128,
                   backend: str = "auto", device="cpu", workers: int = 2, progress: bool = True) -> int:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` as the plain average of its
    batch statistics over ``records`` (un-augmented: the evaluation pipeline's images), the "precise
    BN" of a trained network; the weights are untouched. Returns the number of BatchNorm layers recalibrated.

    Why: a trunk's stored statistics are bookkeeping, not learning. A random-initialised trunk's are
    mean 0 / variance 1, a pre-trained one's an EMA over augmented views; a linear probe of their
    features compares those as much as the weights. Recalibrated on the same images, two trunks
    differ only by what their weights learned. If it fails midway, the stored statistics are put back."""
    if not records:
        raise ValueError("recalibrate_bn: no images to estimate the BatchNorm statistics on")
    loader = _eval_loader(records, height, width, mean, std, False, balanced_batch_size(len(records), batch_size),
                          backend, device, workers)
    return recalibrate_bn_from_loader(model, loader, device=device, progress=progress)


def _bn_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _bn_statistics(bns: list) -> list:
    return [{k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num_batches"))}
            for m in bns]


@torch.no_grad()
def recalibrate_bn_from_loader(model, loader, *, device="cpu", progress: bool = True) -> int:
    """:func:`recalibrate_bn` over the ``images`` of an evaluation loader's batches. A batch of one
    image is left out where others exist (a BatchNorm1d cannot measure a variance on it)."""
    from upreid.utils.progress import bar
    bns = _bn_layers(model)
    if not bns:
        return 0
    was_training, saved = model.training, [(m, m.momentum, m.training) for m in bns]
    stats = _bn_statistics(bns)
    done = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None            # cumulative moving average: the plain mean over the batches
            m.train()
        used, single = 0, None
        for batch in bar(loader, enabled=progress, desc="BN statistics", unit="batch", leave=False):
            if batch["images"].shape[0] < 2:
                single = batch
                continue
            model(batch["images"].to(device))
            used += 1
        if not used:
            raise ValueError("recalibrate_bn: BatchNorm statistics need at least 2 images"
                             + ("; the loader gave one" if single is not None else "; the loader gave none"))
        done = True
    finally:
        for (m, momentum, training), st in zip(saved, stats):
            if not done:
                m.load_state_dict(st, strict=False)
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return len(bns)


def split_rows(out: tuple, n_first: int) -> tuple:
    """Cut ``(features, pids, camids, index)`` of records ``A + B`` (``len(A) = n_first``) into the rows of
    ``A`` and those of ``B``, each with positions in its own list."""
    first = out[3] < n_first
    a = tuple(x[first] for x in out)
    b = tuple(x[~first] for x in out[:3]) + (out[3][~first] - n_first,)
    return a, b


def query_gallery_in_one_pass(extract, query, gallery) -> tuple:
    """``(query rows, gallery rows)`` from one extraction of ``query + gallery``: ``extract(records,
    desc)`` returns ``(features, pids, camids, index)``. Camera BN takes each camera's statistics from
    the images of both splits this way."""
    return split_rows(extract(list(query) + list(gallery), "query and gallery features"), len(query))


MIN_CAMERA_IMAGES = 2       # camera BN: fewer images give no variance to estimate
FEW_CAMERA_IMAGES = 16      # below this, a camera's statistics are noisy (warned)


def check_camera_groups(records, what: str | None = None) -> dict:
    """``{camera: [positions in records]}`` for camera BN; a :class:`ValueError` naming the problem when
    an image has no camera or a camera has fewer than ``MIN_CAMERA_IMAGES`` images (a warning below
    ``FEW_CAMERA_IMAGES``)."""
    of = f" of the {what}" if what else ""
    unknown = [r.path for r in records if r.camid < 0]
    off = "evaluate without it (eval.camera_bn=false, upreid extract --no-camera-bn)"
    if unknown:
        raise ValueError(f"camera BN needs every image's camera; {len(unknown)} of {len(records)} images{of} "
                         f"have none (e.g. {unknown[0]!r}: not a Market-style name such as "
                         f"0002_c1s1_000451_03.jpg); {off}")
    groups: dict = {}
    for i, r in enumerate(records):
        groups.setdefault(r.camid, []).append(i)
    small = {c + 1: len(ix) for c, ix in sorted(groups.items()) if len(ix) < MIN_CAMERA_IMAGES}
    if small:
        raise ValueError(f"camera BN needs at least {MIN_CAMERA_IMAGES} images per camera to estimate its "
                         f"statistics; camera (1-based: images{of}) {small} has fewer; {off}, or add "
                         "images of that camera")
    few = {c + 1: len(ix) for c, ix in sorted(groups.items()) if len(ix) < FEW_CAMERA_IMAGES}
    if few:
        log.warning("camera BN: statistics from fewer than %d images are noisy; camera (1-based: images%s) %s",
                    FEW_CAMERA_IMAGES, of, few)
    return groups


def camera_bn_features(model, records, make_loader, *, device="cpu", amp: str = "off", progress: bool = True,
                       desc: str = "features", batch_size: int = 128) -> tuple:
    """Features of ``records`` with camera-based BatchNorm at test time: for each camera, every
    BatchNorm's statistics are re-estimated on that camera's images (:func:`recalibrate_bn`) and its
    images are extracted with them, so that what a camera adds to every image it sees (colour cast,
    brightness, background) is normalised away per camera (camera-based BN, Zhuang et al., ECCV 2020).
    Transductive: it uses the images being scored and their camera ids, never their identities.

    ``make_loader(records, batch_size=n)`` builds an evaluation loader of a camera's records; the
    batches are at most ``batch_size`` (:func:`balanced_batch_size`). Returns ``(features, pids, camids, index)`` as :func:`features_from_loader` with
    ``return_index``, rows in record order. The model's own statistics are put back afterwards."""
    groups = check_camera_groups(records)
    bns = _bn_layers(model)
    if not bns:
        raise ValueError("camera BN: the model has no BatchNorm layer to re-estimate per camera")
    stats = _bn_statistics(bns)
    parts = []
    try:
        for cam, ix in sorted(groups.items()):
            sub = [records[i] for i in ix]
            bs = balanced_batch_size(len(sub), batch_size)
            stats_bs = balanced_batch_size(len(sub), max(2, batch_size))     # statistics need 2 images a batch
            try:
                recalibrate_bn_from_loader(model, make_loader(sub, batch_size=stats_bs), device=device,
                                           progress=progress)
            except ValueError as e:          # e.g. all but one of its images unreadable (on_bad_image=skip)
                raise ValueError(f"camera BN: the statistics of camera {cam + 1} ({len(sub)} images) could not be "
                                 f"estimated: {e}") from e
            f, p, c, idx = features_from_loader(model, make_loader(sub, batch_size=bs), device=device, amp=amp,
                                                progress=progress, desc=f"{desc}, camera {cam + 1}",
                                                return_index=True)
            parts.append((f, p, c, torch.as_tensor(ix, dtype=torch.long)[idx]))
    finally:
        for m, st in zip(bns, stats):
            m.load_state_dict(st, strict=False)
    index = torch.cat([x[3] for x in parts])
    order = torch.argsort(index)
    return tuple(torch.cat([x[j] for x in parts])[order] for j in range(3)) + (index[order],)


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
        if not os.path.exists(os.path.expanduser(str(root))):
            rel = (" (a relative path, read from the folder the command runs in)"
                   if not os.path.isabs(os.path.expanduser(str(root))) else "")
            raise DatasetError(f"extract: the checkpoint's fine-tuning read {name} from data.root {str(root)!r}"
                               f"{rel}, which does not exist here; pass --data {name}:ROOT with the dataset's "
                               f"folder, or --images DIR")
    else:
        raise DatasetError(f"extract: the {info['format']} checkpoint names no dataset; pass --data "
                           "NAME:ROOT (e.g. market1501:/data/Market-1501) or --images DIR")
    ds = build_dataset(name, str(root))
    names = ("query", "gallery") if split == "query+gallery" else (split,)
    return {s: getattr(ds, s) for s in names}


def extract_to_npz(checkpoint: str, out: str, *, data: str | None = None, images: str | None = None,
                   split: str = "query+gallery", flip: bool | None = None, height: int | None = None,
                   width: int | None = None, backend: str = "auto", device: str = "cpu", batch_size: int = 128,
                   workers: int = 2, amp: str = "off", last_stride: int = 1, progress: bool = True,
                   camera_bn: bool | None = None, on_bad_image: str = "error") -> dict:
    """Extract and write features (see the module docstring); returns a summary (``out``,
    ``format``, ``counts`` (rows written) and ``skipped`` (paths left out) per split, ``feat_dim``,
    ``flip``, ``height``, ``width``, ``camera_bn``). Image size, normalisation and flip default to the
    checkpoint's (a fine-tuning run's config).
    ``camera_bn``: camera-based BatchNorm (:func:`camera_bn_features`; default: the run's
    ``eval.camera_bn``); query and gallery images of a camera share its statistics, also when only
    one of the two splits is written (the training split and an image folder use their own).
    ``on_bad_image``: 'error' stops at an unreadable image and names it; 'skip' leaves it out (it has
    no row in the file, and the summary lists it)."""
    from upreid.data.imageio import check_policy
    from upreid.evaluation.feature_model import load_feature_model
    from upreid.utils.cli_checks import check_image_size
    if split not in SPLITS:
        raise ValueError(f"extract: 'split' must be one of {SPLITS}, got {split!r}")
    if data and images:
        raise ValueError("extract: pass either --data (a dataset) or --images (a folder), not both")
    if not os.path.isfile(checkpoint):
        raise ValueError(f"extract: checkpoint {checkpoint!r} does not exist")
    check_image_size("extract", height, width)
    check_policy(on_bad_image)
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
    camera_bn = info.get("camera_bn", False) if camera_bn is None else camera_bn
    kw = dict(**pre, batch_size=batch_size, backend=backend, device=device, amp=amp, workers=workers,
              progress=progress, return_index=True, on_bad_image=on_bad_image)
    # Camera BN on a dataset's query or gallery: a camera's statistics come from all its test images, query
    # and gallery together (as fine-tuning's evaluation), in one pass; only the asked splits are written.
    both = None
    if camera_bn and not images and split in ("query", "gallery", "query+gallery"):
        both = groups if len(groups) == 2 else _dataset_records(data, info, "query+gallery")
    rows_of = {}
    if both is not None:
        rows_of = dict(zip(("query", "gallery"), query_gallery_in_one_pass(
            lambda recs, desc: extract_features(model, recs, **kw, desc=desc, camera_bn=True),
            both["query"], both["gallery"])))
    arrays, counts, skipped = {}, {}, {}
    for name, recs in groups.items():
        f, p, c, idx = rows_of[name] if rows_of else extract_features(model, recs, **kw, desc=f"{name} features",
                                                                      camera_bn=camera_bn)
        prefix = f"{name}_" if len(groups) == 2 else ""
        arrays[f"{prefix}features"] = f.numpy()
        arrays[f"{name}_pids" if prefix else "pids"] = p.numpy()
        arrays[f"{name}_camids" if prefix else "camids"] = c.numpy()
        arrays[f"{prefix}paths"] = np.array([recs[i].path for i in idx.tolist()])
        kept = set(idx.tolist())
        counts[name] = len(kept)
        skipped[name] = [r.path for i, r in enumerate(recs) if i not in kept]
        if not kept:
            raise ValueError(f"extract: every image of the {name} split ({len(recs)}) was unreadable and skipped, "
                             f"e.g. {skipped[name][:3]}")
    save_npz(out, arrays)
    log.info("wrote %s: %s features of dimension %d", out, counts, info["feat_dim"])
    return {"out": out, "format": info["format"], "counts": counts, "skipped": skipped, "feat_dim": info["feat_dim"],
            "eval": info.get("eval") or {},
            "flip": pre["flip"], "height": pre["height"], "width": pre["width"], "camera_bn": camera_bn}
