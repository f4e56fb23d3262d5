"""Exponential moving average of generator weights (Karras et al. 2018; Yazıcı et al. 2019).

Two forms of the per-step decay: a fixed ``decay`` warmed up over the first steps (the default),
or StyleGAN2's half-life in images, optionally ramped up with the images seen (Karras et al. 2020:
half-life 10k images, at most 0.05 times the images seen so far).

The average covers parameters only. BatchNorm's running statistics are the live generator's,
copied every step, and they describe the live weights' activations, not the averaged weights'.
:func:`recompute_batchnorm_stats` replaces them with the averaged generator's own statistics over
fresh latents (BigGAN's "standing statistics") before the average samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def has_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` holds BatchNorm layers that normalise with running statistics at eval time."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in module.modules())


@contextmanager
def _batch_statistics(bns: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """The BatchNorm layers ``bns`` normalise with batch statistics and average them into their
    running statistics with equal weights (momentum None); on exit their momenta and forwards are
    restored (their modes are the caller's to restore). A SyncBatchNorm runs as a plain BatchNorm
    here: only one process samples."""
    saved = [(m, m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
            if isinstance(m, nn.SyncBatchNorm):
                m.forward = nn.modules.batchnorm._BatchNorm.forward.__get__(m)  # type: ignore[method-assign]
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.__dict__.pop("forward", None)


@torch.no_grad()
def recompute_batchnorm_stats(module: nn.Module, draw: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
                              batches: int) -> int:
    """Replace ``module``'s BatchNorm running statistics, in place, by their mean over ``batches``
    forward passes on ``draw(i) -> (z, y)`` (y None when unconditional), BigGAN's standing statistics.

    Only the BatchNorm layers run in training mode: spectral norm's vectors, dropout and the rest
    stay as in eval mode. The tensors keep their storage (a captured CUDA graph that copies into
    them stays valid). Returns how many layers were recomputed (0: nothing to do)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with _batch_statistics(bns):
            for i in range(batches):
                z, y = draw(i)
                module(z, y)
    finally:
        for m, training in modes:
            m.training = training
    return len(bns)
