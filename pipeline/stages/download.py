"""download: materialise ``data.source`` as the raw format in data/raw (see pipeline.data.raw)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError
from ..io import check_replaceable, staged_dir
from ..params import Data, Params
from .common import add_common, run_stage

if TYPE_CHECKING:
    from ..data.sources import Resources

log = logging.getLogger(__name__)

SECTIONS = ["data"]

# Top-level entries of data/raw (pipeline.data.raw.RawWriter): anything else there is not ours.
OWNS = ("source.json", "manifest.parquet", "arrays", "files")


def check_out(p: Data, out_dir: Path) -> None:
    """Refuse an output folder that is (or holds, or lies in) the input data.path, or holds files of its own."""
    import os  # noqa: PLC0415

    if p.path and "://" not in p.path:
        src = os.path.realpath(os.path.expanduser(p.path))
        dst = os.path.realpath(out_dir)
        for a, b in ((src, dst), (dst, src)):
            if a == b or b.startswith(a.rstrip(os.sep) + os.sep):
                raise OutputError(f"--out {out_dir}: overlaps data.path {p.path} (the images to read); the download "
                                  "stage replaces its output folder whole, so your files would be lost. Nothing was "
                                  "changed. Leave --out at its default (data/raw) or choose a new folder.")
    check_replaceable(out_dir, OWNS)


def run(p: Data, out_dir: Path, cache_dir: Path, *, resources: Resources | None = None) -> dict[str, Any]:
    """Write the raw dataset for ``p.source`` into ``out_dir`` (replaced only on success).

    resources: the pinned files of a standard dataset; None (always, outside tests) means the
    production pins of :func:`pipeline.data.sources.standard_resources`.
    """
    from ..data.raw import RawWriter  # noqa: PLC0415
    from ..data.sources import get_source  # noqa: PLC0415

    source = get_source(p.source)  # unknown names fail before anything is written
    check_out(p, out_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir, owns=OWNS) as tmp:
        writer = RawWriter(tmp)
        class_names, provenance = source(p, writer, cache_dir, resources=resources)
        info = writer.finish(name=p.source, class_names=class_names, provenance=provenance)
    skipped = len(provenance.get("skipped", []))
    log.info("download: %s -> %s: %d items %s%s", p.source, out_dir, info["items"], info["splits"],
             f", {skipped} inputs skipped (listed in source.json)" if skipped else "")
    if "limit" in provenance:
        log.info("download: data.limit=%s kept %s", p.limit, provenance["limit"])
    return {"items": info["items"], "skipped": skipped,
            **{f"items_{k or 'unsplit'}": v for k, v in info["splits"].items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="raw dataset directory")
    parser.add_argument("--cache", type=Path, default=Path("data/downloads"),
                        help="download cache, reused across runs, not a DVC output")


def main(args: argparse.Namespace) -> int:
    def body(params: Params, tracker: Any) -> dict[str, Any]:
        metrics = run(params.data, args.out, args.cache)
        tracker.log_artifact(args.out / "source.json", "download")
        return metrics

    return run_stage("download", args, body, SECTIONS)
