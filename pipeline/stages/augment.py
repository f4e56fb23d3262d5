"""augment: originals + ``augment.copies`` albumentations copies of the training split -> data/augmented."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..io import ShardWriter, check_replaceable, staged_dir, write_json
from ..params import Params, to_dict
from .common import add_common, run_stage

log = logging.getLogger(__name__)

SECTIONS = ["augment", "base"]
OWNS = ("meta.json", "train_*.npy")  # data/augmented's entries


def run(params: Params, tensors_dir: Path, out_dir: Path, *, progress: bool = True,
        chunk: int = 1024) -> dict[str, Any]:
    """Write the training originals followed by ``copies`` augmented copies (copy-major) to ``out_dir``.

    The ops are validated before the tensors are read; the copies are streamed into shards.
    """
    from tqdm import tqdm  # noqa: PLC0415

    from ..data.augment import build_pipeline, iter_augment  # noqa: PLC0415
    from ..data.tensors import load_split  # noqa: PLC0415

    p = params.augment
    check_replaceable(out_dir, OWNS)  # before any work
    ops = [to_dict(op) for op in p.ops]
    copies = p.copies if ops else 0
    if p.copies and not ops:
        log.warning("augment: copies=%d but augment.ops is empty; no copies made (they would equal the originals)",
                    p.copies)
    if copies:
        build_pipeline(ops, check=True)  # a bad op name or argument fails here, before any work
    train = load_split(tensors_dir, "train", mmap=True)  # read chunk by chunk: any size fits
    n = len(train.images)
    with staged_dir(out_dir, owns=OWNS) as tmp:
        writer = ShardWriter(tmp, "train")
        for start in range(0, n, chunk):
            writer.add(train.images[start : start + chunk], train.labels[start : start + chunk])
        with tqdm(total=copies * n, desc="augment", unit="img", disable=not progress or not copies,
                  mininterval=1.0) as bar:
            done = 0
            for part in (iter_augment(train.images, ops=ops, copies=copies, seed=params.base.seed,
                                      workers=p.workers, chunk=chunk) if copies else ()):
                start = done % n  # chunks come in order: copy-major, then image index
                writer.add(part, train.labels[start : start + len(part)])
                done += len(part)
                bar.update(len(part))
        entry = writer.close(shape=train.images.shape[1:])
        meta = {k: v for k, v in train.meta.items() if k != "splits"}
        meta.update(splits={"train": entry}, augment={"copies": copies, "ops": ops, "seed": params.base.seed,
                                                      "originals": n, "per_sample_seed": "SeedSequence([seed, copy, index])"})
        write_json(tmp / "meta.json", meta)
    log.info("augment: %d originals + %d augmented = %d training images", n, copies * n, entry["count"])
    return {"images_train": entry["count"], "augmented": copies * n}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="input tensors")
    parser.add_argument("--out", type=Path, default=Path("data/augmented"), help="output")


def main(args: argparse.Namespace) -> int:
    return run_stage("augment", args, lambda params, tracker: run(params, args.tensors, args.out), SECTIONS)
