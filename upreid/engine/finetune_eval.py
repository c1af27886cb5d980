"""Evaluation inside fine-tuning: feature extraction through the data layer's eval pipeline, metrics
through :func:`upreid.evaluation.evaluate` (with and without re-ranking), the rank-list picture, and
:class:`EvalHook`, which runs them from the trainer and writes ``results.json``."""
from __future__ import annotations

import json
import logging
import os

import torch

from upreid.engine.ranklist import draw_ranklist, rank_lists
from upreid.engine.task import Hook
from upreid.evaluation import evaluate, pairwise_distance
from upreid.evaluation.extract import camera_bn_features, features_from_loader, query_gallery_in_one_pass
from upreid.evaluation.plots import write_plots
from upreid.utils import distributed as dist

log = logging.getLogger("upreid.finetune")


def extract(model, records, cfg: dict, device: torch.device, amp: str, desc: str = "features") -> tuple:
    """Features ``[N, D]`` (fp32, CPU) of ``records`` in order, with their pids, camids and the
    positions of their records (an image skipped under ``data.on_bad_image=skip`` has no row).
    Under ``eval.camera_bn``, each camera's images are extracted with BatchNorm statistics of their own
    (:func:`upreid.evaluation.extract.camera_bn_features`)."""
    from upreid.data.loader import loader_from_config

    def make_loader(recs, batch_size=None):
        d = cfg["data"] if batch_size is None else {**cfg["data"], "eval_batch_size": batch_size}
        return loader_from_config("eval", recs, d, device=device.type)
    kw = dict(device=device, amp=amp, progress=cfg["train"]["progress"], desc=desc)
    if cfg["eval"].get("camera_bn"):
        return camera_bn_features(model, records, make_loader, batch_size=cfg["data"]["eval_batch_size"], **kw)
    return features_from_loader(model, make_loader(records), **kw, return_index=True)


def query_gallery_features(model, dataset, cfg: dict, device: torch.device, amp: str) -> tuple:
    """``(query (features, pids, camids, record positions), gallery (the same))``. Under camera BN, a
    camera's query and gallery images share its statistics (one pass over both)."""
    if not cfg["eval"].get("camera_bn"):
        return (extract(model, dataset.query, cfg, device, amp, "query features"),
                extract(model, dataset.gallery, cfg, device, amp, "gallery features"))
    return query_gallery_in_one_pass(lambda recs, desc: extract(model, recs, cfg, device, amp, desc),
                                     dataset.query, dataset.gallery)


def run_evaluation(model, dataset, cfg: dict, device: torch.device, amp: str, rerank: bool,
                   ranklist_path: str | None = None) -> dict:
    """``{"plain": metrics, "rerank": metrics (when asked)}``; optionally writes the rank-list PNG."""
    e = cfg["eval"]
    progress = cfg["train"]["progress"]
    (qf, qp, qc, qi), (gf, gp, gc, gi) = query_gallery_features(model, dataset, cfg, device, amp)
    bins = 100 if ranklist_path else 0           # the final evaluation also draws the distance plot
    out = {"plain": evaluate(qf, gf, qp, gp, qc, gc, metric=e["metric"], progress=progress, distance_bins=bins)}
    if rerank:
        out["rerank"] = evaluate(qf, gf, qp, gp, qc, gc, metric=e["metric"], rerank=True, k1=e["k1"],
                                 k2=e["k2"], lambda_value=e["lambda_value"], progress=progress,
                                 distance_bins=bins)
    if ranklist_path and e["ranklist_queries"] > 0:
        n = min(e["ranklist_queries"], len(qf))
        pick = torch.linspace(0, len(qf) - 1, n).round().long().unique()                # spread over queries
        dist = pairwise_distance(qf[pick], gf, e["metric"])                              # [n, G]
        lists = rank_lists(dist, qp[pick], gp, qc[pick], gc, e["ranklist_top"])
        draw_ranklist(ranklist_path, [dataset.query[int(qi[i])].path for i in pick],
                      [dataset.gallery[i].path for i in gi.tolist()], lists, top=e["ranklist_top"])
        log.info("rank lists of %d queries written to %s", len(pick), ranklist_path)
    if ranklist_path:
        log.info("plots written: %s", write_plots(os.path.dirname(os.path.abspath(ranklist_path)), out,
                                                 required=False))
    # the images data.on_bad_image=skip left out, named in results.json and not only in the log
    skipped = {name: [r.path for i, r in enumerate(recs) if i not in kept]
               for name, recs, kept in (("query", dataset.query, set(qi.tolist())),
                                        ("gallery", dataset.gallery, set(gi.tolist())))}
    if any(skipped.values()):
        log.warning("evaluated without %d query and %d gallery images that could not be read (e.g. %s)",
                    len(skipped["query"]), len(skipped["gallery"]), (skipped["query"] + skipped["gallery"])[:3])
    for v in out.values():
        v["cmc"] = v["cmc"][:20]
        v["skipped_images"] = skipped
    return out


