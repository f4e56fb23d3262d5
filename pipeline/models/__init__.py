"""Model registry, recipes, and the generator file format.

``train.model`` names a recipe: an architecture plus the loss, normalisation and regularisers it
is known to train well with. Any of those can be overridden in params (None = the recipe's).

Generator files (``models/generator.pt``) hold only tensors and plain data, so they load with
``torch.load(weights_only=True)``: no code from a file is ever run.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, UserError
from ..io import atomic_write
from ..safeload import safe_load
from .biggan import BigGANDiscriminator, BigGANGenerator
from .dcgan import DCGANDiscriminator, DCGANGenerator
from .density import DensityGenerator, GaussianMixture
from .resnet import ResNetDiscriminator, ResNetGenerator
from .stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from .vae import VAE

GENERATOR_FORMAT = "pipeline.generator/1"

# What every recipe takes unless it names its own value (the keys added after the first recipes).
RECIPE_DEFAULTS: dict[str, Any] = {"lr_d": 2e-4, "beta1": 0.5, "beta2": 0.999, "r1_gamma": 0.0, "mbstd": False,
                                   "ema_kimg": 0.0, "ema_rampup": 0.0, "style_mixing": 0.0, "pl_weight": 0.0,
                                   "ortho_reg": 0.0, "mapping_layers": 8}

RECIPES: dict[str, dict[str, Any]] = {
    # Radford et al. 2016: BN in both nets, non-saturating loss, Adam(2e-4, 0.5); plus lazy R1 at
    # gamma 1 on real images (Mescheder et al. 2018), every r1_every D steps. On the embedded default
    # (28 px, 2 CPU cores) R1 took the evaluate stage's FID from 20.33 to 15.58 at 2,800 steps, no
    # more work than 3,000 steps without it; at 64 px on an H100 it ended all five seeds of the
    # Fashion-MNIST recipe near their best.
    "dcgan": {"arch": "dcgan", "loss": "nonsaturating", "d_norm": "batch", "spectral_norm": False, "n_critic": 1,
              "gp_weight": 0.0, "lr_g": 2e-4, "r1_gamma": 1.0},
    # Miyato et al. 2018: ResNet, spectral norm in D, hinge loss.
    "sngan": {"arch": "resnet", "loss": "hinge", "d_norm": "none", "spectral_norm": True, "n_critic": 1,
              "gp_weight": 0.0, "lr_g": 2e-4},
    # Gulrajani et al. 2017: Wasserstein critic without batch norm, gradient penalty 10, 5 critic steps.
    "wgan_gp": {"arch": "dcgan", "loss": "wasserstein", "d_norm": "layer", "spectral_norm": False, "n_critic": 5,
                "gp_weight": 10.0, "lr_g": 2e-4},
    # Kingma & Welling 2014 (β-VAE with KL warm-up); the GAN keys are unused by its objective. Its
    # learning rate is 5x the GANs': on Fashion-MNIST the ex-post FID fell from 7.2 to 0.8 (CPU check,
    # 3 epochs; benchmarks/vae_quality.py).
    "vae": {"arch": "vae", "objective": "vae", "loss": "nonsaturating", "d_norm": "none", "spectral_norm": False,
            "n_critic": 1, "gp_weight": 0.0, "lr_g": 1e-3},
    # Karras et al. 2020 (config F, with the small-resolution settings of StyleGAN2-ADA): equalized
    # learning rate, no normalisation, non-saturating loss, lazy R1 every 16 D steps, lazy path-length
    # regularisation (weight 2, every 4 G steps), style mixing 0.9, Adam(0.0025, betas 0, 0.99) for
    # both networks, EMA half-life 10k images ramped up over the first 5% of the images seen.
    # R1 gamma 0.01: StyleGAN2-ADA's CIFAR-10 setting (its rule 0.0002 * res^2 / batch gives 0.013
    # at 64 px and batch 64).
    "stylegan2": {"arch": "stylegan2", "objective": "stylegan2", "loss": "nonsaturating", "d_norm": "none",
                  "spectral_norm": False, "n_critic": 1, "gp_weight": 0.0, "lr_g": 0.0025, "lr_d": 0.0025,
                  "beta1": 0.0, "beta2": 0.99, "r1_gamma": 0.01, "mbstd": True, "ema_kimg": 10.0, "ema_rampup": 0.05,
                  "style_mixing": 0.9, "pl_weight": 2.0},
    # Brock et al. 2019: hierarchical latents, shared class embedding, self-attention, spectral norm
    # in G and D, hinge loss, 2 D steps per G step, Adam(beta1 0, beta2 0.999), orthogonal
    # regularisation 1e-4 on G. Learning rates are SAGAN's two time-scale pair (G 1e-4, D 4e-4),
    # which the paper's small-scale baseline starts from; at ImageNet scale it halves both.
    "biggan": {"arch": "biggan", "loss": "hinge", "d_norm": "none", "spectral_norm": True, "n_critic": 2,
               "gp_weight": 0.0, "lr_g": 1e-4, "lr_d": 4e-4, "beta1": 0.0, "beta2": 0.999, "ortho_reg": 1e-4},
}

GENERATORS = {"dcgan": DCGANGenerator, "resnet": ResNetGenerator, "stylegan2": StyleGAN2Generator,
              "biggan": BigGANGenerator}
DISCRIMINATORS = {"dcgan": DCGANDiscriminator, "resnet": ResNetDiscriminator, "stylegan2": StyleGAN2Discriminator,
                  "biggan": BigGANDiscriminator}


def latents(n: int, nz: int, seed: int) -> torch.Tensor:
    """The n latents [n, nz] drawn for ``seed``: one CPU generator, so the same seed gives the same
    images on any device (sampling for metrics, grids and the report's nearest pairs all use it)."""
    return torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))


