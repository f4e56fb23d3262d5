"""The seeded short runs the GPU tests and ``first_run.py`` train: every family at 32x32 on random
images, small widths, R1 and path length every 4 steps so every step variant comes round.

Importable without a GPU (``first_run.py --device cpu`` runs the same steps on the CPU)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import make_trainer  # noqa: E402

from pipeline.training.loop import Trainer  # noqa: E402

SMALL = {"batch_size": 32, "nz": 32, "ngf": 16, "ndf": 16, "ema_decay": 0.99}
FAMILIES = {
    "dcgan_r1": {"model": "dcgan", "r1_gamma": 1.0, "r1_every": 4},
    "sngan": {"model": "sngan"},
    "wgan_gp": {"model": "wgan_gp", "n_critic": 2},
    "conditional_r1": {"model": "dcgan", "conditional": True, "r1_gamma": 1.0, "r1_every": 4},
    # r1_gamma 0 where a family tests something else than R1 (the dcgan recipe's default is 1).
    "dcgan_diffaug_noise_clip": {"model": "dcgan", "r1_gamma": 0.0, "diffaug": ["translation", "cutout", "color"],
                                 "instance_noise": 0.1, "grad_clip": 1.0},
    "vae": {"model": "vae", "kl_warmup_steps": 10},
    # p moves between replays (adjusted outside the graphs): the replayed gates must read the new p.
    "dcgan_ada": {"model": "dcgan", "r1_gamma": 0.0, "ada": True, "ada_kimg": 2.0, "ada_interval": 2,
                  "ada_ops": ["xflip", "rotate90", "translation", "geometric", "color", "cutout"]},
    # Lazy R1 and path length every 4 steps (with the pl_mean buffer), noise and style-mixing draws.
    "stylegan2": {"model": "stylegan2", "r1_every": 4, "pl_every": 4},
    "biggan": {"model": "biggan", "conditional": True},  # 32 px: self-attention at 16x16; orthogonal penalty
    # Rates written in place between replays (device tensors): the replayed optimizer steps must read them.
    "dcgan_lr_decay": {"model": "dcgan", "r1_gamma": 1.0, "r1_every": 4, "lr_decay_start": 0.25, "lr_decay_to": 0.0},
}
STEPS = 24  # R1 every 4 steps: 3 warm-ups of each variant by step 12, then replays


def run(train: dict[str, Any], graph: bool, precision: str, tmp: Path, *, device: str = "cuda", steps: int = STEPS,
        after_step: Callable[[Trainer], None] | None = None) -> Trainer:
    """One seeded run of ``steps`` steps (gradient norms measured every 5th), eager or replayed from
    CUDA graphs; ``after_step`` sees the trainer before the first step and after every step.
    ``steps`` 0 builds the trainer and checks it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (512, 1, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = (torch.arange(512) % 10).to(device)
    cfg = {**SMALL, **train, "steps": max(steps, 1), "cuda_graph": graph, "precision": precision}
    tr = make_trainer(cfg, images, tmp, device=device, labels=labels, seed=0)
    if after_step is not None:
        after_step(tr)
    for i in range(steps):
        tr.train_step(want_norm=i % 5 == 4)
        if after_step is not None:
            after_step(tr)
    if device != "cpu":
        torch.cuda.synchronize()
    tr.check()
    return tr


def weights(tr: Trainer) -> dict[str, torch.Tensor]:
    """A copy of every floating-point tensor of the run's networks, as ``network.name``."""
    return {f"{n}.{k}": v.detach().clone() for n, m in tr.objective.modules.items()
            for k, v in m.state_dict().items() if v.is_floating_point()}
