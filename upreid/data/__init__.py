"""The data layer: dataset parsers, the synthetic person dataset, samplers, and the loading pipelines
(NVIDIA DALI on GPU or CPU, with a Pillow + torch fallback producing the same outputs)."""
from .records import Record, ReIDDataset, relabel
from .datasets import DatasetError, build_dataset, cuhk03_np, market1501, market_style, msmt17, personx, synth, unlabeled

__all__ = ["Record", "ReIDDataset", "relabel", "DatasetError", "build_dataset", "cuhk03_np", "market1501",
           "market_style", "msmt17", "personx", "synth", "unlabeled"]
