"""Is the package's pre-training code the reason its trunks hold so little identity? An independent check.

The pre-training study finds that MoCo v2 and UP-ReID trunks, pre-trained at the demo's CPU scale, probe
about as well as a random trunk and fine-tune no better. This script rules the implementation in or out:
a MoCo v2 written here in plain PyTorch, sharing nothing with the package's pre-training (not its data
pipeline, augmentation, model wrapper, queue, loss operator, optimiser set-up or training loop; only the
ResNet trunk class), pre-trains on the same unlabeled images with the same settings as the study's
``moco`` variant (steps, batch, learning rate and schedule, queue, temperature, key momentum, head, the
LUP augmentation: crops of 20-100 % area, grayscale, blur, flip, random erasing). Its trunk is then
probed and fine-tuned exactly as the study's trunks are (``study_pretrain.probe_trunk`` and the demo's
fine-tuning recipe). If it lands where the package's MoCo lands, the package is not why pre-training
finds so little identity here.

    python benchmarks/crosscheck_moco.py --seeds 0 1 2 3 4 --work runs/crosscheck \\
        --table benchmarks/results/crosscheck_moco_table.md

One CSV row per seed (``benchmarks/results/crosscheck_moco.csv``); the table puts the study's random and
``moco`` rows beside it.
"""
from __future__ import annotations

import glob
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import study_pretrain as study  # noqa: E402

CSV = Path(__file__).resolve().parent / "results" / "crosscheck_moco.csv"
FIELDS = ["timestamp", "commit", "device", "torch", "threads", "scale", "variant", "seed", "pretrain_s",
          "final_loss", "frozen_mAP", "probe_mAP", "probe_bn_mAP", "mAP", "Rank-1", "mAP_rerank", "Rank-1_rerank"]
VARIANT = "moco-independent"
KEYS = ("probe_mAP", "probe_bn_mAP", "mAP", "Rank-1")
# the study's moco variant at the CPU scale (configs/pretrain defaults the demo keeps)
TEMPERATURE, HIDDEN, DIM = 0.1, 256, 128
CROP, RATIO, GRAY_P, BLUR_P, BLUR_SIGMA, FLIP_P = (0.2, 1.0), (3 / 4, 4 / 3), 0.2, 0.5, (0.1, 2.0), 0.5
ERASE_P, ERASE_AREA, ERASE_RATIO = 0.5, (0.02, 0.6), (0.3, 3.3)
MEAN, STD = (0.3525, 0.3106, 0.3140), (0.2660, 0.2522, 0.2505)
LUMA = (0.299, 0.587, 0.114)


