"""Cleaning: decode every raw item, repair what can be repaired, quarantine the rest, dedupe.

The clean stage accounts for every input: each row of the output manifest has a ``status``
(accepted, rejected, duplicate, skipped) and, when not accepted, a ``reason`` code and a human
``detail``. Skipped inputs are the ones the download stage never copied (hidden files, links,
special files, files outside the class folders); they are rows of the manifest too, so that
``total = accepted + rejected + duplicates + skipped`` holds for the manifest and the report.

Files are decoded by :func:`pipeline.data.images.decode_image` and array items normalised by
:func:`pipeline.data.images.normalise_array`: one repair implementation for both. Decoding runs
in worker processes over chunks of the manifest (:func:`pipeline.data.parallel.ordered_map`,
a bounded window of chunks in flight); only metadata, hashes and 32x32 hash thumbnails travel
back, never pixels, so memory stays bounded on a folder much larger than RAM.

Duplicate policy: exact duplicates (same decoded pixels) and, when ``data.near_dup_distance`` > 0,
near duplicates (pHash Hamming distance) are dropped, keeping one per group. When a group spans the
train and test splits, the test copy is kept and the train copies dropped (the test set stays
intact and no longer leaks into training); such groups are counted and sampled in the report
because they inflate metrics.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .images import (
    REJECT_REASONS,
    DecodedImage,
    ImageRejected,
    decode_image,
    near_duplicate_groups,
    normalise_array,
    phash_from_thumbnails,
    phash_thumbnail,
    phash_thumbnails,
    pixel_hash,
    pixel_hashes,
)
from .parallel import ordered_map

if TYPE_CHECKING:
    import pandas as pd

DUPLICATE_REASONS = {
    "exact_duplicate": "same decoded pixels as another item (the test copy, else the first, is kept)",
    "near_duplicate": "perceptual hash within data.near_dup_distance of another item",
}

# Why the download stage did not copy an input: pipeline.data.raw.SKIP_REASONS.

# Columns that check_items adds to the raw manifest (dtypes of the written manifest).
RESULT_COLUMNS = {
    "status": "string",      # accepted, rejected, duplicate or skipped
    "reason": "string",      # "" when accepted; a code of REJECT_REASONS, DUPLICATE_REASONS or SKIP_REASONS
    "detail": "string",      # human explanation of the reason
    "bytes": "int64",        # size of the file on disk (-1 for array items and skipped inputs)
    "format": "string",      # Pillow format identified from the content, or "array"
    "mode": "string",        # pixel mode as stored (L, P, RGBA, I;16, CMYK, ...)
    "width": "int64",        # as stored, before EXIF rotation (-1 when not decoded)
    "height": "int64",
    "out_width": "int64",    # after repairs (EXIF rotation), before resizing
    "out_height": "int64",
    "channels": "int64",     # 1 or 3 after the channel policy
    "repairs": "string",     # comma-separated codes of REPAIR_CODES
    "warnings": "string",    # Pillow warnings raised while decoding, "; "-separated
    "pixel_hash": "string",  # sha256 of the decoded pixels (exact duplicates)
    "phash": "Int64",        # 64-bit perceptual hash as int64 bits (near duplicates); null when not computed
}

FILE_CHUNK = 256     # files per job: a few seconds of decoding
ARRAY_CHUNK = 8192   # array items per job: they are cheap and hashed as a batch


class Row(NamedTuple):
    """The fields of a raw manifest row that decoding needs; picklable, unlike itertuples' rows."""

    item: int
    kind: str
    file: str
    index: int
    label: int


def rows_of(df: pd.DataFrame) -> list[Row]:
    """Manifest rows as :class:`Row` tuples (for worker processes)."""
    cols = [df[c].tolist() for c in Row._fields]
    return [Row(int(i), str(k), str(f), int(x), int(lab)) for i, k, f, x, lab in zip(*cols, strict=True)]


