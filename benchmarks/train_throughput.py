"""Training throughput of DCGAN-64 on Fashion-MNIST: the classic loop vs this pipeline's engine.

One run, one machine, one architecture (nz=100, ngf=ndf=64, 64x64, the classic DCGAN), at batch
64 and 512:

* classic: pytorch/examples' loop (CPU DataLoader with PIL resizing, fp32, Sigmoid + BCELoss);
* engine fp32: the pipeline's Trainer, data on the GPU as uint8, fp32, eager;
* engine fp32 + graph: the same with the whole step captured in a CUDA graph;
* engine bf16 + graph: bf16 autocast, channels_last, fused Adam, TF32, CUDA graph;
* engine fastest: the same with torch.compile'd G and D (BatchNorm and activations fused).

Images/s count real images through D per second. MFU = images/s x FLOPs per image (from
torch.utils.flop_counter over one training step) / the card's measured bf16 matmul peak.

    python benchmarks/train_throughput.py [--data DIR] [--seconds 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import (cuda_time, find_fmnist, load_fmnist, machine, make_trainer, measured_peak_tflops, resize_on_device,
                    step_flops, write_result)

ARCH = {"model": "dcgan", "nz": 100, "ngf": 64, "ndf": 64, "ema_decay": 0.999}
MODES = {
    "engine_fp32": {"precision": "fp32", "channels_last": False, "cuda_graph": False},
    "engine_fp32_graph": {"precision": "fp32", "channels_last": False, "cuda_graph": True},
    "engine_bf16_graph": {"precision": "bf16", "channels_last": True, "cuda_graph": True},
    "engine_fastest": {"precision": "bf16", "channels_last": True, "cuda_graph": True, "compile": True},
}


def engine_rate(images: torch.Tensor, batch: int, mode: dict[str, Any], seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer({**ARCH, **mode, "batch_size": batch, "steps": 10**9}, images, Path(tmp))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):  # warm-up: cuDNN autotuning, torch.compile, graph capture
            tr.train_step()
        torch.cuda.synchronize()
        startup = time.perf_counter() - t0
        probe = cuda_time(tr.train_step, warmup=0, iters=20)
        iters = max(20, int(seconds / 3 / probe))
        sec = cuda_time(tr.train_step, warmup=0, iters=iters)
        tr.check()
        return {"images_per_s": batch / sec, "step_ms": sec * 1e3, "iters_per_round": iters, "startup_seconds": startup,
                "graphs_captured": tr.executor.captured}


def classic_rate(train_x, batch: int, seconds: float) -> dict[str, Any]:
    from classic_dcgan import ClassicDCGAN

    run = ClassicDCGAN(train_x, device="cuda", batch_size=batch, workers=2)
    run.train(max_steps=20)  # warm-up: workers started, cuDNN autotuned
    torch.cuda.synchronize()
    seen = run.images_seen
    spent = run.train(seconds=seconds)
    return {"images_per_s": (run.images_seen - seen) / spent, "workers": 2, "seconds": spent}


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's throughput goals next to what this run measured."""
    rows = result["results"]

    def fastest(batch: int, key: str) -> float:
        return rows.get(f"batch_{batch}", {}).get("engine_fastest", {}).get(key, float("nan"))

    checks = {"batch_64_images_per_s": (fastest(64, "images_per_s"), 30000.0),
              "batch_512_images_per_s": (fastest(512, "images_per_s"), 80000.0),
              "batch_512_mfu": (fastest(512, "mfu_vs_bf16_peak"), 0.25)}
    return {k: {"measured": v, "goal_at_least": g, "met": bool(v >= g)} for k, (v, g) in checks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX directory")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    ap.add_argument("--batches", default="64,512")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    data = load_fmnist(find_fmnist(args.data))
    images = resize_on_device(data["train_x"], 64, "cuda")
    result: dict[str, Any] = {"machine": machine(), "architecture": ARCH | {"size": 64, "channels": 1},
                              "dataset": "Fashion-MNIST train (60,000), resized to 64x64", "results": {}}
    result["peak_bf16_tflops"] = measured_peak_tflops(torch.bfloat16)
    result["peak_tf32_tflops"] = measured_peak_tflops(torch.float32)
    for batch in (int(b) for b in args.batches.split(",")):
        row: dict[str, Any] = {"flops_per_image": step_flops({**ARCH, "batch_size": batch}, images)[1] / batch}
        try:
            row["classic"] = classic_rate(data["train_x"], batch, args.seconds)
        except Exception as exc:  # noqa: BLE001 - record and keep measuring the rest
            row["classic"] = {"error": repr(exc)}
        for name, mode in MODES.items():
            try:
                row[name] = engine_rate(images, batch, mode, args.seconds)
            except Exception as exc:  # noqa: BLE001
                row[name] = {"error": repr(exc)}
        for name in ("classic", *MODES):
            r = row[name]
            if "images_per_s" in r:
                r["mfu_vs_bf16_peak"] = r["images_per_s"] * row["flops_per_image"] / (result["peak_bf16_tflops"] * 1e12)
                if "images_per_s" in row["classic"]:
                    r["x_classic"] = r["images_per_s"] / row["classic"]["images_per_s"]
        result["results"][f"batch_{batch}"] = row
        write_result("train_throughput", result)
    epoch_s = 60000 / result["results"].get("batch_512", {}).get("engine_fastest", {}).get("images_per_s", float("nan"))
    result["fmnist_epoch_seconds_fastest_b512"] = epoch_s
    result["goals"] = goals(result)
    path = write_result("train_throughput", result)
    print(f"wrote {path}")
    for b, row in result["results"].items():
        for name in ("classic", *MODES):
            r = row[name]
            print(f"{b:>10} {name:>18}: " + (f"{r['images_per_s']:9.0f} img/s  MFU {r['mfu_vs_bf16_peak']:.3f}  "
                                              f"x{r.get('x_classic', float('nan')):.1f}" if "images_per_s" in r else r["error"]))


if __name__ == "__main__":
    main()
