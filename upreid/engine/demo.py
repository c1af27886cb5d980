"""``upreid demo``: the whole system in minutes on a machine with no dataset and no GPU.

1. render the synthetic person dataset (``upreid synth``),
2. pre-train UP-ReID on its unlabeled images (CPU: ResNet-18 at 64 x 32, a few dozen steps; GPU:
   ResNet-50 at 256 x 128, the real recipe for a short schedule),
3. export the pre-trained trunk,
4. fine-tune it (BoT) and a random-initialised twin with the same settings and seed,
5. evaluate both with and without re-ranking and print the table.

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
    unlabeled: int = 512
    image_height: int = 64        # rendered size
    image_width: int = 32
    pretrain_depth: int = 18
    pretrain_height: int = 64
    pretrain_width: int = 32
    pretrain_batch: int = 32
    pretrain_steps: int = 48
    queue_size: int = 512
    finetune_epochs: int = 8
    finetune_p: int = 8
    finetune_k: int = 4
    device: str = "cpu"


CPU = DemoScale()
GPU = DemoScale(ids=200, cameras=6, unlabeled=4000, image_height=128, image_width=64, pretrain_depth=50,
                pretrain_height=256, pretrain_width=128, pretrain_batch=128, pretrain_steps=300,
                queue_size=4096, finetune_epochs=30, finetune_p=16, finetune_k=4, device="cuda")
TINY = DemoScale(ids=24, cameras=3, unlabeled=64, pretrain_batch=16, pretrain_steps=4, queue_size=64,
                 finetune_epochs=2, finetune_p=4, finetune_k=4)   # tests: seconds, not results


def pretrain_overrides(s: DemoScale, root: str, out: str, seed: int = 0) -> list:
    common = [f"data.root={root}", f"train.output={out}", f"train.steps={s.pretrain_steps}", f"train.seed={seed}",
              f"data.batch_size={s.pretrain_batch}", f"model.queue_size={s.queue_size}",
              f"train.device={s.device}", f"train.checkpoint_every={max(1, s.pretrain_steps)}"]
    if s.device == "cuda":   # the UP-ReID R50 recipe, shorter
        return common + ["model.depth=50", "optim.lr=0.3", "data.workers=8", f"optim.warmup_steps={s.pretrain_steps // 10}"]
    return common + [f"model.depth={s.pretrain_depth}", "model.last_stride=1", "model.hidden_dim=256",
                     "model.momentum=0.99", f"data.height={s.pretrain_height}", f"data.width={s.pretrain_width}",
                     "data.workers=0", "optim.lr=0.05", "optim.warmup_steps=4", "train.log_every=5"]


def finetune_overrides(s: DemoScale, root: str, out: str, init: str | None, seed: int = 0) -> list:
    h, w = (s.pretrain_height, s.pretrain_width)
    o = [f"data.root={root}", "data.dataset=synth", f"train.output={out}", f"init={init or 'random'}",
         f"model.depth={s.pretrain_depth}", f"data.height={h}", f"data.width={w}", f"data.p={s.finetune_p}",
         f"data.k={s.finetune_k}", f"train.epochs={s.finetune_epochs}", f"train.seed={seed}",
         f"train.device={s.device}", f"optim.warmup_epochs={max(1, s.finetune_epochs // 8)}",
         f"optim.milestones=[{max(1, int(s.finetune_epochs * 0.75))}]", "eval.every=0",
         f"train.checkpoint_every={s.finetune_epochs}", "eval.ranklist_queries=8"]
    if s.device == "cpu":
        o += ["data.workers=0", "data.pad=4", "train.log_every=5"]
    else:
        o += ["data.workers=8"]
    return o


def _table(rows: dict) -> str:
    keys = ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")
    head = f"{'initialisation':<18} {'re-rank':<8} " + " ".join(f"{k:>7}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, res in rows.items():
        for mode in ("plain", "rerank"):
            if mode in res:
                lines.append(f"{name:<18} {('yes' if mode == 'rerank' else 'no'):<8} "
                             + " ".join(f"{100 * res[mode][k]:7.2f}" for k in keys))
    return "\n".join(lines)


def run_demo(out: str = "upreid_demo", scale: DemoScale | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    from upreid.data.synthetic import SynthConfig, generate
    from upreid.engine.config import load_config
    from upreid.engine.finetune import finetune
    from upreid.engine.pretrain import export_backbone, pretrain

    if scale is None:
        scale = GPU if torch.cuda.is_available() else CPU
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"demo: {out!r} is not empty; pass --overwrite or another --out")
    os.makedirs(out, exist_ok=True)
    times, t0 = {}, time.perf_counter()
    prog = [] if progress else ["train.progress=false"]

    data = os.path.join(out, "data")
    t = time.perf_counter()
    log.info("[1/5] rendering the synthetic dataset (%d ids, %d unlabeled images) into %s", scale.ids,
             scale.unlabeled, data)
    generate(data, SynthConfig(ids=scale.ids, cameras=scale.cameras, unlabeled=scale.unlabeled,
                               height=scale.image_height, width=scale.image_width,
                               distractors=scale.ids // 2, junk=scale.ids // 10),
             workers=max(1, min(8, os.cpu_count() or 1)), progress=progress)
    times["synth"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("[2/5] pre-training UP-ReID (%d steps, ResNet-%d at %dx%d, %s)", scale.pretrain_steps,
             scale.pretrain_depth if scale.device == "cpu" else 50, scale.pretrain_height, scale.pretrain_width,
             scale.device)
    pcfg = load_config("pretrain", None, pretrain_overrides(scale, os.path.join(data, "unlabeled"),
                                                os.path.join(out, "pretrain")) + prog)
    pre = pretrain(pcfg, overwrite=True)
    times["pretrain"] = time.perf_counter() - t

    backbone = os.path.join(out, "pretrain", "backbone.pt")
    log.info("[3/5] exporting the pre-trained trunk to %s", backbone)
    export_backbone(pre["checkpoint"], backbone, overwrite=True)

    results = {}
    for i, (name, init) in enumerate((("UP-ReID", backbone), ("random", None))):
        t = time.perf_counter()
        log.info("[%d/5] fine-tuning (BoT) from %s init", 4 + i, name)
        fcfg = load_config("finetune", None, finetune_overrides(scale, data, os.path.join(
            out, "finetune_" + ("upreid" if init else "random")), init) + prog)
        summary = finetune(fcfg, overwrite=True)
        results[name] = summary["results"]
        times["finetune_" + ("upreid" if init else "random")] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    table = _table(results)
    payload = {"scale": dataclasses.asdict(scale), "results": results, "seconds": times,
               "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    return {"out": out, "table": table, "results": results, "seconds": times}


def run_demo_cli(args) -> int:
    try:
        res = run_demo(args.out, TINY if args.tiny else None, overwrite=args.overwrite,
                       progress=not args.no_progress)
    except (FileExistsError, ValueError, RuntimeError) as e:
        import sys
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = res["seconds"]
    print()
    print(res["table"])
    print(f"\ntime: {s['total']:.0f} s (synth {s['synth']:.0f}, pretrain {s['pretrain']:.0f}, fine-tune "
          f"{s['finetune_upreid']:.0f} + {s['finetune_random']:.0f}); rank lists in "
          f"finetune_*/ranklist.png")
    print(f"everything is in {res['out']}")
    return 0