@dataclass(frozen=True)
class CleanOptions:
    channels: str                       # "gray" or "rgb" (data.channels)
    background: tuple[int, int, int]    # RGB that alpha is composited on
    min_size: int                       # pixels, either side
    max_pixels: int                     # width * height limit (decompression bombs)
    animated: str                       # "reject" or "first_frame"
    phash: bool = True                  # compute perceptual hashes (only near-duplicate search needs them)


def load_item(row: Any, raw_dir: Path, opts: CleanOptions, arrays: dict[str, np.ndarray]) -> DecodedImage:
    """Decode one manifest row (raises ImageRejected). ``arrays`` caches memory-mapped array files."""
    if row.kind == "array":
        arr = arrays.get(row.file)
        if arr is None:
            arr = arrays[row.file] = np.load(raw_dir / row.file, mmap_mode="r", allow_pickle=False)
        return normalise_array(np.asarray(arr[row.index]), channels=opts.channels,  # type: ignore[arg-type]
                               background=opts.background, min_size=opts.min_size)
    return decode_image(raw_dir / row.file, channels=opts.channels, background=opts.background,  # type: ignore[arg-type]
                        min_size=opts.min_size, max_pixels=opts.max_pixels, animated=opts.animated)  # type: ignore[arg-type]


def _empty_columns(n: int) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {"item": [0] * n}
    for name, dtype in RESULT_COLUMNS.items():
        cols[name] = [-1 if dtype == "int64" else None if dtype == "Int64" else ""] * n
    return cols


def _accept(cols: dict[str, list[Any]], i: int, img: DecodedImage) -> None:
    h, w, c = img.pixels.shape
    cols["status"][i] = "accepted"
    cols["format"][i], cols["mode"][i] = img.source_format, img.source_mode
    cols["width"][i], cols["height"][i] = img.source_size
    cols["out_width"][i], cols["out_height"][i], cols["channels"][i] = w, h, c
    cols["repairs"][i] = ",".join(img.repairs)
    cols["warnings"][i] = "; ".join(img.warnings)


def _check_files(rows: list[Row], positions: list[int], raw_dir: Path, opts: CleanOptions,
                 cols: dict[str, list[Any]]) -> tuple[list[int], list[np.ndarray]]:
    """Decode file rows one by one; return (positions accepted, their hash thumbnails)."""
    done, thumbs = [], []
    for i in positions:
        row = rows[i]
        try:
            size = os.lstat(raw_dir / row.file).st_size
        except OSError:
            size = -1  # decode_image reports why the file cannot be read, just below
        cols["bytes"][i] = size
        try:
            img = load_item(row, raw_dir, opts, {})
        except ImageRejected as rej:
            cols["status"][i], cols["reason"][i], cols["detail"][i] = "rejected", rej.reason, rej.detail
            continue
        _accept(cols, i, img)
        cols["pixel_hash"][i] = pixel_hash(img.pixels)
        if opts.phash:
            thumbs.append(phash_thumbnail(img.pixels))  # [32, 32]: the decoded pixels are dropped here
            done.append(i)
    return done, thumbs


