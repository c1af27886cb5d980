"""The Pillow + torch fallback loaders: outputs, bookkeeping consistent with pixels, rates of the
random parts, bad images, and sample counts."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from upreid.data.augment import LUP_MEAN, LUP_STD, PretrainAug
from upreid.data.imageio import BadImageError
from upreid.data.loader import build_loader
from upreid.data.records import Record
from upreid.data.testing import corrupt_files, truncated_copy, write_tiny
from upreid.data.transforms import pretrain_view

MEAN = torch.tensor(LUP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(LUP_STD).view(1, 3, 1, 1)
NO_RANDOM_PIXELS = dict(grayscale_p=0.0, blur_p=0.0, erasing_p=0.0, flip_p=0.0)


def to_pixels(x):
    return (x * STD + MEAN) * 255


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny")), n=24, ids=6)


def load(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None]


def crop_like_box(img, box, h, w):
    """Independent bilinear crop of the normalised box (y0, x0, y1, x1) with grid_sample."""
    y0, x0, y1, x1 = box.tolist()
    ys = y0 + (torch.arange(h) + 0.5) / h * (y1 - y0)              # normalised source centres
    xs = x0 + (torch.arange(w) + 0.5) / w * (x1 - x0)
    gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None]
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_eval_order_last_batch_flip_test(recs):
    L = build_loader("eval", recs[:23], batch_size=5, backend="torch", workers=0, aug={"flip_test": True})
    batches = list(L)
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 3]
    idx = torch.cat([b["index"] for b in batches])
    assert idx.tolist() == list(range(23))
    assert torch.cat([b["pids"] for b in batches]).tolist() == [r.pid for r in recs[:23]]
    b = batches[0]
    assert torch.equal(b["images_flipped"], b["images"].flip(-1))
    assert b["images"].shape == (5, 3, 256, 128) and b["images"].dtype == torch.float32
    assert L.summary["samples"] == 23 and L.summary["skipped"] == 0


def test_pretrain_boxes_consistent_with_pixels(recs):
    L = build_loader("pretrain", recs, batch_size=8, backend="torch", workers=0, aug=NO_RANDOM_PIXELS)
    b = next(iter(L))
    for i in range(4):
        img = load(recs[int(b["index"][i])].path)
        for v in (1, 2):
            ref = crop_like_box(img, b[f"box{v}"][i], 256, 128)
            err = (to_pixels(b[f"view{v}"][i:i + 1]) - ref).abs()
            assert err.mean() < 1.5, err.mean()
        assert torch.allclose(to_pixels(b["original"][i:i + 1]), crop_like_box(img, torch.tensor([0, 0, 1, 1.]), 256, 128),
                              atol=2.0)
    box = b["box1"]
    assert ((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]) & (box >= 0).all(1) & (box <= 1 + 1e-6).all(1)).all()


def test_pretrain_flip_gray_erase_pixels(recs):
    base = build_loader("pretrain", recs, batch_size=8, backend="torch", workers=0, aug=NO_RANDOM_PIXELS)
    flipped = build_loader("pretrain", recs, batch_size=8, backend="torch", workers=0,
                           aug=dict(NO_RANDOM_PIXELS, flip_p=1.0))
    a, b = next(iter(base)), next(iter(flipped))
    assert torch.equal(a["box1"], b["box1"]) and b["flip1"].eq(1).all() and a["flip1"].eq(0).all()
    assert torch.equal(a["view1"].flip(-1), b["view1"])
    g = next(iter(build_loader("pretrain", recs, batch_size=8, backend="torch", workers=0,
                               aug=dict(NO_RANDOM_PIXELS, grayscale_p=1.0))))
    px = to_pixels(g["view1"])
    assert (px.max(1).values - px.min(1).values).abs().max() < 1e-3          # grey: channels equal
    assert g["gray1"].eq(1).all() and torch.equal(g["box1"], a["box1"])
    g = next(iter(build_loader("pretrain", recs, batch_size=8, backend="torch", workers=0,
                               aug=dict(NO_RANDOM_PIXELS, erasing_p=1.0))))
    for i in range(8):
        y0, x0, y1, x1 = (g["erase1"][i] * torch.tensor([256, 128, 256, 128])).round().long().tolist()
        assert y1 > y0 and x1 > x0
        assert g["view1"][i, :, y0:y1, x0:x1].abs().max() == 0
        assert g["view1"][i].ne(0).float().sum() >= 3 * (256 * 128 - (y1 - y0) * (x1 - x0))


def test_random_rates_and_crop_distribution():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8))
    aug = PretrainAug(height=16, width=8)
    rng = np.random.default_rng(1)
    draws = [pretrain_view(img, rng, aug) for _ in range(700)]
    n = len(draws)
    for key, p in (("flip", 0.5), ("gray", 0.2)):
        rate = np.mean([d[key] for d in draws])
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (key, rate)
    blur = np.mean([d["sigma"] > 0 for d in draws])
    erase = np.mean([float(d["erase"].sum() > 0) for d in draws])
    assert abs(blur - 0.5) < 0.08 and abs(erase - 0.5) < 0.08
    sig = np.array([d["sigma"] for d in draws if d["sigma"] > 0])
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    boxes = np.stack([d["box"].numpy() for d in draws])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6
    # 10 attempts on a 2:1 image: only draws with s * r <= 1/2 fit, so crops are smaller than U(0.2, 1)
    # (mean 0.367 over 50,000 draws of a rejection sampler); nearly all keep their aspect
    assert abs(area.mean() - 0.367) < 4 * area.std() / np.sqrt(n)
    aspect = (boxes[:, 3] - boxes[:, 1]) * 64 / ((boxes[:, 2] - boxes[:, 0]) * 128)
    assert np.mean((aspect < 0.75 - 1e-4) | (aspect > 4 / 3 + 1e-4)) < 0.02


def _rejection_crop(rng, attempts, h=128, w=64, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop rule in normalised units: draw until a crop fits, at most
    ``attempts`` times; the last draw clamped when none did. Returns (height, width)."""
    for _ in range(attempts):
        s = rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = np.sqrt(s * r * h / w), np.sqrt(s * w / (r * h))
        if cw <= 1 and ch <= 1:
            return ch, cw
    return min(1.0, ch), min(1.0, cw)


