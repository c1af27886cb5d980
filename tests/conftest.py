import pytest
import torch

from upreid.ops import HAS_EXTENSION, built_with_cuda

CUDA_OK = torch.cuda.is_available() and built_with_cuda()


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)] if CUDA_OK else ["cpu"]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and the CUDA build of upreid._C")
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return (f"upreid: extension built={HAS_EXTENSION}, cuda kernels={built_with_cuda()}, "
            f"torch={torch.__version__}, cuda available={torch.cuda.is_available()}")


# ------------------------------------------------------------------ engine and data fixtures
import os  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
PRETRAIN_TINY = os.path.join(CONFIGS, "pretrain", "tiny_cpu.yaml")
FINETUNE_TINY = os.path.join(CONFIGS, "finetune", "tiny_cpu.yaml")
# Runs at test speed: a ResNet-18 of width 16 (a quarter of the channels: the same structure, the
# engine's behaviour does not depend on it), tiny heads and queue, 4 images a pre-training step.
PRETRAIN_FAST = ["model.width=16", "model.hidden_dim=64", "model.dim=32", "model.patch_dim=32",
                 "model.queue_size=16", "data.batch_size=4", "train.progress=false", "train.log_every=1"]
FINETUNE_FAST = ["model.width=16", "data.p=4", "data.k=4", "train.epochs=2", "train.max_steps_per_epoch=2",
                 "train.progress=false", "data.backend=torch", "eval.ranklist_queries=3"]


def write_images(folder, n=16, seed=0):
    """``n`` random JPEGs of a few sizes (an unlabeled pre-training set)."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48 + i % 3 * 8, 24, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"img{i:03d}.jpg"))
    return folder


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """16 random JPEGs; tests must not change them."""
    return write_images(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny synthetic labelled set (16 ids, 3 cameras, 64 x 32) with unlabeled/; read-only."""
    from upreid.data.synthetic import SynthConfig, generate
    root = str(tmp_path_factory.mktemp("synth"))
    generate(root, SynthConfig(ids=16, cameras=3, unlabeled=32, height=64, width=32, distractors=6, junk=2),
             workers=1, progress=False)
    return root


@pytest.fixture
def pretrain_cfg():
    """``make(images, out, *overrides)``: the tiny CPU pre-training config at test speed."""
    from upreid.engine.config import load_config

    def make(images, out, *extra):
        return load_config("pretrain", PRETRAIN_TINY, [f"data.root={images}", f"train.output={out}",
                                                       *PRETRAIN_FAST, *extra])
    return make


@pytest.fixture
def finetune_cfg():
    """``make(root, out, *overrides)``: the tiny CPU fine-tuning config at test speed (2 x 2 steps)."""
    from upreid.engine.config import load_config

    def make(root, out, *extra):
        return load_config("finetune", FINETUNE_TINY, [f"data.root={root}", f"train.output={out}",
                                                       *FINETUNE_FAST, *extra])
    return make


# ------------------------------------------------------------------ model fixtures
class TinyTrunk(torch.nn.Module):
    """A stand-in for the ResNet trunk in model tests, as MoCo's builder takes its encoder:
    two strided conv + BN + ReLU stages, ``[B, 3, H, W] -> [B, out_channels, H/4, W/4]``."""

    def __init__(self, out_channels: int = 16):
        super().__init__()
        nn = torch.nn
        self.out_channels = out_channels
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, out_channels, 3, 2, 1, bias=False), nn.BatchNorm2d(out_channels),
                                  nn.ReLU())

    def forward(self, x):
        return self.body(x)                                   # [B, C, H/4, W/4]


@pytest.fixture
def tiny_trunk():
    """``tiny_trunk(out_channels=16)``: a fresh :class:`TinyTrunk` (a few thousand weights)."""
    return TinyTrunk


@pytest.fixture
def tiny_resnet():
    """``tiny_resnet(**kw)``: a ResNet-18 of width 8 (every layer, 1/8 of the channels), for models that
    need the ResNet structure itself (MGN copies layer3/layer4)."""
    from upreid.models import ResNet

    def make(**kw):
        kw.setdefault("width", 8)
        return ResNet(18, **kw)
    return make


def make_upreid_batch(b=4, h=64, w=32, seed=0):
    """A pre-training batch (original, two views, their crop boxes and flips) of random pixels."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(2):
        y0, x0 = torch.rand(b, generator=g) * 0.4, torch.rand(b, generator=g) * 0.3
        boxes.append(torch.stack([y0, x0, y0 + 0.5 + torch.rand(b, generator=g) * 0.1,
                                  x0 + 0.6 + torch.rand(b, generator=g) * 0.1], 1))
    return {"original": torch.randn(b, 3, h, w, generator=g), "view1": torch.randn(b, 3, h, w, generator=g),
            "view2": torch.randn(b, 3, h, w, generator=g), "box1": boxes[0], "box2": boxes[1],
            "flip1": (torch.rand(b, generator=g) < 0.5).float(), "flip2": torch.zeros(b)}


@pytest.fixture
def upreid_batch():
    """``upreid_batch(b=4, h=64, w=32, seed=0)``: see :func:`make_upreid_batch`."""
    return make_upreid_batch
