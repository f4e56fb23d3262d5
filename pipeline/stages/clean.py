"""clean: decode, repair, quarantine and dedupe every raw item; write data/clean and its report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..io import atomic_write, staged_dir, write_json
from ..params import Data, Params
from .common import add_common, run_stage, workers

log = logging.getLogger(__name__)

SECTIONS = ["data"]


def run(p: Data, raw_dir: Path, out_dir: Path, report_path: Path, *, progress: bool = True) -> dict[str, Any]:
    from ..data.clean import CleanOptions, check_items, mark_duplicates, summarize  # noqa: PLC0415
    from ..data.raw import read_manifest  # noqa: PLC0415

    manifest, source = read_manifest(raw_dir)
    opts = CleanOptions(channels=p.channels, background=tuple(p.background), min_size=p.min_size,  # type: ignore[arg-type]
                        max_pixels=p.max_pixels, animated=p.animated)
    checked = check_items(manifest, raw_dir, opts, workers=workers(p.workers), progress=progress)
    df = manifest.merge(checked, on="item", how="left", validate="one_to_one").sort_values("item").reset_index(drop=True)
    dup = mark_duplicates(df, exact=p.dedup, near_distance=p.near_dup_distance)
    skipped = source.get("provenance", {}).get("skipped", [])
    report = summarize(df, dup, skipped)
    report["source"] = source["source"]
    if report["accepted"] == 0:
        from ..errors import DataError  # noqa: PLC0415

        write_json(report_path, report)
        raise DataError(f"clean: none of the {report['total']} inputs was accepted; see {report_path} for the reasons")
    with staged_dir(out_dir) as tmp:
        with atomic_write(tmp / "manifest.parquet") as fh:
            df.to_parquet(fh, index=False)
        # The decode options travel with the manifest: preprocess decodes accepted files again
        # with exactly these, so it needs no params of the clean stage.
        write_json(tmp / "source.json", dict(source, clean_options={
            "channels": opts.channels, "background": list(opts.background), "min_size": opts.min_size,
            "max_pixels": opts.max_pixels, "animated": opts.animated}))
    write_json(report_path, report)
    log.info("clean: %d accepted, %d rejected %s, %d duplicates (%d cross-split groups), %d skipped",
             report["accepted"], report["rejected"], report["rejected_by_reason"], report["duplicates"],
             dup["cross_split_groups"], report["skipped"])
    return {"accepted": report["accepted"], "rejected": report["rejected"], "duplicates": report["duplicates"],
            "skipped": report["skipped"], "cross_split_duplicate_groups": dup["cross_split_groups"],
            **{f"rejected_{k}": v for k, v in report["rejected_by_reason"].items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="raw dataset")
    parser.add_argument("--out", type=Path, default=Path("data/clean"), help="clean manifest directory")
    parser.add_argument("--report", type=Path, default=Path("reports/clean_report.json"),
                        help="counts per reason with sample paths")


def main(args: argparse.Namespace) -> int:
    def body(params: Params, tracker: Any) -> dict[str, Any]:
        metrics = run(params.data, args.raw, args.out, args.report)
        tracker.log_artifact(args.report, "clean")
        return metrics

    return run_stage("clean", args, body, SECTIONS)
