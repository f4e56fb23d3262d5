"""Tests for resizing, splitting and sharding (pipeline.data.preprocess and the preprocess stage).

Filters are checked against exact references where one exists (box and area averaging on an
integer factor are block means); the memory bound is checked by counting the bytes numpy
allocates while a folder is turned into tensors, not by timing.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_images import natural_image
from PIL import Image

from pipeline.data.clean import CleanOptions
from pipeline.data.preprocess import assign_splits, build_tensors, model_compatible, resize
from pipeline.data.tensors import load_split
from pipeline.errors import DataError, ParamsError
from pipeline.io import read_split
from pipeline.params import Data, Params, Preprocess, load_params, validate
from pipeline.stages import clean as clean_stage
from pipeline.stages import download
from pipeline.stages import preprocess as preprocess_stage


def block_mean(a: np.ndarray, fy: int, fx: int) -> np.ndarray:
    h, w, c = a.shape
    return a.reshape(h // fy, fy, w // fx, fx, c).astype(np.float64).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# resize: policies and filters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filter", ["box", "area"])
def test_integer_downscale_with_box_and_area_is_the_block_mean(filter: str) -> None:
    # OpenCV rounds once; Pillow rounds to 8 bits after each of its two separable passes.
    tol = (0.5 if filter == "area" else 1.0) + 1e-9
    img = natural_image(1, 64)[:32]  # [32, 64, 3], wider than tall
    # crop: the centred 32x32 window (columns 16..47), halved.
    out = resize(img, 16, policy="crop", filter=filter, fill=0)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out - block_mean(img[:, 16:48], 2, 2)).max() <= tol
    # stretch: the whole image to 16x16, a factor of 2 down and 4 across.
    out = resize(img, 16, policy="stretch", filter=filter, fill=0)
    assert np.abs(out - block_mean(img, 2, 4)).max() <= tol
    # letterbox: padded to 64x64 with the fill (16 rows above and below), then quartered.
    out = resize(img, 16, policy="letterbox", filter=filter, fill=7)
    assert (out[:4] == 7).all() and (out[12:] == 7).all()
    assert np.abs(out[4:12] - block_mean(img, 4, 4)).max() <= tol
    gray = img[:, :, :1]
    assert resize(gray, (8, 16), policy="stretch", filter=filter, fill=0).shape == (8, 16, 1)


def test_non_square_targets_follow_the_target_aspect_ratio() -> None:
    img = natural_image(2, 60)  # [60, 60, 3]
    # crop to 3:4 (h:w): the full width and the centred 45 rows (7..51), then 2/3 of that.
    out = resize(img, (30, 40), policy="crop", filter="area", fill=0)
    import cv2

    ref = cv2.resize(np.ascontiguousarray(img[7:52]), (40, 30), interpolation=cv2.INTER_AREA)
    assert out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, ref)
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(img[7:52])).resize((40, 30), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(resize(img, (30, 40), policy="crop", filter="lanczos", fill=0), ref)
    # letterbox to 3:4: 60 rows padded to 80 columns (10 fill columns on each side), then halved.
    out = resize(img, (30, 40), policy="letterbox", filter="box", fill=255)
    assert (out[:, :5] == 255).all() and (out[:, 35:] == 255).all()
    assert np.abs(out[:, 5:35] - block_mean(img, 2, 2)).max() <= 1 + 1e-9
    assert resize(img, (60, 60), policy="crop", filter="lanczos", fill=0) is img  # nothing to do


def test_the_filter_changes_the_pixels() -> None:
    img = natural_image(3, 100)
    outs = {f: resize(img, 28, policy="stretch", filter=f, fill=0) for f in ("lanczos", "bicubic", "bilinear", "box",
                                                                                  "area", "nearest")}
    for a in outs:
        for b in outs:
            if a < b and not {a, b} == {"box", "area"}:
                assert not np.array_equal(outs[a], outs[b]), (a, b)


def test_model_compatible_sizes() -> None:
    assert all(model_compatible(s, s) for s in (28, 32, 56, 64, 128, 256))
    assert not any(model_compatible(h, w) for h, w in ((30, 30), (48, 48), (64, 32), (100, 100)))


# ---------------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------------


def test_size_is_n_or_height_width() -> None:
    assert validate(Preprocess, {"size": 64}, "preprocess").hw == (64, 64)
    assert validate(Preprocess, {"size": [48, 64]}, "preprocess").hw == (48, 64)
    for bad in ([64], [64, 64, 3], [4, 64], 2000, "64"):
        with pytest.raises(ParamsError, match="preprocess.size"):
            validate(Preprocess, {"size": bad}, "preprocess")
    with pytest.raises(ParamsError, match="filter"):
        validate(Preprocess, {"filter": "cubic"}, "preprocess")


def test_params_yaml_values_equal_the_schema_defaults() -> None:
    from dataclasses import asdict

    assert asdict(load_params(Path(__file__).parents[1] / "params.yaml").data) == asdict(Data())
    assert asdict(load_params(Path(__file__).parents[1] / "params.yaml").preprocess) == asdict(Preprocess())


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


def test_split_is_stratified_and_deterministic() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    df = pd.DataFrame({"label": labels, "split": [""] * len(labels)})
    a = assign_splits(df, test_fraction=0.2, seed=3)
    assert np.array_equal(a, assign_splits(df, test_fraction=0.2, seed=3))
    counts = {k: int(((labels == k) & (a == "test")).sum()) for k in range(3)}
    assert counts == {0: 2, 1: 1, 2: 0}  # round(n * 0.2), at least 1 when n >= 2, never the whole class
    assert any(not np.array_equal(a, assign_splits(df, test_fraction=0.2, seed=s)) for s in range(4, 8))
    unlabeled = pd.DataFrame({"label": [-1] * 50, "split": [""] * 50})
    assert (assign_splits(unlabeled, test_fraction=0.3, seed=0) == "test").sum() == 15
    own = pd.DataFrame({"label": [0, 0, 1, 1], "split": ["train", "test", "train", "train"]})
    assert list(assign_splits(own, test_fraction=0.5, seed=0)) == ["train", "test", "train", "train"]


# ---------------------------------------------------------------------------------------------
# build_tensors: shards and memory
# ---------------------------------------------------------------------------------------------


def _prepared(tmp_path: Path, data: dict, *, clean_params: dict | None = None) -> tuple[Path, Path, Data]:
    """download + clean through the stages' run functions; returns (raw, clean) directories."""
    p = validate(Data, {**data, **(clean_params or {})}, "data")
    download.run(p, tmp_path / "raw", tmp_path / "cache")
    clean_stage.run(p, tmp_path / "raw", tmp_path / "clean", tmp_path / "clean_report.json", progress=False)
    return tmp_path / "raw", tmp_path / "clean", p


