"""The ranking protocol shared by the compat modules: argument checks in the other libraries'
terms, then :func:`upreid.ops.rank.rank_metrics` (no sort of the gallery)."""
from __future__ import annotations

import logging

import numpy as np
import torch

from upreid.ops.rank import rank_metrics

log = logging.getLogger("upreid.compat")

CUHK03_MESSAGE = (
    "use_metric_cuhk03=True (the classic CUHK03 single-gallery-shot protocol) is not supported: it "
    "draws one random gallery image per identity, 10 times, so its CMC is not reproducible. Evaluate "
    "CUHK03-NP (the 767/700 split) with the default protocol, use_metric_cuhk03=False.")


def as_array(x, name: str, op: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = x.numpy()
    a = np.asarray(x)
    if a.ndim != ndim:
        want = "2-D (num_query, num_gallery)" if ndim == 2 else "1-D"
        raise ValueError(f"{op}: '{name}' must be {want}, got shape {a.shape}")
    return a


def _labels(x, name: str, op: str, n: int, what: str) -> torch.Tensor:
    a = as_array(x, name, op, 1)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)       # integral floats, as some loaders produce
        elif a.size:
            raise ValueError(f"{op}: '{name}' must hold integer ids, got dtype {a.dtype}")
    if a.shape[0] != n:
        raise ValueError(f"{op}: '{name}' has {a.shape[0]} entries but distmat has {n} {what}")
    return torch.from_numpy(a.astype(np.int64))


def per_query_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int, op: str):
    """``(cmc [max_rank'] float32, ap [V] float32, inp [V] float32)`` over the V valid queries, with
    ``max_rank' = min(max_rank, num_gallery)`` as the originals do. Raises the originals'
    ``AssertionError`` when no query has a match."""
    d = as_array(distmat, "distmat", op, 2)
    if d.dtype.kind != "f":
        d = d.astype(np.float32)
    num_q, num_g = d.shape
    qp = _labels(q_pids, "q_pids", op, num_q, "rows")
    gp = _labels(g_pids, "g_pids", op, num_g, "columns")
    qc = _labels(q_camids, "q_camids", op, num_q, "rows")
    gc = _labels(g_camids, "g_camids", op, num_g, "columns")
    if int(max_rank) < 1:
        raise ValueError(f"{op}: 'max_rank' must be >= 1, got {max_rank}")
    if num_q == 0 or num_g == 0:
        raise ValueError(f"{op}: 'distmat' must have at least one query and one gallery item, "
                         f"got shape {d.shape}")
    if num_g < max_rank:
        log.info("%s: number of gallery samples is quite small, got %d; CMC up to rank %d",
                 op, num_g, num_g)
        max_rank = num_g
    dt = torch.from_numpy(np.ascontiguousarray(d))
    try:                                    # the operator checks the values (NaN, Inf) itself
        cmc, ap, inp, valid = rank_metrics(dt, qp, gp, qc, gc, int(max_rank))
    except RuntimeError as e:
        raise ValueError(f"{op}: {e}") from None
    if not bool(valid.any()):
        raise AssertionError("Error: all query identities do not appear in gallery")
    return cmc.numpy(), ap[valid].numpy(), inp[valid].numpy()
