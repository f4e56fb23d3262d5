"""The training loop for every model family: GANs (any recipe) and the VAE.

The loop knows no files of the pipeline's layout and no tracker: the stage gives it a work
directory (checkpoint, step log, grids, best generator), a ``log_fn(metrics, step)`` callback and
an ``eval_fn(generator) -> score`` callback (lower is better), and wires them to MLflow and the
offline evaluator.

Performance habits: the dataset lives on the device as uint8 and is converted per batch; random
numbers come from one device generator (saved in checkpoints); losses are accumulated on the
device and read only at log steps; on CUDA, bf16 autocast and channels_last are available.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import CheckpointError, TrainingDiverged, UserError
from ..imaging import save_grid
from ..losses import get_loss, gradient_penalty, r1_penalty
from ..models import build_discriminator, build_generator, build_vae, recipe, save_generator
from ..models.layers import channels_last_strided, init_weights
from ..models.vae import vae_terms
from . import distributed as dist_utils
from .checkpoint import capture_rng, config_key, load_checkpoint, restore_rng, save_checkpoint
from .diffaug import diff_augment
from .distributed import DistInfo
from .ema import EMA

log = logging.getLogger(__name__)

# Keys of a train config that do not change what is computed, so a checkpoint stays resumable
# when only they change (the step budget, how often things are logged or saved, the run mode).
NON_SEMANTIC_KEYS = ("steps", "log_every", "checkpoint_every", "grid_every", "eval_every", "eval_samples",
                     "collapse_margin", "collapse_patience", "stop_on_collapse", "resume", "num_threads",
                     "devices", "cuda_graph", "compile")


def resolve_config(train: dict[str, Any], *, seed: int, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
    """params.train + the recipe's defaults + what the data dictates -> the plain config of a run."""
    cfg = dict(train)
    rec = recipe(cfg["model"])
    for key, value in rec.items():
        if key != "arch" and cfg.get(key) is None:
            cfg[key] = value
    cfg["arch"] = rec["arch"]
    if cfg["conditional"] and num_classes < 2:
        raise UserError("train.conditional: the dataset has no labels (or one class); "
                        "set train.conditional: false or use a labeled source")
    cfg.update(seed=seed, image_shape=list(image_shape), num_classes=num_classes if cfg["conditional"] else 0)
    return cfg


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
    def __init__(self, cfg: dict[str, Any], images: torch.Tensor, labels: torch.Tensor, *, device: str,
                 workdir: Path, info: DistInfo | None = None,
                 log_fn: Callable[[dict[str, float], int], None] | None = None,
                 eval_fn: Callable[[nn.Module], float] | None = None, progress: bool = True) -> None:
        """images: uint8 [N, C, H, W] (CPU or device); labels: int64 [N] (-1 when unlabeled);
        workdir: where checkpoint.pt, log.jsonl, grids/ and best.pt of this run live."""
        self.cfg, self.device, self.workdir = cfg, torch.device(device), Path(workdir)
        self.info = info or DistInfo()
        self.log_fn, self.eval_fn, self.progress = log_fn, eval_fn, progress
        self.is_vae = cfg["arch"] == "vae"
        self.cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if (self.cuda and cfg["precision"] == "bf16") else None
        self.channels_last = self.cuda and cfg["channels_last"]
        c, h, w = cfg["image_shape"]
        if (h, w) != (images.shape[2], images.shape[3]) or c != images.shape[1]:
            raise UserError(f"training images are {tuple(images.shape[1:])}, the config says {(c, h, w)}")

        self._use_graph = False
        self._reuse_fake = cfg["arch"] != "vae" and cfg["n_critic"] == 1
        # Models are initialised from the seed (identical on every rank) and broadcast anyway. The
        # Python and NumPy generators are seeded too: the loop does not draw from them, but they are
        # saved in checkpoints, which must be byte-identical between identical runs.
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])
        np.random.seed(cfg["seed"] % 2**32)
        self._build_models()
        # Data: the whole set on the device as uint8 when it fits; this rank's shard only.
        shard = slice(self.info.rank, None, self.info.world_size)
        shard_images = images[shard]
        self.data_on_device = self._fits_on_device(shard_images)
        if self.data_on_device:
            self.images = shard_images.to(self.device)
        else:  # too large for the GPU: pinned host memory, one host-to-device copy per batch
            self.images = shard_images.cpu().pin_memory() if self.cuda else shard_images.cpu()
        self.labels = labels[shard].to(self.device)
        log.info("training data: %d images %s uint8 (%.0f MiB) %s", len(self.images), tuple(self.images.shape[1:]),
                 self.images.numel() / 2**20, f"on {self.device}" if self.data_on_device else "in pinned host memory")
        if len(self.images) < cfg["batch_size"]:
            raise UserError(f"train.batch_size={cfg['batch_size']} is larger than the {len(self.images)} training images "
                            "(per process); lower it")
        self._use_graph = self._graph_wanted()  # needs to know where the data lives
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg["seed"] * 7919 + 1 + self.info.rank)
        self.perm = torch.empty(0, dtype=torch.long, device=self.device)
        self.pos = 0
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int] | None = None
        self.bad_streak = 0
        self.collapsed = False
        # Fixed latents (and labels) for grids: the same images at every step and in every run.
        g = torch.Generator().manual_seed(cfg["seed"])
        self.z_fixed = torch.randn(64, cfg["nz"], generator=g).to(self.device)
        self.y_fixed = (torch.arange(64) % max(1, cfg["num_classes"])).to(self.device) if cfg["num_classes"] else None
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_steps = 0
        # Device-side state of the guard and the step counter (persistent: a CUDA graph writes them).
        self._zero = torch.zeros((), device=self.device)
        self._dstep = torch.zeros((), dtype=torch.long, device=self.device)
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_vals = torch.zeros(len(self._GUARDED), device=self.device)
        self._bad_present = torch.zeros(len(self._GUARDED), dtype=torch.bool, device=self.device)
        self._present: dict[tuple[bool, ...], torch.Tensor] = {}
        # One captured graph per R1 pattern of a step (which D iterations apply lazy R1).
        self._graphs: dict[tuple[bool, ...], torch.cuda.CUDAGraph] = {}
        self._warm: dict[tuple[bool, ...], int] = {}
        self._static: dict[str, Any] | None = None
        self.transfer: dict[str, Any] | None = None

    # -- construction ---------------------------------------------------------------------------

    def _build_models(self) -> None:
        cfg = self.cfg
        c, h, _ = cfg["image_shape"]
        common = {"channels": c, "size": h, "num_classes": cfg["num_classes"]}
        if self.is_vae:
            self.vae = build_vae(nz=cfg["nz"], ngf=cfg["ngf"], ndf=cfg["ndf"], **common)
            init_weights(self.vae, cfg["init"])
            self.g = self.vae.decoder
            self.g_arch, self.g_kwargs = "dcgan", {"nz": cfg["nz"], "ngf": cfg["ngf"], **common}
            self.d = None
            modules: list[nn.Module] = [self.vae]
        else:
            self.g_arch = cfg["arch"]
            self.g_kwargs = {"nz": cfg["nz"], "ngf": cfg["ngf"], **common}
            self.g = build_generator(self.g_arch, **self.g_kwargs)
            self.d = build_discriminator(cfg["arch"], ndf=cfg["ndf"], norm=cfg["d_norm"],
                                         spectral_norm=cfg["spectral_norm"], mbstd=cfg["mbstd"], **common)
            init_weights(self.g, cfg["init"])
            init_weights(self.d, cfg["init"])
            modules = [self.g, self.d]
        if self.info.enabled and cfg["sync_bn"]:
            if not self.cuda:
                raise UserError("train.sync_bn: synchronised BatchNorm needs CUDA devices (PyTorch's SyncBatchNorm "
                                "has no CPU kernel); set it to false for CPU processes")
            modules = [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in modules]
            if self.is_vae:
                self.vae = modules[0]
                self.g = self.vae.decoder
            else:
                self.g, self.d = modules
        for m in modules:
            m.to(self.device)
            if self.channels_last:
                m.to(memory_format=torch.channels_last)
            dist_utils.broadcast_module(m, self.info)
        self.ema = EMA(self.g, decay=cfg["ema_decay"], start_step=cfg["ema_start"])
        # Fused Adam on CUDA; capturable so its step counters live on the device (CUDA graphs).
        fused = {"fused": True, "capturable": True} if self.cuda else {}
        betas = (cfg["beta1"], cfg["beta2"])
        if self.is_vae:
            self.opt_g = torch.optim.Adam(self.vae.parameters(), lr=cfg["lr_g"], betas=betas, **fused)
            self.opt_d = None
        else:
            self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg["lr_g"], betas=betas, **fused)
            self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg["lr_d"], betas=betas, **fused)
        self.loss = None if self.is_vae else get_loss(cfg["loss"])
        # The training steps call these; with train.compile they are torch.compile'd views of the
        # same modules (same parameters; checkpoints and the EMA see the plain modules). R1's double
        # backward always goes through the plain D (compiled graphs have no double backward).
        self.g_run, self.d_run, self.vae_run = self.g, self.d, (self.vae if self.is_vae else None)
        if cfg["compile"]:
            if self.is_vae:
                self.vae_run = torch.compile(self.vae, dynamic=False)
            else:
                self.g_run = torch.compile(self.g, dynamic=False)
                self.d_run = torch.compile(self.d, dynamic=False)

    # -- state ----------------------------------------------------------------------------------

    @property
    def key(self) -> str:
        """What a checkpoint must match to be resumed: the semantic config and the models' layout
        (every tensor's name and shape), so a checkpoint of older model code is never loaded."""
        modules = {"vae": self.vae} if self.is_vae else {"g": self.g, "d": self.d}
        layout = {n: {k: list(v.shape) for k, v in m.state_dict().items()} for n, m in modules.items()}
        return config_key({**self.cfg, "_layout": layout}, ignore=NON_SEMANTIC_KEYS)

    def state(self) -> dict[str, Any]:
        models = {"vae": self.vae.state_dict()} if self.is_vae else {"g": self.g.state_dict(), "d": self.d.state_dict()}
        optim = {"g": self.opt_g.state_dict()}
        if self.opt_d is not None:
            optim["d"] = self.opt_d.state_dict()
        return {
            "step": self.step, "key": self.key, "config": json.dumps(self.cfg, sort_keys=True),
            "models": models, "ema": self.ema.shadow.state_dict(), "optim": optim, "scaler": None,
            "sampler": {"perm": self.perm.cpu(), "pos": self.pos, "generator": self.gen.get_state()},
            "rng": capture_rng(),
            "eval": {"history": self.history, "best": list(self.best) if self.best else None,
                     "bad_streak": self.bad_streak, "collapsed": self.collapsed},
            "world_size": self.info.world_size,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        if self.is_vae:
            self.vae.load_state_dict(ckpt["models"]["vae"])
        else:
            self.g.load_state_dict(ckpt["models"]["g"])
            self.d.load_state_dict(ckpt["models"]["d"])
        self.ema.shadow.load_state_dict(ckpt["ema"])
        self.opt_g.load_state_dict(ckpt["optim"]["g"])
        if self.opt_d is not None:
            self.opt_d.load_state_dict(ckpt["optim"]["d"])
        self.step = int(ckpt["step"])
        self._dstep.fill_(self.step)
        self.perm = ckpt["sampler"]["perm"].to(self.device)
        self.pos = int(ckpt["sampler"]["pos"])
        self.gen.set_state(ckpt["sampler"]["generator"])
        restore_rng(ckpt["rng"])
        ev = ckpt["eval"]
        self.history = list(ev["history"])
        self.best = tuple(ev["best"]) if ev["best"] else None  # type: ignore[assignment]
        self.bad_streak, self.collapsed = int(ev["bad_streak"]), bool(ev["collapsed"])

    @property
    def ckpt_path(self) -> Path:
        name = "checkpoint.pt" if self.info.world_size == 1 else f"checkpoint-rank{self.info.rank}.pt"
        return self.workdir / name

    def try_resume(self) -> bool:
        """Continue from the work directory's checkpoint if it belongs to this config."""
        path = self.ckpt_path
        if not (self.cfg["resume"] and path.exists()):
            return False
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            log.warning("not resuming: %s", exc)
            return False
        if ckpt.get("key") != self.key or int(ckpt.get("world_size", 1)) != self.info.world_size:
            log.info("not resuming: %s belongs to another config", path)
            return False
        if int(ckpt["step"]) > self.cfg["steps"]:
            log.info("not resuming: checkpoint is at step %d, past train.steps=%d", ckpt["step"], self.cfg["steps"])
            return False
        try:
            self.load_state(ckpt)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: matches this config but cannot be loaded ({str(exc).splitlines()[0][:200]}); "
                                  "delete it to start afresh") from None
        self._truncate_log(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def init_from(self, path: Path, *, freeze_d_layers: int = 0) -> dict[str, Any]:
        """Transfer: copy every tensor whose name and shape match from another run's file."""
        from ..safeload import safe_load  # noqa: PLC0415

        payload = safe_load(path)
        sources: dict[str, dict[str, torch.Tensor]] = {}
        if isinstance(payload, dict) and payload.get("format") == "pipeline.checkpoint/1":
            models = payload["models"]
            if "vae" in models:
                sources["vae"] = models["vae"]
            else:
                sources["g"], sources["d"] = models["g"], models["d"]
        elif isinstance(payload, dict) and payload.get("format") == "pipeline.generator/1":
            sources["g"] = payload["state_dict"]
        else:
            raise CheckpointError(f"train.init_from: {path} is neither a checkpoint nor a generator file of this pipeline")
        targets = {"vae": self.vae} if self.is_vae else {"g": self.g, "d": self.d}
        report: dict[str, Any] = {"source": str(path), "matched": [], "new": [], "frozen": []}
        for name, module in targets.items():
            src = sources.get(name) or (sources.get("g") if self.is_vae else None)
            own = module.state_dict()
            for key, tensor in own.items():
                if src is not None and key in src and src[key].shape == tensor.shape:
                    tensor.copy_(src[key])
                    report["matched"].append(f"{name}.{key}")
                else:
                    report["new"].append(f"{name}.{key}")
        self.ema.shadow.load_state_dict(self.g.state_dict())
        if freeze_d_layers and self.d is not None:
            for m in self._d_layers()[:freeze_d_layers]:
                for pname, p in m.named_parameters():
                    p.requires_grad_(False)
                    report["frozen"].append(pname)
        log.info("init_from %s: %d tensors matched, %d newly initialised, %d D layers frozen", path,
                 len(report["matched"]), len(report["new"]), freeze_d_layers)
        self.transfer = report
        return report

    # -- data and randomness --------------------------------------------------------------------
    # Everything random a step consumes is drawn on the host side of the step, in a fixed order
    # (data indices, latents, labels), by the same code for the eager and the CUDA-graph paths.

    def _next_indices(self) -> torch.Tensor:
        b = self.cfg["batch_size"]
        if self.pos + b > len(self.perm):
            self.perm = torch.randperm(len(self.images), device=self.device, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + b]
        self.pos += b
        return idx

    def _fits_on_device(self, images: torch.Tensor) -> bool:
        """Keep the dataset on the GPU when it takes at most half of the free device memory."""
        if not self.cuda:
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return images.numel() * images.element_size() <= free // 2

    def _images(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.data_on_device:
            x = self.images.index_select(0, idx)
        else:
            x = self.images.index_select(0, idx.cpu()).to(self.device, non_blocking=True)
        x = x.float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]
        if self.channels_last:
            x = channels_last_strided(x)
        y = self.labels.index_select(0, idx) if self.cfg["num_classes"] else None
        return x, y

    def _latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, self.cfg["nz"], device=self.device, generator=self.gen)
        y = None
        if self.cfg["num_classes"]:
            y = torch.randint(0, self.cfg["num_classes"], (n,), device=self.device, generator=self.gen)
        return z, y

    def _draw(self) -> dict[str, Any]:
        """Indices of the real batches and the latents of one step (one batch for the VAE)."""
        b = self.cfg["batch_size"]
        if self.is_vae:
            return {"idx": [self._next_indices()], "zd": []}
        draws: dict[str, Any] = {"idx": [], "zd": []}
        for _ in range(self.cfg["n_critic"]):
            draws["idx"].append(self._next_indices())
            draws["zd"].append(self._latents(b)[0])  # fake images in the D step take the real labels
        if not self._reuse_fake:
            draws["zg"], draws["yg"] = self._latents(b)
        return draws

    # -- steps ----------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        # Autocast's weight cache must be off inside a CUDA graph (cast copies would be stale).
        return torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                              cache_enabled=not self._use_graph) if self.cuda else torch.autocast("cpu", enabled=False)

    def _d_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """What D sees: augmented and noised (in fp32) when configured, then in the dtype D computes
        in (bf16 under bf16 autocast, where the first convolution would cast it anyway). Real and
        fake batches reach D in one dtype: no round trips through fp32, one compiled graph of D."""
        if self.cfg["diffaug"] or sigma > 0:
            x = x.float()
        if self.cfg["diffaug"]:
            x = diff_augment(x, self.cfg["diffaug"], self.gen)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=self.gen)
        x = x.to(self.autocast_dtype or torch.float32)
        return channels_last_strided(x) if self.channels_last else x

    def _noise_sigma(self) -> float:
        s0 = self.cfg["instance_noise"]
        return s0 * max(0.0, 1.0 - self.step / self.cfg["instance_noise_decay_steps"]) if s0 > 0 else 0.0

    def _clip(self, params: Any) -> torch.Tensor | None:
        if self.cfg["grad_clip"] > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg["grad_clip"])
        return None

    def _grad_norm(self, module: nn.Module) -> torch.Tensor:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.zeros((), device=self.device)

    def _d_step(self, idx: torch.Tensor, z: torch.Tensor, r1_now: bool, want_norm: bool
                ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None] | None]:
        """One D update; with a single critic step it also returns the fake batch (with its graph)
        and labels for the G step to reuse, as the classic DCGAN loop does: one G forward per step."""
        cfg = self.cfg
        x, y = self._images(idx)
        yz = y  # conditional: fakes of the same classes as the real batch
        sigma = self._noise_sigma()
        if self._reuse_fake:
            with self._autocast():
                fake_g = self.g_run(z, yz)
            fake = fake_g.detach()
        else:
            with torch.no_grad(), self._autocast():
                fake = self.g_run(z, yz)
            fake_g = None
        with self._autocast():
            real_logits = self.d_run(self._d_input(x, sigma), y).float()
            fake_logits = self.d_run(self._d_input(fake, sigma), yz).float()
            loss = self.loss.d(real_logits, fake_logits, cfg["label_smoothing"])
        out = {"loss_d": loss.detach(), "d_real": real_logits.mean().detach(), "d_fake": fake_logits.mean().detach(),
               "p_real": torch.sigmoid(real_logits).mean().detach(), "p_fake": torch.sigmoid(fake_logits).mean().detach()}
        total = loss
        if cfg["gp_weight"] > 0:
            gp = gradient_penalty(self.d, x, fake.to(x.dtype), y, generator=self.gen)
            total = total + cfg["gp_weight"] * gp
            out["gp"] = gp.detach()
        if r1_now:
            r1 = r1_penalty(self.d, x, y)
            total = total + (cfg["r1_gamma"] / 2) * r1 * cfg["r1_every"]  # lazy: scaled by the interval
            out["r1"] = r1.detach()
        self.opt_d.zero_grad(set_to_none=True)
        total.backward()
        dist_utils.allreduce_grads([p for p in self.d.parameters() if p.requires_grad], self.info)
        clipped = self._clip(self.d.parameters())
        if want_norm:
            out["grad_norm_d"] = clipped if clipped is not None else self._grad_norm(self.d)
        self.opt_d.step()
        return out, (None if fake_g is None else (fake_g, yz))

    def _g_step(self, z: torch.Tensor | None, y: torch.Tensor | None, want_norm: bool,
                fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        sigma = self._noise_sigma()
        self.d.requires_grad_(False)  # no D parameter gradients in the G step
        with self._autocast():
            if fake is None:
                fake = self.g_run(z, y)
            loss = self.loss.g(self.d_run(self._d_input(fake, sigma), y).float())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.d.requires_grad_(True)
        self._refreeze()
        dist_utils.allreduce_grads(list(self.g.parameters()), self.info)
        clipped = self._clip(self.g.parameters())
        out = {"loss_g": loss.detach()}
        if want_norm:
            out["grad_norm_g"] = clipped if clipped is not None else self._grad_norm(self.g)
        self.opt_g.step()
        return out

    def _d_layers(self) -> list[nn.Module]:
        """D's weight layers in order (what train.freeze_d_layers counts)."""
        return [m for m in self.d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def _refreeze(self) -> None:
        if self.transfer and self.transfer["frozen"] and self.d is not None:
            for m in self._d_layers()[: self.cfg["freeze_d_layers"]]:
                m.requires_grad_(False)

    def _vae_step(self, idx: torch.Tensor, want_norm: bool) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x, y = self._images(idx)
        warm = cfg["kl_warmup_steps"]
        beta = cfg["kl_weight"] * (min(1.0, self.step / warm) if warm else 1.0)
        with self._autocast():
            logits, mu, logvar = self.vae_run(x, y)
        nll, kl = vae_terms(x.float(), logits.float(), mu.float(), logvar.float(), recon=cfg["recon"])
        loss = (nll + beta * kl).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        dist_utils.allreduce_grads(list(self.vae.parameters()), self.info)
        clipped = self._clip(self.vae.parameters())
        out = {"loss": loss.detach(), "recon": nll.mean().detach(), "kl": kl.mean().detach(),
               "elbo": -(nll + kl).mean().detach(), "kl_weight": torch.full((), beta, device=self.device)}
        if want_norm:
            out["grad_norm"] = clipped if clipped is not None else self._grad_norm(self.vae)
        self.opt_g.step()
        return out

    def _r1_pattern(self) -> tuple[bool, ...]:
        """Which of this step's D iterations apply lazy R1 (every r1_every-th D iteration)."""
        if self.is_vae:
            return ()
        n, every = self.cfg["n_critic"], self.cfg["r1_every"]
        return tuple(self.cfg["r1_gamma"] > 0 and (self.step * n + i) % every == 0 for i in range(n))

    def _compute(self, draws: dict[str, Any], want_norm: bool, r1: tuple[bool, ...]) -> dict[str, torch.Tensor]:
        """All device work of one step given its draws and R1 pattern; returns device scalars (no host sync)."""
        if self.is_vae:
            self.vae.train()
            return self._vae_step(draws["idx"][0], want_norm)
        self.g.train()
        self.d.train()
        out: dict[str, torch.Tensor] = {}
        kept = None
        for idx, z, r1_now in zip(draws["idx"], draws["zd"], r1, strict=True):
            d_out, kept = self._d_step(idx, z, r1_now, want_norm)
            out.update(d_out)
        if kept is not None:
            out.update(self._g_step(None, kept[1], want_norm, fake=kept[0]))
        else:
            out.update(self._g_step(draws["zg"], draws["yg"], want_norm))
        return out

    def _after_compute(self, out: dict[str, torch.Tensor]) -> None:
        """Device-side bookkeeping of a step: step counter, divergence guard, log accumulators."""
        self._dstep.add_(1)
        self._guard(out)
        self._accumulate(out)

    def train_step(self, want_norm: bool = False) -> None:
        """One generator step (after n_critic D steps for GANs), eager or replayed from a CUDA graph."""
        draws = self._draw()
        r1 = self._r1_pattern()
        if self._use_graph:
            self._graph_step(draws, r1)
        else:
            out = self._compute(draws, want_norm, r1)
            self._after_compute(out)
            self.ema.update(self.g, self.step + 1)
        self.step += 1
        self._acc_steps += 1
        if not self.cuda:
            self._check_guard()  # free on CPU: a divergence is caught within its step

    # -- CUDA graph --------------------------------------------------------------------------------
    # Small batches are launch-bound: hundreds of kernels per step, each a few microseconds of
    # CPU time. The whole plain GAN step (every D step, the G step, both fused Adam updates, the
    # EMA, the guard and the log accumulators) is captured once and replayed; per step the host
    # only draws indices and latents into static buffers. Lazy R1 (double backward on real
    # images, every r1_every-th D iteration) is a second captured graph sharing the first's memory
    # pool: eager, an R1 step cost ten plain steps, a third of an epoch at batch 128 (see
    # benchmarks/results/raw/profile_initial_h200.json). Paths that need per-step host decisions
    # (instance noise, DiffAugment, gradient penalty, clipping, SyncBN, VAE) stay eager. Under DDP
    # the gradient all-reduce (NCCL) is captured with the step.

    _WARMUP_STEPS = 3

    def _graph_wanted(self) -> bool:
        c = self.cfg
        # Under DDP, interleaving captured steps (NCCL all-reduce in the graph) with eager lazy-R1
        # steps hung on 2 H200s (benchmarks/results/ddp_scaling_h200.json): such runs stay eager.
        ddp_with_r1 = self.info.enabled and c["r1_gamma"] > 0
        return (self.cuda and self.data_on_device and bool(c["cuda_graph"]) and not self.is_vae
                and not c["sync_bn"] and not ddp_with_r1 and not c["diffaug"] and c["instance_noise"] == 0
                and c["gp_weight"] == 0 and c["grad_clip"] == 0)

    @property
    def graphs_captured(self) -> int:
        """How many step variants (plain, lazy R1) are replayed from CUDA graphs."""
        return len(self._graphs)

    def _graph_body(self, r1: tuple[bool, ...]) -> None:
        out = self._compute(self._static, want_norm=False, r1=r1)
        self._after_compute(out)
        self.ema.update_with(self.g, self._dstep)  # _dstep is step + 1 here, as in the eager path

    def _graph_step(self, draws: dict[str, Any], r1: tuple[bool, ...]) -> None:
        graph = self._graphs.get(r1)
        if graph is not None:
            self._load_static(draws)
            graph.replay()
            return
        if self._static is None:
            self._static = {k: ([t.clone() for t in v] if isinstance(v, list) else (None if v is None else v.clone()))
                            for k, v in draws.items()}
        self._load_static(draws)
        # Warm-up steps are real steps, run eagerly on a side stream as CUDA graphs require.
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._graph_body(r1)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._warm[r1] = self._warm.get(r1, 0) + 1
        if self._warm[r1] == self._WARMUP_STEPS:
            graph = torch.cuda.CUDAGraph()
            pool = next(iter(self._graphs.values())).pool() if self._graphs else None
            try:
                with torch.cuda.graph(graph, pool=pool):  # records only: nothing runs until replay
                    self._graph_body(r1)
            except RuntimeError as exc:
                # Capture is an optimisation: if this setup cannot be captured, train eagerly.
                log.warning("CUDA graph capture failed (%s); continuing eagerly", str(exc).splitlines()[0][:200])
                self._use_graph = False
                self._graphs.clear()
                return
            self._graphs[r1] = graph

    def _load_static(self, draws: dict[str, Any]) -> None:
        for k, v in draws.items():
            if isinstance(v, list):
                for dst, src in zip(self._static[k], v, strict=True):
                    dst.copy_(src)
            elif v is not None:
                self._static[k].copy_(v)

    # -- NaN/Inf guard, logging -------------------------------------------------------------------

    _GUARDED = ("loss_d", "loss_g", "loss", "gp", "r1")

    def _guard(self, out: dict[str, torch.Tensor]) -> None:
        """Record the first step whose losses are not finite, on the device (no sync).

        On CPU it is checked right after the step (free); on CUDA at the next log, checkpoint or
        interrupt, always before any weights are saved. Values are never zeroed or skipped.
        """
        key = tuple(k in out for k in self._GUARDED)
        if key not in self._present:
            self._present[key] = torch.tensor(key, device=self.device)
        vals = torch.stack([out[k].float() if k in out else self._zero for k in self._GUARDED])
        take = ~torch.isfinite(vals).all() & (self._bad_step < 0)
        self._bad_step.copy_(torch.where(take, self._dstep, self._bad_step))
        self._bad_vals.copy_(torch.where(take, vals, self._bad_vals))
        self._bad_present.copy_(torch.where(take, self._present[key], self._bad_present))

    def _check_guard(self) -> None:
        first = int(self._bad_step.item())
        if first >= 0:
            vals = ", ".join(f"{n} = {v:.4g}" for n, v, here in zip(self._GUARDED, self._bad_vals.tolist(),
                                                                      self._bad_present.tolist(), strict=True) if here)
            raise TrainingDiverged(
                f"training diverged at step {first}: {vals}. The last good checkpoint ({self.ckpt_path}) is intact. "
                "Lower the learning rates, add a gradient penalty or spectral norm, or enable grad_clip.")

    def _accumulate(self, out: dict[str, torch.Tensor]) -> None:
        for k, v in out.items():
            if k not in self._acc:
                self._acc[k] = torch.zeros((), device=self.device)
            self._acc[k].add_(v.detach().float())

    def _flush_log(self, t_interval: float) -> dict[str, float]:
        n = max(1, self._acc_steps)
        values = {k: float(v.item()) / n for k, v in self._acc.items()}
        imgs = self._acc_steps * self.cfg["batch_size"] * self.info.world_size * (1 if self.is_vae else self.cfg["n_critic"])
        values.update(step=self.step, images_per_s=imgs / max(t_interval, 1e-9), lr_g=self.opt_g.param_groups[0]["lr"],
                      instance_noise=self._noise_sigma())
        if self.opt_d is not None:
            values["lr_d"] = self.opt_d.param_groups[0]["lr"]
        for v in self._acc.values():
            v.zero_()  # in place: a captured graph keeps adding into these tensors
        self._acc_steps = 0
        return values

    def _write_log(self, record: dict[str, Any]) -> None:
        with open(self.workdir / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def _truncate_log(self, step: int) -> None:
        """After a resume, drop log lines a killed run wrote past its last checkpoint."""
        path = self.workdir / "log.jsonl"
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))

    # -- periodic work ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample_fixed(self, n: int = 64) -> torch.Tensor:
        g = self.ema.shadow.eval()
        with self._autocast():
            return g(self.z_fixed[:n], None if self.y_fixed is None else self.y_fixed[:n]).float()

    def save_grid(self) -> None:
        save_grid(self.sample_fixed(), self.workdir / "grids" / f"step_{self.step:06d}.png", nrow=8)

    def save_generator(self, path: Path) -> None:
        info = {"model": self.cfg["model"], "nz": self.cfg["nz"], "num_classes": self.cfg["num_classes"],
                "image_shape": self.cfg["image_shape"], "step": self.step, "ema": self.cfg["ema_decay"] > 0,
                "config": json.dumps(self.cfg, sort_keys=True)}
        save_generator(path, self.ema.shadow, arch=self.g_arch, kwargs=self.g_kwargs, info=info)

    def evaluate(self) -> float | None:
        if self.eval_fn is None:
            return None
        score = float(self.eval_fn(self.ema.shadow.eval()))
        self.history.append({"step": self.step, "score": score})
        if not math.isfinite(score):
            return score
        if self.best is None or score < self.best[0]:
            self.best = (score, self.step)
            self.bad_streak = 0
            self.save_generator(self.workdir / "best.pt")
        elif score > self.best[0] * (1 + self.cfg["collapse_margin"]):
            self.bad_streak += 1
            if self.bad_streak >= self.cfg["collapse_patience"] and not self.collapsed:
                self.collapsed = True
                log.warning("collapse: score %.3f at step %d is worse than the best %.3f (step %d) by more than "
                            "%.0f%% for %d evaluations", score, self.step, self.best[0], self.best[1],
                            100 * self.cfg["collapse_margin"], self.bad_streak)
        else:
            self.bad_streak = 0
        return score

    def checkpoint(self) -> None:
        self._check_guard()  # never save weights a diverged step produced
        save_checkpoint(self.ckpt_path, self.state())

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        main = self.info.is_main
        self.workdir.mkdir(parents=True, exist_ok=True)
        stopped_early = False
        bar = tqdm(total=cfg["steps"], initial=self.step, desc="train", unit="step",
                   disable=not (self.progress and main), mininterval=1.0)
        if self.step == 0 and main:
            self.save_grid()
        t_last = time.perf_counter()
        try:
            while self.step < cfg["steps"]:
                want_norm = (self.step + 1) % cfg["log_every"] == 0
                self.train_step(want_norm)
                bar.update(1)
                s = self.step
                if s % cfg["log_every"] == 0 or s == cfg["steps"]:
                    if self.cuda:
                        torch.cuda.synchronize()
                    self._check_guard()
                    now = time.perf_counter()
                    values = self._flush_log(now - t_last)
                    t_last = now
                    if main:
                        self._write_log(values)
                        if self.log_fn:
                            self.log_fn({k: v for k, v in values.items() if k != "step"}, s)
                        bar.set_postfix({k: f"{values[k]:.3g}" for k in ("loss_d", "loss_g", "loss") if k in values})
                if main and (s % cfg["grid_every"] == 0 or s == cfg["steps"]):
                    self.save_grid()
                if main and (s % cfg["eval_every"] == 0 or s == cfg["steps"]):
                    score = self.evaluate()
                    if score is not None:
                        self._write_log({"step": s, "score": score})
                        if self.log_fn:
                            self.log_fn({"score": score}, s)
                        t_last = time.perf_counter()  # evaluation time is not training throughput
                if s % cfg["checkpoint_every"] == 0 or s == cfg["steps"]:
                    self.checkpoint()
                if self.collapsed and cfg["stop_on_collapse"]:
                    log.warning("stopping at step %d: collapse detected (train.stop_on_collapse)", s)
                    stopped_early = True
                    self.checkpoint()
                    break
        except KeyboardInterrupt:
            # SIGTERM / Ctrl-C: keep the work, unless the weights are already bad.
            if self.step > 0:
                self._check_guard()
                self.checkpoint()
                log.warning("interrupted at step %d; checkpoint saved to %s (re-run to resume)", self.step, self.ckpt_path)
            raise
        finally:
            bar.close()
        if main and self.best is None:
            self.save_generator(self.workdir / "best.pt")  # no evaluator: the final EMA is the best we know
        return TrainResult(step=self.step, best_score=self.best[0] if self.best else None,
                           best_step=self.best[1] if self.best else None, collapsed=self.collapsed,
                           stopped_early=stopped_early, history=list(self.history), transfer=self.transfer)
