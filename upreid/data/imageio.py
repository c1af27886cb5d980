"""Reading image files with a policy for bad ones.

``on_bad_image="error"`` (default) raises :class:`BadImageError` naming the file; ``"skip"`` drops the
sample and the loaders count it in the epoch summary. The cheap structural check (non-empty, a known
image signature, the header of its format: a JPEG's frame of non-zero size, its scan and its end
marker; a PNG's IHDR, the CRCs of its critical chunks and its IEND; a BMP's header; WebP inside a
RIFF file) runs in both backends before decoding, so they accept the same files and a truncated or
malformed file is attributed to its path instead of failing a whole DALI batch. The fallback applies the EXIF orientation and scales 16-bit
grey PNGs to 8 bits, as DALI does.
"""
from __future__ import annotations

import zlib

import numpy as np

BAD_IMAGE_POLICIES = ("error", "skip")



class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded."""

    def __init__(self, path: str, reason: str, hint: str | None = None):
        super().__init__(f"bad image {path!r}: {reason} ("
                         + (hint or "pass on_bad_image='skip' to skip such files; they are counted in the epoch "
                            "summary") + ")")
        self.path, self.reason, self.hint = path, reason, hint

    def cli_message(self, hint: str) -> str:
        """The message with a command line's own way to skip such files (``hint``) in place of the
        Python argument's (an error raised with a hint of its own keeps it)."""
        return f"bad image {self.path!r}: {self.reason} ({self.hint or hint})"


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
    """The cheap structural check both backends run before decoding (so that they accept and refuse
    the same files, and DALI never sees a file it would fail a whole batch on)."""
    if data.size == 0:
        raise BadImageError(path, "the file is empty")
    b = data.tobytes()
    if b.startswith(b"\xff\xd8\xff"):
        _check_jpeg(path, b)
    elif b.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png(path, b)
    elif b.startswith(b"BM"):
        _check_bmp(path, b)
    elif b.startswith(b"RIFF"):
        if b[8:12] != b"WEBP":
            raise BadImageError(path, f"a RIFF file that is not WebP (type {b[8:12]!r})")
    else:
        raise BadImageError(path, f"not a JPEG/PNG/BMP/WebP file (starts with {b[:4]!r})")


def _check_jpeg(path: str, b: bytes) -> None:
    """Walk the marker segments up to the scan: a frame header (SOF) of non-zero size, a scan (SOS),
    and an end-of-image marker after it (bytes after that marker are allowed, as decoders ignore them)."""
    i, size = 2, None
    while True:
        while i < len(b) and b[i] == 0xFF and i + 1 < len(b) and b[i + 1] == 0xFF:
            i += 1                                           # fill bytes
        if i + 2 > len(b) or b[i] != 0xFF:
            raise BadImageError(path, "truncated or malformed JPEG (its header ends before the image data)")
        marker = b[i + 1]
        if marker == 0xD9:
            raise BadImageError(path, "a JPEG header without image data (no start-of-scan marker)")
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if i + 4 > len(b):
            raise BadImageError(path, "truncated or malformed JPEG (its header ends before the image data)")
        length = int.from_bytes(b[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(b):
                raise BadImageError(path, "truncated JPEG frame header")
            size = (int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big"))
            if 0 in size:
                raise BadImageError(path, f"a JPEG frame of zero size ({size[0]} x {size[1]})")
        if marker == 0xDA:
            if size is None:
                raise BadImageError(path, "a JPEG scan without a frame header (no SOF marker)")
            if b.find(b"\xff\xd9", i + 2 + length) < 0:
                raise BadImageError(path, "truncated JPEG (no end-of-image marker after the image data)")
            return
        i += 2 + length


def _check_png(path: str, b: bytes) -> None:
    if len(b) < 33 or b[12:16] != b"IHDR":
        raise BadImageError(path, "truncated or malformed PNG (no IHDR header)")
    w, h = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
    if w == 0 or h == 0:
        raise BadImageError(path, f"a PNG of zero size ({h} x {w})")
    if b"IEND" not in b[-12:]:
        raise BadImageError(path, "truncated PNG (no IEND chunk at the end)")
    # The critical chunks' CRCs: DALI's decoder (libpng) refuses a file whose IDAT CRC is wrong while
    # Pillow decodes it; checked here, both backends refuse it.
    i = 8
    while i + 12 <= len(b):
        n, kind = int.from_bytes(b[i:i + 4], "big"), b[i + 4:i + 8]
        if i + 12 + n > len(b):
            raise BadImageError(path, f"truncated PNG (chunk {kind!r} at byte {i} runs past the end)")
        crc = int.from_bytes(b[i + 8 + n:i + 12 + n], "big")
        if kind in (b"IHDR", b"PLTE", b"IDAT") and zlib.crc32(b[i + 4:i + 8 + n]) != crc:
            raise BadImageError(path, f"corrupt PNG (CRC mismatch in its {kind.decode()} chunk at byte {i})")
        if kind == b"IEND":
            return
        i += 12 + n
    raise BadImageError(path, "truncated or malformed PNG (its chunks do not reach the IEND chunk)")


def _check_bmp(path: str, b: bytes) -> None:
    if len(b) < 26:
        raise BadImageError(path, "truncated BMP header")
    offset, dib = int.from_bytes(b[10:14], "little"), int.from_bytes(b[14:18], "little")
    if dib not in (12, 40, 52, 56, 64, 108, 124) or not 14 + dib <= offset < len(b):
        raise BadImageError(path, f"not a valid BMP (DIB header size {dib}, pixel data at {offset} of "
                                  f"{len(b)} bytes)")


def decode_pil(path: str):
    """Decode to an RGB PIL image (fully loaded); raises BadImageError naming the file."""
    from PIL import Image
    import io

    from PIL import ImageOps

    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
            im = ImageOps.exif_transpose(im)              # as DALI: the EXIF orientation applies
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: scale, do not saturate
                im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
            return im.convert("RGB")
    except Exception as e:   # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadImageError(path, f"cannot be decoded ({type(e).__name__}: {e})") from None
