"""A procedural synthetic person ReID dataset, deterministic by seed.

Each identity is a fixed set of attributes (build, skin and hair tone, hair style, upper and lower
clothing colour and pattern, sleeves, shoes, bag, hat); each camera has its own look (colour cast,
brightness, contrast, blur, resolution, background clutter, preferred viewpoint); each image adds
pose, scale and position jitter, a front or back view, mirror flips and partial occlusion. Identity is
recoverable across cameras from the person's attributes, but raw pixels and global colour histograms
are dominated by the camera (background, cast, viewpoint), so naive nearest neighbour is weak.

Everything is derived from ``numpy.random.default_rng([seed, stream, ...])`` keyed by identity, camera
and image, so adding identities or images never changes the existing ones.

Layout written (Market-style, readable by :func:`upreid.data.datasets.synth`)::

    root/bounding_box_train/0001_c1s1_000000_00.jpg   train identities (pids 1..ids/2)
    root/query/                                         one image per (test identity, camera)
    root/bounding_box_test/                             the rest of the test images, distractors (0000_),
                                                        junk (-1_)
    root/unlabeled/000/u0000000.jpg                     unlabeled images of other identities (pre-training)
    root/meta.json                                      generator settings and counts
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

GENERATOR_VERSION = 1

UPPER = np.array([
    [0.80, 0.10, 0.10], [0.50, 0.05, 0.08], [0.95, 0.50, 0.10], [0.95, 0.85, 0.15],
    [0.20, 0.65, 0.25], [0.08, 0.35, 0.15], [0.15, 0.35, 0.85], [0.08, 0.10, 0.35],
    [0.55, 0.75, 0.95], [0.45, 0.20, 0.60], [0.95, 0.55, 0.70], [0.92, 0.92, 0.90],
    [0.50, 0.50, 0.52], [0.08, 0.08, 0.09], [0.45, 0.28, 0.15], [0.85, 0.78, 0.60]], np.float32)
LOWER = np.array([
    [0.07, 0.07, 0.08], [0.10, 0.12, 0.30], [0.25, 0.35, 0.60], [0.45, 0.45, 0.47],
    [0.75, 0.68, 0.50], [0.40, 0.25, 0.15], [0.90, 0.90, 0.88], [0.15, 0.30, 0.18]], np.float32)
SKIN = np.array([[0.98, 0.84, 0.72], [0.92, 0.74, 0.60], [0.80, 0.60, 0.45],
                 [0.62, 0.44, 0.30], [0.45, 0.30, 0.20], [0.30, 0.20, 0.13]], np.float32)
HAIR = np.array([[0.05, 0.04, 0.03], [0.25, 0.15, 0.08], [0.50, 0.32, 0.15],
                 [0.85, 0.72, 0.40], [0.60, 0.60, 0.60]], np.float32)
SHOES = np.array([[0.05, 0.05, 0.05], [0.92, 0.92, 0.92], [0.35, 0.22, 0.12], [0.60, 0.10, 0.10]], np.float32)

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "logo", "twotone")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder", "handbag")


@dataclasses.dataclass
class Identity:
    height: float
    build: float
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    upper: np.ndarray
    upper2: np.ndarray
    pattern: str
    short_sleeves: bool
    lower: np.ndarray
    lower_type: str
    shoes: np.ndarray
    bag: str
    bag_color: np.ndarray
    bag_side: int
    hat: Optional[np.ndarray]


@dataclasses.dataclass
class Camera:
    gain: np.ndarray           # per-channel colour cast
    brightness: float
    contrast: float
    blur: float                # gaussian sigma in output pixels
    resolution: float          # fraction of the output resolution actually resolved
    bg_base: np.ndarray
    bg_alt: np.ndarray
    bg_style: str
    back_view_p: float         # probability that this camera sees people from behind
    noise: float


def _jit(rng, c, amount=0.06):
    return np.clip(c + rng.uniform(-amount, amount, 3), 0, 1).astype(np.float32)


def make_identity(seed: int, pid: int) -> Identity:
    rng = np.random.default_rng([seed, 0, pid])
    iu = rng.integers(len(UPPER))
    iu2 = (iu + rng.integers(1, len(UPPER))) % len(UPPER)
    return Identity(
        height=float(rng.uniform(0.80, 0.95)), build=float(rng.uniform(0.85, 1.2)),
        skin=_jit(rng, SKIN[rng.integers(len(SKIN))], 0.03), hair=_jit(rng, HAIR[rng.integers(len(HAIR))], 0.04),
        long_hair=bool(rng.random() < 0.35),
        upper=_jit(rng, UPPER[iu]), upper2=_jit(rng, UPPER[iu2]), pattern=PATTERNS[rng.integers(len(PATTERNS))],
        short_sleeves=bool(rng.random() < 0.4),
        lower=_jit(rng, LOWER[rng.integers(len(LOWER))]), lower_type=LOWER_TYPES[rng.choice(3, p=[0.6, 0.25, 0.15])],
        shoes=_jit(rng, SHOES[rng.integers(len(SHOES))], 0.04),
        bag=BAGS[rng.choice(4, p=[0.4, 0.25, 0.2, 0.15])], bag_color=_jit(rng, UPPER[rng.integers(len(UPPER))], 0.1),
        bag_side=int(rng.choice([-1, 1])),
        hat=_jit(rng, UPPER[rng.integers(len(UPPER))]) if rng.random() < 0.15 else None,
    )


def make_camera(seed: int, cam: int) -> Camera:
    rng = np.random.default_rng([seed, 1, cam])
    return Camera(
        gain=rng.uniform(0.72, 1.28, 3).astype(np.float32), brightness=float(rng.uniform(0.6, 1.3)),
        contrast=float(rng.uniform(0.7, 1.2)), blur=float(rng.uniform(0.0, 1.4)),
        resolution=float(rng.uniform(0.45, 1.0)),
        bg_base=rng.uniform(0.15, 0.85, 3).astype(np.float32), bg_alt=rng.uniform(0.1, 0.9, 3).astype(np.float32),
        bg_style=str(rng.choice(["blocks", "stripes", "floor", "clutter"])),
        back_view_p=float(rng.uniform(0.1, 0.9)), noise=float(rng.uniform(0.005, 0.03)),
    )


# ----------------------------------------------------------------------------------------- drawing
class _Canvas:
    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.img = np.zeros((h, w, 3), np.float32)
        self.person = np.zeros((h, w), bool)

    def ellipse(self, cy, cx, ry, rx):
        return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0

    def rect(self, y0, y1, x0, x1):
        return (self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1)

    def capsule(self, p0, p1, r):
        (y0, x0), (y1, x1) = p0, p1
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((self.yy - y0) * dy + (self.xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        return (self.yy - y0 - t * dy) ** 2 + (self.xx - x0 - t * dx) ** 2 <= r * r

    def paint(self, mask, color, person=True, shade=None):
        c = np.asarray(color, np.float32)
        if shade is not None:
            self.img[mask] = c * shade[mask][:, None]
        else:
            self.img[mask] = c
        if person:
            self.person |= mask


def _background(cv: _Canvas, cam: Camera, rng) -> None:
    h, w = cv.h, cv.w
    base = _jit(rng, cam.bg_base, 0.05)
    alt = _jit(rng, cam.bg_alt, 0.05)
    grad = (0.85 + 0.3 * cv.yy / h)[..., None]
    cv.img[:] = base * grad
    if cam.bg_style == "floor":
        horizon = h * rng.uniform(0.45, 0.7)
        cv.img[cv.yy > horizon] = alt * 0.8
    elif cam.bg_style == "stripes":
        period = rng.uniform(6, 20) * h / 128
        m = ((cv.xx + rng.uniform(0, period)) // period) % 2 == 0
        cv.img[m] = alt
    elif cam.bg_style == "blocks":
        for _ in range(rng.integers(2, 5)):
            y0, x0 = rng.uniform(0, h), rng.uniform(-w / 2, w)
            cv.img[cv.rect(y0, y0 + rng.uniform(h / 8, h / 2), x0, x0 + rng.uniform(w / 4, w))] = _jit(rng, alt, 0.15)
    # clutter: a few random objects in every camera (more in "clutter" cameras)
    n = rng.integers(3, 7) if cam.bg_style == "clutter" else rng.integers(0, 3)
    for _ in range(n):
        c = rng.uniform(0.05, 0.95, 3)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if rng.random() < 0.5:
            cv.img[cv.ellipse(cy, cx, rng.uniform(2, h / 8), rng.uniform(2, w / 5))] = c
        else:
            cv.img[cv.rect(cy, cy + rng.uniform(2, h / 4), cx, cx + rng.uniform(2, w / 4))] = c
    cv.img += rng.normal(0, 0.02, cv.img.shape).astype(np.float32)


def _person(cv: _Canvas, p: Identity, rng, back: bool, distractor: bool = False) -> None:
    h, w = cv.h, cv.w
    scale = p.height * rng.uniform(0.9, 1.05)
    ph = h * scale                                     # person height in pixels
    top = rng.uniform(0.01, max(0.02, 0.99 - scale)) * h
    cx = w / 2 + rng.uniform(-0.1, 0.1) * w
    u = ph / 100.0                                     # body unit
    bw = p.build
    shade = (1.05 - 0.25 * (cv.yy - top) / ph) * (1.0 - 0.15 * np.abs(cv.xx - cx) / (w / 2))
    stride = rng.uniform(-1, 1)                        # walking phase
    swing = rng.uniform(-1, 1)

    hip_y, foot_y = top + 52 * u, top + 97 * u
    sh_y, waist_y = top + 17 * u, top + 53 * u
    half = 11 * u * bw
    # legs
    legs = []
    for s in (-1, 1):
        hx = cx + s * 4.5 * u * bw
        fx = hx + s * stride * 7 * u + rng.uniform(-1, 1) * u
        legs.append(((hip_y, hx), (foot_y, fx)))
    for (p0, p1) in legs:
        leg = cv.capsule(p0, p1, 4.2 * u * bw)
        if p.lower_type == "trousers":
            cv.paint(leg, p.lower, shade=shade)
        else:
            cv.paint(leg, p.skin, shade=shade)
            knee = p0[0] + 0.45 * (p1[0] - p0[0])
            cv.paint(leg & (cv.yy < knee), p.lower, shade=shade)
        cv.paint(cv.ellipse(p1[0], p1[1] + (2 * u if not back else 0), 2.3 * u, 4.2 * u), p.shoes)
    if p.lower_type == "skirt":
        sk = (cv.yy >= waist_y) & (cv.yy < top + 72 * u) & (
            np.abs(cv.xx - cx) < half * (0.8 + 0.6 * (cv.yy - waist_y) / (20 * u)))
        cv.paint(sk, p.lower, shade=shade)
    else:
        cv.paint(cv.rect(waist_y - 2 * u, hip_y + 4 * u, cx - half * 0.85, cx + half * 0.85), p.lower, shade=shade)
    # torso with pattern
    torso = (cv.yy >= sh_y) & (cv.yy < waist_y) & (np.abs(cv.xx - cx) < half * (1.0 - 0.12 * (cv.yy - sh_y) / (36 * u)))
    torso |= cv.ellipse(sh_y + 2 * u, cx, 4 * u, half)
    cv.paint(torso, p.upper, shade=shade)
    if p.pattern == "hstripes":
        cv.paint(torso & (((cv.yy - sh_y) // (4 * u)) % 2 == 1), p.upper2, shade=shade)
    elif p.pattern == "vstripes":
        cv.paint(torso & (((cv.xx - cx) // (3.5 * u)) % 2 == 1), p.upper2, shade=shade)
    elif p.pattern == "checks":
        cv.paint(torso & ((((cv.yy - sh_y) // (5 * u)) + ((cv.xx - cx) // (5 * u))) % 2 == 1), p.upper2, shade=shade)
    elif p.pattern == "logo" and not back:
        cv.paint(torso & cv.ellipse(sh_y + 13 * u, cx, 6 * u, 6 * u), p.upper2)
    elif p.pattern == "twotone":
        cv.paint(torso & (cv.yy > sh_y + 18 * u), p.upper2, shade=shade)
    # arms
    for s in (-1, 1):
        s0 = (sh_y + 3 * u, cx + s * (half + 1.5 * u))
        hand = (top + 52 * u, s0[1] + s * 2 * u + s * swing * 6 * u)
        arm = cv.capsule(s0, hand, 3.2 * u * bw)
        cv.paint(arm, p.skin if p.short_sleeves else (p.upper2 if p.pattern == "twotone" else p.upper), shade=shade)
        if p.short_sleeves:
            elbow = (s0[0] + 0.4 * (hand[0] - s0[0]), s0[1] + 0.4 * (hand[1] - s0[1]))
            cv.paint(cv.capsule(s0, elbow, 3.4 * u * bw), p.upper, shade=shade)
        cv.paint(cv.ellipse(hand[0], hand[1], 2.5 * u, 2.2 * u), p.skin)
        if p.bag == "handbag" and s == p.bag_side:
            cv.paint(cv.rect(hand[0], hand[0] + 11 * u, hand[1] - 5 * u, hand[1] + 5 * u), p.bag_color, shade=shade)
    # head and hair
    hy, hr = top + 8 * u, 7.5 * u
    head = cv.ellipse(hy, cx, hr * 1.1, hr * 0.85)
    cv.paint(cv.rect(hy + 6 * u, sh_y + 2 * u, cx - 2.5 * u, cx + 2.5 * u), p.skin)
    cv.paint(head, p.hair if back else p.skin)
    hair = head & (cv.yy < hy - 0.35 * hr)
    if p.long_hair:
        long = cv.rect(hy - hr, sh_y + 12 * u, cx - hr * 0.95, cx + hr * 0.95)
        cv.paint((long & ~head) if not back else long, p.hair)
        cv.paint(hair, p.hair)
    else:
        cv.paint(hair, p.hair)
    if p.hat is not None:
        cv.paint(head & (cv.yy < hy - 0.2 * hr), p.hat)
    # bags
    if p.bag == "backpack":
        if back:
            cv.paint(cv.rect(sh_y + 3 * u, waist_y - 4 * u, cx - half * 0.75, cx + half * 0.75), p.bag_color, shade=shade)
        else:
            for s in (-1, 1):
                cv.paint(cv.rect(sh_y, sh_y + 22 * u, cx + s * half * 0.55 - 1.3 * u, cx + s * half * 0.55 + 1.3 * u),
                         p.bag_color)
    elif p.bag == "shoulder":
        side = p.bag_side * (-1 if back else 1)
        strap = cv.capsule((sh_y, cx - side * half * 0.6), (waist_y, cx + side * half), 1.2 * u)
        cv.paint(strap, p.bag_color)
        bx = cx + side * (half + 2 * u)
        cv.paint(cv.rect(waist_y - 4 * u, waist_y + 8 * u, bx - 5 * u, bx + 5 * u), p.bag_color, shade=shade)


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return img
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
    tmp = sum(k[i] * pad[i:i + img.shape[0]] for i in range(2 * r + 1))
    return sum(k[i] * tmp[:, i:i + img.shape[1]] for i in range(2 * r + 1))


def render(identity: Optional[Identity], cam: Camera, rng: np.random.Generator, size=(128, 64),
           occlusion_p: float = 0.3) -> np.ndarray:
    """Render one image ``[H, W, 3] uint8``; ``identity=None`` draws background only (a distractor)."""
    from PIL import Image

    h, w = size
    cv = _Canvas(2 * h, 2 * w)                          # 2x supersampling, then camera resolution
    _background(cv, cam, rng)
    if identity is not None:
        back = bool(rng.random() < cam.back_view_p)
        _person(cv, identity, rng, back)
    if rng.random() < occlusion_p:                     # a pole, a car, another pedestrian's body
        oc = rng.uniform(0.05, 0.95, 3)
        if rng.random() < 0.5:
            y0 = rng.uniform(0.45, 0.85) * cv.h
            cv.img[cv.rect(y0, cv.h, -1, cv.w + 1)] = oc
        else:
            x0 = rng.uniform(-0.2, 0.7) * cv.w
            cv.img[cv.rect(-1, cv.h + 1, x0, x0 + rng.uniform(0.2, 0.4) * cv.w)] = oc
    img = np.clip(cv.img, 0, 1)
    if rng.random() < 0.5:                            # viewpoint mirror
        img = img[:, ::-1]
    pil = Image.fromarray((img * 255).astype(np.uint8))
    res = cam.resolution * rng.uniform(0.9, 1.1)
    lo = (max(8, int(w * res)), max(16, int(h * res)))
    pil = pil.resize(lo, Image.BILINEAR).resize((w, h), Image.BILINEAR)
    out = np.asarray(pil).astype(np.float32) / 255.0
    out = _gauss_blur(out, cam.blur * rng.uniform(0.7, 1.3))
    bright = cam.brightness * rng.uniform(0.85, 1.15)
    mean = out.mean()
    out = (out - mean) * cam.contrast + mean
    out = out * cam.gain * bright
    out = out + rng.normal(0, cam.noise, out.shape)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass
class SynthConfig:
    ids: int = 200
    cameras: int = 6
    seed: int = 0
    height: int = 128
    width: int = 64
    min_images: int = 2            # images per (identity, camera) appearance
    max_images: int = 4
    unlabeled: int = 1000
    distractors: int = 100
    junk: int = 20
    occlusion_p: float = 0.3
    quality: int = 90

    def validate(self) -> None:
        if self.ids < 2:
            raise ValueError(f"synth: --ids must be at least 2 (half train, half test), got {self.ids}")
        if not 2 <= self.cameras <= 9:
            raise ValueError(f"synth: --cameras must be in 2..9 (Market-style names use one digit), got {self.cameras}")
        if not 2 <= self.min_images <= self.max_images:
            raise ValueError(f"synth: need 2 <= min_images <= max_images, got {self.min_images}, {self.max_images}")
        if self.height < 32 or self.width < 16:
            raise ValueError(f"synth: image size must be at least 32x16, got {self.height}x{self.width}")
        for name in ("unlabeled", "distractors", "junk"):
            if getattr(self, name) < 0:
                raise ValueError(f"synth: --{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.occlusion_p <= 1.0:
            raise ValueError(f"synth: --occlusion must be a probability in [0, 1], got {self.occlusion_p}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"synth: --quality must be a JPEG quality in 1..100, got {self.quality}")
        if self.seed < 0:     # numpy's generators take non-negative seeds only
            raise ValueError(f"synth: --seed must be >= 0, got {self.seed}")


def plan(cfg: SynthConfig) -> List[Tuple[str, str, Optional[int], int, Tuple[int, ...]]]:
    """Every image to render as (folder, file name, pid or None, camera, rng key), deterministic."""
    cfg.validate()
    n_train = cfg.ids // 2
    jobs = []
    for pid in range(1, cfg.ids + 1):
        rng = np.random.default_rng([cfg.seed, 2, pid])
        n_cams = int(rng.integers(2, cfg.cameras + 1))
        cams = sorted(rng.choice(cfg.cameras, n_cams, replace=False).tolist())
        q_done = set()
        for cam in cams:
            for k in range(int(rng.integers(cfg.min_images, cfg.max_images + 1))):
                name = f"{pid:04d}_c{cam + 1}s1_{k * 25:06d}_00.jpg"
                if pid <= n_train:
                    folder = "bounding_box_train"
                elif cam not in q_done:             # one query per (identity, camera), Market-style
                    folder = "query"
                    q_done.add(cam)
                else:
                    folder = "bounding_box_test"
                jobs.append((folder, name, pid, cam, (cfg.seed, 3, pid, cam, k)))
    for i in range(cfg.distractors):              # random other people and empty scenes: pid 0
        cam = i % cfg.cameras
        jobs.append(("bounding_box_test", f"0000_c{cam + 1}s1_{i:06d}_00.jpg", 0, cam, (cfg.seed, 4, i)))
    for i in range(cfg.junk):                      # junk detections: pid -1 (parsers drop them)
        cam = i % cfg.cameras
        jobs.append(("bounding_box_test", f"-1_c{cam + 1}s1_{i:06d}_00.jpg", -1, cam, (cfg.seed, 5, i)))
    for i in range(cfg.unlabeled):                 # unlabeled identities never used in train/test
        cam = int(np.random.default_rng([cfg.seed, 6, i]).integers(cfg.cameras))
        jobs.append((f"unlabeled/{i // 1000:03d}", f"u{i:07d}.jpg", -2, cam, (cfg.seed, 6, i)))
    return jobs


def render_job(cfg: SynthConfig, job) -> np.ndarray:
    folder, name, pid, cam, key = job
    rng = np.random.default_rng(list(key))
    camera = make_camera(cfg.seed, cam)
    if pid is not None and pid > 0:
        ident = make_identity(cfg.seed, pid)
    elif pid == -2:                                 # unlabeled: identities beyond the labelled range
        ident = make_identity(cfg.seed, 10_000_000 + key[2])
    elif pid == 0:
        ident = make_identity(cfg.seed, 20_000_000 + key[2]) if rng.random() < 0.5 else None
    else:                                           # junk: a person cut in half by the frame
        ident = make_identity(cfg.seed, 30_000_000 + key[2])
    img = render(ident, camera, rng, (cfg.height, cfg.width), cfg.occlusion_p)
    if pid == -1:
        img = np.roll(img, img.shape[0] // 2, axis=0)
    return img


def _write_one(args):
    cfg, root, job = args
    from PIL import Image

    img = render_job(cfg, job)
    path = os.path.join(root, job[0], job[1])
    Image.fromarray(img).save(path, format="JPEG", quality=cfg.quality)
    return job[0]


def generate(root: str, cfg: SynthConfig, workers: int = 1, progress: bool = True) -> Dict[str, int]:
    """Render the whole dataset under ``root``; returns image counts per folder."""
    from upreid.utils.progress import bar as progress_bar

    jobs = plan(cfg)
    for folder in sorted({j[0] for j in jobs}):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    counts: Dict[str, int] = {}
    args = [(cfg, root, j) for j in jobs]
    bar = dict(total=len(jobs), desc="rendering", unit=" img", enabled=progress)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for folder in progress_bar(pool.imap_unordered(_write_one, args, chunksize=32), **bar):
                counts[folder] = counts.get(folder, 0) + 1
    else:
        for a in progress_bar(args, **bar):
            folder = _write_one(a)
            counts[folder] = counts.get(folder, 0) + 1
    merged: Dict[str, int] = {}
    for k, v in counts.items():
        top = k.split("/")[0]
        merged[top] = merged.get(top, 0) + v
    meta = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg), "counts": merged}
    tmp = os.path.join(root, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(root, "meta.json"))
    return merged
