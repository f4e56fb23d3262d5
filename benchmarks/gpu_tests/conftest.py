"""Shared by the GPU tests: cuDNN picks the same (deterministic) algorithms for every run, so an
eager run and a replayed one are compared as executors, not as cuDNN's algorithm choices."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _same_algorithms() -> Iterator[None]:
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = False
