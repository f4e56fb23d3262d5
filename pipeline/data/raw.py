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
    """Collects items and writes the raw format into ``out_dir`` (an empty directory).

    Items are numbered in the order they are added. Array splits are recorded as whole columns
    (70,000 rows cost milliseconds); files one row each.
    """

    out_dir: Path
    parts: list[pd.DataFrame] = field(default_factory=list)
    file_rows: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0

    def _flush_files(self) -> None:
        if self.file_rows:
            self.parts.append(pd.DataFrame(self.file_rows, columns=list(COLUMNS)).astype(COLUMNS))
            self.file_rows = []

    def add_array(self, split: str, images: np.ndarray, labels: np.ndarray | None, origin: str) -> None:
        """Add a whole split of uint8 pixels, [N, H, W] (gray) or [N, H, W, C] (C = 1 to 4)."""
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"{origin}: expected uint8 images [N, H, W(, C)], got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{origin}: {len(images)} images but {len(labels)} labels")
        name = f"arrays/{split or 'all'}.npy"
        if (self.out_dir / name).exists():
            raise DataError(f"{origin}: split {split!r} was added twice; a source writes each split once")
        save_npy(self.out_dir / name, images)
        n = len(images)
        self._flush_files()
        lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        self.parts.append(pd.DataFrame({
            "item": np.arange(self.count, self.count + n, dtype=np.int64), "kind": "array", "file": name,
            "index": np.arange(n, dtype=np.int64), "label": lab, "split": split,
            "origin": [f"{origin}#{i}" for i in range(n)],
        }, columns=list(COLUMNS)).astype(COLUMNS))
        self.count += n

    def add_file(self, src: Path, rel: str, label: int, split: str, origin: str, *, move: bool = False) -> None:
        """Copy (or move) one image file into files/<rel>; it is decoded later by the clean stage."""
        dst = self.out_dir / "files" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(src, dst)
        else:
            shutil.copyfile(src, dst)  # streams: a file larger than RAM is fine
        self.file_rows.append({"item": self.count, "kind": "file", "file": f"files/{rel}", "index": -1,
                               "label": int(label), "split": split, "origin": origin})
        self.count += 1

    def finish(self, *, name: str, class_names: list[str], provenance: dict[str, Any]) -> dict[str, Any]:
        self._flush_files()
        if not self.count:
            raise DataError(f"source {name!r} produced no items; {explain_skipped(provenance.get('skipped', []))}"
                            "check data.path and data.source")
        df = pd.concat(self.parts, ignore_index=True) if len(self.parts) > 1 else self.parts[0]
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


# Why the download stage left an input out (it is listed in source.json and the clean report).
SKIP_REASONS = {
    "hidden": "a hidden file or folder (name starts with '.', or a __MACOSX folder)",
    "symlink_not_followed": "a symbolic link; links are never followed",
    "not_a_regular_file": "a device, pipe or socket",
    "outside_class_folders": "a file beside the class folders, which has no label",
    "outside_split_folders": "a file beside the train/test folders, in neither split",
    "empty_folder": "a class folder with no readable file inside; it is not made a class",
    "name_not_utf8": "a file or folder name that is not valid UTF-8; rename it",
    "unreadable": "a file or folder that cannot be read (permissions); fix its permissions",
}


def explain_skipped(skipped: list[dict[str, str]]) -> str:
    """One sentence on what was skipped and why (for the "no items" error), or "" when nothing was."""
    if not skipped:
        return ""
    by: dict[str, list[str]] = {}
    for s in skipped:
        by.setdefault(s["reason"], []).append(s["path"])
    parts = []
    for reason, paths in sorted(by.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(repr(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        parts.append(f"{len(paths)} skipped as {reason} ({SKIP_REASONS.get(reason, reason)}: {shown})")
    hint = ""
    if "outside_class_folders" in by:
        hint = (" Files beside class folders have no label: put every image inside a class folder, or remove the "
                "folders (a flat folder is read unlabeled).")
    return "; ".join(parts) + "." + hint + " "


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
