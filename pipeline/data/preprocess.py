"""Resize and split: accepted images -> uint8 NCHW shards (data/tensors) with a hashed meta file.

The resize policy and the resampling filter are named in params and recorded in meta.json, with
the library that implements the filter, because the filter alone moves FID by whole points.
Pixels stay uint8 on disk; normalisation to [-1, 1] happens at load time (:func:`to_float`), and
that mapping is recorded too.

Memory is bounded whatever the dataset's size: accepted items are decoded again in batches of
at most ~32 MiB of output, at most ``2 x workers`` batches are in flight
(:func:`pipeline.data.parallel.ordered_map`), and :class:`pipeline.io.ShardWriter` holds at most
one shard. Peak memory is about ``shard_bytes + (2 x workers + 1) x 32 MiB`` plus the manifest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import DataError
from ..imaging import normalize
from ..io import ShardWriter
from .clean import CleanOptions, Row, load_item, rows_of
from .images import ImageRejected, normalise_array, pixel_hash
from .parallel import in_worker, ordered_map

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
# "area" is OpenCV's INTER_AREA (exact pixel-area averaging when shrinking, the usual choice for
# downscaling photos); OpenCV comes with albumentations.
FILTER_NAMES = (*FILTERS, "area")
NORMALISATION = "x / 127.5 - 1 (uint8 0..255 -> float [-1, 1]) at load time"
BATCH_BYTES = 32 << 20  # output bytes per job


def filter_library(filter: str) -> str:
    """Which library and kernel implement ``filter`` (recorded in meta.json)."""
    if filter == "area":
        import cv2  # noqa: PLC0415

        return f"OpenCV {cv2.__version__} cv2.INTER_AREA"
    import PIL  # noqa: PLC0415

    return f"Pillow {PIL.__version__} Image.Resampling.{FILTERS[filter].name}"


def _resample(pixels: np.ndarray, height: int, width: int, filter: str) -> np.ndarray:
    """uint8 [h, w, C] -> uint8 [height, width, C] with the named filter."""
    c = pixels.shape[2]
    if filter == "area":
        import cv2  # noqa: PLC0415

        if in_worker():
            cv2.setNumThreads(1)  # one thread per worker process; the pool is the parallelism
        return cv2.resize(np.ascontiguousarray(pixels), (width, height), interpolation=cv2.INTER_AREA).reshape(
            height, width, c)
    img = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if c == 1 else pixels))
    return np.asarray(img.resize((width, height), FILTERS[filter])).reshape(height, width, c)


def resize(pixels: np.ndarray, size: int | tuple[int, int], *, policy: str, filter: str, fill: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C]; ``size`` is N (square) or (height, width).

    policy: "crop" cuts the largest centred window of the target's aspect ratio, then resamples;
    "letterbox" pads (with ``fill``) to the target's aspect ratio, centred, then resamples;
    "stretch" resamples the whole image to the target, changing its aspect ratio.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w, c = pixels.shape
    if (h, w) == (height, width):
        return pixels
    if policy == "crop":
        if w * height > h * width:  # wider than the target: keep the full height
            cw, ch = max(1, round(h * width / height)), h
        else:
            cw, ch = w, max(1, round(w * height / width))
        top, left = (h - ch) // 2, (w - cw) // 2
        pixels, h, w = pixels[top : top + ch, left : left + cw], ch, cw
    elif policy == "letterbox":
        if w * height > h * width:
            ph, pw = max(h, round(w * height / width)), w
        else:
            ph, pw = h, max(w, round(h * width / height))
        if (ph, pw) != (h, w):
            canvas = np.full((ph, pw, c), fill, np.uint8)
            top, left = (ph - h) // 2, (pw - w) // 2
            canvas[top : top + h, left : left + w] = pixels
            pixels, h, w = canvas, ph, pw
    elif policy != "stretch":
        raise ValueError(f"unknown resize policy {policy!r}")
    if (h, w) == (height, width):
        return np.ascontiguousarray(pixels)
    return _resample(pixels, height, width, filter)


def model_compatible(height: int, width: int) -> bool:
    """Whether the bundled models can train at this size: square, 4 or 7 times a power of two."""
    if height != width:
        return False
    return any(height % s0 == 0 and (height // s0) & (height // s0 - 1) == 0 for s0 in (4, 7))


def assign_splits(df: pd.DataFrame, *, test_fraction: float, seed: int) -> np.ndarray:
    """Per row: "train" or "test". A source's own test split wins; otherwise a stratified random split.

    Stratified: within each label (all rows together when unlabeled) a seeded shuffle puts
    ``round(n * test_fraction)`` rows in test, at least one and at most n - 1 when n >= 2, so
    every class is in both splits when it can be. Deterministic for a given seed and row order.
    """
    src = df["split"].fillna("").astype(str).to_numpy()
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


def _prepare(pixels: np.ndarray, rz: dict[str, Any]) -> np.ndarray:
    """Accepted, normalised [H, W, C] -> [C, height, width]."""
    out = resize(pixels, (rz["height"], rz["width"]), policy=rz["policy"], filter=rz["filter"], fill=rz["fill"])
    return out.transpose(2, 0, 1)


def _work(job: tuple[list[Row], list[str], str, CleanOptions, dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode, resize and stack one batch: (uint8 [n, C, H, W], int64 labels [n], pixel-hash mismatches)."""
    rows, hashes, raw_dir, opts, rz = job
    out = np.empty((len(rows), rz["channels"], rz["height"], rz["width"]), np.uint8)
    mismatches = 0
    raw = Path(raw_dir)
    by_file: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.kind == "array":
            by_file.setdefault(row.file, []).append(i)
            continue
        try:
            img = load_item(row, raw, opts, {})
        except ImageRejected as rej:
            raise DataError(f"{raw / row.file}: accepted by the clean stage but now {rej.reason} ({rej.detail}); "
                            "the raw data changed: run `dvc repro clean` (or the clean stage) again") from None
        mismatches += pixel_hash(img.pixels) != hashes[i]
        out[i] = _prepare(img.pixels, rz)
    for file, group in by_file.items():
        block = np.asarray(np.load(raw / file, mmap_mode="r", allow_pickle=False)[[rows[i].index for i in group]])
        if block.ndim == 3:
            block = block[..., None]  # [n, H, W, C]
        c = block.shape[3]
        same_layout = (c == 1 and opts.channels == "gray") or (c == 3 and opts.channels == "rgb")
        if same_layout and block.shape[1:3] == (rz["height"], rz["width"]):
            out[group] = block.transpose(0, 3, 1, 2)  # nothing to repair or resize: one copy
            continue
        for i, pixels in zip(group, block, strict=True):
            img = normalise_array(pixels, channels=opts.channels, background=opts.background,  # type: ignore[arg-type]
                                  min_size=1)
            out[i] = _prepare(img.pixels, rz)
    return out, np.array([r.label for r in rows], np.int64), int(mismatches)


