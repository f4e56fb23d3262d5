"""Adaptive discriminator augmentation (Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data").

Every image D sees, real or generated, goes through the same random, differentiable transforms,
each applied to a sample with probability ``p``. D then cannot memorise a small training set,
and since the transforms are applied to the fakes too (and gradients flow through them), G is
not pushed to produce augmented-looking images as long as ``p`` stays below where the
transforms become indistinguishable (about 0.8 for these ops in the paper).

``p`` is not a setting but a controller's output: every ``interval`` steps the overfitting
heuristic r_t = E[sign(D(real))] is compared with a target (0.6); p rises when D is too sure of
the reals and falls otherwise, by an amount that lets it cross 0 to 1 in ``speed_images``
images.

Split like :mod:`.diffaug` for the engine: :meth:`AdaptiveAugment.draw` draws every random
number of a batch (uniform gates and transform parameters, none depending on ``p``) outside the
step; :meth:`AdaptiveAugment.apply` is pure tensor code that compares the gates with the device
tensor ``p``, so a CUDA graph replays it unchanged as ``p`` moves. Statistics are accumulated on
the device inside the step (:meth:`observe`); :meth:`adjust` runs between steps, where a DDP run
can average them across ranks, so every rank uses the same ``p``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from . import distributed as dist_utils
from .distributed import DistInfo

# The blit ops (x-flip, 90-degree rotations, integer translation) move pixels without
# interpolation; geometric (isotropic scale, rotation, anisotropic scale) resamples bilinearly;
# color (brightness, contrast, saturation on RGB) and cutout act on values.
OPS = ("xflip", "rotate90", "translation", "geometric", "color", "cutout")
DEFAULT_OPS = ("xflip", "rotate90", "translation", "geometric", "color")  # the paper's "bgc"

TRANSLATION_STD = 0.125  # integer translation: N(0, 0.125) of the image side, rounded
SCALE_STD = 0.2 * math.log(2)  # isotropic and anisotropic scale: log-normal
BRIGHTNESS_STD = 0.2  # additive, in [-1, 1] pixel units
CONTRAST_STD = 0.5 * math.log(2)  # multiplicative, log-normal
SATURATION_STD = math.log(2)  # multiplicative around the per-pixel grey, log-normal
CUTOUT_SIZE = 0.5  # erased square: half the image side


class AdaptiveAugment:
    """The augmentation pipeline, its probability ``p`` and the controller that moves it.

    ops: names from :data:`OPS`, applied in that order; target: r_t the controller holds;
    interval: steps between adjustments; speed_images: images over which p can move by 1;
    images_per_step: real images D sees per step on all ranks (the adjustment's time base)."""

    def __init__(self, ops: list[str] | tuple[str, ...], *, channels: int, size: tuple[int, int], target: float,
                 interval: int, speed_images: int, images_per_step: int, p_init: float, device: torch.device) -> None:
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown}; available: {', '.join(OPS)}")
        if "rotate90" in ops and size[0] != size[1]:
            raise ValueError(f"rotate90 needs square images, these are {size[0]}x{size[1]}")
        self.ops = tuple(o for o in OPS if o in ops)
        self.channels, (self.h, self.w) = channels, size
        self.target, self.interval = target, interval
        self.rate = images_per_step * interval / speed_images  # |change of p| per adjustment
        self.p = torch.full((), float(p_init), device=device)
        self.stats = torch.zeros(2, device=device)  # sum of sign(D(real)), number of logits
        self.last_rt = torch.zeros((), device=device)

    # -- outside the step ----------------------------------------------------------------------

    def draw(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Gates (uniform in [0, 1)) and parameters of every op for n images, from ``g``."""
        dev = self.p.device

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, device=dev, generator=g)

        def normal(std: float) -> torch.Tensor:
            return torch.randn(n, device=dev, generator=g) * std

        d: dict[str, torch.Tensor] = {}
        if "xflip" in self.ops:
            d["xflip_gate"], d["xflip"] = u(), torch.randint(0, 2, (n,), device=dev, generator=g)
        if "rotate90" in self.ops:
            d["rot_gate"], d["rot"] = u(), torch.randint(0, 4, (n,), device=dev, generator=g)
        if "translation" in self.ops:
            d["shift_gate"], d["shift"] = u(), torch.randn(n, 2, device=dev, generator=g) * TRANSLATION_STD
        if "geometric" in self.ops:
            d["geo_gate"] = u(3)  # isotropic scale, rotation, anisotropic scale
            d["scale"], d["aniso"] = normal(SCALE_STD), normal(SCALE_STD)
            d["angle"] = (u() * 2 - 1) * math.pi
        if "color" in self.ops:
            d["color_gate"] = u(3)  # brightness, contrast, saturation
            d["brightness"], d["contrast"], d["saturation"] = (normal(BRIGHTNESS_STD), normal(CONTRAST_STD),
                                                               normal(SATURATION_STD))
        if "cutout" in self.ops:
            d["cutout_gate"], d["cutout_centre"] = u(), u(2)
        return d

    def adjust(self, info: DistInfo) -> None:
        """Move ``p`` by one controller step from the statistics since the last call (no host sync;
        under DDP the statistics of all ranks are averaged first: their ratio is the global r_t)."""
        dist_utils.allreduce_tensors([self.stats], info)
        rt = self.stats[0] / self.stats[1].clamp(min=1)
        self.last_rt.copy_(rt)
        self.p.copy_((self.p + torch.sign(rt - self.target) * self.rate).clamp(0.0, 1.0))
        self.stats.zero_()

    # -- inside the step (capturable) -----------------------------------------------------------

    def observe(self, real_logits: torch.Tensor) -> None:
        """Accumulate the sign of D's logits on (augmented) real images."""
        logits = real_logits.detach().float().reshape(-1)
        self.stats.add_(torch.stack([torch.sign(logits).sum(), torch.full_like(logits[0], logits.numel())]))

    def apply(self, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [N, C, H, W] in [-1, 1], each op applied to a sample where its gate < p; differentiable in x."""
        on = {k: d[k] < self.p for k in d if k.endswith("_gate")}
        if any(o in self.ops for o in ("xflip", "rotate90", "translation")):
            x = self._blit(x, d, on)
        if "geometric" in self.ops:
            x = self._geometric(x, d, on["geo_gate"])
        if "color" in self.ops:
            x = self._color(x, d, on["color_gate"])
        if "cutout" in self.ops:
            x = self._cutout(x, d, on["cutout_gate"])
        return x

    def _blit(self, x: torch.Tensor, d: dict[str, torch.Tensor], on: dict[str, torch.Tensor]) -> torch.Tensor:
        """x-flip, then a rotation by k * 90 degrees, then an integer translation (reflected at the
        border, so D sees no empty edge), as one gather: each output pixel's source index."""
        n, c, h, w = x.shape
        i = torch.arange(h, device=x.device).view(1, h, 1).expand(n, h, w)
        j = torch.arange(w, device=x.device).view(1, 1, w).expand(n, h, w)
        # Walk back from an output pixel to its source: undo the translation, the rotation, the flip.
        if "translation" in self.ops:
            # scaled by Python numbers, not a host tensor (whose copy to the GPU cannot be captured in a CUDA graph)
            scaled = torch.stack([d["shift"][:, 0] * h, d["shift"][:, 1] * w], dim=1)
            shift = torch.where(on["shift_gate"][:, None], torch.round(scaled), torch.zeros_like(scaled)).long()
            i, j = _reflect(i - shift[:, 0, None, None], h), _reflect(j - shift[:, 1, None, None], w)
        if "rotate90" in self.ops:
            k = torch.where(on["rot_gate"], d["rot"], torch.zeros_like(d["rot"]))[:, None, None]
            # Output (i, j) of a counter-clockwise rotation by k quarter turns reads source:
            # k=1: (j, w-1-i); k=2: (h-1-i, w-1-j); k=3: (h-1-j, i).
            si = torch.where(k == 1, j, torch.where(k == 2, h - 1 - i, torch.where(k == 3, h - 1 - j, i)))
            sj = torch.where(k == 1, w - 1 - i, torch.where(k == 2, w - 1 - j, torch.where(k == 3, i, j)))
            i, j = si, sj
        if "xflip" in self.ops:
            flip = (on["xflip_gate"] & (d["xflip"] == 1))[:, None, None]
            j = torch.where(flip, w - 1 - j, j)
        idx = (i * w + j).reshape(n, 1, h * w).expand(n, c, h * w)
        return x.reshape(n, c, h * w).gather(2, idx).reshape(n, c, h, w)

    def _geometric(self, x: torch.Tensor, d: dict[str, torch.Tensor], on: torch.Tensor) -> torch.Tensor:
        """Isotropic scale, rotation and anisotropic scale about the centre, bilinear with reflection.
        A sample with no gate open is returned as it is (resampling by the identity is not exact)."""
        zero = torch.zeros_like(d["scale"])
        s = torch.exp(torch.where(on[:, 0], d["scale"], zero))
        a = torch.exp(torch.where(on[:, 2], d["aniso"], zero))
        # Rotation is gated with 1 - sqrt(1 - p) per draw, as in the paper: applied twice in
        # effect (before and after the anisotropic scale), it then totals about p.
        p_rot = 1 - torch.sqrt((1 - self.p).clamp(min=0))
        theta = torch.where(d["geo_gate"][:, 1] < p_rot, d["angle"], zero)
        cos, sin = torch.cos(theta), torch.sin(theta)
        # Sampling matrix (output -> input coordinates): the inverse of scale * rotate * aniso.
        m00, m01 = cos / (s * a), sin / (s * a)
        m10, m11 = -sin * a / s, cos * a / s
        mat = torch.stack([torch.stack([m00, m01, zero], 1), torch.stack([m10, m11, zero], 1)], 1)
        grid = F.affine_grid(mat.to(x.dtype), list(x.shape), align_corners=False)
        moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        any_on = on[:, 0] | on[:, 2] | (d["geo_gate"][:, 1] < p_rot)
        return torch.where(any_on[:, None, None, None], moved, x)

    def _color(self, x: torch.Tensor, d: dict[str, torch.Tensor], on: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and (RGB) saturation, each where its gate is open; other samples keep
        their exact values (a factor of 1 around a mean is not exact in floating point)."""
        def gate(k: int) -> torch.Tensor:
            return on[:, k, None, None, None]

        x = torch.where(gate(0), x + d["brightness"].to(x.dtype)[:, None, None, None], x)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.where(gate(1), (x - mean) * torch.exp(d["contrast"]).to(x.dtype)[:, None, None, None] + mean, x)
        if x.shape[1] > 1:
            grey = x.mean(dim=1, keepdim=True)
            x = torch.where(gate(2), (x - grey) * torch.exp(d["saturation"]).to(x.dtype)[:, None, None, None] + grey, x)
        return x

    def _cutout(self, x: torch.Tensor, d: dict[str, torch.Tensor], on: torch.Tensor) -> torch.Tensor:
        """Set a square of half the side, centred anywhere in the image, to 0 (mid-grey)."""
        n, _, h, w = x.shape
        yy = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h
        xx = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w
        cy, cx = d["cutout_centre"][:, 0, None, None], d["cutout_centre"][:, 1, None, None]
        inside = ((yy.view(1, h, 1) - cy).abs() < CUTOUT_SIZE / 2) & ((xx.view(1, 1, w) - cx).abs() < CUTOUT_SIZE / 2)
        keep = ~(inside & on[:, None, None])
        return x * keep.unsqueeze(1).to(x.dtype)

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p.detach().cpu().clone(), "stats": self.stats.detach().cpu().clone(),
                "last_rt": self.last_rt.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("p", "stats", "last_rt"):
            getattr(self, name).copy_(state[name])


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) about the border pixels (..., 2, 1, 0, 1, 2, ...)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)
