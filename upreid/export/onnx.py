"""ONNX export of a checkpoint's feature extractor: image batch ``images [N, 3, H, W]`` (normalised,
float32) -> embedding ``features [N, D]``, with a dynamic batch size.

The exported file carries the preprocessing it expects as metadata (``height``, ``width``, ``mean``,
``std`` on the 0-1 pixel scale, ``feat_dim``, ``source_format``). After writing, the file is checked
with onnxruntime against PyTorch on rendered synthetic pedestrians; a mismatch above ``atol`` is an
error (and the file is not left behind).
"""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from upreid.utils.cli_checks import check_image_size
from upreid.utils.deps import MissingDependencyError

log = logging.getLogger("upreid.export")

INPUT, OUTPUT = "images", "features"


def _require(name: str):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(f"ONNX export needs the {name!r} package: pip install onnx onnxruntime onnxscript "
                          "(all in requirements.txt)") from None


def sample_images(n: int, height: int, width: int, mean, std, seed: int = 0) -> torch.Tensor:
    """``[n, 3, height, width]`` normalised synthetic pedestrians (distinct identities and cameras)."""
    from upreid.data.synthetic import make_camera, make_identity, render
    from upreid.data.transforms import normalize
    rng = np.random.default_rng(seed)
    imgs = [render(make_identity(seed, i + 1), make_camera(seed, i % 3), rng, (height, width)) for i in range(n)]
    return torch.stack([normalize(a, mean, std) for a in imgs])


def onnx_features(path: str, images: np.ndarray) -> np.ndarray:
    """Run an exported file with onnxruntime (CPU) on ``images [N, 3, H, W]`` float32."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, dtype=np.float32)})[0]


def read_metadata(path: str) -> dict:
    """The preprocessing metadata of an exported file (numbers parsed)."""
    import json
    onnx = _require("onnx")
    model = onnx.load(path, load_external_data=False)
    return {p.key: json.loads(p.value) for p in model.metadata_props}


def _write_metadata(path: str, meta: dict, opset: int) -> None:
    """Add ``meta`` to the file's metadata; refuse a file whose default-domain opset is not ``opset``
    (torch.onnx falls back to its own version when it cannot convert, and says so only in a log)."""
    import json
    onnx = _require("onnx")
    model = onnx.load(path)
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise RuntimeError(f"export-onnx: asked for opset {opset}, but the exporter wrote opset {got} (it could "
                           f"not convert to {opset}); the file was not written. Use --opset {got}")
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    onnx.save(model, path)


# The exporter's own chatter: one INFO line per optimisation pass (onnxscript, onnx_ir), a warning per
# torchvision operator it cannot register when torchvision is absent, the traceback of a conversion it
# retries at another opset. The outcome is checked here (opset, onnxruntime against PyTorch), so a
# failure is still reported, in one line.
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@contextlib.contextmanager
def _quiet_exporter():
    import warnings
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in _EXPORTER_LOGGERS]
    try:
        for logger, _ in saved:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def export_onnx(checkpoint: str, out: str, *, height: int | None = None, width: int | None = None,
                opset: int = 18, last_stride: int = 1, check_batch: int = 3, atol: float = 1e-4,
                overwrite: bool = False) -> dict:
    """Export ``checkpoint`` (any format :func:`upreid.evaluation.feature_model.load_feature_model`
    reads) to ``out``; returns ``out``, ``format``, ``feat_dim``, ``height``, ``width`` and
    ``max_abs_err`` (onnxruntime against PyTorch on ``check_batch`` synthetic images)."""
    from upreid.evaluation.feature_model import load_feature_model
    for package in ("onnx", "onnxruntime", "onnxscript"):
        _require(package)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"export-onnx: {out!r} exists; pass --overwrite to replace it")
    check_image_size("export-onnx", height, width)
    if check_batch < 1:
        raise ValueError(f"export-onnx: 'check_batch' must be >= 1, got {check_batch}")
    model, info = load_feature_model(checkpoint, last_stride=last_stride)
    h = info["height"] if height is None else height
    w = info["width"] if width is None else width
    example = sample_images(2, h, w, info["mean"], info["std"], seed=1)              # [2, 3, H, W]
    tmp = f"{out}.tmp.onnx"
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(model, (example,), tmp, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False,
                              external_data=False)
        # flip_test: the features are meant to be averaged with the mirrored image's (upreid extract
        # does it for such a run); the graph holds one image's features, the caller averages
        meta = {"height": h, "width": w, "mean": list(info["mean"]), "std": list(info["std"]),
                "feat_dim": info["feat_dim"], "source_format": info["format"],
                "flip_test": bool(info.get("flip_test", False)), "camera_bn": bool(info.get("camera_bn", False))}
        if meta["camera_bn"]:
            log.warning("%s was evaluated with camera-based BN (statistics of each test camera); the ONNX graph "
                        "holds the stored statistics, so its features are not the run's evaluation features",
                        checkpoint)
        _write_metadata(tmp, meta, opset)
        images = sample_images(check_batch, h, w, info["mean"], info["std"], seed=2)   # another batch size
        with torch.no_grad():
            want = model(images).numpy()
        got = onnx_features(tmp, images.numpy())
        err = float(np.abs(got - want).max())
        if got.shape != want.shape or not err <= atol:
            raise RuntimeError(f"export-onnx: onnxruntime output {got.shape} differs from PyTorch {want.shape} "
                               f"by {err:.3g} (> atol {atol:g}); the file was not written")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("wrote %s: %s -> %d-d features, onnxruntime vs PyTorch max error %.2g", out, info["format"],
             info["feat_dim"], err)
    return {"out": out, "format": info["format"], "feat_dim": info["feat_dim"], "height": h, "width": w,
            "max_abs_err": err}
