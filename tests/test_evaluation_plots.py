"""Distance histograms accumulated by evaluate, the CMC and distance PNGs, and `upreid evaluate`
writing them beside --json."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from upreid.evaluation import evaluate
from upreid.evaluation.cli import main as evaluate_main
from upreid.evaluation.histogram import DistanceHistogram
from upreid.evaluation.plots import plot_cmc, plot_distances, write_plots


def data(q=30, g=90, ids=8, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, d, generator=gen)
    qp, gp = torch.randint(0, ids, (q,), generator=gen), torch.randint(0, ids, (g,), generator=gen)
    qf = centres[qp] + 0.8 * torch.randn(q, d, generator=gen)
    gf = centres[gp] + 0.8 * torch.randn(g, d, generator=gen)
    return qf, gf, qp, gp, torch.randint(0, 3, (q,), generator=gen), torch.randint(0, 3, (g,), generator=gen)


def brute_counts(dist, qp, gp, qc, gc, lo, hi, bins):
    same, cam = qp[:, None] == gp[None, :], qc[:, None] == gc[None, :]
    edges = np.linspace(lo, hi, bins + 1)
    pos = np.histogram(np.clip(dist[same & ~cam], lo, hi), edges)[0]
    neg = np.histogram(np.clip(dist[~same], lo, hi), edges)[0]
    return pos, neg


def test_histogram_counts_positives_and_negatives_under_the_protocol():
    qf, gf, qp, gp, qc, gc = data()
    dist = torch.cdist(qf, gf)
    h = DistanceHistogram(0.0, 4.0, bins=16)
    h.add(dist[:10], qp[:10], gp, qc[:10], gc)              # two blocks, as evaluate feeds it
    h.add(dist[10:], qp[10:], gp, qc[10:], gc)
    pos, neg = brute_counts(dist.numpy(), qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy(), 0.0, 4.0, 16)
    out = h.to_dict()
    assert len(out["edges"]) == 17 and out["edges"][0] == 0.0 and out["edges"][-1] == 4.0
    np.testing.assert_array_equal(out["positive"], pos)
    np.testing.assert_array_equal(out["negative"], neg)
    same_cam_same_id = int(((qp[:, None] == gp) & (qc[:, None] == gc)).sum())
    assert sum(out["positive"]) + sum(out["negative"]) == dist.numel() - same_cam_same_id


@pytest.mark.parametrize("bins, lo, hi, message", [(0, 0, 1, "'bins' must be >= 1, got 0"),
                                                   (5, 1, 1, r"need lo < hi, got \[1, 1\]")])
def test_histogram_bad_arguments(bins, lo, hi, message):
    with pytest.raises(ValueError, match=message):
        DistanceHistogram(lo, hi, bins)


@pytest.mark.parametrize("metric, rerank", [("cosine", False), ("euclidean", False), ("cosine", True)])
def test_evaluate_adds_histograms_without_changing_the_metrics(metric, rerank):
    qf, gf, qp, gp, qc, gc = data()
    kw = dict(metric=metric, rerank=rerank, k1=5, k2=3, progress=False)
    plain = evaluate(qf, gf, qp, gp, qc, gc, **kw)
    res = evaluate(qf, gf, qp, gp, qc, gc, **kw, distance_bins=25, chunk_size=7)
    assert "distances" not in plain
    assert res["mAP"] == pytest.approx(plain["mAP"], abs=1e-7) and res["cmc"] == pytest.approx(plain["cmc"], abs=1e-6)
    h = res["distances"]
    lo, hi = h["edges"][0], h["edges"][-1]
    assert (lo, hi) == ((0.0, 1.0) if rerank else (0.0, 2.0) if metric == "cosine" else (0.0, pytest.approx(
        float(qf.norm(dim=1).max() + gf.norm(dim=1).max()))))
    pos_pairs = int(((qp[:, None] == gp) & (qc[:, None] != gc)).sum())
    assert sum(h["positive"]) == pos_pairs and sum(h["negative"]) == int((qp[:, None] != gp).sum())
    if not rerank:                       # positives are closer than negatives on clustered features
        centre = lambda c: np.dot(c, np.array(h["edges"][:-1]) + 0.5 * (hi - lo) / 25) / sum(c)  # noqa: E731
        assert centre(h["positive"]) < centre(h["negative"])


def _colours(path):
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return arr, (np.abs(arr - 255).sum(-1) > 30).mean()


def test_pngs_are_drawn(tmp_path):
    qf, gf, qp, gp, qc, gc = data()
    results = {k: evaluate(qf, gf, qp, gp, qc, gc, rerank=k == "rerank", k1=5, k2=3, progress=False,
                           distance_bins=30) for k in ("plain", "rerank")}
    paths = write_plots(str(tmp_path), results, title="test")
    assert [p.split("/")[-1] for p in paths] == ["cmc.png", "distances.png"]
    cmc, ink = _colours(paths[0])
    assert cmc.shape == (400, 600, 3) and 0.01 < ink < 0.5
    dist, ink = _colours(paths[1])
    assert dist.shape == (360, 1000, 3) and ink > 0.02           # one panel per result
    r, g, b = dist[..., 0], dist[..., 1], dist[..., 2]
    assert ((g > r + 40) & (g > b + 20)).any() and ((r > g + 60) & (r > b + 60)).any()   # green and red fills
    with pytest.raises(ValueError, match="no result has 'distances'; evaluate with distance_bins > 0"):
        plot_distances(str(tmp_path / "x.png"), {"plain": {k: v for k, v in results["plain"].items()
                                                           if k != "distances"}})
    assert plot_cmc(str(tmp_path / "one.png"), {"plain": results["plain"]}).endswith("one.png")


def test_evaluate_cli_writes_json_and_plots_beside_it(tmp_path, capsys):
    qf, gf, qp, gp, qc, gc = data()
    npz = str(tmp_path / "f.npz")
    np.savez(npz, qf=qf.numpy(), gf=gf.numpy(), q_pids=qp.numpy(), g_pids=gp.numpy(), q_camids=qc.numpy(),
             g_camids=gc.numpy())
    out = tmp_path / "out"
    out.mkdir()
    assert evaluate_main(["evaluate", npz, "--json", str(out / "r.json"), "--no-progress"]) == 0
    assert "cmc.png" in capsys.readouterr().out
    saved = json.load(open(out / "r.json"))["plain"]
    assert {"mAP", "mINP", "Rank-1", "Rank-5", "Rank-10", "cmc", "distances", "num_valid_query"} <= set(saved)
    assert (out / "cmc.png").exists() and (out / "distances.png").exists()
    assert evaluate_main(["evaluate", npz, "--plots", str(tmp_path / "p"), "--no-progress"]) == 0
    assert (tmp_path / "p" / "cmc.png").exists()


def test_without_matplotlib_plots_are_skipped_or_refused(tmp_path, monkeypatch, caplog, capsys):
    from upreid.evaluation import plots

    def absent(*_):
        raise ImportError("evaluation plots need matplotlib: pip install matplotlib")

    monkeypatch.setattr(plots, "_figure", absent)
    qf, gf, qp, gp, qc, gc = data()
    res = {"plain": evaluate(qf, gf, qp, gp, qc, gc, progress=False, distance_bins=5)}
    with caplog.at_level("WARNING"):
        assert plots.write_plots(str(tmp_path / "a"), res, required=False) == []
    assert "need matplotlib" in caplog.text and not (tmp_path / "a").exists()
    npz = str(tmp_path / "f.npz")
    np.savez(npz, qf=qf.numpy(), gf=gf.numpy(), q_pids=qp.numpy(), g_pids=gp.numpy(), q_camids=qc.numpy(),
             g_camids=gc.numpy())
    assert evaluate_main(["evaluate", npz, "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert (tmp_path / "r.json").exists() and not (tmp_path / "cmc.png").exists()
    assert evaluate_main(["evaluate", npz, "--plots", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "--plots: evaluation plots need matplotlib" in capsys.readouterr().err
