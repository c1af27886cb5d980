"""Memory is part of the contract: the fused ops never hold the [M x (N + K)] logits."""
import pytest

from memprobe import heap_counter, run_probe  # noqa: F401  (heap_counter: a fixture)
from upreid.ops import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")

# CPU: the heap counter's peak (every allocation of the op); CUDA: the caching allocator's.
PROBE = """
    import torch.nn.functional as F
    from upreid.ops import bank_kl, info_nce
    from upreid.utils.memory import cuda_peak_bytes
    op, impl, device, M, N, K, D = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
    torch.manual_seed(0)
    feats = lambda n: F.normalize(torch.randn(n, D, device=device), dim=-1)
    q, keys, bank = feats(M).requires_grad_(), feats(N).requires_grad_(), feats(K)
    pos = torch.arange(M, device=device) % N
    def run():
        q.grad = keys.grad = None
        if op == "info_nce":
            loss, _ = info_nce(q, keys, pos, bank, 0.1, 1, impl=impl)
        else:
            loss, _, _ = bank_kl(q, keys[:M].detach(), bank, 0.1, 0.1, impl=impl)
        loss.mean().backward()
    run()  # warm-up: one-time allocations of the runtime, BLAS and autograd
    print(json.dumps(cuda_peak_bytes(run, device) if device == "cuda" else heap_peak(run)))
"""


@pytest.mark.parametrize("op", ["info_nce", "bank_kl"])
def test_cpu_fused_peak_is_a_tenth_of_reference(op, heap_counter):
    m, n, k, d = 512, 512, 65536, 128
    fused = run_probe(heap_counter, PROBE, op, "fused", "cpu", m, n, k, d)
    ref = run_probe(heap_counter, PROBE, op, "reference", "cpu", m, n, k, d)
    logits = m * k * 4
    assert ref > logits, f"reference peak {ref} should exceed the logits size {logits}"
    assert fused * 10 < ref, f"fused peak {fused / 2**20:.1f} MiB vs reference {ref / 2**20:.1f} MiB"


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["info_nce", "bank_kl"])
def test_cuda_fused_peak_is_linear_in_rows(op):
    m, n, k, d = 4096, 4096, 65536, 128
    fused = run_probe(None, PROBE, op, "fused", "cuda", m, n, k, d)
    # Outputs, gradients and per-row statistics: a few [M, D] and [M] tensors, never [M, K].
    assert fused < 16 * m * d * 4 + (8 << 20), f"fused CUDA peak {fused / 2**20:.1f} MiB"


COUNTER_PROBE = """
    import numpy as np
    mib = 1 << 20
    one = heap_peak(lambda: torch.empty(mib // 4))  # ATen: posix_memalign, freed at once
    two = heap_peak(lambda: (np.ones(mib // 8), np.ones(mib // 8)))  # malloc, both alive
    seq = heap_peak(lambda: [torch.empty(mib // 4).sum() for _ in range(8)])  # one alive at a time
    print(json.dumps([one, two, seq]))
"""


def test_heap_counter_measures_live_bytes(heap_counter):
    mib = 1 << 20
    one, two, seq = run_probe(heap_counter, COUNTER_PROBE)
    slack = 64 << 10  # block headers and small Python objects
    assert mib <= one < mib + slack, one
    assert 2 * mib <= two < 2 * mib + slack, two
    assert mib <= seq < mib + slack, seq  # frees are counted: eight blocks in turn peak at one


def test_heap_peak_without_the_counter_names_it():
    with pytest.raises(AssertionError, match="heap_peak needs malloc_count preloaded"):
        run_probe(None, "heap_peak(lambda: None)")
