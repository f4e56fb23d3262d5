"""The training loop for every model family: wires objective, executor, sampler, monitor and checkpoints.

The loop knows no files of the pipeline's layout and no tracker: the stage gives it a work
directory (checkpoint, step log, grids, best generator), a ``log_fn(metrics, step)`` callback and
an ``eval_fn(generator) -> score`` callback (lower is better). What a step computes is the
objective's (:mod:`.objectives`); how it runs is the executor's (:mod:`.executor`); the host reads
device values only at log, evaluation and checkpoint steps.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import CheckpointError, UserError
from ..imaging import save_grid
from ..models import save_generator
from ..models.density import DensityGenerator
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint, transfer
from .config import TrainConfig
from .distributed import DistInfo
from .ema import EMA, has_running_stats, recompute_batchnorm_stats
from .executor import build_executor
from .monitor import Monitor, Scoreboard
from .objectives import OBJECTIVES, Objective, StepContext
from .sampler import Sampler
from .schedule import LearningRates

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    best_score: float | None
    best_step: int | None
    collapsed: bool
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    transfer: dict[str, Any] | None = None


class Trainer:
    # Every backward pass of a step runs on the calling thread, not on autograd's CUDA worker thread.
    # On an H100 a process's first StyleGAN2 run with lazy R1 and path length in one step ended apart
    # (by ~1e-8 in fp32) from an identical second run when the worker thread ran them, and bitwise
    # equal when the calling thread did; nothing else in the step changes (CPU backward passes always
    # run on the calling thread). False restores autograd's default, to look for that parting.
    backward_on_calling_thread = True

    def __init__(self, cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, *, device: str, workdir: Path,
                 info: DistInfo | None = None, log_fn: Callable[[dict[str, float], int], None] | None = None,
                 eval_fn: Callable[[nn.Module], float] | None = None, progress: bool = True,
                 objective: type[Objective] | None = None, compile_backend: str = "inductor") -> None:
        """images: uint8 [N, C, H, W] (CPU or device, or shard files left on disk); labels: int64 [N] (-1 when unlabeled);
        workdir: where checkpoint.pt, log.jsonl, grids/ and best.pt of this run live;
        objective: the family's class (None = the recipe's, from the objectives registry)."""
        self.cfg, self.device, self.workdir = cfg, torch.device(device), Path(workdir)
        self.info, self.log_fn, self.eval_fn, self.progress = info or DistInfo(), log_fn, eval_fn, progress
        cuda = self.device.type == "cuda"
        if tuple(cfg.image_shape) != tuple(images.shape[1:]):
            raise UserError(f"training images are {tuple(images.shape[1:])}, the config says {tuple(cfg.image_shape)}")
        # Every generator is seeded (models are also broadcast from rank 0); Python's and NumPy's are
        # unused by the loop but saved in checkpoints, which must be byte-identical between runs.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        ctx = StepContext(self.device, self.info, torch.bfloat16 if cuda and cfg.precision == "bf16" else None,
                          cuda and cfg.channels_last)
        self.sampler = Sampler(images, labels, batch_size=cfg.batch_size, nz=cfg.nz, num_classes=cfg.num_classes,
                               seed=cfg.seed, device=self.device, info=self.info, channels_last=ctx.channels_last,
                               placement=cfg.data_placement, batches_per_step=cfg.n_critic)
        self.objective = (objective or OBJECTIVES[cfg.objective])(cfg, ctx, self.sampler)
        if cfg.compile:
            self.objective.compile(compile_backend)
        self.lrs = LearningRates(self.objective.optimizers, steps=cfg.steps, start=cfg.lr_decay_start,
                                 to=cfg.lr_decay_to, device=self.device)
        self.ema = EMA(self.objective.generator, decay=cfg.ema_decay, start_step=cfg.ema_start,
                       half_life_images=cfg.ema_kimg * 1000, rampup=cfg.ema_rampup,
                       images_per_step=cfg.batch_size * self.info.world_size)
        self.monitor = Monitor(self.device)
        self.scores = Scoreboard(margin=cfg.collapse_margin, patience=cfg.collapse_patience)
        graph = cuda and cfg.cuda_graph and self.sampler.capturable and not (self.info.enabled and cfg.sync_bn)
        self.executor = build_executor(self._body, self.info, device=self.device, graph=graph)
        ctx.sync = self.executor.sync
        self.step, self.transfer = 0, None
        self._standing_at: int | None = None  # the step whose EMA weights the shadow's statistics belong to
        g = torch.Generator().manual_seed(cfg.seed)  # fixed latents (and labels) for grids: same images every run
        self.z_fixed = torch.randn(64, cfg.nz, generator=g).to(self.device)
        self.y_fixed = (torch.arange(64) % cfg.num_classes).to(self.device) if cfg.num_classes else None

    # -- one step ---------------------------------------------------------------------------------

    def _body(self, draws: Any, variant: Hashable) -> None:
        """All device work of a step (what an executor runs or captures)."""
        out = self.objective.step(draws, variant, self.monitor.step)
        self.monitor.record(out)
        self.ema.update_with(self.objective.generator, self.monitor.step)  # steps done, this one included

    def train_step(self, want_norm: bool = False) -> None:
        draws = self.objective.draw()
        self.lrs.apply(self.step)
        with torch.autograd.set_multithreading_enabled(not self.backward_on_calling_thread):  # thread-local
            self.executor.run(draws, self.objective.variant(self.step, want_norm))
        self.sampler.release()
        self.step += 1
        self._standing_at = None  # the EMA update copied the live G's statistics
        self.objective.after_step(self.step)
        self.monitor.steps_accumulated += 1
        if self.device.type != "cuda":
            self.check()  # free on CPU: a divergence is caught within its step

    def check(self) -> None:
        self.monitor.check(self.ckpt_path)

    # -- state -------------------------------------------------------------------------------------

    @property
    def key(self) -> str:
        """What a checkpoint must match to be resumed: the semantic config and every tensor's name and shape."""
        # A streamed run draws its batches in another order than a resident one: not resumable across.
        extra = {"sampling": "stream"} if self.sampler.streamed else {}
        return self.cfg.key(layout=self.objective.layout(), **extra)

    @property
    def ckpt_path(self) -> Path:
        return self.workdir / ("checkpoint.pt" if self.info.world_size == 1 else f"checkpoint-rank{self.info.rank}.pt")

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "key": self.key, "config": json.dumps(self.cfg.to_dict(), sort_keys=True),
                **self.objective.state_dict(), "ema": self.ema.shadow.state_dict(), "scaler": None,
                "sampler": self.sampler.state_dict(), "rng": capture_rng(), "eval": self.scores.state_dict(),
                "world_size": self.info.world_size}

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self.objective.load_state_dict(ckpt)
        self.ema.shadow.load_state_dict(ckpt["ema"])
        self._standing_at = None
        self.step = int(ckpt["step"])
        self.monitor.step.fill_(self.step)
        self.lrs.apply(self.step)  # the saved groups carry the saved rates (on the CPU, as loaded)
        self.sampler.load_state_dict(ckpt["sampler"])
        restore_rng(ckpt["rng"])
        self.scores.load_state_dict(ckpt["eval"])

    def try_resume(self) -> bool:
        """Continue from the work directory's checkpoint if it belongs to this config."""
        path = self.ckpt_path
        if not (self.cfg.resume and path.exists()):
            return False
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            log.warning("not resuming: %s", exc)
            return False
        if ckpt.get("key") != self.key or int(ckpt.get("world_size", 1)) != self.info.world_size:
            log.info("not resuming: %s belongs to another config", path)
            return False
        if int(ckpt["step"]) > self.cfg.steps:
            log.info("not resuming: checkpoint is at step %d, past train.steps=%d", ckpt["step"], self.cfg.steps)
            return False
        try:
            self.load_state(ckpt)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: matches this config but cannot be loaded ({str(exc).splitlines()[0][:200]}); "
                                  "delete it to start afresh") from None
        path = self.workdir / "log.jsonl"  # drop log lines a killed run wrote past its last checkpoint
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))
        log.info("resumed from %s at step %d", self.ckpt_path, self.step)
        return True

    def init_from(self, path: Path, *, freeze_d_layers: int = 0) -> dict[str, Any]:
        """Transfer: copy every tensor whose name and shape match from another run's file."""
        report = transfer(path, self.objective.modules)
        self.ema.shadow.load_state_dict(self.objective.generator.state_dict())
        self._standing_at = None
        self.objective.frozen = self.objective.frozen_candidates()[:freeze_d_layers]
        for m in self.objective.frozen:
            m.requires_grad_(False)
            report["frozen"] += [n for n, _ in m.named_parameters()]
        log.info("init_from %s: %d tensors matched, %d newly initialised, %d layers frozen", path,
                 len(report["matched"]), len(report["new"]), len(self.objective.frozen))
        self.transfer = report
        return report

    # -- periodic work -------------------------------------------------------------------------------

    def ema_generator(self) -> nn.Module:
        """The EMA generator in eval mode, ready to sample: for a GAN with BatchNorm, its running
        statistics recomputed for its own weights (``train.ema_standing_stats`` batches of latents
        drawn as training draws them, from a generator seeded by ``train.seed``, so the same weights
        always get the same statistics and the training's random streams are untouched). Done once
        per step: the next training step copies the live G's statistics back (the EMA update).
        Grids sample under the training's autocast, scores and saved files in float32; the
        statistics are float32's, and those of untruncated latents."""
        g, cfg = self.ema.shadow, self.cfg
        if self._standing_at == self.step:  # already recomputed for these weights
            return g.eval()
        if self.objective.generator_sees_prior_latents and cfg.ema_standing_stats > 0 and has_running_stats(g):
            gen = torch.Generator().manual_seed(cfg.seed + 7919)

            def draw(_: int) -> tuple[torch.Tensor, torch.Tensor | None]:
                z = torch.randn(cfg.batch_size, cfg.nz, generator=gen).to(self.device)
                y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(self.device) \
                    if cfg.num_classes else None
                return z, y

            recompute_batchnorm_stats(g, draw, cfg.ema_standing_stats)
            self._standing_at = self.step
        return g.eval()

    def save_grid(self) -> None:
        g = self.ema_generator()
        with torch.no_grad(), self.objective.autocast():
            x = g(self.z_fixed, self.y_fixed).float()
        save_grid(x, self.workdir / "grids" / f"step_{self.step:06d}.png", nrow=8)

    def save_generator(self, path: Path) -> None:
        cfg = self.cfg
        info = {"model": cfg.model, "nz": cfg.nz, "num_classes": cfg.num_classes, "image_shape": list(cfg.image_shape),
                "step": self.step, "ema": cfg.ema_decay > 0 or cfg.ema_kimg > 0, "config": json.dumps(cfg.to_dict(), sort_keys=True)}
        arch, kwargs = self.objective.generator_spec
        fitted, density = self.objective.latent_density(self.step), None
        if fitted is not None:  # the ex-post latent density travels with the weights it was fitted for
            density = fitted[0].to_payload(**fitted[1])
            info["latent_sampler"] = cfg.vae_sampler
        save_generator(path, self.ema_generator(), arch=arch, kwargs=kwargs, info=info, latent_density=density)

    def sampling_generator(self) -> nn.Module:
        """The EMA generator as the saved file samples it (through the latent density it selects)."""
        g = self.ema_generator()
        fitted = self.objective.latent_density(self.step) if self.cfg.vae_sampler == "gmm" else None
        if fitted is not None:
            g = DensityGenerator(g, fitted[0].to(self.device)).eval()
        return g

    def evaluate(self) -> float | None:
        if self.eval_fn is None:
            return None
        score = float(self.eval_fn(self.sampling_generator()))
        if self.scores.add(score, self.step):
            self.save_generator(self.workdir / "best.pt")
        return score

    def checkpoint(self) -> None:
        self.check()  # never save weights a diverged step produced
        save_checkpoint(self.ckpt_path, self.state())

    def _log(self, seconds: float) -> dict[str, Any]:
        n = self.monitor.steps_accumulated
        values: dict[str, Any] = self.monitor.flush()
        images = n * self.cfg.batch_size * self.info.world_size * self.objective.batches_per_step
        values.update(step=self.step, images_per_s=images / max(seconds, 1e-9),
                      **{f"lr_{k}": v for k, v in self.lrs.current().items()})
        return values

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, main = self.cfg, self.info.is_main
        self.workdir.mkdir(parents=True, exist_ok=True)
        stopped_early = False
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.progress and main), mininterval=1.0)
        if self.step == 0 and main:
            self.save_grid()
        t_last = time.perf_counter()
        try:
            while self.step < cfg.steps:
                self.train_step(want_norm=(self.step + 1) % cfg.log_every == 0)
                bar.update(1)
                s, last = self.step, self.step == cfg.steps
                if s % cfg.log_every == 0 or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.check()
                    values = self._log(time.perf_counter() - t_last)
                    t_last = time.perf_counter()
                    if main:
                        self._record(values, s)
                        bar.set_postfix({k: f"{values[k]:.3g}" for k in ("loss_d", "loss_g", "loss") if k in values})
                if main and (s % cfg.grid_every == 0 or last):
                    self.save_grid()
                if main and (s % cfg.eval_every == 0 or last):
                    score = self.evaluate()
                    if score is not None:
                        self._record({"score": score}, s)
                        t_last = time.perf_counter()  # evaluation time is not training throughput
                if s % cfg.checkpoint_every == 0 or last:
                    self.checkpoint()
                if self.scores.collapsed and cfg.stop_on_collapse:
                    log.warning("stopping at step %d: collapse detected (train.stop_on_collapse)", s)
                    stopped_early = True
                    self.checkpoint()
                    break
        except KeyboardInterrupt:
            if self.step > 0:  # SIGTERM / Ctrl-C: keep the work, unless the weights are already bad
                self.check()
                self.checkpoint()
                log.warning("interrupted at step %d; checkpoint saved to %s (re-run to resume)", self.step, self.ckpt_path)
            raise
        finally:
            bar.close()
            self.sampler.close()
        if main and self.scores.best is None:
            self.save_generator(self.workdir / "best.pt")  # no evaluator: the final EMA is the best we know
        best = self.scores.best
        return TrainResult(step=self.step, best_score=best[0] if best else None, best_step=best[1] if best else None,
                           collapsed=self.scores.collapsed, stopped_early=stopped_early,
                           history=list(self.scores.history), transfer=self.transfer)

    def _record(self, values: dict[str, Any], step: int) -> None:
        with open(self.workdir / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        if self.log_fn:
            self.log_fn({k: v for k, v in values.items() if k != "step"}, step)
