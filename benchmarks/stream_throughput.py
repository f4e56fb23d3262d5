"""Training throughput and host memory of the GPU recipe with the images streamed from shard files vs resident.

The Fashion-MNIST GPU recipe (benchmarks/recipes/fmnist-gpu.yaml's train keys: DCGAN at 64x64,
bf16, channels_last, CUDA graphs; torch.compile off to keep start-up short) at batch 512. The
60,000 training images, resized to 64x64 on the GPU, are written as 16 MiB shards with the
pipeline's ShardWriter, then each placement trains from those files in its own process (so each
process's peak memory is its own):

* device: the whole set copied to the GPU (what the pipeline picks for this set);
* host: the set in pinned host memory, one copy per batch (no CUDA graphs: the batch is gathered on
  the host inside the step);
* stream: rows read from the shard files by the prefetch thread into pinned buffers, copied to the
  GPU on a side stream, with the pipeline's 1 GiB window of mapped files (this whole set);
* stream:64: the same with at most 64 MiB of the files mapped at a time (what a set much larger
  than the window sees: blocks mapped and unmapped as batches need them).

Per placement: images/s (real images through D per second, timed between synchronisations after
warm-up and graph capture), and the process's host memory: peak resident set (VmHWM), and at the
end its anonymous and file-backed parts (file-backed = mapped shard pages, which the kernel can
drop). The goal: streamed >= 90% of resident (device) images/s at batch 512.

    python benchmarks/stream_throughput.py [--data DIR] [--seconds 10]   # on one GPU, about 2 minutes
    python benchmarks/stream_throughput.py --cpu-dry-run                  # tiny model on CPU: checks the wiring
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common import ROOT, fast_cuda_kernels, find_fmnist, load_fmnist, machine, resize_on_device, write_result

RECIPE = ROOT / "benchmarks" / "recipes" / "fmnist-gpu.yaml"
PLACEMENTS = ("device", "host", "stream", "stream:64")


def memory() -> dict[str, float]:
    """This process's host memory, MiB: peak resident set and its current anonymous/file-backed parts."""
    keys = {"VmHWM": "peak_rss_mib", "VmRSS": "rss_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name = line.split(":")[0]
        if name in keys:
            out[keys[name]] = int(line.split()[1]) / 1024
    return out


def write_shards(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from pipeline.io import ShardWriter, write_json  # noqa: PLC0415

    writer = ShardWriter(directory, "train", shard_bytes=16 << 20)
    for i in range(0, len(images), 4096):
        writer.add(images[i : i + 4096], labels[i : i + 4096])
    write_json(directory / "meta.json", {"splits": {"train": writer.close()}, "num_classes": 10})


def child(args: argparse.Namespace) -> None:
    """One placement in this process: print one JSON line with its figures."""
    from pipeline.io import open_split, read_json  # noqa: PLC0415
    from pipeline.training.config import resolve  # noqa: PLC0415
    from pipeline.training.loop import Trainer  # noqa: PLC0415

    cuda = not args.cpu_dry_run
    if cuda:
        fast_cuda_kernels()
    shards = Path(args.shards)
    entry = read_json(shards / "meta.json")["splits"]["train"]
    t0 = time.perf_counter()
    placement, _, map_mb = args.child.partition(":")
    images, labels = open_split(shards, entry, map_bytes=int(map_mb or 1024) << 20)
    train = {**json.loads(args.train), "data_placement": placement, "steps": 10**9}
    cfg = resolve(train, seed=0, image_shape=tuple(images.shape[1:]), num_classes=0)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, images, torch.from_numpy(labels), device="cuda" if cuda else "cpu", workdir=Path(tmp),
                     progress=False)
        assert tr.sampler.placement == placement, tr.sampler.placement
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(args.warmup):  # cuDNN autotuning, graph capture of each variant, the ring filled
            tr.train_step()
        sync()
        startup = time.perf_counter() - t0
        rounds = []
        for _ in range(3):  # median of 3 rounds, each ~seconds/3 long
            n, t1 = 0, time.perf_counter()
            while time.perf_counter() - t1 < args.seconds / 3:
                for _ in range(10):
                    tr.train_step()
                n += 10
                sync()
            rounds.append(n / (time.perf_counter() - t1))
        tr.check()
        steps_per_s = float(np.median(rounds))
        per_step = cfg.batch_size * tr.objective.batches_per_step
        res = {"placement": tr.sampler.placement, "images_per_s": steps_per_s * per_step,
               "step_ms": 1e3 / steps_per_s, "executor": tr.executor.kind, "graphs_captured": tr.executor.captured,
               "startup_seconds": startup, "set_mib": images.nbytes / 2**20, "map_window_mib": images.map_bytes / 2**20,
               **memory()}
        if cuda:
            res["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        tr.sampler.close()
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX directory")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per placement")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--cpu-dry-run", action="store_true", help="random images, tiny model, CPU: checks the wiring")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    train = {k: v for k, v in yaml.safe_load(RECIPE.read_text())["train"].items() if k != "steps"}
    train.update(batch_size=args.batch, compile=False)
    if args.cpu_dry_run:
        train.update(ngf=8, ndf=8, nz=16, batch_size=min(args.batch, 64), precision="fp32")
        images = np.random.default_rng(0).integers(0, 256, (2048, 1, 64, 64), dtype=np.uint8)
        labels = np.zeros(len(images), np.int64)
        dataset = "2,048 random 64x64 images (CPU dry run)"
        # The 8 MiB set against a 2 MiB window, as the 234 MiB set against 64 MiB on the GPU.
        args.placements = args.placements.replace("stream:64", "stream:2")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --cpu-dry-run)")
        data = load_fmnist(find_fmnist(args.data))
        images = resize_on_device(data["train_x"], 64, "cuda").cpu().numpy()
        labels = data["train_y"]
        dataset = "Fashion-MNIST train (60,000), resized to 64x64"
    result: dict[str, Any] = {"machine": machine(), "dataset": dataset, "train": train, "placements": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), images, labels)
        del images
        for placement in args.placements.split(","):
            cmd = [sys.executable, __file__, "--child", placement, "--shards", tmp, "--train", json.dumps(train),
                   "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
            if args.cpu_dry_run:
                cmd.append("--cpu-dry-run")
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"error": out.stderr[-3000:]}
            result["placements"][placement] = res
            print(f"{placement:>9}: " + (f"{res['images_per_s']:9.0f} img/s  peak RSS {res['peak_rss_mib']:.0f} MiB "
                                         f"(anon {res['rss_anon_mib']:.0f}, file {res['rss_file_mib']:.0f})  "
                                         f"{res['executor']}" if "images_per_s" in res else res["error"]), flush=True)
    pl = result["placements"]
    if "images_per_s" in pl.get("stream", {}) and "images_per_s" in pl.get("device", {}):
        result["goals"] = {}
        for name in ("stream", "stream:64", "stream:2"):
            if "images_per_s" in pl.get(name, {}):
                ratio = pl[name]["images_per_s"] / pl["device"]["images_per_s"]
                result["goals"][f"{name.replace(':', '_window_mib_')}_vs_resident_batch_{train['batch_size']}"] = {
                    "measured": ratio, "goal_at_least": 0.9, "met": ratio >= 0.9}
                print(f"{name} / resident: {ratio:.3f} (goal >= 0.9)")
    print(f"wrote {write_result('stream_throughput_cpu_dry_run' if args.cpu_dry_run else 'stream_throughput', result)}")


if __name__ == "__main__":
    main()
