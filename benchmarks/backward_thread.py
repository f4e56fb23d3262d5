"""What does running training's backward passes on the calling thread cost in speed?

On CUDA, autograd runs backward passes on a worker thread of its own by default. The engine runs
them on the calling thread instead (``Trainer.backward_on_calling_thread``), since a process's first
StyleGAN2 run parted from an identical second run on the worker thread and not on the calling
thread (``benchmarks/gpu_tests/first_run.py``). This measures what that choice costs: for each
recipe under ``benchmarks/recipes/`` (its size, batch, precision and layout; uncompiled, since a
cold compile takes a minute per family and a compiled network is one node to autograd), in two
executors (eager, and replayed from CUDA graphs, where no autograd runs per step), one trainer
trains in alternating rounds with the backward passes on autograd's worker thread and on the
calling thread. Each round is a whole number of lazy-regularisation intervals, so both settings
see the same mix of step variants. Images are random (speed does not depend on them).

    python benchmarks/backward_thread.py [--recipes fmnist-gpu,fmnist-stylegan2] [--rounds 6]
    python benchmarks/backward_thread.py --device cpu --recipes fmnist-gpu --size 32 --set ngf=8,ndf=8 --steps 4

Writes ``benchmarks/results/backward_thread_<gpu>.json`` (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from common import device_tag, fast_cuda_kernels, machine, make_trainer, parse_overrides, write_result

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "benchmarks" / "recipes"
DEFAULT_RECIPES = ("fmnist-gpu", "fmnist-conditional", "fmnist-sngan", "fmnist-wgan-gp", "fmnist-stylegan2",
                   "fmnist-biggan")
EXECUTORS = {"eager": {"cuda_graph": False}, "cuda_graph": {"cuda_graph": True}}


def recipe_train(name: str, size: int | None, overrides: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(train keys, image size) of recipe ``name``, uncompiled, with ``overrides`` over them."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise SystemExit(f"backward_thread.py: no recipe {name!r} (known: {known})")
    recipe = yaml.safe_load(path.read_text())
    train = {**recipe["train"], "compile": False, "steps": 10**9, **overrides}
    return train, size or int(recipe.get("preprocess", {}).get("size", 64))


def interval(cfg: Any) -> int:
    """Steps after which every step variant of the resolved config ``cfg`` has come round equally
    often (lazy R1, path length)."""
    every = [e for e, on in ((cfg.r1_every, cfg.r1_gamma), (cfg.pl_every, cfg.pl_weight)) if on > 0]
    return math.lcm(*every) if every else 1


def measure(train: dict[str, Any], size: int, device: str, rounds: int, steps: int | None) -> dict[str, Any]:
    """Median seconds per step with the backward passes on each thread, alternating rounds."""
    from pipeline.training.loop import Trainer  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4096, 1, size, size), dtype=torch.uint8, generator=g)
    labels = (torch.arange(len(images)) % 10) if train.get("conditional") else None
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(train, images, Path(tmp), device=device, labels=labels)
        every = interval(tr.cfg)
        per_round = steps or every * max(1, 64 // every)

        def steps_timed(n: int) -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                tr.train_step()
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n

        warm = max(4 * every, 16) if steps is None else steps  # capture of every variant (3 warm-ups each)
        for calling in (False, True):
            Trainer.backward_on_calling_thread = calling
            steps_timed(warm)
        times: dict[str, list[float]] = {"worker": [], "calling": []}
        for i in range(2 * rounds):
            calling = i % 2 == 1
            Trainer.backward_on_calling_thread = calling
            times["calling" if calling else "worker"].append(steps_timed(per_round))
        Trainer.backward_on_calling_thread = True
        tr.check()
        executor = tr.executor.kind if getattr(tr.executor, "enabled", True) else "eager (capture failed)"
    worker, calling_ms = statistics.median(times["worker"]) * 1e3, statistics.median(times["calling"]) * 1e3
    return {"executor": executor, "steps_per_round": per_round, "rounds_each": rounds,
            "worker_thread_step_ms": [round(t * 1e3, 4) for t in times["worker"]],
            "calling_thread_step_ms": [round(t * 1e3, 4) for t in times["calling"]],
            "median_worker_thread_ms": worker, "median_calling_thread_ms": calling_ms,
            "calling_over_worker": calling_ms / worker}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="recipe names under benchmarks/recipes/")
    ap.add_argument("--executors", default=None,
                    help=f"of {', '.join(EXECUTORS)} (default: both on CUDA, eager on the CPU)")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds of each setting (alternating)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per round and warm-up (default: whole lazy-regularisation intervals, about 64)")
    ap.add_argument("--size", type=int, default=None, help="image size over the recipes' (e.g. 32 for a CPU check)")
    ap.add_argument("--set", default="", metavar="KEY=VALUE,...", help="train keys over every recipe's")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--name", default="backward_thread", help="result file name (before the device tag)")
    ap.add_argument("--results", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("backward_thread.py: no CUDA GPU here: run on a CUDA machine, or pass --device cpu "
                         "(where backward passes always run on the calling thread)")
    given = args.executors or ("eager" if args.device == "cpu" else ",".join(EXECUTORS))
    executors = [e for e in given.split(",") if e]
    if not executors or set(executors) - set(EXECUTORS) or (args.device == "cpu" and "cuda_graph" in executors):
        raise SystemExit(f"--executors {given!r}: of {', '.join(EXECUTORS)} (cuda_graph on CUDA only)")
    if args.device == "cuda":
        fast_cuda_kernels()
    overrides = parse_overrides(args.set)
    results: dict[str, Any] = {}
    for name in [r for r in args.recipes.split(",") if r]:
        train, size = recipe_train(name, args.size, overrides)
        for ex in executors:
            row = measure({**train, **EXECUTORS[ex]}, size, args.device, args.rounds, args.steps)
            results.setdefault(name, {})[ex] = row
            print(f"{name} {ex} ({row['executor']}, {size} px, batch {train['batch_size']}): worker thread "
                  f"{row['median_worker_thread_ms']:.3f} ms/step, calling thread {row['median_calling_thread_ms']:.3f}"
                  f" ms/step ({row['calling_over_worker']:.3f}x)", flush=True)
    path = write_result(args.name, {"machine": machine(), "device": device_tag(), "argv": sys.argv[1:],
                                    "overrides": overrides, "size": args.size, "results": results}, args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
