"""Adaptive discriminator augmentation: the ops, the controller of p, and ADA inside the engine."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.data.tensors import load_split
from pipeline.errors import UserError
from pipeline.training.ada import OPS, AdaptiveAugment
from pipeline.training.config import resolve
from pipeline.training.distributed import DistInfo
from pipeline.training.loop import Trainer

SMALL = {"batch_size": 8, "ngf": 8, "ndf": 8, "nz": 8, "log_every": 2, "grid_every": 100, "eval_every": 100,
         "checkpoint_every": 100}


def _ada(ops: tuple[str, ...] = OPS, *, p: float = 0.0, channels: int = 3, size: int = 16, **kw: Any) -> AdaptiveAugment:
    args = {"target": 0.6, "interval": 4, "speed_images": 1000, "images_per_step": 10, **kw}
    return AdaptiveAugment(ops, channels=channels, size=(size, size), p_init=p, device=torch.device("cpu"), **args)


def _images(n: int = 6, c: int = 3, s: int = 16) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_at_p_zero_every_op_leaves_the_images_exactly_as_they_are() -> None:
    ada, x = _ada(p=0.0), _images()
    out = ada.apply(x, ada.draw(len(x), torch.Generator().manual_seed(0)))
    assert torch.equal(out, x)


@pytest.mark.parametrize("op", OPS)
def test_at_p_one_each_op_changes_the_images_and_passes_gradients(op: str) -> None:
    ada, x = _ada((op,), p=1.0), _images(n=16).requires_grad_(True)
    out = ada.apply(x, ada.draw(len(x), torch.Generator().manual_seed(0)))
    assert out.shape == x.shape and torch.isfinite(out).all()
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert changed.sum() >= 8, f"{op} left {16 - int(changed.sum())} of 16 images unchanged at p = 1"
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_blit_ops_are_the_flips_rotations_and_reflected_shifts_they_name() -> None:
    x = _images(n=4)
    flips = _ada(("xflip",), p=1.0)
    d = {"xflip_gate": torch.zeros(4), "xflip": torch.tensor([0, 1, 0, 1])}
    out = flips.apply(x, d)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    rot = _ada(("rotate90",), p=1.0)
    out = rot.apply(x, {"rot_gate": torch.zeros(4), "rot": torch.arange(4)})
    for k in range(4):
        assert torch.equal(out[k], torch.rot90(x[k], k, dims=(1, 2)))
    shift = _ada(("translation",), p=1.0)
    out = shift.apply(x, {"shift_gate": torch.zeros(4), "shift": torch.tensor([[2 / 16, 0.0]] * 4)})
    assert torch.equal(out[:, :, 2:], x[:, :, :-2])  # moved down by two rows
    assert torch.equal(out[:, :, 0], x[:, :, 2]) and torch.equal(out[:, :, 1], x[:, :, 1])  # reflected in
    # Gates above p switch an op off for that sample only.
    half = _ada(("xflip",), p=0.5)
    out = half.apply(x, {"xflip_gate": torch.tensor([0.2, 0.7, 0.2, 0.7]), "xflip": torch.ones(4, dtype=torch.long)})
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_gray_images_get_no_saturation_and_colour_keeps_their_shape() -> None:
    ada, x = _ada(("color",), p=1.0, channels=1), _images(c=1)
    out = ada.apply(x, ada.draw(len(x), torch.Generator().manual_seed(3)))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_p_rises_while_d_is_sure_of_the_reals_falls_otherwise_and_stays_in_zero_one() -> None:
    ada = _ada(p=0.0, target=0.6, interval=4, speed_images=1000, images_per_step=10)
    rate = 10 * 4 / 1000
    info = DistInfo()
    for k in range(1, 4):
        ada.observe(torch.full((10,), 3.0))  # r_t = 1 > 0.6
        ada.adjust(info)
        assert math.isclose(float(ada.p), k * rate, rel_tol=1e-6)
        assert float(ada.last_rt) == 1.0
    ada.observe(torch.tensor([1.0, -1.0, -1.0, -1.0]))  # r_t = -0.5 < 0.6
    ada.adjust(info)
    assert math.isclose(float(ada.p), 2 * rate, rel_tol=1e-6)
    for _ in range(10):
        ada.observe(-torch.ones(10))
        ada.adjust(info)
    assert float(ada.p) == 0.0
    assert torch.equal(ada.stats, torch.zeros(2))  # each adjustment starts a new window


def _adjust_on_rank(rank: int, port: int, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ada = _ada(p=0.5, target=0.6, images_per_step=10, interval=1, speed_images=100)
    # Rank 0 sees r_t = 1, rank 1 sees r_t = 0: together 0.5 < 0.6, so p falls on both.
    ada.observe(torch.ones(10) if rank == 0 else torch.tensor([1.0, -1.0] * 5))
    ada.adjust(DistInfo(rank, 2, rank))
    out[rank] = float(ada.p)
    dist.destroy_process_group()


def test_under_ddp_every_rank_moves_p_by_the_global_statistic() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_adjust_on_rank, args=(port, out), nprocs=2, start_method="spawn")
    # Each rank alone would move p in opposite directions (r_t = 1 and 0); the global r_t = 0.5 lowers both.
    assert out[0] == out[1] == pytest.approx(0.5 - 0.1)


# --------------------------------------------------------------------------------------------
# In the engine
# --------------------------------------------------------------------------------------------


def _trainer(tiny_tensors: Path, workdir: Path, **train: Any) -> Trainer:
    data = load_split(tiny_tensors / "augmented", "train")
    cfg = resolve({**SMALL, **train}, seed=0, image_shape=data.shape, num_classes=data.num_classes)
    return Trainer(cfg, torch.from_numpy(data.images), torch.from_numpy(data.labels), device="cpu", workdir=workdir,
                   progress=False)


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    st = tr.state()
    return {f"{n}.{k}": v for n, sd in st["models"].items() for k, v in sd.items()} | {
        f"ema.{k}": v for k, v in st["ema"].items()} | {f"ada.{k}": v for k, v in st["ada"].items()}


@pytest.mark.parametrize("model", ["dcgan", "wgan_gp", "stylegan2"])
def test_ada_trains_logs_p_and_resumes_bitwise(tiny_tensors: Path, tmp_path: Path, model: str) -> None:
    """A fast controller (p moves 0.08 per adjustment) so p leaves 0 within the run; the resumed run
    restores p and the window's statistics, and ends where the straight run ends, bit for bit."""
    torch.use_deterministic_algorithms(True)
    ada = {"model": model, "ada": True, "ada_kimg": 0.2, "ada_interval": 2,
           "ada_ops": ["xflip", "rotate90", "translation", "geometric", "color", "cutout"]}
    if model == "wgan_gp":
        ada["n_critic"] = 2
    straight = _trainer(tiny_tensors, tmp_path / "a", steps=8, **ada)
    straight.run()
    _trainer(tiny_tensors, tmp_path / "b", steps=3, **ada).run()  # stops between two adjustments
    resumed = _trainer(tiny_tensors, tmp_path / "b", steps=8, **ada)
    assert resumed.try_resume() and resumed.step == 3
    resumed.run()
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    ps = [r["ada_p"] for r in rows if "ada_p" in r]
    assert len(ps) == 4 and all(0.0 <= p <= 1.0 for p in ps)
    assert float(straight.objective.ada.p) > 0 or any(p > 0 for p in ps), "p never moved"  # type: ignore[union-attr]