def test_shards_are_bounded_and_read_back_in_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    npz = tmp_path / "a.npz"
    np.savez(npz, images=images, labels=np.arange(50) % 5)
    raw, clean, _ = _prepared(tmp_path, {"source": "npz", "path": str(npz)})
    manifest = pd.read_parquet(clean / "manifest.parquet")
    out = tmp_path / "tensors"
    out.mkdir()
    shard_bytes = 5000  # 6 images of 784 bytes per shard
    meta = build_tensors(manifest, raw, out, CleanOptions("gray", (255, 255, 255), 8, 10**7, "first_frame"),
                         size=28, policy="crop", filter="lanczos", fill=0, test_fraction=0.2, seed=0,
                         shard_bytes=shard_bytes, workers=1, progress=False)
    train = meta["splits"]["train"]
    assert train["count"] == 40 and len(train["shards"]) == 7 and [s["count"] for s in train["shards"]] == [6] * 6 + [4]
    for s in train["shards"] + meta["splits"]["test"]["shards"]:
        assert (out / s["file"]).stat().st_size <= shard_bytes + 128  # + the .npy header
    x, y = read_split(out, train)
    split = assign_splits(pd.DataFrame({"label": np.arange(50) % 5, "split": [""] * 50}), test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(x[:, 0], images[split == "train"])  # manifest order kept within the split
    np.testing.assert_array_equal(y, (np.arange(50) % 5)[split == "train"])
    assert meta["split"]["method"] == "stratified"
    assert meta["split"]["per_class"]["test"] == {str(k): 2 for k in range(5)}


def test_memory_stays_bounded_by_a_shard_and_a_batch(tmp_path: Path) -> None:
    """Peak allocations do not grow with the pixels: 300 or 600 images, about the same peak.

    tracemalloc counts what numpy and Python allocate (numpy registers its buffers with it); the
    pixels of each file are decoded and dropped one at a time, batches are small and one shard
    buffer is reused. What remains is fixed: one shard, a window of batches, and the 1 MiB read
    buffer of the sha256 of each written file. A version that gathered all images before writing
    (as the stage once did through np.concatenate) would need the whole 7.4 MB output here, and
    twice as much for twice the images. RSS follows the same bound plus the interpreter.
    """
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(600):  # 600 RGB 64x64 images: 7.4 MB of output pixels
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"{i:03d}.png", compress_level=0)
    raw, clean, _ = _prepared(tmp_path, {"source": "folder", "path": str(src), "channels": "rgb", "dedup": False})
    manifest = pd.read_parquet(clean / "manifest.parquet")
    shard_bytes, batch_bytes = 256 << 10, 64 << 10
    opts = CleanOptions("rgb", (255, 255, 255), 8, 10**7, "first_frame")

    def peak_for(n: int) -> tuple[int, dict]:
        out = tmp_path / f"tensors{n}"
        out.mkdir()
        tracemalloc.start()
        try:
            meta = build_tensors(manifest.iloc[:n], raw, out, opts, size=64, policy="crop", filter="lanczos", fill=0,
                                 test_fraction=0.2, seed=0, shard_bytes=shard_bytes, workers=1, progress=False,
                                 batch_bytes=batch_bytes)
            return tracemalloc.get_traced_memory()[1], meta
        finally:
            tracemalloc.stop()

    peak_for(10)  # warm-up: Pillow's plugins and other lazy imports are allocated once
    small, _ = peak_for(300)
    peak, meta = peak_for(600)
    total = sum(e["count"] for e in meta["splits"].values()) * 3 * 64 * 64
    assert total == 600 * 12288 == 2 * 300 * 12288
    # What grows is the manifest's metadata (a few hundred bytes a row), not pixels (12,288 bytes an image).
    assert (peak - small) / 300 < 1024, f"peak grew from {small} to {peak} bytes with 300 more images"
    # One shard buffer, a window of batches, the 1 MiB read buffer of sha256_file, ~1 KB of metadata
    # per row, and 256 KiB for the interpreter's own churn.
    budget = shard_bytes + 4 * batch_bytes + (1 << 20) + 600 * 1024 + (256 << 10)
    assert peak < budget < total / 3, f"peak {peak} bytes (budget {budget}) for {total} bytes of output"
    assert len(meta["splits"]["train"]["shards"]) == -(-480 // (shard_bytes // 12288))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def test_stage_non_square_letterbox_meta_and_determinism(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    for k, cls in enumerate(("cats", "dogs")):
        (src / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(natural_image(10 * k + i, 40)[:, :30]).save(src / cls / f"{i}.png")  # 40 high, 30 wide
    raw, clean, data = _prepared(tmp_path, {"source": "folder", "path": str(src), "channels": "rgb"})
    params = Params(data=data, preprocess=validate(Preprocess, {"size": [24, 32], "resize": "letterbox", "fill": 9,
                                                                 "filter": "area"}, "preprocess"))
    preprocess_stage.run(params, clean, raw, tmp_path / "t1", progress=False)
    preprocess_stage.run(params, clean, raw, tmp_path / "t2", progress=False)
    meta = json.loads((tmp_path / "t1" / "meta.json").read_text())
    assert meta["image_shape"] == [3, 24, 32]
    assert meta["resize"]["filter_library"].startswith("OpenCV ") and meta["resize"]["policy"] == "letterbox"
    assert meta["resize"]["size"] == [24, 32] and meta["model_compatible"] is False
    assert meta["class_names"] == ["cats", "dogs"] and meta["num_classes"] == 2 and meta["labeled"]
    assert meta["normalisation"].startswith("x / 127.5 - 1")
    assert "train only on square sizes" in caplog.text
    train = load_split(tmp_path / "t1", "train")
    assert train.images.shape[1:] == (3, 24, 32)
    # A 40x30 picture letterboxed to 3:4 is padded to 53 columns (11 fill left, 12 right); scaled by
    # 32/53, output columns 0..5 and 25..31 cover fill only, the middle ones the picture.
    assert (train.images[:, :, :, :6] == 9).all() and (train.images[:, :, :, 25:] == 9).all()
    assert (train.images[:, :, :, 7:24] != 9).mean() > 0.9
    for f in sorted(p.name for p in (tmp_path / "t1").iterdir()):
        assert (tmp_path / "t1" / f).read_bytes() == (tmp_path / "t2" / f).read_bytes(), f


def test_a_raw_file_changed_after_clean_is_caught(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):  # 8: a run needs at least 2 images in each split
        Image.fromarray(natural_image(i, 32)).save(src / f"{i}.png")
    raw, clean, data = _prepared(tmp_path, {"source": "folder", "path": str(src)})
    params = Params(data=data, preprocess=validate(Preprocess, {"size": 32}, "preprocess"))
    Image.fromarray(natural_image(50, 32)).save(raw / "files" / "1.png")  # another valid picture
    metrics = preprocess_stage.run(params, clean, raw, tmp_path / "t", progress=False)
    assert metrics["decode_mismatches"] == 1
    (raw / "files" / "2.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="2.png: accepted by the clean stage but now not_an_image"):
        preprocess_stage.run(params, clean, raw, tmp_path / "t3", progress=False)
    assert not (tmp_path / "t3").exists()
