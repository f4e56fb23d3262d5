"""Exponential moving average of generator weights (Karras et al. 2018; Yazıcı et al. 2019)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow``, an averaged copy of ``model``; BatchNorm buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, *, decay: float, start_step: int = 0) -> None:
        """decay: weight of the old average per step (0 = shadow is a plain copy);
        start_step: before this step the shadow copies the weights instead of averaging."""
        self.decay, self.start_step = decay, start_step
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used after ``step`` updates: 0 before start_step (a plain copy), then warmed up
        as min(decay, (1 + t) / (10 + t)) so the average forgets the random initialisation within
        the first few hundred steps instead of carrying it for ~1 / (1 - decay) steps."""
        if step < self.start_step:
            return 0.0
        t = step - self.start_step
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update_with(self, model: nn.Module, step: torch.Tensor) -> None:
        """:meth:`update` with the step as a 0-dim device tensor: no host work (capturable in a CUDA graph)."""
        t = step.float() - self.start_step
        decay = torch.where(t < 0, torch.zeros_like(t), torch.clamp((1 + t) / (10 + t), max=self.decay))
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
