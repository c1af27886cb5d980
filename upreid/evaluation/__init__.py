"""Evaluation: distances, exact k-reciprocal re-ranking and the ReID ranking metrics.

:func:`evaluate` is the entry point; ``upreid evaluate FEATURES.npz`` (:mod:`upreid.evaluation.cli`)
runs it on features saved by any tool.
"""
from upreid.evaluation.metrics import evaluate, format_table, pairwise_distance

__all__ = ["evaluate", "format_table", "pairwise_distance"]
