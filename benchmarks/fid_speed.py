"""End-to-end FID-10k and FID-50k: sampling + Inception-v3 features + Fréchet distance, reference cached.

What one evaluation of a DCGAN-64 generator (nz=100, ngf=64, 3x64x64, the classic architecture)
costs with this pipeline's metric code on one device:

* sampling: latents -> generator -> uint8 images, batch by batch, kept on the device;
* features: torch-fidelity's Inception-v3 (the FID protocol: uint8 in, TF1-bilinear resize to
  299x299 inside the network, float32) -> pool3 [N, 2048];
* distance: float64 mean/covariance on the device and our eigendecomposition Fréchet distance
  against cached reference statistics (no scipy sqrtm on the CPU).

The reference statistics are computed once (timed separately, from the same number of images as
the largest N) and then reused, as the evaluate stage reuses its cached real features. Weights are
a randomly initialised Inception-v3 (see pipeline.metrics.inception.random_inception_weights): the
run time does not depend on the weights, and real weights cannot be fetched here. Pass --weights
and --sha256 to time real ones.

FLOP floor: FLOPs of one forward pass (torch.utils.flop_counter on a 64x64 uint8 input, i.e. the
resize included) x N / the device's measured dense matmul rate in the same precision (fp32 with
TF32 off, the protocol) and in bf16 (the card's best case). ``floor_ratio`` = measured feature
seconds / floor seconds (1 = the device's matmul peak; the inverse is the MFU).

    python benchmarks/fid_speed.py                      # CUDA: N = 10000 and 50000
    python benchmarks/fid_speed.py --device cpu --n 64 --tag cpu_dry_run   # a CPU dry run

Writes benchmarks/results/fid_speed_<tag or device>.json with the machine named.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import count_flops, machine, write_result

from pipeline.metrics import math as M  # noqa: E402
from pipeline.metrics.inception import PROTOCOL, load_inception, random_inception_weights  # noqa: E402
from pipeline.models import build_generator  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    """Dense n x n matmul rate (TFLOP/s) in ``dtype`` on ``device``: median of 3 timed rounds."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    iters = 10 if device.startswith("cuda") else 2
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        rounds.append((time.perf_counter() - t0) / iters)
    return 2 * n**3 / sorted(rounds)[1] / 1e12


