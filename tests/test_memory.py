"""Memory is part of the contract: the fused ops never hold the [M x (N + K)] logits."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from upreid.ops import HAS_EXTENSION
from upreid.utils.memory import cpu_peak_supported

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="upreid._C is not built")

PROBE = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    from upreid.ops import bank_kl, info_nce
    from upreid.utils.memory import peak_bytes
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
    print(json.dumps(peak_bytes(run, device)))
""")


def peak(op, impl, device, m, n, k, d):
    out = subprocess.run([sys.executable, "-c", PROBE, op, impl, device, str(m), str(n), str(k), str(d)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("op", ["info_nce", "bank_kl"])
def test_cpu_fused_peak_is_a_tenth_of_reference(op):
    m, n, k, d = 512, 512, 65536, 128
    fused = peak(op, "fused", "cpu", m, n, k, d)
    ref = peak(op, "reference", "cpu", m, n, k, d)
    logits = m * k * 4
    assert ref > logits, f"reference peak {ref} should exceed the logits size {logits}"
    assert fused * 10 < ref, f"fused peak {fused / 2**20:.1f} MiB vs reference {ref / 2**20:.1f} MiB"


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["info_nce", "bank_kl"])
def test_cuda_fused_peak_is_linear_in_rows(op):
    m, n, k, d = 4096, 4096, 65536, 128
    fused = peak(op, "fused", "cuda", m, n, k, d)
    # Outputs, gradients and per-row statistics: a few [M, D] and [M] tensors, never [M, K].
    assert fused < 16 * m * d * 4 + (8 << 20), f"fused CUDA peak {fused / 2**20:.1f} MiB"
