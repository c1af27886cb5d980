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
from upreid.data.transforms import color_u8

MEAN = torch.tensor(LUP_MEAN).view(3, 1, 1)
STD = torch.tensor(LUP_STD).view(3, 1, 1)
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]
STILL = dict(flip_p=0.0, erasing_p=0.0)          # no other pixel-changing draw


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_pixels_follow_the_reported_draws(recs, backend):
    ev = first("eval", recs, backend, batch_size=24)["images"]
    b = first("finetune", recs, backend, batch_size=12, k=2, aug=dict(STILL, pad=0, color_p=0.6))
    applied = (b["color"] != 1).any(1)
    assert 0 < applied.sum() < 12                                   # some applied, some not, at p = 0.6
    for i in range(12):
        src = u8(ev[int(b["index"][i])])
        exp = color_u8(src, b["color"][i].tolist())
        got = u8(b["images"][i])
        assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1, i      # rounding of the mean only
        if not applied[i]:
            assert np.array_equal(got, src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pretrain_views_follow_the_reported_draws(recs, backend):
    """With the crop at the whole image and no other pixel draw, each view is the original jittered."""
    b = first("pretrain", recs, backend, batch_size=12,
              aug=dict(STILL, grayscale_p=0.0, blur_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(0.5, 0.5),
                       color_p=1.0))
    for v in (1, 2):
        assert (b[f"color{v}"] != 1).any(1).all()
        for i in range(12):
            exp = color_u8(u8(b["original"][i]), b[f"color{v}"][i].tolist())
            assert np.abs(u8(b[f"view{v}"][i]).astype(int) - exp.astype(int)).max() <= 1, (v, i)
    assert not torch.equal(b["color1"], b["color2"])                 # each view draws its own


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_by_default_and_draws_nothing(recs, backend):
    plain = first("finetune", recs, backend, batch_size=12, k=2, seed=3)
    off = first("finetune", recs, backend, batch_size=12, k=2, seed=3,
                aug=dict(color_p=0.0, color_gain=(0.1, 5.0)))
    assert "color" not in plain and "color" not in off
    for key in plain:                                               # the same stream: nothing was drawn
        assert torch.equal(plain[key], off[key]), key
    on = first("finetune", recs, backend, batch_size=12, k=2, seed=3, aug=dict(color_p=1.0))
    assert not torch.equal(on["images"], plain["images"])


def test_rates_and_ranges_agree_between_backends(recs):
    if not dali_available():
        pytest.skip("no DALI")
    rows = {}
    for backend in ("dali", "torch"):
        L = build_loader("finetune", recs, batch_size=12, k=2, backend=backend, device="cpu", seed=5,
                         workers=2 if backend == "dali" else 0, aug=dict(height=32, width=16, color_p=0.5))
        draws = []
        for _ in range(16):
            draws += [b["color"] for b in L]
        rows[backend] = torch.cat(draws)
    n = len(rows["torch"])
    assert n == len(rows["dali"]) >= 300
    stats = {}
    for backend, d in rows.items():
        on = (d != 1).any(1)
        stats[backend] = on.float().mean().item()
        d = d[on]
        for j, r in ((0, COLOR_GAIN), (1, COLOR_GAIN), (2, COLOR_GAIN), (3, COLOR_BRIGHTNESS), (4, COLOR_CONTRAST)):
            assert r[0] <= d[:, j].min() and d[:, j].max() <= r[1], (backend, j)
            mid, half = (r[0] + r[1]) / 2, (r[1] - r[0]) / 2        # uniform: mean mid, sd half / sqrt(3)
            assert abs(d[:, j].mean().item() - mid) < 4 * half / np.sqrt(3 * len(d)), (backend, j)
    assert abs(stats["dali"] - stats["torch"]) < 4 * np.sqrt(0.25 * 2 / n), stats


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
