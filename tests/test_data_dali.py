"""DALI pipelines (CPU here; GPU tests skip without CUDA) and their agreement with the torch fallback:
exact where deterministic up to interpolation/rounding, statistical for the random parts."""
import numpy as np
import pytest
import torch

dali = pytest.importorskip("nvidia.dali")

from upreid.data.augment import LUP_MEAN, LUP_STD                  # noqa: E402
from upreid.data.imageio import BadImageError                       # noqa: E402
from upreid.data.loader import build_loader                         # noqa: E402
from upreid.data.records import Record                              # noqa: E402
from upreid.data.testing import corrupt_files, truncated_copy, write_tiny  # noqa: E402

MEAN = torch.tensor(LUP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(LUP_STD).view(1, 3, 1, 1)
NO_RANDOM_PIXELS = dict(grayscale_p=0.0, blur_p=0.0, erasing_p=0.0, flip_p=0.0)


def px(x):
    return (x * STD + MEAN) * 255


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny")), n=24, ids=6)


def one(kind, recs, backend, **kw):
    kw.setdefault("batch_size", len(recs))
    return next(iter(build_loader(kind, recs, backend=backend, workers=kw.pop("workers", 2), device="cpu", **kw)))


def test_eval_agrees_with_torch(recs):
    a = one("eval", recs[:23], "dali", batch_size=10, aug={"flip_test": True})
    L = build_loader("eval", recs[:23], batch_size=10, backend="dali", device="cpu", aug={"flip_test": True})
    batches = list(L)
    assert [len(b["index"]) for b in batches] == [10, 10, 3]                 # last batch kept
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(23))
    assert torch.cat([b["camids"] for b in batches]).tolist() == [r.camid for r in recs[:23]]
    t = one("eval", recs[:10], "torch", aug={"flip_test": True}, workers=0)
    d = (px(a["images"]) - px(t["images"])).abs()
    assert d.mean() < 0.6 and d.max() <= 1.01                                 # rounding only
    assert torch.equal(a["images_flipped"], a["images"].flip(-1))
    assert L.summary["samples"] == 23 and L.summary["backend"] == "dali"


@pytest.mark.parametrize("height,width", [(256, 128), (128, 64), (48, 20), (16, 8), (200, 40)],
                         ids=["enlarge", "same", "shrink", "shrink8x", "mixed"])
def test_resize_bound_holds_both_ways(recs, height, width):
    """The images are 128 x 64: DALI and the fallback agree to rounding (max 1 grey level) whether the
    resize enlarges or shrinks, border rows and columns included (they differed by ~15 levels when
    shrinking before the fallback copied DALI's edge rule)."""
    from PIL import Image

    from upreid.data.transforms import normalize, resize

    aug = {"height": height, "width": width}
    a = one("eval", recs[:8], "dali", aug=aug)
    t = one("eval", recs[:8], "torch", aug=aug, workers=0)
    d = (px(a["images"]) - px(t["images"])).abs()
    assert d.mean() < 0.6 and d.max() <= 1.01, (d.mean().item(), d.max().item())
    # pre-training views: crops of the original (a relative ROI in DALI), re-rendered by the fallback
    b = one("pretrain", recs, "dali", batch_size=8, aug=dict(NO_RANDOM_PIXELS, **aug))
    worst = 0.0
    for i in range(8):
        img = Image.open(recs[int(b["index"][i])].path).convert("RGB")
        W, H = img.size
        ref = normalize(np.array(resize(img, height, width)), LUP_MEAN, LUP_STD)
        worst = max(worst, (px(b["original"][i:i + 1]) - px(ref[None])).abs().max().item())
        for v in (1, 2):
            y0, x0, y1, x1 = b[f"box{v}"][i].tolist()
            ref = normalize(np.array(resize(img, height, width, (x0 * W, y0 * H, x1 * W, y1 * H))), LUP_MEAN, LUP_STD)
            worst = max(worst, (px(b[f"view{v}"][i:i + 1]) - px(ref[None])).abs().max().item())
    assert worst <= 1.01, worst


