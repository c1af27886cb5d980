"""pytest-benchmark entry points for the fused operators (small shapes, CPU by default).

    pytest benchmarks/test_bench_ops.py --benchmark-enable [--benchmark-json out.json]

The shapes and the baselines are those of bench_ops.py, which is the script that records rows in the
results CSV; this file is for quick A/B comparisons with pytest-benchmark's statistics.
"""
import pytest
import torch

from benchmarks.bench_ops import Shape, forward_fn, fwd_bwd_step, make_inputs

SHAPES = [
    Shape("moco", "info_nce", 256, 256, 16384, 128, 1),
    Shape("patch-image", "info_nce", 1024, 1024, 0, 128, 4),
    Shape("bank_kl", "bank_kl", 256, 256, 16384, 128),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
def test_forward_backward(benchmark, shape, impl):
    inputs, leaves = make_inputs(shape, torch.float32, DEVICE)
    fwd_bwd = fwd_bwd_step(forward_fn(shape, impl), inputs, leaves)

    def step():
        fwd_bwd()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = shape.label()
    benchmark(step)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves[:1])
