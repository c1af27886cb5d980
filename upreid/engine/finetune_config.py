"""Fine-tuning settings: the schema (every key and its default) of ``upreid finetune`` configs.

Same rules as pre-training configs (``_base_`` files, ``key=value`` overrides, unknown keys are errors
with a suggestion); the defaults are the BoT recipe (METHOD.md section 5) on ResNet-50.
"""
from __future__ import annotations

from upreid.engine.config import Schema

DEFAULTS: dict = {
    "init": None,              # a checkpoint / backbone / MoCo / torchvision file; null or 'random' = random
    "model": {
        "arch": "bot", "depth": 50, "last_stride": 1, "ibn": False, "neck": True, "pooling": "avg",
        "gem_p": 3.0, "test_feature": "bn", "mgn_dim": 256,
    },
    "data": {
        "dataset": "market1501", "root": None, "backend": "auto", "height": 256, "width": 128,
        "p": 16, "k": 4, "workers": 4, "flip_p": 0.5, "pad": 10, "erasing_p": 0.5,
        "erasing_area": [0.02, 0.4], "mean": [0.3525, 0.3106, 0.3140], "std": [0.2660, 0.2522, 0.2505],
        "eval_batch_size": 128, "flip_test": False,
    },
    "loss": {
        "id_weight": 1.0, "label_smoothing": 0.1, "triplet_weight": 1.0,
        "margin": 0.3,         # null = soft margin
    },
    "optim": {
        "name": "adam", "lr": 3.5e-4, "weight_decay": 5.0e-4, "momentum": 0.9,
        "warmup_epochs": 10.0, "warmup_factor": 0.01, "milestones": [40, 90], "gamma": 0.1,
        "grad_clip": None,
    },
    "train": {
        "epochs": 120, "max_steps_per_epoch": None, "seed": 0, "device": "auto", "amp": "auto",
        "channels_last": "auto", "output": "runs/finetune", "checkpoint_every": 10, "log_every": 20,
        "progress": True, "deterministic": False,
    },
    "eval": {
        "every": 40,           # epochs between evaluations (0 = only the final one)
        "rerank": True,        # the final evaluation also with k-reciprocal re-ranking
        "metric": "cosine", "k1": 20, "k2": 6, "lambda_value": 0.3,
        "ranklist_queries": 8, "ranklist_top": 10,
    },
}

CHOICES = {
    "model.arch": ("bot", "mgn"), "model.depth": (18, 34, 50, 101), "model.last_stride": (1, 2),
    "model.pooling": ("avg", "max", "gem"), "model.test_feature": ("bn", "pre"),
    "data.backend": ("auto", "dali", "torch"), "optim.name": ("adam", "sgd"),
    "train.amp": ("auto", "bf16", "fp16", "off"), "train.channels_last": ("auto", True, False),
    "eval.metric": ("cosine", "euclidean"),
}

SCHEMA = Schema(DEFAULTS, CHOICES)


def load_finetune_config(path: str | None = None, overrides=()) -> dict:
    return SCHEMA.load(path, overrides)
