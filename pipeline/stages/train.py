"""train: fit the generator (GAN recipe or VAE) on data/augmented; write models/ and reports/train/.

Work in progress lives in ``.pipeline/train/<key>/`` (checkpoint, step log, grids), keyed by the
resolved config and the data and evaluator hashes. It is not a DVC output, so an interrupted
``dvc repro`` (Ctrl-C, SIGTERM, kill -9) resumes there on the next run; a changed param gives a
new key and a fresh start. On success the final files are copied to the declared outputs.

With ``train.devices`` > 1 the stage re-launches itself through torchrun, one process per GPU
(DDP); rank 0 logs, evaluates and writes files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .. import mlflow_models  # noqa: F401 - registers the logger of the generator's MLflow model
from ..errors import OutputError, UserError
from ..io import atomic_copy, check_replaceable, pid_alive, staged_dir, try_flock, work_dir, write_json
from ..params import Params
from .common import add_common, device_from, run_stage, set_determinism, set_threads

log = logging.getLogger(__name__)

SECTIONS = ["train", "base"]

# What train writes under --reports (dvc.yaml: its outs and plots there); nothing else is touched.
REPORT_FILES = ("log.jsonl", "losses.csv", "scores.csv", "summary.json")
GRIDS_OWNS = ("step_*.png",)  # --reports/grids holds only the step grids


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Wall-clock figures differ between two runs of the same commit; they go to MLflow and the private
# work directory's log, not into DVC outputs (which must be byte-identical between identical runs).
TIMING_KEYS = ("images_per_s",)


def read_log(log_path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()] if log_path.exists() else []
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def write_curves(log_path: Path, out_dir: Path) -> None:
    """log.jsonl -> log.jsonl without timings, losses.csv (every logged step) and scores.csv
    (in-loop evaluator scores) for DVC plots."""
    rows = read_log(log_path)
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    # The VAE's objective is its "generator objective": one column name for every model, so
    # `dvc plots diff` can compare a VAE run with a GAN run.
    losses = [dict(r, loss_g=r["loss"]) if "loss" in r and "loss_g" not in r else r for r in rows if "score" not in r]
    scores = [{"step": r["step"], "score": r["score"]} for r in rows if "score" in r]
    for name, data in (("losses.csv", losses), ("scores.csv", scores)):
        cols = sorted({k for r in data for k in r} - {"step"})
        with open(out_dir / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", *cols])
            for r in data:
                w.writerow([r["step"], *(f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, "") for c in cols)])


def run(params: Params, augmented: Path, tensors: Path, evaluator_path: Path | None, models_dir: Path,
        reports_dir: Path, *, tracker: Any = None, progress: bool = True) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from ..data.tensors import load_meta, load_split, require_images  # noqa: PLC0415
    from ..metrics.compute import fid_only, sample  # noqa: PLC0415
    from ..metrics.evaluator import check_memory, extract, load_evaluator  # noqa: PLC0415
    from ..metrics.math import gaussian_stats  # noqa: PLC0415
    from ..training import distributed as dist_utils  # noqa: PLC0415
    from ..training.config import resolve  # noqa: PLC0415
    from ..training.loop import Trainer  # noqa: PLC0415

    info = dist_utils.from_env()
    lock_fd: int | None = None
    if info.is_main:  # before any work: the outputs must be places train may write
        if reports_dir.exists() and not reports_dir.is_dir():
            raise OutputError(f"--reports {reports_dir}: is a file; give a folder (default reports/train)")
        check_replaceable(reports_dir / "grids", GRIDS_OWNS, option="--reports")
        if models_dir.exists() and not models_dir.is_dir():
            raise OutputError(f"--models {models_dir}: is a file; give a folder (default models)")
    set_determinism(params)
    set_threads(params.train.num_threads)
    device = device_from(params)
    if info.enabled and device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
    dist_utils.init(info, device)
    try:
        data = load_split(augmented, "train", mmap=True)  # rows read as the placement needs them
        require_images(augmented, train=data)
        if params.train.conditional:
            _require_every_class(augmented, data)
        if tracker is not None:
            _log_dataset(tracker, params, tensors, load_meta(tensors), data)
        cfg = resolve(params.train, seed=params.base.seed, image_shape=data.shape, num_classes=data.num_classes)
        eval_fn = None
        eval_hash = None
        if evaluator_path is not None and evaluator_path.exists() and info.is_main:
            net, ev_info = load_evaluator(evaluator_path, device=device)
            eval_hash = ev_info["sha256"]
            test = load_split(tensors, "test", mmap=True)  # features only: read batch by batch
            require_images(tensors, test=test)
            _require_fit(evaluator_path, net, test.shape, tensors)
            check_memory(what="train (in-loop evaluator scores)", shape=test.shape,
                         net_width=int(net.trunk[0][0].out_channels), training=False, device=device, knob=None,
                         batch_size=min(500, max(len(test.images), cfg.eval_samples)))  # extract()'s batch
            real_stats = gaussian_stats(extract(net, test.images, device=device)[0])

            def eval_fn(g: torch.nn.Module) -> float:
                imgs, _ = sample(g, cfg.eval_samples, nz=cfg.nz, num_classes=cfg.num_classes,
                                 seed=params.base.seed + 1, device=device)
                return fid_only(real_stats, extract(net, imgs, device=device)[0])

        key = cfg.key(data=_digest(data.meta["splits"]["train"]), evaluator=eval_hash, world_size=info.world_size)
        workdir, lock_fd, private = _claim_workdir(key, info)

        def log_fn(values: dict[str, float], step: int) -> None:
            if tracker is not None:
                tracker.log_metrics(values, step=step)

        trainer = Trainer(cfg, data.images, torch.from_numpy(data.labels), device=device,
                          workdir=workdir, info=info, log_fn=log_fn, eval_fn=eval_fn, progress=progress)
        resumed = trainer.try_resume()
        if not resumed:
            for stale in ("log.jsonl", "best.pt"):
                (workdir / stale).unlink(missing_ok=True)
            shutil.rmtree(workdir / "grids", ignore_errors=True)
            if cfg.init_from:
                trainer.init_from(Path(cfg.init_from), freeze_d_layers=cfg.freeze_d_layers)
        result = trainer.run()
        if not info.is_main:
            return {}
        # Publish: every declared output is written beside its final name and renamed last.
        models_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_generator(models_dir / "generator.pt")
        atomic_copy(workdir / "best.pt", models_dir / "best.pt")
        atomic_copy(trainer.ckpt_path, models_dir / "checkpoint.pt")
        # Each declared output is replaced on its own: reports_dir itself may hold other files (the
        # .gitignore DVC keeps there, or the rest of reports/ when --reports names it).
        reports_dir.mkdir(parents=True, exist_ok=True)
        with staged_dir(reports_dir / "grids", owns=GRIDS_OWNS, option="--reports") as tmp:
            for png in sorted((workdir / "grids").glob("*.png")):
                shutil.copy2(png, tmp / png.name)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp_name:
            tmp = Path(tmp_name)
            write_curves(workdir / "log.jsonl", tmp)
            summary = {"steps": result.step, "best_score": result.best_score, "best_step": result.best_step,
                       "collapsed": result.collapsed, "stopped_early": result.stopped_early,
                       "history": result.history, "config": cfg.to_dict(), "device": device, "world_size": info.world_size,
                       "transfer": result.transfer, "evaluator_sha256": eval_hash}
            write_json(tmp / "summary.json", summary)
            for name in REPORT_FILES:
                atomic_copy(tmp / name, reports_dir / name)
        if tracker is not None:
            tracker.log_artifact(reports_dir / "summary.json", "train")
            for grid in sorted((reports_dir / "grids").glob("step_*.png")):
                # MLflow's image history: the run page's step slider walks through training.
                tracker.log_image(grid, "samples", int(grid.stem.split("_")[1]))
            tracker.log_generator(models_dir / "best.pt", "generator")
            # Provenance, not a result: a resumed run publishes the same files as an uninterrupted one
            # (so DVC's cache and metrics diffs see no change), and the tracker records the resume.
            tracker.set_tags({"train.resumed": resumed})
            if result.transfer:
                tracker.set_tags({"transfer.matched": len(result.transfer["matched"]),
                                  "transfer.new": len(result.transfer["new"])})
        out = {"final_step": result.step, "collapsed": float(result.collapsed)}
        if result.best_score is not None:
            out.update(best_score=result.best_score, best_step=result.best_step)
        if private:
            shutil.rmtree(workdir, ignore_errors=True)  # published; nothing else can resume from it
        return out
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        dist_utils.shutdown(info)


def _require_every_class(directory: Path, data: Any) -> None:
    """train.conditional: every class must have training images (an empty class would be generated from nothing)."""
    import numpy as np  # noqa: PLC0415

    k = data.num_classes
    if not k or not (data.labels >= 0).all():
        raise UserError(f"train.conditional: true needs class labels, and {directory} is unlabeled; "
                        "set train.conditional: false, or give the dataset class folders")
    counts = np.bincount(data.labels, minlength=k)
    empty = [i for i in range(k) if counts[i] == 0]
    if empty:
        names = data.meta.get("class_names") or [str(i) for i in range(k)]
        shown = ", ".join(repr(names[i]) if i < len(names) else str(i) for i in empty)
        raise UserError(f"train.conditional: class(es) {shown} of {directory} have no training images; a conditional "
                        "generator cannot learn a class from nothing. Add images to those classes, remove them from "
                        "the dataset, or set train.conditional: false")


def _require_fit(evaluator_path: Path, net: Any, shape: tuple[int, int, int], tensors: Path) -> None:
    """The offline evaluator must have been trained on images of this shape (channels, size)."""
    if (net.channels, net.size, net.size) != tuple(shape):
        raise UserError(f"{evaluator_path} was trained on images {net.channels}x{net.size}x{net.size}, {tensors} holds "
                        f"{'x'.join(map(str, shape))}: train an evaluator on these tensors "
                        "(python -m pipeline evaluator --tensors ... --out ...) or pass the matching --evaluator")


def _log_dataset(tracker: Any, params: Params, tensors: Path, meta: dict[str, Any], data: Any) -> None:
    """The training data as the run's MLflow dataset input: source, content digest, size, resolution."""
    c, h, w = data.shape
    counts = {split: int(e.get("count", 0)) for split, e in meta["splits"].items()}
    tracker.log_dataset(
        name=f"{params.data.source}-{h}x{w}", digest=str(meta.get("content_sha256", ""))[:32],
        source={"tensors": str(tensors), "data.source": params.data.source, "data.path": params.data.path,
                "content_sha256": meta.get("content_sha256")},
        profile={"train_images": int(len(data.images)), "preprocessed_splits": counts,
                 "resolution": f"{h}x{w}", "channels": c, "num_classes": data.num_classes,
                 "resize_filter": meta.get("resize", {}).get("filter")},
        schema={"images": f"uint8 [N, {c}, {h}, {w}]", "labels": "int64 [N] (-1: unlabeled)"})


