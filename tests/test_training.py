"""The training engine: every recipe trains, resume is exact, divergence and signals end cleanly, DDP runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.data.tensors import load_split
from pipeline.errors import TrainingDiverged
from pipeline.params import Params, Train, to_dict, validate
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.config import TrainConfig, resolve
from pipeline.training.loop import Trainer
from pipeline.training.schedule import lr_scale

from helpers_project import ROOT, tiny_params, venv_env, write_params

SMALL = {"batch_size": 8, "ngf": 8, "ndf": 8, "nz": 8, "log_every": 2, "grid_every": 100, "eval_every": 100,
         "checkpoint_every": 100}


def _config(tiny_tensors: Path, **train: Any) -> tuple[TrainConfig, Any]:
    data = load_split(tiny_tensors / "augmented", "train")
    cfg = resolve({**SMALL, **train}, seed=0, image_shape=data.shape, num_classes=data.num_classes)
    return cfg, data


def _trainer(tiny_tensors: Path, workdir: Path, **train: Any) -> Trainer:
    cfg, data = _config(tiny_tensors, **train)
    return Trainer(cfg, torch.from_numpy(data.images), torch.from_numpy(data.labels), device="cpu", workdir=workdir,
                   progress=False)


@pytest.mark.parametrize(
    "train",
    [
        {"model": "dcgan"},
        {"model": "dcgan", "conditional": True, "label_smoothing": 0.1, "instance_noise": 0.1},
        {"model": "sngan"},
        {"model": "sngan", "conditional": True, "mbstd": True},
        {"model": "wgan_gp", "n_critic": 2},
        {"model": "dcgan", "loss": "lsgan", "diffaug": ["translation", "cutout", "color"], "init": "xavier"},
        {"model": "dcgan", "loss": "hinge", "r1_gamma": 1.0, "r1_every": 2, "grad_clip": 1.0, "init": "he",
         "lr_d": 4e-4},
        {"model": "vae", "kl_warmup_steps": 2},
        {"model": "stylegan2", "r1_every": 2, "pl_every": 2},
        {"model": "stylegan2", "conditional": True, "style_mixing": 0.0, "pl_weight": 0.0, "n_critic": 2},
        {"model": "vae", "conditional": True, "vae_likelihood": "gaussian", "free_bits": 0.1},
        {"model": "vae", "vae_likelihood": "logistic", "vae_scale": "global", "vae_sampler": "prior",
         "gmm_covariance": "diag"},
        {"model": "biggan", "conditional": True, "init": "orthogonal"},
    ],
    ids=lambda t: "-".join(f"{k}={v}" for k, v in t.items()),
)
def test_every_recipe_trains_with_finite_losses(tiny_tensors: Path, tmp_path: Path, train: dict[str, Any]) -> None:
    trainer = _trainer(tiny_tensors, tmp_path, steps=4, **train)
    result = trainer.run()
    assert result.step == 4
    lines = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [2, 4]
    for ln in lines:
        keys = ("loss",) if train["model"] == "vae" else ("loss_d", "loss_g", "p_real", "grad_norm_d", "grad_norm_g")
        for k in keys:
            assert math.isfinite(ln[k]), (k, ln)
        assert ln["images_per_s"] > 0
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only
    assert ckpt["step"] == 4 and set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert (tmp_path / "grids" / "step_000004.png").exists()


def test_stylegan2_mapping_depth_is_trained_saved_and_rebuilt(tiny_tensors: Path, tmp_path: Path) -> None:
    """train.mapping_layers sets the depth of StyleGAN2's mapping network (the recipe's 8 when null);
    the generator file records it, so sampling rebuilds the same network and makes the same images."""
    from pipeline.models import load_generator  # noqa: PLC0415

    default = _trainer(tiny_tensors, tmp_path / "default", steps=1, model="stylegan2")
    assert default.cfg.mapping_layers == 8 and len(default.objective.g.mapping.layers) == 8
    tr = _trainer(tiny_tensors, tmp_path / "two", steps=2, model="stylegan2", mapping_layers=2, pl_weight=0.0)
    assert len(tr.objective.g.mapping.layers) == 2
    tr.run()
    tr.save_generator(tmp_path / "g.pt")
    g, info = load_generator(tmp_path / "g.pt")
    assert len(g.mapping.layers) == 2 and json.loads(info["config"])["mapping_layers"] == 2
    z = torch.randn(4, tr.cfg.nz, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(g(z), tr.ema.shadow.eval()(z))


def _state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    st = trainer.state()
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}[{i}]", v)

    walk("", {k: st[k] for k in ("models", "ema", "optim", "sampler", "pl_mean") if k in st})
    return out


RESUME_EXTRA: dict[str, dict[str, Any]] = {"dcgan": {"diffaug": ["translation", "color"], "instance_noise": 0.2},
                                           "vae": {}, "wgan_gp": {}, "biggan": {"conditional": True},
                                           # Lazy R1 and path length (its running mean) on both sides of the resume point.
                                           "stylegan2": {"r1_every": 3, "pl_every": 3}}


@pytest.mark.parametrize("model", list(RESUME_EXTRA))
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_tensors: Path, tmp_path: Path, model: str) -> None:
    torch.use_deterministic_algorithms(True)
    extra = RESUME_EXTRA[model]
    straight = _trainer(tiny_tensors, tmp_path / "a", steps=8, model=model, **extra)
    straight.run()
    first = _trainer(tiny_tensors, tmp_path / "b", steps=4, model=model, **extra)
    first.run()
    resumed = _trainer(tiny_tensors, tmp_path / "b", steps=8, model=model, **extra)
    assert resumed.try_resume() and resumed.step == 4
    resumed.run()
    a, b = _state_tensors(straight), _state_tensors(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"


def test_lr_scale_is_constant_then_falls_linearly_to_the_last_step() -> None:
    scale = [lr_scale(s, steps=10, start=0.6, to=0.1) for s in range(10)]
    assert scale[:6] == [1.0] * 6  # steps 0..5: the first 60%
    assert scale[9] == pytest.approx(0.1)  # the last step runs at lr_decay_to
    assert all(a > b for a, b in zip(scale[5:], scale[6:]))
    assert [round(b - a, 12) for a, b in zip(scale[5:], scale[6:])] == [round(-0.9 / 4, 12)] * 4  # linear
    assert [lr_scale(s, steps=10, start=1.0, to=0.0) for s in range(10)] == [1.0] * 10
    assert lr_scale(0, steps=10, start=0.0, to=0.5) == 0.95 and lr_scale(9, steps=10, start=0.0, to=0.5) == 0.5


class _StopAt:
    """A log callback that interrupts the run (as Ctrl-C or SIGTERM would) once it logs ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, values: dict[str, float], step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("model", ["dcgan", "vae"])  # the VAE: two optimizer groups at different rates
