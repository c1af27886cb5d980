"""The evaluation kernels in emulation: rank_metrics (shared-memory and global-scratch paths) and
k_reciprocal_rerank (features and dense paths, the upper-triangle schedule, the exact neighbour
lists, the fp32 matmul-precision rule, the global-scratch stages)."""
from __future__ import annotations

import pytest
import torch

from emu import ops as eo
from helpers import max_err
from upreid.ops import reference
from cuda_emu_common import configure, MARKS

pytestmark = MARKS


# ---- rank_metrics ----------------------------------------------------------------------------------

def rank_inputs(q, g, ids, cams, dtype, seed=0, ties=False):
    torch.manual_seed(seed)
    dist = torch.rand(q, g, dtype=torch.float64)
    if ties:
        dist = torch.round(dist * 16) / 16
    return (dist.to(dtype), torch.randint(0, ids, (q,)), torch.randint(0, ids, (g,)),
            torch.randint(0, cams, (q,)), torch.randint(0, cams, (g,)))


def check_rank(args, max_rank):
    cmc, ap, inp, valid, used = eo.rank_metrics(*args, max_rank)
    rc, rap, rinp, rvalid = reference.rank_metrics(*[a.numpy() if a.dtype != torch.bfloat16 else a.float().numpy()
                                                    for a in args], max_rank)
    rvalid = torch.as_tensor(rvalid)
    assert torch.equal(valid, rvalid)
    assert max_err(cmc, torch.as_tensor(rc)) < 1e-6
    assert max_err(ap[valid], torch.as_tensor(rap)[rvalid]) < 1e-6
    assert max_err(inp[valid], torch.as_tensor(rinp)[rvalid]) < 1e-6
    return used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q,g,ids,cams,max_rank,ties", [(1, 1, 1, 1, 1, False), (7, 50, 5, 3, 10, True),
                                                        (40, 300, 30, 6, 50, False), (9, 257, 4, 2, 300, True)])
def test_rank_metrics_shared_memory_path(q, g, ids, cams, max_rank, ties, dtype):
    configure("rank", "sm90")
    assert check_rank(rank_inputs(q, g, ids, cams, dtype, ties=ties), max_rank) == 0


def test_rank_metrics_global_scratch_path():
    """More than 2048 positives per query: pass 2 keeps them in global scratch."""
    configure("rank", "sm90-1sm")
    assert check_rank(rank_inputs(3, 9000, 2, 3, torch.float32, ties=True), 20) > 0


def test_rank_metrics_non_finite_is_reported():
    configure("rank", "sm90")
    dist, *ids = rank_inputs(4, 30, 3, 2, torch.float32)
    dist[2, 5] = float("nan")
    with pytest.raises(eo.EmuError, match="non-finite"):
        eo.rank_metrics(dist, *ids, 5)


# ---- k_reciprocal_rerank ---------------------------------------------------------------------------

