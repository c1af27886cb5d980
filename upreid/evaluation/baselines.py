"""What a ReID model has to beat on a dataset: retrieval by pixels, with no deep network.

- ``pixels``: nearest neighbour on the raw pixels (Euclidean distance of the resized images);
- ``histogram``: nearest neighbour on joint RGB colour histograms (Hellinger distance);
- ``lda``: a linear metric learned on raw pixels of the training split: PCA, then Fisher's linear
  discriminant with a shrunk within-class scatter, cosine distance in the projected space. Its two
  settings (PCA size and shrinkage) are chosen on the training split alone, by fitting on half of the
  training identities and scoring retrieval on the other half; query and gallery are never looked at.

The demo prints these rows next to the networks, so a reader sees what learning adds.
"""
from __future__ import annotations

import logging
from typing import Dict, Sequence

import numpy as np
import torch

from upreid.evaluation.metrics import evaluate

log = logging.getLogger(__name__)

LDA_DIMS = (32, 64, 128, 256)            # PCA sizes tried (capped by the training set)
LDA_SHRINKAGE = (0.01, 0.1, 0.3, 1.0)    # within-class scatter -> (1 - s) Sw + s * mean eigenvalue * I


def load_pixels(records: Sequence, height: int, width: int) -> np.ndarray:
    """``[N, 3 * height * width]`` float32 in [0, 1]: each image resized (bilinear) to height x width."""
    from PIL import Image

    from upreid.data.imageio import decode_pil
    out = np.empty((len(records), 3 * height * width), np.float32)
    for i, r in enumerate(records):
        im = decode_pil(r.path)
        if im.size != (width, height):
            im = im.resize((width, height), Image.BILINEAR)
        out[i] = np.asarray(im, np.float32).transpose(2, 0, 1).reshape(-1) / 255.0
    return out


