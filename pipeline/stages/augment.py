"""augment: originals + ``augment.copies`` albumentations copies of the training split -> data/augmented."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..io import staged_dir, write_json, write_split
from ..params import Params, to_dict
from .common import add_common, run_stage

log = logging.getLogger(__name__)

SECTIONS = ["augment", "base"]


def run(params: Params, tensors_dir: Path, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    from ..data.augment import augment  # noqa: PLC0415
    from ..data.tensors import load_split  # noqa: PLC0415

    p = params.augment
    train = load_split(tensors_dir, "train")
    ops = [to_dict(op) for op in p.ops]
    extra = augment(train.images, ops=ops, copies=p.copies, seed=params.base.seed, workers=p.workers,
                    progress=progress) if p.copies and ops else np.zeros((0, *train.images.shape[1:]), np.uint8)
    images = np.concatenate([train.images, extra])
    labels = np.concatenate([train.labels, np.tile(train.labels, len(extra) // max(1, len(train.labels)))])
    with staged_dir(out_dir) as tmp:
        entry = write_split(tmp, "train", images, labels)
        meta = {k: v for k, v in train.meta.items() if k != "splits"}
        meta.update(splits={"train": entry}, augment={"copies": p.copies if ops else 0, "ops": ops,
                                                      "seed": params.base.seed, "originals": len(train.images)})
        write_json(tmp / "meta.json", meta)
    log.info("augment: %d originals + %d augmented = %d training images", len(train.images), len(extra), len(images))
    return {"images_train": len(images), "augmented": len(extra)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="input tensors")
    parser.add_argument("--out", type=Path, default=Path("data/augmented"), help="output")


def main(args: argparse.Namespace) -> int:
    return run_stage("augment", args, lambda params, tracker: run(params, args.tensors, args.out), SECTIONS)
