"""From a generator and real images to the metric set: sampling, features, every metric with its CI.

Protocol (recorded in metrics.json): the generator samples ``n`` images in eval mode under
no_grad from latents drawn with a fixed seed; generated and real images both go through the same
feature network at their native resolution as float [-1, 1]; real statistics come from the
reference split (test by default). FID carries a bootstrap interval over the generated
features, KID its std over subsets, IS its std over 10 splits.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from . import math as M

log = logging.getLogger(__name__)


@torch.no_grad()
def sample(generator: nn.Module, n: int, *, nz: int, num_classes: int = 0, seed: int = 0, batch_size: int = 250,
           device: str = "cpu", labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images as uint8 [n, C, H, W] on the CPU (and their labels when conditional).

    Latents (and labels) come from a CPU generator seeded with ``seed``, so the same seed gives the
    same images on any device up to kernel rounding.
    """
    generator = generator.eval()
    g = torch.Generator().manual_seed(seed)
    z_all = torch.randn(n, nz, generator=g)
    y_all = None
    if num_classes:
        y_all = labels if labels is not None else torch.arange(n) % num_classes
    out = []
    for i in range(0, n, batch_size):
        z = z_all[i : i + batch_size].to(device)
        y = None if y_all is None else y_all[i : i + batch_size].to(device)
        x = generator(z, y).float()
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out), y_all


def fid_only(real_stats: M.GaussianStats, fake_feats: torch.Tensor) -> float:
    return M.frechet_distance(real_stats, M.gaussian_stats(fake_feats))


def metric_set(real_feats: torch.Tensor, real_probs: torch.Tensor | None, fake_feats: torch.Tensor,
               fake_probs: torch.Tensor | None, *, kid_subsets: int, pr_k: int, dc_k: int, n_boot: int,
               seed: int) -> dict[str, Any]:
    """Every headline metric of one generated set against one real set."""
    real_stats = M.gaussian_stats(real_feats)
    fid = M.fid_with_ci(real_stats, fake_feats, n_boot=n_boot, seed=seed)
    kid_mean, kid_std, kid_info = M.kid(real_feats, fake_feats, n_subsets=kid_subsets, seed=seed)
    if "warning" in kid_info:
        log.warning("KID: %s", kid_info["warning"])
    precision, recall = M.precision_recall(real_feats, fake_feats, k=pr_k)
    density, coverage = M.density_coverage(real_feats, fake_feats, k=dc_k)
    out: dict[str, Any] = {
        "fid": fid["value"], "fid_ci_low": fid["ci_low"], "fid_ci_high": fid["ci_high"],
        "kid": kid_mean, "kid_std": kid_std, "kid_subset_size": kid_info["subset_size"],
        "precision": precision, "recall": recall, "density": density, "coverage": coverage,
    }
    if "warning" in kid_info:
        out["kid_warning"] = kid_info["warning"]
    if fake_probs is not None:
        is_mean, is_std = M.inception_score(fake_probs, splits=10)
        out.update(IS=is_mean, IS_std=is_std)
        if real_probs is not None:
            # IS splits assume i.i.d. order; real splits are stored class-sorted for some sources,
            # and a split holding one class scores ~1. Shuffle (seeded) first.
            order = torch.randperm(len(real_probs), generator=torch.Generator().manual_seed(seed))
            out["IS_real"] = M.inception_score(real_probs[order], splits=10)[0]
    return out


def memorisation(fake_feats: torch.Tensor, train_feats: torch.Tensor, test_feats: torch.Tensor) -> dict[str, Any]:
    """Distances from each sample to its nearest training and nearest test image (feature space).

    A generator that copies its training set sits much closer to train than to test; one that
    generalises sits about as close to both. ``ratio`` = median(train) / median(test) (< 1: closer
    to training images).
    """
    d_train, i_train = M.nearest_distances(fake_feats, train_feats)
    d_test, _ = M.nearest_distances(fake_feats, test_feats)
    med_train, med_test = float(d_train.median()), float(d_test.median())
    return {"nn_train_median": med_train, "nn_test_median": med_test,
            "ratio": med_train / med_test if med_test > 0 else float("nan"),
            "closest": [(int(j), int(i_train[j]), float(d_train[j])) for j in torch.argsort(d_train)[:16].tolist()]}
