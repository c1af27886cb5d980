"""upreid: UP-ReID pre-training, fine-tuning and evaluation for person re-identification.

The fused operators live in :mod:`upreid.ops` (``torch.ops.upreid.*``), the loss modules users import
in :mod:`upreid.losses`.
"""

__version__ = "0.1.0"

from upreid.ops import _lib as _lib  # noqa: F401  (registers torch.ops.upreid.* when built)
