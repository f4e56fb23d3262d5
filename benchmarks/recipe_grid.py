"""The README's GPU sample grid: train the default GPU recipe on Fashion-MNIST and draw 64 samples.

Trains ``benchmarks/recipes/fmnist-gpu.yaml`` (DCGAN-64, batch 512, bf16, CUDA graphs, compiled)
on the full training split resized to 64x64 on the GPU, for the recipe's steps or ``--epochs``,
then writes the EMA generator's samples for 64 fixed latents (seed 1) to
``reports/gpu-recipe-samples.png`` (and to $OUT when set) and what made them to
``benchmarks/results/recipe_grid_<gpu>.json``.

    python benchmarks/recipe_grid.py [--data DIR] [--epochs 40]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import (ROOT, fast_cuda_kernels, find_fmnist, load_fmnist, machine, make_trainer, resize_on_device,
                    write_result)

from pipeline.imaging import save_grid  # noqa: E402
from pipeline.metrics.compute import sample  # noqa: E402

RECIPE = ROOT / "benchmarks" / "recipes" / "fmnist-gpu.yaml"
GRID = ROOT / "reports" / "gpu-recipe-samples.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX directory")
    ap.add_argument("--epochs", type=float, default=None, help="train this many epochs (default: the recipe's steps)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this script needs a CUDA GPU")
    fast_cuda_kernels()
    data = load_fmnist(find_fmnist(args.data))
    images = resize_on_device(data["train_x"], 64, "cuda")
    train = yaml.safe_load(RECIPE.read_text())["train"]
    steps = round(args.epochs * len(images) / train["batch_size"]) if args.epochs else train["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer({**train, "steps": steps}, images, Path(tmp))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tr.check()
        imgs, _ = sample(tr.ema_generator(), 64, nz=tr.cfg.nz, seed=1, device="cuda")
    save_grid(imgs.numpy(), GRID, nrow=8)
    if os.environ.get("OUT"):
        save_grid(imgs.numpy(), Path(os.environ["OUT"]) / GRID.name, nrow=8)
    result = {"machine": machine(), "recipe": str(RECIPE.relative_to(ROOT)), "train": {**train, "steps": steps},
              "epochs": steps * train["batch_size"] / len(images), "train_seconds_with_compile": seconds,
              "grid": str(GRID.relative_to(ROOT)), "latent_seed": 1,
              "command": f"python benchmarks/recipe_grid.py{f' --epochs {args.epochs:g}' if args.epochs else ''}"}
    print(f"{steps} steps in {seconds:.1f} s; wrote {GRID} and {write_result('recipe_grid', result)}")


if __name__ == "__main__":
    main()
