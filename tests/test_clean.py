"""Tests for the clean stage's library (pipeline.data.clean) and the batched hashes it relies on.

Raw datasets are made by the real download stage from folders and arrays written here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_images import encode, natural_image
from PIL import Image
from scipy.fft import dctn

from pipeline.data.clean import (
    CleanOptions,
    check_items,
    mark_duplicates,
    report_metrics,
    summarize,
)
from pipeline.data.images import (
    decode_image,
    normalise_array,
    perceptual_hash,
    perceptual_hashes,
    phash_thumbnail,
    phash_thumbnails,
    pixel_hash,
    pixel_hashes,
)
from pipeline.data.raw import read_manifest
from pipeline.params import Data, validate
from pipeline.stages import clean as clean_stage
from pipeline.stages import download

# ---------------------------------------------------------------------------------------------
# One repair implementation for arrays and files
# ---------------------------------------------------------------------------------------------


def _with_alpha(rgb: np.ndarray) -> np.ndarray:
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, : rgb.shape[1] // 2] = np.linspace(0, 254, rgb.shape[0], dtype=np.uint8)[:, None]  # partial
    return np.dstack([rgb, alpha])


@pytest.mark.parametrize("kind", ["L", "LA", "RGB", "RGBA", "RGBA_opaque"])
@pytest.mark.parametrize("channels", ["gray", "rgb"])
def test_array_items_are_repaired_exactly_like_the_same_picture_as_a_png(kind: str, channels: str) -> None:
    rgb = natural_image(7, 24)[:, :20]
    arr = {"L": np.asarray(Image.fromarray(rgb).convert("L")), "RGB": rgb, "RGBA": _with_alpha(rgb),
           "RGBA_opaque": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])}.get(kind)
    if kind == "LA":
        arr = _with_alpha(rgb)[:, :, [0, 3]]
    mode = kind.split("_")[0]
    png = encode(Image.fromarray(arr if arr.ndim == 3 else arr, mode=mode), "PNG")
    bg = (30, 200, 90)
    from_file = decode_image(png, channels=channels, background=bg)  # type: ignore[arg-type]
    from_array = normalise_array(arr, channels=channels, background=bg)  # type: ignore[arg-type]
    np.testing.assert_array_equal(from_array.pixels, from_file.pixels)
    assert from_array.repairs == from_file.repairs
    assert pixel_hash(from_array.pixels) == pixel_hash(from_file.pixels)
    assert from_array.source_mode == mode and from_array.source_format == "array"
    if kind in ("RGBA", "LA"):
        assert "alpha_composited" in from_array.repairs


def test_array_items_too_small_or_of_odd_channels_are_rejected() -> None:
    from pipeline.data.images import ImageRejected

    with pytest.raises(ImageRejected) as ei:
        normalise_array(np.zeros((4, 30), np.uint8), channels="gray", min_size=8)
    assert ei.value.reason == "too_small"
    with pytest.raises(ImageRejected) as ei:
        normalise_array(np.zeros((10, 10, 5), np.uint8), channels="gray")
    assert ei.value.reason == "unsupported_mode"


# ---------------------------------------------------------------------------------------------
# Batched hashes equal the per-image ones
# ---------------------------------------------------------------------------------------------


def _reference_phash(pixels: np.ndarray) -> int:
    """pHash as first written: Pillow luma + LANCZOS to 32x32, scipy's orthonormal DCT-II, median."""
    im = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("L")
    small = np.asarray(im.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    coeffs = dctn(small, type=2, norm="ortho")[:8, :8].ravel()
    bits = coeffs > np.median(coeffs)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@pytest.mark.parametrize(("h", "w", "c"), [(8, 8, 1), (28, 28, 1), (64, 48, 3), (13, 100, 1), (200, 150, 3)])
def test_batched_hashes_equal_the_per_image_ones(h: int, w: int, c: int) -> None:
    rng = np.random.default_rng(h * w)
    smooth = np.stack([natural_image(i, max(h, w))[:h, :w] for i in range(6)])  # [6, h, w, 3]
    block = np.concatenate([smooth, rng.integers(0, 256, (6, h, w, 3), dtype=np.uint8)])
    if c == 1:
        block = np.stack([np.asarray(Image.fromarray(b).convert("L")) for b in block])[..., None]
    per_image = np.stack([phash_thumbnail(b) for b in block])
    np.testing.assert_array_equal(phash_thumbnails(block), per_image)  # bit-identical, not close
    assert pixel_hashes(block) == [pixel_hash(b) for b in block]
    hashes = perceptual_hashes(block)
    assert hashes == [perceptual_hash(b) for b in block]
    if min(h, w) >= 28:  # the matrix DCT gives the bits scipy's DCT gives
        assert hashes[:6] == [_reference_phash(b) for b in block[:6]]


# ---------------------------------------------------------------------------------------------
# check_items: worker processes give what one process gives
# ---------------------------------------------------------------------------------------------


def _raw_folder(tmp_path: Path, n_good: int = 30) -> Path:
    src = tmp_path / "src"
    for i in range(n_good):
        d = src / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(natural_image(i, 24)).save(d / f"{i}.png")
    (src / "a" / "empty.png").write_bytes(b"")
    (src / "b" / "cut.jpg").write_bytes(encode(Image.fromarray(natural_image(99, 64)), "JPEG")[:300])
    (src / "b" / "tiny.png").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    p = validate(Data, {"source": "folder", "path": str(src)}, "data")
    download.run(p, tmp_path / "raw", tmp_path / "cache")
    return tmp_path / "raw"


def test_worker_processes_give_the_same_result_as_one_process(tmp_path: Path) -> None:
    raw = _raw_folder(tmp_path)
    df, _ = read_manifest(raw)
    opts = CleanOptions("rgb", (255, 255, 255), 8, 10**7, "first_frame", phash=True)
    one = check_items(df, raw, opts, workers=1, progress=False, file_chunk=4)
    two = check_items(df, raw, opts, workers=2, progress=False, file_chunk=4)  # 9 jobs over 2 processes
    pd.testing.assert_frame_equal(one, two)
    assert sorted(one["item"]) == sorted(df["item"])
    by_origin = dict(zip(df["origin"], one.set_index("item").loc[df["item"], "reason"]))
    assert (by_origin["a/empty.png"], by_origin["b/cut.jpg"], by_origin["b/tiny.png"]) == ("empty", "truncated", "too_small")
    accepted = one[one["status"] == "accepted"]
    assert len(accepted) == 30 and accepted["phash"].notna().all() and (accepted["bytes"] > 0).all()
    # Without near-duplicate search no pHash is computed (the slow half of cleaning).
    no_phash = check_items(df, raw, CleanOptions("rgb", (255, 255, 255), 8, 10**7, "first_frame", phash=False),
                           workers=1, progress=False)
    assert no_phash["phash"].isna().all()
    pd.testing.assert_series_equal(no_phash["pixel_hash"], one["pixel_hash"])


# ---------------------------------------------------------------------------------------------
# Duplicates
# ---------------------------------------------------------------------------------------------


def _frame(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    """rows: (split, status, pixel_hash, phash) -> a manifest-like frame."""
    return pd.DataFrame({
        "item": np.arange(len(rows), dtype=np.int64), "split": [r[0] for r in rows],
        "status": [r[1] for r in rows], "reason": ["" if r[1] == "accepted" else "truncated" for r in rows],
        "detail": [""] * len(rows), "pixel_hash": [r[2] for r in rows],
        "phash": pd.array([r[3] for r in rows], dtype="Int64"), "origin": [f"img{i}.png" for i in range(len(rows))],
    })


def test_exact_duplicates_keep_the_test_copy_and_report_cross_split_groups() -> None:
    df = _frame([("train", "accepted", "A", 0), ("train", "accepted", "B", 0), ("train", "accepted", "A", 0),
                 ("test", "accepted", "A", 0), ("train", "accepted", "B", 0), ("train", "rejected", "", 0),
                 ("test", "accepted", "C", 0), ("test", "accepted", "C", 0)])
    dups = mark_duplicates(df, exact=True, near_distance=0)
    assert list(df["status"]) == ["duplicate", "accepted", "duplicate", "accepted", "duplicate", "rejected",
                                  "accepted", "duplicate"]
    assert list(df["duplicate_of"]) == [3, -1, 3, -1, 1, -1, -1, 6]
    assert (dups["exact"], dups["near"], dups["cross_split_groups"]) == (4, 0, 1)
    assert dups["cross_split_examples"] == [{"kept": "img3.png", "kept_split": "test", "dropped": "img0.png",
                                             "dropped_split": "train"}]
    assert "img3.png" in df.loc[0, "detail"]


def test_near_duplicates_follow_the_threshold() -> None:
    rows = [("train", "accepted", "A", 0b1111), ("train", "accepted", "B", 0b1110), ("test", "accepted", "C", 0b0100)]
    for distance, status in ((0, ["accepted"] * 3), (1, ["accepted", "duplicate", "accepted"]),
                             (3, ["duplicate", "duplicate", "accepted"])):
        df = _frame(rows)
        dups = mark_duplicates(df, exact=True, near_distance=distance)
        assert list(df["status"]) == status, distance
        assert dups["near"] == status.count("duplicate")
    assert dups["cross_split_groups"] == 1  # the test item 2 is kept, the train items 0 and 1 dropped
    df = _frame(rows)
    df["phash"] = pd.array([None] * 3, dtype="Int64")
    with pytest.raises(ValueError, match="perceptual hashes"):
        mark_duplicates(df, exact=False, near_distance=2)


# ---------------------------------------------------------------------------------------------
# The stage: a manifest and a report that account for every input
# ---------------------------------------------------------------------------------------------


def test_clean_stage_accounts_for_every_input(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    good = encode(Image.fromarray(natural_image(1, 32)), "PNG")
    (src / "x" / "good.png").write_bytes(good)
    Image.open(io.BytesIO(good)).save(src / "x" / "same.bmp")  # same pixels: exact duplicate
    (src / "x" / "notes.png").write_text("not an image")
    (src / "x" / ".hidden.png").write_bytes(good)
    (src / "loose.png").write_bytes(good)  # beside the class folder: no label
    p = validate(Data, {"source": "folder", "path": str(src), "channels": "rgb"}, "data")
    download.run(p, tmp_path / "raw", tmp_path / "cache")
    report_path = tmp_path / "reports" / "clean_report.json"
    metrics = clean_stage.run(p, tmp_path / "raw", tmp_path / "clean", report_path, progress=False)

    manifest = pd.read_parquet(tmp_path / "clean" / "manifest.parquet")
    got = dict(zip(manifest["origin"], zip(manifest["status"], manifest["reason"])))
    assert got == {"x/good.png": ("accepted", ""), "x/same.bmp": ("duplicate", "exact_duplicate"),
                   "x/notes.png": ("rejected", "not_an_image"), "x/.hidden.png": ("skipped", "hidden"),
                   "loose.png": ("skipped", "outside_class_folders")}
    assert manifest["item"].is_unique
    import json

    report = json.loads(report_path.read_text())
    assert report["total"] == 5 == report["accepted"] + report["rejected"] + report["duplicates"] + report["skipped"]
    assert report["rejected_by_reason"] == {"not_an_image": 1}
    assert report["skipped_by_reason"] == {"hidden": 1, "outside_class_folders": 1}
    assert report["examples"]["exact_duplicate"] == ["x/same.bmp"]
    assert set(report["reason_help"]) == {"not_an_image", "exact_duplicate", "hidden", "outside_class_folders"}
    assert metrics == report_metrics(report)
    assert metrics["rejected_not_an_image"] == 1 and metrics["skipped_hidden"] == 1
    assert metrics["duplicate_exact_duplicate"] == 1
    assert summarize(manifest, {})["total"] == 5


def test_nothing_accepted_is_an_error_with_a_report(tmp_path: Path) -> None:
    from pipeline.errors import DataError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    p = validate(Data, {"source": "folder", "path": str(src)}, "data")
    download.run(p, tmp_path / "raw", tmp_path / "cache")
    report_path = tmp_path / "clean_report.json"
    with pytest.raises(DataError, match="none of the 1 inputs"):
        clean_stage.run(p, tmp_path / "raw", tmp_path / "clean", report_path, progress=False)
    assert not (tmp_path / "clean").exists()
    assert '"empty": 1' in report_path.read_text()