def test_pretrain_boxes_match_fallback_pixels(recs):
    """DALI's views re-rendered by the fallback from DALI's own boxes: the box bookkeeping is exact."""
    from PIL import Image

    from upreid.data.transforms import normalize, resize

    b = one("pretrain", recs, "dali", batch_size=8, aug=NO_RANDOM_PIXELS)
    assert b["original"].shape == b["view1"].shape == (8, 3, 256, 128) and b["box2"].shape == (8, 4)
    errs = []
    for i in range(8):
        img = Image.open(recs[int(b["index"][i])].path).convert("RGB")
        W, H = img.size
        for v in (1, 2):
            y0, x0, y1, x1 = b[f"box{v}"][i].tolist()
            ref = normalize(np.array(resize(img, 256, 128, (x0 * W, y0 * H, x1 * W, y1 * H))), LUP_MEAN, LUP_STD)
            errs.append((px(b[f"view{v}"][i:i + 1]) - px(ref[None])).abs().mean().item())
    assert max(errs) < 1.0, errs


def test_pretrain_random_parts_consistent_with_pixels(recs):
    b = one("pretrain", recs, "dali", batch_size=24, aug=dict(grayscale_p=0.5, erasing_p=0.5, blur_p=0.5))
    for i in range(24):
        view = b["view1"][i]
        if b["erase1"][i].sum() > 0:
            y0, x0, y1, x1 = (b["erase1"][i] * torch.tensor([256, 128, 256, 128])).round().long().tolist()
            assert view[:, y0:y1, x0:x1].abs().max() == 0
            view = view.clone()
            view[:, y0:y1, x0:x1] = float("nan")
        p = px(view[None])[0]
        spread = (p.max(0).values - p.min(0).values).nan_to_num(0).max()
        assert (spread < 1.01) == bool(b["gray1"][i]), (i, spread)
        assert (b["sigma1"][i] > 0) == (b["sigma1"][i] >= 0.1)
    assert 0 < b["gray1"].sum() < 24 and 0 < (b["erase1"].sum(1) > 0).sum() < 24


def test_flip_flag_matches_pixels(recs):
    a = one("pretrain", recs, "dali", batch_size=24, aug=dict(NO_RANDOM_PIXELS, flip_p=0.5), seed=4)
    from PIL import Image

    from upreid.data.transforms import normalize, resize

    for i in range(6):
        img = Image.open(recs[int(a["index"][i])].path).convert("RGB")
        W, H = img.size
        y0, x0, y1, x1 = a["box1"][i].tolist()
        ref = normalize(np.array(resize(img, 256, 128, (x0 * W, y0 * H, x1 * W, y1 * H))), LUP_MEAN, LUP_STD)
        if a["flip1"][i]:
            ref = ref.flip(-1)
        assert (px(a["view1"][i:i + 1]) - px(ref[None])).abs().mean() < 1.0


@pytest.mark.parametrize("attempts", [10, 1])
def test_random_distributions_agree_with_torch(recs, attempts):
    """Rates and crop statistics of DALI and the fallback agree within sampling error, with the crop
    drawn until it fits (torchvision's 10 attempts) and with one clamped draw."""
    stats = {}
    for backend in ("dali", "torch"):
        L = build_loader("pretrain", recs, batch_size=24, backend=backend, device="cpu",
                         workers=2 if backend == "dali" else 0,
                         aug=dict(height=32, width=16, crop_attempts=attempts), seed=1)
        rows = {k: [] for k in ("flip", "gray", "blur", "erase", "area", "aspect")}
        for _ in range(8):
            for b in L:
                for v in (1, 2):
                    box = b[f"box{v}"]
                    rows["flip"].append(b[f"flip{v}"])
                    rows["gray"].append(b[f"gray{v}"])
                    rows["blur"].append((b[f"sigma{v}"] > 0).float())
                    rows["erase"].append((b[f"erase{v}"].sum(1) > 0).float())
                    rows["area"].append((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))
                    rows["aspect"].append(((box[:, 3] - box[:, 1]) * 64 / ((box[:, 2] - box[:, 0]) * 128)).log())
        stats[backend] = {k: torch.cat(v) for k, v in rows.items()}
    n = len(stats["dali"]["flip"])
    assert n == 384
    for key in ("flip", "gray", "blur", "erase"):
        a, t = stats["dali"][key].mean().item(), stats["torch"][key].mean().item()
        assert abs(a - t) < 4 * np.sqrt(0.25 * 2 / n), (key, a, t)
    for key in ("area", "aspect"):
        a, t = stats["dali"][key], stats["torch"][key]
        assert abs(a.mean() - t.mean()) < 4 * np.sqrt((a.var() + t.var()) / n), key
        # two-sample Kolmogorov-Smirnov statistic below the 0.1 % critical value
        grid = torch.cat([a, t]).sort().values
        ks = ((a[None] <= grid[:, None]).float().mean(1) - (t[None] <= grid[:, None]).float().mean(1)).abs().max()
        assert ks < 1.95 * np.sqrt(2 / n), (key, ks)
    # the rule itself, not only agreement: on these 2:1 images 10 attempts give crops of 0.367 of the
    # image on average, one clamped draw 0.510 (50,000 draws of crop_box)
    for backend in ("dali", "torch"):
        area = stats[backend]["area"]
        assert abs(area.mean().item() - (0.367 if attempts == 10 else 0.510)) < 4 * area.std().item() / np.sqrt(n)