@pytest.mark.parametrize("attempts", [1, 3, 10])
def test_crop_rule_matches_a_rejection_sampler(attempts):
    """crop_box's arithmetic choice among all-drawn attempts has the distribution of drawing until one
    fits: two-sample KS on the crop's area and log aspect, against a loop that stops at the first fit."""
    from upreid.data.augment import crop_box
    n, rng = 4000, np.random.default_rng(attempts)
    ours = []
    for _ in range(n):
        u = rng.random(2 * attempts + 2)
        y0, x0, y1, x1 = crop_box(list(u[0:2 * attempts:2]), list(u[1:2 * attempts:2]), u[-2], u[-1], 128, 64)
        assert 0 <= y0 <= y1 <= 1 + 1e-9 and 0 <= x0 <= x1 <= 1 + 1e-9
        ours.append((y1 - y0, x1 - x0))
    ref = [_rejection_crop(rng, attempts) for _ in range(n)]
    for f in (lambda hw: hw[0] * hw[1], lambda hw: np.log(hw[1] * 64 / (hw[0] * 128))):
        a, b = np.sort([f(x) for x in ours]), np.sort([f(x) for x in ref])
        grid = np.concatenate([a, b])
        ks = np.abs(np.searchsorted(a, grid, side="right") / n - np.searchsorted(b, grid, side="right") / n).max()
        assert ks < 1.95 * np.sqrt(2 / n), ks


