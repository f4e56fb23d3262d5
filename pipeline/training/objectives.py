"""Training objectives: one per model family, each a step on a batch that returns device tensors.

An objective builds its networks and optimizers, draws everything random a step consumes
(:meth:`Objective.draw`, outside the step, from the sampler's generator), names the step's
variant (which phases run: lazy R1 or not, gradient norms or not) and computes the step
(:meth:`Objective.step`) without host syncs or random number generation, so any executor (eager,
CUDA graph, compiled) can run it. Gradients are averaged across ranks through ``ctx.sync``, the
one collective of a phase; the executor decides how it runs.

Adding a model family is a subclass registered in :data:`OBJECTIVES` and named by a recipe
(``models.RECIPES[...]["objective"]``); the loop does not change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..losses import get_loss, gradient_penalty, orthogonal_penalty, r1_penalty
from ..models import build_discriminator, build_generator, build_vae
from ..models.layers import channels_last_strided, explicit_power_iteration, init_weights, power_iterate
from ..models.density import fit_gmm
from ..models.vae import kl_per_dim
from . import diffaug
from .ada import AdaptiveAugment
from . import distributed as dist_utils
from .config import TrainConfig
from .distributed import DistInfo
from .sampler import Sampler

log = logging.getLogger(__name__)

Draws = dict[str, Any]  # nested dicts/lists of device tensors


@dataclass
class StepContext:
    """How a step runs on this process (what the objective must respect, not what it computes)."""

    device: torch.device
    info: DistInfo = field(default_factory=DistInfo)
    autocast_dtype: torch.dtype | None = None  # bf16 autocast on CUDA, else None
    channels_last: bool = False
    # Averages the gradients of the given parameters across ranks; an executor may replace it
    # (the CUDA-graph executor runs it between captured segments).
    sync: Callable[[list[nn.Parameter]], None] = lambda params: None


class Objective:
    """Base: networks, Adam optimizers, state, and the pieces every family's phases share."""

    # Whether the generator, in training, sees latents drawn as ``(z ~ N(0, I), y uniform)``, so that
    # its EMA's BatchNorm statistics can be recomputed from such draws (a VAE decoder sees posterior
    # latents instead).
    generator_sees_prior_latents = False

    def __init__(self, cfg: TrainConfig, ctx: StepContext, sampler: Sampler) -> None:
        self.cfg, self.ctx, self.sampler = cfg, ctx, sampler
        self.modules: dict[str, nn.Module] = {}  # saved in checkpoints under these names
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.generator: nn.Module  # what the EMA averages and the generator file holds
        self.generator_spec: tuple[str, dict[str, Any]]  # (architecture, constructor kwargs) of the generator file
        self.frozen: list[nn.Module] = []  # layers kept fixed (transfer with freeze_d_layers)
        self.batches_per_step = 1  # real batches a step consumes (throughput counts them)

    # -- construction helpers ----------------------------------------------------------------

    def _place(self, **modules: nn.Module) -> dict[str, nn.Module]:
        """Initialise, (SyncBN-convert,) move, lay out and broadcast the networks; rank 0's weights win."""
        ctx, out = self.ctx, {}
        for name, m in modules.items():
            init_weights(m, self.cfg.init)
            if ctx.info.enabled and self.cfg.sync_bn:
                m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
            m.to(ctx.device)
            if ctx.channels_last:
                m.to(memory_format=torch.channels_last)
            dist_utils.broadcast_module(m, ctx.info)
            out[name] = m
        return out

    def _adam(self, params: Any, lr: float, *, lazy_every: int = 0) -> torch.optim.Optimizer:
        """Adam at the config's betas. lazy_every > 0: the network is regularised lazily every that
        many steps, so lr and both betas are corrected by c = every / (every + 1) (lr * c, beta ** c;
        Karras et al. 2020, appendix B), keeping the optimizer's time scale that of the unregularised steps."""
        c = lazy_every / (lazy_every + 1) if lazy_every else 1.0
        # Fused on CUDA; capturable so its step counters live on the device (CUDA graphs).
        fused = {"fused": True, "capturable": True} if self.ctx.device.type == "cuda" else {}
        return torch.optim.Adam(params, lr=lr * c, betas=(self.cfg.beta1**c, self.cfg.beta2**c), **fused)

    def autocast(self) -> Any:
        # No weight-cast cache: inside a CUDA graph the cached copies would be stale.
        if self.ctx.device.type != "cuda":
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.ctx.autocast_dtype, enabled=self.ctx.autocast_dtype is not None,
                              cache_enabled=False)

    def _update(self, loss: torch.Tensor, module: nn.Module, opt: torch.optim.Optimizer, want_norm: bool,
                norm_key: str, out: dict[str, torch.Tensor], before_sync: Callable[[], None] | None = None) -> None:
        """Backward, average across ranks, clip, (measure,) step: one optimizer update of ``module``."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_sync is not None:
            before_sync()
        params = [p for p in module.parameters() if p.requires_grad]
        self.ctx.sync(params)
        clipped = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else None
        if want_norm:
            grads = [p.grad for p in params if p.grad is not None]
            out[norm_key] = clipped if clipped is not None else (
                torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads
                else torch.zeros((), device=self.ctx.device))
        opt.step()

    def _ramp(self, step: torch.Tensor, over: int) -> torch.Tensor:
        """min(1, step / over) as a device scalar (1 when over is 0)."""
        return (step.float() / over).clamp(max=1.0) if over else torch.ones((), device=step.device)

    # -- the interface -------------------------------------------------------------------------

    def draw(self) -> Draws:
        raise NotImplementedError

    def variant(self, step: int, want_norm: bool) -> Hashable:
        """Which phases step ``step`` (0-based) runs; each distinct variant is captured once."""
        return (want_norm,)

    def step(self, draws: Draws, variant: Hashable, step: torch.Tensor) -> dict[str, torch.Tensor]:
        """All device work of one step; ``step`` is a 0-dim device tensor (steps done so far)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Host-side work between steps (``step`` = steps done), outside any captured graph: it may
        launch kernels and collectives but must not wait for the device."""

    def compile(self, backend: str = "inductor") -> None:
        """Run the networks' forward and backward through torch.compile (double backward excluded)."""

    def frozen_candidates(self) -> list[nn.Module]:
        """Layers that ``freeze_d_layers`` counts, in order."""
        return []

    def latent_density(self, version: Any = None) -> tuple[Any, dict[str, Any]] | None:
        """(density module, plain data about its fit) that the generator file carries, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"models": {n: m.state_dict() for n, m in self.modules.items()},
                "optim": {n: o.state_dict() for n, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, m in self.modules.items():
            m.load_state_dict(state["models"][n])
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optim"][n])

    def layout(self) -> dict[str, dict[str, list[int]]]:
        """Every tensor's name and shape: a checkpoint resumes only into the same layout."""
        return {n: {k: list(v.shape) for k, v in m.state_dict().items()} for n, m in self.modules.items()}


