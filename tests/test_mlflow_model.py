"""The generator logged to a real MLflow store (SQLite) loads back with mlflow.pytorch.load_model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pipeline.mlflow_models  # noqa: F401 - registers the generator's MLflow model logger
from pipeline.models import load_generator
from pipeline.tracking import StageRun

from helpers_eval import TinyRun


def _log(path: Path, root: Path) -> str:
    with StageRun("train", root=root, enabled=True, experiment="models-test") as run:
        run.log_generator(path, "generator")
    state = json.loads((run.dir / "state.json").read_text())
    assert state["complete"] and state["error"] is None, state
    return state["run_id"]


@pytest.mark.parametrize("which", ["tiny_gan", "tiny_conditional", "tiny_vae"])
def test_generator_loads_with_mlflow_pytorch(which: str, request: pytest.FixtureRequest, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    run: TinyRun = request.getfixturevalue(which)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id = _log(run.models / "best.pt", tmp_path)
    mlflow.set_tracking_uri(uri)
    model_uri = f"runs:/{run_id}/generator"
    model = mlflow.pytorch.load_model(model_uri)
    ours, info = load_generator(run.models / "best.pt")
    z = torch.randn(6, info["nz"], generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % info["num_classes"] if info["num_classes"] else None
    with torch.no_grad():
        out = model(z) if y is None else model(z, y)
        expected = ours(z, y)
    assert out.shape == (6, 1, 28, 28)
    assert torch.equal(out, expected) and float(out.abs().max()) <= 1.0
    signature = mlflow.models.get_model_info(model_uri).signature
    inputs = signature.inputs.to_dict()
    assert list(inputs[0]["tensor-spec"]["shape"]) == [-1, info["nz"]]
    if info["num_classes"]:
        assert [i["name"] for i in inputs] == ["z", "y"]
    assert list(signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 28, 28]


@pytest.mark.parametrize(("arch", "num_classes"), [("stylegan2", 0), ("biggan", 10)])
def test_the_newer_architectures_load_with_mlflow_pytorch(arch: str, num_classes: int, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """StyleGAN2 (with its w_avg and fixed noise buffers) and BigGAN (spectral norm in G) go through the
    same generator file and MLflow model as the others, and sample the same images once loaded."""
    import mlflow

    from pipeline.models import build_generator, save_generator

    torch.manual_seed(0)
    kwargs = {"nz": 20, "ngf": 8, "channels": 1, "size": 28, "num_classes": num_classes}
    g = build_generator(arch, **kwargs)
    path = tmp_path / "best.pt"
    save_generator(path, g, arch=arch, kwargs=kwargs,
                   info={"model": arch, "nz": 20, "num_classes": num_classes, "image_shape": [1, 28, 28], "step": 0,
                         "ema": True, "config": "{}"})
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id = _log(path, tmp_path)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    ours, _ = load_generator(path)
    z = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4) if num_classes else None
    with torch.no_grad():
        out = model(z) if y is None else model(z, y)
        assert out.shape == (4, 1, 28, 28) and torch.equal(out, ours(z, y))
