"""Colour jitter (data.color_p): both backends apply augment's rule with the draws they report, draw
within the ranges at the configured rate, leave everything else as it was when off, and refuse bad
settings by name."""
import numpy as np
import pytest
import torch

from upreid.data.augment import COLOR_BRIGHTNESS, COLOR_CONTRAST, COLOR_GAIN, LUP_MEAN, LUP_STD, NO_COLOR
from upreid.data.base import dali_available
from upreid.data.loader import build_loader
from upreid.data.testing import write_tiny
from upreid.data.transforms import color_u8, grayscale_u8

MEAN = torch.tensor(LUP_MEAN).view(3, 1, 1)
STD = torch.tensor(LUP_STD).view(3, 1, 1)
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]
STILL = dict(flip_p=0.0, erasing_p=0.0)          # no flip or erasing


def u8(x):
    """A normalised [3, H, W] image back to [H, W, 3] uint8 (exact for images that came from uint8)."""
    return ((x * STD + MEAN) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny")), n=24, ids=6)


def first(kind, recs, backend, **kw):
    return next(iter(build_loader(kind, recs, backend=backend, device="cpu", workers=2 if backend == "dali" else 0,
                                  **kw)))


def test_the_rule_on_a_known_image():
    x = np.array([[[10, 100, 200], [50, 60, 70]]], np.uint8)          # mean 81.67
    got = color_u8(x, (1.2, 1.0, 0.5, 0.9, 0.5))
    m = x.mean()
    exp = np.clip(np.floor(((x - m) * 0.5 + m) * np.array([1.2, 1.0, 0.5]) * 0.9 + 0.5), 0, 255)
    assert np.array_equal(got, exp.astype(np.uint8))
    assert np.array_equal(color_u8(x, NO_COLOR), x)                    # the identity draws change nothing
    assert color_u8(np.full((2, 2, 3), 250, np.uint8), (1.3, 1.3, 1.3, 1.3, 1.0)).max() == 255   # clamped


def shifted(src: np.ndarray, flip: bool, dy: int, dx: int) -> np.ndarray:
    """The fine-tuning geometry: mirror, then shift by the reported (dy, dx) with a black border."""
    if flip:
        src = src[:, ::-1]
    h, w = src.shape[:2]
    out = np.zeros_like(src)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[ys, xs] = src[ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_pixels_follow_the_reported_draws(recs, backend):
    """Colour first (its mean taken before the black border), then flip and shift: exact on the CPU."""
    ev = first("eval", recs, backend, batch_size=24)["images"]
    b = first("finetune", recs, backend, batch_size=12, k=2, aug=dict(erasing_p=0.0, pad=6, color_p=0.6))
    applied = (b["color"] != 1).any(1)
    assert 0 < applied.sum() < 12                                   # some applied, some not, at p = 0.6
    assert 0 < b["flip"].sum() < 12 and b["shift"].abs().max() > 0
    for i in range(12):
        src = u8(ev[int(b["index"][i])])
        dy, dx = b["shift"][i].long().tolist()
        exp = shifted(color_u8(src, b["color"][i].tolist()), bool(b["flip"][i]), dy, dx)
        assert np.array_equal(u8(b["images"][i]), exp), i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gray", [0.0, 1.0])
def test_pretrain_views_follow_the_reported_draws(recs, backend, gray):
    """With the crop at the whole image, each view is the original jittered, then grayed: exact on the CPU
    (but for DALI's grayscale, which rounds within one level of the luma rule without colour jitter too)."""
    b = first("pretrain", recs, backend, batch_size=12,
              aug=dict(STILL, grayscale_p=gray, blur_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(0.5, 0.5),
                       color_p=1.0))
    for v in (1, 2):
        assert (b[f"color{v}"] != 1).any(1).all() and bool((b[f"gray{v}"] == 1).all()) == bool(gray)
        for i in range(12):
            exp = color_u8(u8(b["original"][i]), b[f"color{v}"][i].tolist())
            if gray:
                exp = grayscale_u8(exp)
            got = u8(b[f"view{v}"][i])
            if gray and backend == "dali":        # hsv(saturation=0) rounds its own way: within 1 level
                assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1, (v, i)
            else:
                assert np.array_equal(got, exp), (v, i)
    assert not torch.equal(b["color1"], b["color2"])                 # each view draws its own


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_off_builds_and_draws_nothing(recs, backend, kind, monkeypatch):
    """At color_p = 0 no colour step runs and no number is drawn for it: the batches equal those of the
    code without the option (its colour step removed), and carry no colour key."""
    from upreid.data import dali_pipeline, transforms
    kw = dict(batch_size=12, seed=3, **({"k": 2} if kind == "finetune" else {}))
    real = first(kind, recs, backend, aug=dict(color_p=0.0, color_gain=(0.1, 5.0)), **kw)

    def never(*a, **k):
        raise AssertionError("the colour step ran with color_p = 0")
    monkeypatch.setattr(dali_pipeline, "_color", never)
    monkeypatch.setattr(transforms, "_maybe_color", lambda arr, rng, aug: (arr, None))
    without = first(kind, recs, backend, **kw)
    assert not any(k.startswith("color") for k in real)
    assert sorted(real) == sorted(without)
    for key in real:
        assert torch.equal(real[key], without[key]), key
    monkeypatch.undo()
    on = first(kind, recs, backend, aug=dict(color_p=1.0), **kw)
    assert not torch.equal(on["view2" if kind == "pretrain" else "images"], real["view2" if kind == "pretrain" else "images"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_and_ranges(recs, backend):
    """Applied at the rate color_p; draws uniform over their ranges."""
    p = 0.3
    L = build_loader("finetune", recs, batch_size=12, k=2, backend=backend, device="cpu", seed=5,
                     workers=2 if backend == "dali" else 0, aug=dict(height=32, width=16, color_p=p))
    d = torch.cat([b["color"] for _ in range(25) for b in L])
    n = len(d)
    on = (d != 1).any(1)
    assert n >= 480 and abs(on.float().mean().item() - p) < 4 * np.sqrt(p * (1 - p) / n), on.float().mean()
    assert torch.equal(d[~on], torch.ones_like(d[~on]))
    d = d[on]
    for j, r in ((0, COLOR_GAIN), (1, COLOR_GAIN), (2, COLOR_GAIN), (3, COLOR_BRIGHTNESS), (4, COLOR_CONTRAST)):
        assert r[0] <= d[:, j].min() and d[:, j].max() <= r[1], j
        mid, half = (r[0] + r[1]) / 2, (r[1] - r[0]) / 2            # uniform: mean mid, sd half / sqrt(3)
        assert abs(d[:, j].mean().item() - mid) < 4 * half / np.sqrt(3 * len(d)), j
    assert d[:, 0].std() > 0.5 * (COLOR_GAIN[1] - COLOR_GAIN[0]) / np.sqrt(12)   # channels drawn apart
    assert not torch.equal(d[:, 0], d[:, 1])


@pytest.mark.parametrize("key,value,message", [
    ("color_p", 1.5, "color_p must be a probability"),
    ("color_gain", (1.3, 0.75), "color_gain must be"),
    ("color_contrast", (0.0, 1.0), "color_contrast must be"),
])
def test_bad_settings_are_named(recs, key, value, message):
    with pytest.raises(ValueError, match=message):
        build_loader("finetune", recs, batch_size=4, k=2, backend="torch", aug={key: value})


def test_config_keys_are_checked():
    from upreid.engine.config import ConfigError, load_config
    cfg = load_config("finetune", None, ["data.root=x", "data.color_p=0.5", "data.color_gain=[0.8,1.2]"])
    assert cfg["data"]["color_p"] == 0.5 and tuple(cfg["data"]["color_gain"]) == (0.8, 1.2)
    with pytest.raises(ConfigError, match="data.color_brightness"):
        load_config("pretrain", None, ["data.root=x", "data.color_brightness=[1.2,0.8]"])
