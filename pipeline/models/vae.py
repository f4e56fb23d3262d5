"""Convolutional VAE (Kingma & Welling 2014) with a β weight on the KL term (Higgins et al. 2017).

The encoder is a DCGAN-style trunk ending in the mean and log-variance of q(z|x); the decoder is
a :class:`DCGANGenerator`, so a trained VAE samples, evaluates and reports exactly like a GAN
(z ~ N(0, I) through the decoder).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .dcgan import DCGANGenerator
from .layers import n_up, start_size


class VAE(nn.Module):
    def __init__(self, *, nz: int, ngf: int, ndf: int, channels: int, size: int, num_classes: int = 0) -> None:
        super().__init__()
        self.nz = nz
        s0, n = start_size(size), n_up(size)
        widths = [ndf * 2**i for i in range(n)]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, n):
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=False), nn.BatchNorm2d(widths[i]),
                       nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.to_stats = nn.Linear(widths[-1] * s0 * s0, 2 * nz)
        self.decoder = DCGANGenerator(nz=nz, ngf=ngf, channels=channels, size=size, num_classes=num_classes)

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


def vae_terms(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
              recon: str = "bce") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction negative log-likelihood and KL(q(z|x) || N(0, I)), each [N], in nats.

    recon="bce": Bernoulli likelihood of (x + 1) / 2 with probabilities sigmoid(2 * logits);
    recon="mse": unit-variance Gaussian on [-1, 1] pixels, up to its constant.
    """
    if recon == "bce":
        target = (x + 1) / 2
        nll = F.binary_cross_entropy_with_logits(2 * logits, target, reduction="none").flatten(1).sum(1)
    else:
        nll = 0.5 * (torch.tanh(logits) - x).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return nll, kl
