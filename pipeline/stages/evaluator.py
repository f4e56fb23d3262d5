"""evaluator: train the offline feature network on the real training split (models/evaluator.pt)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..io import write_json
from ..params import Params
from .common import add_common, device_from, run_stage, set_threads

log = logging.getLogger(__name__)

SECTIONS = ["evaluator", "base"]


def run(params: Params, tensors_dir: Path, out_path: Path, report_path: Path, *, progress: bool = True) -> dict[str, Any]:
    from ..data.tensors import load_split, require_images  # noqa: PLC0415
    from ..metrics.evaluator import TEST_CHUNK, check_memory, save_evaluator, train_evaluator  # noqa: PLC0415

    p = params.evaluator
    device = device_from(params)
    train = load_split(tensors_dir, "train", mmap=True)  # in memory only if it fits (train_evaluator decides)
    test = load_split(tensors_dir, "test")
    require_images(tensors_dir, train=train, test=test)
    check_memory(what="evaluator", shape=train.shape, net_width=p.width, batch_size=min(p.batch_size, len(train.images)),
                 training=True, device=device, knob="evaluator.batch_size")
    check_memory(what="evaluator (scoring the test split)", shape=train.shape, net_width=p.width,
                 batch_size=min(TEST_CHUNK, len(test.images)), training=False, device=device, knob=None)
    net, report = train_evaluator(train.images, train.labels, test.images, test.labels, epochs=p.epochs,
                                  batch_size=p.batch_size, lr=p.lr, width=p.width, feature_dim=p.feature_dim,
                                  seed=params.base.seed, device=device, progress=progress)
    c, h, _ = train.shape
    kwargs = {"channels": c, "width": p.width, "feature_dim": p.feature_dim, "num_classes": report["num_classes"], "size": h}
    report["sha256"] = save_evaluator(out_path, net, kwargs=kwargs, report=report)
    write_json(report_path, report)
    log.info("evaluator: %s, %s", report["kind"],
             f"test accuracy {report['test_accuracy']:.4f}" if "test_accuracy" in report
             else f"test reconstruction MSE {report['test_reconstruction_mse']:.4f}")
    if report.get("warning"):
        log.warning("evaluator: WARNING: %s", report["warning"])
    return {k: v for k, v in report.items() if isinstance(v, float)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="real tensors")
    parser.add_argument("--out", type=Path, default=Path("models/evaluator.pt"), help="the trained feature network")
    parser.add_argument("--report", type=Path, default=Path("reports/evaluator.json"),
                        help="test accuracy and hash")


def main(args: argparse.Namespace) -> int:
    def body(params: Params, tracker: Any) -> dict[str, Any]:
        set_threads(0)
        metrics = run(params, args.tensors, args.out, args.report)
        tracker.log_artifact(args.report, "evaluator")
        return metrics

    return run_stage("evaluator", args, body, SECTIONS)
