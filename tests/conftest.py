"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_http import Server, serve
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