def _claim_workdir(key: str, info: Any) -> tuple[Path, int | None, bool]:
    """The run's work directory, locked for this process: (directory, lock descriptor, private?).

    Configs that differ only in keys that do not change what is computed (train.steps, unless the
    learning rates decay; logging intervals) share a key, so that a longer run resumes a shorter one. Two such runs at once
    (``dvc queue start -j 2`` on a steps sweep) would write one checkpoint and one step log over
    each other; the second therefore trains in a private directory, without resuming, and removes
    it once its outputs are published. Under DDP the ranks share the directory (one checkpoint
    per rank) and no lock is taken.
    """
    workdir = work_dir("train", key)
    if info.enabled:
        return workdir, None, False
    fd = try_flock(workdir / ".lock")
    if fd is not None:
        return workdir, fd, False
    base = workdir.parent
    for stale in base.glob(f"{key}-pid*"):  # private directories of runs that were killed
        pid = stale.name.rsplit("-pid", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    private = work_dir("train", f"{key}-pid{os.getpid()}")
    log.warning("another training run of the same config is using %s; this one trains in %s from step 0 "
                "(no resume) and removes it when done", workdir, private)
    return private, try_flock(private / ".lock"), True


def _launch_torchrun(args: argparse.Namespace, n: int) -> int:
    """Re-run this stage under torchrun with n processes; they see WORLD_SIZE and train with DDP."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "pipeline", "train", *sys.argv[sys.argv.index("train") + 1 :]]
    log.info("train.devices=%d: launching %s", n, " ".join(cmd))
    return subprocess.call(cmd)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--data", type=Path, default=Path("data/augmented"), help="training images")
    parser.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="reference split")
    parser.add_argument("--evaluator", type=Path, default=Path("models/evaluator.pt"),
                        help="offline evaluator for in-loop scores")
    parser.add_argument("--models", type=Path, default=Path("models"), help="output directory")
    parser.add_argument("--reports", type=Path, default=Path("reports/train"), help="curves and grids")


def main(args: argparse.Namespace) -> int:
    from ..params import load_params  # noqa: PLC0415
    from .common import setup_logging  # noqa: PLC0415

    setup_logging(args.verbose)
    if "WORLD_SIZE" not in os.environ:
        try:
            devices = load_params(args.params).train.devices
        except UserError:
            devices = 1  # run_stage reports the params error
        if devices != 1:
            import torch  # noqa: PLC0415

            n = torch.cuda.device_count() if devices == "all" else int(devices)
            if devices == "all" and n < 1:
                raise SystemExit("train.devices: 'all' but no CUDA device is visible")
            if n > 1:
                return _launch_torchrun(args, n)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        # Other ranks train but do not track; rank 0 owns the MLflow run and the outputs.
        run(load_params(args.params), args.data, args.tensors, args.evaluator, args.models, args.reports, progress=False)
        return 0
    return run_stage("train", args, lambda params, tracker: run(
        params, args.data, args.tensors, args.evaluator, args.models, args.reports, tracker=tracker), SECTIONS,
        models=True)
