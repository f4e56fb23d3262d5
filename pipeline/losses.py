"""GAN losses on logits and the gradient regularisers: pure functions, a registry by name.

Every loss takes raw discriminator outputs (logits / critic values), never probabilities: the
log-sigmoid inside softplus is exact where Sigmoid + BCELoss saturates and underflows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .errors import UserError


@dataclass(frozen=True)
class GANLoss:
    d: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (real, fake, label_smoothing) -> scalar
    g: Callable[[torch.Tensor], torch.Tensor]                       # fake -> scalar


def _ns_d(real: torch.Tensor, fake: torch.Tensor, smoothing: float) -> torch.Tensor:
    # BCE(sigmoid(r), 1 - s) = (1 - s) * softplus(-r) + s * softplus(r); BCE(sigmoid(f), 0) = softplus(f)
    return ((1 - smoothing) * F.softplus(-real) + smoothing * F.softplus(real)).mean() + F.softplus(fake).mean()


def _ns_g(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean()  # -log sigmoid(f): the non-saturating generator loss


def _hinge_d(real: torch.Tensor, fake: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def _hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def _ls_d(real: torch.Tensor, fake: torch.Tensor, smoothing: float) -> torch.Tensor:
    return 0.5 * ((real - (1 - smoothing)) ** 2).mean() + 0.5 * (fake**2).mean()


def _ls_g(fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((fake - 1) ** 2).mean()


def _w_d(real: torch.Tensor, fake: torch.Tensor, smoothing: float) -> torch.Tensor:
    return fake.mean() - real.mean()


def _w_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


LOSSES: dict[str, GANLoss] = {
    "nonsaturating": GANLoss(_ns_d, _ns_g),
    "hinge": GANLoss(_hinge_d, _hinge_g),
    "lsgan": GANLoss(_ls_d, _ls_g),
    "wasserstein": GANLoss(_w_d, _w_g),
}


def get_loss(name: str) -> GANLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise UserError(f"train.loss: unknown loss {name!r}; available: {', '.join(LOSSES)}") from None


def gradient_penalty(d: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     y: torch.Tensor | None, generator: torch.Generator | None = None, *,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(||grad_x D(x_hat)|| - 1)^2] on random interpolates.

    alpha: the interpolation weights [N] in [0, 1] (drawn here from ``generator`` when not given)."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device, generator=generator)
    alpha = alpha.to(real.dtype).view(-1, 1, 1, 1)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = d(x_hat, y)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(d: Callable[..., torch.Tensor], real: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real images (scaled by gamma/2 by the caller)."""
    x = real.detach().requires_grad_(True)
    out = d(x, y)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def orthogonal_penalty(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """BigGAN's orthogonal regularisation (Brock et al. 2019, eq. 3) before its weight beta:
    the sum over ``weights`` of ||W W^T * (1 - I)||_F^2, each weight flattened to W [out, rest].

    Only the off-diagonal entries of the filters' Gram matrix count: filters are pushed towards
    mutually orthogonal directions while their norms stay free (0 for orthogonal filters of any
    lengths). A weight with more rows than columns uses ||W W^T||_F = ||W^T W||_F, the smaller
    product (same value: the off-diagonal sum is then ||W^T W||_F^2 - sum_i ||w_i||^4)."""
    total = torch.zeros((), device=weights[0].device)
    for weight in weights:
        w = weight.float().flatten(1)
        if w.shape[0] <= w.shape[1]:
            gram = w @ w.t()
            total = total + (gram - torch.diag_embed(gram.diagonal())).pow(2).sum()
        else:
            total = total + (w.t() @ w).pow(2).sum() - w.pow(2).sum(1).pow(2).sum()
    return total
