"""From a generator and real images to the metric set: sampling, features, every metric with its CI.

Protocol (recorded in metrics.json): the generator samples ``n`` images in eval mode under
no_grad from latents drawn with a fixed seed (and more draws from further seeds, for intervals);
generated and real images both go through the same feature network (the offline evaluator at
native resolution as float [-1, 1]; Inception-v3 as in :mod:`pipeline.metrics.inception`); real
statistics come from the reference split (test). See :func:`metric_set` for the intervals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..models import generate, latents
from . import math as M

log = logging.getLogger(__name__)


@torch.no_grad()
def sample(generator: nn.Module, n: int, *, nz: int, num_classes: int = 0, seed: int = 0, batch_size: int = 250,
           device: str = "cpu", labels: torch.Tensor | None = None,
           psi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images as uint8 [n, C, H, W] on the CPU (and their labels when conditional).

    Latents (and labels) come from a CPU generator seeded with ``seed``, so the same seed gives the
    same images on any device up to kernel rounding. psi: truncation (1 = none, the metrics'
    protocol; other values need a generator with truncation, see :func:`pipeline.models.check_truncation`).
    """
    generator = generator.eval()
    z_all = latents(n, nz, seed)
    y_all = None
    if num_classes:
        y_all = labels if labels is not None else torch.arange(n) % num_classes
    out = []
    for i in range(0, n, batch_size):
        z = z_all[i : i + batch_size].to(device)
        y = None if y_all is None else y_all[i : i + batch_size].to(device)
        x = generate(generator, z, y, psi=psi).float()
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out), y_all


def fid_only(real_stats: M.GaussianStats, fake_feats: torch.Tensor) -> float:
    return M.frechet_distance(real_stats, M.gaussian_stats(fake_feats))


# The metrics every generator gets, each with a 95% interval (see metric_set).
HEADLINE = ("fid", "kid", "IS", "precision", "recall", "density", "coverage")
# Where a metric's values can lie: intervals are clipped to it (a fraction's interval ending
# below 0 would only say the normal approximation is poor there). KID is unbiased, so it can be
# negative, and has no bound.
_RANGE = {"IS": (1.0, math.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0), "density": (0.0, math.inf),
          "coverage": (0.0, 1.0), "kid": (-math.inf, math.inf)}


def point_metrics(real_feats: torch.Tensor, real_stats: M.GaussianStats, fake_feats: torch.Tensor,
                  fake_probs: torch.Tensor | None, *, kid_subsets: int, pr_k: int, dc_k: int,
                  seed: int) -> dict[str, Any]:
    """The headline metrics of one generated set [Nf, D] against one real set [Nr, D], no intervals.

    ``real_stats`` are ``real_feats``' Gaussian statistics, passed in so that several draws
    share one covariance. Also returns ``kid_std`` (over subsets), ``kid_subset_size``, ``IS_std``
    (over 10 splits) and ``kid_warning`` when the KID subsets are too small to rank models by.
    """
    kid_mean, kid_std, kid_info = M.kid(real_feats, fake_feats, n_subsets=kid_subsets, seed=seed)
    precision, recall = M.precision_recall(real_feats, fake_feats, k=pr_k)
    density, coverage = M.density_coverage(real_feats, fake_feats, k=dc_k)
    out: dict[str, Any] = {
        "fid": fid_only(real_stats, fake_feats), "kid": kid_mean, "kid_std": kid_std,
        "kid_subset_size": kid_info["subset_size"], "precision": precision, "recall": recall,
        "density": density, "coverage": coverage,
    }
    if "warning" in kid_info:
        out["kid_warning"] = kid_info["warning"]
    if fake_probs is not None:
        out["IS"], out["IS_std"] = M.inception_score(fake_probs, splits=min(10, len(fake_probs)))
    return out


