"""The feature extractor (image batch ``[B, 3, H, W]`` -> embedding ``[B, D]``) of a checkpoint, with
the input size and normalisation it expects. Used by ``upreid extract`` and ``upreid export-onnx``.

* A fine-tuning checkpoint (``upreid-finetune``) gives its whole model in evaluation mode (BoT:
  pooled trunk + BNNeck; MGN: the concatenated reduced features), with the image size and
  normalisation of its config.
* Every other format that fine-tuning's ``init`` reads (an exported backbone, a pre-training
  checkpoint, LUPerson MoCo v2, fast-reid, torchreid, torchvision; see
  :mod:`upreid.models.checkpoint_formats`) gives its ResNet trunk (architecture inferred from the
  file, same checks) followed by global pooling: heads are not part of these files' trunks.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from upreid.data.augment import LUP_MEAN, LUP_STD
from upreid.models.reid import _pool, make_pool, reid_model_from_config

log = logging.getLogger("upreid.evaluation")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The normalisation each trunk format was trained with (fast-reid, torchreid and torchvision
# normalise with the ImageNet statistics; the LUPerson release and upreid with LUPerson's).
FORMAT_NORMALISATION = {"fastreid": (IMAGENET_MEAN, IMAGENET_STD), "torchreid": (IMAGENET_MEAN, IMAGENET_STD),
                        "torchvision": (IMAGENET_MEAN, IMAGENET_STD)}


class TrunkFeatures(nn.Module):
    """A ResNet trunk followed by global pooling: ``[B, 3, H, W] -> [B, C]``."""

    def __init__(self, trunk: nn.Module, pooling: str = "avg"):
        super().__init__()
        self.trunk = trunk
        self.pool = make_pool(pooling)
        self.feat_dim = trunk.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return _pool(self.pool, self.trunk(x))                    # [B, C]


def load_feature_model(path: str, last_stride: int = 1, pooling: str = "avg") -> tuple[nn.Module, dict]:
    """``(model in eval mode on the CPU, info)``; ``info`` has ``format``, ``arch``, ``feat_dim`` and
    the preprocessing the model expects: ``height``, ``width``, ``mean``, ``std``, ``flip_test``, and
    ``camera_bn`` (the run evaluated with camera-based BN).
    ``last_stride`` and ``pooling`` apply to trunk-only files (a fine-tuned model keeps its own)."""
    from upreid.engine import checkpoint as ckpt_io
    from upreid.engine.ema import evaluated_state
    from upreid.engine.init_weights import FINETUNE_FORMAT, load_trunk, read_trunk_state
    from upreid.models.resnet import ResNet

    fmt, _, meta = read_trunk_state(path)
    if fmt == FINETUNE_FORMAT:
        obj = ckpt_io.load(path, expect=FINETUNE_FORMAT)
        cfg = obj["config"]
        model = reid_model_from_config(cfg["model"], int(obj["num_classes"]))
        model.load_state_dict(evaluated_state(obj))
        d, m = cfg["data"], cfg["model"]
        info = {"format": FINETUNE_FORMAT, "arch": {**{k: m[k] for k in ("arch", "depth", "ibn", "last_stride")},
                                                     "width": m.get("width", 64)},
                "height": d["height"], "width": d["width"], "mean": tuple(d["mean"]), "std": tuple(d["std"]),
                "flip_test": bool(d["flip_test"]), "camera_bn": bool(cfg.get("eval", {}).get("camera_bn", False)),
                "step": obj.get("step"), "dataset": d["dataset"], "ema": bool(obj.get("ema")),
                "eval": {k: cfg["eval"][k] for k in ("metric", "k1", "k2", "lambda_value") if k in cfg.get("eval", {})},
                "root": d["root"]}
    else:
        arch = meta["arch"]
        if arch.get("depth") is None:
            raise ckpt_io.CheckpointError(f"checkpoint {path!r} ({fmt}): not a ResNet 18/34/50/101 trunk "
                                          f"(blocks per layer {arch.get('blocks')})")
        trunk = ResNet(arch["depth"], last_stride=last_stride, ibn=bool(arch["ibn"]), width=arch.get("width") or 64)
        report = load_trunk(trunk, path)
        if report["missing"]:
            raise ckpt_io.CheckpointError(f"checkpoint {path!r} ({fmt}) lacks trunk weights, e.g. "
                                          f"{report['missing'][:5]}; features would be random")
        model = TrunkFeatures(trunk, pooling)
        mean, std = FORMAT_NORMALISATION.get(fmt, (LUP_MEAN, LUP_STD))
        info = {"format": fmt, "arch": {"depth": arch["depth"], "width": arch.get("width") or 64,
                                        "ibn": bool(arch["ibn"]), "last_stride": last_stride,
                                        "pooling": pooling},
                "height": 256, "width": 128, "mean": tuple(mean), "std": tuple(std), "flip_test": False, "camera_bn": False,
                "step": meta.get("step")}
    model.eval()
    info["feat_dim"] = int(model.feat_dim)
    log.info("feature model from %s (%s): %s, %d-d features", path, info["format"], info["arch"], info["feat_dim"])
    return model, info
