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
