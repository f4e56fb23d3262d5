"""The CUDA-graph executor against the eager one, on a GPU (not part of the CPU suite; run on a
CUDA machine with ``python -m pytest benchmarks/gpu_tests -q``).

For every family the same seeded run is trained twice, eagerly and replayed from CUDA graphs,
for enough steps that every variant (plain, lazy R1, with gradient norms) is captured and
replayed; the parameters, the EMA and the logged means must agree. cuDNN is asked for
deterministic algorithms (no atomics in fp32 weight gradients), so the comparison is of the
executors alone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.training.config import resolve  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402

if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu_tests need a CUDA GPU")

SMALL = {"batch_size": 32, "nz": 32, "ngf": 16, "ndf": 16, "ema_decay": 0.99}
FAMILIES = {
    "dcgan_r1": {"model": "dcgan", "r1_gamma": 1.0, "r1_every": 4},
    "sngan": {"model": "sngan"},
    "wgan_gp": {"model": "wgan_gp", "n_critic": 2},
    "conditional_r1": {"model": "dcgan", "conditional": True, "r1_gamma": 1.0, "r1_every": 4},
    "dcgan_diffaug_noise_clip": {"model": "dcgan", "diffaug": ["translation", "cutout", "color"],
                                 "instance_noise": 0.1, "grad_clip": 1.0},
    "vae": {"model": "vae", "kl_warmup_steps": 10},
    # p moves between replays (adjusted outside the graphs): the replayed gates must read the new p.
    "dcgan_ada": {"model": "dcgan", "ada": True, "ada_kimg": 2.0, "ada_interval": 2,
                  "ada_ops": ["xflip", "rotate90", "translation", "geometric", "color", "cutout"]},
    # Lazy R1 and path length every 4 steps (with the pl_mean buffer), noise and style-mixing draws.
    "stylegan2": {"model": "stylegan2", "r1_every": 4, "pl_every": 4},
    "biggan": {"model": "biggan", "conditional": True},  # 32 px: self-attention at 16x16; orthogonal penalty
    # Rates written in place between replays (device tensors): the replayed optimizer steps must read them.
    "dcgan_lr_decay": {"model": "dcgan", "r1_gamma": 1.0, "r1_every": 4, "lr_decay_start": 0.25, "lr_decay_to": 0.0},
}
STEPS = 24  # R1 every 4 steps: 3 warm-ups of each variant by step 12, then replays


def _run(train: dict[str, Any], graph: bool, precision: str, tmp: Path) -> Trainer:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (512, 1, 32, 32), dtype=torch.uint8, generator=g).cuda()
    labels = (torch.arange(512) % 10).cuda()
    cfg = resolve({**SMALL, **train, "steps": STEPS, "cuda_graph": graph, "precision": precision},
                  seed=0, image_shape=(1, 32, 32), num_classes=10)
    tr = Trainer(cfg, images, labels, device="cuda", workdir=tmp, progress=False)
    for i in range(STEPS):
        tr.train_step(want_norm=i % 5 == 4)
    torch.cuda.synchronize()
    tr.check()
    return tr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_replay_trains_as_eager_does(family: str, precision: str, tmp_path: Path) -> None:
    eager = _run(FAMILIES[family], False, precision, tmp_path / "eager")
    graph = _run(FAMILIES[family], True, precision, tmp_path / "graph")
    assert eager.executor.captured == 0 and graph.executor.captured >= 2, graph.executor.captured
    worst, bitwise = 0.0, True
    for name, module in eager.objective.modules.items():
        other = graph.objective.modules[name].state_dict()
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                bitwise &= torch.equal(v, other[k])
                worst = max(worst, (v - other[k]).abs().max().item())
                assert torch.allclose(v, other[k], rtol=1e-3, atol=1e-4), (name, k)
    for a, b in zip(eager.ema.shadow.parameters(), graph.ema.shadow.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    ma, mb = eager.monitor.means(), graph.monitor.means()
    assert ma.keys() == mb.keys()
    for k in ma:
        assert abs(ma[k] - mb[k]) <= 1e-3 * max(1.0, abs(ma[k])), (k, ma[k], mb[k])
    if FAMILIES[family].get("lr_decay_start", 1.0) < 1:  # the replays ran at the rates written in place
        for k, opt in graph.objective.optimizers.items():
            for i, group in enumerate(opt.param_groups):
                assert group["lr"] is graph.lrs.tensors[k][i] and float(group["lr"]) == 0.0, (k, i)
    print(f"\n{family} {precision}: variants captured {graph.executor.captured}, bitwise equal {bitwise}, "
          f"largest parameter difference {worst:.3g}")
