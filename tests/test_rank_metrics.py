"""rank_metrics (sort-free) against the sort-based reference."""
import pytest
import torch

from upreid.ops import HAS_EXTENSION
from upreid.ops import reference_eval as ref
from upreid.ops.rank import rank_metrics

from conftest import CUDA_OK

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")


def labels(q, g, ids, cams):
    return (torch.randint(0, ids, (q,)), torch.randint(0, ids, (g,)), torch.randint(0, cams, (q,)),
            torch.randint(0, cams, (g,)))


def assert_same(out, expected):
    cmc, ap, inp, valid = out
    ecmc, eap, einp, evalid = expected
    assert torch.equal(valid, evalid)
    assert cmc.dtype == ap.dtype == inp.dtype == torch.float32 and valid.dtype == torch.bool
    # Ranks are integers: AP and INP agree to float rounding, CMC exactly.
    torch.testing.assert_close(cmc, ecmc, atol=0, rtol=0)
    torch.testing.assert_close(ap, eap, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inp, einp, atol=1e-6, rtol=1e-6)


# (Q, G, ids, cams, max_rank): few positives (counting path), many (> 64, binary search), about 50
# (either side of the switch), one gallery item, more identities than the gallery holds (queries
# without positives), a gallery spanning several 2048-wide counting blocks.
CASES = [(50, 300, 20, 3, 10), (40, 2000, 3, 2, 50), (7, 1, 3, 2, 5), (30, 100, 200, 2, 20),
         (64, 500, 40, 6, 100), (30, 300, 3, 2, 50), (20, 5000, 300, 3, 50)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q,g,ids,cams,max_rank", CASES)
def test_matches_reference(q, g, ids, cams, max_rank, dtype):
    d = torch.rand(q, g, dtype=torch.float64).to(dtype)
    args = (d, *labels(q, g, ids, cams), max_rank)
    assert_same(rank_metrics(*args), ref.rank_metrics(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_break_by_gallery_index(dtype):
    # Coarse distances: most comparisons are ties, decided by index as in a stable sort.
    q, g = 40, 400
    d = (torch.randint(0, 5, (q, g)).to(dtype)) / 4
    d[0] = 0.0
    d[1, ::2] = -0.0  # -0 and +0 are equal distances
    args = (d, *labels(q, g, 15, 3), 30)
    out = rank_metrics(*args)
    assert_same(out, ref.rank_metrics(*args))


def test_worst_case_negatives_before_the_positives():
    """Positives shifted down (the benchmark's worst case): most negatives precede the last
    positive, so every count is exercised, with ties at block edges."""
    q, g = 25, 4500
    qp, gp, qc, gc = labels(q, g, 200, 6)
    d = torch.rand(q, g)
    d = torch.where(qp[:, None] == gp[None, :], d - 0.3, d)
    d[:, 2040:2060] = d[:, 2040:2041]  # ties across the first counting block's edge
    args = (d, qp, gp, qc, gc, 50)
    assert_same(rank_metrics(*args), ref.rank_metrics(*args))


def test_hand_computed_example():
    # Query pid 1 cam 0. Gallery by distance: g0 (pid 1 cam 0, removed), g1 (pid 2), g2 (pid 1
    # cam 1, positive at rank 1), g3 (pid 3), g4 (pid 1 cam 2, positive at rank 3).
    d = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]])
    qp, gp = torch.tensor([1]), torch.tensor([1, 2, 1, 3, 1])
    qc, gc = torch.tensor([0]), torch.tensor([0, 0, 1, 0, 2])
    cmc, ap, inp, valid = rank_metrics(d, qp, gp, qc, gc, 4)
    assert valid.tolist() == [True]
    torch.testing.assert_close(cmc, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(ap, torch.tensor([(1 / 2 + 2 / 4) / 2]))
    torch.testing.assert_close(inp, torch.tensor([2 / 4]))


def test_queries_without_positives_and_all_removed_rows():
    d = torch.rand(3, 4)
    qp, gp = torch.tensor([5, 7, 9]), torch.tensor([5, 5, 7, 8])
    qc, gc = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 2, 1])
    # q0: both pid-5 items share its camera (all removed); q2: pid absent; q1: one positive.
    out = rank_metrics(d, qp, gp, qc, gc, 3)
    assert out[3].tolist() == [False, True, False]
    assert out[1][0] == 0 and out[2][2] == 0
    assert_same(out, ref.rank_metrics(d, qp, gp, qc, gc, 3))


def test_no_valid_query_gives_zero_cmc():
    cmc, ap, inp, valid = rank_metrics(torch.rand(2, 3), torch.tensor([1, 2]), torch.tensor([3, 4, 5]),
                                       torch.tensor([0, 0]), torch.tensor([1, 1, 1]), 5)
    assert not valid.any() and torch.equal(cmc, torch.zeros(5))