@torch.no_grad()
def generate_features(generator: torch.nn.Module, net: torch.nn.Module, n: int, *, batch: int, device: str,
                      seed: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Sample n images and extract their pool3 features, timing each phase (synchronised per batch)."""
    g = torch.Generator(device=device).manual_seed(seed)
    feats = torch.empty(n, 2048, device=device)  # [n, 2048] float32
    t_sample = t_feat = 0.0
    for i in range(0, n, batch):
        b = min(batch, n - i)
        t0 = time.perf_counter()
        z = torch.randn(b, generator.nz, device=device, generator=g)
        images = ((generator(z).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [b, 3, 64, 64]
        _sync(device)
        t1 = time.perf_counter()
        feats[i : i + b] = net(images)[0]
        _sync(device)
        t_sample += t1 - t0
        t_feat += time.perf_counter() - t1
    return feats, {"sampling_s": t_sample, "features_s": t_feat}


def scipy_sqrtm_seconds(ref: M.GaussianStats, feats: torch.Tensor) -> float | None:
    """Seconds of scipy.linalg.sqrtm(S1 S2) on the CPU for these [2048, 2048] covariances (None without scipy)."""
    try:
        import numpy as np  # noqa: PLC0415
        import scipy.linalg  # noqa: PLC0415
    except ImportError:
        return None
    s1, s2 = ref.sigma.cpu().numpy(), M.gaussian_stats(feats).sigma.cpu().numpy()
    t0 = time.perf_counter()
    np.real(scipy.linalg.sqrtm(s1 @ s2))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", default=[10000, 50000], help="generated images per FID")
    parser.add_argument("--batch", type=int, default=500, help="images per batch (sampling and features)")
    parser.add_argument("--weights", default=None, help="Inception-v3 weights file (default: random weights)")
    parser.add_argument("--sha256", default=None, help="sha256 of --weights")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in convs and matmuls (off: the protocol)")
    parser.add_argument("--tag", default=None, help="result file name part before the device name")
    parser.add_argument("--no-scipy", action="store_true", help="skip timing scipy's sqrtm for comparison")
    args = parser.parse_args()
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        if args.weights:
            weights, sha = Path(args.weights), str(args.sha256)
        else:
            weights = Path(tmp) / "inception-random.pt"
            sha = random_inception_weights(weights, seed=0)
        t0 = time.perf_counter()
        net = load_inception(weights, sha256=sha, device=device)
        load_s = time.perf_counter() - t0
        generator = build_generator("dcgan", nz=100, ngf=64, channels=3, size=64).to(device).eval()

        flops_per_image = count_flops(lambda: net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device)))
        big = 8192 if device.startswith("cuda") else 1024
        peak_fp32 = peak_tflops(device, torch.float32, big)
        peak_bf16 = peak_tflops(device, torch.bfloat16, big)

        # Warm-up (cuDNN autotuning, lazy initialisation) outside every timed phase.
        generate_features(generator, net, min(args.batch, 2 * max(1, min(args.n))), batch=args.batch,
                          device=device, seed=99)

        # Reference statistics: computed once from max(N) images, then cached (as real data would be).
        n_ref = max(args.n)
        t0 = time.perf_counter()
        ref_feats, _ = generate_features(generator, net, n_ref, batch=args.batch, device=device, seed=1)
        ref = M.gaussian_stats(ref_feats)
        _ = ref.sqrt_factor  # the one eigendecomposition of the reference covariance
        _sync(device)
        reference_s = time.perf_counter() - t0
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        torch.save({"mu": ref.mu.cpu(), "sigma": ref.sigma.cpu(), "n": ref.n}, cache.with_suffix(".pt"))
        cached = torch.load(cache.with_suffix(".pt"), weights_only=True)
        ref = M.GaussianStats(mu=cached["mu"].to(device), sigma=cached["sigma"].to(device), n=cached["n"])
        _ = ref.sqrt_factor
        _sync(device)
        reference_cached_s = time.perf_counter() - t0

        runs: list[dict[str, Any]] = []
        for n in args.n:
            t_start = time.perf_counter()
            feats, phases = generate_features(generator, net, n, batch=args.batch, device=device, seed=2)
            t0 = time.perf_counter()
            fid = M.frechet_distance(ref, M.gaussian_stats(feats))
            _sync(device)
            phases["distance_s"] = time.perf_counter() - t0
            total = time.perf_counter() - t_start
            floor_fp32 = n * flops_per_image / (peak_fp32 * 1e12)
            floor_bf16 = n * flops_per_image / (peak_bf16 * 1e12)
            runs.append({
                "n": n, "fid": fid, **phases, "total_s": total, "images_per_s": n / total,
                "feature_images_per_s": n / phases["features_s"],
                "flop_floor_s_fp32": floor_fp32, "flop_floor_s_bf16": floor_bf16,
                "floor_ratio_fp32": phases["features_s"] / floor_fp32,
                "floor_ratio_bf16": phases["features_s"] / floor_bf16,
            })
            print(f"FID-{n}: {total:.2f} s total (sampling {phases['sampling_s']:.2f}, features "
                  f"{phases['features_s']:.2f}, distance {phases['distance_s']:.3f}); features at "
                  f"{runs[-1]['floor_ratio_fp32']:.2f}x the fp32 FLOP floor, {runs[-1]['floor_ratio_bf16']:.2f}x bf16")

        # What the same distance costs the classic way (scipy sqrtm on the CPU), for comparison.
        scipy_s = None if args.no_scipy else scipy_sqrtm_seconds(ref, feats)

    payload = {
        "benchmark": "fid_speed", "machine": machine(), "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else machine().get("cpu"),
        "weights": "given" if args.weights else "random (timing does not depend on the weights)",
        "generator": "DCGAN-64 (nz=100, ngf=64, 3x64x64)", "batch": args.batch, "tf32": args.tf32,
        "protocol": PROTOCOL, "inception_load_s": load_s,
        "flops_per_image": flops_per_image, "peak_tflops_fp32": peak_fp32, "peak_tflops_bf16": peak_bf16,
        "peak_matmul_n": big, "reference_images": n_ref, "reference_s": reference_s,
        "reference_cached_s": reference_cached_s, "runs": runs, "scipy_sqrtm_cpu_s_2048": scipy_s,
    }
    name = f"fid_speed_{args.tag}" if args.tag else "fid_speed"
    path = write_result(name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
