"""ResNet generator and discriminator in the SNGAN style (Miyato et al. 2018).

G: z -> linear to ch x s0 x s0 -> up-blocks (BN-ReLU-up-conv3-BN-ReLU-conv3, 1x1 shortcut) ->
BN-ReLU-conv3-tanh. D: residual down-blocks with spectral normalization on every layer, ReLU,
global sum pooling, a linear head, plus the class projection when conditional.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ConditionalBatchNorm2d, MinibatchStd, maybe_sn, n_up, start_size, upsample


class GBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.bn1 = ConditionalBatchNorm2d(cin, num_classes) if num_classes else nn.BatchNorm2d(cin)
        self.bn2 = ConditionalBatchNorm2d(cout, num_classes) if num_classes else nn.BatchNorm2d(cout)
        self.c1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.sc = nn.Conv2d(cin, cout, 1, 1, 0)

    def _bn(self, bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return bn(x, y) if self.num_classes else bn(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.c1(upsample(F.relu(self._bn(self.bn1, x, y))))
        h = self.c2(F.relu(self._bn(self.bn2, h, y)))
        return h + self.sc(upsample(x))


class ResNetGenerator(nn.Module):
    def __init__(self, *, nz: int, ngf: int, channels: int, size: int, num_classes: int = 0) -> None:
        """ngf: channels of every block (SNGAN uses 256 at 32x32; 64-128 is plenty for 28x28)."""
        super().__init__()
        self.nz, self.channels, self.size, self.num_classes = nz, channels, size, num_classes
        self.s0, self.ngf = start_size(size), ngf
        self.fc = nn.Linear(nz, ngf * self.s0 * self.s0)
        self.blocks = nn.ModuleList([GBlock(ngf, ngf, num_classes) for _ in range(n_up(size))])
        self.bn = nn.BatchNorm2d(ngf)
        self.out = nn.Conv2d(ngf, channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(z).reshape(z.shape[0], self.ngf, self.s0, self.s0)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class DBlock(nn.Module):
    def __init__(self, cin: int, cout: int, *, first: bool, down: bool, sn: bool) -> None:
        super().__init__()
        self.first, self.down = first, down
        self.c1 = maybe_sn(nn.Conv2d(cin, cout, 3, 1, 1), sn)
        self.c2 = maybe_sn(nn.Conv2d(cout, cout, 3, 1, 1), sn)
        self.sc = maybe_sn(nn.Conv2d(cin, cout, 1, 1, 0), sn) if (cin != cout or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)  # the first block sees raw pixels: no pre-activation
        h = self.c2(F.relu(self.c1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.sc is not None:
            s = self.sc(s)
        if self.down:
            s = F.avg_pool2d(s, 2)
        return h + s


class ResNetDiscriminator(nn.Module):
    def __init__(self, *, ndf: int, channels: int, size: int, num_classes: int = 0, spectral_norm: bool = True,
                 mbstd: bool = False, norm: str = "none") -> None:
        """norm is accepted for a uniform signature; SNGAN's D uses no normalisation layers."""
        super().__init__()
        self.num_classes = num_classes
        n = n_up(size)
        blocks = [DBlock(channels, ndf, first=True, down=True, sn=spectral_norm)]
        blocks += [DBlock(ndf, ndf, first=False, down=i < n - 1, sn=spectral_norm) for i in range(1, n + 1)]
        self.blocks = nn.Sequential(*blocks)
        self.mbstd = MinibatchStd() if mbstd else None
        self.fc = maybe_sn(nn.Linear(ndf + int(mbstd), 1), spectral_norm)
        if num_classes:
            self.embed = maybe_sn(nn.Embedding(num_classes, ndf), spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.blocks(x)
        if self.mbstd is not None:
            h = self.mbstd(h)
        h = F.relu(h).sum(dim=(2, 3))  # global sum pooling: [N, ndf(+1)]
        out = self.fc(h).reshape(-1)
        if self.num_classes:
            assert y is not None, "a conditional discriminator needs labels"
            out = out + (self.embed(y) * h[:, : self.embed.weight.shape[1]]).sum(dim=1)
        return out
