"""Fixtures shared by several test files: the local HTTP server (see tests/helpers_http.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers_http import Server, serve


@pytest.fixture
def server() -> Iterator[Server]:
    """A plain-http server on 127.0.0.1 serving ``server.files``; stopped after the test."""
    yield from serve()
