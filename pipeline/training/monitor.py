"""What the loop watches: a device-side NaN/Inf guard, loss accumulators, the best score and collapse.

:class:`Monitor` works on the device only (no host sync), so it runs inside a captured step: it
counts steps, records the first step whose losses are not finite with their values, and adds
every step's outputs into accumulators that the host reads at log steps. :class:`Scoreboard`
keeps the in-loop evaluator's history on the host: the best score, and a collapse when the score
stays worse than the best by a margin for several evaluations in a row.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..errors import TrainingDiverged

log = logging.getLogger(__name__)

GUARDED = ("loss_d", "loss_g", "loss", "gp", "r1")


class Monitor:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step = torch.zeros((), dtype=torch.long, device=device)  # steps done (a captured step advances it)
        self._zero = torch.zeros((), device=device)
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_vals = torch.zeros(len(GUARDED), device=device)
        self._bad_present = torch.zeros(len(GUARDED), dtype=torch.bool, device=device)
        self._present: dict[tuple[bool, ...], torch.Tensor] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self.steps_accumulated = 0  # host count since the last flush

    def record(self, out: dict[str, torch.Tensor]) -> None:
        """Device-side bookkeeping of a step's outputs (capturable): step counter, guard, accumulators.

        Non-finite values are never zeroed or skipped: the first such step is remembered and
        :meth:`check` raises at the next log, checkpoint or interrupt, before any weights are saved."""
        self.step.add_(1)
        key = tuple(k in out for k in GUARDED)
        if key not in self._present:
            self._present[key] = torch.tensor(key, device=self.device)
        vals = torch.stack([out[k].float() if k in out else self._zero for k in GUARDED])
        take = ~torch.isfinite(vals).all() & (self._bad_step < 0)
        self._bad_step.copy_(torch.where(take, self.step, self._bad_step))  # 1-based: the n-th step
        self._bad_vals.copy_(torch.where(take, vals, self._bad_vals))
        self._bad_present.copy_(torch.where(take, self._present[key], self._bad_present))
        for k, v in out.items():
            if k not in self._acc:
                self._acc[k] = torch.zeros((), device=self.device)
            self._acc[k].add_(v.detach().float())

    def check(self, checkpoint: Any) -> None:
        """Raise :class:`TrainingDiverged` naming the first non-finite step (one host sync)."""
        first = int(self._bad_step.item())
        if first >= 0:
            vals = ", ".join(f"{n} = {v:.4g}" for n, v, here in zip(GUARDED, self._bad_vals.tolist(),
                                                                      self._bad_present.tolist(), strict=True) if here)
            raise TrainingDiverged(
                f"training diverged at step {first}: {vals}. The last good checkpoint ({checkpoint}) is intact. "
                "Lower the learning rates, add a gradient penalty or spectral norm, or enable grad_clip.")

    def flush(self) -> dict[str, float]:
        """Mean of every accumulated output since the last flush, then zeroed in place (a captured
        graph keeps adding into the same tensors)."""
        values = self.means()
        for v in self._acc.values():
            v.zero_()
        self.steps_accumulated = 0
        return values

    def means(self) -> dict[str, float]:
        """Mean of the accumulators without resetting them (tests and benchmarks)."""
        n = max(1, self.steps_accumulated)
        return {k: float(v.item()) / n for k, v in self._acc.items()}


class Scoreboard:
    """In-loop evaluator scores (lower is better): history, best, collapse."""

    def __init__(self, *, margin: float, patience: int) -> None:
        self.margin, self.patience = margin, patience
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int] | None = None
        self.bad_streak = 0
        self.collapsed = False

    def add(self, score: float, step: int) -> bool:
        """Record a score; True when it is a new best."""
        self.history.append({"step": step, "score": score})
        if not math.isfinite(score):
            return False
        if self.best is None or score < self.best[0]:
            self.best = (score, step)
            self.bad_streak = 0
            return True
        if score > self.best[0] * (1 + self.margin):
            self.bad_streak += 1
            if self.bad_streak >= self.patience and not self.collapsed:
                self.collapsed = True
                log.warning("collapse: score %.3f at step %d is worse than the best %.3f (step %d) by more than "
                            "%.0f%% for %d evaluations", score, step, self.best[0], self.best[1], 100 * self.margin,
                            self.bad_streak)
        else:
            self.bad_streak = 0
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": list(self.best) if self.best else None,
                "bad_streak": self.bad_streak, "collapsed": self.collapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.best = (float(state["best"][0]), int(state["best"][1])) if state["best"] else None
        self.bad_streak, self.collapsed = int(state["bad_streak"]), bool(state["collapsed"])