def test_one_crop_attempt_keeps_the_single_draw_rule_and_stream():
    """crop_attempts=1 is the earlier rule (one draw, clamped) from the view's first four draws, and draws
    nothing more: a run written before the setting existed is continued by its checkpoint as it was."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8))
    aug = PretrainAug(height=16, width=8, crop_attempts=1)
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(50):
        d = pretrain_view(img, rng, aug)
        u = twin.random(13)
        s = 0.2 + u[0] * 0.8
        r = np.exp(np.log(3 / 4) + u[1] * (np.log(4 / 3) - np.log(3 / 4)))
        bw, bh = min(1.0, np.sqrt(s * r * 2)), min(1.0, np.sqrt(s / (2 * r)))
        y0, x0 = u[2] * (1 - bh), u[3] * (1 - bw)
        assert np.allclose(d["box"].numpy(), [y0, x0, y0 + bh, x0 + bw], atol=1e-6)


def test_crop_takes_the_first_attempt_that_fits():
    """The choice itself, which no distribution test sees (attempts are alike, so first, last or any fit
    are distributed the same): attempt 0 too wide, 1 and 2 fit -> attempt 1; on a wide image only the
    height decides; nothing fits -> the last attempt clamped."""
    from upreid.data.augment import crop_size
    # 2:1 image: attempt 0 (s=1, r=1) is too wide, 1 (s=0.2, r=3/4) and 2 fit
    h, w = crop_size([1.0, 0.0, 0.3], [0.5, 0.0, 0.5], 128, 64)
    assert (h, w) == pytest.approx((np.sqrt(0.2 * 64 / (0.75 * 128)), np.sqrt(0.2 * 0.75 * 128 / 64)))
    # 1:2 image: the height is what does not fit (s=1); attempt 1 (s=0.2, r=3/4) fits
    h, w = crop_size([1.0, 0.0], [0.0, 0.0], 64, 128)
    assert (h, w) == pytest.approx((np.sqrt(0.2 * 128 / (0.75 * 64)), np.sqrt(0.2 * 0.75 * 64 / 128)))
    assert h <= 1 and w <= 1
    # nothing fits (s=1 on a 2:1 image whatever the aspect): the last attempt, clamped
    h, w = crop_size([1.0, 1.0], [1.0, 0.0], 128, 64)
    assert (h, w) == pytest.approx((np.sqrt(64 / (0.75 * 128)), 1.0))
    with pytest.raises(ValueError, match="one area and one aspect draw per attempt"):
        crop_size([0.5], [], 128, 64)


def test_crop_attempts_is_checked():
    for bad in (0, 101, 2.0, True):
        with pytest.raises(ValueError, match=r"crop_attempts must be an integer in 1\.\.100"):
            PretrainAug(crop_attempts=bad).validate()


def test_finetune_flip_shift_bookkeeping(recs):
    L = build_loader("finetune", recs, batch_size=12, backend="torch", workers=0, aug={"erasing_p": 0.0}, k=2)
    E = build_loader("eval", recs, batch_size=24, backend="torch", workers=0)
    ev = next(iter(E))["images"]
    b = next(iter(L))
    pids = b["pids"]
    assert len(set(pids.tolist())) == 6 and all((pids == p).sum() == 2 for p in set(pids.tolist()))
    for i in range(12):
        src = ev[int(b["index"][i])]
        if b["flip"][i]:
            src = src.flip(-1)
        dy, dx = b["shift"][i].long().tolist()
        assert -10 <= dy <= 10 and -10 <= dx <= 10
        black = torch.tensor([-m / s for m, s in zip(LUP_MEAN, LUP_STD)]).view(3, 1, 1)
        exp = black.expand(3, 256, 128).clone()
        ys, xs = slice(max(0, -dy), min(256, 256 - dy)), slice(max(0, -dx), min(128, 128 - dx))
        exp[:, ys, xs] = src[:, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
        assert torch.allclose(b["images"][i], exp, atol=1e-5)


def test_workers_do_not_change_results(recs):
    a = next(iter(build_loader("pretrain", recs, batch_size=6, backend="torch", workers=0, seed=3)))
    with build_loader("pretrain", recs, batch_size=6, backend="torch", workers=2, seed=3) as loader:
        b = next(iter(loader))
        workers = list(loader._dl._iterator._workers)
        assert len(workers) == 2 and all(w.is_alive() for w in workers)
    assert not any(w.is_alive() for w in workers) and loader._dl is None      # closed, not left to the GC
    assert [w.exitcode for w in workers] == [0, 0]                            # ended, not killed
    assert torch.equal(a["view2"], b["view2"]) and torch.equal(a["box1"], b["box1"])


def test_spawned_workers_end_like_forked_ones(recs):
    """With DALI loaded the workers are spawned; they leave through os._exit after multiprocessing's
    cleanup (no C++ static destructors at teardown) and exit 0."""
    pytest.importorskip("nvidia.dali")
    with build_loader("pretrain", recs, batch_size=6, backend="torch", workers=2, seed=3) as loader:
        b = next(iter(loader))
        assert loader._dl.multiprocessing_context.get_start_method() == "spawn"
        assert loader._dl.worker_init_fn.keywords == {"spawned": True}
        workers = list(loader._dl._iterator._workers)
    assert [w.exitcode for w in workers] == [0, 0] and b["view1"].shape[0] == 6


def test_epochs_differ_and_summary_counts(recs):
    L = build_loader("pretrain", recs, batch_size=5, backend="torch", workers=0, aug=NO_RANDOM_PIXELS)
    e0 = torch.cat([b["index"] for b in L])
    assert L.summary == dict(L.summary, samples=20, batches=4, not_drawn=4, skipped=0)
    e1 = torch.cat([b["index"] for b in L])
    assert L.epoch == 2 and not torch.equal(e0, e1)


@pytest.fixture()
def bad_recs(recs, tmp_path):
    files = corrupt_files(str(tmp_path))
    files["truncated"] = truncated_copy(recs[0].path, str(tmp_path / "trunc.jpg"))
    return recs[:6] + [Record(p, 0, 0) for p in files.values()], files


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_error_names_the_file(bad_recs, workers):
    """Raised as a BadImageError naming the file, also when a worker process read it (an exception in a
    worker reaches the main process as a RuntimeError with a traceback in its message)."""
    records, files = bad_recs
    for kind, path in files.items():
        with build_loader("eval", [records[0], Record(path, 0, 0)], batch_size=2, backend="torch",
                          workers=workers) as L:
            with pytest.raises(BadImageError, match=path.replace(".", r"\.")) as info:
                list(L)
        assert "Traceback" not in str(info.value) and info.value.path == path


def test_bad_image_skip_is_counted(bad_recs):
    records, files = bad_recs
    L = build_loader("eval", records, batch_size=4, backend="torch", workers=0, on_bad_image="skip")
    n = sum(len(b["index"]) for b in L)
    assert n == 6 and L.summary["samples"] == 6 and L.summary["skipped"] == 4
    assert set(L.summary["skipped_paths"]) == set(files.values())
    with pytest.raises(ValueError, match="on_bad_image"):
        build_loader("eval", records, batch_size=4, backend="torch", on_bad_image="ignore")


def test_unknown_aug_option_suggests(recs):
    with pytest.raises(ValueError, match="did you mean 'grayscale_p'"):
        build_loader("pretrain", recs, batch_size=4, backend="torch", aug={"greyscale_p": 0.1})


def test_malformed_files_are_named_and_skipped(recs, tmp_path):
    from upreid.data.testing import malformed_files
    files = malformed_files(str(tmp_path), recs[0].path)
    reasons = {"truncated_png": "truncated PNG", "header_only_jpeg": "without image data",
               "zero_size_sof": "zero size", "riff_not_webp": "not WebP", "bm_text": "not a valid BMP"}
    for kind, path in files.items():
        L = build_loader("eval", [recs[0], Record(path, 0, 0)], batch_size=2, backend="torch", workers=0)
        with pytest.raises(BadImageError, match=f"{path}.*{reasons[kind]}"):
            list(L)
    L = build_loader("eval", recs[:4] + [Record(p, 0, 0) for p in files.values()], batch_size=3, backend="torch",
                     workers=0, on_bad_image="skip")
    assert sum(len(b["index"]) for b in L) == 4 and set(L.summary["skipped_paths"]) == set(files.values())


def test_odd_but_valid_files_decode_as_meant(recs, tmp_path):
    from upreid.data.imageio import decode_pil
    from upreid.data.testing import odd_but_valid_files
    files = odd_but_valid_files(str(tmp_path), recs[0].path)
    src = Image.open(recs[0].path).convert("RGB")
    assert np.array_equal(np.asarray(decode_pil(files["trailing_bytes"])), np.asarray(src))
    assert decode_pil(files["exif_rotated"]).size == (src.height, src.width)     # rotated by the EXIF tag
    grey = np.asarray(decode_pil(files["png16"]))
    assert grey.min() == grey.max() == 0x80                                      # scaled, not saturated


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_whole_bad_batch_stops_a_ddp_rank_and_is_skipped_alone(bad_recs, backend):
    """on_bad_image='skip': a batch whose every image fails is skipped by a single process, but under
    DDP that rank would fall a step behind the others for the rest of the run, so it stops and names
    the files."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    records, files = bad_recs
    recs = records[:1] + [r for r in records if r.path in files.values()]        # 1 good, the rest bad
    kw = dict(batch_size=1, backend=backend, device="cpu", on_bad_image="skip", aug={"height": 64, "width": 32})
    if backend == "torch":
        kw["workers"] = 0
    single = build_loader("pretrain", recs, **kw)
    assert sum(len(b["index"]) for b in single) == 1 and single.summary["skipped"] == len(recs) - 1
    raised = 0
    for rank in (0, 1):
        L = build_loader("pretrain", recs, rank=rank, world=2, **kw)
        try:
            list(L)
        except BadImageError as e:
            raised += 1
            assert f"rank {rank} of 2" in str(e) and "cannot drop a whole batch under DDP" in str(e)
            assert e.path in files.values()
    assert raised >= 1           # each rank holds half of 5 images, 4 of them bad


