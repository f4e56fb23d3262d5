"""preprocess: accepted images -> resized uint8 NCHW shards, train/test split, meta.json."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..io import check_replaceable, read_json, staged_dir, write_json
from ..params import Params
from .common import add_common, run_stage, workers

log = logging.getLogger(__name__)

SECTIONS = ["preprocess", "base"]
OWNS = ("meta.json", "train_*.npy", "test_*.npy")  # data/tensors' entries (pipeline.io.ShardWriter)


def run(params: Params, clean_dir: Path, raw_dir: Path, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Resize the accepted images of data/clean into data/tensors (replaced only on success)."""
    import pandas as pd  # noqa: PLC0415

    from ..data.clean import CleanOptions  # noqa: PLC0415
    from ..data.preprocess import build_tensors  # noqa: PLC0415
    from ..data.tensors import require_images  # noqa: PLC0415
    from ..errors import DataError  # noqa: PLC0415

    p = params.preprocess
    height, width = p.hw
    check_replaceable(out_dir, OWNS)  # before any work
    manifest = clean_dir / "manifest.parquet"
    if not manifest.is_file():
        raise DataError(f"{manifest}: not found; run the clean stage first (dvc repro clean)")
    clean = pd.read_parquet(manifest)
    source = read_json(clean_dir / "source.json")
    co = source["clean_options"]
    opts = CleanOptions(**{**co, "background": tuple(co["background"])})
    accepted = clean["status"] == "accepted"
    with staged_dir(out_dir, owns=OWNS) as tmp:
        meta = build_tensors(clean, raw_dir, tmp, opts, size=(height, width), policy=p.resize, filter=p.filter,
                             fill=p.fill, test_fraction=p.test_fraction, seed=params.base.seed,
                             shard_bytes=p.shard_mb << 20, workers=workers(0), progress=progress)
        # Too few images for a run fails here, with the counts, not later inside the evaluator or FID.
        require_images(out_dir, **{s: meta["splits"].get(s, {}).get("count", 0) for s in ("train", "test")})
        labels_known = bool((clean.loc[accepted, "label"] >= 0).all())
        class_names = source.get("class_names") or []
        if labels_known and not class_names:
            n = int(clean.loc[accepted, "label"].max()) + 1
            class_names = [str(i) for i in range(n)]
        meta.update(source=source["source"], class_names=class_names if labels_known else [],
                    num_classes=len(class_names) if labels_known else 0, labeled=labels_known,
                    channels_policy=opts.channels)
        write_json(tmp / "meta.json", meta)
    counts = {s: e["count"] for s, e in meta["splits"].items()}
    log.info("preprocess: %s at %dx%d (%s, %s): %s", meta["source"], height, width, p.resize,
             meta["resize"]["filter_library"], counts)
    if not meta["model_compatible"]:
        log.warning("preprocess: %dx%d tensors were written, but the bundled models train only on square sizes "
                    "that are 4 or 7 times a power of two (28, 32, 64, 128, ...); set preprocess.size to one of "
                    "those to train here", height, width)
    return {**{f"images_{s}": n for s, n in counts.items()}, "decode_mismatches": meta["decode_mismatches"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--clean", type=Path, default=Path("data/clean"), help="clean manifest")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="raw dataset")
    parser.add_argument("--out", type=Path, default=Path("data/tensors"), help="tensor directory")


def main(args: argparse.Namespace) -> int:
    return run_stage("preprocess", args, lambda params, tracker: run(params, args.clean, args.raw, args.out), SECTIONS,
                     models=True)
