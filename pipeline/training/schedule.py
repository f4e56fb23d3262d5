"""Learning rates over a run: constant, then optionally a linear fall over the last part of training.

``train.lr_decay_start`` is the fraction of ``train.steps`` after which every optimizer group's rate
falls linearly from its starting value to ``train.lr_decay_to`` times that value at the last step
(1 = constant rates, the default). The rate of a step depends only on how many steps were done
before it, so a resumed run uses the same rates as one that never stopped.

On CUDA the optimizers are fused and capturable, and a captured CUDA graph keeps whatever a
group's rate was at capture: a Python float would be frozen into it. With a decay, each group's
rate is therefore a one-element device tensor that is written in place before every step, and
the replayed graphs read it from there.
"""

from __future__ import annotations

import math

import torch


def lr_scale(step: int, *, steps: int, start: float, to: float) -> float:
    """The factor on the starting rates for the step after ``step`` steps were done (0-based)."""
    first = math.floor(start * steps + 0.5)  # the first step whose rate is below the starting one
    if start >= 1 or step < first:
        return 1.0
    span = max(steps - first, 1)
    return 1.0 - (1.0 - to) * min(step - first + 1, span) / span


class LearningRates:
    """Sets every group of ``optimizers`` to its starting rate times :func:`lr_scale` before each step."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], *, steps: int, start: float, to: float,
                 device: torch.device) -> None:
        self.optimizers, self.steps, self.start, self.to = optimizers, steps, start, to
        self.base = {k: [float(g["lr"]) for g in o.param_groups] for k, o in optimizers.items()}
        self.decays = start < 1
        # Device tensors only where a graph may capture the step (a CPU Adam takes float rates).
        self.tensors = {k: [torch.tensor(b, dtype=torch.float32, device=device) for b in rates]
                        for k, rates in self.base.items()} if self.decays and device.type == "cuda" else {}
        self.apply(0)

    def scale(self, step: int) -> float:
        return lr_scale(step, steps=self.steps, start=self.start, to=self.to)

    def apply(self, step: int) -> None:
        """Give every group its rate for the step after ``step`` steps (also after a checkpoint's
        optimizer state replaced the groups' rates with the saved ones)."""
        if not self.decays:
            return
        f = self.scale(step)
        for k, opt in self.optimizers.items():
            for i, group in enumerate(opt.param_groups):
                rate = self.base[k][i] * f
                if self.tensors:
                    t = self.tensors[k][i]
                    t.fill_(rate)  # in place: captured graphs read this storage
                    group["lr"] = t
                else:
                    group["lr"] = rate

    def current(self) -> dict[str, float]:
        """The first group's rate of each optimizer (for the step log); reads the device."""
        return {k: float(o.param_groups[0]["lr"]) for k, o in self.optimizers.items()}
