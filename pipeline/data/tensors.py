"""Reading data/tensors and data/augmented: uint8 NCHW shards verified against meta.json hashes.

This module needs only numpy (no pandas, no Pillow) so that training and evaluation run on a GPU
machine with nothing but torch installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..io import ShardedImages, open_split, read_json, read_split


@dataclass(frozen=True)
class TensorSet:
    images: np.ndarray | ShardedImages  # uint8 [N, C, H, W]; left in the shard files when loaded with mmap
    labels: np.ndarray        # int64 [N]; -1 when unlabeled
    meta: dict[str, Any]      # the directory's meta.json

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


# Fewest images a split may hold: the evaluator is scored on the test split, and FID/KID need a
# mean and a covariance of at least two feature rows per set.
MIN_SPLIT_IMAGES = 2


def require_images(directory: Path, **splits: TensorSet | int) -> None:
    """Refuse splits with fewer than :data:`MIN_SPLIT_IMAGES` images, saying how many a run needs and why."""
    counts = {name: (s if isinstance(s, int) else len(s.images)) for name, s in splits.items()}
    short = {name: n for name, n in counts.items() if n < MIN_SPLIT_IMAGES}
    if short:
        have = ", ".join(f"{n} {name}" for name, n in counts.items())
        raise DataError(f"{directory}: {have} image(s); a run needs at least {MIN_SPLIT_IMAGES} images in each of the "
                        "train and test splits (the evaluator is scored on the test split, and FID/KID need the mean "
                        "and covariance of at least 2 feature rows per set). Add images to the dataset (with "
                        "preprocess.test_fraction 0.2 that is at least 8 accepted images of an unlabeled folder), "
                        "or see reports/clean_report.json for those that were rejected")


def load_meta(directory: Path) -> dict[str, Any]:
    meta = read_json(Path(directory) / "meta.json")
    if "splits" not in meta:
        raise DataError(f"{directory}/meta.json: no 'splits' entry; re-run the stage that writes it")
    return meta


def load_split(directory: Path, split: str, *, verify: bool = True, mmap: bool = False) -> TensorSet:
    """Load one split, checking every file's sha256 first (a corrupt cache is caught here).

    mmap: leave the images in their shard files (:class:`~pipeline.io.ShardedImages`, rows read
    on demand), for sets that need not, or cannot, fit in memory.
    """
    directory = Path(directory)
    meta = load_meta(directory)
    if split not in meta["splits"]:
        raise DataError(f"{directory}: no split {split!r}; it has {sorted(meta['splits'])}")
    if mmap:
        sharded, labels = open_split(directory, meta["splits"][split], verify=verify)
        return TensorSet(images=sharded, labels=np.asarray(labels), meta=meta)
    images, labels = read_split(directory, meta["splits"][split], verify=verify)
    return TensorSet(images=np.asarray(images), labels=np.asarray(labels), meta=meta)
