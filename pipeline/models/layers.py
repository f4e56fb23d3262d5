"""Building blocks shared by the generators and discriminators."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def start_size(size: int) -> int:
    """Side length where a generator starts (and a discriminator's trunk ends).

    28-pixel images (MNIST) start at 7x7; powers of two start at 4x4. Any other size would need
    a crop, so it is refused with a clear message.
    """
    for s0 in (4, 7):
        n = size / s0
        if n >= 1 and n == 2 ** round(math.log2(n)):
            return s0
    raise ValueError(f"image size {size} is not 7 or 4 times a power of two (e.g. 28, 32, 64, 128); "
                     "set preprocess.size to one of those")


def n_up(size: int) -> int:
    return int(round(math.log2(size / start_size(size))))


class SpectralNorm(nn.Module):
    """Spectral normalisation (Miyato et al. 2018) as a parametrization: weight / sigma, sigma the
    largest singular value of the weight (as a [rows, rest] matrix) estimated by power iteration,
    one iteration per training forward, the vectors u and v kept as buffers ``_u`` and ``_v``.

    It computes what ``torch.nn.utils.parametrizations.spectral_norm`` computes, from the same
    random start and with the same state-dict keys (files saved with either load into the other),
    but can also leave the power iteration to its owner: after :func:`explicit_power_iteration`,
    forwards only read u and v, and :func:`power_iterate` advances them, e.g. once per training
    phase. A forward that updates buffers it also saves for backward cannot be compiled: Inductor
    saves the updated buffer instead of a copy, so the next forward before the backward (D on real,
    then on fake images) invalidates it. The training objectives therefore iterate explicitly, so
    eager and compiled steps compute the same thing.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        super().__init__()
        if n_power_iterations <= 0:
            raise ValueError(f"n_power_iterations must be positive, got {n_power_iterations}")
        self.dim, self.eps, self.n_power_iterations = dim % max(weight.ndim, 1), eps, n_power_iterations
        self.iterate_in_forward = True  # False: only power_iterate() advances u and v
        if weight.ndim > 1:
            mat = self._matrix(weight)
            u = F.normalize(mat.new_empty(mat.shape[0]).normal_(0, 1), dim=0, eps=eps)
            v = F.normalize(mat.new_empty(mat.shape[1]).normal_(0, 1), dim=0, eps=eps)
            u, v = self._iterate(mat, u, v, 15)  # a reasonable start for the per-forward iteration
            self.register_buffer("_u", u)
            self.register_buffer("_v", v)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Assigning ``module.weight = t`` stores t as the raw weight (as PyTorch's spectral norm does)."""
        return value

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.ndim) if d != self.dim))
        return weight.flatten(1)

    @torch.no_grad()
    def _iterate(self, mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(n):
            u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps)
            v = F.normalize(torch.mv(mat.H, u), dim=0, eps=self.eps)
        return u, v

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        mat = self._matrix(weight)
        if self.training and self.iterate_in_forward:
            u, v = self.advance(mat)
        else:
            u, v = self._u.clone(), self._v.clone()
        return weight / torch.vdot(u, torch.mv(mat, v))

    @torch.no_grad()
    def advance(self, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """n_power_iterations steps from the stored u and v for the weight matrix ``mat``; stores
        and returns the new vectors (fresh tensors, not the buffers)."""
        u, v = self._iterate(mat.detach(), self._u, self._v, self.n_power_iterations)
        self._u.copy_(u)
        self._v.copy_(v)
        return u, v


def explicit_power_iteration(module: nn.Module) -> list[tuple[SpectralNorm, nn.Parameter]]:
    """Switch every :class:`SpectralNorm` in ``module`` that is its tensor's only parametrization to
    explicit power iteration (forwards only read u and v); returns (parametrization, raw weight)
    pairs for :func:`power_iterate`. One that follows another parametrization sees a transformed
    weight, not the raw one, so it keeps iterating in its forward (and the module stays uncompiled)."""
    pairs = []
    for m in module.modules():
        if nn.utils.parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                p = plist[0]
                if len(plist) == 1 and isinstance(p, SpectralNorm) and hasattr(p, "_u"):
                    p.iterate_in_forward = False
                    pairs.append((p, plist.original))
    return pairs


def power_iterate(pairs: list[tuple[SpectralNorm, nn.Parameter]]) -> None:
    """One round of power iteration for each (parametrization, raw weight) pair."""
    for sn, weight in pairs:
        sn.advance(sn._matrix(weight))


def spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """``module`` with :class:`SpectralNorm` on its ``name`` tensor (rows: dim 1 for transposed
    convolutions, dim 0 otherwise, as PyTorch's spectral_norm)."""
    weight = getattr(module, name)
    dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    nn.utils.parametrize.register_parametrization(module, name, SpectralNorm(weight, dim=dim))
    return module


def maybe_sn(module: nn.Module, spectral_norm_on: bool) -> nn.Module:
    return spectral_norm(module) if spectral_norm_on else module


def norm2d(kind: str, channels: int) -> nn.Module:
    """"batch" (DCGAN), "layer" (GroupNorm with one group: safe under the gradient penalty), "none"."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift come from a class embedding (de Vries et al. 2017)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.embed = nn.Embedding(num_classes, 2 * channels)
        nn.init.ones_(self.embed.weight[:, :channels])
        nn.init.zeros_(self.embed.weight[:, channels:])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.embed(y).chunk(2, dim=1)  # [N, C] each
        return self.bn(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class SharedClassEmbedding(nn.Embedding):
    """A generator's class embedding shared by all its layers (BigGAN), projected by each layer.

    Its entries start N(0, 1), the scale of the latent entries it is concatenated with, and
    :func:`init_weights` leaves them so: at the N(0, 0.02) of the other schemes the class would
    reach each projection at a fiftieth of the latent's scale."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__(num_classes, dim)
        nn.init.normal_(self.weight, 0.0, 1.0)


class MinibatchStd(nn.Module):
    """Appends the mean standard deviation over groups of samples as one extra channel.

    Lets D see batch statistics, which discourages mode collapse (Karras et al. 2018).
    [N, C, H, W] -> [N, C+1, H, W]; N must be divisible by the group size (or smaller than it).
    """

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            g = 1
        y = x.reshape(g, -1, c, h, w).float()
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [N/g]
        y = y.repeat(g).reshape(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)
        return torch.cat([x, y], dim=1)


def init_weights(module: nn.Module, scheme: str) -> None:
    """normal: N(0, 0.02) as in DCGAN (BN scales N(1, 0.02)); xavier; he (Kaiming, fan_in, leaky 0.2);
    orthogonal (BigGAN's: every singular value 1, so a spectrally normalised layer starts as an
    isometry on its row space instead of shrinking most directions).

    Class embeddings (the projection discriminator's) get the scheme too: at PyTorch's default
    N(0, 1) the class projection outweighed the rest of D fifty-fold at the start (logits near 70)
    and conditional runs collapsed. Conditional BN's embeddings keep their identity start (scale 1,
    shift 0), and a :class:`SharedClassEmbedding` its N(0, 1) start."""
    kept = {id(m.embed) for m in module.modules() if isinstance(m, ConditionalBatchNorm2d)}
    kept |= {id(m) for m in module.modules() if isinstance(m, SharedClassEmbedding)}
    for m in module.modules():
        if isinstance(m, nn.Embedding) and id(m) not in kept:
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            if scheme == "normal":
                nn.init.normal_(w, 0.0, 0.02)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(w)
            elif scheme == "orthogonal":
                nn.init.orthogonal_(w)
            else:
                nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu")
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            if scheme == "normal":
                nn.init.normal_(w, 0.0, 0.02)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(w)
            elif scheme == "he":
                nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu")
            elif scheme == "orthogonal":
                nn.init.orthogonal_(w)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine and scheme == "normal":
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def channels_last_strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels_last strides, also when it has one channel.

    ``x.contiguous(memory_format=torch.channels_last)`` returns a 1-channel [N, 1, H, W] batch as
    it is (its NCHW strides already count as channels_last-contiguous), and cuDNN then ran the
    backward of the layer that reads it in NCHW, converting its 64-channel gradient to and from
    NHWC (a tenth of a DCGAN step at batch 512 on an H200:
    benchmarks/results/raw/profile_before_layout_fix_h200.json).
    """
    if x.dim() != 4:
        return x
    target = torch.empty_like(x, memory_format=torch.channels_last)
    return x if target.stride() == x.stride() else target.copy_(x)

