"""Streamed training data on a GPU (not part of the CPU suite; run on a CUDA machine with
``python -m pytest benchmarks/gpu_tests/test_stream.py -q``).

The prefetch thread copies each batch into a device buffer on a side stream, ordered with events:
every batch a step sees must be exactly the rows the CPU reader gives (no stale or half-copied
buffer), a step replayed from CUDA graphs must compute what the eager step computes, and a
resumed streamed run must end bitwise where an uninterrupted one does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.data.tensors import load_split  # noqa: E402
from pipeline.io import write_json, write_split  # noqa: E402
from pipeline.training.config import resolve  # noqa: E402
from pipeline.training.distributed import DistInfo  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402
from pipeline.training.sampler import Sampler  # noqa: E402

if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu_tests need a CUDA GPU")

SMALL = {"batch_size": 64, "nz": 32, "ngf": 16, "ndf": 16, "ema_decay": 0.99, "data_placement": "stream"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    g = np.random.default_rng(1)
    images = g.integers(0, 256, (1000, 1, 32, 32), dtype=np.uint8)
    entry = write_split(d, "train", images, np.arange(1000) % 10, shard_bytes=100 * 1024)
    write_json(d / "meta.json", {"splits": {"train": entry}, "num_classes": 10})
    return d


def test_every_streamed_batch_on_the_gpu_is_the_rows_the_cpu_reads(shards: Path) -> None:
    def sampler(device: str) -> Sampler:
        data = load_split(shards, "train", mmap=True)
        return Sampler(data.images, torch.from_numpy(data.labels), batch_size=64, nz=8, num_classes=10, seed=5,
                       device=torch.device(device), info=DistInfo(), placement="stream")

    gpu, cpu = sampler("cuda"), sampler("cpu")
    work = torch.randn(2048, 2048, device="cuda")
    for i in range(60):  # 4 epochs; the GPU kept busy so copies and reads overlap
        d = gpu.indices()
        x, y = d["x"].float().sum((1, 2, 3)), d["y"].clone()  # read on the step's stream, as a step does
        for _ in range(i % 3):
            work = work @ work / 2048
        gpu.release()
        c = cpu.indices()
        assert torch.equal(x.cpu(), c["x"].float().sum((1, 2, 3))) and torch.equal(y.cpu(), c["y"]), i
        cpu.release()
    gpu.close()
    cpu.close()


def _run(shards: Path, train: dict[str, Any], graph: bool, steps: int, workdir: Path, resume: bool = False) -> Trainer:
    data = load_split(shards, "train", mmap=True)
    cfg = resolve({**SMALL, **train, "steps": steps, "cuda_graph": graph, "checkpoint_every": 6},
                  seed=0, image_shape=data.shape, num_classes=10)
    tr = Trainer(cfg, data.images, torch.from_numpy(data.labels), device="cuda", workdir=workdir, progress=False)
    if resume:
        assert tr.try_resume()
    tr.run()
    torch.cuda.synchronize()
    return tr


def _flat(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {f"{n}.{k}": v for n, m in tr.objective.modules.items() for k, v in m.state_dict().items()}
    return out | {f"ema.{k}": v for k, v in tr.ema.shadow.state_dict().items()}


@pytest.mark.parametrize("train", [{"model": "dcgan", "r1_gamma": 1.0, "r1_every": 4},
                                   {"model": "wgan_gp", "n_critic": 2},
                                   {"model": "dcgan", "conditional": True}], ids=["dcgan_r1", "wgan_gp", "conditional"])
def test_streamed_graph_replay_equals_eager_and_resumes_bitwise(shards: Path, tmp_path: Path,
                                                                train: dict[str, Any]) -> None:
    eager = _run(shards, train, False, 24, tmp_path / "eager")
    graph = _run(shards, train, True, 24, tmp_path / "graph")
    assert graph.sampler.streamed and graph.executor.enabled and graph.executor.captured >= 1
    a, b = _flat(eager), _flat(graph)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a), worst
    _run(shards, train, True, 12, tmp_path / "resumed")
    resumed = _run(shards, train, True, 24, tmp_path / "resumed", resume=True)
    c = _flat(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b), "a resumed streamed run differs from the straight one"
    print(f"\n{train}: graph vs eager largest difference {worst:.3g}, bitwise {all(torch.equal(a[k], b[k]) for k in a)}")
