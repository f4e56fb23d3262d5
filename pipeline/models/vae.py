"""Convolutional VAE (Kingma & Welling 2014) with a β weight on the KL term (Higgins et al. 2017).

The encoder is a DCGAN-style trunk ending in the mean and log-variance of q(z|x); the decoder is
a :class:`DCGANGenerator`, so a trained VAE samples, evaluates and reports exactly like a GAN
(z through the decoder; z from N(0, I), or from the ex-post density of :mod:`.density`).

Likelihoods of the 8-bit pixels (the decoder's tanh output is the mean or location in [-1, 1]):

* ``bernoulli``: Bernoulli cross-entropy of (x + 1) / 2 with probabilities sigmoid(2 * logits), as
  the classic VAE; for scoring it is normalised over the 256 pixel levels (``discrete=True``), so
  that it is a probability of the stored image and reads in bits/dim like the others;
* ``gaussian``: a Gaussian discretised to the 256 levels (bins of width 2/255 on [-1, 1], the two
  end bins open), with a learned scale per pixel or one for the image (``scale``);
* ``logistic``: the same with a logistic (Salimans et al. 2017, one component).

The learned scale is a parameter of the VAE (not of the decoder), so generator files keep the
decoder's format.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .dcgan import DCGANGenerator
from .layers import n_up, start_size

LIKELIHOODS = ("bernoulli", "gaussian", "logistic")
LEVELS = 256  # 8-bit pixels
_HALF_BIN = 1.0 / (LEVELS - 1)  # half the width of one level on [-1, 1]
# Scales start small: Adam moves a log-scale by about the learning rate per step, so starting at
# scale 1 (half the pixel range) would spend thousands of steps just shrinking it.
_LOG_SCALE_INIT = -2.0
_LOG_SCALE_MIN = -7.0  # far below one level (log(1/255) = -5.5): the discretised density stays finite anyway


class VAE(nn.Module):
    def __init__(self, *, nz: int, ngf: int, ndf: int, channels: int, size: int, num_classes: int = 0,
                 likelihood: str = "bernoulli", scale: str = "pixel") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown VAE likelihood {likelihood!r}; available: {', '.join(LIKELIHOODS)}")
        self.nz, self.likelihood = nz, likelihood
        s0, n = start_size(size), n_up(size)
        widths = [ndf * 2**i for i in range(n)]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, n):
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=False), nn.BatchNorm2d(widths[i]),
                       nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.to_stats = nn.Linear(widths[-1] * s0 * s0, 2 * nz)
        self.decoder = DCGANGenerator(nz=nz, ngf=ngf, channels=channels, size=size, num_classes=num_classes)
        self.log_scale: nn.Parameter | None = None
        if likelihood != "bernoulli":
            shape = (channels, size, size) if scale == "pixel" else (1, 1, 1)
            self.log_scale = nn.Parameter(torch.full(shape, _LOG_SCALE_INIT))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C, H, W] in [-1, 1] -> (mu, logvar), each [N, nz]."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (decoder pre-tanh output, mu, logvar) for x, with a reparameterised sample
        z = mu + eps * sigma; eps [N, nz] ~ N(0, I) is drawn here when not given (training passes
        its own draws, so the step holds no random number generation)."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + eps.to(mu.dtype) * (0.5 * logvar).exp()
        return self.decoder.logits(z, y), mu, logvar

    def terms(self, x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
              discrete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`vae_terms` with this VAE's likelihood and learned scale."""
        return vae_terms(x, logits, mu, logvar, recon=self.likelihood, log_scale=self.log_scale, discrete=discrete)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image and latent dimension [N, nz], nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def bernoulli_log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """log sum over the 256 levels v = k/255 of p^v (1-p)^(1-v), with p = sigmoid(logits), elementwise.

    Closed form: (1-p) times a geometric series in exp(logits / 255), computed from its larger end so
    that it neither overflows nor loses precision (logits 0: log(128), the uniform case)."""
    a = logits / (LEVELS - 1)
    m = a.abs().clamp_min(1e-10)  # 0 itself would divide 0 by 0; the error of the clamp is ~ 255 * 1e-10 / 2
    log_series = (LEVELS - 1) * a.clamp_min(0) + torch.log(-torch.expm1(-LEVELS * m)) - torch.log(-torch.expm1(-m))
    return -F.softplus(logits) + log_series


def _log_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) - exp(b)) for a >= b."""
    return a + torch.log(-torch.expm1((b - a).clamp(max=-1e-12)))


def discretised_nll(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, kind: str) -> torch.Tensor:
    """-log P(pixel level of x) elementwise, for x on the 256 levels of [-1, 1], under a Gaussian or
    logistic of location ``loc`` and log-scale ``log_scale`` integrated over the level's bin (the end
    bins extend to infinity)."""
    log_s = log_scale.clamp_min(_LOG_SCALE_MIN)
    inv = torch.exp(-log_s)
    c = x - loc
    # Upper tail by symmetry: P(a < X < b) = P(-b < -X < -a), so both CDFs are taken where they are small.
    flip = c > 0
    lo = inv * torch.where(flip, -c - _HALF_BIN, c - _HALF_BIN)
    hi = inv * torch.where(flip, -c + _HALF_BIN, c + _HALF_BIN)
    if kind == "gaussian":
        log_cdf = torch.special.log_ndtr
    else:
        def log_cdf(t: torch.Tensor) -> torch.Tensor:
            return -F.softplus(-t)
    interior = _log_diff_exp(log_cdf(hi), log_cdf(lo))
    # End bins: P(X < -1 + half bin) and P(X > 1 - half bin).
    bottom = log_cdf(inv * (c + _HALF_BIN))
    top = log_cdf(-inv * (c - _HALF_BIN))
    logp = torch.where(x < -1 + _HALF_BIN, bottom, torch.where(x > 1 - _HALF_BIN, top, interior))
    return -logp


def vae_terms(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
              recon: str = "bernoulli", log_scale: torch.Tensor | None = None,
              discrete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction negative log-likelihood and KL(q(z|x) || N(0, I)), each [N], in nats.

    recon: ``bernoulli`` (also its old name ``bce``), ``gaussian``, ``logistic`` (module docstring),
    or ``mse`` (old runs: unit-variance Gaussian on [-1, 1] pixels, up to its constant);
    discrete: score the Bernoulli as a probability over the 256 levels (the others always are).
    """
    if recon in ("bernoulli", "bce"):
        target = (x + 1) / 2
        per_pixel = F.binary_cross_entropy_with_logits(2 * logits, target, reduction="none")
        if discrete:
            per_pixel = per_pixel + bernoulli_log_normaliser(2 * logits)
    elif recon in ("gaussian", "logistic"):
        if log_scale is None:
            raise ValueError(f"the {recon} likelihood needs the VAE's log_scale")
        per_pixel = discretised_nll(x, torch.tanh(logits), log_scale.to(logits.dtype), recon)
    elif recon == "mse":
        per_pixel = 0.5 * (torch.tanh(logits) - x).pow(2)
    else:
        raise ValueError(f"unknown VAE likelihood {recon!r}")
    return per_pixel.flatten(1).sum(1), kl_per_dim(mu, logvar).sum(1)


def bits_per_dim(nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Nats per image -> bits per dimension (pixel and channel)."""
    return nats / (dims * math.log(2))
