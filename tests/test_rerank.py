"""k_reciprocal_rerank against the NumPy transcription of the original algorithm."""
import numpy as np
import pytest
import torch

from upreid.ops import HAS_EXTENSION
from upreid.ops import reference_eval as ref
from upreid.ops.rerank import k_reciprocal_rerank, k_reciprocal_rerank_dense

from conftest import CUDA_OK, devices
from memprobe import heap_counter, run_probe  # noqa: F401  (heap_counter: a fixture)

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")


def clustered(n, d, ids, spread=0.6, dtype=torch.float64, grid=None):
    """Continuous features around `ids` identity centres; `grid` snaps them to multiples of 1/grid
    (every distance then exact in fp32 and fp64, so exact ties are reproducible)."""
    x = torch.randn(ids, d, dtype=torch.float64)[torch.randint(0, ids, (n,))]
    x = x + spread * torch.randn(n, d, dtype=torch.float64)
    if grid:
        x = torch.round(x * grid) / grid
    return x.to(dtype)


def assert_rankings_match(out, expected, k=10, tie_tol=0.0):
    """Identical top-k rows (stable order). Where they differ, the two columns must be within
    `tie_tol` of each other in the reference (a near tie), never more."""
    out, expected = out.double().cpu(), expected.double().cpu()
    k = min(k, out.shape[1])
    a = torch.argsort(out, dim=1, stable=True)[:, :k]
    b = torch.argsort(expected, dim=1, stable=True)[:, :k]
    rows, cols = torch.nonzero(a != b, as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist()):
        gap = abs(expected[r, a[r, c]] - expected[r, b[r, c]]).item()
        assert gap <= tie_tol, f"row {r} rank {c}: {a[r].tolist()} vs {b[r].tolist()} (gap {gap:.3g})"


def check(out, expected, atol=1e-4, tie_tol=0.0):
    assert out.dtype == torch.float32 and out.shape == expected.shape
    err = (out.double().cpu() - expected).abs().max().item()
    assert err <= atol, f"max error {err:.3g}"
    assert_rankings_match(out, expected, tie_tol=tie_tol)


# (N, num_query, D, k1, k2): tiny (N < k1), k1 = k2 = 1, odd k1 (half-to-even rounding of k1 / 2),
# k2 = k1 + 1, then a few thousand.
SIZES = [(8, 3, 4, 20, 6), (12, 5, 3, 1, 1), (40, 7, 5, 3, 2), (60, 9, 6, 5, 6), (90, 20, 8, 7, 1),
         (300, 61, 16, 20, 6), (2000, 400, 24, 20, 6)]


