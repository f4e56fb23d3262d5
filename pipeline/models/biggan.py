"""BigGAN generator and discriminator (Brock et al. 2019), at the scale of this project's images.

G: z is split into one chunk for the first linear layer and one per residual up-block
(hierarchical latents). Each block's two BatchNorms are conditional: their gains and biases are
linear projections of [z chunk, shared class embedding] (of the z chunk alone when unconditional),
gain ``1 + P_g c`` and bias ``P_b c``. One class embedding (``shared``) serves every block. A
SAGAN-style self-attention block (learned gamma starting at 0) follows the block that reaches
:func:`attention_resolution`; the output is BN-ReLU-conv3-tanh.

D: residual down-blocks (as SNGAN's), self-attention at the same resolution as G's, one last
block without downsampling, ReLU, global sum pooling, a linear head and, when conditional, the
class projection (embedding dot pooled features; Miyato & Koyama 2018). Logits [N].

Widths follow the paper's 64- and 128-pixel configurations, scaled so the last hidden layer of G
and the first of D have ``ngf`` / ``ndf`` channels: G ``ngf * (2^(n-1), 2^(n-1), ..., 2, 1)`` for
n up-blocks (the paper's 128 px G is ``ch * (16, 16, 8, 4, 2, 1)``), D ``ndf * (1, 2, ..., 2^(n-1),
2^(n-1))``. Every weight layer of G has spectral norm (as in the paper); D's follow
``spectral_norm``. G's shared embedding is a lookup table, not a layer, and is not normalised.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .layers import MinibatchStd, SharedClassEmbedding, maybe_sn, n_up, start_size, upsample
from .resnet import DBlock


def attention_resolution(size: int) -> int | None:
    """Side of the feature maps the self-attention blocks see at image size ``size``: half the
    image side (32 at 64 px, 64 at 128 px as in the paper, 16 at 32 px), or None when that is
    below 16 (28 px images and smaller: no attention)."""
    half = size // 2
    return half if half >= 16 else None


def latent_chunks(nz: int, size: int) -> list[int]:
    """Sizes of z's chunks at image size ``size``: the first feeds the linear layer, one more per
    up-block; as equal as possible (earlier chunks take the remainder)."""
    k = n_up(size) + 1
    if nz < k:
        raise UserError(f"train.nz: {nz} is too small for biggan at {size} px: its latent is split into {k} chunks "
                        f"(one for the first layer, one per up-block); set train.nz to at least {k}")
    return [nz // k + (i < nz % k) for i in range(k)]


def truncate_latents(z: torch.Tensor, psi: float) -> torch.Tensor:
    """The truncation trick as a deterministic map of N(0, 1) latents: each entry goes through the
    normal CDF to u = Phi(z), then to the quantile of a normal truncated to [-t, t] that keeps the
    share ``psi`` of the mass (t = Phi^-1((1 + psi) / 2): psi 0.954 is t = 2, psi 0.5 is t = 0.67):
    z' = Phi^-1(Phi(-t) + u (Phi(t) - Phi(-t))) = Phi^-1(0.5 + psi (u - 0.5)).

    The same z gives the same z' (no random draw, unlike resampling the entries beyond t), and z'
    is distributed as the truncated normal. psi = 1 is no truncation (z itself); psi must be in (0, 1].
    """
    if not 0 < psi <= 1:
        raise ValueError(f"psi: {psi} is outside (0, 1]; pass the share of the latent mass to keep, e.g. 0.7 "
                         "(1 = no truncation)")
    if psi == 1:
        return z
    u = torch.special.ndtr(z.double())
    return torch.special.ndtri(0.5 + psi * (u - 0.5)).to(z.dtype)


class SelfAttention(nn.Module):
    """Non-local block of SAGAN (Zhang et al. 2019): x + gamma * attention(x), gamma learned from 0,
    so the block is the identity at initialisation. Keys and values are max-pooled 2x2 (a quarter
    of the positions) as in BigGAN; queries and keys have C/8 channels, values C/2."""

    def __init__(self, channels: int, *, sn: bool) -> None:
        super().__init__()
        qk, v = max(1, channels // 8), max(1, channels // 2)
        self.query = maybe_sn(nn.Conv2d(channels, qk, 1, bias=False), sn)
        self.key = maybe_sn(nn.Conv2d(channels, qk, 1, bias=False), sn)
        self.value = maybe_sn(nn.Conv2d(channels, v, 1, bias=False), sn)
        self.out = maybe_sn(nn.Conv2d(v, channels, 1, bias=False), sn)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).flatten(2)                       # [N, C/8, HW]
        k = F.max_pool2d(self.key(x), 2).flatten(2)        # [N, C/8, HW/4]
        v = F.max_pool2d(self.value(x), 2).flatten(2)      # [N, C/2, HW/4]
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [N, HW, HW/4]
        o = (v @ attn.transpose(1, 2)).reshape(n, -1, h, w)  # [N, C/2, H, W]
        return x + self.gamma * self.out(o)


class ProjectedBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias are linear projections of a per-sample vector c (BigGAN's
    conditional BN): bn(x) * (1 + P_g c) + P_b c. With c = 0 it is the plain BatchNorm (gain 1,
    bias 0); over symmetric latents the gain averages 1 and the bias 0."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = maybe_sn(nn.Linear(cond_dim, channels, bias=False), True)
        self.bias = maybe_sn(nn.Linear(cond_dim, channels, bias=False), True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gain, bias = 1 + self.gain(c), self.bias(c)
        return self.bn(x) * gain[:, :, None, None] + bias[:, :, None, None]


class GBlock(nn.Module):
    """Residual up-block: CBN-ReLU-up-conv3-CBN-ReLU-conv3, plus up-conv1 on the shortcut."""

    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        self.bn1 = ProjectedBatchNorm2d(cin, cond_dim)
        self.bn2 = ProjectedBatchNorm2d(cout, cond_dim)
        self.c1 = maybe_sn(nn.Conv2d(cin, cout, 3, 1, 1), True)
        self.c2 = maybe_sn(nn.Conv2d(cout, cout, 3, 1, 1), True)
        self.sc = maybe_sn(nn.Conv2d(cin, cout, 1, 1, 0), True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.c1(upsample(F.relu(self.bn1(x, c))))
        h = self.c2(F.relu(self.bn2(h, c)))
        return h + self.sc(upsample(x))


class BigGANGenerator(nn.Module):
    def __init__(self, *, nz: int, ngf: int, channels: int, size: int, num_classes: int = 0) -> None:
        """nz: latent size (split by :func:`latent_chunks`; at least one more than the up-blocks);
        ngf: channels of the last hidden layer; num_classes > 0: class-conditional through a shared
        embedding of nz dimensions (the paper: 120-d z, 128-d embedding)."""
        super().__init__()
        self.nz, self.channels, self.size, self.num_classes = nz, channels, size, num_classes
        n = n_up(size)
        self.s0, self.chunks = start_size(size), latent_chunks(nz, size)
        widths = [ngf * 2 ** (n - max(i, 1)) for i in range(n + 1)]  # 64 px: ngf * [8, 8, 4, 2, 1]
        self.w0 = widths[0]
        self.shared = SharedClassEmbedding(num_classes, nz) if num_classes else None
        embed_dim = nz if num_classes else 0
        self.fc = maybe_sn(nn.Linear(self.chunks[0], widths[0] * self.s0 * self.s0), True)
        self.blocks = nn.ModuleList([GBlock(widths[i], widths[i + 1], self.chunks[i + 1] + embed_dim)
                                     for i in range(n)])
        res = attention_resolution(size)
        # After the block whose output side is `res` (block i outputs s0 * 2^(i+1)).
        self.attn_after = None if res is None else n - 2
        self.attn = None if res is None else SelfAttention(widths[n - 1], sn=True)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.out = maybe_sn(nn.Conv2d(widths[-1], channels, 3, 1, 1), True)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: [N, nz] -> images [N, C, size, size] in [-1, 1]; y: [N] class indices when conditional."""
        zs = torch.split(z, self.chunks, dim=1)
        h = self.fc(zs[0]).reshape(z.shape[0], self.w0, self.s0, self.s0)
        if self.shared is not None and y is None:
            raise ValueError("a conditional BigGAN generator needs labels y [N]; pass g(z, y)")
        e = None if self.shared is None else self.shared(y)
        for i, (block, zc) in enumerate(zip(self.blocks, zs[1:], strict=True)):
            h = block(h, zc if e is None else torch.cat([zc, e], dim=1))
            if i == self.attn_after:
                h = self.attn(h)
        return torch.tanh(self.out(F.relu(self.bn(h))))

    def truncated(self, z: torch.Tensor, y: torch.Tensor | None, psi: float) -> torch.Tensor:
        """Images of the truncation trick: the generator on :func:`truncate_latents` (z, psi);
        psi in (0, 1] is the share of the latent mass kept, 1 = no truncation (the generator itself)."""
        return self(truncate_latents(z, psi), y)


