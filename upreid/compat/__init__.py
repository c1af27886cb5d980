"""Drop-in replacements for the evaluation functions of other ReID libraries, backed by upreid's
operators: same names, argument lists, defaults and return values.

* :mod:`upreid.compat.fastreid`: ``evaluate_rank`` (fast-reid 1.4, ``fastreid.evaluation.rank``).
* :mod:`upreid.compat.torchreid`: ``evaluate_rank`` and ``re_ranking`` (torchreid 0.2.5,
  ``torchreid.reid.metrics.rank`` and ``torchreid.reid.utils.rerank``).

Swap one import line::

    # from fastreid.evaluation.rank import evaluate_rank
    from upreid.compat.fastreid import evaluate_rank
"""
