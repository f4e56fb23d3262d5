"""Resize and split: accepted images -> uint8 NCHW shards (data/tensors) with a hashed meta file.

The resize policy and the resampling filter are named in params and recorded in meta.json because
the filter alone moves FID by whole points. Pixels stay uint8 on disk; normalisation to [-1, 1]
happens at load time (:func:`to_float`), and that mapping is recorded too.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from ..io import ShardWriter
from .clean import CleanOptions, load_item

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
NORMALISATION = "x / 127.5 - 1 (uint8 0..255 -> float [-1, 1]) at load time"


def resize(pixels: np.ndarray, size: int, *, policy: str, filter: str, fill: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C] under ``policy`` (crop, letterbox, stretch)."""
    h, w, c = pixels.shape
    if (h, w) == (size, size):
        return pixels
    if policy == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        pixels, h, w = pixels[top : top + side, left : left + side], side, side
    if policy == "letterbox" and h != w:
        side = max(h, w)
        canvas = np.full((side, side, c), fill, np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = pixels
        pixels = canvas
    if pixels.shape[:2] == (size, size):
        return np.ascontiguousarray(pixels)
    if filter == "area":
        import cv2  # noqa: PLC0415 - opencv comes with albumentations

        out = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
        return out.reshape(size, size, c)
    img = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    out = np.asarray(img.resize((size, size), FILTERS[filter]))
    return out.reshape(size, size, c)


def assign_splits(df: pd.DataFrame, *, test_fraction: float, seed: int) -> np.ndarray:
    """Per row: "train" or "test". A source's own split wins; otherwise a stratified random split."""
    src = df["split"].fillna("").to_numpy()
    if (src == "test").any():
        return np.where(src == "test", "test", "train")
    rng = np.random.default_rng(seed)
    out = np.full(len(df), "train", dtype=object)
    labels = df["label"].to_numpy()
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)  # every class in both splits when it can be
        out[idx[:n_test]] = "test"
    return out.astype(str)


def _work(args: tuple[list[Any], str, CleanOptions, dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    rows, raw_dir, opts, rz = args
    arrays: dict[str, np.ndarray] = {}
    out = np.empty((len(rows), rz["channels"], rz["size"], rz["size"]), np.uint8)
    for i, row in enumerate(rows):
        img = load_item(row, Path(raw_dir), opts, arrays)  # accepted by clean: decodes again, same result
        px = resize(img.pixels, rz["size"], policy=rz["policy"], filter=rz["filter"], fill=rz["fill"])
        out[i] = px.transpose(2, 0, 1)
    return out, np.array([r.label for r in rows], np.int64)


def _batches(rows: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def build_tensors(clean: pd.DataFrame, raw_dir: Path, out_dir: Path, opts: CleanOptions, *, size: int, policy: str,
                  filter: str, fill: int, test_fraction: float, seed: int, shard_bytes: int, workers: int,
                  progress: bool = True) -> dict[str, Any]:
    accepted = clean[clean["status"] == "accepted"].sort_values("item").reset_index(drop=True)
    if accepted.empty:
        raise DataError("preprocess: the clean manifest has no accepted images; see reports/clean_report.json")
    accepted["out_split"] = assign_splits(accepted, test_fraction=test_fraction, seed=seed)
    channels = 1 if opts.channels == "gray" else 3
    rz = {"size": size, "policy": policy, "filter": filter, "fill": fill, "channels": channels}
    bar = tqdm(total=len(accepted), desc="preprocess", unit="img", disable=not progress, mininterval=1.0)
    entries = {}
    for split in ("train", "test"):
        rows = list(accepted[accepted["out_split"] == split].itertuples(index=False))
        writer = ShardWriter(out_dir, split, shard_bytes=shard_bytes)
        jobs = [(b, str(raw_dir), opts, rz) for b in _batches(rows, 512)]
        n_files = sum(r.kind == "file" for r in rows)
        if workers > 1 and n_files >= 1024:
            with mp.get_context("spawn").Pool(workers) as pool:
                for images, labels in pool.imap(_work, jobs):
                    writer.add(images, labels)
                    bar.update(len(images))
        else:
            for job in jobs:
                images, labels = _work(job)
                writer.add(images, labels)
                bar.update(len(images))
        entries[split] = writer.close(shape=(channels, size, size))
    bar.close()
    return {
        "splits": entries,
        "image_shape": [channels, size, size],
        "resize": {"policy": policy, "filter": filter, "fill": fill, "size": size},
        "normalisation": NORMALISATION,
    }


def to_float(images: Any) -> Any:
    """uint8 tensor/array -> float in [-1, 1] (the recorded normalisation)."""
    return images.float() / 127.5 - 1.0 if hasattr(images, "float") else images.astype(np.float32) / 127.5 - 1.0