class BigGANDiscriminator(nn.Module):
    def __init__(self, *, ndf: int, channels: int, size: int, num_classes: int = 0, norm: str = "none",
                 spectral_norm: bool = True, mbstd: bool = False) -> None:
        """ndf: channels of the first block; spectral_norm: on every layer (the paper's D);
        mbstd: minibatch-stddev channel before pooling; num_classes > 0: projection discriminator.
        norm must be "none": BigGAN's D has no normalisation layers."""
        super().__init__()
        if norm != "none":
            raise UserError(f"train.d_norm: {norm!r} is not available for biggan, whose discriminator has no "
                            "normalisation layers; set train.d_norm: null (or none)")
        self.num_classes = num_classes
        n = n_up(size)
        widths = [ndf * 2**i for i in range(n)]  # 64 px: ndf * [1, 2, 4, 8]
        blocks = [DBlock(channels, widths[0], first=True, down=True, sn=spectral_norm)]
        res = attention_resolution(size)
        if res is not None:  # the first block outputs size / 2 = res
            blocks.append(SelfAttention(widths[0], sn=spectral_norm))
        blocks += [DBlock(widths[i - 1], widths[i], first=False, down=True, sn=spectral_norm) for i in range(1, n)]
        blocks.append(DBlock(widths[-1], widths[-1], first=False, down=False, sn=spectral_norm))
        self.blocks = nn.Sequential(*blocks)
        self.mbstd = MinibatchStd() if mbstd else None
        self.width = widths[-1]
        self.fc = maybe_sn(nn.Linear(widths[-1] + int(mbstd), 1), spectral_norm)
        if num_classes:
            self.embed = maybe_sn(nn.Embedding(num_classes, widths[-1]), spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, C, H, W] in [-1, 1] -> logits [N]."""
        h = self.blocks(x)  # [N, ndf * 2^(n-1), s0, s0]
        if self.mbstd is not None:
            h = self.mbstd(h)
        h = F.relu(h).sum(dim=(2, 3))
        out = self.fc(h).reshape(-1)
        if self.num_classes:
            if y is None:
                raise ValueError("a conditional BigGAN discriminator needs labels y [N]; pass d(x, y)")
            out = out + (self.embed(y) * h[:, : self.width]).sum(dim=1)
        return out
