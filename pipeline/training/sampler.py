"""Where the training images live and what each step draws from them.

The whole set (this rank's shard under DDP) stays on the GPU as uint8 when it takes at most half
of the free device memory, else in pinned host memory with one copy per batch. Every random draw
of the loop (permutations, latents, labels, augmentation parameters, noise) comes from one device
generator, seeded from the run's seed and the rank, and saved in checkpoints with the position
in the current permutation: a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import UserError
from ..imaging import normalize
from ..models.layers import channels_last_strided
from .distributed import DistInfo

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, nz: int, num_classes: int,
                 seed: int, device: torch.device, info: DistInfo, channels_last: bool = False) -> None:
        """images: uint8 [N, C, H, W] (CPU or device); labels: int64 [N] (-1 when unlabeled)."""
        self.batch_size, self.nz, self.num_classes = batch_size, nz, num_classes
        self.device, self.channels_last = device, channels_last
        shard = slice(info.rank, None, info.world_size)
        own = images[shard]
        self.on_device = self._fits_on_device(own)
        if self.on_device:
            self.images = own.to(device)
        else:  # too large for the GPU: pinned host memory, one host-to-device copy per batch
            self.images = own.cpu().pin_memory() if device.type == "cuda" else own.cpu()
        self.labels = labels[shard].to(device)
        log.info("training data: %d images %s uint8 (%.0f MiB) %s", len(self.images), tuple(self.images.shape[1:]),
                 self.images.numel() / 2**20, f"on {device}" if self.on_device else "in pinned host memory")
        if len(self.images) < batch_size:
            raise UserError(f"train.batch_size={batch_size} is larger than the {len(self.images)} training images "
                            "(per process); lower it")
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed * 7919 + 1 + info.rank)
        self.perm = torch.empty(0, dtype=torch.long, device=device)
        self.pos = 0

    def _fits_on_device(self, images: torch.Tensor) -> bool:
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return images.numel() * images.element_size() <= free // 2

    # -- draws (outside the captured step) --------------------------------------------------------

    def indices(self) -> torch.Tensor:
        """The next batch of indices [B] of a seeded permutation (a new one each epoch)."""
        b = self.batch_size
        if self.pos + b > len(self.perm):
            self.perm = torch.randperm(len(self.images), device=self.device, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + b]
        self.pos += b
        return idx

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z [n, nz] ~ N(0, I) and, for conditional runs, uniform class labels [n]."""
        z = torch.randn(n, self.nz, device=self.device, generator=self.gen)
        y = None
        if self.num_classes:
            y = torch.randint(0, self.num_classes, (n,), device=self.device, generator=self.gen)
        return z, y

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, generator=self.gen)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=self.device, generator=self.gen)

    # -- inside the step ---------------------------------------------------------------------------

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images of ``idx`` as float [B, C, H, W] in [-1, 1] on the device (and labels [B])."""
        if self.on_device:
            x = self.images.index_select(0, idx)
        else:
            x = self.images.index_select(0, idx.cpu()).to(self.device, non_blocking=True)
        x = normalize(x)
        if self.channels_last:
            x = channels_last_strided(x)
        y = self.labels.index_select(0, idx) if self.num_classes else None
        return x, y

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.cpu(), "pos": self.pos, "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm = state["perm"].to(self.device)
        self.pos = int(state["pos"])
        self.gen.set_state(state["generator"])