def _check_arrays(rows: list[Row], positions: list[int], raw_dir: Path, opts: CleanOptions,
                  cols: dict[str, list[Any]]) -> tuple[list[int], list[np.ndarray]]:
    """Normalise array rows a whole block at a time (one array file = one image size)."""
    done, thumbs = [], []
    by_file: dict[str, list[int]] = {}
    for i in positions:
        by_file.setdefault(rows[i].file, []).append(i)
    for file, group in by_file.items():
        arr = np.load(raw_dir / file, mmap_mode="r", allow_pickle=False)
        block = np.asarray(arr[np.asarray([rows[i].index for i in group])])  # [n, H, W(, C)]
        if block.ndim == 3:
            block = block[..., None]
        n, h, w, c = block.shape
        if ((c == 1 and opts.channels == "gray") or (c == 3 and opts.channels == "rgb")) and min(h, w) >= opts.min_size:
            # Already in the target layout and large enough: what normalise_array returns, item
            # for item, without a call per item (70,000 MNIST items in a fraction of a second).
            mode = "L" if c == 1 else "RGB"
            for i in group:
                cols["status"][i], cols["format"][i], cols["mode"][i] = "accepted", "array", mode
                cols["width"][i] = cols["out_width"][i] = w
                cols["height"][i] = cols["out_height"][i] = h
                cols["channels"][i] = c
            for i, digest in zip(group, pixel_hashes(block), strict=True):
                cols["pixel_hash"][i] = digest
            if opts.phash:
                done.extend(group)
                thumbs.extend(phash_thumbnails(block))
            continue
        ok, outs = [], []
        for i, pixels in zip(group, block, strict=True):
            try:
                img = normalise_array(pixels, channels=opts.channels, background=opts.background,  # type: ignore[arg-type]
                                      min_size=opts.min_size)
            except ImageRejected as rej:
                cols["status"][i], cols["reason"][i], cols["detail"][i] = "rejected", rej.reason, rej.detail
                continue
            cols["bytes"][i] = -1
            _accept(cols, i, img)
            ok.append(i)
            outs.append(img.pixels)
        if ok:
            out = np.stack(outs)  # [n, H, W, C]: the items of one file share a size
            for i, h in zip(ok, pixel_hashes(out), strict=True):
                cols["pixel_hash"][i] = h
            if opts.phash:
                done.extend(ok)
                thumbs.extend(phash_thumbnails(out))
    return done, thumbs


def check_chunk(job: tuple[list[Row], str, CleanOptions]) -> dict[str, list[Any]]:
    """Decode and hash one chunk of manifest rows; return result columns (no pixels)."""
    rows, raw_dir, opts = job
    cols = _empty_columns(len(rows))
    cols["item"] = [int(r.item) for r in rows]
    files = [i for i, r in enumerate(rows) if r.kind == "file"]
    arrays = [i for i, r in enumerate(rows) if r.kind == "array"]
    done_f, thumbs_f = _check_files(rows, files, Path(raw_dir), opts, cols)
    done_a, thumbs_a = _check_arrays(rows, arrays, Path(raw_dir), opts, cols)
    thumbs = np.asarray(thumbs_f + thumbs_a, dtype=np.float64).reshape(-1, 32, 32)
    for i, h in zip(done_f + done_a, phash_from_thumbnails(thumbs), strict=True):
        cols["phash"][i] = int(np.uint64(h).view(np.int64))  # the 64 bits, reinterpreted as signed
    return cols


def _jobs(df: pd.DataFrame, raw_dir: Path, opts: CleanOptions,
          file_chunk: int) -> Iterator[tuple[list[Row], str, CleanOptions]]:
    """Chunks of rows, files and arrays apart (an array chunk is hashed as one batch)."""
    for kind, size in (("array", ARRAY_CHUNK), ("file", file_chunk)):
        part = df[df["kind"] == kind]
        for start in range(0, len(part), size):
            yield rows_of(part.iloc[start : start + size]), str(raw_dir), opts


def check_items(df: pd.DataFrame, raw_dir: Path, opts: CleanOptions, *, workers: int,
                progress: bool = True, file_chunk: int = FILE_CHUNK) -> pd.DataFrame:
    """Decode and hash every item of a raw manifest; one row of RESULT_COLUMNS per item.

    workers: processes (1: in this process); file_chunk: files per job. Workers are used when
    there are at least two jobs' worth of files (array items count for much less).
    """
    import pandas as pd  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    # Worker start-up (a spawned interpreter importing numpy and Pillow) costs about a second;
    # worth it for files, and for array items only when there are very many.
    n_files = int((df["kind"] == "file").sum())
    cost = n_files + (len(df) - n_files) / (50 if opts.phash else 500)
    use = workers if cost >= 2 * file_chunk else 1
    parts = []
    with tqdm(total=len(df), desc="clean", unit="img", disable=not progress, mininterval=1.0) as bar:
        for cols in ordered_map(check_chunk, _jobs(df, raw_dir, opts, file_chunk), workers=use):
            parts.append(pd.DataFrame(cols).astype({"item": "int64", **RESULT_COLUMNS}))
            bar.update(len(cols["item"]))
    if not parts:
        return pd.DataFrame({"item": pd.Series([], dtype="int64"),
                             **{k: pd.Series([], dtype=v) for k, v in RESULT_COLUMNS.items()}})
    return pd.concat(parts, ignore_index=True)


