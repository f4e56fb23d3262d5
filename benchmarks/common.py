"""Shared benchmark helpers: machine description, Fashion-MNIST on the device, peak FLOP/s, FLOP counts.

Benchmarks are scripts, never tests: each writes ``benchmarks/results/<name>_<device>.json`` with the
machine named, every figure, and the ratios the issues ask for.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
FMNIST_DEFAULT = [ROOT / ".device-data" / "fashion-mnist", ROOT.parent / "shared" / "datasets" / "fashion-mnist",
                  Path("/usr/share/datasets/fashion-mnist")]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        cpu = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        info["cpu"] = cpu.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def fast_cuda_kernels() -> None:
    """What every GPU benchmark measures under: TF32 matrix products and convolutions, and cuDNN's
    autotuner (the training engine's own settings on CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def device_tag() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-").lower()
    return "cpu"


_CLAIMS: list[Any] = []  # open lock files, held until the process ends


def claim_result_name(name: str, results: Path | None = None) -> None:
    """Hold an OS lock on result NAME (``<name>_<device>``) for the rest of this process, so that a
    second run started with the same ``--name`` (say, one per GPU of a host) stops at once with a
    clear error instead of overwriting the first one's result file and grids. The lock is released
    when the process ends, however it ends (a run killed by a timeout leaves nothing to clean up)."""
    import fcntl  # noqa: PLC0415 (POSIX; the GPU machines these scripts run on are Linux)

    results = RESULTS if results is None else results
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{device_tag()}"
    handle = (results / f".{stem}.lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SystemExit(f"another running benchmark is writing {results / stem}.json: "
                         "give this run its own --name") from None
    _CLAIMS.append(handle)


def write_result(name: str, payload: dict[str, Any], results: Path | None = None) -> Path:
    """Write ``payload`` to ``<results>/<name>_<device>.json``, and a copy into ``$OUT`` where the
    device tool collects files, each in one step (written aside, then renamed): a reader, or a copy
    taken after a kill, never sees half a file."""
    results = RESULTS if results is None else results
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}_{device_tag()}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    out = os.environ.get("OUT")  # the device tool copies $OUT back: the same file, also in one step
    if out:
        tmp_out = Path(out, f".{path.name}.tmp")
        tmp_out.write_text(path.read_text())
        os.replace(tmp_out, Path(out, path.name))
    return path


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_fmnist(explicit: str | None = None) -> Path:
    for cand in ([Path(explicit)] if explicit else []) + FMNIST_DEFAULT:
        if (cand / "train-images-idx3-ubyte.gz").exists():
            return cand
    raise SystemExit("Fashion-MNIST not found: pass --data DIR holding train-images-idx3-ubyte.gz etc. "
                     f"(looked in {[str(p) for p in FMNIST_DEFAULT]})")


def load_fmnist(directory: Path) -> dict[str, np.ndarray]:
    """uint8 [N, 28, 28] images and int64 labels of both splits."""
    return {
        "train_x": _idx(directory / "train-images-idx3-ubyte.gz"),
        "train_y": _idx(directory / "train-labels-idx1-ubyte.gz").astype(np.int64),
        "test_x": _idx(directory / "t10k-images-idx3-ubyte.gz"),
        "test_y": _idx(directory / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    }


@torch.no_grad()
def resize_on_device(images: np.ndarray, size: int, device: str) -> torch.Tensor:
    """uint8 [N, H, W] -> uint8 [N, 1, size, size] on ``device`` (bilinear, antialiased), in chunks."""
    out = torch.empty(len(images), 1, size, size, dtype=torch.uint8, device=device)
    src = torch.from_numpy(images)
    for i in range(0, len(images), 8192):
        x = src[i : i + 8192].to(device).float()[:, None]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 8192] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def cuda_time(fn: Callable[[], Any], *, warmup: int, iters: int) -> float:
    """Seconds per call, timed with a synchronize after warm-up (median of 3 rounds)."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(3):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / iters)
    return float(np.median(rounds))


def measured_peak_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Dense matrix-product rate of this card on random data (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    sec = cuda_time(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / sec / 1e12


def parse_overrides(text: str) -> dict[str, Any]:
    """'key=value,key=value' (YAML values) -> {key: value}: train overrides given on a command line."""
    import yaml  # noqa: PLC0415

    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv)}


def make_trainer(train: dict[str, Any], images: torch.Tensor, workdir: Path, device: str = "cuda",
                 labels: torch.Tensor | None = None, seed: int = 0) -> Any:
    """The pipeline's Trainer for ``train`` (params.train keys) on uint8 [N, 1, H, W] ``images``
    (base.seed ``seed``; unlabelled unless ``labels`` [N] are given), validated like params.yaml."""
    from pipeline.training.config import resolve  # noqa: PLC0415
    from pipeline.training.loop import Trainer  # noqa: PLC0415

    num_classes = int(labels.max()) + 1 if labels is not None else 0
    cfg = resolve(train, seed=seed, image_shape=tuple(images.shape[1:]), num_classes=num_classes)
    if labels is None:
        labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    return Trainer(cfg, images, labels, device=device, workdir=workdir, progress=False)


def step_flops(train: dict[str, Any], images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[float, float]:
    """(convolution FLOPs, all FLOPs) of one plain training step, forward and backward, counted by
    torch's flop counter on an eager fp32 NCHW twin of ``train`` (a replayed CUDA graph dispatches
    no operators to count, and the channels_last path writes two layers as non-convolutions).
    R1 and the gradient penalty are left out (the flop counter cannot follow their double
    backward), so for wgan_gp the MFU is a lower bound."""
    import tempfile  # noqa: PLC0415

    from torch.utils.flop_counter import FlopCounterMode

    eager = {**train, "compile": False, "cuda_graph": False, "precision": "fp32", "channels_last": False,
             "r1_gamma": 0.0, "gp_weight": 0.0, "steps": 10**9}
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(eager, images, Path(tmp), labels=labels)
        tr.train_step()
        with FlopCounterMode(display=False) as counter:
            tr.train_step()
    conv = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if "conv" in str(op))
    return float(conv), float(counter.get_total_flops())


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
