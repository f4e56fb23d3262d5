"""Where a training step's time goes on the GPU: the profile behind benchmarks/train_throughput.py.

For each configuration (batch size, precision, CUDA graph, torch.compile, lazy R1) it records:

* start-up: seconds of the first 64 steps (cuDNN autotuning, torch.compile, graph capture);
* steady step time and images/s (median of 3 timed rounds);
* one Fashion-MNIST epoch (ceil(60,000 / batch) steps, lazy-R1 eager steps included);
* a torch.profiler trace of steady steps: kernels per step, GPU busy fraction (kernel time /
  wall time), time per kernel family (convolution forward / data-gradient / weight-gradient,
  BatchNorm, fused Triton kernels, elementwise, reductions, optimizer, copies), the
  convolutions' achieved TFLOP/s against their FLOPs (torch.utils.flop_counter), and the top
  kernels;
* the eager lazy-R1 step on its own, when R1 is on.

    python benchmarks/profile_step.py [--data DIR] [--configs 'NAME;NAME:key=value,...'] [--list]
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common import (ROOT, claim_result_name, cuda_time, fast_cuda_kernels, find_fmnist, load_fmnist, machine,
                    make_trainer, measured_peak_tflops, parse_overrides, resize_on_device, step_flops, write_result)

from pipeline.training.loop import Trainer  # noqa: E402

# r1_gamma 0: as measured before the dcgan recipe took lazy R1.
ARCH = {"model": "dcgan", "nz": 100, "ngf": 64, "ndf": 64, "ema_decay": 0.999, "r1_gamma": 0.0}
FAST = {"precision": "bf16", "channels_last": True, "cuda_graph": True}
RECIPE = yaml.safe_load((ROOT / "benchmarks" / "recipes" / "fmnist-gpu.yaml").read_text())["train"]

CONFIGS: dict[str, dict[str, Any]] = {
    "fastest_b64": {**ARCH, **FAST, "batch_size": 64},
    "fastest_b512": {**ARCH, **FAST, "batch_size": 512},
    "compiled_b64": {**ARCH, **FAST, "compile": True, "batch_size": 64},
    "compiled_b512": {**ARCH, **FAST, "compile": True, "batch_size": 512},
    "fp32_graph_b512": {**ARCH, "precision": "fp32", "channels_last": False, "cuda_graph": True, "batch_size": 512},
    "recipe": dict(RECIPE),
}


def parse_configs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """'name;name:key=value,key=value;...' -> [(label, train config)], each based on CONFIGS[name]."""
    out = []
    for label in filter(None, (c.strip() for c in text.split(";"))):
        name, _, kvs = label.partition(":")
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {name!r}; known: {sorted(CONFIGS)}")
        out.append((label, {**CONFIGS[name], **parse_overrides(kvs)}))
    return out

# Kernel families, first match wins (cuDNN/CUTLASS names carry fprop/dgrad/wgrad).
FAMILIES = [
    ("layout_convert", r"nchwtonhwc|nhwctonchw|transpose"),
    ("conv_dgrad", r"dgrad|bwd_data|backward_data|dconv"),
    ("conv_wgrad", r"wgrad|bwd_filter|backward_filter|wconv"),
    ("conv_fprop", r"fprop|fwd|xmma|implicit|conv|cutlass|sm90_|sm80_|gemm"),
    ("triton_fused", r"^triton_"),
    ("batchnorm", r"batch_norm|batchnorm|bn_|welford"),
    ("optimizer", r"multi_tensor|adam"),
    ("copy", r"copy|memcpy|memset|cat"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|index"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def profile_steps(tr: Trainer, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    fams: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    n_kernels = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = float(ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total)
        fams[family(ev.name)] += us
        kernels[ev.name][0] += us
        kernels[ev.name][1] += 1
        n_kernels += 1
    busy = sum(fams.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "steps": steps, "wall_us_per_step": wall * 1e6 / steps, "kernel_us_per_step": busy / steps,
        "gpu_busy_fraction": busy / (wall * 1e6), "kernels_per_step": n_kernels / steps,
        "families_us_per_step": {k: v / steps for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        "families_share": {k: v / busy for k, v in sorted(fams.items(), key=lambda kv: -kv[1])} if busy else {},
        "top_kernels": [{"name": n[:160], "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps, "family": family(n)}
                        for n, v in top],
    }


def attribute(cfg_train: dict[str, Any], images: torch.Tensor, families: tuple[str, ...] = ("copy", "layout_convert")
              ) -> list[dict[str, Any]]:
    """Which operators (with their callers and input shapes) launch the copy and layout-conversion
    kernels: one eager step of the same configuration, profiled with shapes."""
    from torch.profiler import ProfilerActivity, profile

    eager = {**cfg_train, "compile": False, "cuda_graph": False, "steps": 10**9}
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(eager, images, Path(tmp))
        for _ in range(3):
            tr.train_step()
        while tr.cfg.r1_gamma > 0 and tr.step % tr.cfg.r1_every == 0:
            tr.train_step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            tr.train_step()
            torch.cuda.synchronize()
    rows: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA or not ev.kernels:
            continue
        for k in ev.kernels:
            fam = family(k.name)
            if fam not in families:
                continue
            chain, p = [], ev.cpu_parent
            while p is not None and len(chain) < 3:
                chain.append(p.name)
                p = p.cpu_parent
            key = (fam, ev.name, " < ".join(chain), str(ev.input_shapes)[:120], k.name[:80])
            rows[key][0] += k.duration
            rows[key][1] += 1
    out = [{"family": f, "op": op, "called_from": ch, "input_shapes": sh, "kernel": kn, "us": v[0], "count": v[1]}
           for (f, op, ch, sh, kn), v in rows.items()]
    return sorted(out, key=lambda r: -r["us"])[:25]


def run_config(cfg_train: dict[str, Any], images: torch.Tensor, peak: float) -> dict[str, Any]:
    b = cfg_train["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer({**cfg_train, "steps": 10**9}, images, Path(tmp))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(64):  # compile, autotune, capture (lazy R1 every 16 steps: its graph is captured by step 48)
            tr.train_step()
        torch.cuda.synchronize()
        startup = time.perf_counter() - t0
        row: dict[str, Any] = {"train": cfg_train, "startup_seconds_first_64_steps": startup,
                               "graphs_captured": tr.executor.captured}
        r1 = tr.cfg.r1_gamma > 0
        every = tr.cfg.r1_every if r1 else 0

        def plain() -> None:
            if r1 and tr.step % every == 0:
                tr.step += 1  # skip the R1 step number: this timing is of plain steps only
                tr.monitor.step.add_(1)
            tr.train_step()

        sec = cuda_time(plain, warmup=5, iters=200)
        row["plain_step_ms"] = sec * 1e3
        row["plain_images_per_s"] = b / sec
        if r1:
            times = []
            for _ in range(5):
                while tr.step % every:
                    tr.train_step()
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                tr.train_step()  # a lazy-R1 step
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t1)
            row["r1_step_ms"] = float(np.median(times)) * 1e3
        # one epoch at the natural R1 cadence
        steps = math.ceil(60000 / b)
        epochs = []
        for _ in range(2):
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(steps):
                tr.train_step()
            torch.cuda.synchronize()
            epochs.append(time.perf_counter() - t1)
        row["epoch_seconds"] = min(epochs)
        row["epoch_images_per_s"] = steps * b / min(epochs)
        conv, total = step_flops(cfg_train, images)
        row["flops_per_image"] = total / b
        row["mfu_plain_vs_bf16_peak"] = row["plain_images_per_s"] * total / b / (peak * 1e12)
        row["profile"] = prof = profile_steps(tr, 32 if b >= 256 else 64)
        conv_us = sum(v for k, v in prof["families_us_per_step"].items() if k.startswith("conv_"))
        row["conv_flops_per_step"] = conv
        row["conv_achieved_tflops"] = conv / (conv_us * 1e-6) / 1e12 if conv_us else None
        row["conv_fraction_of_peak"] = row["conv_achieved_tflops"] / peak if conv_us else None
        tr.check()
    row["copy_attribution_eager_step"] = attribute(cfg_train, images)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX directory")
    ap.add_argument("--configs", default="fastest_b64;compiled_b64;fastest_b512;compiled_b512;recipe",
                    help="';'-separated configurations, each NAME or NAME:key=value,... (train overrides)")
    ap.add_argument("--name", default="profile_step")
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    args = ap.parse_args()
    claim_result_name(args.name)
    if args.list:
        for k, v in CONFIGS.items():
            print(f"{k}: {v}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    configs = parse_configs(args.configs)
    fast_cuda_kernels()
    data = load_fmnist(find_fmnist(args.data))
    images = resize_on_device(data["train_x"], 64, "cuda")
    result: dict[str, Any] = {"machine": machine(), "peak_bf16_tflops": measured_peak_tflops(torch.bfloat16),
                              "configs": {}}
    for name, train in configs:
        print(f"== {name}", flush=True)
        try:
            row = run_config(train, images, result["peak_bf16_tflops"])
        except Exception as exc:  # noqa: BLE001 - record and keep profiling the rest
            row = {"train": train, "error": repr(exc)[:2000]}
        result["configs"][name] = row
        write_result(args.name, result)
        if "error" in row:
            print(f"   error: {row['error']}", flush=True)
            continue
        p = row["profile"]
        print(f"   start-up {row['startup_seconds_first_64_steps']:.1f} s; plain step {row['plain_step_ms']:.3f} ms = "
              f"{row['plain_images_per_s']:.0f} img/s, MFU {row['mfu_plain_vs_bf16_peak']:.3f}; epoch {row['epoch_seconds']:.3f} s"
              + (f"; R1 step {row['r1_step_ms']:.1f} ms" if "r1_step_ms" in row else ""), flush=True)
        print(f"   {p['kernels_per_step']:.0f} kernels/step, GPU busy {p['gpu_busy_fraction']:.2f}, convs at "
              f"{row['conv_achieved_tflops'] or 0:.0f} TFLOP/s; " + ", ".join(
                  f"{k} {v * 100:.0f}%" for k, v in p["families_share"].items()), flush=True)
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