def skipped_rows(skipped: list[dict[str, str]], first_item: int) -> pd.DataFrame:
    """Manifest rows for the inputs the download stage skipped, numbered from ``first_item``."""
    import pandas as pd  # noqa: PLC0415

    from .raw import COLUMNS  # noqa: PLC0415

    n = len(skipped)
    cols: dict[str, Any] = {
        "item": np.arange(first_item, first_item + n, dtype=np.int64), "kind": ["skipped"] * n,
        "file": [""] * n, "index": np.full(n, -1, np.int64), "label": np.full(n, -1, np.int64),
        "split": [s.get("split", "") for s in skipped], "origin": [s["path"] for s in skipped],
        **{k: ([-1] * n if v == "int64" else [None] * n if v == "Int64" else [""] * n) for k, v in RESULT_COLUMNS.items()},
    }
    cols["status"] = ["skipped"] * n
    cols["reason"] = [s["reason"] for s in skipped]
    from .raw import SKIP_REASONS  # noqa: PLC0415

    cols["detail"] = [SKIP_REASONS.get(s["reason"], s["reason"]) for s in skipped]
    return pd.DataFrame(cols).astype({**COLUMNS, **RESULT_COLUMNS})


def _keep_order(df: pd.DataFrame) -> np.ndarray:
    """Preference order within duplicate groups: test items first, then by item index."""
    return np.lexsort((df["item"].to_numpy(), (df["split"].to_numpy(dtype=object) != "test")))


def mark_duplicates(df: pd.DataFrame, *, exact: bool, near_distance: int, examples: int = 5) -> dict[str, Any]:
    """Set status/reason/detail/duplicate_of on duplicate rows of ``df`` in place; return a summary.

    Only accepted rows take part. Returns counts ``exact``, ``near``, ``cross_split_groups`` (groups
    with members in both train and test) and ``cross_split_examples`` (kept/dropped origin pairs).
    """
    n = len(df)
    status = df["status"].to_numpy(dtype=object).copy()
    reason = df["reason"].to_numpy(dtype=object).copy()
    detail = df["detail"].to_numpy(dtype=object).copy()
    dup_of = np.full(n, -1, np.int64)
    items = df["item"].to_numpy()
    splits = df["split"].to_numpy(dtype=object)
    origins = df["origin"].to_numpy(dtype=object)
    order = _keep_order(df)
    accepted = status == "accepted"
    cross_groups: set[int] = set()
    cross_examples: list[dict[str, str]] = []
    counts = {"exact": 0, "near": 0}

    def drop(pos: int, keep: int, code: str, text: str) -> None:
        status[pos], reason[pos], detail[pos], dup_of[pos] = "duplicate", code, text, items[keep]
        accepted[pos] = False
        if splits[keep] != splits[pos]:
            if keep not in cross_groups and len(cross_examples) < examples:
                cross_examples.append({"kept": str(origins[keep]), "kept_split": str(splits[keep]),
                                       "dropped": str(origins[pos]), "dropped_split": str(splits[pos])})
            cross_groups.add(int(keep))

    if exact:
        hashes = df["pixel_hash"].to_numpy(dtype=object)
        first: dict[str, int] = {}
        for pos in order[accepted[order]]:
            keep = first.setdefault(hashes[pos], int(pos))
            if keep != pos:
                drop(int(pos), keep, "exact_duplicate", f"same pixels as item {items[keep]} ({origins[keep]})")
                counts["exact"] += 1
    if near_distance > 0:
        positions = [int(p) for p in order if accepted[p]]
        if df["phash"].iloc[positions].isna().any():
            raise ValueError("near-duplicate search needs perceptual hashes: check_items(..., CleanOptions(phash=True))")
        hashes64 = df["phash"].fillna(0).to_numpy(dtype=np.int64).view(np.uint64)
        groups = near_duplicate_groups([int(hashes64[p]) for p in positions], max_distance=near_distance)
        for i, g in enumerate(groups):
            if g != i:
                pos, keep = positions[i], positions[g]
                drop(pos, keep, "near_duplicate",
                     f"pHash within {near_distance} bits of item {items[keep]} ({origins[keep]})")
                counts["near"] += 1
    df["status"], df["reason"], df["detail"] = status, reason, detail
    df["status"] = df["status"].astype("string")
    df["reason"] = df["reason"].astype("string")
    df["detail"] = df["detail"].astype("string")
    df["duplicate_of"] = dup_of
    return {**counts, "cross_split_groups": len(cross_groups), "cross_split_examples": cross_examples}


