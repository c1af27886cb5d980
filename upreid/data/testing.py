"""Small helpers to make tiny on-disk datasets (tests, smoke runs, benchmarks)."""
from __future__ import annotations

import os
from typing import List

from .records import Record
from .synthetic import SynthConfig, make_camera, make_identity, render


def write_tiny(root: str, n: int = 24, ids: int = 6, cameras: int = 3, size=(128, 64), seed: int = 0,
               quality: int = 90) -> List[Record]:
    """Render ``n`` synthetic images (``ids`` identities, round-robin cameras) into ``root`` with
    Market-style names and return their records (pids 0..ids-1, 0-based cameras)."""
    import numpy as np
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    recs = []
    for i in range(n):
        pid, cam = i % ids, (i // ids) % cameras
        img = render(make_identity(seed, pid + 1), make_camera(seed, cam), np.random.default_rng([seed, 99, i]), size)
        path = os.path.join(root, f"{pid + 1:04d}_c{cam + 1}s1_{i:06d}_00.jpg")
        Image.fromarray(img).save(path, quality=quality)
        recs.append(Record(path, pid, cam))
    return recs


def corrupt_files(root: str) -> dict:
    """Write one file of each kind of damage; returns {kind: path}."""
    out = {}
    out["empty"] = os.path.join(root, "empty.jpg")
    open(out["empty"], "wb").close()
    out["garbage"] = os.path.join(root, "garbage.jpg")
    with open(out["garbage"], "wb") as f:
        f.write(b"this is not an image" * 10)
    out["missing"] = os.path.join(root, "does_not_exist.jpg")
    return out


def truncated_copy(src: str, dst: str, keep: float = 0.5) -> str:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return dst


def malformed_files(root: str, jpeg: str, png_size=(16, 8)) -> dict:
    """Files with a valid signature that do not decode; returns {kind: path}. ``jpeg``: a good JPEG."""
    import numpy as np
    from PIL import Image

    data = open(jpeg, "rb").read()
    out = {}
    png = os.path.join(root, "good.png")
    Image.fromarray(np.zeros((*png_size, 3), np.uint8)).save(png)
    raw = open(png, "rb").read()
    sos = data.index(b"\xff\xda")
    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    cases = {
        "truncated_png": raw[: len(raw) - 20],
        "header_only_jpeg": data[:sos] + b"\xff\xd9",
        "zero_size_sof": data[:sof + 5] + b"\x00\x00\x00\x00" + data[sof + 9:],
        "riff_not_webp": b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x00" * 16,
        "bm_text": b"BM is how this text file begins, and it is not a bitmap\n",
    }
    for kind, payload in cases.items():
        out[kind] = os.path.join(root, kind + (".png" if "png" in kind else ".bmp" if "bm" in kind else ".jpg"))
        with open(out[kind], "wb") as f:
            f.write(payload)
    os.remove(png)
    return out


def undecodable_files(root: str, jpeg: str, png_size=(16, 8)) -> dict:
    """Files that pass the structural check (signature, frame, scan, end marker; IHDR, IEND) but fail
    inside the decoders: a JPEG whose Huffman table counts more than 256 codes, and a PNG whose image
    data is not a valid zlib stream (its chunk CRC recomputed, so only the decompression fails).
    Returns {kind: path}. ``jpeg``: a good JPEG (baseline, with a DHT segment)."""
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    data = bytearray(open(jpeg, "rb").read())
    dht = data.index(b"\xff\xc4")
    data[dht + 5:dht + 21] = bytes([255] * 16)          # 16 code-length counts of 255 each: bogus
    png = os.path.join(root, "good_for_idat.png")
    Image.fromarray(np.zeros((*png_size, 3), np.uint8)).save(png)
    raw = open(png, "rb").read()
    os.remove(png)
    i = raw.index(b"IDAT")
    n = int.from_bytes(raw[i - 4:i], "big")
    idat = b"\x78\x9c" + b"\xff" * max(n - 2, 8)       # a zlib header, then an invalid deflate block
    bad_png = (raw[:i - 4] + struct.pack(">I", len(idat)) + b"IDAT" + idat
               + struct.pack(">I", zlib.crc32(b"IDAT" + idat)) + raw[i + 4 + n + 4:])
    out = {"bogus_huffman_jpeg": os.path.join(root, "bogus_huffman.jpg"),
           "bad_zlib_png": os.path.join(root, "bad_zlib.png")}
    for kind, payload in (("bogus_huffman_jpeg", bytes(data)), ("bad_zlib_png", bad_png)):
        with open(out[kind], "wb") as f:
            f.write(payload)
    return out


def bad_crc_png(root: str, size=(16, 8)) -> str:
    """A PNG whose image data chunk has a wrong CRC (its data intact): Pillow decodes it, libpng (DALI)
    refuses it. Returns its path."""
    import numpy as np
    from PIL import Image

    path = os.path.join(root, "bad_crc.png")
    Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(path)
    data = bytearray(open(path, "rb").read())
    i = data.index(b"IDAT")
    n = int.from_bytes(data[i - 4:i], "big")
    data[i + 4 + n] ^= 0xFF                                  # first byte of the IDAT chunk's CRC
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def odd_but_valid_files(root: str, jpeg: str) -> dict:
    """Valid images that decoders treat differently unless care is taken: a JPEG with bytes after its
    end marker, a JPEG with EXIF orientation 6 (rotate 90 degrees), a 16-bit grey PNG (mid grey)."""
    import numpy as np
    from PIL import Image

    out = {"trailing_bytes": os.path.join(root, "trailing.jpg"), "exif_rotated": os.path.join(root, "exif6.jpg"),
           "png16": os.path.join(root, "grey16.png")}
    with open(out["trailing_bytes"], "wb") as f:
        f.write(open(jpeg, "rb").read() + b"\x00trailing data of a phone camera" * 8)
    with Image.open(jpeg) as im:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.convert("RGB").save(out["exif_rotated"], exif=exif.tobytes(), quality=95)
    Image.fromarray(np.full((32, 16), 0x8000, np.uint16)).save(out["png16"])
    return out
