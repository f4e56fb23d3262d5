"""Throughput of the data stages, written to benchmarks/results/preprocess_<hostname>.json.

(a) Fashion-MNIST (70,000 images in IDX gz) -> tensors through the stages' library functions
    (download with source ``idx``, clean, preprocess), each stage timed; once more with the
    near-duplicate search on (the pHash of every image).
(b) A synthetic CelebA-like folder: JPEGs of 178x218 (CelebA's aligned size) with smooth random
    content, generated once into a cache folder, resized to 64x64 (crop, lanczos). The preprocess
    step (decode + resize + shard) is timed at 1 worker and at every core: images/s, images/s per
    core, and parallel efficiency = (images/s at N workers / N) / (images/s at 1 worker).

Uses every core the process may run on, so the same command measures a 2-core CI box and a
large machine. Times are wall-clock seconds of in-process calls (no interpreter start-up); the
machine's load average is recorded before and after, because a shared machine makes them noisy.

    python benchmarks/preprocess_throughput.py [--fashion-mnist DIR] [--celeba-n 5000] [--cache DIR]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.clean import CleanOptions  # noqa: E402
from pipeline.data.parallel import cpu_count, ordered_map  # noqa: E402
from pipeline.data.preprocess import build_tensors  # noqa: E402
from pipeline.params import Data, Params, Preprocess, validate  # noqa: E402
from pipeline.stages import clean as clean_stage  # noqa: E402
from pipeline.stages import download, preprocess  # noqa: E402

CELEBA_W, CELEBA_H = 178, 218


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    versions = {}
    for dist in ("numpy", "pillow", "opencv-python-headless", "pandas", "pyarrow", "torch", "albumentations"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"hostname": socket.gethostname(), "cpu_model": model, "cpu_count": os.cpu_count(),
            "cores_used": cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "git_commit": commit}


CPU = {"s": 0.0}  # CPU seconds (this process and its finished workers) of the last _timed call


def _cpu_seconds() -> float:
    import resource  # noqa: PLC0415

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    """(fn(...), wall seconds); CPU["s"] gets the CPU seconds, which a busy shared machine does not inflate."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    out = fn(*args, **kw)
    CPU["s"] = _cpu_seconds() - c0
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# (a) Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def bench_fashion_mnist(path: Path, work: Path) -> dict[str, Any]:
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        return {"skipped": f"{path} has no train-images-idx3-ubyte.gz"}
    out: dict[str, Any] = {"source": str(path), "note": "cold: first run in this process (lazy imports "
                           "included); warm: the same again; near_dedup_2: data.near_dup_distance=2 (pHash of every image)"}
    for label, extra in (("cold", {}), ("warm", {}), ("near_dedup_2", {"near_dup_distance": 2})):
        d = work / f"fmnist-{label}"
        p = validate(Data, {"source": "idx", "path": str(path), **extra}, "data")
        params = Params(data=p, preprocess=validate(Preprocess, {"size": 28}, "preprocess"))
        _, t_dl = _timed(download.run, p, d / "raw", d / "cache")
        c_dl = CPU["s"]
        metrics, t_clean = _timed(clean_stage.run, p, d / "raw", d / "clean", d / "clean_report.json", progress=False)
        c_clean = CPU["s"]
        pre, t_pre = _timed(preprocess.run, params, d / "clean", d / "raw", d / "tensors", progress=False)
        c_pre = CPU["s"]
        total = t_dl + t_clean + t_pre
        out[label] = {"download_s": round(t_dl, 3), "clean_s": round(t_clean, 3), "preprocess_s": round(t_pre, 3),
                      "total_s": round(total, 3), "cpu_s": {"download": round(c_dl, 3), "clean": round(c_clean, 3),
                                                            "preprocess": round(c_pre, 3),
                                                            "total": round(c_dl + c_clean + c_pre, 3)},
                      "images": metrics["total"], "accepted": metrics["accepted"],
                      "tensors": pre.get("images_train", 0) + pre.get("images_test", 0),
                      "images_per_s": round(metrics["total"] / total, 1)}
        if extra:
            out[label]["near_duplicates"] = metrics.get("duplicate_near_duplicate", 0)
        print(f"fashion-mnist {label}: download {t_dl:.2f} s, clean {t_clean:.2f} s, preprocess {t_pre:.2f} s, "
              f"total {total:.2f} s", flush=True)
        shutil.rmtree(d)
    return out


# ---------------------------------------------------------------------------------------------
# (b) CelebA-like folder
# ---------------------------------------------------------------------------------------------


