"""``upreid demo``: the whole system in minutes on a machine with no dataset and no GPU.

1. render the synthetic person dataset (``upreid synth``),
2. score what needs no network: nearest neighbour on raw pixels and on colour histograms, and a
   linear metric (LDA) learned on the raw pixels of the training split,
3. pre-train UP-ReID on its unlabeled images (CPU: a narrow ResNet-18 at 64 x 32; GPU: ResNet-50 at
   256 x 128, the real recipe for a short schedule),
4. export the pre-trained trunk and score its features as they are (no fine-tuning),
5. fine-tune it (BoT, plus a colour jitter for the cameras' white balance, exposure and contrast; on the
   CPU with SGD for 30 epochs, on the GPU with BoT's Adam; the weights averaged over about the last 50
   steps are evaluated) and a random-initialised twin with the same settings and seed,
6. evaluate all of them with and without re-ranking (k1, k2 chosen for the split's images per
   identity) and print the table; draw the training curves.

Everything goes under one output folder (``--out``, default ``upreid_demo``), named at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import torch

log = logging.getLogger("upreid.demo")


@dataclasses.dataclass
class DemoScale:
    ids: int = 60
    cameras: int = 4
    unlabeled: int = 1024
    image_height: int = 64        # rendered size
    image_width: int = 32
    pretrain_depth: int = 18
    width: int = 32               # ResNet stem channels (64: the published ResNet; 32 is 3x faster here)
    pretrain_height: int = 64
    pretrain_width: int = 32
    pretrain_batch: int = 32
    pretrain_steps: int = 200
    pretrain_lr: float = 0.01     # SGD at batch 32 (0.05 made the instance-contrast loss climb after 70 steps)
    queue_size: int = 1024
    finetune_epochs: int = 30     # with SGD: UP-ReID init leads random init by 6.8 mAP here (5 seeds, every seed);
                                  # at 45 random init catches up (docs/finetuning.md, "Fine-tuning length: why 30 epochs")
    finetune_p: int = 8
    finetune_k: int = 4
    finetune_optim: str = "sgd"   # optim.name: SGD, momentum 0.9 (BoT: Adam); measured in docs/finetuning.md,
                                  # "The optimizer and the schedule"
    finetune_lr: float = 0.02     # SGD: at 30 epochs the best mean of random and UP-ReID init (0.01, 0.03: lower)
    finetune_erasing: float = 0.0  # random erasing (BoT: 0.5); at 64 x 32 it cost 15 mAP (24.7 vs 40.1, seed 0)
    finetune_color: float = 1.0   # colour jitter p (data.color_p): the cameras differ by white balance, exposure
                                  # and contrast (BoT: none; measured in docs/finetuning.md, "Colour jitter")
    flip_test: bool = True        # average each image's features with its mirror's (+2.4 mAP, seed 0)
    finetune_ema: float = 0.98    # optim.ema_decay: evaluate the weights averaged over about the last 50 steps (+1.3
                                  # mAP random init, +1.5 UP-ReID init, 5 seeds; docs/finetuning.md, "Averaging the weights")
    device: str = "cpu"


CPU = DemoScale()
GPU = DemoScale(ids=200, cameras=6, unlabeled=4000, image_height=128, image_width=64, pretrain_depth=50,
                width=64, pretrain_height=256, pretrain_width=128, pretrain_batch=128, pretrain_steps=300,
                pretrain_lr=0.3, queue_size=4096, finetune_epochs=30, finetune_p=16, finetune_k=4,
                finetune_optim="adam", finetune_lr=3.5e-4, finetune_erasing=0.5, finetune_color=1.0, device="cuda")
TINY = DemoScale(ids=24, cameras=3, unlabeled=64, width=16, pretrain_batch=16, pretrain_steps=4, queue_size=64,
                 finetune_epochs=2, finetune_p=4, finetune_k=4)   # tests: seconds, not results


def synth_config(s: DemoScale, seed: int = 0):
    from upreid.data.synthetic import SynthConfig
    return SynthConfig(ids=s.ids, cameras=s.cameras, unlabeled=s.unlabeled, height=s.image_height,
                       width=s.image_width, distractors=s.ids // 2, junk=s.ids // 10, seed=seed)


def pretrain_overrides(s: DemoScale, root: str, out: str, seed: int = 0) -> list:
    common = [f"data.root={root}", f"train.output={out}", f"train.steps={s.pretrain_steps}", f"train.seed={seed}",
              f"data.batch_size={s.pretrain_batch}", f"model.queue_size={s.queue_size}",
              f"train.device={s.device}", f"train.checkpoint_every={max(1, s.pretrain_steps)}",
              f"model.width={s.width}", f"optim.lr={s.pretrain_lr}"]
    if s.device == "cuda":   # the UP-ReID R50 recipe, shorter, with torchvision's crops (the package's default)
        return common + ["model.depth=50", "data.workers=8", f"optim.warmup_steps={s.pretrain_steps // 10}",
                         "data.crop_attempts=10"]
    # data.crop_attempts=1: the single clamped draw every CPU study row was measured with (docs/finetuning.md)
    return common + [f"model.depth={s.pretrain_depth}", "model.last_stride=1", "model.hidden_dim=256",
                     "data.crop_attempts=1",
                     "model.momentum=0.99", f"data.height={s.pretrain_height}", f"data.width={s.pretrain_width}",
                     "data.workers=0", f"optim.warmup_steps={max(1, s.pretrain_steps // 12)}", "train.log_every=5"]


def schedule_overrides(epochs: int) -> list:
    """The demo's fine-tuning schedule scaled to ``epochs``: warm-up an eighth of them, the lr step (x0.1)
    at three quarters, one checkpoint at the end. Studies that fine-tune for another length use it too."""
    return [f"train.epochs={epochs}", f"optim.warmup_epochs={max(1, epochs // 8)}",
            f"optim.milestones=[{max(1, int(epochs * 0.75))}]", f"train.checkpoint_every={epochs}"]


def finetune_overrides(s: DemoScale, root: str, out: str, init: str | None, seed: int = 0,
                       rerank: dict | None = None) -> list:
    h, w = (s.pretrain_height, s.pretrain_width)
    o = [f"data.root={root}", "data.dataset=synth", f"train.output={out}", f"init={init or 'random'}",
         f"model.depth={s.pretrain_depth}", f"model.width={s.width}", f"data.height={h}", f"data.width={w}",
         f"data.p={s.finetune_p}", f"data.k={s.finetune_k}", *schedule_overrides(s.finetune_epochs),
         f"train.seed={seed}", f"train.device={s.device}", f"optim.name={s.finetune_optim}",
         f"optim.lr={s.finetune_lr}", "eval.every=0", "eval.ranklist_queries=8",
         f"data.erasing_p={s.finetune_erasing}", f"data.color_p={s.finetune_color}",
         f"data.flip_test={str(s.flip_test).lower()}", f"optim.ema_decay={s.finetune_ema}"]
    if rerank:
        o += [f"eval.k1={rerank['k1']}", f"eval.k2={rerank['k2']}", f"eval.lambda_value={rerank['lambda_value']}"]
    if s.device == "cpu":
        o += ["data.workers=0", "data.pad=4", "train.log_every=5"]
    else:
        o += ["data.workers=8"]
    return o


ROW_NAMES = {"pixels": "raw-pixel NN", "histogram": "colour-hist NN", "lda": "LDA on pixels",
             "frozen": "UP-ReID, no FT", "random": "random init", "upreid": "UP-ReID init"}


def _table(rows: dict) -> str:
    """One line per (method, re-ranking) in ``rows`` ({key of ROW_NAMES: {"plain": .., "rerank": ..}})."""
    keys = ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")
    head = f"{'method':<16} {'re-rank':<8} " + " ".join(f"{k:>7}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, res in rows.items():
        for mode in ("plain", "rerank"):
            if mode in res:
                lines.append(f"{ROW_NAMES.get(name, name):<16} {('yes' if mode == 'rerank' else 'no'):<8} "
                             + " ".join(f"{100 * res[mode][k]:7.2f}" for k in keys))
    return "\n".join(lines)


def _comparison(rows: dict, scale: DemoScale, seed: int = 0) -> str:
    """What the table says about pre-training: UP-ReID init against random init and against LDA on
    pixels, fine-tuned, without re-ranking. One seed: a line a reader can check against the table, and
    where a multi-seed study says how much of it is noise."""
    u, r, lda = (rows[k]["plain"] for k in ("upreid", "random", "lda"))

    def d(a, b):
        return f"{100 * (a['mAP'] - b['mAP']):+.2f} mAP, {100 * (a['Rank-1'] - b['Rank-1']):+.2f} Rank-1"
    study = ("the 5-seed study at this scale is in README.md, 'What the demo shows'" if scale.device == "cpu"
             else "no multi-seed study of this scale has been run")
    return (f"pre-training, UP-ReID init - random init: {d(u, r)}; UP-ReID init - LDA on pixels: {d(u, lda)} "
            f"(no re-ranking; seed {seed}, and seeds move a run by a few mAP: {study})")


def _curves(out: str) -> str | None:
    """``curves.png``: the pre-training losses and both fine-tunings' loss and accuracy, per step."""
    from upreid.evaluation.plots import plot_curves
    try:
        a = plot_curves(os.path.join(out, "curves_pretrain.png"), {"UP-ReID": os.path.join(out, "pretrain", "metrics.jsonl")},
                        {"loss": "pre-training loss", "loss_cl": "instance contrast", "loss_gc": "global consistency",
                         "loss_ic": "patch contrast"}, title="UP-ReID pre-training")
        runs = {ROW_NAMES[k]: os.path.join(out, f"finetune_{k}", "metrics.jsonl") for k in ("upreid", "random")}
        b = plot_curves(os.path.join(out, "curves_finetune.png"), runs,
                        {"loss": "fine-tuning loss", "loss_id": "ID loss", "acc": "training accuracy"},
                        title="fine-tuning (BoT)")
        return f"{a}, {b}"
    except ImportError as e:        # matplotlib missing: the table still stands
        log.warning("%s; no curves drawn", e)
        return None