def test_max_rank_beyond_gallery_and_empty_queries():
    args = (torch.rand(6, 3), *labels(6, 3, 2, 3), 10)
    out = rank_metrics(*args)
    assert out[0].shape == (10,)
    assert_same(out, ref.rank_metrics(*args))
    cmc, ap, inp, valid = rank_metrics(torch.rand(0, 5), *labels(0, 5, 2, 2), 4)
    assert ap.shape == (0,) and torch.equal(cmc, torch.zeros(4))


def test_non_contiguous_and_int32_labels():
    d = torch.rand(80, 30)
    qp, gp, qc, gc = labels(30, 80, 10, 3)
    dt = d.t()
    assert not dt.is_contiguous()
    out = rank_metrics(dt, qp.int(), gp.int(), qc.int(), gc.int(), 10)
    assert_same(out, ref.rank_metrics(dt.contiguous(), qp, gp, qc, gc, 10))


def test_bad_arguments_name_the_argument():
    d = torch.rand(4, 6)
    qp, gp, qc, gc = labels(4, 6, 3, 2)
    with pytest.raises(RuntimeError, match="'g_pids' has 5 entries"):
        rank_metrics(d, qp, gp[:5], qc, gc, 5)
    with pytest.raises(RuntimeError, match="'q_camids' has 3 entries"):
        rank_metrics(d, qp, gp, qc[:3], gc, 5)
    with pytest.raises(RuntimeError, match="'max_rank'"):
        rank_metrics(d, qp, gp, qc, gc, 0)
    with pytest.raises(RuntimeError, match="gallery is empty"):
        rank_metrics(torch.rand(4, 0), qp, gp[:0], qc, gc[:0], 5)
    with pytest.raises(RuntimeError, match="'q_pids' must be an integer"):
        rank_metrics(d, qp.float(), gp, qc, gc, 5)
    with pytest.raises(RuntimeError, match="'distmat' must be 2-D"):
        rank_metrics(d[0], qp, gp, qc, gc, 5)
    for bad in (float("nan"), float("inf")):
        e = d.clone()
        e[2, 3] = bad
        with pytest.raises(RuntimeError, match="'distmat' contains NaN or Inf"):
            rank_metrics(e, qp, gp, qc, gc, 5)


def test_opcheck():
    args = (torch.rand(5, 12), *labels(5, 12, 3, 2), 6)
    torch.library.opcheck(torch.ops.upreid.rank_metrics.default, args)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("q,g,ids,cams,max_rank", CASES)
def test_cuda_matches_reference(q, g, ids, cams, max_rank, dtype):
    d = (torch.randint(0, 50, (q, g)).double() / 50).to(dtype)  # with ties
    lab = labels(q, g, ids, cams)
    out = rank_metrics(d.cuda(), *[t.cuda() for t in lab], max_rank)
    assert_same(tuple(t.cpu() for t in out), ref.rank_metrics(d, *lab, max_rank))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_cuda_uses_the_cuda_kernel_and_agrees_with_cpu():
    import warnings

    assert torch._C._dispatch_has_kernel_for_dispatch_key("upreid::rank_metrics", "CUDA")
    q, g = 200, 3000
    d = torch.rand(q, g)
    d[:, ::7] = d[:, 3:4]  # exact ties, decided by gallery index
    d[0, ::2] = -0.0
    lab = labels(q, g, 30, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU round trip warns; the kernel must not
        out = rank_metrics(d.cuda(), *[t.cuda() for t in lab], 60)
    assert all(t.is_cuda for t in out)
    assert_same(tuple(t.cpu() for t in out), rank_metrics(d, *lab, 60))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_many_positives_global_scratch(dtype):
    # More than 2048 positives per query: the positives no longer fit in shared memory.
    q, g = 9, 6000
    d = torch.rand(q, g, dtype=torch.float64).to(dtype)
    qp, gp = torch.zeros(q, dtype=torch.long), torch.randint(0, 2, (g,))
    gp[:3000] = 0
    qc, gc = torch.arange(q) % 3, torch.randint(0, 3, (g,))
    qp[4] = 1
    args = (d, qp, gp, qc, gc, 50)
    out = rank_metrics(*[t.cuda() if torch.is_tensor(t) else t for t in args])
    assert_same(tuple(t.cpu() for t in out), ref.rank_metrics(*args))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_cuda_non_finite_and_empty():
    d = torch.rand(4, 6, device="cuda")
    d[1, 2] = float("nan")
    lab = [t.cuda() for t in labels(4, 6, 3, 2)]
    with pytest.raises(RuntimeError, match="'distmat' contains NaN or Inf"):
        rank_metrics(d, *lab, 5)
    cmc, ap, inp, valid = rank_metrics(torch.rand(0, 5, device="cuda"),
                                       *[t.cuda() for t in labels(0, 5, 2, 2)], 4)
    assert ap.shape == (0,) and torch.equal(cmc.cpu(), torch.zeros(4))