def load_images(root: str, height: int, width: int):
    """Every image under ``root`` as one uint8 tensor [N, 3, height, width] (resized if need be)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    files = sorted(glob.glob(os.path.join(root, "**", "*.jpg"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .jpg images under {root!r}")
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                     for f in files])
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x.float(), size=(height, width), mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x


def views(x, gen):
    """One augmented, normalised view of each image of the uint8 batch ``x`` [B, 3, H, W], drawn with
    the torch generator ``gen``: a random resized crop (bilinear) with a flip, grayscale, Gaussian blur,
    normalisation, random erasing (to 0, the mean pixel)."""
    import torch
    import torch.nn.functional as F
    B, _, H, W = x.shape
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    s = CROP[0] + u(B) * (CROP[1] - CROP[0])
    r = torch.exp(math.log(RATIO[0]) + u(B) * (math.log(RATIO[1]) - math.log(RATIO[0])))
    w = torch.sqrt(s * r * H / W).clamp(max=1)          # normalised crop width and height
    h = torch.sqrt(s * W / (r * H)).clamp(max=1)
    cx = (u(B) * (1 - w) + w / 2) * 2 - 1
    cy = (u(B) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(u(B) < FLIP_P, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [B, 3, H, W], align_corners=False)
    v = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
    luma = (v * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(v)
    v = torch.where((u(B) < GRAY_P).view(B, 1, 1, 1), luma, v)
    blur, sigma = u(B) < BLUR_P, BLUR_SIGMA[0] + u(B) * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
    for i in torch.nonzero(blur).flatten().tolist():
        rad = int(math.ceil(3 * float(sigma[i])))
        k = torch.exp(-0.5 * (torch.arange(-rad, rad + 1.0) / sigma[i]) ** 2)
        k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
        p = F.pad(v[i:i + 1], (rad, rad, rad, rad), mode="replicate")
        v[i] = F.conv2d(F.conv2d(p, k, groups=3), k.transpose(-1, -2), groups=3)[0]
    v = (v - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    for i in torch.nonzero(u(B) < ERASE_P).flatten().tolist():
        a = (ERASE_AREA[0] + float(u(1)) * (ERASE_AREA[1] - ERASE_AREA[0])) * H * W
        rr = math.exp(math.log(ERASE_RATIO[0]) + float(u(1)) * (math.log(ERASE_RATIO[1]) - math.log(ERASE_RATIO[0])))
        eh, ew = min(H, round(math.sqrt(a * rr))), min(W, round(math.sqrt(a / rr)))
        y0, x0 = int(float(u(1)) * (H - eh + 1)), int(float(u(1)) * (W - ew + 1))
        v[i, :, y0:y0 + eh, x0:x0 + ew] = 0
    return v


def pretrain_independent(images, scale, seed: int, steps: int | None = None):
    """MoCo v2 on ``images`` (uint8 [N, 3, H, W]) at ``scale``'s settings. Returns (trunk state_dict,
    final loss, seconds)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from upreid.models.resnet import ResNet

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = ResNet(scale.pretrain_depth, last_stride=1, width=scale.width)
            self.head = nn.Sequential(nn.Linear(self.trunk.out_channels, HIDDEN), nn.ReLU(inplace=True),
                                      nn.Linear(HIDDEN, DIM))

        def forward(self, x):
            return F.normalize(self.head(self.trunk(x).mean((2, 3))), dim=1)

    q = Encoder()
    k = Encoder()
    k.load_state_dict(q.state_dict())
    k.requires_grad_(False)
    queue = F.normalize(torch.randn(scale.queue_size, DIM, generator=gen), dim=1)
    params = list(q.parameters())
    opt = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": 1e-4},
                           {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                          lr=scale.pretrain_lr, momentum=0.9)
    steps = steps or scale.pretrain_steps
    warm, b, n = max(1, steps // 12), scale.pretrain_batch, images.shape[0]
    m = 0.99 if scale.device == "cpu" else 0.999
    order, pos, ptr, loss = torch.randperm(n, generator=gen), 0, 0, None
    t = time.perf_counter()
    for step in range(steps):
        f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = scale.pretrain_lr * f
        if pos + b > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx, pos = order[pos:pos + b], pos + b
        x = images[idx]
        zq = q(views(x, gen))
        with torch.no_grad():
            for pk, pq in zip(k.parameters(), q.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)
            zk = k(views(x, gen))
        logits = torch.cat([(zq * zk).sum(1, keepdim=True), zq @ queue.t()], 1) / TEMPERATURE
        loss = F.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            queue[(torch.arange(len(idx)) + ptr) % scale.queue_size] = zk
            ptr = (ptr + len(idx)) % scale.queue_size
    return q.trunk.state_dict(), loss.item(), time.perf_counter() - t


def run_one(scale, seed: int, data: str, work: str, rerank: dict, progress: bool, steps: int | None = None) -> dict:
    from upreid.engine import checkpoint as ckpt_io
    from upreid.engine.config import load_config
    from upreid.engine.demo import finetune_overrides
    from upreid.engine.finetune import finetune
    from upreid.engine.trainer import finished
    run = os.path.join(work, f"{VARIANT}_s{seed}")
    images = load_images(os.path.join(data, "unlabeled"), scale.pretrain_height, scale.pretrain_width)
    state, loss, secs = pretrain_independent(images, scale, seed, steps)
    trunk = os.path.join(run, "trunk.pt")
    ckpt_io.save_backbone(trunk, state, depth=scale.pretrain_depth, width=scale.width, last_stride=1)
    probe = study.probe_trunk(scale, data, trunk)
    prog = [] if progress else ["train.progress=false"]
    cfg = load_config("finetune", None, finetune_overrides(scale, data, os.path.join(run, "finetune"), trunk, seed,
                                                           rerank=rerank) + ["eval.ranklist_queries=0"] + prog)
    r = finished(finetune(cfg, overwrite=True), f"seed {seed}: fine-tuning")["results"]
    return {"variant": VARIANT, "seed": seed, "pretrain_s": round(secs, 1), "final_loss": round(loss, 4), **probe,
            "mAP": r["plain"]["mAP"], "Rank-1": r["plain"]["Rank-1"], "mAP_rerank": r["rerank"]["mAP"],
            "Rank-1_rerank": r["rerank"]["Rank-1"]}


def table(rows: list, reference: list) -> str:
    """Mean ± sample std (raw values) of the independent MoCo beside the study's random and moco rows,
    and its difference from the study's moco with two standard errors."""
    vals = study._values
    out = ["| pre-training | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name, rs, v in (("study: random", reference, "random"), ("study: moco (the package)", reference, "moco"),
                        ("moco, independent", rows, VARIANT)):
        if vals(rs, v, "mAP"):
            out.append(f"| {name} | {len(vals(rs, v, 'mAP'))} | " + " | ".join(study.cell(vals(rs, v, k)) for k in KEYS)
                       + " |")
    out += ["", "| independent - package | metric | difference | 2 SE | exceeds 2 SE |", "|---|---|---|---|---|"]
    out += [r for key in KEYS if (r := study.difference_row("moco", key, vals(rows, VARIANT, key),
                                                               vals(reference, "moco", key)))]
    return "\n".join(out)


def main(argv=None) -> int:
    args = study.side_study_parser(__doc__, "runs/crosscheck", CSV, [0, 1, 2, 3, 4]).parse_args(argv)

    def one(scale, variant, seed, data, rerank):
        row = run_one(scale, seed, data, args.work, rerank, args.progress)
        print(f"{variant} seed {seed}: probe {100 * row['probe_bn_mAP']:.2f}, fine-tuned mAP {100 * row['mAP']:.2f}",
              end="", flush=True)
        return row

    return study.side_study(args, [VARIANT], one, FIELDS, table)


if __name__ == "__main__":
    sys.exit(main())
