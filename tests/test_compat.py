"""upreid.compat: the fast-reid / torchreid evaluation functions, compared with the protocol written
out here (per-query stable argsort, matches, CMC cumsum, AP, INP) on random and tie-heavy inputs."""
import numpy as np
import pytest
import torch

from upreid.compat import fastreid, torchreid
from upreid.ops import reference_eval


def protocol(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The Market1501 protocol as the libraries publish it, with ties ordered by gallery index."""
    num_g = distmat.shape[1]
    max_rank = min(max_rank, num_g)
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        raw = (g_pids[order][keep] == q_pids[i]).astype(np.int64)
        if not raw.any():
            continue
        hits = raw.cumsum()
        last = np.flatnonzero(raw)[-1]
        inps.append(hits[last] / (last + 1.0))
        cmc = np.minimum(hits, 1).astype(np.float64)
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1])])[:max_rank]
        cmcs.append(cmc)
        aps.append((hits / np.arange(1, len(raw) + 1) * raw).sum() / raw.sum())
    return np.mean(cmcs, axis=0), np.array(aps), np.array(inps)


def labels(rng, q, g, ids=12, cams=3):
    q_pids = rng.integers(0, ids + 3, q)          # ids >= `ids` never appear in the gallery
    g_pids = rng.integers(0, ids, g)
    return q_pids, g_pids, rng.integers(0, cams, q), rng.integers(0, cams, g)


@pytest.mark.parametrize("kind", ["random", "ties", "all_equal"])
@pytest.mark.parametrize("max_rank", [1, 10, 50, 500])
def test_fastreid_evaluate_rank_matches_the_protocol(kind, max_rank):
    rng = np.random.default_rng(max_rank + len(kind))
    q, g = 41, 157
    dist = {"random": rng.random((q, g)).astype(np.float32),
            "ties": rng.integers(0, 4, (q, g)).astype(np.float32),
            "all_equal": np.ones((q, g), np.float32)}[kind]
    lab = labels(rng, q, g)
    cmc, ap, inp = fastreid.evaluate_rank(dist, *lab, max_rank=max_rank)
    want_cmc, want_ap, want_inp = protocol(dist, *lab, max_rank)
    assert isinstance(cmc, np.ndarray) and cmc.dtype == np.float32 and cmc.shape == (min(max_rank, g),)
    assert isinstance(ap, np.ndarray) and isinstance(inp, np.ndarray)
    assert len(ap) == len(inp) == len(want_ap) < q          # only the valid queries
    np.testing.assert_allclose(cmc, want_cmc, atol=1e-6)
    np.testing.assert_allclose(ap, want_ap, atol=1e-6)
    np.testing.assert_allclose(inp, want_inp, atol=1e-6)


def test_fastreid_accepts_tensors_float64_and_ignores_use_cython():
    rng = np.random.default_rng(3)
    dist = rng.random((20, 60))
    lab = labels(rng, 20, 60)
    a = fastreid.evaluate_rank(dist, *lab)
    b = fastreid.evaluate_rank(torch.from_numpy(dist), *(torch.from_numpy(x) for x in lab), use_cython=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(a[1], protocol(dist, *lab, 50)[1], atol=1e-6)


def test_gallery_smaller_than_max_rank_caps_the_cmc(caplog):
    rng = np.random.default_rng(4)
    dist = rng.random((5, 7)).astype(np.float32)
    q_pids, g_pids = np.array([0, 1, 2, 0, 1]), np.array([0, 1, 2, 0, 1, 2, 3])
    cams_q, cams_g = np.zeros(5, int), np.ones(7, int)
    with caplog.at_level("INFO", logger="upreid.compat"):
        cmc, _ = torchreid.evaluate_rank(dist, q_pids, g_pids, cams_q, cams_g)
    assert cmc.shape == (7,) and cmc[-1] == pytest.approx(1.0)
    assert "quite small, got 7" in caplog.text


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_torchreid_evaluate_rank_returns_cmc_and_map(kind):
    rng = np.random.default_rng(5)
    dist = rng.random((33, 90)) if kind == "random" else rng.integers(0, 3, (33, 90)).astype(np.float64)
    lab = labels(rng, 33, 90)
    cmc, mAP = torchreid.evaluate_rank(dist, *lab, max_rank=20)
    want_cmc, want_ap, _ = protocol(dist, *lab, 20)
    assert isinstance(mAP, float) and cmc.dtype == np.float32 and cmc.shape == (20,)
    assert mAP == pytest.approx(want_ap.mean(), abs=1e-6)
    np.testing.assert_allclose(cmc, want_cmc, atol=1e-6)


@pytest.mark.parametrize("fn", [fastreid.evaluate_rank, torchreid.evaluate_rank])
def test_no_query_with_a_match_raises_the_originals_error(fn):
    dist = np.random.rand(3, 4)
    with pytest.raises(AssertionError, match="all query identities do not appear in gallery"):
        fn(dist, np.array([5, 6, 7]), np.array([1, 2, 3, 4]), np.zeros(3, int), np.ones(4, int))
    # the only gallery image of the query's identity is from the query's camera: not a match either
    with pytest.raises(AssertionError, match="all query identities do not appear in gallery"):
        fn(dist[:1], np.array([1]), np.array([1, 2, 3, 4]), np.array([0]), np.array([0, 1, 1, 1]))


@pytest.mark.parametrize("fn", [fastreid.evaluate_rank, torchreid.evaluate_rank])
def test_cuhk03_protocol_is_rejected_clearly(fn):
    with pytest.raises(NotImplementedError, match=r"use_metric_cuhk03=True .* not supported.*CUHK03-NP"):
        fn(np.random.rand(2, 3), np.array([1, 2]), np.array([1, 2, 2]), np.zeros(2, int), np.ones(3, int),
           use_metric_cuhk03=True)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "distmat": a["distmat"][0]}, r"'distmat' must be 2-D \(num_query, num_gallery\), got shape \(5,\)"),
    (lambda a: {**a, "q_pids": a["q_pids"][:3]}, "'q_pids' has 3 entries but distmat has 4 rows"),
    (lambda a: {**a, "g_camids": a["g_camids"][:2]}, "'g_camids' has 2 entries but distmat has 5 columns"),
    (lambda a: {**a, "g_pids": a["g_pids"] + 0.5}, "'g_pids' must hold integer ids, got dtype float64"),
    (lambda a: {**a, "distmat": np.where(np.eye(4, 5) > 0, np.nan, a["distmat"])}, "'distmat' contains NaN or Inf"),
    (lambda a: {**a, "max_rank": 0}, "'max_rank' must be >= 1, got 0"),
    (lambda a: {**a, "distmat": np.zeros((0, 5)), "q_pids": np.zeros(0, int), "q_camids": np.zeros(0, int)},
     "at least one query and one gallery item"),
])
def test_bad_input_is_named(change, message):
    args = {"distmat": np.random.rand(4, 5), "q_pids": np.array([1, 2, 3, 1]), "g_pids": np.array([1, 2, 3, 1, 2]),
            "q_camids": np.zeros(4, int), "g_camids": np.ones(5, int)}
    with pytest.raises(ValueError, match=message):
        fastreid.evaluate_rank(**change(args))


def _dists(x, q):
    e = reference_eval.euclidean_distances
    return e(x[:q], x[q:]), e(x[:q], x[:q], True), e(x[q:], x[q:], True)


@pytest.mark.parametrize("kind", ["random", "duplicates"])
def test_torchreid_re_ranking_matches_the_transcription(kind):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((90, 16))
    if kind == "duplicates":                       # exact duplicates: tied neighbour distances
        x[30:60] = x[:30]
    q_g, q_q, g_g = _dists(x, 25)
    out = torchreid.re_ranking(q_g.astype(np.float32), q_q.astype(np.float32), g_g.astype(np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (25, 65)
    want = reference_eval.k_reciprocal_rerank_dense(q_g, q_q, g_g, 20, 6, 0.3).numpy()
    np.testing.assert_allclose(out, want, atol=1e-4)
    assert (np.argsort(out, 1, kind="stable")[:, :10] == np.argsort(want, 1, kind="stable")[:, :10]).mean() > 0.99


def test_re_ranking_with_lambda_one_is_the_normalised_original_distance():
    rng = np.random.default_rng(7)
    q_g, q_q, g_g = _dists(rng.standard_normal((40, 8)), 10)
    out = torchreid.re_ranking(torch.from_numpy(q_g), q_q, g_g, k1=5, k2=3, lambda_value=1.0)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    want = (full / full.max(axis=0)).T[:10, 10:]     # squared, over the column maximum, transposed
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_re_ranking_bad_shapes_are_named():
    q_g, q_q, g_g = np.random.rand(3, 5), np.random.rand(3, 3), np.random.rand(5, 5)
    with pytest.raises(ValueError, match=r"'g_g_dist' must have shape \(5, 5\) to match q_g_dist \(3, 5\), got \(4, 4\)"):
        torchreid.re_ranking(q_g, q_q, g_g[:4, :4])
    with pytest.raises(ValueError, match=r"'q_q_dist' must be 2-D"):
        torchreid.re_ranking(q_g, q_q[0], g_g)
    with pytest.raises(RuntimeError, match="'k1' must be >= 1"):
        torchreid.re_ranking(q_g, q_q, g_g, k1=0)