def _compiled(module: nn.Module, backend: str) -> nn.Module:
    """torch.compile'd view of ``module``, or the module itself where compiling it is known to be
    wrong: a parametrization other than the project's :class:`~pipeline.models.layers.SpectralNorm`
    with explicit power iteration (PyTorch's own spectral norm, or ours iterating in its forward,
    updates its vectors in the forward, and Inductor drops the copy a training forward saves for
    backward, so a second forward before the backward fails; PyTorch 2.11-2.14)."""
    from torch.nn.utils import parametrize  # noqa: PLC0415

    from ..models.layers import SpectralNorm  # noqa: PLC0415

    foreign = [type(p).__name__ for m in module.modules() if parametrize.is_parametrized(m)
               for plist in m.parametrizations.values() for p in plist
               if not isinstance(p, SpectralNorm) or (p.iterate_in_forward and hasattr(p, "_u"))]
    if foreign:
        log.info("train.compile: %s has parametrizations torch.compile mistraces (%s); it runs uncompiled",
                 type(module).__name__, ", ".join(sorted(set(foreign))))
        return module
    return torch.compile(module, dynamic=False, backend=backend)  # type: ignore[return-value]


class GANObjective(Objective):
    """Alternating D and G updates: n_critic D phases (each optionally with a gradient penalty and
    lazy R1), then one G phase (optionally with orthogonal regularisation of G). With one critic
    step the G phase reuses the D phase's fake batch and its graph, as the classic DCGAN loop does
    (one G forward per step)."""

    generator_sees_prior_latents = True

    def __init__(self, cfg: TrainConfig, ctx: StepContext, sampler: Sampler) -> None:
        super().__init__(cfg, ctx, sampler)
        c, h, _ = cfg.image_shape
        common = {"channels": c, "size": h, "num_classes": cfg.num_classes}
        g_kwargs = {"nz": cfg.nz, "ngf": cfg.ngf, **common, **self._family_g_kwargs(cfg)}
        self.modules = self._place(
            g=build_generator(cfg.arch, **g_kwargs),
            d=build_discriminator(cfg.arch, ndf=cfg.ndf, norm=cfg.d_norm, spectral_norm=cfg.spectral_norm,
                                  mbstd=cfg.mbstd, **common))
        self.g, self.d = self.modules["g"], self.modules["d"]
        self.generator, self.generator_spec = self.g, (cfg.arch, g_kwargs)
        self.optimizers = {"g": self._adam(self.g.parameters(), cfg.lr_g), "d": self._adam(self.d.parameters(), cfg.lr_d)}
        self.loss = get_loss(cfg.loss)
        self.reuse_fake = cfg.n_critic == 1
        self.batches_per_step = cfg.n_critic
        self.g_run, self.d_run = self.g, self.d  # torch.compile'd views after compile(); R1/GP use the plain D
        self.ada = None if not cfg.ada else AdaptiveAugment(
            cfg.ada_ops, channels=c, size=(h, cfg.image_shape[2]), target=cfg.ada_target, interval=cfg.ada_interval,
            speed_images=round(cfg.ada_kimg * 1000), images_per_step=cfg.batch_size * cfg.n_critic * ctx.info.world_size,
            p_init=cfg.ada_p_init, device=ctx.device)
        # Orthogonal regularisation: every weight of G's convolutions and linear layers (the raw
        # weight under spectral norm, as the paper's optimizer sees it); embeddings are tables.
        self.ortho_weights = [] if cfg.ortho_reg == 0 else [
            m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            for m in self.g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
        # Spectral norm's power iteration runs outside the networks' forwards, so that they compile
        # (see models.layers.SpectralNorm): G's once per step, D's before every phase, each after
        # its network's last update and never between a forward and its backward.
        self.spectral_g, self.spectral_d = explicit_power_iteration(self.g), explicit_power_iteration(self.d)

    def _family_g_kwargs(self, cfg: TrainConfig) -> dict[str, Any]:
        """Generator arguments only this family's generator takes (recorded in the generator file)."""
        return {}

    def compile(self, backend: str = "inductor") -> None:
        self.g_run, self.d_run = _compiled(self.g, backend), _compiled(self.d, backend)

    def frozen_candidates(self) -> list[nn.Module]:
        return [m for m in self.d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def after_step(self, step: int) -> None:
        if self.ada is not None and step % self.cfg.ada_interval == 0:
            self.ada.adjust(self.ctx.info)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ada is not None:
            state["ada"] = self.ada.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.ada is not None:
            self.ada.load_state_dict(state["ada"])

    # -- draws -----------------------------------------------------------------------------------

    def _generate(self, it: Draws, y: torch.Tensor | None) -> torch.Tensor:
        """G's images for one phase's draws (a family whose generator takes more inputs overrides this)."""
        return self.g_run(it["z"], y)

    def _d_input_draws(self, n: int) -> Draws:
        cfg, s = self.cfg, self.sampler
        c, h, w = cfg.image_shape
        out: Draws = {}
        if cfg.diffaug:
            out["aug"] = diffaug.draw(cfg.diffaug, n, h, w, channels=c, device=s.device, g=s.gen)
        if self.ada is not None:
            out["ada"] = self.ada.draw(n, s.gen)
        if cfg.instance_noise > 0:
            out["noise"] = s.randn(n, c, h, w)
        return out

    def draw(self) -> Draws:
        cfg, s, b = self.cfg, self.sampler, self.cfg.batch_size
        d_its = []
        for _ in range(cfg.n_critic):
            # Fake images in a D phase take the real batch's labels (the drawn labels are unused).
            d_its.append({"idx": s.indices(), "z": s.latents(b)[0]})
        g_it: Draws = {}
        if not self.reuse_fake:
            g_it["z"], y = s.latents(b)
            if y is not None:
                g_it["y"] = y
        for it in d_its:
            it["real"], it["fake"] = self._d_input_draws(b), self._d_input_draws(b)
            if cfg.gp_weight > 0:
                it["alpha"] = s.rand(b)
        g_it["fake"] = self._d_input_draws(b)
        return {"d": d_its, "g": g_it}

    def variant(self, step: int, want_norm: bool) -> Hashable:
        n, every = self.cfg.n_critic, self.cfg.r1_every
        r1 = tuple(self.cfg.r1_gamma > 0 and (step * n + i) % every == 0 for i in range(n))
        return (r1, want_norm)

    # -- the step ----------------------------------------------------------------------------------

    def _d_input(self, x: torch.Tensor, dr: Draws, sigma: torch.Tensor | None) -> torch.Tensor:
        """What D sees: augmented and noised (in fp32) when configured, then in the dtype D computes
        in, so real and fake batches reach D in one dtype (one compiled graph of D)."""
        if "aug" in dr or "ada" in dr or "noise" in dr:
            x = x.float()
        if "aug" in dr:
            x = diffaug.apply(x, self.cfg.diffaug, dr["aug"])
        if "ada" in dr:
            x = self.ada.apply(x, dr["ada"])  # type: ignore[union-attr]
        if "noise" in dr:
            x = x + sigma * dr["noise"]
        x = x.to(self.ctx.autocast_dtype or torch.float32)
        return channels_last_strided(x) if self.ctx.channels_last else x

    def step(self, draws: Draws, variant: Hashable, step: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        r1_pattern, want_norm = variant  # type: ignore[misc]
        self.g.train()
        self.d.train()
        sigma = None
        if cfg.instance_noise > 0:
            sigma = cfg.instance_noise * (1 - step.float() / cfg.instance_noise_decay_steps).clamp(min=0.0)
        out: dict[str, torch.Tensor] = {} if sigma is None else {"instance_noise": sigma}
        kept = None
        power_iterate(self.spectral_g)
        for it, r1_now in zip(draws["d"], r1_pattern, strict=True):
            power_iterate(self.spectral_d)
            kept = self._d_phase(it, r1_now, want_norm, sigma, out)
        power_iterate(self.spectral_d)
        self._g_phase(draws["g"], kept, want_norm, sigma, out)
        return out

    def _d_phase(self, it: Draws, r1_now: bool, want_norm: bool, sigma: torch.Tensor | None,
                 out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        cfg = self.cfg
        x, y = self.sampler.batch(it["idx"])
        if self.reuse_fake:
            with self.autocast():
                fake_g = self._generate(it, y)
            fake = fake_g.detach()
        else:
            with torch.no_grad(), self.autocast():
                fake = self._generate(it, y)
            fake_g = None
        with self.autocast():
            real_logits = self.d_run(self._d_input(x, it["real"], sigma), y).float()
            fake_logits = self.d_run(self._d_input(fake, it["fake"], sigma), y).float()
            loss = self.loss.d(real_logits, fake_logits, cfg.label_smoothing)
        out.update(loss_d=loss.detach(), d_real=real_logits.mean().detach(), d_fake=fake_logits.mean().detach(),
                   p_real=torch.sigmoid(real_logits).mean().detach(), p_fake=torch.sigmoid(fake_logits).mean().detach())
        if self.ada is not None:
            self.ada.observe(real_logits)
            out.update(ada_p=self.ada.p, ada_rt=self.ada.last_rt)
        total = loss
        if cfg.gp_weight > 0:
            # In the step's precision: under bf16 autocast the penalty's forward and double backward
            # run in bf16 too (in fp32 they took most of a 5-critic-step WGAN-GP step on an H100).
            with self.autocast():
                gp = gradient_penalty(self.d, x, fake.to(x.dtype), y, alpha=it["alpha"]).float()
            total = total + cfg.gp_weight * gp
            out["gp"] = gp.detach()
        if r1_now:
            r1 = r1_penalty(self.d, x, y)
            total = total + (cfg.r1_gamma / 2) * r1 * cfg.r1_every  # lazy: scaled by the interval
            out["r1"] = r1.detach()
        self._update(total, self.d, self.optimizers["d"], want_norm, "grad_norm_d", out)
        return None if fake_g is None else (fake_g, y)

    def _g_loss(self, it: Draws, kept: tuple[torch.Tensor, torch.Tensor | None] | None, sigma: torch.Tensor | None,
                out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The G phase's loss (D's parameters are frozen meanwhile); kept: the D phase's fake batch
        and labels, when the G phase reuses them."""
        with self.autocast():
            if kept is None:
                y = it.get("y")
                fake = self._generate(it, y)
            else:
                fake, y = kept
            loss = self.loss.g(self.d_run(self._d_input(fake, it["fake"], sigma), y).float())
        out["loss_g"] = loss.detach()
        if self.ortho_weights:  # in fp32, outside autocast: a Gram matrix in bf16 would round away the penalty
            ortho = orthogonal_penalty(self.ortho_weights)
            loss = loss + self.cfg.ortho_reg * ortho
            out["ortho"] = ortho.detach()
        return loss

    def _g_phase(self, it: Draws, kept: tuple[torch.Tensor, torch.Tensor | None] | None, want_norm: bool,
                 sigma: torch.Tensor | None, out: dict[str, torch.Tensor]) -> None:
        self.d.requires_grad_(False)  # no D parameter gradients in the G phase
        loss = self._g_loss(it, kept, sigma, out)

        def unfreeze_d() -> None:
            self.d.requires_grad_(True)
            for m in self.frozen:
                m.requires_grad_(False)

        self._update(loss, self.g, self.optimizers["g"], want_norm, "grad_norm_g", out, before_sync=unfreeze_d)


class StyleGAN2Objective(GANObjective):
    """StyleGAN2 (Karras et al. 2020) on the GAN phases. The generator's noise maps and, with style
    mixing, a second latent and a crossover layer per sample are drawn outside the step; lazy R1
    is the GAN phases'; every ``pl_every`` steps the G phase adds the lazy path-length penalty on
    a half batch, against ``pl_mean``, a running mean kept on the device and saved in checkpoints.
    A lazily regularised network's Adam is corrected for the interval (:meth:`Objective._adam`)."""

    PL_DECAY = 0.01  # update rate of the path lengths' running mean (the paper's)
    PL_BATCH_SHRINK = 2  # the path-length batch is the batch divided by this (the paper's)

    def __init__(self, cfg: TrainConfig, ctx: StepContext, sampler: Sampler) -> None:
        super().__init__(cfg, ctx, sampler)
        self.optimizers = {
            "g": self._adam(self.g.parameters(), cfg.lr_g, lazy_every=cfg.pl_every if cfg.pl_weight > 0 else 0),
            "d": self._adam(self.d.parameters(), cfg.lr_d, lazy_every=cfg.r1_every if cfg.r1_gamma > 0 else 0)}
        self.pl_mean = torch.zeros((), device=ctx.device)
        self.pl_batch = max(cfg.batch_size // self.PL_BATCH_SHRINK, 1)
        self._pl_now = False  # the path-length flag of the variant step() is running

    def _family_g_kwargs(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"mapping_layers": cfg.mapping_layers}

    def frozen_candidates(self) -> list[nn.Module]:
        from ..models.stylegan2 import EqualConv2d, EqualLinear  # noqa: PLC0415

        return [m for m in self.d.modules() if isinstance(m, (EqualConv2d, EqualLinear))]

    # -- draws -----------------------------------------------------------------------------------

    def _g_draws(self, n: int) -> Draws:
        """Noise maps for n images and, with style mixing, the second latents and crossover layers:
        with probability style_mixing a layer drawn from 1 .. num_ws - 1, else num_ws (no mixing)."""
        cfg, s = self.cfg, self.sampler
        out: Draws = {"g_noise": [s.randn(*shape) for shape in self.g.noise_shapes(n)]}
        if cfg.style_mixing > 0:
            num_ws = self.g.num_ws
            out["z2"] = s.randn(n, cfg.nz)
            mix, layer = s.rand(n), s.rand(n)
            out["crossover"] = torch.where(mix < cfg.style_mixing, 1 + (layer * (num_ws - 1)).long(),
                                           torch.full_like(layer, num_ws, dtype=torch.long))
        return out

    def draw(self) -> Draws:
        cfg, s = self.cfg, self.sampler
        draws = super().draw()
        for it in draws["d"]:
            it.update(self._g_draws(cfg.batch_size))
        if not self.reuse_fake:
            draws["g"].update(self._g_draws(cfg.batch_size))
        if cfg.pl_weight > 0:  # drawn every step: the draws' layout is the same for every variant
            c, h, w = cfg.image_shape
            z, y = s.latents(self.pl_batch)
            pl: Draws = {"z": z, "noise": [s.randn(*shape) for shape in self.g.noise_shapes(self.pl_batch)],
                         "pl_noise": s.randn(self.pl_batch, c, h, w) / math.sqrt(h * w)}
            if y is not None:
                pl["y"] = y
            draws["g"]["pl"] = pl
        return draws

    def variant(self, step: int, want_norm: bool) -> Hashable:
        r1_pattern, want_norm = super().variant(step, want_norm)  # type: ignore[misc]
        return (r1_pattern, self.cfg.pl_weight > 0 and step % self.cfg.pl_every == 0, want_norm)

    # -- the step ----------------------------------------------------------------------------------

    def step(self, draws: Draws, variant: Hashable, step: torch.Tensor) -> dict[str, torch.Tensor]:
        r1_pattern, self._pl_now, want_norm = variant  # type: ignore[misc]
        return super().step(draws, (r1_pattern, want_norm), step)

    def _generate(self, it: Draws, y: torch.Tensor | None) -> torch.Tensor:
        return self.g_run(it["z"], y, z2=it.get("z2"), crossover=it.get("crossover"), noise=it["g_noise"])

    def _g_loss(self, it: Draws, kept: tuple[torch.Tensor, torch.Tensor | None] | None, sigma: torch.Tensor | None,
                out: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super()._g_loss(it, kept, sigma, out)
        if self._pl_now:
            loss = loss + self._path_length_penalty(it["pl"], out) * (self.cfg.pl_weight * self.cfg.pl_every)
        if self.cfg.pl_weight > 0:
            # Recorded every step, so its logged mean is the running mean's (the lazy "pl", like "r1",
            # is averaged over all the steps of a log interval).
            out["pl_mean"] = self.pl_mean.clone()
        return loss

    def _path_length_penalty(self, pl: Draws, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of (|J_w^T u| - a)^2 over the path-length batch: J the Jacobian of the images in w,
        u image-space noise scaled by 1/sqrt(pixels), a the running mean of the lengths (updated
        here, in place). Through the plain G (a double backward)."""
        with self.autocast():
            ws = self.g.ws(pl["z"], pl.get("y"))
            images = self.g.synthesis(ws, pl["noise"])
        (grad,) = torch.autograd.grad((images.float() * pl["pl_noise"]).sum(), ws, create_graph=True)
        lengths = grad.float().square().sum(dim=2).mean(dim=1).sqrt()  # [n]
        pl_mean = self.pl_mean.lerp(lengths.mean(), self.PL_DECAY)
        self.pl_mean.copy_(pl_mean.detach())
        penalty = (lengths - pl_mean).square().mean()
        out["pl"] = penalty.detach()
        return penalty

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pl_mean": self.pl_mean.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pl_mean.copy_(state["pl_mean"])  # in place: a captured CUDA graph keeps reading this tensor


class VAEObjective(Objective):
    """β-VAE: reconstruction NLL + β KL, β warmed up linearly over kl_warmup_steps, with an optional
    KL floor per latent dimension (free bits, Kingma et al. 2016). After training (and for each
    in-loop best checkpoint) :meth:`latent_density` fits the ex-post Gaussian mixture the
    generator file carries."""

    # Learning rate of the likelihood's log-scale, relative to lr_g. 10: on a CPU check (Fashion-MNIST,
    # 6,000 images, 3 epochs) ex-post FID 0.58 against 0.79 at 1, test ELBO 4.52 against 4.57 bits/dim.
    SCALE_LR_MULT = 10.0

    def __init__(self, cfg: TrainConfig, ctx: StepContext, sampler: Sampler) -> None:
        super().__init__(cfg, ctx, sampler)
        c, h, _ = cfg.image_shape
        common = {"channels": c, "size": h, "num_classes": cfg.num_classes}
        self.modules = self._place(vae=build_vae(nz=cfg.nz, ngf=cfg.ngf, ndf=cfg.ndf, likelihood=cfg.vae_likelihood,
                                                 scale=cfg.vae_scale, **common))
        self.vae = self.modules["vae"]
        self.generator, self.generator_spec = self.vae.decoder, ("dcgan", {"nz": cfg.nz, "ngf": cfg.ngf, **common})
        params: Any = self.vae.parameters()
        if self.vae.log_scale is not None and self.SCALE_LR_MULT != 1:
            # Adam moves a parameter by about its learning rate per step: at the networks' rate the
            # likelihood's log-scale would need many thousands of steps to reach a sharp fit.
            rest = [p for n, p in self.vae.named_parameters() if n != "log_scale"]
            params = [{"params": rest}, {"params": [self.vae.log_scale], "lr": cfg.lr_g * self.SCALE_LR_MULT}]
        self.optimizers = {"g": self._adam(params, cfg.lr_g)}
        self.vae_run = self.vae
        self._density: tuple[Any, Any] | None = None  # (weights version it was fitted for, (mixture, fit info))

    def compile(self, backend: str = "inductor") -> None:
        self.vae_run = torch.compile(self.vae, dynamic=False, backend=backend)

    def draw(self) -> Draws:
        return {"idx": self.sampler.indices(), "eps": self.sampler.randn(self.cfg.batch_size, self.cfg.nz)}

    def step(self, draws: Draws, variant: Hashable, step: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        (want_norm,) = variant  # type: ignore[misc]
        self.vae.train()
        x, y = self.sampler.batch(draws["idx"])
        beta = cfg.kl_weight * self._ramp(step, cfg.kl_warmup_steps)
        with self.autocast():
            logits, mu, logvar = self.vae_run(x, y, draws["eps"])
        nll, kl = self.vae.terms(x.float(), logits.float(), mu.float(), logvar.float())
        if cfg.free_bits > 0:
            # Free bits: each dimension's batch-mean KL counts at least free_bits nats, so the
            # optimiser gains nothing by pushing a dimension's posterior onto the prior below it.
            kl_fit = kl_per_dim(mu.float(), logvar.float()).mean(0).clamp(min=cfg.free_bits).sum()
        else:
            kl_fit = kl.mean()
        loss = nll.mean() + beta * kl_fit
        out = {"loss": loss.detach(), "recon": nll.mean().detach(), "kl": kl.mean().detach(),
               "elbo": -(nll + kl).mean().detach(), "kl_weight": beta.detach()}
        self._update(loss, self.vae, self.optimizers["g"], want_norm, "grad_norm", out)
        return out

    @torch.no_grad()
    def encoded_means(self, batch_size: int = 1000) -> torch.Tensor:
        """Posterior means [N, nz] (float32, on the device) of this process's training images, eval mode."""
        was_training = self.vae.training
        self.vae.eval()
        out = []
        try:
            for i in range(0, len(self.sampler.images), batch_size):
                idx = torch.arange(i, min(i + batch_size, len(self.sampler.images)), device=self.sampler.images.device)
                x, _ = self.sampler.batch(idx)
                with self.autocast():
                    mu, _ = self.vae.encode(x)
                out.append(mu.float())
        finally:
            self.vae.train(was_training)
        return torch.cat(out)

    def latent_density(self, version: Any = None) -> tuple[Any, dict[str, Any]]:
        """The ex-post Gaussian mixture of the encoder's means on the training set (Ghosh et al.
        2020) and plain data about its fit; refitted only when ``version`` (the caller's step) changes.
        Seeded by the run's seed and drawn from its own generator: the training draws stay untouched."""
        if self._density is not None and version is not None and self._density[0] == version:
            return self._density[1]
        cfg = self.cfg
        fitted = fit_gmm(self.encoded_means(), components=cfg.gmm_components, covariance=cfg.gmm_covariance,
                         seed=cfg.seed)
        self._density = (version, fitted)
        return fitted


OBJECTIVES: dict[str, type[Objective]] = {"gan": GANObjective, "vae": VAEObjective, "stylegan2": StyleGAN2Objective}


def build_objective(cfg: TrainConfig, ctx: StepContext, sampler: Sampler) -> Objective:
    try:
        cls = OBJECTIVES[cfg.objective]
    except KeyError:
        raise ValueError(f"unknown objective {cfg.objective!r}; available: {', '.join(OBJECTIVES)}") from None
    return cls(cfg, ctx, sampler)