def test_decaying_learning_rates_are_logged_and_resume_exactly(tiny_tensors: Path, tmp_path: Path, model: str) -> None:
    """train.lr_decay_start / lr_decay_to: every optimizer group runs at its starting rate times
    lr_scale(step); the step log shows the rates; a run interrupted during the decay resumes to the
    same bits as one that never stopped."""
    torch.use_deterministic_algorithms(True)
    kw = {"model": model, "steps": 8, "lr_decay_start": 0.25, "lr_decay_to": 0.1, "checkpoint_every": 2}
    straight = _trainer(tiny_tensors, tmp_path / "a", **kw)
    first = {k: [g["lr"] for g in o.param_groups] for k, o in straight.objective.optimizers.items()}
    straight.run()
    for k, o in straight.objective.optimizers.items():  # after the last step: the rate of step index 7
        assert [g["lr"] for g in o.param_groups] == pytest.approx([0.1 * r for r in first[k]])
    logged = {ln["step"]: ln for ln in map(json.loads, (tmp_path / "a" / "log.jsonl").read_text().splitlines())}
    name = "g" if model == "vae" else "d"
    for step in (2, 4, 6, 8):  # a log line at step s shows the rate of the step just done (index s - 1)
        want = first[name][0] * lr_scale(step - 1, steps=8, start=0.25, to=0.1)
        assert logged[step][f"lr_{name}"] == pytest.approx(want)
    assert logged[2][f"lr_{name}"] > logged[4][f"lr_{name}"] > logged[6][f"lr_{name}"] > logged[8][f"lr_{name}"]

    interrupted = _trainer(tiny_tensors, tmp_path / "b", **kw)
    interrupted.log_fn = _StopAt(4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    resumed = _trainer(tiny_tensors, tmp_path / "b", **kw)
    assert resumed.try_resume() and resumed.step == 4
    for k, o in resumed.objective.optimizers.items():  # the saved rates are replaced by the schedule's
        assert [g["lr"] for g in o.param_groups] == pytest.approx(
            [r * lr_scale(4, steps=8, start=0.25, to=0.1) for r in first[k]])
    resumed.run()
    a, b = _state_tensors(straight), _state_tensors(resumed)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f"resumed run differs in {different[:5]}"
    longer = _trainer(tiny_tensors, tmp_path / "b", **{**kw, "steps": 12})
    assert not longer.try_resume()  # a longer run decays on another schedule: it starts afresh


def test_torch_compile_trains_as_eager_does(tiny_tensors: Path, tmp_path: Path) -> None:
    """train.compile runs G and D through torch.compile (Inductor); the step computes what the eager
    one does (lazy R1's double backward goes through the plain D)."""
    runs = {}
    for compiled in (False, True):
        tr = _trainer(tiny_tensors, tmp_path / str(compiled), steps=4, r1_gamma=1.0, r1_every=2, compile=compiled)
        assert (tr.objective.d_run is not tr.objective.d) == compiled
        for _ in range(4):
            tr.train_step()
        runs[compiled] = (tr.monitor.means(), [p.detach().clone() for p in tr.objective.g.parameters()])
    (eager, g_eager), (comp, g_comp) = runs[False], runs[True]
    assert eager.keys() == comp.keys() and "r1" in eager
    for k in eager:
        assert math.isclose(eager[k], comp[k], rel_tol=1e-3, abs_tol=1e-5), (k, eager[k], comp[k])
    for a, b in zip(g_eager, g_comp, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_a_step_runs_its_backward_passes_on_the_calling_thread(tiny_tensors: Path, tmp_path: Path) -> None:
    """Every backward pass of a step (D, R1's double backward, G) runs with autograd's multithreading
    off, so on CUDA the calling thread runs it, not autograd's worker thread (whose state once made a
    process's first StyleGAN2 run part from the next on an H100); the setting is the thread's own
    and comes back after the step. ``backward_on_calling_thread = False`` restores PyTorch's default."""
    tr = _trainer(tiny_tensors, tmp_path, model="stylegan2", steps=4, r1_every=2, pl_every=2)
    seen: list[bool] = []
    step = tr.objective.step

    def observed(*args: Any) -> Any:
        seen.append(torch._C._is_multithreading_enabled())
        return step(*args)

    tr.objective.step = observed  # type: ignore[method-assign]
    assert torch._C._is_multithreading_enabled()
    tr.train_step()
    tr.train_step()
    assert seen == [False, False] and torch._C._is_multithreading_enabled()
    try:
        Trainer.backward_on_calling_thread = False
        tr.train_step()
    finally:
        Trainer.backward_on_calling_thread = True
    assert seen == [False, False, True] and "r1" in tr.monitor.means() and "pl" in tr.monitor.means()


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize(("model", "conditional"), [("biggan", True), ("sngan", True), ("dcgan", False)])
def test_the_ema_generator_samples_with_batchnorm_statistics_of_its_own_weights(tiny_tensors: Path, tmp_path: Path,
                                                                               model: str, conditional: bool) -> None:
    """The EMA's weights average the live G's, but BatchNorm's running statistics were the live G's
    own. Before the EMA samples (grids, scores, saved files), each BatchNorm's statistics become the
    mean, over train.ema_standing_stats batches of fresh latents, of the batch statistics it sees
    with the EMA's weights; nothing else of the EMA, and nothing of the training, moves."""
    kw = {"model": model, "conditional": conditional, "steps": 20, "ema_standing_stats": 3}
    tr, twin = _trainer(tiny_tensors, tmp_path / "a", **kw), _trainer(tiny_tensors, tmp_path / "b", **kw)
    for t in (tr, twin):
        for _ in range(3):
            t.train_step()
    shadow = tr.ema.shadow
    live = _bn_buffers(tr.objective.generator)
    assert all(torch.equal(v, _bn_buffers(shadow)[k]) for k, v in live.items())  # copied every step
    others = {k: v.clone() for k, v in shadow.state_dict().items() if k not in live}
    ptrs = {k: v.data_ptr() for k, v in shadow.named_buffers()}
    bn = next(m for m in shadow.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    rng = torch.get_rng_state()
    g = tr.ema_generator()
    hook.remove()
    assert g is shadow and not g.training and not any(m.training for m in g.modules())
    assert len(seen) == 3 and all(x.shape[0] == tr.cfg.batch_size for x in seen)
    mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen]).mean(0)  # unbiased, as BatchNorm keeps
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1
    recomputed = _bn_buffers(shadow)
    assert any(not torch.equal(v, live[k]) for k, v in recomputed.items() if "running_" in k)
    assert all(torch.equal(v, shadow.state_dict()[k]) for k, v in others.items())  # weights, spectral-norm vectors
    assert {k: v.data_ptr() for k, v in shadow.named_buffers()} == ptrs  # same storage: CUDA graphs stay valid
    assert torch.equal(torch.get_rng_state(), rng)
    tr.ema_generator()  # the same weights always get the same statistics
    assert all(torch.equal(v, _bn_buffers(shadow)[k]) for k, v in recomputed.items())
    for t in (tr, twin):  # and the training goes on as if nothing had sampled: every tensor of its state
        for _ in range(2):
            t.train_step()
    a, b = _state_tensors(tr), _state_tensors(twin)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    live = _bn_buffers(tr.objective.generator)
    assert all(torch.equal(v, _bn_buffers(shadow)[k]) for k, v in live.items())  # the step copied them back
    tr.save_generator(tmp_path / "g.pt")  # the saved file holds statistics recomputed for the new weights
    state = torch.load(tmp_path / "g.pt", weights_only=True)["state_dict"]
    again = _bn_buffers(tr.ema_generator())
    assert all(torch.equal(state[k], v) for k, v in again.items())
    assert any(not torch.equal(v, live[k]) for k, v in again.items() if "running_" in k)
    assert any(not torch.equal(v, recomputed[k]) for k, v in again.items() if "running_" in k)
    off = _trainer(tiny_tensors, tmp_path / "c", **{**kw, "ema_standing_stats": 0})
    off.train_step()
    off.ema_generator()
    assert all(torch.equal(v, _bn_buffers(off.ema.shadow)[k]) for k, v in _bn_buffers(off.objective.generator).items())


def test_a_changed_config_does_not_resume(tiny_tensors: Path, tmp_path: Path) -> None:
    _trainer(tiny_tensors, tmp_path, steps=2).run()
    assert not _trainer(tiny_tensors, tmp_path, steps=4, lr_g=1e-3).try_resume()
    assert _trainer(tiny_tensors, tmp_path, steps=4, log_every=1).try_resume()  # logging cadence is not semantic


def test_divergence_is_caught_within_the_step_and_the_checkpoint_stays_good(tiny_tensors: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_tensors, tmp_path, steps=6, checkpoint_every=2)
    trainer.cfg = trainer.cfg.replace(steps=2)
    trainer.run()
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    trainer.cfg = trainer.cfg.replace(steps=6)
    with torch.no_grad():
        next(trainer.objective.d.parameters()).fill_(float("nan"))  # what a blown-up update leaves behind
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 3: loss_d = nan"):
        trainer.run()
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["step"] == 2
    for k, v in good["models"]["d"].items():
        assert torch.equal(v, after["models"]["d"][k])
        assert torch.isfinite(v.float()).all()


def test_transfer_reports_matched_and_new_tensors_and_freezes_d_layers(tiny_tensors: Path, tmp_path: Path) -> None:
    src = _trainer(tiny_tensors, tmp_path / "src", steps=2)
    src.run()
    dst = _trainer(tiny_tensors, tmp_path / "dst", steps=3, ndf=16, freeze_d_layers=1)
    report = dst.init_from(tmp_path / "src" / "checkpoint.pt", freeze_d_layers=1)
    assert any(k.startswith("g.") for k in report["matched"])  # same G architecture: copied
    assert any(k.startswith("d.") for k in report["new"])  # wider D: newly initialised
    frozen = [p.clone() for p in dst.objective.d.trunk[0].parameters()]
    dst.run()
    assert all(torch.equal(a, b) for a, b in zip(frozen, dst.objective.d.trunk[0].parameters(), strict=True))


# --------------------------------------------------------------------------------------------
# Through the real stage command: kill -9 and resume, SIGTERM, a diverging learning rate, DDP
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def stage_dir(tiny_tensors: Path, tmp_path: Path) -> Path:
    """A directory laid out like a project, with the tiny tensors and evaluator inputs in place."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(tiny_tensors / "augmented", tmp_path / "data" / "augmented")
    shutil.copytree(tiny_tensors / "tensors", tmp_path / "data" / "tensors")
    return tmp_path


def _train_cmd(root: Path, params: dict[str, Any]) -> list[str]:
    write_params(root / "params.yaml", params)
    return [sys.executable, "-m", "pipeline", "train", "--evaluator", "none.pt"]


def _final_state(root: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(root / "models" / "checkpoint.pt")
    return {f"{n}.{k}": v for n, sd in ckpt["models"].items() for k, v in sd.items()} | {
        f"ema.{k}": v for k, v in ckpt["ema"].items()}


def test_kill_9_then_resume_equals_a_straight_run(stage_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    params = tiny_params(train={**SMALL, "steps": 60, "checkpoint_every": 20, "ngf": 16, "ndf": 16})
    env = venv_env(PIPELINE_TRACKING="0")
    straight = tmp_path_factory.mktemp("straight")
    shutil.copytree(stage_dir, straight, dirs_exist_ok=True)
    subprocess.run(_train_cmd(straight, params), cwd=straight, env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(stage_dir, params), cwd=stage_dir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work = stage_dir / ".pipeline" / "train"
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("*/checkpoint.pt")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = list(work.glob("*/checkpoint.pt"))
    assert ckpts, "no checkpoint was written before the kill"
    killed_at = load_checkpoint(ckpts[0])["step"]
    assert killed_at < 60, "the run finished before it could be killed; nothing was tested"
    out = subprocess.run(_train_cmd(stage_dir, params), cwd=stage_dir, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"resumed from" in out.stderr and f"at step {killed_at}" in out.stderr
    a, b = _final_state(straight), _final_state(stage_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "kill -9 + resume differs from the straight run"
    log_steps = [json.loads(ln)["step"] for ln in (stage_dir / "reports/train/log.jsonl").read_text().splitlines()]
    assert log_steps == sorted(set(log_steps)), "the step log has duplicated steps after resume"
    # The published summary (a DVC output) is the straight run's, byte for byte: nothing in it says
    # the run was resumed, so the cache and `dvc metrics diff` see one result.
    summaries = [(root / "reports/train/summary.json").read_bytes() for root in (straight, stage_dir)]
    assert summaries[0] == summaries[1]


def test_sigterm_saves_a_checkpoint_and_the_run_ends_killed(stage_dir: Path) -> None:
    params = tiny_params(train={**SMALL, "steps": 100000, "checkpoint_every": 100000})
    proc = subprocess.Popen(_train_cmd(stage_dir, params), cwd=stage_dir, env=venv_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    logs = []
    while time.time() < deadline and not logs:
        logs = list((stage_dir / ".pipeline" / "train").glob("*/log.jsonl"))
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err
    ckpt = load_checkpoint(next((stage_dir / ".pipeline" / "train").glob("*/checkpoint.pt")))
    assert 0 < ckpt["step"] < 100000
    journals = list((stage_dir / ".pipeline" / "tracking").glob("*-train-*/journal.jsonl"))
    events = [json.loads(ln) for ln in journals[0].read_text().splitlines()]
    assert events[-1] == {**events[-1], "type": "end", "status": "KILLED"}


def test_a_diverging_learning_rate_fails_the_stage_with_the_step_named(stage_dir: Path) -> None:
    params = tiny_params(train={**SMALL, "steps": 50, "lr_d": 1e30, "lr_g": 1e30, "checkpoint_every": 1})
    out = subprocess.run(_train_cmd(stage_dir, params), cwd=stage_dir, env=venv_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 2, out.stderr
    assert "training diverged at step" in out.stderr and "Traceback" not in out.stderr
    journal = next((stage_dir / ".pipeline" / "tracking").glob("*-train-*/journal.jsonl"))
    assert json.loads(journal.read_text().splitlines()[-1])["status"] == "FAILED"
    # No weights produced by a diverged step were ever saved (the intact-checkpoint case with an
    # earlier good checkpoint is tested on the loop above).
    for path in (stage_dir / ".pipeline" / "train").glob("*/checkpoint*.pt"):
        for sd in load_checkpoint(path)["models"].values():
            assert all(torch.isfinite(v.float()).all() for v in sd.values()), "a non-finite checkpoint was saved"
    assert not (stage_dir / "models" / "generator.pt").exists()


def test_ddp_on_two_cpu_processes_with_gloo_trains_checkpoints_and_resumes(stage_dir: Path) -> None:
    params = tiny_params(base={"device": "cpu"}, train={**SMALL, "steps": 4, "devices": 2, "checkpoint_every": 2})
    env = venv_env(PIPELINE_TRACKING="0")
    out = subprocess.run(_train_cmd(stage_dir, params), cwd=stage_dir, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "launching" in out.stderr and "torch.distributed.run" in out.stderr
    work = next((stage_dir / ".pipeline" / "train").iterdir())
    ranks = sorted(p.name for p in work.glob("checkpoint-rank*.pt"))
    assert ranks == ["checkpoint-rank0.pt", "checkpoint-rank1.pt"]
    r0, r1 = (load_checkpoint(work / r) for r in ranks)
    assert r0["world_size"] == 2 and r0["step"] == 4
    for net in ("g", "d"):  # gradients all-reduced: the weights of the replicas stay identical
        for k, v in r0["models"][net].items():
            if "running_" not in k and "num_batches" not in k:  # BN statistics are per rank (sync_bn off)
                assert torch.equal(v, r1["models"][net][k]), k
    assert not torch.equal(r0["sampler"]["generator"], r1["sampler"]["generator"])  # per-rank randomness
    log = [json.loads(ln) for ln in (work / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(ln["loss_d"]) and math.isfinite(ln["loss_g"]) for ln in log if "loss_d" in ln)
    params["train"]["steps"] = 6
    out = subprocess.run(_train_cmd(stage_dir, params), cwd=stage_dir, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stderr and load_checkpoint(work / "checkpoint-rank0.pt")["step"] == 6


# --------------------------------------------------------------------------------------------
# The engine's seams: executors run any objective the same way; a new objective needs no loop change
# --------------------------------------------------------------------------------------------

FAMILIES = {
    "dcgan": {"model": "dcgan", "r1_gamma": 1.0, "r1_every": 2},
    "sngan": {"model": "sngan"},
    "wgan_gp": {"model": "wgan_gp", "n_critic": 2},
    "conditional": {"model": "dcgan", "conditional": True, "instance_noise": 0.1},
    "diffaug": {"model": "dcgan", "diffaug": ["translation", "cutout", "color"], "grad_clip": 1.0},
    "vae": {"model": "vae", "kl_warmup_steps": 2},
    "stylegan2": {"model": "stylegan2", "r1_every": 2, "pl_every": 2},
    "biggan": {"model": "biggan", "conditional": True},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_compiled_executor_computes_what_the_eager_one_does(tiny_tensors: Path, tmp_path: Path,
                                                                 family: str) -> None:
    """Every family through torch.compile (traced by Dynamo and AOTAutograd; the aot_eager backend
    skips only Inductor's C++ code generation, which the dcgan test above covers) gives the
    parameters the eager executor gives after the same steps. The spectral-norm networks (sngan's
    D, both of biggan's) are compiled too."""
    params = {}
    for compiled in (False, True):
        cfg, data = _config(tiny_tensors, steps=3, compile=compiled, **FAMILIES[family])
        tr = Trainer(cfg, torch.from_numpy(data.images), torch.from_numpy(data.labels), device="cpu",
                     workdir=tmp_path / str(compiled), progress=False, compile_backend="aot_eager")
        if family != "vae":
            assert (tr.objective.d_run is not tr.objective.d) == compiled
            assert (tr.objective.g_run is not tr.objective.g) == compiled
        for i in range(3):
            tr.train_step(want_norm=i == 2)
        params[compiled] = {f"{n}.{k}": v.detach().clone() for n, m in tr.objective.modules.items()
                            for k, v in m.state_dict().items()}
        params[compiled].update({f"ema.{k}": v.detach().clone() for k, v in tr.ema.shadow.state_dict().items()})
    eager, comp = params[False], params[True]
    assert eager.keys() == comp.keys()
    moved = [k for k in eager if k.endswith("weight")]
    assert moved
    noise = set()
    if family == "biggan":
        # BigGAN's up-block convolutions feed BatchNorms, so their biases get a zero gradient in exact
        # arithmetic: Adam turns the rounding noise (which differs between the two executors) into
        # full-size steps, and the running means of those BatchNorms follow the biases.
        noise = {k for k in eager if re.fullmatch(r"(g|ema)\.(blocks\.\d+\.(c1|c2|sc)\.bias|(blocks\.\d+\.bn[12]\.)?bn\.running_mean)", k)}
        assert len(noise) == 22, sorted(noise)  # G's and its EMA's: 6 biases and 5 running means each at this size
    for k in eager.keys() - noise:
        assert torch.allclose(eager[k].float(), comp[k].float(), rtol=1e-4, atol=1e-5), k


def test_training_steps_advance_spectral_norm_and_forwards_do_not(tiny_tensors: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """In training, spectral norm's vectors move only through the objective's power iteration: a
    step advances G's (once) and D's (before each of its n_critic + 1 phases) exactly as running
    power_iterate by hand does, and a training forward outside a step leaves them alone."""
    from pipeline.models.layers import power_iterate

    tr = _trainer(tiny_tensors, tmp_path, model="biggan", conditional=True, steps=4)
    obj = tr.objective
    assert obj.spectral_g and obj.spectral_d
    assert all(not sn.iterate_in_forward for sn, _ in obj.spectral_g + obj.spectral_d)
    state = lambda pairs: [(sn._u.clone(), sn._v.clone()) for sn, _ in pairs]  # noqa: E731
    g0, d0 = state(obj.spectral_g), state(obj.spectral_d)
    obj.d.train()(torch.zeros(2, *tr.cfg.image_shape), torch.zeros(2, dtype=torch.long))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(d0, state(obj.spectral_d), strict=True))
    # What the step's iterations give on the weights as they are before it (G's come first; D's
    # first phase iterates before D's weights change): replay them on copies of the vectors.
    expected_g, expected_d = [], []
    for (sn, w), (u, v) in zip(obj.spectral_g, g0, strict=True):
        expected_g.append(sn._iterate(sn._matrix(w.detach()), u, v, 1))
    for (sn, w), (u, v) in zip(obj.spectral_d, d0, strict=True):
        expected_d.append(sn._iterate(sn._matrix(w.detach()), u, v, 1))
    snapshot = {id(sn): (sn._u.clone(), sn._v.clone()) for sn, _ in obj.spectral_d}
    calls: list[int] = []
    original = power_iterate

    def counting(pairs):  # type: ignore[no-untyped-def]
        calls.append(len(pairs))
        original(pairs)
        if len(calls) == 2:  # after G's and D's first: D's vectors as the first D phase sees them
            snapshot.update({id(sn): (sn._u.clone(), sn._v.clone()) for sn, _ in obj.spectral_d})

    monkeypatch.setattr("pipeline.training.objectives.power_iterate", counting)
    tr.train_step()
    n_critic = tr.cfg.n_critic
    assert calls == [len(obj.spectral_g)] + [len(obj.spectral_d)] * (n_critic + 1)
    for (sn, _), (u, v) in zip(obj.spectral_g, expected_g, strict=True):
        assert torch.allclose(sn._u, u) and torch.allclose(sn._v, v)  # G's weights changed after its one iteration
    for (sn, _), (u, _v) in zip(obj.spectral_d, expected_d, strict=True):
        assert torch.allclose(snapshot[id(sn)][0], u)
        if u.numel() > 1:  # (a 1-row weight's u is +-1 whatever happens)
            assert not torch.equal(sn._u, snapshot[id(sn)][0])  # and D's moved on in its later phases


class TinyGenerator(torch.nn.Module):
    def __init__(self, nz: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape
        self.net = torch.nn.Linear(nz, int(np.prod(shape)))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.net(z)).view(-1, *self.shape)


def test_a_new_objective_trains_resumes_and_checkpoints_with_no_change_to_the_loop(tiny_tensors: Path,
                                                                                    tmp_path: Path) -> None:
    """A toy family (a linear generator matching each batch's mean image) is all a new model needs:
    its networks, a draw, a step; the loop, executors, checkpoints and resume are the engine's."""
    from pipeline.training.objectives import Objective

    class MeanMatching(Objective):
        def __init__(self, cfg: TrainConfig, ctx: Any, sampler: Any) -> None:
            super().__init__(cfg, ctx, sampler)
            self.modules = {"g": TinyGenerator(cfg.nz, cfg.image_shape).to(ctx.device)}
            self.generator, self.generator_spec = self.modules["g"], ("tiny", {"nz": cfg.nz})
            self.optimizers = {"g": self._adam(self.generator.parameters(), 1e-2)}

        def draw(self) -> dict[str, Any]:
            return {"idx": self.sampler.indices(), "z": self.sampler.latents(self.cfg.batch_size)[0]}

        def step(self, draws: dict[str, Any], variant: Any, step: torch.Tensor) -> dict[str, torch.Tensor]:
            x, _ = self.sampler.batch(draws["idx"])
            loss = (self.generator(draws["z"]).mean(0) - x.mean(0)).pow(2).mean()
            out = {"loss": loss.detach()}
            self._update(loss, self.generator, self.optimizers["g"], variant[0], "grad_norm", out)
            return out

    cfg, data = _config(tiny_tensors, steps=8, checkpoint_every=4)

    def make(workdir: Path, steps: int) -> Trainer:
        return Trainer(cfg.replace(steps=steps), torch.from_numpy(data.images), torch.from_numpy(data.labels),
                       device="cpu", workdir=workdir, progress=False, objective=MeanMatching)

    straight = make(tmp_path / "a", 8)
    result = straight.run()
    assert result.step == 8
    log = [json.loads(ln) for ln in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] and all(math.isfinite(r["grad_norm"]) for r in log)
    make(tmp_path / "b", 4).run()
    resumed = make(tmp_path / "b", 8)
    assert resumed.try_resume() and resumed.step == 4
    resumed.run()
    a, b = straight.objective.modules["g"].state_dict(), resumed.objective.modules["g"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["models"]["g"].keys() == a.keys()


def test_semantic_keys_are_declared_beside_each_param() -> None:
    """The resume and work-directory keys ignore exactly the keys params.py marks semantic=False."""
    from pipeline.params import non_semantic_keys

    keys = non_semantic_keys(Train)
    assert {"steps", "log_every", "cuda_graph", "compile", "devices"} <= set(keys)
    assert not {"lr_g", "batch_size", "model", "r1_gamma", "precision"} & set(keys)
    cfg = resolve({"model": "dcgan"}, seed=0, image_shape=(1, 28, 28), num_classes=0)
    assert cfg.key() == cfg.replace(steps=10, log_every=1, cuda_graph=False).key()
    assert cfg.key() != cfg.replace(lr_g=1e-3).key() != cfg.replace(seed=1).key()
    assert cfg.key() == cfg.replace(lr_decay_to=0.5).key()  # no decay: its keys change nothing
    decaying = cfg.replace(lr_decay_start=0.5)
    assert decaying.key() != decaying.replace(steps=10).key()  # the rates depend on where training ends
    assert decaying.key() == decaying.replace(log_every=1, cuda_graph=False).key()
    assert None not in (cfg.loss, cfg.d_norm, cfg.spectral_norm, cfg.n_critic, cfg.gp_weight)


def test_vae_best_checkpoint_samples_and_carries_the_ex_post_density(tiny_tensors: Path, tmp_path: Path) -> None:
    """The in-loop score samples what best.pt will sample (the mixture of the weights scored), and
    both generator files carry a mixture fitted to the encoder's means at their step."""
    from pipeline.models import load_generator
    from pipeline.models.density import DensityGenerator

    cfg, data = _config(tiny_tensors, model="vae", steps=4, eval_every=2, gmm_components=3)
    scored: list[torch.nn.Module] = []

    def eval_fn(g: torch.nn.Module) -> float:
        scored.append(g)
        return 10.0 - len(scored)  # every score is a new best: best.pt is the last one scored

    trainer = Trainer(cfg, torch.from_numpy(data.images), torch.from_numpy(data.labels), device="cpu",
                      workdir=tmp_path, progress=False, eval_fn=eval_fn)
    trainer.run()
    assert len(scored) == 2 and all(isinstance(g, DensityGenerator) for g in scored)
    trainer.save_generator(tmp_path / "generator.pt")
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    fitted, info = trainer.objective.latent_density(trainer.step)
    assert raw["info"]["latent_sampler"] == "gmm" and raw["latent_density"]["fit"]["components"] == 3
    assert raw["latent_density"]["fit"]["points_available"] == len(data.images)
    assert torch.equal(raw["latent_density"]["state"]["means"], fitted.means.cpu())
    # Fitted to the encoder's means: its weighted mean is theirs.
    means = trainer.objective.encoded_means()
    assert torch.allclose(fitted.weights @ fitted.means, means.mean(0), atol=1e-4)
    g, ginfo = load_generator(tmp_path / "generator.pt")
    assert isinstance(g, DensityGenerator) and ginfo["step"] == 4


def test_free_bits_floor_the_kl_term_per_dimension(tiny_tensors: Path, tmp_path: Path) -> None:
    """With a floor above every dimension's KL, the KL term of the loss is exactly nz * free_bits
    (so it pushes no posterior towards the prior), while the logged KL stays the real one."""
    trainer = _trainer(tiny_tensors, tmp_path, steps=2, model="vae", kl_warmup_steps=0, free_bits=50.0,
                       vae_sampler="prior")
    trainer.run()
    (line,) = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert line["loss"] - line["recon"] == pytest.approx(8 * 50.0, rel=1e-4)  # nz = 8
    assert 0 < line["kl"] < 8 * 50.0


def test_biggan_trains_its_attention_and_orthogonal_regularisation_at_32_pixels(tmp_path: Path) -> None:
    """At 32 px BigGAN has self-attention in G and D (16x16): a few steps move both gammas off 0,
    and the G phase logs the orthogonal penalty it adds (recipe: 1e-4), which is finite."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(64) % 10
    cfg = resolve({**SMALL, "model": "biggan", "conditional": True, "steps": 2, "log_every": 2}, seed=0,
                  image_shape=(1, 32, 32), num_classes=10)
    assert (cfg.n_critic, cfg.beta1, cfg.lr_d, cfg.ortho_reg) == (2, 0.0, 4e-4, 1e-4)
    trainer = Trainer(cfg, images, labels, device="cpu", workdir=tmp_path, progress=False)
    trainer.run()
    g, d = trainer.objective.g, trainer.objective.d
    assert g.attn.gamma.item() != 0 and d.blocks[1].gamma.item() != 0
    (line,) = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(line["ortho"]) and line["ortho"] > 0