def _spawned_worker_body(how):
    from upreid.data.torch_pipeline import _worker_init
    _worker_init(0, spawned=True)
    if how == "fail":
        raise RuntimeError("the worker loop failed")
    if how == "code":
        sys.exit(3)


@pytest.mark.parametrize("how,status", [("ok", 0), ("fail", 1), ("code", 3)])
def test_spawned_worker_exit_keeps_its_status(how, status):
    """A spawned worker leaves through os._exit (no C++ static destructors at teardown), with the status
    it was leaving with: a failed worker loop must not read as a clean exit."""
    import multiprocessing as mp
    p = mp.get_context("spawn").Process(target=_spawned_worker_body, args=(how,))
    p.start()
    p.join(120)
    assert p.exitcode == status


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_the_last_epoch_is_summarised_where_the_run_stops(bad_recs, backend, caplog):
    """A run's last step leaves the loader at its last batch, not past the epoch's end: closing the step
    stream must still log the epoch's counts and name its skipped images (before, the last epoch's
    summary was never written, so an image skipped in it went unreported)."""
    import logging

    from upreid.data.base import StepStream
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    records, files = bad_recs                                  # 6 good images, then 4 bad ones
    L = build_loader("eval", records, batch_size=5, backend=backend, workers=0, on_bad_image="skip")
    assert len(L) == 2
    with caplog.at_level(logging.INFO, logger="upreid.data"):
        stream = iter(StepStream(L, lambda epoch: 2))
        assert [next(stream)[1] for _ in range(2)] == [0, 1]   # the trainer's last step: nothing more is asked
        assert L.summary == {}
        stream.close()
    assert L.summary["epoch"] == 0 and L.summary["batches"] == 2 and L.summary["samples"] == 6
    assert L.summary["skipped"] == 4 and set(L.summary["skipped_paths"]) == set(files.values())
    assert "6 samples in 2 batches, 4 bad images skipped" in caplog.text and "stopped after" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="upreid.data"):
        stream = iter(StepStream(L, lambda epoch: 1))           # an epoch cut short (train.max_steps_per_epoch)
        next(stream)
        stream.close()
    assert L.summary["batches"] == 1 and "(the consumer stopped after 1 of the epoch's 2 batches)" in caplog.text
    # the bad files are all in the batch not taken: none is counted (DALI has already read that batch)
    assert L.summary["skipped"] == 0 and "0 bad images skipped" in caplog.text
