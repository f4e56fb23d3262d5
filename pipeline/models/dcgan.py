"""DCGAN (Radford et al. 2016), with depth following the image size, and its conditional variant.

At 64x64 with nz=100, ngf=ndf=64 this is exactly the classic architecture (pytorch/examples):
G: nz -> 512x4x4 -> 256x8x8 -> 128x16x16 -> 64x32x32 -> Cx64x64; D mirrors it. At 28x28 the
generator starts at 7x7; at 32 and 128 it starts at 4x4 with one layer fewer or more.
The discriminator returns logits (no Sigmoid): losses apply their own stable log-sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConditionalBatchNorm2d, MinibatchStd, maybe_sn, n_up, norm2d, start_size


class DCGANGenerator(nn.Module):
    def __init__(self, *, nz: int, ngf: int, channels: int, size: int, num_classes: int = 0) -> None:
        """nz: latent size; ngf: width of the last hidden layer; channels/size: output image;
        num_classes: > 0 for a class-conditional generator (conditional BN), 0 for unconditional."""
        super().__init__()
        self.nz, self.channels, self.size, self.num_classes = nz, channels, size, num_classes
        s0, n = start_size(size), n_up(size)
        widths = [ngf * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 64x64: [512, 256, 128, 64]
        # Conditional: the one-hot label joins the latent at the input, as well as steering every
        # BatchNorm (conditional BN alone left the labels unused: samples matched their class at chance).
        self.convs = nn.ModuleList([nn.ConvTranspose2d(nz + num_classes, widths[0], s0, 1, 0, bias=False)])
        for i in range(1, n):
            self.convs.append(nn.ConvTranspose2d(widths[i - 1], widths[i], 4, 2, 1, bias=False))
        if num_classes:
            self.norms = nn.ModuleList([ConditionalBatchNorm2d(w, num_classes) for w in widths])
        else:
            self.norms = nn.ModuleList([nn.BatchNorm2d(w) for w in widths])
        self.out = nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False)

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-tanh output a, with image = tanh(a) and (image + 1) / 2 = sigmoid(2a) (used by the VAE's BCE)."""
        if self.num_classes:
            z = torch.cat([z, nn.functional.one_hot(y, self.num_classes).to(z.dtype)], dim=1)
        h = z.reshape(z.shape[0], -1, 1, 1)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = _project(z, conv.weight) if i == 0 and _is_channels_last(conv.weight) else conv(h)
            h = norm(h, y) if self.num_classes else norm(h)
            h = torch.relu(h)
        return self.out(h)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: [N, nz] -> images [N, C, size, size] in [-1, 1]."""
        return torch.tanh(self.logits(z, y))


class DCGANDiscriminator(nn.Module):
    def __init__(self, *, ndf: int, channels: int, size: int, num_classes: int = 0, norm: str = "batch",
                 spectral_norm: bool = False, mbstd: bool = False) -> None:
        """ndf: width of the first layer; norm: batch, layer or none (use layer/none with a gradient
        penalty); spectral_norm: wrap every layer; mbstd: minibatch-stddev channel before the head;
        num_classes > 0: projection discriminator (Miyato & Koyama 2018)."""
        super().__init__()
        self.num_classes = num_classes
        s0, n = start_size(size), n_up(size)
        widths = [ndf * 2**i for i in range(n)]  # e.g. 64x64: [64, 128, 256, 512]
        # No biases where DCGAN has none (first layer, normalised layers, head): at 64x64 with
        # ndf=64 this is the classic discriminator minus its Sigmoid.
        layers: list[nn.Module] = [maybe_sn(nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False), spectral_norm),
                                   nn.LeakyReLU(0.2)]
        for i in range(1, n):
            layers += [maybe_sn(nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=norm == "none"), spectral_norm),
                       norm2d(norm, widths[i]), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers)
        self.mbstd = MinibatchStd() if mbstd else None
        self.head = maybe_sn(nn.Conv2d(widths[-1] + int(mbstd), 1, s0, 1, 0, bias=False), spectral_norm)
        if num_classes:
            self.embed = maybe_sn(nn.Embedding(num_classes, widths[-1]), spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, C, H, W] in [-1, 1] -> logits [N]."""
        h = self.trunk(x)  # [N, ndf*2^(n-1), s0, s0]
        feats = h
        if self.mbstd is not None:
            h = self.mbstd(h)
        if _is_channels_last(self.head.weight):
            out = (h * self.head.weight).sum(dim=(1, 2, 3))  # the head's window is the whole map
        else:
            out = self.head(h).reshape(-1)
        if self.num_classes:
            assert y is not None, "a conditional discriminator needs labels"
            out = out + (self.embed(y) * feats.sum(dim=(2, 3))).sum(dim=1)
        return out


# In channels_last (the CUDA fast path) the two layers that meet a 1x1 map are written as what they
# are, a matrix product and a weighted sum, instead of convolutions: a [N, C, 1, 1] tensor has no
# definite memory format, so cuDNN converted layouts around them and torch.compile's shape
# propagation disagreed with cuDNN about their gradients' strides. Same parameters, same result.


def _is_channels_last(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _project(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d(nz, C, s0, stride 1, padding 0) of a 1x1 input: z [N, nz] @ weight [nz, C, s0, s0],
    returned as [N, C, s0, s0] in channels_last strides."""
    nz, c, s0, _ = weight.shape
    return (z.reshape(-1, nz) @ weight.permute(0, 2, 3, 1).reshape(nz, s0 * s0 * c)).reshape(-1, s0, s0, c).permute(0, 3, 1, 2)
