"""Typed wrappers over ``torch.ops.upreid.*`` with fake kernels and autograd formulas.

Each op has a pure-PyTorch twin in :mod:`upreid.ops.reference`, used when the extension is absent.
"""
from upreid.ops import reference
from upreid.ops._lib import HAS_EXTENSION, built_with_cuda
from upreid.ops.bank_kl import bank_kl
from upreid.ops.info_nce import info_nce

__all__ = ["HAS_EXTENSION", "bank_kl", "built_with_cuda", "info_nce", "reference"]