@pytest.mark.parametrize("n,q,d,k1,k2", SIZES)
def test_features_match_reference_fp64(n, q, d, k1, k2):
    x = clustered(n, d, max(2, n // 8))
    check(k_reciprocal_rerank(x, q, k1, k2, 0.3), ref.k_reciprocal_rerank(x, q, k1, k2, 0.3))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_features_match_reference_fp32_lambda(lam):
    x = clustered(500, 32, 60, dtype=torch.float32)
    check(k_reciprocal_rerank(x, 100, 20, 6, lam), ref.k_reciprocal_rerank(x, 100, 20, 6, lam),
          tie_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicates_and_exact_ties(dtype):
    # Distractor-like duplicates: many exact copies (more than k1 + 1 of one image) and features on
    # a grid, so equal distances are exactly equal in both implementations and the order by index
    # decides.
    x = clustered(400, 8, 40, grid=4, dtype=dtype)
    x[150:180] = x[150]  # 30 copies of one gallery image
    x[5] = x[200]  # a query duplicated in the gallery
    x[300:310] = x[20]  # gallery copies of a query
    out, expected = k_reciprocal_rerank(x, 60, 20, 6, 0.3), ref.k_reciprocal_rerank(x, 60, 20, 6, 0.3)
    check(out, expected)
    # Copies of one gallery image are indistinguishable: equal final distances.
    assert torch.equal(out[:, 150 - 60:180 - 60], out[:, 150 - 60:151 - 60].expand(-1, 30))


@pytest.mark.parametrize("seed", range(6))
def test_duplicates_of_continuous_features(seed):
    """Exact copies of unit-norm features off any grid (as a gallery holding the same crop twice): the
    copies are exactly 0 apart in the operator and in the reference alike, so their neighbour order and
    the final distances agree."""
    torch.manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(30, 512), dim=1)
    f = torch.cat([x[:8], x[:8], x])
    check(k_reciprocal_rerank(f, 8, 6, 3, 0.3), ref.k_reciprocal_rerank(f, 8, 6, 3, 0.3))


def test_all_identical_features():
    # Every distance 0: the original divides 0 by 0; upreid treats a zero row maximum as 1.
    x = torch.ones(30, 4)
    out = k_reciprocal_rerank(x, 10, 20, 6, 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.k_reciprocal_rerank(x, 10, 20, 6, 0.3), atol=1e-6,
                               rtol=0)


def test_dense_path_matches_features_and_reference():
    x = clustered(250, 12, 30)
    q = 50
    qg = torch.from_numpy(ref.euclidean_distances(x[:q], x[q:]))
    qq = torch.from_numpy(ref.euclidean_distances(x[:q], x[:q], True))
    gg = torch.from_numpy(ref.euclidean_distances(x[q:], x[q:], True))
    dense = k_reciprocal_rerank_dense(qg, qq, gg, 20, 6, 0.3)
    check(dense, ref.k_reciprocal_rerank_dense(qg, qq, gg, 20, 6, 0.3))
    torch.testing.assert_close(dense, k_reciprocal_rerank(x, q, 20, 6, 0.3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed, k1, k2", [(0, 6, 3), (1, 20, 6), (2, 20, 6), (3, 12, 4), (4, 20, 1)])
def test_dense_path_non_symmetric_inputs(seed, k1, k2):
    # The original reads row i of its normalised matrix from column i (it normalises columns and
    # transposes); with non-symmetric q_q / g_g that differs from a row reading, and a pair (i, j)
    # missing from i's neighbour list must not be read from j's list.
    torch.manual_seed(seed)
    q, g = 20, 70
    qg, qq, gg = torch.rand(q, g, dtype=torch.float64), torch.rand(q, q, dtype=torch.float64), \
        torch.rand(g, g, dtype=torch.float64)
    qq.fill_diagonal_(0)
    gg.fill_diagonal_(0)
    check(k_reciprocal_rerank_dense(qg, qq, gg, k1, k2, 0.3),
          ref.k_reciprocal_rerank_dense(qg, qq, gg, k1, k2, 0.3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_equal_fp32_of_same_values(dtype):
    x = clustered(200, 16, 25, dtype=dtype)
    out = k_reciprocal_rerank(x, 40)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, k_reciprocal_rerank(x.float(), 40), atol=0, rtol=0)


def test_non_contiguous_features():
    x = clustered(150, 10, 20)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    torch.testing.assert_close(k_reciprocal_rerank(xt, 30), k_reciprocal_rerank(x, 30), atol=0, rtol=0)


def test_reference_impl_flag_matches():
    x = clustered(80, 6, 10)
    check(k_reciprocal_rerank(x, 20, impl="reference"), ref.k_reciprocal_rerank(x, 20))


BAD = [
    (dict(num_query=0), "num_query"),
    (dict(num_query=50), "num_query"),  # empty gallery
    (dict(num_query=-3), "num_query"),
    (dict(k1=0), "k1"),
    (dict(k2=22), "k2"),
    (dict(k2=0), "k2"),
    (dict(lambda_value=1.5), "lambda_value"),
    (dict(lambda_value=-0.1), "lambda_value"),
    (dict(lambda_value=float("nan")), "lambda_value"),
]


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("kwargs,name", BAD)
def test_bad_arguments_name_the_argument(kwargs, name, impl):
    args = dict(num_query=10, k1=20, k2=6, lambda_value=0.3) | kwargs
    with pytest.raises((RuntimeError, ValueError), match=name):
        k_reciprocal_rerank(torch.randn(50, 8), impl=impl, **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_and_distances(bad):
    x = torch.randn(30, 4)
    x[7, 2] = bad
    with pytest.raises(RuntimeError, match="'features' contains NaN or Inf"):
        k_reciprocal_rerank(x, 10)
    for name in ("q_g", "q_q", "g_g"):          # the message names the input that holds it, alone
        d = {"q_g": torch.rand(5, 9), "q_q": torch.rand(5, 5), "g_g": torch.rand(9, 9)}
        d[name][3, 4] = bad
        for impl in ("fused", "reference"):
            with pytest.raises((RuntimeError, ValueError)) as e:
                k_reciprocal_rerank_dense(d["q_g"], d["q_q"], d["g_g"], impl=impl)
            assert f"'{name}' contains NaN or Inf" in str(e.value), (impl, str(e.value))
            assert sum(f"'{other}'" in str(e.value) for other in d) == 1, str(e.value)


def test_dense_mismatched_shapes_and_empty_gallery():
    with pytest.raises(RuntimeError, match="'q_q'"):
        k_reciprocal_rerank_dense(torch.rand(5, 9), torch.rand(4, 4), torch.rand(9, 9))
    with pytest.raises(RuntimeError, match="'g_g'"):
        k_reciprocal_rerank_dense(torch.rand(5, 9), torch.rand(5, 5), torch.rand(8, 9))
    with pytest.raises(RuntimeError, match="gallery is empty"):
        k_reciprocal_rerank_dense(torch.rand(5, 0), torch.rand(5, 5), torch.rand(0, 0))
    with pytest.raises(RuntimeError, match="'features' must be 2-D"):
        k_reciprocal_rerank(torch.rand(5), 2)
    with pytest.raises(RuntimeError, match="'features' must be a floating"):
        k_reciprocal_rerank(torch.ones(5, 3, dtype=torch.long), 2)


def test_opcheck():
    x = clustered(40, 6, 8, dtype=torch.float32)
    torch.library.opcheck(torch.ops.upreid.k_reciprocal_rerank.default, (x, 10, 5, 3, 0.3))
    qg, qq, gg = torch.rand(6, 20), torch.rand(6, 6), torch.rand(20, 20)
    torch.library.opcheck(torch.ops.upreid.k_reciprocal_rerank_dense.default, (qg, qq, gg, 5, 3, 0.3))


PROBE = """
    from upreid.ops.rerank import k_reciprocal_rerank
    n, q, d = map(int, sys.argv[1:4])
    torch.manual_seed(0)
    x = torch.randn(n, d)
    k_reciprocal_rerank(x[:300], 50)  # warm-up: thread pool, BLAS buffers
    out = []
    op = heap_peak(lambda: out.append(k_reciprocal_rerank(x, q)))
    n_by_n = heap_peak(lambda: out.append(torch.cdist(x, x)))  # calibration: one N x N result
    print(json.dumps({"op": op, "n_by_n": n_by_n}))
"""


def test_features_path_peak_memory_is_far_below_n_squared(heap_counter):
    # Q small against N: the [Q, G] output stays small and the N x N matrix stands out.
    n, q, d = 10000, 500, 32
    peak = run_probe(heap_counter, PROBE, n, q, d)
    dense = n * n * 4  # one fp32 N x N matrix (381 MiB); the original holds several
    output = q * (n - q) * 4  # 18 MiB
    assert peak["n_by_n"] >= dense, f"the counter missed an N x N matrix: {peak['n_by_n']} bytes"
    assert peak["op"] >= output, f"the counter missed the [Q, G] output: {peak['op']} bytes"
    # Output + one [1024, 4096] tile + neighbour lists and sparse rows (about 48 MiB in all at two
    # threads) against output + N x N / 4 = 114 MiB, and over 400 MiB for any N x N intermediate.
    assert peak["op"] < output + dense // 4, \
        f"peak {peak['op'] / 2**20:.1f} MiB, N x N = {dense / 2**20:.1f} MiB"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    x = clustered(1500, 32, 150, dtype=dtype)
    cpu = k_reciprocal_rerank(x, 300)
    gpu = k_reciprocal_rerank(x.cuda(), 300).cpu()
    check(gpu, ref.k_reciprocal_rerank(x, 300) if dtype == torch.float64 else cpu.double(),
          tie_tol=1e-5)
    qg = torch.from_numpy(ref.euclidean_distances(x[:300], x[300:])).to(dtype)
    qq = torch.from_numpy(ref.euclidean_distances(x[:300], x[:300], True)).to(dtype)
    gg = torch.from_numpy(ref.euclidean_distances(x[300:], x[300:], True)).to(dtype)
    torch.testing.assert_close(k_reciprocal_rerank_dense(qg.cuda(), qq.cuda(), gg.cuda()).cpu(),
                               k_reciprocal_rerank_dense(qg, qq, gg), atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
@pytest.mark.parametrize("n,q,d,k1,k2", SIZES)
def test_cuda_kernel_matches_reference_fp64(n, q, d, k1, k2):
    import warnings

    assert torch._C._dispatch_has_kernel_for_dispatch_key("upreid::k_reciprocal_rerank", "CUDA")
    x = clustered(n, d, max(2, n // 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU round trip warns; the kernel must not
        out = k_reciprocal_rerank(x.cuda(), q, k1, k2, 0.3)
    assert out.is_cuda
    check(out, ref.k_reciprocal_rerank(x, q, k1, k2, 0.3))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_duplicates_and_exact_ties(dtype):
    # Grid features: every distance exact on both devices, so ties are decided by index alone.
    x = clustered(400, 8, 40, grid=4, dtype=dtype)
    x[150:180] = x[150]
    x[5] = x[200]
    x[300:310] = x[20]
    out = k_reciprocal_rerank(x.cuda(), 60, 20, 6, 0.3).cpu()
    check(out, ref.k_reciprocal_rerank(x, 60, 20, 6, 0.3))
    torch.testing.assert_close(out, k_reciprocal_rerank(x, 60, 20, 6, 0.3), atol=1e-6, rtol=0)
    assert torch.equal(out[:, 150 - 60:180 - 60], out[:, 150 - 60:151 - 60].expand(-1, 30))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_cuda_large_k1_uses_global_scratch():
    # k1 = 150: the per-row candidate buffers exceed shared memory (global per-block slices).
    x = clustered(700, 12, 20)
    check(k_reciprocal_rerank(x.cuda(), 120, 150, 40, 0.3), ref.k_reciprocal_rerank(x, 120, 150, 40, 0.3))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_cuda_dense_path_matches_reference_and_features():
    x = clustered(250, 12, 30)
    q = 50
    qg = torch.from_numpy(ref.euclidean_distances(x[:q], x[q:]))
    qq = torch.from_numpy(ref.euclidean_distances(x[:q], x[:q], True))
    gg = torch.from_numpy(ref.euclidean_distances(x[q:], x[q:], True))
    dense = k_reciprocal_rerank_dense(qg.cuda(), qq.cuda(), gg.cuda(), 20, 6, 0.3)
    check(dense, ref.k_reciprocal_rerank_dense(qg, qq, gg, 20, 6, 0.3))
    torch.testing.assert_close(dense.cpu(), k_reciprocal_rerank(x, q, 20, 6, 0.3), atol=1e-5, rtol=0)
    # Non-symmetric inputs: row i reads column i of the original's matrix.
    qg, qq, gg = torch.rand(20, 70, dtype=torch.float64), torch.rand(20, 20, dtype=torch.float64), \
        torch.rand(70, 70, dtype=torch.float64)
    qq.fill_diagonal_(0)
    gg.fill_diagonal_(0)
    for k1, k2 in [(6, 3), (20, 6)]:
        check(k_reciprocal_rerank_dense(qg.cuda(), qq.cuda(), gg.cuda(), k1, k2, 0.3),
              ref.k_reciprocal_rerank_dense(qg, qq, gg, k1, k2, 0.3))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_cuda_low_precision_non_finite_and_wide_gallery():
    x = clustered(200, 16, 25, dtype=torch.float16).cuda()
    torch.testing.assert_close(k_reciprocal_rerank(x, 40), k_reciprocal_rerank(x.float(), 40),
                               atol=0, rtol=0)
    bad = torch.randn(30, 4, device="cuda")
    bad[7, 2] = float("nan")
    with pytest.raises(RuntimeError, match="'features' contains NaN or Inf"):
        k_reciprocal_rerank(bad, 10)
    # G = 32,000 in fp64: the per-query Jaccard accumulator no longer fits in shared memory.
    x = clustered(32200, 4, 3000, dtype=torch.float64)
    gpu = k_reciprocal_rerank(x.cuda(), 200, 20, 6, 0.3).cpu()
    cpu = k_reciprocal_rerank(x, 200, 20, 6, 0.3)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)


def test_features_far_from_the_origin_rank_as_centred_ones():
    """Distances ignore a common offset; the fp32 |x|^2 + |y|^2 - 2xy form does not, unless the
    features are centred first (an offset of 1000 moved results by 0.3 and changed top-10 lists)."""
    x = clustered(120, 8, 15, dtype=torch.float32)
    check(k_reciprocal_rerank(x + 1000, 30, 10, 3), ref.k_reciprocal_rerank(x.double() + 1000, 30, 10, 3),
          tie_tol=1e-5)


def test_finite_features_too_large_for_fp32_distances_are_named():
    x = clustered(40, 8, 6, dtype=torch.float32) * 1e20
    with pytest.raises(RuntimeError, match="too large for fp32 distances"):
        k_reciprocal_rerank(x, 10)
