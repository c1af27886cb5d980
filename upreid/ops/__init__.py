"""Typed wrappers over ``torch.ops.upreid.*`` with fake kernels and autograd formulas.

Each op has a pure-PyTorch twin in :mod:`upreid.ops.reference`, used when the extension is absent.
"""
from upreid.ops import _dispatch, reference
from upreid.ops._lib import HAS_EXTENSION, built_with_cuda
from upreid.ops.bank_kl import bank_kl
from upreid.ops.info_nce import info_nce
from upreid.ops.rank import rank_metrics
from upreid.ops.rerank import k_reciprocal_rerank, k_reciprocal_rerank_dense

if HAS_EXTENSION:
    _dispatch.register_autocast_policies()

__all__ = [
    "HAS_EXTENSION", "bank_kl", "built_with_cuda", "info_nce", "k_reciprocal_rerank",
    "k_reciprocal_rerank_dense", "rank_metrics", "reference",
]
