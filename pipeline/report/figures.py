"""Pictures of a trained generator: fixed-seed grids, latent interpolations, nearest pairs, curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..imaging import make_grid, png_bytes, to_uint8
from ..io import write_bytes
from ..models import generate as run_generator
from ..models import latents


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None, *, device: str = "cpu",
             psi: float = 1.0) -> np.ndarray:
    """uint8 images of latents z (labels y), in eval mode; psi: truncation (1 = none)."""
    generator.eval()
    return to_uint8(run_generator(generator, z.to(device), None if y is None else y.to(device), psi=psi).float().cpu())


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents a and b [nz] at fractions t [T] -> [T, nz]."""
    an, bn = a / a.norm(), b / b.norm()
    omega = torch.arccos((an * bn).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / so


def interpolation_strip(generator: nn.Module, *, nz: int, num_classes: int, steps: int, rows: int, seed: int,
                        device: str, psi: float = 1.0) -> np.ndarray:
    """uint8 [rows * steps, C, H, W]: each row walks the latent sphere between two fixed latents
    (psi: truncation, 1 = none)."""
    z = latents(2 * rows, nz, seed + 100)
    t = torch.linspace(0, 1, steps)
    path = torch.cat([slerp(z[2 * r], z[2 * r + 1], t) for r in range(rows)])
    y = (torch.arange(rows).repeat_interleave(steps) % num_classes) if num_classes else None
    return generate(generator, path, y, device=device, psi=psi)


@torch.no_grad()
def latent_traversal(vae: nn.Module, x: torch.Tensor, *, steps: int, rows: int, span: float = 3.0) -> np.ndarray:
    """uint8 [rows * steps, C, H, W]: the posterior mean of the first image of x [N, C, H, W] ([-1, 1]),
    one latent dimension swept per row over [-span, span] prior standard deviations around it.

    The rows are the dimensions with the largest mean KL over x (the ones the VAE uses; a collapsed
    dimension would draw a row of identical images)."""
    vae.eval()
    mu, logvar = vae.encode(x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)  # [nz]
    dims = torch.argsort(kl, descending=True)[: min(rows, len(kl))]
    t = torch.linspace(-span, span, steps)
    z = mu[0].repeat(len(dims) * steps, 1)
    for r, d in enumerate(dims.tolist()):
        z[r * steps : (r + 1) * steps, d] = mu[0, d] + t
    return to_uint8(torch.tanh(vae.decoder.logits(z)))


def save_png(images: np.ndarray, path: Path, *, nrow: int, scale: int = 2) -> None:
    write_bytes(path, png_bytes(make_grid(images, nrow=nrow), scale=scale))


def pairs_figure(fake: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Two rows per block: generated on top, its nearest training image below. [2K, C, H, W] in grid order."""
    k = len(fake)
    out = np.empty((2 * k, *fake.shape[1:]), np.uint8)
    ncol = min(8, k)
    for i in range(k):
        block, col = divmod(i, ncol)
        out[block * 2 * ncol + col] = fake[i]
        out[block * 2 * ncol + ncol + col] = real[i]
    return out


def read_csv(path: Path) -> dict[str, list[float]]:
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            cols.setdefault(k, []).append(float(v) if v not in ("", None) else float("nan"))
    return cols


def _varying(data: dict[str, list[float]], key: str) -> bool:
    values = [v for v in data.get(key, []) if v == v]  # NaN: a row without the column
    return bool(values) and min(values) != max(values)


def plot_curves(losses_csv: Path, scores_csv: Path, path: Path) -> bool:
    """Loss, D(x)/D(G(z)) and score-over-steps panels as one PNG (and ADA's p, and the learning
    rates where they change over the run); False when there is nothing to draw."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    losses, scores = read_csv(losses_csv), read_csv(scores_csv)
    if not losses:
        return False
    panels: list[tuple[str, list[str], dict[str, list[float]]]] = [
        ("losses", [k for k in ("loss_d", "loss_g", "loss", "recon", "kl") if k in losses], losses),
        ("discriminator", [k for k in ("p_real", "p_fake") if k in losses], losses),
        # ADA: the augmentation probability and the overfitting heuristic it holds at its target.
        ("adaptive augmentation", [k for k in ("ada_p", "ada_rt") if k in losses], losses),
        # train.lr_decay_start < 1: the schedule the run followed (constant rates get no panel).
        ("learning rates", [k for k in ("lr_g", "lr_d") if _varying(losses, k)], losses),
        ("evaluator FID (in-loop, lower is better)", ["score"] if "score" in scores else [], scores),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys, data) in zip(axes[0], panels, strict=True):
        for k in keys:
            ax.plot(data["step"], data[k], label=k, marker="o" if title.startswith("evaluator") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title.startswith("evaluator") and min(data["score"]) > 0:
            ax.set_yscale("log")  # scores fall by orders of magnitude early on
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return True


def grid_timeline(grid_dir: Path, *, max_frames: int = 6) -> list[tuple[int, Path]]:
    """Up to ``max_frames`` training grids, evenly spaced in step, first and last included."""
    frames = sorted((int(p.stem.split("_")[1]), p) for p in grid_dir.glob("step_*.png")) if grid_dir.exists() else []
    if len(frames) <= max_frames:
        return frames
    idx = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
    return [frames[i] for i in sorted(set(idx))]


PROGRESS_POINTS = (0, 25, 50, 100)  # percent of training


def progress_grids(grid_dir: Path, out_dir: Path, points: tuple[int, ...] = PROGRESS_POINTS) -> list[Path]:
    """Copy the training grid nearest to each point (percent of the last step) to
    ``training_<NNN>pct.png``: fixed names, so ``dvc plots diff`` lines them up across revisions
    whatever their step counts and grid intervals."""
    import shutil  # noqa: PLC0415

    frames = grid_timeline(grid_dir, max_frames=10**9)
    if not frames:
        return []
    last = frames[-1][0]
    out = []
    for pct in points:
        target = last * pct / 100
        _, src = min(frames, key=lambda f: (abs(f[0] - target), f[0]))
        dst = out_dir / f"training_{pct:03d}pct.png"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def _rows(metrics: dict[str, Any], previous: dict[str, Any] | None, spec: list[tuple[str, str, str]],
          group: str, *, comparable: bool) -> list[dict[str, Any]]:
    """Rows of one extractor; no change is computed against numbers of another extractor."""
    rows = []
    for label, key, better in spec:
        v = metrics.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if f"{key}_ci_low" in metrics:
            u = f"95% [{metrics[f'{key}_ci_low']:.4g}, {metrics[f'{key}_ci_high']:.4g}]"
        elif f"{key}_std" in metrics:
            u = f"± {metrics[f'{key}_std']:.3g} (std)"
        else:
            u = ""
        delta = None
        if comparable and previous and isinstance(previous.get(key), (int, float)):
            delta = v - previous[key]
        rows.append({"label": label, "key": key, "group": group, "value": v, "uncertainty": u, "delta": delta,
                     "better": better, "comparable": comparable or not previous})
    return rows


_OFFLINE = [
    ("FID", "fid", "lower"), ("KID", "kid", "lower"), ("Inception Score (offline classifier)", "IS", "higher"),
    ("Precision", "precision", "higher"), ("Recall", "recall", "higher"), ("Density", "density", "higher"),
    ("Coverage", "coverage", "higher"), ("Intra-class FID", "intra_fid", "lower"),
    ("Classification accuracy score (trained on samples)", "cas", "higher"),
    ("... the same classifier trained on as many real images", "cas_real", "higher"),
    ("VAE ELBO (nats/image, test split)", "vae_elbo", "higher"), ("VAE reconstruction NLL", "vae_recon_nll", "lower"),
    ("VAE KL", "vae_kl", "lower"), ("VAE negative ELBO (bits/dim)", "vae_bpd", "lower"),
    ("VAE reconstruction NLL (bits/dim)", "vae_recon_bpd", "lower"), ("VAE KL (bits/dim)", "vae_kl_bpd", "lower"),
    ("VAE FID with prior N(0, I) latents (instead of the ex-post density)", "vae_fid_prior", "lower"),
    ("Memorisation ratio (nn-train / nn-test)", "memorisation_ratio", "higher"),
    ("Floor: FID of real train vs test", "fid_train_vs_test", "lower"), ("IS of real test images", "IS_real", "higher"),
]
_INCEPTION = [
    ("FID", "fid", "lower"), ("KID", "kid", "lower"), ("Inception Score", "IS", "higher"),
    ("Precision", "precision", "higher"), ("Recall", "recall", "higher"), ("Density", "density", "higher"),
    ("Coverage", "coverage", "higher"), ("IS of real test images", "IS_real", "higher"),
]


def metric_rows(metrics: dict[str, Any], previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Headline metrics with their 95% interval and the change against the previous commit.

    Offline-evaluator rows first, then Inception-v3 rows (from metrics["inception"]) when those
    were computed; ``group`` says which extractor a row belongs to. Numbers are only compared
    when the previous commit used the same extractor (the evaluator's sha256, the Inception
    weights' sha256): a retrained evaluator moves every number, and such a "change" says
    nothing about the generator. Those rows get ``comparable: False``.
    """
    sha = (metrics.get("protocol") or {}).get("extractor_sha256")
    prev_sha = ((previous or {}).get("protocol") or {}).get("extractor_sha256")
    rows = _rows(metrics, previous, _OFFLINE, "offline evaluator", comparable=sha == prev_sha)
    inception = metrics.get("inception") or {}
    if inception.get("computed"):
        prev = (previous or {}).get("inception") if previous else None
        prev = prev if isinstance(prev, dict) and prev.get("computed") else None
        same = prev is not None and prev.get("weights_sha256") == inception.get("weights_sha256")
        rows += _rows(inception, prev, _INCEPTION, "Inception-v3", comparable=same)
    return rows