FILES_PER_JOB = 128  # a fraction of a second of decoding: enough jobs to keep every worker busy


def _jobs(accepted: pd.DataFrame, raw_dir: Path, opts: CleanOptions, rz: dict[str, Any],
          per_job: int) -> Iterator[tuple[list[Row], list[str], str, CleanOptions, dict[str, Any]]]:
    """Jobs of consecutive rows: at most ``per_job`` items, and at most FILES_PER_JOB files."""
    is_file = (accepted["kind"] == "file").to_numpy()
    start = 0
    while start < len(accepted):
        stop = min(start + per_job, len(accepted))
        files = np.cumsum(is_file[start:stop])
        if files[-1] > FILES_PER_JOB:
            stop = start + int(np.searchsorted(files, FILES_PER_JOB, side="right"))
        part = accepted.iloc[start:stop]
        yield rows_of(part), part["pixel_hash"].astype(str).tolist(), str(raw_dir), opts, rz
        start = stop


def build_tensors(clean: pd.DataFrame, raw_dir: Path, out_dir: Path, opts: CleanOptions, *,
                  size: int | tuple[int, int], policy: str, filter: str, fill: int, test_fraction: float, seed: int,
                  shard_bytes: int, workers: int, progress: bool = True,
                  batch_bytes: int = BATCH_BYTES) -> dict[str, Any]:
    """Write the train and test shards of the accepted rows of ``clean`` into ``out_dir``; return meta.

    size: N or (height, width); shard_bytes: largest shard file (one shard is the most held in
    memory); batch_bytes: output bytes per job. Items keep the manifest's order within a split.
    """
    from tqdm import tqdm  # noqa: PLC0415

    if filter not in FILTER_NAMES:
        raise ValueError(f"unknown filter {filter!r}; known: {', '.join(FILTER_NAMES)}")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    accepted = clean[clean["status"] == "accepted"].sort_values("item").reset_index(drop=True)
    if accepted.empty:
        raise DataError("preprocess: the clean manifest has no accepted images; see reports/clean_report.json")
    accepted["out_split"] = assign_splits(accepted, test_fraction=test_fraction, seed=seed)
    channels = 1 if opts.channels == "gray" else 3
    rz = {"height": height, "width": width, "policy": policy, "filter": filter, "fill": fill, "channels": channels}
    per_job = max(1, min(8192, batch_bytes // (channels * height * width)))
    entries: dict[str, Any] = {}
    mismatches = 0
    # Spawning workers costs about a second; worth it when there is decoding or resizing to do.
    # Array items already at the target size and layout are a plain copy (the fast path of _work).
    is_file = accepted["kind"] == "file"
    same = ((accepted["out_height"] == height) & (accepted["out_width"] == width)
            & (accepted["repairs"].fillna("") == ""))
    cost = int(is_file.sum()) + int((~is_file & ~same).sum()) / 20
    use = workers if cost >= 512 else 1
    # One pool for both splits: the train jobs, then the test jobs, results in that order.
    parts = {split: accepted[accepted["out_split"] == split] for split in ("train", "test")}
    jobs = ((split, job) for split in parts for job in _jobs(parts[split], raw_dir, opts, rz, per_job))
    order: list[str] = []  # split of each job submitted, consumed in the same order

    def tagged() -> Iterator[tuple[list[Row], list[str], str, CleanOptions, dict[str, Any]]]:
        for split, job in jobs:
            order.append(split)
            yield job

    shape = (channels, height, width)
    writer = ShardWriter(out_dir, "train", shard_bytes=shard_bytes)
    with tqdm(total=len(accepted), desc="preprocess", unit="img", disable=not progress, mininterval=1.0) as bar:
        for n, (images, labels, bad) in enumerate(ordered_map(_work, tagged(), workers=use)):
            if order[n] != writer.split:  # the first test batch: the train split is complete
                entries[writer.split] = writer.close(shape=shape)  # one shard buffer alive at a time
                writer = ShardWriter(out_dir, order[n], shard_bytes=shard_bytes)
            writer.add(images, labels)
            mismatches += bad
            bar.update(len(images))
    entries[writer.split] = writer.close(shape=shape)
    for split in parts:
        if split not in entries:  # a split without images still gets its (empty) files
            entries[split] = ShardWriter(out_dir, split, shard_bytes=shard_bytes).close(shape=shape)
    if mismatches:
        log.warning("preprocess: %d accepted images decoded to other pixels than in the clean stage (another "
                    "Pillow/libjpeg?); their new pixels were used. Re-run clean on this machine to make them agree.",
                    mismatches)
    digest = hashlib.sha256()
    for split in ("train", "test"):
        e = entries[split]
        for f in [*(s["sha256"] for s in e["shards"]), e["labels"]["sha256"]]:
            digest.update(f.encode("ascii"))
    labeled = bool((accepted["label"] >= 0).all())
    per_class = {split: {str(k): int(v) for k, v in accepted.loc[accepted["out_split"] == split, "label"]
                         .value_counts().sort_index().items()} for split in ("train", "test")}
    return {
        "splits": entries,
        "image_shape": [channels, height, width],
        "resize": {"policy": policy, "filter": filter, "filter_library": filter_library(filter), "fill": fill,
                   "height": height, "width": width, "size": height if height == width else [height, width]},
        "split": {"method": "source" if (accepted["split"] == "test").any() else "stratified" if labeled else "random",
                  "test_fraction": test_fraction, "seed": seed, "per_class": per_class},
        "normalisation": NORMALISATION,
        "content_sha256": digest.hexdigest(),
        "decode_mismatches": mismatches,
        "model_compatible": model_compatible(height, width),
    }


def to_float(images: Any) -> Any:
    """uint8 tensor/array -> float in [-1, 1] (the recorded normalisation)."""
    return normalize(images)
