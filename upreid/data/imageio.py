"""Reading image files with a policy for bad ones.

``on_bad_image="error"`` (default) raises :class:`BadImageError` naming the file; ``"skip"`` drops the
sample and the loaders count it in the epoch summary. The cheap byte-level check (non-empty, a known
image signature, a JPEG that ends with its end-of-image marker) runs before DALI sees the bytes, so a
truncated or non-image file is attributed to its path instead of failing a whole batch.
"""
from __future__ import annotations

import numpy as np

BAD_IMAGE_POLICIES = ("error", "skip")

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"RIFF")


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad image {path!r}: {reason} (pass on_bad_image='skip' to skip such files; "
                         f"they are counted in the epoch summary)")
        self.path, self.reason = path, reason


def check_policy(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    return policy


def read_bytes(path: str) -> np.ndarray:
    """The file's bytes as a uint8 array, checked cheaply; raises BadImageError."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise BadImageError(path, f"cannot be read ({e.strerror or e})") from None
    check_bytes(path, data)
    return data


def check_bytes(path: str, data: np.ndarray) -> None:
    if data.size == 0:
        raise BadImageError(path, "the file is empty")
    head = data[:8].tobytes()
    if not any(head.startswith(s) for s in _SIGNATURES):
        raise BadImageError(path, f"not a JPEG/PNG/BMP/WebP file (starts with {head[:4]!r})")
    if head.startswith(b"\xff\xd8") and data[-2:].tobytes() != b"\xff\xd9":
        # tolerate trailing padding after the end-of-image marker
        tail = data[-64:].tobytes()
        if b"\xff\xd9" not in tail:
            raise BadImageError(path, "truncated JPEG (no end-of-image marker)")


def decode_pil(path: str):
    """Decode to an RGB PIL image (fully loaded); raises BadImageError naming the file."""
    from PIL import Image
    import io

    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:   # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadImageError(path, f"cannot be decoded ({type(e).__name__}: {e})") from None
