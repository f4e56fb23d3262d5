"""Image files for tests, made with Pillow or byte by byte where Pillow cannot write the case.

Shared by the decoding tests (test_images.py), the clean/preprocess tests and the end-to-end
"dirty folder" test: every bad case of a real user's folder can be produced here.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def asymmetric_rgb(width: int = 24, height: int = 16) -> np.ndarray:
    """uint8 [H, W, 3] with a distinct value in every pixel and channel pattern."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 10) % 256, (y * 15) % 256, (x * 3 + y * 7) % 256], axis=-1).astype(np.uint8)


def save(im: Image.Image, path: Path, fmt: str, **kwargs: object) -> Path:
    im.save(path, fmt, **kwargs)
    return path


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def handmade_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A valid PNG; ``rows`` are unfiltered scanlines, or all zeros (streamed, for huge sizes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if rows is None:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
        line = bytes(1 + (width * channels * bit_depth + 7) // 8)  # filter byte 0 + zero samples
        comp = zlib.compressobj(9)
        parts = [comp.compress(line * 500) for _ in range(height // 500)]
        parts += [comp.compress(line * (height % 500)), comp.flush()]
        idat = b"".join(parts)
    else:
        idat = zlib.compress(rows)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def natural_image(seed: int, size: int = 128) -> np.ndarray:
    """Smooth gradients plus a few filled shapes: compresses like a photo, hashes like one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack(
        [
            128 + 100 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 2) + rng.uniform())),
            128 + 100 * np.cos(2 * np.pi * (y * rng.uniform(0.5, 2) + rng.uniform())),
            255 * (x * rng.uniform() + y * rng.uniform()) / 2,
        ],
        axis=-1,
    )
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r**2
        base[mask] = rng.uniform(0, 255, size=3)
    return np.clip(base, 0, 255).astype(np.uint8)


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


def psd_bytes(side: int = 16) -> bytes:
    """A valid 8-bit RGB PSD (signature 8BPS): an image format outside the allow-list."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, side, side, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + b"\x00\x00" + bytes(side * side * 3)


def ghostscript_trap(folder: Path) -> tuple[Path, Path]:
    """A fake ``gs`` that records its calls in a marker file: (bin folder to put on PATH, marker)."""
    marker = folder / "ghostscript_ran"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake_gs = bin_dir / "gs"
    fake_gs.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 1\n')
    fake_gs.chmod(fake_gs.stat().st_mode | stat.S_IEXEC)
    return bin_dir, marker


def path_with(bin_dir: Path) -> str:
    """PATH with ``bin_dir`` first."""
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
