"""Tests for the augment stage: byte-identical output for any worker count, and op validation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers_images import natural_image
from PIL import Image

from pipeline.data.augment import augment, build_pipeline
from pipeline.data.tensors import load_split
from pipeline.errors import UserError
from pipeline.io import write_json, write_split
from pipeline.params import Augment, Base, Params, validate
from pipeline.stages import augment as augment_stage

OPS = [
    {"name": "HorizontalFlip", "args": {"p": 0.5}},
    {"name": "Affine", "args": {"translate_percent": [-0.1, 0.1], "rotate": [-15, 15], "p": 0.9}},
    {"name": "RandomBrightnessContrast", "args": {"p": 0.5}},
    {"name": "CoarseDropout", "args": {"num_holes_range": [1, 2], "hole_height_range": [3, 6],
                                       "hole_width_range": [3, 6], "p": 0.5}},
]


def _tensors(tmp_path: Path, n: int = 24) -> tuple[Path, np.ndarray, np.ndarray]:
    """A data/tensors directory of n gray 28x28 pictures with labels, as preprocess writes it."""
    images = np.stack([np.asarray(Image.fromarray(natural_image(i, 28)).convert("L"))[None] for i in range(n)])
    labels = np.arange(n, dtype=np.int64) % 3
    d = tmp_path / "tensors"
    d.mkdir()
    write_json(d / "meta.json", {"splits": {"train": write_split(d, "train", images, labels)}, "num_classes": 3,
                                 "image_shape": [1, 28, 28]})
    return d, images, labels


def _params(workers: int, seed: int = 0, copies: int = 2, ops: list | None = None) -> Params:
    return Params(base=Base(seed=seed),
                  augment=validate(Augment, {"copies": copies, "ops": OPS if ops is None else ops, "workers": workers},
                                   "augment"))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_one_and_four_workers_write_the_same_bytes(tmp_path: Path) -> None:
    tensors, images, labels = _tensors(tmp_path)
    # chunk=5: 5 chunks per copy, so 4 workers each get other images than 1 worker's single pass
    augment_stage.run(_params(workers=1), tensors, tmp_path / "w1", progress=False, chunk=5)
    augment_stage.run(_params(workers=4), tensors, tmp_path / "w4", progress=False, chunk=5)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w4")

    out = load_split(tmp_path / "w1", "train")
    assert out.images.shape == (3 * 24, 1, 28, 28)
    np.testing.assert_array_equal(out.images[:24], images)  # originals first, untouched
    np.testing.assert_array_equal(out.labels, np.tile(labels, 3))
    copies = out.images[24:].reshape(2, 24, 1, 28, 28)
    assert not np.array_equal(copies[0], copies[1])  # each copy has its own seeds
    assert sum(not np.array_equal(c, o) for c, o in zip(copies[0], images)) >= 20  # and really transforms
    assert out.meta["augment"]["copies"] == 2 and out.meta["augment"]["ops"] == OPS


def test_each_image_depends_only_on_seed_copy_and_index(tmp_path: Path) -> None:
    _, images, _ = _tensors(tmp_path, n=12)
    whole = augment(images, ops=OPS, copies=2, seed=7, workers=1, progress=False, chunk=12)
    pieces = augment(images, ops=OPS, copies=2, seed=7, workers=1, progress=False, chunk=5)
    np.testing.assert_array_equal(whole, pieces)
    # The first 6 images alone get the augmentations they get within all 12.
    np.testing.assert_array_equal(augment(images[:6], ops=OPS, copies=1, seed=7, workers=1, progress=False), whole[:6])
    other_seed = augment(images, ops=OPS, copies=2, seed=8, workers=1, progress=False, chunk=12)
    assert not np.array_equal(whole, other_seed)
    assert os.environ.get("NO_ALBUMENTATIONS_UPDATE") == "1"  # no network request on import


def test_no_copies_or_no_ops_writes_the_originals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tensors, images, _ = _tensors(tmp_path, n=6)
    metrics = augment_stage.run(_params(workers=1, ops=[]), tensors, tmp_path / "a", progress=False)
    assert metrics == {"images_train": 6, "augmented": 0} and "augment.ops is empty" in caplog.text
    np.testing.assert_array_equal(load_split(tmp_path / "a", "train").images, images)


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([{"name": "HorizontalFlp", "args": {}}], r"augment.ops\[0\].name: 'HorizontalFlp' is not an albumentations "
                                                   r"transform \(did you mean HorizontalFlip"),
        ([{"name": "HorizontalFlip"}, {"name": "Affine", "args": {"rotation": 10}}],
         r"augment.ops\[1\] \(Affine\): unknown argument\(s\) rotation; Affine takes scale, translate_percent"),
        ([{"name": "HorizontalFlip", "args": {"p": 3}}], r"augment.ops\[0\] \(HorizontalFlip\): bad arguments.*p"),
        ([{"name": "Compose", "args": {}}], r"'Compose' is not an albumentations transform"),
        ([{"name": "__class__", "args": {}}], r"not an albumentations transform"),
    ],
)
def test_bad_ops_are_user_errors_before_any_work(tmp_path: Path, ops: list, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_pipeline(ops)
    # The stage checks the ops before it reads the tensors (which do not exist here).
    with pytest.raises(UserError, match=message):
        augment_stage.run(_params(workers=1, ops=ops), tmp_path / "missing", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_transform_that_changes_the_shape_is_refused(tmp_path: Path) -> None:
    tensors, _, _ = _tensors(tmp_path, n=4)
    ops = [{"name": "RandomCrop", "args": {"height": 20, "width": 20}}]
    with pytest.raises(UserError, match=r"changed the image \(28, 28, 1\) uint8 -> \(20, 20, 1\)"):
        augment_stage.run(_params(workers=1, ops=ops), tensors, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