def _face_like(seed: int) -> np.ndarray:
    """Smooth random content at 218 x 178: low-frequency waves plus soft blobs (JPEG-compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:CELEBA_H, 0:CELEBA_W] / np.float32(max(CELEBA_H, CELEBA_W))
    img = np.zeros((CELEBA_H, CELEBA_W, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.5, 4, 3)
            img[:, :, c] += rng.uniform(20, 50) * np.sin(2 * np.pi * (fx * x + fy * y) + ph * 6)
    for _ in range(5):
        cy, cx, r = rng.uniform(0.2, 0.9), rng.uniform(0.1, 0.7), rng.uniform(0.05, 0.2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[:, :, None]
        img += blob * rng.uniform(-90, 90, 3)
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def _write_chunk(job: tuple[str, list[int]]) -> int:
    from PIL import Image  # noqa: PLC0415

    folder, seeds = job
    for s in seeds:
        Image.fromarray(_face_like(s)).save(Path(folder) / f"{s + 1:06d}.jpg", quality=95)
    return len(seeds)


def celeba_like_folder(cache: Path, n: int) -> Path:
    """n JPEGs of 178x218 in cache/celeba_like_<n>/img (made once; reused while complete)."""
    folder = cache / f"celeba_like_{n}" / "img"
    done = folder.parent / "complete"
    if done.exists():
        return folder.parent
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    jobs = [(str(folder), list(range(i, min(i + 250, n)))) for i in range(0, n, 250)]
    written = sum(ordered_map(_write_chunk, jobs, workers=cpu_count()))
    done.write_text(f"{written}\n")
    print(f"generated {written} CelebA-like JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder.parent


def bench_celeba_like(cache: Path, n: int, work: Path) -> dict[str, Any]:
    root = celeba_like_folder(cache, n)
    p = validate(Data, {"source": "folder", "path": str(root), "channels": "rgb"}, "data")
    d = work / "celeba"
    _, t_dl = _timed(download.run, p, d / "raw", d / "cache")
    metrics, t_clean = _timed(clean_stage.run, p, d / "raw", d / "clean", d / "clean_report.json", progress=False)
    clean_cpu = CPU["s"]
    import pandas as pd  # noqa: PLC0415

    manifest = pd.read_parquet(d / "clean" / "manifest.parquet")
    opts = CleanOptions("rgb", (255, 255, 255), 8, 64_000_000, "first_frame", phash=False)
    cores = cpu_count()
    runs: dict[str, Any] = {}
    for workers in sorted({1, cores}):
        out = d / f"tensors-{workers}"
        out.mkdir()
        meta, secs = _timed(build_tensors, manifest, d / "raw", out, opts, size=64, policy="crop", filter="lanczos",
                            fill=0, test_fraction=0.1, seed=0, shard_bytes=256 << 20, workers=workers, progress=False)
        count = sum(e["count"] for e in meta["splits"].values())
        runs[str(workers)] = {"workers": workers, "seconds": round(secs, 3), "cpu_s": round(CPU["s"], 3),
                              "images": count, "images_per_s": round(count / secs, 1),
                              "images_per_s_per_core": round(count / secs / workers, 1),
                              "images_per_cpu_s": round(count / CPU["s"], 1)}
        print(f"celeba-like preprocess, {workers} worker(s): {count / secs:.0f} images/s "
              f"({count / secs / workers:.0f} per core)", flush=True)
        shutil.rmtree(out)
    one, many = runs["1"], runs[str(cores)]
    result = {
        "images": n, "source_size": [CELEBA_H, CELEBA_W], "target": [64, 64], "policy": "crop", "filter": "lanczos",
        "download_s": round(t_dl, 3), "clean_s": round(t_clean, 3), "clean_cpu_s": round(clean_cpu, 3),
        "clean_workers": cores,
        "clean_images_per_s": round(metrics["total"] / t_clean, 1), "preprocess": runs,
        "parallel_efficiency": round(many["images_per_s"] / cores / one["images_per_s"], 3),
        "speedup": round(many["images_per_s"] / one["images_per_s"], 3),
    }
    shutil.rmtree(d)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fashion-mnist", type=Path, default=ROOT.parent / "shared" / "datasets" / "fashion-mnist",
                    help="folder of the four Fashion-MNIST IDX .gz files")
    ap.add_argument("--celeba-n", type=int, default=5000, help="number of CelebA-like JPEGs")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache", help="where the JPEGs are kept")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/preprocess_<host>.json)")
    args = ap.parse_args(argv)
    info = machine()
    result: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": info, "loadavg_before": list(os.getloadavg())}
    print(f"{info['hostname']}: {info['cpu_model']}, {info['cores_used']} cores; load {result['loadavg_before']}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        result["fashion_mnist"] = bench_fashion_mnist(args.fashion_mnist, Path(tmp))
        result["celeba_like"] = bench_celeba_like(args.cache, args.celeba_n, Path(tmp))
    result["loadavg_after"] = list(os.getloadavg())
    out = args.out or ROOT / "benchmarks" / "results" / f"preprocess_{info['hostname']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
