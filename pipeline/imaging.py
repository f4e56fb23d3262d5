"""Image grids and PNG files (numpy + Pillow only; used by training and by the report)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .io import write_bytes


def normalize(images: "np.ndarray | object") -> "np.ndarray | object":
    """uint8 pixels (tensor or array) -> float in [-1, 1]: x / 127.5 - 1, the one pixel scale of every
    model, metric and figure (:func:`to_uint8` is its inverse)."""
    if hasattr(images, "float"):
        return images.float() / 127.5 - 1.0  # type: ignore[union-attr]
    return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def to_uint8(images: "np.ndarray | object") -> np.ndarray:
    """Float images in [-1, 1] (tensor or array, [N, C, H, W]) -> uint8 [N, C, H, W]."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()  # type: ignore[union-attr]
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a
    return ((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)


def make_grid(images: np.ndarray, *, nrow: int = 8, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [H', W', C] mosaic, ``nrow`` images per row, with padding."""
    n, c, h, w = images.shape
    ncol = min(nrow, max(n, 1))
    nrows = max(1, math.ceil(n / ncol))
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return out


def png_bytes(array: np.ndarray, *, scale: int = 1) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) -> PNG bytes, optionally enlarged with nearest neighbour."""
    from PIL import Image  # noqa: PLC0415

    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_grid(images: np.ndarray, path: str | Path, *, nrow: int = 8, scale: int = 1) -> None:
    """Write a grid of uint8 [N, C, H, W] (or float [-1, 1]) images to a PNG, atomically."""
    write_bytes(path, png_bytes(make_grid(to_uint8(images), nrow=nrow), scale=scale))
