"""Small helpers to make tiny on-disk datasets (tests, smoke runs, benchmarks)."""
from __future__ import annotations

import os
from typing import List

from .records import Record
from .synthetic import SynthConfig, make_camera, make_identity, render


def write_tiny(root: str, n: int = 24, ids: int = 6, cameras: int = 3, size=(128, 64), seed: int = 0,
               quality: int = 90) -> List[Record]:
    """Render ``n`` synthetic images (``ids`` identities, round-robin cameras) into ``root`` with
    Market-style names and return their records (pids 0..ids-1, 0-based cameras)."""
    import numpy as np
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    recs = []
    for i in range(n):
        pid, cam = i % ids, (i // ids) % cameras
        img = render(make_identity(seed, pid + 1), make_camera(seed, cam), np.random.default_rng([seed, 99, i]), size)
        path = os.path.join(root, f"{pid + 1:04d}_c{cam + 1}s1_{i:06d}_00.jpg")
        Image.fromarray(img).save(path, quality=quality)
        recs.append(Record(path, pid, cam))
    return recs


def corrupt_files(root: str) -> dict:
    """Write one file of each kind of damage; returns {kind: path}."""
    out = {}
    out["empty"] = os.path.join(root, "empty.jpg")
    open(out["empty"], "wb").close()
    out["garbage"] = os.path.join(root, "garbage.jpg")
    with open(out["garbage"], "wb") as f:
        f.write(b"this is not an image" * 10)
    out["missing"] = os.path.join(root, "does_not_exist.jpg")
    return out


def truncated_copy(src: str, dst: str, keep: float = 0.5) -> str:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return dst