def test_ada_runs_through_the_compiled_executor_as_through_the_eager_one(tiny_tensors: Path, tmp_path: Path) -> None:
    params = {}
    for compiled in (False, True):
        data = load_split(tiny_tensors / "augmented", "train")
        cfg = resolve({**SMALL, "steps": 4, "compile": compiled, "ada": True, "ada_kimg": 0.2, "ada_interval": 1},
                      seed=0, image_shape=data.shape, num_classes=data.num_classes)
        tr = Trainer(cfg, torch.from_numpy(data.images), torch.from_numpy(data.labels), device="cpu",
                     workdir=tmp_path / str(compiled), progress=False, compile_backend="aot_eager")
        for _ in range(4):
            tr.train_step()
        params[compiled] = {f"{n}.{k}": v.detach().clone() for n, m in tr.objective.modules.items()
                            for k, v in m.state_dict().items()} | {"p": tr.objective.ada.p.clone()}  # type: ignore[union-attr]
    for k in params[False]:
        assert torch.allclose(params[False][k].float(), params[True][k].float(), rtol=1e-4, atol=1e-5), k


def test_ada_is_refused_beside_diffaug_and_for_the_vae(tiny_tensors: Path) -> None:
    data = load_split(tiny_tensors / "augmented", "train")
    with pytest.raises(UserError, match="train.ada and train.diffaug"):
        resolve({"ada": True, "diffaug": ["color"]}, seed=0, image_shape=data.shape, num_classes=0)
    with pytest.raises(UserError, match="no discriminator"):
        resolve({"ada": True, "model": "vae"}, seed=0, image_shape=data.shape, num_classes=0)
