"""The evaluation tests' tiny but real project: embedded MNIST through every stage, built once per session.

The evaluate/report/metrics-check tests need what the pipeline really produces -- tensors from
the real embedded digits, a trained evaluator, trained generators (GAN, conditional GAN, VAE),
step logs and grids -- not hand-made stand-ins. The stages' ``run`` functions are called in
process (each ``python -m pipeline`` start would cost seconds of imports) with tiny settings, in a
temporary directory that acts as the project root (``.pipeline/`` work dirs land there).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "base": {"seed": 0, "device": "cpu", "deterministic": True},
    "data": {"source": "mnist-embedded", "limit": 600, "workers": 1},
    "evaluator": {"epochs": 8, "batch_size": 32, "lr": 0.01, "width": 8, "feature_dim": 32},
    "train": {"steps": 40, "batch_size": 32, "nz": 16, "ngf": 8, "ndf": 8, "grid_every": 10, "eval_every": 20,
              "eval_samples": 50, "checkpoint_every": 20, "log_every": 5, "ema_decay": 0.9,
              "kl_warmup_steps": 10, "num_threads": 0},
    "evaluate": {"n_samples": 100, "batch_size": 100, "seeds": 3, "kid_subsets": 5, "bootstrap": 5},
    "report": {"grid_n": 16, "neighbours": 4, "interpolation_steps": 6},
}


@contextlib.contextmanager
def in_dir(path: Path) -> Iterator[None]:
    """cwd = path for the block: stages find the project root (and .pipeline/) from the cwd."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def eval_params(path: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """TINY with per-section overrides, as a params file the real loader validates."""
    raw = copy.deepcopy(TINY)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class TinyData:
    root: Path
    tensors: Path
    augmented: Path
    evaluator: Path
    clean_report: Path


@dataclass
class TinyRun:
    data: TinyData
    root: Path
    params: Path
    models: Path
    train_reports: Path
    metrics: Path
    details: Path
    figures: Path
    html: Path


def build_tiny_data(root: Path) -> TinyData:
    """download -> clean -> preprocess -> augment -> evaluator on 600 embedded MNIST digits, in ``root``."""
    from pipeline.params import load_params
    from pipeline.stages import augment, clean, download, evaluator, preprocess

    params = load_params(eval_params(root / "params.yaml"))
    with in_dir(root):
        download.run(params.data, root / "data/raw", root / "data/downloads")
        clean.run(params.data, root / "data/raw", root / "data/clean", root / "reports/clean_report.json",
                  progress=False)
        preprocess.run(params, root / "data/clean", root / "data/raw", root / "data/tensors", progress=False)
        augment.run(params, root / "data/tensors", root / "data/augmented", progress=False)
        evaluator.run(params, root / "data/tensors", root / "models/evaluator.pt", root / "reports/evaluator.json",
                      progress=False)
    return TinyData(root=root, tensors=root / "data/tensors", augmented=root / "data/augmented",
                    evaluator=root / "models/evaluator.pt", clean_report=root / "reports/clean_report.json")


def run_model(data: TinyData, name: str, overrides: dict[str, dict[str, Any]], *, report: bool = True) -> TinyRun:
    """train -> evaluate (-> report) of one model in its own folder next to the shared data."""
    from pipeline.params import load_params
    from pipeline.stages import evaluate, train
    from pipeline.stages import report as report_stage

    root = data.root / name
    root.mkdir()
    run = TinyRun(data=data, root=root, params=eval_params(root / "params.yaml", overrides), models=root / "models",
                  train_reports=root / "reports/train", metrics=root / "reports/metrics.json",
                  details=root / "reports/eval_details.json", figures=root / "reports/figures",
                  html=root / "reports/index.html")
    params = load_params(run.params)
    with in_dir(root):
        train.run(params, data.augmented, data.tensors, data.evaluator, run.models, run.train_reports, progress=False)
        evaluate.run(params, run.models, data.tensors, data.evaluator, run.metrics, run.details)
        if report:
            report_stage.run(params, run.models, data.tensors, run.train_reports, run.metrics, run.details,
                             data.clean_report, run.figures, run.html)
    return run
