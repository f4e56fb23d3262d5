"""Self-test of the metrics on real data: does the feature extractor behave as FID should?

A feature network can be wrong in ways no unit test of the formula sees: features that ignore
blur, saturate on noise, or do not separate classes make FID a number that moves for the wrong
reasons. ``python -m pipeline metrics-check`` (and :func:`run_selfcheck`) measures, on real images:

* ``halves``: FID between two random halves of the real images is near zero -- small against the
  features' total variance and below every perturbation below;
* ``noise``, ``blur``: FID of one half against the other half with Gaussian pixel noise (or a
  Gaussian blur) of growing strength rises strictly monotonically;
* ``mode_dropping``: FID against the other half restricted to fewer and fewer classes (equal
  sample counts at every level, mean over a few random orders of dropping) rises strictly
  monotonically;
* ``fid_math``: our float64 eigendecomposition FID agrees with the classic scipy ``sqrtm``
  formula in float64 on random features to 1e-6 relative;
* ``is_sharp_balanced``: IS of perfectly sharp (one-hot), class-balanced predictions equals the
  number of classes.

Perturbed images are re-quantised to uint8, as generated images are. Everything is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from . import math as M

__all__ = ["NOISE_STDS", "BLUR_SIGMAS", "format_report", "gaussian_blur", "add_noise", "run_selfcheck"]

# Noise std in units of the pixel range [0, 1]; blur sigma in pixels. Five levels each: enough to
# see a trend, few enough to run in seconds.
NOISE_STDS = (0.02, 0.05, 0.1, 0.2, 0.4)
BLUR_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0)
# "Near zero": FID of two halves below this fraction of the features' total variance
# tr(Sigma_a) + tr(Sigma_b) (the FID of two independent point masses drawn from the data), or
# below HALVES_NOISE_FACTOR / n for halves of n images, whichever is larger. Sampling alone
# puts the halves' FID near (1 + k) / n of that variance: 1/n from the means (E|mu_a - mu_b|^2 =
# 2 tr(Sigma) / n) and a few more n-ths from the covariances (measured 3-5/n on MNIST and
# Fashion-MNIST features), so a fixed 1% would fail honest small samples.
HALVES_MAX_RELATIVE = 0.01
HALVES_NOISE_FACTOR = 10.0
FID_MATH_RTOL = 1e-6
# Random class orders the mode-dropping FIDs are averaged over.
MODE_DROPPING_ORDERS = 3

Extractor = Callable[[torch.Tensor], torch.Tensor]  # uint8 [N, C, H, W] -> features [N, D]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 255] -> uint8, rounded and clipped (what a saved image holds)."""
    return x.round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, std: float, *, seed: int) -> torch.Tensor:
    """uint8 [N, C, H, W] plus N(0, (255 std)^2) per pixel, re-quantised to uint8."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g) * (255.0 * std)
    return _to_uint8(images.float() + noise)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 [N, C, H, W] blurred by a separable Gaussian (radius 3 sigma, reflect padding), uint8."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()  # [2r + 1]
    c = images.shape[1]
    x = images.float()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return _to_uint8(x)


def _strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


def _fid(ref: M.GaussianStats, feats: torch.Tensor) -> float:
    return M.frechet_distance(ref, M.gaussian_stats(feats))


def _fid_math_check(seed: int) -> dict[str, Any]:
    """Our FID vs scipy.linalg.sqrtm in float64 on random features (iid and correlated)."""
    import scipy.linalg  # noqa: PLC0415 - a reference for this check only

    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    cases = []
    for n, d, mix in ((400, 32, False), (600, 64, True)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.2 + 0.1
        if mix:
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            x, y = x @ (q * torch.logspace(0, -2, d, dtype=torch.float64)), y @ q.T
        ours = M.frechet_distance(M.gaussian_stats(x), M.gaussian_stats(y))
        xa, ya = x.numpy(), y.numpy()
        s1, s2 = np.cov(xa, rowvar=False), np.cov(ya, rowvar=False)
        diff = xa.mean(0) - ya.mean(0)
        ref = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2))))
        rel = abs(ours - ref) / abs(ref)
        worst = max(worst, rel)
        cases.append({"n": n, "d": d, "ours": ours, "scipy": ref, "relative_difference": rel})
    return {"name": "fid_math", "passed": worst <= FID_MATH_RTOL, "values": cases,
            "expected": f"relative difference <= {FID_MATH_RTOL:g} (worst {worst:.2e})"}


def _is_check(num_classes: int) -> dict[str, Any]:
    """IS of one-hot, balanced predictions (10 splits, each balanced) must equal K."""
    k = max(2, num_classes)
    n = 10 * k * 10
    probs = F.one_hot(torch.arange(n) % k, k).double()  # [n, K], each split of n/10 rows is balanced
    score, std = M.inception_score(probs, splits=10)
    return {"name": "is_sharp_balanced", "passed": abs(score - k) <= 1e-9 * k and std <= 1e-9 * k,
            "values": {"classes": k, "IS": score, "IS_std": std}, "expected": f"IS == {k} (the number of classes)"}


def run_selfcheck(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None,
                  extractor: Extractor, *, num_classes: int = 0, seed: int = 0,
                  max_images: int | None = None) -> dict[str, Any]:
    """Run every check on real uint8 images [N, C, H, W] (labels [N], -1 or None when unlabeled).

    ``extractor`` maps uint8 images to features [N, D] (the offline evaluator, or Inception-v3).
    ``max_images`` caps N by a seeded random subset. Returns {"passed", "checks": [...], "data"};
    a check that does not apply (mode dropping without labels) has ``passed: None``.
    """
    x = torch.as_tensor(np.asarray(images))
    y = None if labels is None else torch.as_tensor(np.asarray(labels)).long()
    if y is not None and bool((y < 0).any()):
        y = None
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    if max_images is not None:
        order = order[:max_images]
    half = len(order) // 2
    ia, ib = order[:half], order[half : 2 * half]
    a, b = x[ia], x[ib]
    feats_a = extractor(a)
    ref = M.gaussian_stats(feats_a)
    feats_b = extractor(b)
    fid_halves = _fid(ref, feats_b)
    stats_b = M.gaussian_stats(feats_b)
    total_var = float(torch.trace(ref.sigma) + torch.trace(stats_b.sigma))
    checks: list[dict[str, Any]] = []

    noise = [_fid(ref, extractor(add_noise(b, s, seed=seed + 1 + i))) for i, s in enumerate(NOISE_STDS)]
    blur = [_fid(ref, extractor(gaussian_blur(b, s))) for s in BLUR_SIGMAS]
    smallest = min(noise + blur)
    relative = fid_halves / total_var if total_var > 0 else float("inf")
    limit = max(HALVES_MAX_RELATIVE, HALVES_NOISE_FACTOR / half)
    checks.append({"name": "halves", "passed": relative <= limit and fid_halves < smallest,
                   "values": {"fid": fid_halves, "relative_to_total_variance": relative, "images_per_half": half},
                   "expected": f"FID / (tr Sa + tr Sb) <= {limit:.3g} (max of {HALVES_MAX_RELATIVE:g} and "
                               f"{HALVES_NOISE_FACTOR:g}/n) and below every perturbed FID "
                               f"(smallest {smallest:.4g})"})
    checks.append({"name": "noise", "passed": _strictly_increasing([fid_halves, *noise]),
                   "values": dict(zip([f"std={s:g}" for s in NOISE_STDS], noise, strict=True)),
                   "expected": "strictly increasing with the noise std, from the halves' FID"})
    checks.append({"name": "blur", "passed": _strictly_increasing([fid_halves, *blur]),
                   "values": dict(zip([f"sigma={s:g}px" for s in BLUR_SIGMAS], blur, strict=True)),
                   "expected": "strictly increasing with the blur sigma, from the halves' FID"})
    checks.append(_mode_dropping(y[ib] if y is not None else None, b, ref, extractor, seed=seed))
    checks.append(_fid_math_check(seed))
    k = num_classes or (int(y.max()) + 1 if y is not None else 10)
    checks.append(_is_check(k))
    verdicts = [c["passed"] for c in checks if c["passed"] is not None]
    return {"passed": all(verdicts), "checks": checks,
            "data": {"images": int(len(order)), "images_per_half": half, "shape": list(x.shape[1:]),
                     "labeled": y is not None, "seed": seed}}


def _mode_dropping(y_b: torch.Tensor | None, b: torch.Tensor, ref: M.GaussianStats, extractor: Extractor, *,
                   seed: int, orders: int = MODE_DROPPING_ORDERS) -> dict[str, Any]:
    """FID of half B keeping fewer and fewer classes, averaged over ``orders`` random class orders.

    Every level draws the same number of images (the smallest level's pool), so sample size does
    not masquerade as mode dropping. Within an order the dropped sets are nested. FID after
    dropping depends on *which* classes remain (two central classes sit closer to the full set
    than two outlying ones), so one order can be non-monotone by luck; the mean over orders
    measures the effect of how many classes are missing.
    """
    if y_b is None:
        return {"name": "mode_dropping", "passed": None, "values": {},
                "expected": "not applicable: the images have no class labels"}
    classes = torch.unique(y_b)
    k = len(classes)
    # Classes dropped per level, evenly spaced down to two kept (10 classes: keep 10, 8, 6, 4, 2): steps
    # of one class in ten would move FID less than its sampling noise at a few dozen images per level.
    levels = sorted({round(i * (k - 2) / 4) for i in range(5)}) if k > 2 else list(range(k))
    g = torch.Generator().manual_seed(seed + 100)
    per_order = []
    n = len(b)
    for _ in range(orders):
        drop_order = classes[torch.randperm(k, generator=g)]
        pools = [torch.nonzero(~torch.isin(y_b, drop_order[:d])).flatten() for d in levels]
        n = min(n, *(len(p) for p in pools))
        per_order.append(pools)
    fids = torch.zeros(len(levels), dtype=torch.float64)
    for pools in per_order:
        for i, p in enumerate(pools):
            fids[i] += _fid(ref, extractor(b[p[torch.randperm(len(p), generator=g)[:n]]])) / orders
    values = fids.tolist()
    return {"name": "mode_dropping", "passed": _strictly_increasing(values),
            "values": {**{f"classes_kept={k - d}": f for d, f in zip(levels, values, strict=True)},
                       "images_per_level": n, "class_orders": orders},
            "expected": f"strictly increasing as classes are dropped (mean over {orders} class orders, "
                        "equal sample counts)"}


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the checks (what ``metrics-check`` prints)."""
    lines = [f"metrics self-test on {report['data']['images']} real images {report['data']['shape']} "
             f"({report['data']['images_per_half']} per half), seed {report['data']['seed']}", ""]
    width = max(len(c["name"]) for c in report["checks"])
    for c in report["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["passed"]]
        lines.append(f"{verdict}  {c['name']:<{width}}  {c['expected']}")
        vals = c["values"]
        items = vals.items() if isinstance(vals, dict) else [(f"case {i}", v) for i, v in enumerate(vals)]
        for key, v in items:
            if isinstance(v, dict):
                v = ", ".join(f"{kk}={vv:.6g}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in v.items())
            elif isinstance(v, float):
                v = f"{v:.6g}"
            lines.append(f"      {'':<{width}}  {key}: {v}")
    lines.append("")
    lines.append("ALL CHECKS PASSED" if report["passed"] else "SOME CHECKS FAILED")
    return "\n".join(lines)
