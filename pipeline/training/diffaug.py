"""Differentiable augmentation of discriminator inputs (Zhao et al. 2020, "DiffAugment").

The same random transform family is applied to real and fake images before D, so D cannot
memorise a small dataset while gradients still flow to G. All randomness comes from an explicit
torch.Generator so a resumed run draws exactly the same augmentations.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    x = x + (torch.rand(n, 1, 1, 1, device=dev, dtype=dt, generator=g) - 0.5)  # brightness
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev, dtype=dt, generator=g) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=dev, dtype=dt, generator=g) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, g: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device, generator=g)
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device, generator=g)
    gi, gj = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gi = (gi[None] + tx + 1).clamp(0, h + 1)
    gj = (gj[None] + ty + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # zero border: pixels shifted in from outside are 0 (mid-grey)
    idx = (gi * (w + 2) + gj).reshape(n, 1, -1).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).reshape_as(x)


def _cutout(x: torch.Tensor, g: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device, generator=g)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device, generator=g)
    gi, gj = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    inside = ((gi[None] - ox + ch // 2).abs() < ch / 2) & ((gj[None] - oy + cw // 2).abs() < cw / 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


OPS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: list[str] | tuple[str, ...], g: torch.Generator) -> torch.Tensor:
    for name in policy:
        x = OPS[name](x, g)
    return x
