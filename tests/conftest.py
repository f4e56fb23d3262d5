"""Fixtures of the evaluation tests: one tiny real project per session (see helpers_eval)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers_eval import TinyData, TinyRun, build_tiny_data, run_model


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    return build_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_gan(tiny_data: TinyData) -> TinyRun:
    return run_model(tiny_data, "dcgan", {})


@pytest.fixture(scope="session")
def tiny_vae(tiny_data: TinyData) -> TinyRun:
    return run_model(tiny_data, "vae", {"train": {"model": "vae"}})


@pytest.fixture(scope="session")
def tiny_conditional(tiny_data: TinyData) -> TinyRun:
    return run_model(tiny_data, "conditional", {"train": {"conditional": True}}, report=False)
