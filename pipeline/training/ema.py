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
        return self.decay if step >= self.start_step else 0.0

    @torch.no_grad()
    def update_with(self, model: nn.Module, decay: torch.Tensor) -> None:
        """The same update with the decay as a 0-dim device tensor (capturable in a CUDA graph)."""
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
