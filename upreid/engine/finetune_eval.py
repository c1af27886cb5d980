"""Evaluation inside fine-tuning: feature extraction through the data layer's eval pipeline, metrics
through :func:`upreid.evaluation.evaluate` (with and without re-ranking) and the rank-list picture."""
from __future__ import annotations

import logging
import os

import torch

from upreid.engine.ranklist import draw_ranklist, rank_lists
from upreid.evaluation import evaluate, pairwise_distance
from upreid.evaluation.extract import extract_features
from upreid.evaluation.plots import write_plots

log = logging.getLogger("upreid.finetune")


def loader_workers(d: dict) -> int:
    """DALI needs at least one thread; the torch fallback may run in-process (0 workers)."""
    from upreid.data.loader import dali_available
    dali = d["backend"] == "dali" or (d["backend"] == "auto" and dali_available())
    return max(1, d["workers"]) if dali else d["workers"]


def eval_aug(cfg: dict) -> dict:
    d = cfg["data"]
    return {"height": d["height"], "width": d["width"], "flip": d["flip_test"], "mean": d["mean"],
            "std": d["std"]}


def extract(model, records, cfg: dict, device: torch.device, amp: str, desc: str = "features") -> tuple:
    """Features ``[N, D]`` (fp32, CPU) of ``records`` in order, with their pids and camids."""
    d = cfg["data"]
    return extract_features(model, records, **eval_aug(cfg), batch_size=d["eval_batch_size"], backend=d["backend"],
                            device=device, amp=amp, workers=loader_workers(d), progress=cfg["train"]["progress"],
                            desc=desc)


def run_evaluation(model, dataset, cfg: dict, device: torch.device, amp: str, rerank: bool,
                   ranklist_path: str | None = None) -> dict:
    """``{"plain": metrics, "rerank": metrics (when asked)}``; optionally writes the rank-list PNG."""
    e = cfg["eval"]
    progress = cfg["train"]["progress"]
    qf, qp, qc = extract(model, dataset.query, cfg, device, amp, "query features")
    gf, gp, gc = extract(model, dataset.gallery, cfg, device, amp, "gallery features")
    bins = 100 if ranklist_path else 0           # the final evaluation also draws the distance plot
    out = {"plain": evaluate(qf, gf, qp, gp, qc, gc, metric=e["metric"], progress=progress, distance_bins=bins)}
    if rerank:
        out["rerank"] = evaluate(qf, gf, qp, gp, qc, gc, metric=e["metric"], rerank=True, k1=e["k1"],
                                 k2=e["k2"], lambda_value=e["lambda_value"], progress=progress,
                                 distance_bins=bins)
    if ranklist_path and e["ranklist_queries"] > 0:
        n = min(e["ranklist_queries"], len(dataset.query))
        pick = torch.linspace(0, len(dataset.query) - 1, n).round().long().unique()   # spread over queries
        dist = pairwise_distance(qf[pick], gf, e["metric"])                              # [n, G]
        lists = rank_lists(dist, qp[pick], gp, qc[pick], gc, e["ranklist_top"])
        draw_ranklist(ranklist_path, [dataset.query[int(i)].path for i in pick],
                      [r.path for r in dataset.gallery], lists, top=e["ranklist_top"])
        log.info("rank lists of %d queries written to %s", len(pick), ranklist_path)
    if ranklist_path:
        log.info("plots written: %s", write_plots(os.path.dirname(os.path.abspath(ranklist_path)), out,
                                                 required=False))
    for v in out.values():
        v["cmc"] = v["cmc"][:20]
    return out


def summarise(result: dict) -> dict:
    return {f"{mode}/{k}": v for mode, r in result.items() for k, v in r.items()
            if k in ("mAP", "mINP", "Rank-1", "Rank-5", "Rank-10")}


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
