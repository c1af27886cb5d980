"""Choosing k-reciprocal re-ranking's k1 and k2 for a query/gallery split.

Re-ranking (Zhong et al., CVPR 2017) trusts an image's k1 nearest neighbours that also have it among
theirs, and averages each image's neighbourhood over its k2 nearest. Both only help while those
neighbourhoods hold mostly true matches, so they must follow how many images an identity has in the
joint query + gallery set. The published settings k1 = 20, k2 = 6 were chosen on Market1501, where an
identity in the test split has about 22 images; on a split with 8 images per identity, k1 = 20 fills
every neighbourhood with more than half non-matches and re-ranking lowers the mAP.

The rule used here: k1 = the mean number of images per query identity in query + gallery (distractors
and junk excluded), at least 2; k2 = 0.3 k1 rounded, at least 1; lambda stays 0.3. On Market1501 it
gives k1 = 22, k2 = 7, close to the published values.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

K2_RATIO = 0.3


def images_per_identity(query_pids: Sequence[int], gallery_pids: Sequence[int],
                        ignore: Sequence[int] = (0, -1)) -> float:
    """Mean over the query identities of their images in query + gallery (``ignore``: distractor and
    junk identities)."""
    q = np.asarray(query_pids).reshape(-1)
    g = np.asarray(gallery_pids).reshape(-1)
    ids = np.setdiff1d(np.unique(q), np.asarray(ignore))
    if ids.size == 0:
        raise ValueError("images_per_identity: no query identity (all distractors or junk, or empty)")
    both = np.concatenate([q, g])
    return float(np.mean([(both == i).sum() for i in ids]))


def rerank_settings(query_pids: Sequence[int], gallery_pids: Sequence[int], lambda_value: float = 0.3) -> dict:
    """``{"k1", "k2", "lambda_value", "images_per_identity"}`` for this split (see the module's rule)."""
    m = images_per_identity(query_pids, gallery_pids)
    k1 = max(2, int(round(m)))
    return {"k1": k1, "k2": max(1, int(round(K2_RATIO * k1))), "lambda_value": lambda_value,
            "images_per_identity": round(m, 2)}
