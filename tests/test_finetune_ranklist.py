"""The rank-list picture: size, frame colours and the protocol filter, on a known case; plus the
small pieces of the fine-tuning recipe (schedule, triplet loss, models, config)."""
import numpy as np
import pytest
import torch
from PIL import Image

from upreid.engine.finetune import lr_factor
from upreid.engine.ranklist import GREEN, GREY, RED, draw_ranklist, frame_colour, rank_lists, ranklist_size
from upreid.losses.reid import batch_hard_triplet
from upreid.models.reid import MGN, BoT


def _img(path, colour):
    Image.fromarray(np.full((40, 20, 3), colour, np.uint8)).save(path)
    return str(path)


def test_ranklist_size_and_colours(tmp_path):
    cell = (32, 16)
    q = [_img(tmp_path / f"q{i}.png", (10 * i, 0, 0)) for i in range(2)]
    g = [_img(tmp_path / f"g{j}.png", (0, 0, 40 * j)) for j in range(5)]
    q_pids, q_cams = torch.tensor([1, 2]), torch.tensor([0, 0])
    g_pids, g_cams = torch.tensor([1, 1, 2, 3, 2]), torch.tensor([0, 1, 1, 1, 0])
    # query 0: nearest g0 (same id, same camera: left out), then g1 (match), g3, g2, g4
    # query 1: nearest g3 (wrong), then g4 (same id, same camera: left out), g2 (match), g0, g1
    dist = torch.tensor([[0.0, 0.1, 0.3, 0.2, 0.4],
                         [0.3, 0.4, 0.2, 0.0, 0.1]])
    lists = rank_lists(dist, q_pids, g_pids, q_cams, g_cams, top=3)
    assert lists == [([1, 3, 2], [True, False, False]), ([3, 2, 0], [False, True, False])]

    out = str(tmp_path / "rl.png")
    size = draw_ranklist(out, q, g, lists, top=3, cell=cell)
    # width: pad 4 + frame (16 + 6) + gap 12 + 3 x (22 + 4); height: 4 + 2 x (32 + 6 + 4)
    assert size == (4 + 22 + 12 + 3 * 26, 4 + 2 * 42) == ranklist_size(2, 3, cell)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == size
        arr = np.asarray(im.convert("RGB"))
    colours = [[frame_colour(arr, r, c, cell) for c in range(4)] for r in range(2)]
    assert colours == [[GREY, GREEN, RED, RED], [GREY, RED, GREEN, RED]]
    # the cell inside the frame shows the gallery image (g2 = (0, 0, 80) at row 1, rank 2)
    x = 4 + 22 + 12 + 1 * 26 + 3 + 8
    y = 4 + 42 + 3 + 16
    assert tuple(arr[y, x]) == (0, 0, 80)


def test_lr_schedule_warmup_and_steps():
    f = lambda e: lr_factor(e, 10, 0.01, [40, 90], 0.1)   # noqa: E731
    assert f(0) == pytest.approx(0.01) and f(5) == pytest.approx(0.505) and f(10) == 1.0
    assert f(39.9) == 1.0 and f(40) == pytest.approx(0.1) and f(95) == pytest.approx(0.01)


def test_batch_hard_triplet_known_values():
    feats = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
    pids = torch.tensor([0, 0, 1, 1])
    # anchors: hardest positive / closest negative distances: (1, 2), (1, sqrt 5), (1, 3), (1, 2)
    expect = torch.relu(torch.tensor([1 - 2, 1 - 5 ** 0.5, 1 - 3, 1 - 2]) + 0.3).mean()
    assert batch_hard_triplet(feats, pids, 0.3) == pytest.approx(float(expect), abs=1e-5)
    soft = torch.nn.functional.softplus(torch.tensor([1 - 2, 1 - 5 ** 0.5, 1 - 3, 1 - 2])).mean()
    assert batch_hard_triplet(feats, pids, None) == pytest.approx(float(soft), abs=1e-5)


def test_models_train_and_eval_outputs(tiny_resnet, tiny_trunk):
    """BoT and MGN on injected narrow trunks (the ResNet structure at 1/8 of the channels)."""
    x = torch.randn(4, 3, 64, 32)
    bot = BoT(num_classes=7, trunk=tiny_resnet())
    out = bot(x)
    assert out["logits"][0].shape == (4, 7) and out["triplet"][0].shape == (4, 64)
    assert not bot.neck.bn.bias.requires_grad          # BNNeck: no shift
    assert bot.eval()(x).shape == (4, 64)
    assert BoT(num_classes=3, trunk=tiny_trunk(out_channels=12)).eval()(x).shape == (4, 12)
    with pytest.raises(TypeError, match="must be a ResNet"):
        MGN(num_classes=7, trunk=tiny_trunk())
    with pytest.raises(ValueError, match="last_stride=1"):
        MGN(num_classes=7, trunk=tiny_resnet(last_stride=2))
    mgn = MGN(num_classes=7, dim=16, trunk=tiny_resnet(last_stride=1))
    out = mgn(x)
    assert len(out["logits"]) == 8 and len(out["triplet"]) == 3 and out["logits"][7].shape == (4, 7)
    assert mgn.eval()(x).shape == (4, 8 * 16)
