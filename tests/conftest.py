"""Fixtures shared by several test files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_eval import TinyData, TinyRun, build_tiny_data, run_model
from helpers_http import Server, serve
from helpers_team import built_project, mlflow_server, project  # noqa: F401 - fixtures
from helpers_project import tiny_params


@pytest.fixture
def server() -> Iterator[Server]:
    """A plain-http server on 127.0.0.1 serving ``server.files``; stopped after the test."""
    yield from serve()


@pytest.fixture(scope="session")
def tiny_tensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/tensors and data/augmented built once from the embedded digits by the real stages."""
    from pipeline.params import validate, Params  # noqa: PLC0415
    from pipeline.stages import augment, clean, download, preprocess  # noqa: PLC0415

    base = tmp_path_factory.mktemp("tiny")
    params = validate(Params, tiny_params(augment={"copies": 1, "ops": [{"name": "HorizontalFlip", "args": {"p": 0.5}}]}))
    download.run(params.data, base / "raw", base / "downloads")
    clean.run(params.data, base / "raw", base / "clean", base / "clean_report.json", progress=False)
    preprocess.run(params, base / "clean", base / "raw", base / "tensors", progress=False)
    augment.run(params, base / "tensors", base / "augmented", progress=False)
    return base


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """One torch thread (and OMP_NUM_THREADS=1 for the stages and subprocesses): on a shared
    2-core machine a second OpenMP thread makes these small kernels several times slower."""
    import torch

    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


# Evaluation tests: one tiny real project per session (see helpers_eval).


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    return build_tiny_data(tmp_path_factory.mktemp("tinyeval"))


@pytest.fixture(scope="session")
def tiny_gan(tiny_data: TinyData) -> TinyRun:
    return run_model(tiny_data, "dcgan", {})


@pytest.fixture(scope="session")
def tiny_vae(tiny_data: TinyData) -> TinyRun:
    return run_model(tiny_data, "vae", {"train": {"model": "vae"}})


@pytest.fixture(scope="session")
def tiny_conditional(tiny_data: TinyData) -> TinyRun:
    return run_model(tiny_data, "conditional", {"train": {"conditional": True}})