def check_truncation(generator: nn.Module, psi: float, *, option: str = "psi", model: str | None = None) -> None:
    """Refuse a truncation ``psi`` outside (0, 1], or psi != 1 for a generator without truncation
    (one that defines no ``truncated(z, y, psi)``); ``option`` and ``model`` name them in the UserError."""
    name = model or type(generator).__name__
    if not 0 < psi <= 1:
        raise UserError(f"{option} {psi}: truncation psi must be in (0, 1] (1 = no truncation, smaller = closer "
                        "to the average image)")
    if psi != 1 and not callable(getattr(generator, "truncated", None)):
        raise UserError(f"{option} {psi}: the {name} generator has no truncation (only generators that define "
                        f"truncated(z, y, psi) do, e.g. train.model stylegan2); use {option} 1")


def generate(generator: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None, *, psi: float = 1.0) -> torch.Tensor:
    """Images of latents z (labels y): ``generator(z, y)``, or with the truncation trick when psi != 1
    (``generator.truncated(z, y, psi)``; :func:`check_truncation` says which generators have it)."""
    if psi == 1:
        return generator(z, y)
    check_truncation(generator, psi)
    return generator.truncated(z, y, psi)


def recipe(name: str) -> dict[str, Any]:
    """Recipe ``name``: its own values over :data:`RECIPE_DEFAULTS`."""
    try:
        return {**RECIPE_DEFAULTS, **RECIPES[name]}
    except KeyError:
        raise UserError(f"train.model: unknown model {name!r}; available: {', '.join(RECIPES)}") from None


def supported_sizes(model: str, *, smallest: int = 8, largest: int = 1024) -> tuple[int, ...]:
    """Square image sizes (side, pixels) that recipe ``model`` can be built at, within the bounds.

    Every architecture here grows from 4x4 or 7x7 by doubling (:func:`.layers.start_size`); an
    architecture with another rule adds its case here. params validation refuses other sizes.
    """
    from .layers import start_size  # noqa: PLC0415

    recipe(model)  # an unknown name is a UserError
    sizes = []
    for s in range(smallest, largest + 1):
        try:
            start_size(s)
        except ValueError:
            continue
        sizes.append(s)
    return tuple(sizes)


def build_generator(arch: str, **kwargs: Any) -> nn.Module:
    try:
        cls = GENERATORS[arch]
    except KeyError:
        raise UserError(f"unknown generator architecture {arch!r}; available: {', '.join(GENERATORS)}") from None
    return cls(**kwargs)


def build_discriminator(arch: str, **kwargs: Any) -> nn.Module:
    try:
        cls = DISCRIMINATORS[arch]
    except KeyError:
        raise UserError(f"unknown discriminator architecture {arch!r}; available: {', '.join(DISCRIMINATORS)}") from None
    return cls(**kwargs)


def build_vae(**kwargs: Any) -> VAE:
    return VAE(**kwargs)


