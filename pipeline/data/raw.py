"""The raw dataset format that the download stage writes and the clean stage reads.

    data/raw/
      manifest.parquet   one row per input item (see COLUMNS)
      source.json        source name, class names, provenance (URLs, hashes), counts
      arrays/<split>.npy uint8 [N, H, W] or [N, H, W, C] for sources that ship pixel arrays
      files/...          image files as found (folders, archives), never decoded here

Array sources (MNIST-style IDX, npz, the embedded default) stay arrays; file sources keep their
original bytes so the clean stage sees exactly what the user gave.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from ..io import atomic_write, read_json, save_npy, write_json

COLUMNS = {
    "item": "int64",    # running index over all items
    "kind": "string",   # "array" or "file"
    "file": "string",   # path relative to data/raw (arrays/<split>.npy or files/...)
    "index": "int64",   # row in the array file; -1 for files
    "label": "int64",   # class index; -1 when unlabeled
    "split": "string",  # "train", "test", or "" when the source has no split
    "origin": "string", # where the item came from, for reports (original path or URL#index)
}


@dataclass
class RawWriter:
    """Collects items and writes the raw format into ``out_dir`` (an empty directory)."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add_array(self, split: str, images: np.ndarray, labels: np.ndarray | None, origin: str) -> None:
        """Add a whole split of uint8 pixels, [N, H, W] (gray) or [N, H, W, C] (C = 1, 3 or 4)."""
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"{origin}: expected uint8 images [N, H, W(, C)], got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{origin}: {len(images)} images but {len(labels)} labels")
        name = f"arrays/{split or 'all'}.npy"
        save_npy(self.out_dir / name, images)
        base = len(self.rows)
        lab = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        for i in range(len(images)):
            self.rows.append({"item": base + i, "kind": "array", "file": name, "index": i, "label": int(lab[i]),
                              "split": split, "origin": f"{origin}#{i}"})

    def add_file(self, src: Path, rel: str, label: int, split: str, origin: str, *, move: bool = False) -> None:
        """Copy (or move) one image file into files/<rel>; it is decoded later by the clean stage."""
        dst = self.out_dir / "files" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(src, dst)
        else:
            shutil.copyfile(src, dst)
        self.rows.append({"item": len(self.rows), "kind": "file", "file": f"files/{rel}", "index": -1,
                          "label": label, "split": split, "origin": origin})

    def finish(self, *, name: str, class_names: list[str], provenance: dict[str, Any]) -> dict[str, Any]:
        if not self.rows:
            raise DataError(f"source {name!r} produced no items; check data.path and data.source")
        df = pd.DataFrame(self.rows, columns=list(COLUMNS)).astype(COLUMNS)
        with atomic_write(self.out_dir / "manifest.parquet") as fh:
            df.to_parquet(fh, index=False)
        info = {
            "source": name,
            "class_names": class_names,
            "items": len(df),
            "splits": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()},
            "labeled": bool((df["label"] >= 0).any()),
            "provenance": provenance,
        }
        write_json(self.out_dir / "source.json", info)
        return info


def read_manifest(raw_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    raw_dir = Path(raw_dir)
    path = raw_dir / "manifest.parquet"
    if not path.is_file():
        raise DataError(f"{path}: not found; run the download stage first (dvc repro download)")
    df = pd.read_parquet(path)
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; re-run the download stage")
    return df, read_json(raw_dir / "source.json")
