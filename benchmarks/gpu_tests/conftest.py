"""Shared by the GPU tests: cuDNN picks the same (deterministic) algorithms for every run, so an
eager run and a replayed one are compared as executors, not as cuDNN's algorithm choices."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _same_algorithms() -> Iterator[None]:
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if os.environ.get("GPU_TESTS_NO_TF32"):  # to tell TF32 rounding apart from an executor difference
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