def load_vae(checkpoint: str | Path, *, device: str | torch.device = "cpu") -> tuple[VAE, dict[str, Any]]:
    """The VAE (encoder and decoder, eval mode) of a training checkpoint, and the run's config.

    The file is checked to be a training checkpoint of a VAE run (format, model entry, recorded
    config) before anything is built; weights that do not fit the recorded layout are refused."""
    import json  # noqa: PLC0415

    payload = safe_load(checkpoint)
    if not isinstance(payload, dict) or payload.get("format") != "pipeline.checkpoint/1":
        raise CheckpointError(f"{checkpoint}: not a training checkpoint of this pipeline; pass models/checkpoint.pt")
    models = payload.get("models")
    if not isinstance(models, dict) or "vae" not in models or not isinstance(payload.get("config"), str):
        raise CheckpointError(f"{checkpoint}: not the checkpoint of a VAE run (models: {sorted(models or {})})")
    cfg = json.loads(payload["config"])
    c, h, _ = cfg["image_shape"]
    # Runs from before the likelihood choice recorded "recon" (bce or mse), without a learned scale;
    # cfg["vae_likelihood"] is what their scores use (vae_terms knows both old names).
    cfg.setdefault("vae_likelihood", {"bce": "bernoulli"}.get(cfg.get("recon", "bce"), cfg.get("recon")))
    built = cfg["vae_likelihood"] if cfg["vae_likelihood"] in ("gaussian", "logistic") else "bernoulli"
    vae = build_vae(nz=cfg["nz"], ngf=cfg["ngf"], ndf=cfg["ndf"], channels=c, size=h, num_classes=cfg["num_classes"],
                    likelihood=built, scale=cfg.get("vae_scale", "pixel"))
    try:
        vae.load_state_dict(models["vae"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit the recorded VAE: {str(exc)[:300]}") from None
    return vae.to(device).eval(), cfg


def save_generator(path: str | Path, generator: nn.Module, *, arch: str, kwargs: dict[str, Any],
                   info: dict[str, Any], latent_density: dict[str, Any] | None = None) -> None:
    """Write a self-describing generator file atomically (tensors + plain data only).

    ``latent_density``: an ex-post density of the latents (:meth:`GaussianMixture.to_payload`);
    ``info["latent_sampler"]`` ("prior" or "gmm") says which latents the file samples by default."""
    state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
    payload = {"format": GENERATOR_FORMAT, "arch": arch, "kwargs": dict(kwargs), "state_dict": state, "info": dict(info)}
    if latent_density is not None:
        payload["latent_density"] = latent_density
    buf = _io.BytesIO()
    torch.save(payload, buf)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


def load_generator(path: str | Path, *, device: str | torch.device = "cpu",
                   sampler: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a generator file; returns (generator in eval mode on ``device``, info).

    sampler: which latents the returned module maps its N(0, I) input to: ``prior`` (the input
    itself), ``gmm`` (the file's ex-post mixture, :class:`~.density.DensityGenerator`), or None
    for the file's own choice (``info["latent_sampler"]``; files without one sample the prior).
    ``info["latent_sampler"]`` is the sampler in effect; ``info["samplers"]`` those the file offers."""
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != GENERATOR_FORMAT:
        raise CheckpointError(f"{path}: not a generator file of this pipeline (format {payload.get('format')!r}); "
                              "pass models/generator.pt or models/best.pt")
    g = build_generator(payload["arch"], **payload["kwargs"])
    try:
        g.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture: {str(exc)[:300]}") from None
    info = dict(payload["info"], arch=payload["arch"], kwargs=payload["kwargs"])
    density = payload.get("latent_density")
    info["samplers"] = ["prior", "gmm"] if density is not None else ["prior"]
    chosen = sampler or info.get("latent_sampler") or "prior"
    if chosen not in info["samplers"]:
        raise UserError(f"{path}: latent sampler {chosen!r} is not available in this file "
                        f"(it offers {', '.join(info['samplers'])})")
    info["latent_sampler"] = chosen
    if chosen == "gmm":
        try:
            gmm = GaussianMixture.from_payload(density)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: its latent density is malformed ({exc})") from None
        if gmm.dim != info.get("nz", gmm.dim):
            raise CheckpointError(f"{path}: its latent density has {gmm.dim} dimensions, the generator {info['nz']}")
        g = DensityGenerator(g, gmm)
        info["latent_density_fit"] = dict(density.get("fit", {}))
    return g.to(device).eval(), info