def colour_histograms(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histograms ``[N, bins**3]`` of flattened ``[N, 3*H*W]`` images, as square roots of the
    normalised counts (Euclidean distance between them is the Hellinger distance)."""
    n = pixels.shape[0]
    rgb = pixels.reshape(n, 3, -1)
    q = np.minimum((rgb * bins).astype(np.int64), bins - 1)               # [N, 3, HW]
    code = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]                     # [N, HW]
    hist = np.zeros((n, bins ** 3), np.float32)
    np.add.at(hist, (np.repeat(np.arange(n), code.shape[1]), code.reshape(-1)), 1.0)
    return np.sqrt(hist / code.shape[1])


class LinearMetric:
    """PCA + Fisher LDA with a shrunk within-class scatter, fitted on labelled rows."""

    def __init__(self, dims: int, shrinkage: float):
        if dims < 1:
            raise ValueError(f"LinearMetric: dims must be >= 1, got {dims}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"LinearMetric: shrinkage must be in [0, 1], got {shrinkage}")
        self.dims, self.shrinkage = dims, shrinkage

    def fit(self, x: np.ndarray, labels: np.ndarray, pca: tuple | None = None) -> "LinearMetric":
        """Fit on rows ``x`` [N, F] with identities ``labels``; ``pca``: a ``principal_axes(x)`` result
        to reuse (its first ``dims`` axes are taken)."""
        x = x.astype(np.float64)
        classes = np.unique(labels)
        if len(classes) < 2:
            raise ValueError(f"LinearMetric.fit: needs at least 2 identities, got {len(classes)}")
        self.mean, axes = pca if pca is not None else principal_axes(x, self.dims)
        self.pca = axes[:, : self.dims]                                    # [F, r]
        keep = self.pca.shape[1]
        z = (x - self.mean) @ self.pca                                     # [N, r]
        means = np.stack([z[labels == c].mean(0) for c in classes])        # [C, r]
        within = z - means[np.searchsorted(classes, labels)]
        sw = within.T @ within / len(z)
        counts = np.array([(labels == c).sum() for c in classes], np.float64)
        sb = (means * counts[:, None]).T @ means / len(z)                  # z is centred
        sw = (1 - self.shrinkage) * sw + self.shrinkage * np.trace(sw) / keep * np.eye(keep)
        # Generalised eigenproblem Sb v = l Sw v through Sw^(-1/2) (Sw is positive definite when shrunk).
        ew, ev = np.linalg.eigh(sw)
        white = ev / np.sqrt(np.maximum(ew, ew.max() * 1e-12))
        lw, lv = np.linalg.eigh(white.T @ sb @ white)
        top = np.argsort(lw)[::-1][: len(classes) - 1]
        self.proj = self.pca @ (white @ lv[:, top])                        # [F, C-1]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float64) - self.mean) @ self.proj).astype(np.float32)


def principal_axes(x: np.ndarray, dims: int) -> tuple:
    """``(mean [F], axes [F, r])``: the first r <= dims principal axes of the rows of ``x`` [N, F], through
    the N x N Gram matrix (N rows << F pixels: a fraction of the cost of an SVD of the N x F matrix)."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    xc = x - mean
    ev, u = np.linalg.eigh(xc @ xc.T)                                      # ascending
    ev, u = ev[::-1], u[:, ::-1]
    keep = min(dims, int((ev > max(ev[0], 1e-30) * 1e-12).sum()))
    return mean, xc.T @ (u[:, :keep] / np.sqrt(ev[:keep]))                 # orthonormal columns


def _retrieval_map(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> float:
    """mAP of every row against all the others (same identity and camera excluded, as in evaluation)."""
    t = torch.from_numpy(feats)
    p, c = torch.from_numpy(pids), torch.from_numpy(cams)
    return evaluate(t, t, p, p, c, c, metric="cosine", progress=False, junk_pid=None)["mAP"]


def select_linear_metric(x: np.ndarray, pids: np.ndarray, cams: np.ndarray,
                         dims: Sequence[int] = LDA_DIMS, shrinkage: Sequence[float] = LDA_SHRINKAGE) -> dict:
    """Choose (dims, shrinkage) on the training split: fit on every other identity, score the rest, and
    the reverse; returns the best settings and the score of each."""
    ids = np.unique(pids)
    folds = [np.isin(pids, ids[0::2]), np.isin(pids, ids[1::2])]
    scores = {}
    axes = [principal_axes(x[fit], max(dims)) for fit in folds]          # once per fold
    for d in dims:
        for s in shrinkage:
            m = []
            for (fit, held), pca in zip((folds, folds[::-1]), axes):
                lm = LinearMetric(d, s).fit(x[fit], pids[fit], pca=pca)
                m.append(_retrieval_map(lm.transform(x[held]), pids[held], cams[held]))
            scores[(d, s)] = float(np.mean(m))
    best = max(scores, key=scores.get)
    return {"dims": best[0], "shrinkage": best[1], "scores": {f"{d},{s}": v for (d, s), v in scores.items()}}


def fit_linear_metric(x: np.ndarray, pids: np.ndarray, cams: np.ndarray, what: str = "features") -> tuple:
    """``(LinearMetric, settings)`` fitted on training rows, its settings chosen on them alone
    (:func:`select_linear_metric`)."""
    settings = select_linear_metric(x, pids, cams)
    lm = LinearMetric(settings["dims"], settings["shrinkage"]).fit(x, pids)
    log.info("linear metric on %s: PCA %d, shrinkage %g (chosen on the training split)", what,
             settings["dims"], settings["shrinkage"])
    return lm, settings


def pixel_baselines(dataset, height: int, width: int, *, rerank: dict | None = None,
                    names: Sequence[str] = ("pixels", "histogram", "lda")) -> Dict[str, dict]:
    """Evaluate the pixel baselines on ``dataset`` (a :class:`ReIDDataset` with train/query/gallery).

    ``rerank``: keyword arguments of k-reciprocal re-ranking (k1, k2, lambda_value) to also report the
    re-ranked metrics, or None. Returns ``{name: {"plain": metrics, "rerank": metrics, ...}}``; the
    ``lda`` entry also carries the chosen settings."""
    unknown = sorted(set(names) - {"pixels", "histogram", "lda"})
    if unknown:
        raise ValueError(f"pixel_baselines: unknown baselines {unknown}; choose from pixels, histogram, lda")
    q = load_pixels(dataset.query, height, width)
    g = load_pixels(dataset.gallery, height, width)
    qp, gp = np.array([r.pid for r in dataset.query]), np.array([r.pid for r in dataset.gallery])
    qc, gc = np.array([r.camid for r in dataset.query]), np.array([r.camid for r in dataset.gallery])
    out: Dict[str, dict] = {}
    for name in names:
        extra = {}
        if name == "pixels":
            fq, fg, metric = q, g, "euclidean"
        elif name == "histogram":
            fq, fg, metric = colour_histograms(q), colour_histograms(g), "euclidean"
        else:
            tr = load_pixels(dataset.train, height, width)
            lm, extra = fit_linear_metric(tr, np.array([r.pid for r in dataset.train]),
                                          np.array([r.camid for r in dataset.train]), what="pixels")
            fq, fg, metric = lm.transform(q), lm.transform(g), "cosine"
        res = score_features(fq, fg, qp, gp, qc, gc, metric=metric, rerank=rerank)
        out[name] = {**res, **({"settings": extra} if extra else {})}
    return out


def score_features(fq, fg, qp, gp, qc, gc, *, metric: str, rerank: dict | None = None) -> dict:
    """``{"plain": metrics, "rerank": metrics}`` (``rerank`` only when its settings are given) of query
    features ``fq`` against gallery ``fg`` (arrays or tensors) with their pids and camids; CMC cut at 20."""
    args = tuple(torch.as_tensor(np.asarray(a)) for a in (fq, fg, qp, gp, qc, gc))
    res = {"plain": evaluate(*args, metric=metric, progress=False)}
    if rerank is not None:
        res["rerank"] = evaluate(*args, metric=metric, rerank=True, progress=False, **rerank)
    for v in res.values():
        v["cmc"] = v["cmc"][:20]
    return res


def frozen_trunk_baseline(dataset, trunk: str, height: int, width: int, *, last_stride: int = 1,
                          flip: bool = True, rerank: dict | None = None, device: str = "cpu",
                          linear_probe: bool = False, bn_records=None, camera_bn: bool = False) -> dict:
    """The features of a pre-trained trunk file (global average pooling, no fine-tuning) on
    ``dataset``'s query and gallery, scored like the other rows: what the pre-training alone learned
    about identity, before any label is seen. ``linear_probe``: also ``"lda"``, the metrics of the
    linear metric (as the pixel baseline's) fitted on the training split's features, which shows how
    much identity the features hold linearly, whatever their raw distances say. ``bn_records``: first
    re-estimate the trunk's BatchNorm statistics on these images (:func:`recalibrate_bn`), so that
    trunks compared on the same images differ only by their weights (a random trunk's stored
    statistics are mean 0 / variance 1, which alone changes what a probe finds). ``camera_bn``: each
    camera's images (query and gallery together; the training split's for the probe) extracted with
    BatchNorm statistics of their own (:func:`upreid.evaluation.extract.camera_bn_features`)."""
    from upreid.evaluation.extract import extract_features, query_gallery_in_one_pass, recalibrate_bn
    from upreid.evaluation.feature_model import load_feature_model

    model, info = load_feature_model(trunk, last_stride=last_stride)
    model.to(device)
    pre = dict(height=height, width=width, mean=info["mean"], std=info["std"], flip=flip, device=device,
               workers=0, progress=False)
    if bn_records is not None:
        recalibrate_bn(model, bn_records, **{k: v for k, v in pre.items() if k != "flip"})
    if camera_bn:
        (fq, qp, qc, _), (fg, gp, gc, _) = query_gallery_in_one_pass(
            lambda recs, desc: extract_features(model, recs, desc=desc, camera_bn=True, return_index=True, **pre),
            dataset.query, dataset.gallery)
    else:
        fq, qp, qc = extract_features(model, dataset.query, desc="query features", **pre)
        fg, gp, gc = extract_features(model, dataset.gallery, desc="gallery features", **pre)
    out = score_features(fq, fg, qp, gp, qc, gc, metric="cosine", rerank=rerank)
    if linear_probe:
        ft, tp, tc = extract_features(model, dataset.train, desc="train features", camera_bn=camera_bn, **pre)
        lm, settings = fit_linear_metric(ft.numpy(), tp.numpy(), tc.numpy(), what=f"the features of {trunk}")
        out["lda"] = score_features(lm.transform(fq.numpy()), lm.transform(fg.numpy()), qp, gp, qc, gc,
                                    metric="cosine")["plain"]
        out["lda"]["settings"] = {k: settings[k] for k in ("dims", "shrinkage")}
    return out