def clustered(n, d, ids, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(ids, d, dtype=torch.float64)[torch.randint(0, ids, (n,))]
    return x + 0.6 * torch.randn(n, d, dtype=torch.float64)


def check_rerank(out, expected, atol):
    err = (out.double() - torch.as_tensor(expected)).abs().max().item()
    assert err <= atol, f"max error {err:.3g}"


RERANK = [(8, 3, 4, 20, 6), (12, 5, 3, 1, 1), (40, 7, 5, 3, 2), (60, 9, 6, 5, 6), (90, 20, 8, 7, 1),
          (150, 31, 16, 20, 6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,q,d,k1,k2", RERANK)
def test_rerank_features_match_reference(n, q, d, k1, k2, dtype):
    configure("rerank", "sm90")
    x = clustered(n, d, max(2, n // 8))
    out, _ = eo.rerank_features(x.to(dtype), q, k1, k2, 0.3)
    check_rerank(out, reference.k_reciprocal_rerank(x, q, k1, k2, 0.3), 1e-5 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("n,q,d,k1,k2", RERANK[2:])
def test_rerank_dense_matches_reference(n, q, d, k1, k2):
    configure("rerank", "sm90")
    x = clustered(n, d, max(2, n // 8), seed=3)
    dist = torch.cdist(x, x) ** 2
    qg, qq, gg = dist[:q, q:], dist[:q, :q], dist[q:, q:]
    out, _ = eo.rerank_dense(qg, qq, gg, k1, k2, 0.3)
    check_rerank(out, reference.k_reciprocal_rerank_dense(qg, qq, gg, k1, k2, 0.3), 1e-5)


def grid_features(n, d, ids, seed, dtype):
    """Features on a 1/4 grid with duplicates: every squared distance is exact in fp32 and fp64 alike
    (small multiples of 1/16), so exact ties occur and the order by index must decide them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(4 * clustered(n, d, ids, seed)) / 4
    x = x.clamp(-3, 3)
    x[n // 3:n // 3 + 12] = x[n // 3]  # a dozen copies of one image
    x[1] = x[n - 1]
    return x[torch.randperm(n, generator=g)].to(dtype)


def exact_sq_distances(x):
    xd = x.double()
    return (xd[:, None, :] - xd[None, :, :]).pow(2).sum(-1)


@pytest.mark.parametrize("panels", [1, 2, 3, 4, 5, 8, 33])
def test_rerank_schedule_meets_every_panel_pair_once(panels):
    """The rounds of the features path: each unordered pair of panels in exactly one round, no panel
    twice in a round (two blocks of a launch never feed one list), at most one bye per round."""
    configure("rerank", "sm90")
    rounds = eo.rerank_schedule(panels)
    assert len(rounds) == (0 if panels == 1 else panels + panels % 2 - 1)
    seen = []
    for pairs in rounds:
        real = [(a, b) for a, b in pairs if b < panels]
        assert all(0 <= a < b for a, b in pairs)
        assert len(pairs) - len(real) == panels % 2
        members = [m for pair in real for m in pair]
        assert len(members) == len(set(members)), pairs
        seen += real
    assert sorted(seen) == [(a, b) for a in range(panels) for b in range(a + 1, panels)]


@pytest.mark.parametrize("prec", ["highest", "high"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,q,k1", [(64, 9, 20), (65, 9, 20), (150, 31, 20), (200, 40, 100), (330, 50, 6)])
def test_rerank_neighbor_lists_are_exact(n, q, k1, dtype, prec):
    """Stage 1 on exactly representable distances: the features path (upper-triangle tiles in rounds:
    one panel, a one-row second panel, an odd panel count with byes, lists longer than a warp; fp32 at
    "high" on the split-bf16 tensor cores, exact on these values) and the dense path give the exact
    top-(k1 + 1) lists with ties by index, the row maxima and the raw query-gallery distances, bit
    for bit."""
    configure("rerank", "sm90").set_fp32_precision(prec)
    x = grid_features(n, 8, max(2, n // 10), seed=n, dtype=dtype)
    k = min(k1 + 1, n)
    d2 = exact_sq_distances(x)
    # The dense path squares its inputs: give it the features' squared distances (exact squares).
    dense = tuple(t.to(dtype) for t in (d2[:q, q:], d2[:q, :q], d2[q:, q:]))
    for args, dist in (({"x": x}, d2), ({"dense": dense}, d2 * d2)):
        val, idx = torch.sort(dist, dim=1, stable=True)
        nbr, nbr_d2, rowmax, out = eo.rerank_neighbors(num_query=q, k1=k1, **args)
        assert torch.equal(nbr, idx[:, :k].int()), ("features" if "x" in args else "dense")
        assert torch.equal(nbr_d2.double(), val[:, :k])
        assert torch.equal(rowmax.double(), dist.max(dim=1).values)
        assert torch.equal(out.double(), dist[:q, q:].float().double())


@pytest.mark.parametrize("prec,dev,tc", [("highest", "sm90", False), ("high", "sm90", True),
                                         ("medium", "sm90", True), ("high", "sm75", False)])
def test_rerank_fp32_distances_follow_matmul_precision(prec, dev, tc):
    """fp32 features: "highest" keeps the distance tiles on the CUDA cores; "high" and "medium" take
    split-bf16 tensor cores (three WMMA products per fragment and 16-wide k step: 8 warps x 2
    fragments x 3 x 2 steps per 32 staged features of each tile) where the device and the build have
    them, not on sm_75. Every setting stays within 1e-4 of the fp64 reference with the same top-10
    rankings up to near ties."""
    e = configure("rerank", dev)
    e.set_fp32_precision(prec)
    n, q, d = 300, 50, 128
    x = torch.nn.functional.normalize(clustered(n, d, 40, seed=7), dim=1)
    out, _ = eo.rerank_features(x.float(), q, 20, 6, 0.3)
    panels = -(-n // 64)
    _, mma = e.counts()
    assert mma == (panels * (panels + 1) // 2 * 8 * 2 * 3 * 2 * -(-d // 32) if tc else 0)
    expected = torch.as_tensor(reference.k_reciprocal_rerank(x, q, 20, 6, 0.3))
    check_rerank(out, expected, 1e-4)
    a = torch.argsort(out.double(), dim=1, stable=True)[:, :10]
    b = torch.argsort(expected, dim=1, stable=True)[:, :10]
    for r, c in zip(*torch.nonzero(a != b, as_tuple=True)):
        assert abs(expected[r, a[r, c]] - expected[r, b[r, c]]) <= 1e-4  # a near tie


def test_rerank_features_compute_each_tile_once():
    """The features path forms each tile of the upper triangle once: the diagonal launch, then one
    launch per round with half the panels' worth of blocks; every tile costs 2 barriers per staged
    16-wide D chunk and 2 more (tile complete, lists fed): T (T + 1) / 2 tiles, not T^2."""
    e = configure("rerank", "sm90")
    n, d, panels = 330, 40, 6
    eo.rerank_neighbors(x=clustered(n, d, 30), num_query=50, k1=20)
    pair_launches = [s for s in e.launches() if "pair_neighbors_kernel" in s]
    assert len(pair_launches) == 1 + (panels - 1), pair_launches
    assert "grid=6,1,1" in pair_launches[0] and all("grid=3,1,1" in s for s in pair_launches[1:])
    barriers, _ = e.counts()
    tiles = panels * (panels + 1) // 2
    assert barriers == tiles * (2 * -(-d // 16) + 2)


def test_rerank_large_k1_uses_global_scratch():
    """k1 = 130: the reciprocal-set and expansion buffers outgrow shared memory (global slices)."""
    configure("rerank", "sm90")
    x = clustered(200, 8, 10, seed=4)
    out, used = eo.rerank_features(x, 30, 130, 6, 0.3)
    assert used > 0
    check_rerank(out, reference.k_reciprocal_rerank(x, 30, 130, 6, 0.3), 1e-5)


def test_rerank_wide_gallery_jaccard_in_global_scratch():
    """A gallery row that does not fit in the device's shared memory (here a device with 16 KB):
    the Jaccard stage keeps it in global scratch."""
    e = configure("rerank", "sm90")
    e.configure(major=9, sms=4, smem_optin=16 * 1024)
    x = clustered(2100, 3, 100, seed=5)
    out, used = eo.rerank_features(x, 40, 3, 1, 0.3)
    assert used >= (2100 - 40) * 8
    check_rerank(out, reference.k_reciprocal_rerank(x, 40, 3, 1, 0.3), 1e-5)
