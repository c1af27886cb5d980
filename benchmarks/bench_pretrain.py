"""End-to-end UP-ReID pre-training throughput: samples/s of the full step (load + forward + backward +
optimizer), one sample = the original image + 2 augmented views.

Two contenders in the same run:
  upreid  the engine's step: fused losses, upreid.data pipeline (DALI when installed), channels_last
          and bf16 on GPU
  plain   what one writes by hand: the same model with the reference (plain PyTorch) losses, a torch
          DataLoader (upreid.data's torch fallback), no channels_last; bf16 autocast on GPU as well

CPU (now):  python benchmarks/bench_pretrain.py                       (ResNet-18, 128x64, batch 16)
GPU:        python benchmarks/bench_pretrain.py --device cuda         (ResNet-50, 256x128, batch 256)
Rows go to benchmarks/results/results.csv (or --csv PATH) through benchmarks/common.py; 'config' holds
every setting of the run (steps, warm-up, workers, compile, the data backend that ran), 'extra' the
data-wait and loss fractions of the step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS_CSV, append_rows, env_fields  # noqa: E402
from upreid.engine.config import load_config  # noqa: E402
from upreid.engine.pretrain import list_images  # noqa: E402
from upreid.data.base import StepStream  # noqa: E402
from upreid.data.loader import loader_from_config, resolve_backend  # noqa: E402
from upreid.models import UPReID  # noqa: E402


IMPLS = ("upreid", "plain")


def make_images(folder: str, n: int, h: int, w: int, seed: int = 0) -> str:
    """Smooth random person-sized JPEGs (decode cost close to real photos, unlike pure noise)."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.BILINEAR).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    return folder


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(impl: str, args, device, root: str) -> dict:
    upreid = impl == "upreid"
    backend = resolve_backend(args.backend if upreid else
                              ("torch" if args.plain_backend == "auto" else args.plain_backend))
    if device.type == "cuda":   # this implementation's peak, not the largest of the run so far
        torch.cuda.reset_peak_memory_stats(device)
    cfg = load_config("pretrain", None, [
        f"model.depth={args.depth}", f"model.queue_size={args.queue}", f"data.root={root}",
        f"data.height={args.height}", f"data.width={args.width}", f"data.batch_size={args.batch}",
        f"data.workers={args.workers}", f"data.backend={backend}",
        f"model.loss_impl={'fused' if upreid else 'reference'}", f"model.hidden_dim={args.hidden}"])
    torch.manual_seed(0)
    model = UPReID.from_config(cfg["model"])
    channels_last = upreid and device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    if upreid and args.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)
    amp = device.type == "cuda"
    loader = loader_from_config("pretrain", list_images(root), cfg["data"], device=device.type)
    it = (batch for _, _, batch in StepStream(loader, lambda epoch: loader.sampler.steps))
    times, waits = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        batch = next(it)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for k in ("original", "view1", "view2"):
            batch[k] = batch[k].contiguous(memory_format=fmt)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        if step >= args.warmup:
            times.append(t2 - t0)
            waits.append(t1 - t0)
    loss_ms = time_losses(model, args, device)
    step_ms = float(np.median(times)) * 1e3
    return {"impl": impl, "step_ms": step_ms, "iqr_ms": float(np.subtract(*np.percentile(times, [75, 25]))) * 1e3,
            "samples_per_s": args.batch / (step_ms / 1e3), "data_frac": float(np.sum(waits) / np.sum(times)),
            "loss_frac": loss_ms / step_ms, "backend": backend, "channels_last": channels_last,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def time_losses(model: UPReID, args, device, reps: int = 5) -> float:
    """Forward + backward of the three loss terms alone at the step's shapes (median ms)."""
    b, d, p = args.batch, model.queue.shape[1], model.stripes
    q = torch.nn.functional.normalize(torch.randn(2 * b, d, device=device), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(2 * b, d, device=device), dim=1)
    u = torch.nn.functional.normalize(torch.randn(2 * b, p, d, device=device), dim=-1).requires_grad_()
    v = torch.nn.functional.normalize(torch.randn(2 * b, p, d, device=device), dim=-1)
    bank = model.queue
    ts = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        loss = model.loss_cl(q[:b], k[:b], bank) + model.loss_gc(q, k, bank) + model.loss_ic(u, v)
        loss.backward()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[1:])) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depth", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--hidden", type=int, default=2048, help="MLP hidden width")
    ap.add_argument("--queue", type=int, default=65536)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--backend", default="auto", help="upreid's data.backend (auto = DALI when installed)")
    ap.add_argument("--plain-backend", default="auto", help="the plain loop's data.backend (auto = torch)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--data", help="folder of images (default: generated in a temp folder)")
    ap.add_argument("--images", type=int, help="images to generate")
    ap.add_argument("--machine", help="device name for the CSV (default: detected)")
    ap.add_argument("--csv", default=str(RESULTS_CSV), help="the CSV the rows are appended to")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or not impls:
        ap.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    for name in ("backend", "plain_backend"):
        try:
            resolve_backend(getattr(args, name))
        except ValueError as e:
            ap.error(f"--{name.replace('_', '-')}: {e}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.depth = args.depth or (50 if gpu else 18)
    args.height, args.width = args.height or (256 if gpu else 128), args.width or (128 if gpu else 64)
    args.batch = args.batch or (256 if gpu else 16)
    args.steps = args.steps or (20 if gpu else 6)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_images(os.path.join(tmp, "images"), args.images or args.batch * 4,
                                        args.height, args.width)
        rows, results = [], {}
        images = len(list_images(root))
        for impl in impls:
            r = run(impl, args, device, root)
            results[impl] = r
            print(json.dumps(r))
            env = env_fields(device)
            if args.machine:
                env["device"] = args.machine
            rows.append({**env, "benchmark": "pretrain_step", "impl": impl,
                         "config": f"resnet{args.depth} {args.height}x{args.width} batch {args.batch} "
                                   f"queue {args.queue} hidden {args.hidden} images {images} steps {args.steps} "
                                   f"warmup {args.warmup} workers {args.workers} "
                                   f"compile {int(args.compile and impl == 'upreid')} backend {r['backend']}",
                         "dtype": "bf16" if gpu else "fp32", "pass": "train_step", "median_ms": f"{r['step_ms']:.1f}",
                         "iqr_ms": f"{r['iqr_ms']:.1f}", "peak_mem_mb": f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] else "",
                         "extra": json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                              if k in ("samples_per_s", "data_frac", "loss_frac", "backend",
                                                       "channels_last")})})
    if len(results) == 2:
        print(f"speed-up upreid / plain: {results['upreid']['samples_per_s'] / results['plain']['samples_per_s']:.2f}x")
    if not args.no_csv:
        print("appended to", append_rows(rows, args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
