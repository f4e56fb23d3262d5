"""The classic DCGAN training loop, written the way pytorch/examples' dcgan/main.py writes it.

This is the baseline users would run instead of the pipeline: a torchvision dataset whose PIL
transforms resize every image every epoch on CPU workers, fp32, a Sigmoid at the end of D with
BCELoss, batch 64, Adam(2e-4, betas=(0.5, 0.999)). It is kept deliberately unoptimised; only the
data source differs (Fashion-MNIST read from IDX files into memory instead of torchvision's
download).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import torch.utils.data
import torchvision.transforms as transforms
from PIL import Image


class FashionMNISTPIL(torch.utils.data.Dataset):
    """Like torchvision's FashionMNIST: a PIL image per item, transformed on every access."""

    def __init__(self, images: np.ndarray, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.transform(Image.fromarray(self.images[i], mode="L")), 0


def weights_init(m: nn.Module) -> None:
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 1) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.main(x.reshape(x.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, nc: int = 1) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)


class ClassicDCGAN:
    """State of one classic run; ``train(seconds=..., epochs=..., on_epoch=...)`` runs its loop."""

    def __init__(self, images: np.ndarray, *, device: str, batch_size: int = 64, workers: int = 2, seed: int = 0,
                 nz: int = 100) -> None:
        torch.manual_seed(seed)
        self.device, self.nz = device, nz
        dataset = FashionMNISTPIL(images, transforms.Compose([
            transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                                  drop_last=True, persistent_workers=workers > 0)
        self.netG = Generator(nz).to(device)
        self.netG.apply(weights_init)
        self.netD = Discriminator().to(device)
        self.netD.apply(weights_init)
        self.criterion = nn.BCELoss()
        self.optD = optim.Adam(self.netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
        self.optG = optim.Adam(self.netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
        self.images_seen = 0

    def step(self, data: torch.Tensor) -> None:
        real_label, fake_label = 1.0, 0.0
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        self.netD.zero_grad()
        real_cpu = data.to(self.device)
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=self.device)
        output = self.netD(real_cpu)
        errD_real = self.criterion(output, label)
        errD_real.backward()
        noise = torch.randn(batch_size, self.nz, 1, 1, device=self.device)
        fake = self.netG(noise)
        label.fill_(fake_label)
        output = self.netD(fake.detach())
        errD_fake = self.criterion(output, label)
        errD_fake.backward()
        self.optD.step()
        # (2) Update G network: maximize log(D(G(z)))
        self.netG.zero_grad()
        label.fill_(real_label)
        output = self.netD(fake)
        errG = self.criterion(output, label)
        errG.backward()
        self.optG.step()
        self.images_seen += batch_size

    def train(self, *, seconds: float | None = None, epochs: int | None = None, max_steps: int | None = None,
              on_epoch: Callable[[int, float], None] | None = None) -> float:
        """Run whole epochs until a budget ends; returns training seconds (callbacks excluded)."""
        spent, steps, epoch = 0.0, 0, 0
        while True:
            t0 = time.perf_counter()
            for data, _ in self.loader:
                self.step(data)
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
                if seconds is not None and spent + (time.perf_counter() - t0) >= seconds:
                    break
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            spent += time.perf_counter() - t0
            epoch += 1
            if on_epoch is not None:
                on_epoch(epoch, spent)
            if (max_steps is not None and steps >= max_steps) or (seconds is not None and spent >= seconds) or \
                    (epochs is not None and epoch >= epochs):
                return spent
