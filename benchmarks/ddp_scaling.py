"""DDP scaling of the default GAN recipe on Fashion-MNIST (64x64 DCGAN), 1..N GPUs of one host.

Weak scaling keeps the per-GPU batch fixed (global batch grows with N); strong scaling keeps the
global batch fixed (per-GPU batch shrinks). Each point runs the pipeline's Trainer under torchrun,
one process per GPU, with the gradient all-reduce captured in the step's CUDA graph where the
recipe allows it. Efficiency = images/s(N) / (N x images/s(1)) for weak scaling.

Quality check: after the same number of images seen, with the same global batch, the evaluator
FID of the N-GPU run is compared with two 1-GPU runs of different seeds (the run-to-run spread).

    python benchmarks/ddp_scaling.py [--gpus 1,2,4,8] [--batch 256] [--seconds 6]
    python benchmarks/ddp_scaling.py --cpu-dry-run     # gloo on CPU, tiny sizes: checks the wiring
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common import ROOT, find_fmnist, load_fmnist, machine, parse_overrides, resize_on_device, write_result


from pipeline.training import distributed as dist_utils  # noqa: E402
from pipeline.training.config import resolve  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402

RECIPE = ROOT / "benchmarks" / "recipes" / "fmnist-gpu.yaml"


def child(args: argparse.Namespace) -> None:
    """One rank under torchrun: time steps (and optionally train for a fixed number and score)."""
    info = dist_utils.from_env()
    device = f"cuda:{info.local_rank}" if not args.cpu_dry_run else "cpu"
    dist_utils.init(info, device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    data = load_fmnist(find_fmnist(args.data))
    size = 28 if args.cpu_dry_run else 64
    n_img = 2048 if args.cpu_dry_run else len(data["train_x"])
    images = resize_on_device(data["train_x"][:n_img], size, device)
    train = {**yaml.safe_load(RECIPE.read_text())["train"], **parse_overrides(args.train or ""),
             "batch_size": args.per_gpu_batch,
             # A quality run spans the recipe's schedule (its rates may fall over the second half).
             "steps": args.quality_steps or 10**9}
    if args.cpu_dry_run:
        train.update(ngf=8, ndf=8, nz=16, precision="fp32", channels_last=False, cuda_graph=False)
    cfg = resolve(train, seed=args.seed, image_shape=(1, size, size), num_classes=0)
    labels = torch.zeros(len(images), dtype=torch.long, device=device)
    out: dict[str, Any] = {"world_size": info.world_size, "per_gpu_batch": args.per_gpu_batch}
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, images, labels, device=device, workdir=Path(tmp), info=info, progress=False)
        sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
        if args.quality_steps:
            t0 = time.perf_counter()
            for _ in range(args.quality_steps):
                tr.train_step()
            sync()
            out["quality_train_seconds"] = time.perf_counter() - t0
            if info.is_main and args.evaluator:
                from pipeline.metrics.compute import sample
                from pipeline.metrics.evaluator import extract, load_evaluator
                from pipeline.metrics.math import frechet_distance, gaussian_stats

                net, _ = load_evaluator(Path(args.evaluator), device=device)
                test = resize_on_device(data["test_x"], size, device)
                real = gaussian_stats(extract(net, test, device=device)[0])
                imgs, _ = sample(tr.ema_generator(), 5000, nz=cfg.nz, seed=1, device=device, batch_size=1000)
                out["fid"] = frechet_distance(real, gaussian_stats(extract(net, imgs, device=device)[0]))
            out["images_seen"] = args.quality_steps * args.per_gpu_batch * info.world_size
        else:
            for _ in range(args.warmup):
                tr.train_step()
            sync()
            dist_utils.barrier(info)
            rates = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tr.train_step()
                sync()
                dist_utils.barrier(info)
                rates.append(args.steps * args.per_gpu_batch * info.world_size / (time.perf_counter() - t0))
            out.update(images_per_s=float(np.median(rates)), rounds=rates, graphs=tr.executor.captured)
        tr.check()
    if info.is_main:
        Path(args.result).write_text(json.dumps(out))
    dist_utils.shutdown(info)


def launch(n: int, extra: list[str], env: dict[str, str], *, timeout_s: float = 180) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = fh.name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), "--child", "--result", result, *extra]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        # A hung collective must not take the other points with it: record it and go on.
        return {"error": f"timed out after {timeout_s:.0f} s", "stderr_tail": str(exc.stderr or "")[-2000:]}
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(Path(result).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None)
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=256, help="per-GPU batch for weak scaling, global for strong")
    ap.add_argument("--per-gpu-batch", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per round (3 rounds)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--quality-steps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--quality-images", type=int, default=600_000, help="images seen by each quality run (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evaluator", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train", default=None, help="recipe overrides, key=value[,key=value] (e.g. compile=false)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="gloo on CPU with a tiny model: checks the wiring")
    args = ap.parse_args()
    if args.child:
        return child(args)

    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    available = 2 if args.cpu_dry_run else torch.cuda.device_count()
    wanted = [int(g) for g in args.gpus.split(",")]
    points = [n for n in wanted if n <= available]
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--cpu-dry-run"] if args.cpu_dry_run else [])
    if args.train:
        common += ["--train", args.train]
    if args.data:
        common += ["--data", args.data]
    res: dict[str, Any] = {"machine": machine(), "mode": "cpu-gloo-dry-run" if args.cpu_dry_run else "cuda-nccl",
                           "requested_gpus": wanted, "measured_gpus": points,
                           "not_measured": [n for n in wanted if n > available], "weak": {}, "strong": {}}
    name = "ddp_scaling_cpu_dry_run" if args.cpu_dry_run else "ddp_scaling"
    for n in points:
        res["weak"][n] = launch(n, [*common, "--per-gpu-batch", str(args.batch)], env)
        res["strong"][n] = launch(n, [*common, "--per-gpu-batch", str(max(1, args.batch // n))], env)
        write_result(name, res)
    base = res["weak"].get(1, {}).get("images_per_s")
    for n in points:
        w = res["weak"][n]
        if base and "images_per_s" in w:
            w["efficiency"] = w["images_per_s"] / (n * base)
        s1, sn = res["strong"].get(1, {}).get("images_per_s"), res["strong"][n].get("images_per_s")
        if s1 and sn:
            res["strong"][n]["speedup"] = sn / s1
    if args.quality_images and not args.cpu_dry_run and len(points) > 1:
        from pipeline.metrics.evaluator import save_evaluator, train_evaluator

        data = load_fmnist(find_fmnist(args.data))
        tr64 = resize_on_device(data["train_x"], 64, "cuda").cpu().numpy()
        te64 = resize_on_device(data["test_x"], 64, "cuda").cpu().numpy()
        net, rep = train_evaluator(tr64, data["train_y"], te64, data["test_y"], epochs=3, batch_size=256, lr=2e-3,
                                   width=32, feature_dim=128, seed=0, device="cuda", progress=False)
        ev = Path(tempfile.mkdtemp()) / "evaluator.pt"
        save_evaluator(ev, net, kwargs={"channels": 1, "width": 32, "feature_dim": 128, "num_classes": 10, "size": 64},
                       report=rep)
        steps = args.quality_images // args.batch
        q = {}
        for label, n, seed in (("1gpu_seed0", 1, 0), ("1gpu_seed1", 1, 1), (f"{max(points)}gpu_seed0", max(points), 0)):
            q[label] = launch(n, [*common, "--per-gpu-batch", str(args.batch // n), "--quality-steps", str(steps),
                                  "--evaluator", str(ev), "--seed", str(seed)], env)
        spread = abs(q["1gpu_seed0"].get("fid", np.nan) - q["1gpu_seed1"].get("fid", np.nan))
        multi = q[f"{max(points)}gpu_seed0"].get("fid", np.nan)
        q["run_to_run_spread_fid"] = spread
        q["multi_minus_1gpu_fid"] = multi - q["1gpu_seed0"].get("fid", np.nan)
        q["within_spread"] = bool(abs(q["multi_minus_1gpu_fid"]) <= max(spread, 0.05 * q["1gpu_seed0"].get("fid", 0)))
        res["quality_same_images_seen"] = q
    path = write_result(name, res)
    print(f"wrote {path}")
    for kind in ("weak", "strong"):
        for n, r in res[kind].items():
            print(kind, n, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "rounds"})


if __name__ == "__main__":
    main()
