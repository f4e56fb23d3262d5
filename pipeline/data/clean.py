"""Cleaning: decode every raw item, repair what can be repaired, quarantine the rest, dedupe.

The clean stage accounts for every input item: each row of the output manifest has a ``status``
(accepted, rejected, duplicate) and, when not accepted, a ``reason`` code and a human ``detail``.
Decoding runs in worker processes over chunks of the manifest; only metadata and hashes travel
back, so memory stays bounded on a folder much larger than RAM.

Duplicate policy: exact duplicates (same decoded pixels) and, when ``data.near_dup_distance`` > 0,
near duplicates (pHash Hamming distance) are dropped, keeping one per group. When a group spans the
train and test splits, the test copy is kept and the train copies dropped (the test set stays
intact and no longer leaks into training); such groups are counted in the report because they
inflate metrics.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from .images import (
    REJECT_REASONS,
    DecodedImage,
    ImageRejected,
    decode_image,
    near_duplicate_groups,
    perceptual_hash,
    pixel_hash,
)

log = logging.getLogger(__name__)

DUPLICATE_REASONS = {
    "exact_duplicate": "same decoded pixels as an earlier item",
    "near_duplicate": "perceptual hash within data.near_dup_distance of an earlier item",
}


@dataclass(frozen=True)
class CleanOptions:
    channels: str
    background: tuple[int, int, int]
    min_size: int
    max_pixels: int
    animated: str


def array_image(pixels: np.ndarray, opts: CleanOptions) -> DecodedImage:
    """Apply the channel policy and size checks to an item of an array source."""
    a = pixels if pixels.ndim == 3 else pixels[:, :, None]
    h, w, c = a.shape
    source_mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(c)
    if source_mode is None:
        raise ImageRejected("unreadable", f"{c} channels; expected 1, 3 or 4")
    if min(h, w) < opts.min_size:
        raise ImageRejected("too_small", f"{w}x{h} is smaller than data.min_size={opts.min_size}")
    repairs = []
    if c == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        bg = np.asarray(opts.background, np.float32)
        a = (a[:, :, :3] * alpha + bg * (1 - alpha)).round().astype(np.uint8)
        if (alpha < 1).any():
            repairs.append("alpha_composited")
        c = 3
    if opts.channels == "gray" and c == 3:
        # ITU-R 601-2 luma, the same transform Pillow's convert("L") applies to files.
        a = (a[:, :, 0] * 0.299 + a[:, :, 1] * 0.587 + a[:, :, 2] * 0.114).round().astype(np.uint8)[:, :, None]
        repairs.append("rgb_to_gray")
    elif opts.channels == "rgb" and c == 1:
        a = np.repeat(a, 3, axis=2)
        repairs.append("gray_to_rgb")
    return DecodedImage(pixels=np.ascontiguousarray(a), source_format="array", source_mode=source_mode,
                        source_size=(w, h), repairs=tuple(repairs))


def load_item(row: Any, raw_dir: Path, opts: CleanOptions, arrays: dict[str, np.ndarray]) -> DecodedImage:
    """Decode one manifest row (raises ImageRejected)."""
    if row.kind == "array":
        arr = arrays.get(row.file)
        if arr is None:
            arr = arrays[row.file] = np.load(raw_dir / row.file, mmap_mode="r", allow_pickle=False)
        return array_image(np.asarray(arr[row.index]), opts)
    return decode_image(raw_dir / row.file, channels=opts.channels, background=opts.background,  # type: ignore[arg-type]
                        min_size=opts.min_size, max_pixels=opts.max_pixels, animated=opts.animated)  # type: ignore[arg-type]


def _check_chunk(args: tuple[list[Any], str, CleanOptions]) -> list[dict[str, Any]]:
    rows, raw_dir, opts = args
    arrays: dict[str, np.ndarray] = {}
    out = []
    for row in rows:
        rec: dict[str, Any] = {"item": row.item}
        try:
            img = load_item(row, Path(raw_dir), opts, arrays)
        except ImageRejected as rej:
            rec.update(status="rejected", reason=rej.reason, detail=rej.detail)
        else:
            h, w, c = img.pixels.shape
            rec.update(status="accepted", reason="", detail="", width=img.source_size[0], height=img.source_size[1],
                       mode=img.source_mode, format=img.source_format, channels=c, out_width=w, out_height=h,
                       repairs=",".join(img.repairs), pixel_hash=pixel_hash(img.pixels),
                       phash=np.int64(np.uint64(perceptual_hash(img.pixels)).view(np.int64)))
        out.append(rec)
    return out


def _chunks(df: pd.DataFrame, size: int) -> Iterator[list[Any]]:
    rows = list(df.itertuples(index=False))
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def check_items(df: pd.DataFrame, raw_dir: Path, opts: CleanOptions, *, workers: int, progress: bool = True) -> pd.DataFrame:
    """Decode and hash every item; returns one record per item (no pixels kept)."""
    chunk = 256
    jobs = [(c, str(raw_dir), opts) for c in _chunks(df, chunk)]
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(df), desc="clean", unit="img", disable=not progress, mininterval=1.0)
    # Array items are cheap to check; process pools pay off only for files to decode.
    use_pool = workers > 1 and (df["kind"] == "file").sum() >= 2 * chunk
    if use_pool:
        ctx = mp.get_context("spawn")  # no fork: safe with threads (the MLflow sender) in the parent
        with ctx.Pool(workers) as pool:
            for recs in pool.imap(_check_chunk, jobs):
                records.extend(recs)
                bar.update(len(recs))
    else:
        for job in jobs:
            recs = _check_chunk(job)
            records.extend(recs)
            bar.update(len(recs))
    bar.close()
    return pd.DataFrame(records)


def _keep_order(df: pd.DataFrame) -> np.ndarray:
    """Preference order within duplicate groups: test items first, then by item index."""
    return np.lexsort((df["item"].to_numpy(), (df["split"] != "test").to_numpy()))


def mark_duplicates(df: pd.DataFrame, *, exact: bool, near_distance: int) -> dict[str, int]:
    """Set status/reason/duplicate_of on duplicate rows of ``df`` in place; return counts."""
    df["duplicate_of"] = -1
    counts = {"exact": 0, "near": 0, "cross_split_groups": 0}
    order = _keep_order(df)
    accepted = df["status"].to_numpy() == "accepted"
    cross_groups: set[int] = set()
    if exact:
        first: dict[str, int] = {}
        for pos in order:
            if not accepted[pos]:
                continue
            h = df.at[df.index[pos], "pixel_hash"]
            if h in first:
                keep = first[h]
                df.loc[df.index[pos], ["status", "reason", "detail", "duplicate_of"]] = [
                    "duplicate", "exact_duplicate", f"same pixels as item {df.at[df.index[keep], 'item']}",
                    int(df.at[df.index[keep], "item"])]
                accepted[pos] = False
                counts["exact"] += 1
                if df.at[df.index[keep], "split"] != df.at[df.index[pos], "split"]:
                    cross_groups.add(int(keep))
            else:
                first[h] = pos
    if near_distance > 0:
        positions = [int(p) for p in order if accepted[p]]
        hashes = [int(np.int64(df.at[df.index[p], "phash"]).view(np.uint64)) for p in positions]
        groups = near_duplicate_groups(hashes, max_distance=near_distance)
        for i, g in enumerate(groups):
            if g == i:
                continue
            pos, keep = positions[i], positions[g]
            df.loc[df.index[pos], ["status", "reason", "detail", "duplicate_of"]] = [
                "duplicate", "near_duplicate", f"pHash within {near_distance} of item {df.at[df.index[keep], 'item']}",
                int(df.at[df.index[keep], "item"])]
            counts["near"] += 1
            if df.at[df.index[keep], "split"] != df.at[df.index[pos], "split"]:
                cross_groups.add(keep)
    counts["cross_split_groups"] = len(cross_groups)
    return counts


def summarize(df: pd.DataFrame, dup_counts: dict[str, int], skipped: list[dict[str, str]], *,
              examples: int = 5) -> dict[str, Any]:
    """The clean report: a count for every reason, every repair, and sample paths of each."""
    def sample(mask: pd.Series) -> list[str]:
        return df.loc[mask, "origin"].head(examples).astype(str).tolist()

    rejected = df[df["status"] == "rejected"]
    reasons = Counter(rejected["reason"])
    repairs = Counter(r for rs in df.loc[df["status"] == "accepted", "repairs"].fillna("") for r in rs.split(",") if r)
    skipped_counts = Counter(s["reason"] for s in skipped)
    report = {
        "total": int(len(df)) + len(skipped),
        "items": int(len(df)),
        "accepted": int((df["status"] == "accepted").sum()),
        "rejected": int(len(rejected)),
        "duplicates": int((df["status"] == "duplicate").sum()),
        "skipped": len(skipped),
        "rejected_by_reason": {k: int(v) for k, v in sorted(reasons.items())},
        "repaired": {k: int(v) for k, v in sorted(repairs.items())},
        "duplicate_counts": dup_counts,
        "skipped_by_reason": {k: int(v) for k, v in sorted(skipped_counts.items())},
        "reason_help": {k: v for k, v in {**REJECT_REASONS, **DUPLICATE_REASONS}.items()
                        if k in reasons or (k == "exact_duplicate" and dup_counts["exact"])
                        or (k == "near_duplicate" and dup_counts["near"])},
        "examples": {
            **{r: sample(df["reason"] == r) for r in sorted(reasons)},
            **{r: sample(df["reason"] == r) for r in DUPLICATE_REASONS if (df["reason"] == r).any()},
            **{f"skipped:{r}": [s["path"] for s in skipped if s["reason"] == r][:examples] for r in skipped_counts},
        },
        "splits": {str(k): int(v) for k, v in df.loc[df["status"] == "accepted", "split"].value_counts().sort_index().items()},
    }
    return report
