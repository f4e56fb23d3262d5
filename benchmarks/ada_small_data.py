"""Small data with and without adaptive discriminator augmentation (ADA), same images seen.

Trains one recipe twice on the same subset of Fashion-MNIST (default 2,000 training images):
``train.ada: false`` and ``true``, from the same seed, for the same steps. Every ``--eval-every``
steps both EMA generators are scored by one offline evaluator (a classifier trained here on the
full training split; FID on its features of ``--n-eval`` samples against the test split). Recorded
per run: the FID curve, best and final (collapse = final worse than best by more than 10%), ADA's p
and r_t over training, and seconds; then the ratio of the best FIDs (the goal: ADA at least 30%
lower).

    python benchmarks/ada_small_data.py [--data DIR] [--subset 2000] [--size 28] [--steps 3000]
                                        [--recipe FILE] [--train 'model=dcgan,batch_size=64'] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common import find_fmnist, load_fmnist, machine, make_trainer, parse_overrides, resize_on_device, write_result

from pipeline.metrics.compute import sample  # noqa: E402
from pipeline.metrics.evaluator import extract, train_evaluator  # noqa: E402
from pipeline.metrics.math import frechet_distance, gaussian_stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder with Fashion-MNIST's idx files (default: the usual places)")
    ap.add_argument("--subset", type=int, default=2000, help="training images (the first N of a fixed permutation)")
    ap.add_argument("--size", type=int, default=28, help="image side (28, 32, 64...)")
    ap.add_argument("--steps", type=int, default=3000, help="generator steps of each run")
    ap.add_argument("--eval-every", type=int, default=500, help="steps between scores")
    ap.add_argument("--n-eval", type=int, default=2000, help="generated images per score")
    ap.add_argument("--recipe", help="recipe file (e.g. benchmarks/recipes/fmnist-stylegan2.yaml) whose train block "
                                     "both runs start from; --train overrides it, --steps replaces its steps")
    ap.add_argument("--train", default="", help="params.train overrides for both runs, 'key=value,...'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_fmnist(find_fmnist(args.data))
    train_all = resize_on_device(data["train_x"], args.size, args.device)
    test = resize_on_device(data["test_x"], args.size, args.device)
    subset = torch.from_numpy(np.random.default_rng(0).permutation(len(train_all))[: args.subset]).to(args.device)
    images = train_all[subset]
    t0 = time.perf_counter()
    net, ev = train_evaluator(train_all.cpu().numpy(), data["train_y"], test.cpu().numpy(), data["test_y"], epochs=2,
                              batch_size=256, lr=2e-3, width=32, feature_dim=128, seed=0, device=args.device,
                              progress=False)
    real = gaussian_stats(extract(net, test, device=args.device)[0])
    recipe = yaml.safe_load(Path(args.recipe).read_text())["train"] if args.recipe else {}
    # r1_gamma 0: as measured before the dcgan recipe took lazy R1 (a --recipe or --train may set it).
    base = {"model": "dcgan", "batch_size": 64, "r1_gamma": 0.0, **recipe, "log_every": 50, "grid_every": 10**9,
            "eval_every": 10**9, "checkpoint_every": 10**9, **parse_overrides(args.train), "steps": args.steps}
    result: dict[str, Any] = {
        "machine": machine(), "device": args.device, "subset": args.subset, "size": args.size, "steps": args.steps,
        "n_eval": args.n_eval, "train": base, "evaluator": {"test_accuracy": ev["test_accuracy"],
                                                          "seconds": time.perf_counter() - t0}, "runs": {}}
    for name, ada in (("no_ada", False), ("ada", True)):
        with tempfile.TemporaryDirectory() as tmp:
            tr = make_trainer({**base, "ada": ada}, images, Path(tmp), device=args.device)
            curve, seconds = [], 0.0
            while tr.step < args.steps:
                t = time.perf_counter()
                for _ in range(min(args.eval_every, args.steps - tr.step)):
                    tr.train_step()
                if args.device != "cpu":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - t
                fakes, _ = sample(tr.ema_generator(), args.n_eval, nz=tr.cfg.nz, seed=1, device=args.device)
                fid = frechet_distance(real, gaussian_stats(extract(net, fakes, device=args.device)[0]))
                point = {"step": tr.step, "images_seen": tr.step * tr.cfg.batch_size, "train_seconds": seconds,
                         "fid": fid}
                if ada:
                    point.update(p=float(tr.objective.ada.p), rt=float(tr.objective.ada.last_rt))
                curve.append(point)
                print(json.dumps({"run": name, **point}), flush=True)
                result["runs"][name] = {"curve": curve, "partial": True}  # written as it goes: a cut run keeps its curve
                write_result(f"ada_small_data{args.tag}", result)
            grid = Path(__file__).resolve().parent / "results" / "grids" / f"ada_small_data_{name}{args.tag}.png"
            from pipeline.imaging import save_grid  # noqa: PLC0415

            with torch.no_grad():
                save_grid(tr.ema_generator()(tr.z_fixed, tr.y_fixed).float(), grid, nrow=8)
        fids = [c["fid"] for c in curve]
        best = min(fids)
        result["runs"][name] = {"curve": curve, "best_fid": best, "best_step": curve[fids.index(best)]["step"],
                                "final_fid": fids[-1], "collapsed": fids[-1] > 1.1 * best, "grid": grid.name,
                                "config": tr.cfg.to_dict()}
    r = result["runs"]
    result["ada_best_over_no_ada_best"] = r["ada"]["best_fid"] / r["no_ada"]["best_fid"]
    result["goal"] = "ADA's best FID at least 30% lower than without it (ratio <= 0.70), no collapse"
    print(write_result(f"ada_small_data{args.tag}", result))


if __name__ == "__main__":
    main()