def render_data(data: str, scale: DemoScale, progress: bool = True) -> None:
    """Render the demo's synthetic set into ``data``, first removing a set an earlier demo left there
    (``--overwrite``): ``generate`` writes only its own files, and a set of another scale would mix in."""
    from upreid.data.cli import remove_set
    from upreid.data.synthetic import generate
    remove_set(data)
    generate(data, synth_config(scale), workers=max(1, min(8, os.cpu_count() or 1)), progress=progress)


def run_environment(device: str) -> dict:
    """Where and with what the demo ran, for summary.json (benchmarks/demo_report.py copies it into
    its rows): the device it used, the commit of this source tree, torch, the time and the load."""
    import datetime

    from upreid.utils.environment import device_name, git_commit
    return {"device": device_name(device), "commit": git_commit(), "torch": torch.__version__,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


RESULTS = ("summary.json", "summary.txt", "curves_pretrain.png", "curves_finetune.png", "pretrain",
           "finetune_upreid", "finetune_random")      # what a demo writes besides its data (re-rendered)


def remove_results(out: str) -> None:
    """Remove an earlier demo's results from ``out`` (only the entries a demo writes; nothing else)."""
    import shutil
    for name in RESULTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def run_demo(out: str = "upreid_demo", scale: DemoScale | None = None, overwrite: bool = False,
             progress: bool = True, seed: int = 0) -> dict:
    from upreid.data.datasets import synth
    from upreid.engine.config import load_config
    from upreid.engine.finetune import finetune
    from upreid.engine.pretrain import export_backbone, pretrain
    from upreid.engine.trainer import finished
    from upreid.evaluation.baselines import frozen_trunk_baseline, pixel_baselines
    from upreid.evaluation.rerank_settings import rerank_settings

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"demo: --seed must be an integer >= 0 (it seeds the pre-training and both "
                         f"fine-tunings), got {seed!r}")
    if scale is None:
        scale = GPU if torch.cuda.is_available() else CPU
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"demo: {out!r} is not empty; pass --overwrite or another --out")
    os.makedirs(out, exist_ok=True)
    remove_results(out)       # an earlier demo's table must not outlive this run if it stops half-way
    times, t0 = {}, time.perf_counter()
    prog = [] if progress else ["train.progress=false"]

    data = os.path.join(out, "data")
    t = time.perf_counter()
    log.info("[1/6] rendering the synthetic dataset (%d ids, %d unlabeled images) into %s", scale.ids,
             scale.unlabeled, data)
    render_data(data, scale, progress)
    times["synth"] = time.perf_counter() - t

    t = time.perf_counter()
    ds = synth(data)
    rr = rerank_settings([r.pid for r in ds.query], [r.pid for r in ds.gallery])
    log.info("[2/6] pixel baselines; re-ranking with k1=%d, k2=%d (%.1f images per query identity)",
             rr["k1"], rr["k2"], rr["images_per_identity"])
    rows = pixel_baselines(ds, scale.pretrain_height, scale.pretrain_width,
                           rerank={k: rr[k] for k in ("k1", "k2", "lambda_value")})
    times["baselines"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("[3/6] pre-training UP-ReID (%d steps, ResNet-%d/%d at %dx%d, %s)", scale.pretrain_steps,
             scale.pretrain_depth if scale.device == "cpu" else 50, scale.width, scale.pretrain_height,
             scale.pretrain_width, scale.device)
    pcfg = load_config("pretrain", None, pretrain_overrides(scale, os.path.join(data, "unlabeled"),
                                                            os.path.join(out, "pretrain"), seed) + prog)
    pre = finished(pretrain(pcfg, overwrite=True), "pre-training")     # Ctrl-C: the demo stops here
    times["pretrain"] = time.perf_counter() - t

    backbone = os.path.join(out, "pretrain", "backbone.pt")
    log.info("[4/6] exporting the pre-trained trunk to %s", backbone)
    export_backbone(pre["checkpoint"], backbone, overwrite=True)
    rows["frozen"] = frozen_trunk_baseline(ds, backbone, scale.pretrain_height, scale.pretrain_width,
                                           last_stride=1, flip=scale.flip_test, device=scale.device,
                                           rerank={k: rr[k] for k in ("k1", "k2", "lambda_value")})

    for i, (key, init) in enumerate((("upreid", backbone), ("random", None))):
        t = time.perf_counter()
        log.info("[%d/6] fine-tuning (BoT) from %s", 5 + i, ROW_NAMES[key])
        fcfg = load_config("finetune", None, finetune_overrides(scale, data, os.path.join(out, f"finetune_{key}"),
                                                                init, seed, rerank=rr) + prog)
        rows[key] = finished(finetune(fcfg, overwrite=True), f"fine-tuning from {ROW_NAMES[key]}")["results"]
        times[f"finetune_{key}"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    rows = {k: rows[k] for k in ROW_NAMES}
    curves = _curves(out)

    table = _table(rows)
    payload = {"scale": dataclasses.asdict(scale), "seed": seed, "rerank": rr, "results": rows, "seconds": times,
               "threads": torch.get_num_threads(), "cuda": scale.device == "cuda", **run_environment(scale.device)}
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, os.path.join(out, "summary.json"))
    comparison = _comparison(rows, scale, seed)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(table + "\n\n" + comparison + "\n")
    return {"out": out, "table": table, "comparison": comparison, "results": rows, "seconds": times, "rerank": rr,
            "curves": curves}


def run_demo_cli(args) -> int:
    from upreid.engine.trainer import RunInterrupted
    try:
        res = run_demo(args.out, TINY if args.tiny else None, overwrite=args.overwrite,
                       progress=not args.no_progress, seed=args.seed)
    except RunInterrupted as e:
        import sys
        print(f"demo: stopped: {e.what} was interrupted at step {e.step}/{e.total}. Nothing after it ran and no "
              f"table was written. Run the demo again to start over (add --overwrite: {os.path.abspath(args.out)} "
              f"now holds the partial run)", file=sys.stderr)
        return e.exit_code
    except (FileExistsError, ValueError, RuntimeError) as e:
        import sys
        print(f"error: {e}", file=sys.stderr)
        return 1
    s, rr = res["seconds"], res["rerank"]
    print()
    print(res["table"])
    print()
    print(res["comparison"])
    print(f"\nre-ranking: k1={rr['k1']}, k2={rr['k2']}, lambda={rr['lambda_value']} "
          f"({rr['images_per_identity']:.1f} images per query identity in query + gallery)")
    print(f"time: {s['total']:.0f} s (synth {s['synth']:.0f}, baselines {s['baselines']:.0f}, pretrain "
          f"{s['pretrain']:.0f}, fine-tune {s['finetune_upreid']:.0f} + {s['finetune_random']:.0f}); rank lists in "
          "finetune_*/ranklist.png, training curves in curves_*.png")
    print(f"everything is in {res['out']}")
    return 0
