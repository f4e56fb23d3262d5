"""Exponential moving average of generator weights (Karras et al. 2018; Yazıcı et al. 2019).

Two forms of the per-step decay: a fixed ``decay`` warmed up over the first steps (the default),
or StyleGAN2's half-life in images, optionally ramped up with the images seen (Karras et al. 2020:
half-life 10k images, at most 0.05 times the images seen so far).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EMA:
    """Keeps ``shadow``, an averaged copy of ``model``; buffers (BatchNorm's, StyleGAN2's w_avg) are copied, not averaged."""

    def __init__(self, model: nn.Module, *, decay: float, start_step: int = 0, half_life_images: float = 0.0,
                 rampup: float = 0.0, images_per_step: int = 1) -> None:
        """decay: weight of the old average per step (0 = shadow is a plain copy);
        start_step: before this step the shadow copies the weights instead of averaging;
        half_life_images > 0: instead of ``decay``, the average halves the old weights' share every
        this many images (``images_per_step`` per step), the half-life being at most ``rampup``
        times the images seen when rampup > 0."""
        self.decay, self.start_step = decay, start_step
        self.half_life, self.rampup, self.images_per_step = half_life_images, rampup, images_per_step
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used after ``step`` updates: 0 before start_step (a plain copy); then in the
        half-life form 0.5 ** (images_per_step / half-life); otherwise warmed up as
        min(decay, (1 + t) / (10 + t)) so the average forgets the random initialisation within the
        first few hundred steps instead of carrying it for ~1 / (1 - decay) steps."""
        if step < self.start_step:
            return 0.0
        if self.half_life > 0:
            half = self.half_life if self.rampup <= 0 else min(self.half_life, step * self.images_per_step * self.rampup)
            return 0.5 ** (self.images_per_step / max(half, 1e-8))
        t = step - self.start_step
        return min(self.decay, (1 + t) / (10 + t))

    def _decay_tensor(self, step: torch.Tensor) -> torch.Tensor:
        """:meth:`decay_at` as device arithmetic on a 0-dim step tensor (no host sync)."""
        s = step.float()
        if self.half_life > 0:
            half = torch.full_like(s, self.half_life)
            if self.rampup > 0:
                half = torch.minimum(half, s * (self.images_per_step * self.rampup))
            decay = torch.exp(-math.log(2.0) * self.images_per_step / half.clamp(min=1e-8))
        else:
            t = s - self.start_step
            decay = torch.clamp((1 + t) / (10 + t), max=self.decay)
        return torch.where(s < self.start_step, torch.zeros_like(s), decay)

    @torch.no_grad()
    def update_with(self, model: nn.Module, step: torch.Tensor) -> None:
        """:meth:`update` with the step as a 0-dim device tensor: no host work (capturable in a CUDA graph)."""
        decay = self._decay_tensor(step)
        shadow = list(self.shadow.parameters())
        torch._foreach_mul_(shadow, decay)
        torch._foreach_add_(shadow, torch._foreach_mul(list(model.parameters()), 1.0 - decay))
        for b_s, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            b_s.copy_(b)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        params = [p for p in model.parameters()]
        shadow = [p for p in self.shadow.parameters()]
        if decay == 0.0:
            torch._foreach_copy_(shadow, params)
        else:
            torch._foreach_lerp_(shadow, params, 1.0 - decay)  # shadow += (1 - decay) * (p - shadow)
        for b_s, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            b_s.copy_(b)