def metric_set(real_feats: torch.Tensor, real_probs: torch.Tensor | None,
               draws: Sequence[tuple[torch.Tensor, torch.Tensor | None]], *, kid_subsets: int, pr_k: int, dc_k: int,
               n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Every headline metric of generated draws against one real set, with 95% intervals.

    ``draws``: (features [Nf, D], probs [Nf, K] or None) of S >= 1 independent draws of Nf
    generated images (different latent seeds), the first being the main one. Values are those of
    the first draw, so they stay comparable with single-draw numbers. Intervals:

    * ``fid_ci_low/high``: bootstrap over the first draw's features (:func:`M.fid_with_ci`);
    * ``<m>_ci_low/high`` for KID, IS, precision, recall, density and coverage: the Student-t
      prediction interval over the S draws (:func:`M.draw_interval`; needs S >= 2), clipped to
      the metric's range (fractions to [0, 1], IS to >= 1). Bootstrap
      resampling would be wrong for these: duplicated rows become each other's nearest
      neighbours (k-NN radii shrink) and enter KID's within-set kernel sums.

    Returns (metrics, per-draw values of each headline metric).
    """
    if not draws:
        raise M.MetricInputError("metric_set needs at least one generated draw")
    real_stats = M.gaussian_stats(real_feats)
    per_draw = [point_metrics(real_feats, real_stats, f, p, kid_subsets=kid_subsets, pr_k=pr_k, dc_k=dc_k,
                              seed=seed) for f, p in draws]
    out = dict(per_draw[0])
    if "kid_warning" in out:
        log.warning("KID: %s", out["kid_warning"])
    fid = M.fid_with_ci(real_stats, draws[0][0], n_boot=n_boot, seed=seed)
    out.update(fid_ci_low=fid["ci_low"], fid_ci_high=fid["ci_high"])
    values = {k: [d[k] for d in per_draw] for k in HEADLINE if k in out}
    if len(draws) >= 2:
        for k, v in values.items():
            if k != "fid":
                lo, hi = M.draw_interval(v)
                bottom, top = _RANGE[k]
                out[f"{k}_ci_low"], out[f"{k}_ci_high"] = max(lo, bottom), min(hi, top)
    if real_probs is not None and "IS" in out:
        # IS splits assume i.i.d. order; real splits are stored class-sorted for some sources,
        # and a split holding one class scores ~1. Shuffle (seeded) first.
        order = torch.randperm(len(real_probs), generator=torch.Generator().manual_seed(seed))
        out["IS_real"] = M.inception_score(real_probs[order], splits=min(10, len(real_probs)))[0]
    return out, values


def memorisation(fake_feats: torch.Tensor, train_feats: torch.Tensor, test_feats: torch.Tensor, *, seed: int = 0,
                 closest: int = 16) -> dict[str, Any]:
    """Distances from each sample to its nearest training and nearest test image (feature space).

    fake [Nf, D], train [Ntr, D], test [Nte, D]. A generator that copies its training set sits
    much closer to train than to test; one that generalises sits about as close to both. The
    nearest-neighbour distance shrinks as the reference set grows, so the ratio compares equal
    sets: a seeded random subset of the training features as large as the test set (when train is
    larger). ``ratio`` = median(d_train) / median(d_test); < 1: samples closer to training images.
    ``closest`` lists, for the samples nearest to any training image (the whole training set),
    closest first: the sample's index in the draw, its nearest training image's index, that
    distance, and the distance to the sample's nearest test image (the report's labelled panel).
    """
    n = min(len(train_feats), len(test_feats))
    sub = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(seed))[:n]
    d_train, _ = M.nearest_distances(fake_feats, train_feats[sub])
    d_test, _ = M.nearest_distances(fake_feats, test_feats[:n])
    med_train, med_test = float(d_train.median()), float(d_test.median())
    d_all, i_all = M.nearest_distances(fake_feats, train_feats)
    order = torch.argsort(d_all)[:closest]
    d_near_test, _ = M.nearest_distances(fake_feats[order], test_feats)
    return {"nn_train_median": med_train, "nn_test_median": med_test, "reference_size": int(n),
            "ratio": med_train / med_test if med_test > 0 else float("nan"),
            "fraction_closer_to_train": float((d_train < d_test).double().mean()),
            "closest": [{"sample": int(j), "train_index": int(i_all[j]), "distance_train": float(d_all[j]),
                         "distance_test": float(dt)} for j, dt in zip(order.tolist(), d_near_test.tolist(), strict=True)]}
