"""upreid.evaluation.evaluate and the `upreid evaluate` command."""
import json

import numpy as np
import pytest
import torch

from upreid.evaluation import evaluate, pairwise_distance
from upreid.evaluation.cli import main as cli_main
from upreid.ops import HAS_EXTENSION
from upreid.ops import reference_eval as ref

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")


def dataset(q=60, g=300, ids=30, d=16, cams=4, junk=10):
    centres = torch.randn(ids, d)
    qp, gp = torch.randint(0, ids, (q,)), torch.randint(0, ids, (g,))
    gp[:junk] = -1  # junk gallery images
    qf = centres[qp] + 0.7 * torch.randn(q, d)
    gf = centres[gp.clamp(min=0)] + 0.7 * torch.randn(g, d)
    return qf, gf, qp, gp, torch.randint(0, cams, (q,)), torch.randint(0, cams, (g,))


def expected(qf, gf, qp, gp, qc, gc, dist, max_rank=50):
    cmc, ap, inp, valid = ref.rank_metrics(dist, qp, gp, qc, gc, max_rank)
    return {"mAP": ap[valid].double().mean().item(), "mINP": inp[valid].double().mean().item(),
            "Rank-1": cmc[0].item(), "Rank-5": cmc[4].item(), "Rank-10": cmc[9].item()}


def assert_metrics(res, exp):
    for k, v in exp.items():
        assert res[k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_plain_evaluation_matches_reference(metric):
    qf, gf, qp, gp, qc, gc = dataset()
    keep = gp != -1
    qn, gn = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf[keep], dim=1)
    dist = 1 - qn @ gn.t() if metric == "cosine" else torch.cdist(qf.double(), gf[keep].double())
    res = evaluate(qf, gf, qp, gp, qc, gc, metric=metric, progress=False, chunk_size=7)
    assert res["num_gallery"] == int(keep.sum()) and res["num_query"] == 60
    assert len(res["cmc"]) == 50 and 0 < res["mAP"] <= 1
    assert_metrics(res, expected(qf, gf[keep], qp, gp[keep], qc, gc[keep], dist))


def test_chunking_does_not_change_results():
    data = dataset()
    a = evaluate(*data, progress=False, chunk_size=1)
    b = evaluate(*data, progress=False)
    for k in ("mAP", "mINP", "cmc"):
        assert a[k] == pytest.approx(b[k], abs=1e-7)


def test_rerank_evaluation_matches_reference():
    qf, gf, qp, gp, qc, gc = dataset()
    keep = gp != -1
    feats = torch.nn.functional.normalize(torch.cat([qf, gf[keep]]).double(), dim=1)
    dist = ref.k_reciprocal_rerank(feats, 60, 20, 6, 0.3)
    res = evaluate(qf.double(), gf.double(), qp, gp, qc, gc, rerank=True, progress=False)
    assert_metrics(res, expected(qf, gf[keep], qp, gp[keep], qc, gc[keep], dist))
    plain = evaluate(qf, gf, qp, gp, qc, gc, progress=False)
    assert res["mAP"] != plain["mAP"]  # re-ranking did something


def test_numpy_inputs_and_progress(caplog, monkeypatch):
    import logging
    monkeypatch.setenv("UPREID_PROGRESS", "0")        # no bar even where pytest -s runs on a terminal
    data = [t.numpy() for t in dataset()]
    with caplog.at_level(logging.INFO, logger="upreid.evaluation"):
        res = evaluate(*data, progress=True, max_rank=5)
    assert "Rank-10" not in res and len(res["cmc"]) == 5
    # no bar: progress comes as log lines, the last one at the end
    n = len(data[0])
    assert any(r.getMessage().startswith(f"evaluating: {n}/{n} queries (") for r in caplog.records), caplog.text


def test_plural():
    from upreid.evaluation.progress import plural
    assert [plural("query", 2), plural("query", 1), plural("image", 3), plural("day", 2), plural("batch", 2)] == \
        ["queries", "query", "images", "days", "batches"]


def test_errors():
    qf, gf, qp, gp, qc, gc = dataset()
    with pytest.raises(ValueError, match="'g_pids' has 299 entries"):
        evaluate(qf, gf, qp, gp[1:], qc, gc)
    with pytest.raises(ValueError, match="'metric'"):
        evaluate(qf, gf, qp, gp, qc, gc, metric="manhattan")
    with pytest.raises(ValueError, match="dimensions"):
        evaluate(qf, gf[:, :5], qp, gp, qc, gc)
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate(qf, gf[:0], qp, gp[:0], qc, gc[:0])
    with pytest.raises(ValueError, match="no query has a positive"):
        evaluate(qf, gf, qp + 1000, gp, qc, gc, progress=False)
    bad = qf.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="'query_features' contains NaN"):
        evaluate(bad, gf, qp, gp, qc, gc)
    with pytest.raises((ValueError, RuntimeError), match="k2"):
        evaluate(qf, gf, qp, gp, qc, gc, rerank=True, k1=3, k2=5, progress=False)


def test_pairwise_distance():
    a, b = torch.randn(5, 3), torch.randn(7, 3)
    torch.testing.assert_close(pairwise_distance(a, b, "euclidean"), torch.cdist(a, b), atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    torch.testing.assert_close(pairwise_distance(a, b, "cosine"), 1 - cos, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["long", "short", "combined"])
def test_cli_reads_every_naming_scheme(tmp_path, capsys, scheme):
    qf, gf, qp, gp, qc, gc = (t.numpy() for t in dataset())
    path = tmp_path / "feats.npz"
    if scheme == "long":
        np.savez(path, query_features=qf, gallery_features=gf, query_pids=qp, gallery_pids=gp,
                 query_camids=qc, gallery_camids=gc)
    elif scheme == "short":
        np.savez(path, qf=qf, gf=gf, q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc)
    else:
        np.savez(path, features=np.concatenate([qf, gf]), pids=np.concatenate([qp, gp]),
                 camids=np.concatenate([qc, gc]), num_query=len(qf))
    out_json = tmp_path / "res.json"
    rc = cli_main(["evaluate", str(path), "--rerank", "both", "--no-progress", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mAP" in text and "re-ranked k1=20 k2=6" in text
    res = json.loads(out_json.read_text())
    direct = evaluate(qf, gf, qp, gp, qc, gc, progress=False)
    assert res["plain"]["mAP"] == pytest.approx(direct["mAP"], abs=1e-7)
    assert f"{100 * direct['mAP']:7.2f}" in text


def test_cli_missing_arrays(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, foo=np.zeros(3))
    assert cli_main(["evaluate", str(path)]) == 2
    assert "expected one of" in capsys.readouterr().err
