"""Differentiable augmentation of discriminator inputs (Zhao et al. 2020, "DiffAugment").

The same random transform family is applied to real and fake images before D, so D cannot
memorise a small dataset while gradients still flow to G. The random parameters of a batch are
drawn first (:func:`draw`, from an explicit torch.Generator, so a resumed run draws exactly the
same augmentations) and applied by pure tensor code (:func:`apply`), which holds no random number
generation and so can be captured in a CUDA graph or compiled.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the image side
CUTOUT_RATIO = 0.5  # erase a square of half the image side


def draw(policy: list[str] | tuple[str, ...], n: int, h: int, w: int, *, channels: int, device: torch.device,
         g: torch.Generator) -> dict[str, torch.Tensor]:
    """The random parameters of ``policy`` for a batch of n images of h x w (all on ``device``)."""
    p: dict[str, torch.Tensor] = {}
    for name in policy:
        if name == "color":
            p["brightness"] = torch.rand(n, 1, 1, 1, device=device, generator=g) - 0.5
            if channels > 1:
                p["saturation"] = torch.rand(n, 1, 1, 1, device=device, generator=g) * 2
            p["contrast"] = torch.rand(n, 1, 1, 1, device=device, generator=g) + 0.5
        elif name == "translation":
            sh, sw = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
            p["tx"] = torch.randint(-sh, sh + 1, (n, 1, 1), device=device, generator=g)
            p["ty"] = torch.randint(-sw, sw + 1, (n, 1, 1), device=device, generator=g)
        elif name == "cutout":
            ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
            p["ox"] = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=device, generator=g)
            p["oy"] = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=device, generator=g)
        else:
            raise ValueError(f"unknown DiffAugment op {name!r}")  # params validation lists the allowed ones
    return p


def _color(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    x = x + p["brightness"].to(x.dtype)
    if "saturation" in p:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * p["saturation"].to(x.dtype) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * p["contrast"].to(x.dtype) + mean


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[2], x.shape[3]
    return torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")


def _translation(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    n, c, h, w = x.shape
    gi, gj = _grid(x)
    gi = (gi[None] + p["tx"] + 1).clamp(0, h + 1)
    gj = (gj[None] + p["ty"] + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # zero border: pixels shifted in from outside are 0 (mid-grey)
    idx = (gi * (w + 2) + gj).reshape(n, 1, -1).expand(-1, c, -1)
    return padded.flatten(2).gather(2, idx).reshape_as(x)


def _cutout(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    h, w = x.shape[2], x.shape[3]
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    gi, gj = _grid(x)
    inside = ((gi[None] - p["ox"] + ch // 2).abs() < ch / 2) & ((gj[None] - p["oy"] + cw // 2).abs() < cw / 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


OPS = {"color": _color, "translation": _translation, "cutout": _cutout}


def apply(x: torch.Tensor, policy: list[str] | tuple[str, ...], params: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [N, C, H, W] transformed by ``policy`` with parameters from :func:`draw` (differentiable in x)."""
    for name in policy:
        x = OPS[name](x, params)
    return x


def diff_augment(x: torch.Tensor, policy: list[str] | tuple[str, ...], g: torch.Generator) -> torch.Tensor:
    """Draw and apply in one call (for use outside the training step)."""
    p = draw(policy, x.shape[0], x.shape[2], x.shape[3], channels=x.shape[1], device=x.device, g=g)
    return apply(x, policy, p)
