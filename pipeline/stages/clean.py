"""clean: decode, repair, quarantine and dedupe every raw item; write data/clean and its report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..io import atomic_write, check_replaceable, staged_dir, write_json
from ..params import Data, Params
from .common import add_common, run_stage, workers

log = logging.getLogger(__name__)

SECTIONS = ["data"]
OWNS = ("manifest.parquet", "source.json")  # data/clean's entries


def run(p: Data, raw_dir: Path, out_dir: Path, report_path: Path, *, progress: bool = True) -> dict[str, Any]:
    """Check every raw item and write data/clean (manifest + decode options) and the report.

    Returns the report's counts as flat metrics (see :func:`pipeline.data.clean.report_metrics`).
    """
    import pandas as pd  # noqa: PLC0415

    from ..data.clean import (  # noqa: PLC0415
        CleanOptions,
        check_items,
        mark_duplicates,
        report_metrics,
        skipped_rows,
        summarize,
    )
    from ..data.raw import read_manifest  # noqa: PLC0415
    from ..errors import DataError  # noqa: PLC0415

    check_replaceable(out_dir, OWNS)  # before any work
    manifest, source = read_manifest(raw_dir)
    opts = CleanOptions(channels=p.channels, background=tuple(p.background), min_size=p.min_size,  # type: ignore[arg-type]
                        max_pixels=p.max_pixels, animated=p.animated, phash=p.near_dup_distance > 0)
    checked = check_items(manifest, raw_dir, opts, workers=workers(p.workers), progress=progress)
    df = manifest.merge(checked, on="item", how="left", validate="one_to_one")
    provenance = source.get("provenance", {})
    skipped = skipped_rows(provenance.get("skipped", []), first_item=len(manifest))
    df = pd.concat([df, skipped], ignore_index=True) if len(skipped) else df
    df = df.sort_values("item").reset_index(drop=True)
    dups = mark_duplicates(df, exact=p.dedup, near_distance=p.near_dup_distance)
    extra = {"source": source["source"]}
    if "limit" in provenance:
        extra["limit"] = provenance["limit"]
    report = summarize(df, dups, extra=extra)
    write_json(report_path, report)
    if report["accepted"] == 0:
        raise DataError(f"clean: none of the {report['total']} inputs was accepted; see {report_path} for the reasons")
    with staged_dir(out_dir, owns=OWNS) as tmp:
        with atomic_write(tmp / "manifest.parquet") as fh:
            df.to_parquet(fh, index=False)
        # The decode options travel with the manifest: preprocess decodes accepted files again
        # with exactly these, so it needs no params of the clean stage.
        write_json(tmp / "source.json", dict(source, clean_options={
            "channels": opts.channels, "background": list(opts.background), "min_size": opts.min_size,
            "max_pixels": opts.max_pixels, "animated": opts.animated}))
    log.info("clean: %d inputs: %d accepted, %d rejected %s, %d duplicates %s (%d cross-split groups), "
             "%d skipped %s", report["total"], report["accepted"], report["rejected"], report["rejected_by_reason"],
             report["duplicates"], report["duplicates_by_reason"], dups["cross_split_groups"], report["skipped"],
             report["skipped_by_reason"])
    if dups["cross_split_groups"]:
        log.warning("clean: %d duplicate groups spanned train and test (test copies kept, train copies dropped); "
                    "such leaks inflate metrics, see cross_split_examples in %s", dups["cross_split_groups"], report_path)
    return report_metrics(report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="raw dataset")
    parser.add_argument("--out", type=Path, default=Path("data/clean"), help="clean manifest directory")
    parser.add_argument("--report", type=Path, default=Path("reports/clean_report.json"),
                        help="counts per reason with sample paths")


def main(args: argparse.Namespace) -> int:
    def body(params: Params, tracker: Any) -> dict[str, Any]:
        try:
            metrics = run(params.data, args.raw, args.out, args.report)
        finally:
            # The report explains a failure too (no image accepted), so it is logged either way;
            # its counts become metrics through run_stage.
            tracker.log_artifact(args.report, "clean")
        return metrics

    return run_stage("clean", args, body, SECTIONS)
