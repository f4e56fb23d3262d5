"""Data-parallel training across processes (torchrun), without the DDP wrapper.

GAN steps update G and D alternately and backpropagate through the other network, which the
DistributedDataParallel wrapper handles badly (unused parameters, gradients of the frozen net).
As StyleGAN2-ADA does, each phase all-reduces the gradients of the network it updates, flattened
into one buffer: one collective per phase, and nothing else to synchronise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: str) -> None:
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights and buffers."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def allreduce_grads(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of ``params`` over ranks in one flattened collective."""
    allreduce_tensors([p.grad for p in params if p.grad is not None], info)


def allreduce_tensors(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Average ``tensors`` in place over ranks: one all-reduce of their concatenation."""
    if not info.enabled or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= info.world_size
    torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors,
                                                                   strict=True)])


def allreduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