def summarize(df: pd.DataFrame, dups: dict[str, Any], *, examples: int = 5,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The clean report: a count for every status, reason and repair, and sample paths of each.

    ``df`` is the full manifest, skipped inputs included; ``total`` is its length and always equals
    ``accepted + rejected + duplicates + skipped``.
    """
    st = df["status"].astype(str)
    rs = df["reason"].astype(str)
    by_status = {s: int((st == s).sum()) for s in ("accepted", "rejected", "duplicate", "skipped")}

    def count(status: str) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(Counter(rs[st == status]).items())}

    def sample(mask: Any) -> list[str]:
        return df.loc[mask, "origin"].head(examples).astype(str).tolist()

    rejected, duplicates, skipped = count("rejected"), count("duplicate"), count("skipped")
    repairs = Counter(r for rr in df.loc[st == "accepted", "repairs"].fillna("").astype(str) for r in rr.split(",") if r)
    from .raw import SKIP_REASONS  # noqa: PLC0415

    help_texts = {**REJECT_REASONS, **DUPLICATE_REASONS, **SKIP_REASONS}
    report = {
        "total": int(len(df)),
        "items": int((st != "skipped").sum()),  # inputs the download stage copied
        "accepted": by_status["accepted"],
        "rejected": by_status["rejected"],
        "duplicates": by_status["duplicate"],
        "skipped": by_status["skipped"],
        "rejected_by_reason": rejected,
        "duplicates_by_reason": duplicates,
        "skipped_by_reason": skipped,
        "repaired": {k: int(v) for k, v in sorted(repairs.items())},
        "duplicate_counts": {k: int(dups.get(k, 0)) for k in ("exact", "near", "cross_split_groups")},
        "cross_split_examples": list(dups.get("cross_split_examples", [])),
        "reason_help": {k: help_texts[k] for k in sorted({*rejected, *duplicates, *skipped}) if k in help_texts},
        "examples": {k: sample((rs == k) & (st != "accepted")) for k in sorted({*rejected, *duplicates, *skipped})},
        "splits": {str(k): int(v) for k, v in df.loc[st == "accepted", "split"].astype(str).value_counts().sort_index().items()},
    }
    if extra:
        report.update(extra)
    return report


def report_metrics(report: dict[str, Any]) -> dict[str, int]:
    """Flat numeric view of the report for MLflow (one metric per count, reason and repair)."""
    out = {k: int(report[k]) for k in ("total", "accepted", "rejected", "duplicates", "skipped")}
    for key, prefix in (("rejected_by_reason", "rejected_"), ("duplicates_by_reason", "duplicate_"),
                        ("skipped_by_reason", "skipped_"), ("repaired", "repaired_")):
        out.update({f"{prefix}{k}": int(v) for k, v in report[key].items()})
    out["cross_split_duplicate_groups"] = int(report["duplicate_counts"]["cross_split_groups"])
    return out