def summarise(result: dict) -> dict:
    return {f"{mode}/{k}": v for mode, r in result.items() for k, v in r.items()
            if k in ("mAP", "mINP", "Rank-1", "Rank-5", "Rank-10")}


class EvalHook(Hook):
    """Evaluation every ``eval.every`` epochs (into the task's history and the metrics log) and at the
    end (with re-ranking when ``eval.rerank``, the rank lists, ``results.json``); on rank 0 only."""

    def __init__(self, task):
        self.task = task

    def before_train(self, trainer) -> None:
        if trainer.is_main and self.task.init:
            self.task.write_init_report(trainer.out_dir)

    def _evaluate(self, trainer, final: bool):
        from upreid.data.imageio import BadImageError
        res, err = None, None
        cfg = self.task.cfg
        if trainer.is_main:
            try:
                with self.task.evaluated(trainer.model) as model:
                    res = run_evaluation(model, self.task.dataset, cfg, trainer.device, trainer.amp,
                                         rerank=final and cfg["eval"]["rerank"],
                                         ranklist_path=os.path.join(trainer.out_dir, "ranklist.png") if final else None)
                trainer.writer.write(trainer.step, {f"eval/{k}": v for k, v in summarise(res).items()})
            except Exception as e:       # raised below on every rank: the others must not wait at a barrier
                err = e
        if not dist.any_rank(err is not None, trainer.device):          # (also the barrier of a good one)
            return res
        # A bad query or gallery image is met only when the trained model is evaluated: keep the training
        # (every rank takes part in the save) and say that --resume evaluates it without training again.
        if trainer.last_saved != trainer.step:
            trainer.save()
        bad = dist.gather_objects((err.path, err.reason) if isinstance(err, BadImageError) else None)[0]  # rank 0's
        if bad is None:
            if err is not None:
                raise err
            raise RuntimeError(f"the evaluation on rank 0 at step {trainer.step} failed (its error is in its "
                               f"log); the checkpoint {trainer.ckpt_path} holds step {trainer.last_saved}")
        fix = "fix or remove the file, or set data.on_bad_image=skip"
        then = ("evaluate it without training again" if final else
                f"go on from step {trainer.step} without training again (this evaluation, after epoch "
                f"{self.task.position(trainer.step)[0]}, is not repeated)")
        raise BadImageError(*bad, hint=(
            f"met while evaluating the model; the training up to step {trainer.step} is saved in "
            f"{trainer.ckpt_path}: {fix}, and run the same command with --resume (not --overwrite) to "
            f"{then}")) from None

    def after_epoch(self, trainer, epoch: int) -> None:
        every = self.task.cfg["eval"]["every"]
        if every and epoch % every == 0 and epoch < self.task.epochs:
            res = self._evaluate(trainer, final=False)
            if res is not None:
                self.task.history.append({"epoch": epoch, **summarise(res)})

    def after_train(self, trainer) -> None:
        results = self._evaluate(trainer, final=True)
        self.task.results = results
        if trainer.is_main:
            payload = {"final": results, "history": self.task.history, "init": self.task.init,
                       "epochs": self.task.epochs, "steps": trainer.step, "config": self.task.cfg.to_dict()}
            tmp = os.path.join(trainer.out_dir, "results.json.tmp")
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=2)
            os.replace(tmp, os.path.join(trainer.out_dir, "results.json"))