def test_finetune_pk_and_shift_bookkeeping(recs):
    ev = one("eval", recs, "dali")["images"]
    L = build_loader("finetune", recs, batch_size=12, backend="dali", device="cpu", k=2, aug={"erasing_p": 0.0})
    b = next(iter(L))
    pids = b["pids"].tolist()
    assert len(set(pids)) == 6 and all(pids.count(p) == 2 for p in set(pids))
    black = torch.tensor([-m / s for m, s in zip(LUP_MEAN, LUP_STD)]).view(3, 1, 1)
    for i in range(12):
        src = ev[int(b["index"][i])]
        if b["flip"][i]:
            src = src.flip(-1)
        dy, dx = b["shift"][i].long().tolist()
        exp = black.expand(3, 256, 128).clone()
        ys, xs = slice(max(0, -dy), min(256, 256 - dy)), slice(max(0, -dx), min(128, 128 - dx))
        exp[:, ys, xs] = src[:, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
        assert torch.allclose(b["images"][i], exp, atol=1e-4), i
    shifts = b["shift"].abs().max().item()
    assert 0 < shifts <= 10


def test_epochs_and_sharding(recs):
    L = build_loader("pretrain", recs, batch_size=5, backend="dali", device="cpu", world=2, rank=1, seed=2)
    e0 = [b["index"].tolist() for b in L]
    e1 = [b["index"].tolist() for b in L]
    ref = build_loader("pretrain", recs, batch_size=5, backend="torch", device="cpu", world=2, rank=1, seed=2,
                       workers=0)
    assert e0 == [b["index"].tolist() for b in ref]                           # same sampler, same order
    assert e0 != e1 and L.summary["samples"] == 10 and L.summary["not_drawn"] == 4


def test_bad_images(recs, tmp_path):
    files = corrupt_files(str(tmp_path))
    files["truncated"] = truncated_copy(recs[0].path, str(tmp_path / "trunc.jpg"))
    for path in files.values():
        L = build_loader("eval", [recs[1], Record(path, 0, 0)], batch_size=2, backend="dali", device="cpu")
        with pytest.raises(Exception, match=path.replace(".", r"\.")):
            list(L)
    records = recs[:6] + [Record(p, 0, 0) for p in files.values()]
    L = build_loader("eval", records, batch_size=4, backend="dali", device="cpu", on_bad_image="skip")
    assert sum(len(b["index"]) for b in L) == 6
    assert L.summary["skipped"] == 4 and set(L.summary["skipped_paths"]) == set(files.values())
    assert issubclass(BadImageError, RuntimeError)


def test_missing_dali_message(monkeypatch):
    import builtins

    from upreid.data import dali_pipeline

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="nvidia-dali-cuda120"):
        dali_pipeline.import_dali()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu(recs):
    g = next(iter(build_loader("eval", recs, batch_size=8, backend="dali", device="cuda")))
    c = one("eval", recs[:8], "dali")
    assert g["images"].is_cuda
    assert (px(g["images"].cpu()) - px(c["images"])).abs().mean() < 1.0
    b = next(iter(build_loader("pretrain", recs, batch_size=8, backend="dali", device="cuda")))
    assert b["view1"].is_cuda and b["box1"].is_cuda and b["view1"].shape == (8, 3, 256, 128)
    # colour jitter on GPU: the rule with the reported draws (fused multiply-adds may round 1 level apart)
    from upreid.data.transforms import color_u8
    ev = one("eval", recs, "dali")["images"]
    f = next(iter(build_loader("finetune", recs, batch_size=8, k=2, backend="dali", device="cuda",
                               aug=dict(flip_p=0.0, pad=0, erasing_p=0.0, color_p=1.0))))
    assert f["images"].is_cuda and f["color"].shape == (8, 5)
    for i in range(8):
        src = px(ev[int(f["index"][i])][None])[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        exp = torch.from_numpy(color_u8(src, f["color"][i].tolist()).astype(np.float32)).permute(2, 0, 1)
        assert (px(f["images"][i:i + 1].cpu())[0] - exp).abs().max() <= 1.01, i
    b = next(iter(build_loader("pretrain", recs, batch_size=8, backend="dali", device="cuda", aug={"color_p": 0.5})))
    assert b["color1"].is_cuda and b["view2"].shape == (8, 3, 256, 128)


def test_malformed_files_named_and_skipped_without_breaking_the_epoch(recs, tmp_path):
    """Files with a valid signature that do not decode are named (or skipped and counted) before DALI
    sees them: the epoch goes on."""
    from upreid.data.testing import malformed_files
    files = malformed_files(str(tmp_path), recs[0].path)
    for path in files.values():
        L = build_loader("eval", [recs[1], Record(path, 0, 0)], batch_size=2, backend="dali", device="cpu")
        with pytest.raises(BadImageError, match=path.replace(".", r"\.")):
            list(L)
    records = recs[:5] + [Record(p, 0, 0) for p in files.values()] + recs[5:8]
    L = build_loader("eval", records, batch_size=3, backend="dali", device="cpu", on_bad_image="skip")
    idx = torch.cat([b["index"] for b in L]).tolist()
    assert idx == [0, 1, 2, 3, 4, 10, 11, 12]                    # every good image, in order, none lost
    assert L.summary["skipped"] == 5 and set(L.summary["skipped_paths"]) == set(files.values())


def test_odd_but_valid_files_agree_with_torch(recs, tmp_path):
    """A JPEG with trailing bytes, EXIF orientation and a 16-bit PNG: both backends decode them alike."""
    from upreid.data.testing import odd_but_valid_files
    files = odd_but_valid_files(str(tmp_path), recs[0].path)
    records = [Record(p, 0, 0) for p in files.values()]
    for i, rec in enumerate(records):
        a = one("eval", [rec], "dali", aug={"height": 64, "width": 32})
        t = one("eval", [rec], "torch", aug={"height": 64, "width": 32}, workers=0)
        d = (px(a["images"]) - px(t["images"])).abs()
        assert d.mean() < 1.0, (list(files)[i], d.mean())


def test_undecodable_files_found_named_and_skipped(recs, tmp_path):
    """Files that pass the structural check but fail inside DALI's decoder (which invalidates the
    pipeline): the loader decodes the failed batch's files one by one, names the culprit, and with
    on_bad_image='skip' skips and counts it, rebuilds the pipeline and finishes the epoch."""
    from upreid.data.imageio import read_bytes
    from upreid.data.testing import undecodable_files
    files = undecodable_files(str(tmp_path), recs[0].path)
    for kind, path in files.items():
        read_bytes(path)                                         # passes the structural check
        with pytest.raises(BadImageError, match=path.replace(".", r"\.")) as info:
            list(build_loader("eval", [recs[1], Record(path, 0, 0), recs[2]], batch_size=3, backend="dali",
                              device="cpu"))
        assert "decoder" in str(info.value), kind
        with pytest.raises(BadImageError, match=path.replace(".", r"\.")):   # the fallback names it too
            list(build_loader("eval", [Record(path, 0, 0)], batch_size=1, backend="torch", device="cpu",
                              workers=0))
    bad = list(files.values())
    records = recs[:5] + [Record(bad[0], 0, 0)] + recs[5:9] + [Record(bad[1], 0, 0)] + recs[9:12]
    L = build_loader("eval", records, batch_size=3, backend="dali", device="cpu", on_bad_image="skip")
    rebuilds = []
    for epoch in range(2):                                       # the second epoch skips them up front
        batches = list(L)
        rebuilds.append(L.rebuilds)
        idx = torch.cat([b["index"] for b in batches]).tolist()
        assert idx == [0, 1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13], (epoch, idx)   # every good image, in order
        assert L.summary["skipped"] == 2 and sorted(L.summary["skipped_paths"]) == sorted(bad)
        ref = one("eval", [records[i] for i in idx], "torch", workers=0)
        assert (px(torch.cat([b["images"] for b in batches])) - px(ref["images"])).abs().max() <= 1.01
    assert rebuilds == [2, 0]            # one rebuild per failing batch; once found, a file never reaches DALI
    # pre-training with the LUP views: the epoch goes on as well
    P = build_loader("pretrain", records, batch_size=4, backend="dali", device="cpu", on_bad_image="skip")
    idx = sorted(torch.cat([b["index"] for b in P]).tolist())
    assert 5 not in idx and 10 not in idx and P.summary["skipped"] + P.summary["not_drawn"] + len(idx) == 14
    assert set(P.summary["skipped_paths"]) <= set(bad) and P.summary["skipped"] >= 1


def test_dali_failure_not_caused_by_a_file_is_raised_with_the_batch(recs, monkeypatch):
    """A pipeline failure that no single file reproduces is not blamed on a file: it is raised with
    the batch's paths and DALI's reason."""
    from upreid.data import dali_pipeline
    L = build_loader("eval", recs[:4], batch_size=2, backend="dali", device="cpu", on_bad_image="skip")
    real = dali_pipeline.DaliLoader._build

    def failing_build(self):
        real(self)
        it = self._iter

        class Failing:
            def __next__(self):
                raise RuntimeError("Critical error in pipeline:\nencountered:\n\nInjected failure :\n"
                                   "Current pipeline object is no longer valid.")

            def reset(self):
                it.reset()
        self._iter = Failing()
    monkeypatch.setattr(dali_pipeline.DaliLoader, "_build", failing_build)
    with pytest.raises(RuntimeError, match="each decode alone.*Injected failure"):
        list(L)


def test_png_with_a_bad_crc_is_refused_by_both_backends(recs, tmp_path):
    """Pillow decodes a PNG whose IDAT CRC is wrong, DALI's decoder refuses it: the structural check
    reads the critical chunks' CRCs, so both backends name it (and skip it when asked) alike."""
    import io

    from PIL import Image

    from upreid.data.testing import bad_crc_png
    path = bad_crc_png(str(tmp_path))
    with open(path, "rb") as f:
        Image.open(io.BytesIO(f.read())).load()                  # Pillow alone would accept it
    for backend in ("dali", "torch"):
        kw = dict(batch_size=2, backend=backend, device="cpu", **({"workers": 0} if backend == "torch" else {}))
        with pytest.raises(BadImageError, match=r"bad_crc\.png.*CRC mismatch in its IDAT chunk"):
            list(build_loader("eval", [recs[0], Record(path, 0, 0)], **kw))
        L = build_loader("eval", [recs[0], Record(path, 0, 0), recs[1]], on_bad_image="skip", **kw)
        assert torch.cat([b["index"] for b in L]).tolist() == [0, 2] and L.summary["skipped_paths"] == [path]



@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_an_epochs_batches_depend_on_the_epoch_alone(recs, kind):
    """Each epoch runs on a pipeline seeded by (seed, rank, epoch): epoch 1 is the same whether epoch 0
    ran in full, was cut short after one batch (train.max_steps_per_epoch: batches of it were still in
    flight), or never ran in this process (a run resumed in epoch 1); and its order is the sampler's."""
    def make():
        return build_loader(kind, recs, batch_size=4, backend="dali", device="cpu", seed=5, p=2, k=2) \
            if kind == "finetune" else build_loader(kind, recs, batch_size=4, backend="dali", device="cpu", seed=5)

    def epoch1(loader):
        loader.set_epoch(1)
        return list(loader)

    full = make()
    list(full)
    want = epoch1(full)
    cut = make()
    it = iter(cut)
    next(it)
    it.close()                                              # epoch 0 stopped after one batch
    fresh = make()
    for got in (epoch1(cut), epoch1(fresh)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    order = [i for b in full.sampler.batches(1) for i in b]
    assert torch.cat([b["index"] for b in want]).tolist() == order[:sum(len(b["index"]) for b in want)]
