"""The evaluate stage's record: numbers in ``metrics.json``, everything else beside it.

``reports/metrics.json`` is a DVC metrics file: ``dvc exp show`` and ``dvc metrics diff`` give each
of its values a column, so it holds numbers only (``fid``, ``fid_ci_low``, ..., and Inception's
under ``inception``). The evaluation protocol (sample seeds, extractor name and sha256, interval
methods, ...), whether Inception-v3 was computed and why not, and warnings go to
``reports/eval_protocol.json`` in the same layout. :func:`read` puts the two back together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import read_json, write_json

PROTOCOL_FILE = "eval_protocol.json"


def protocol_path(metrics_path: str | Path) -> Path:
    """Where the protocol of a metrics file lives: ``eval_protocol.json`` beside it."""
    return Path(metrics_path).with_name(PROTOCOL_FILE)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def split(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(numbers, the rest): top-level numbers, and one level of nested numbers (``inception``)."""
    numbers: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for k, v in record.items():
        if _is_number(v):
            numbers[k] = v
        elif isinstance(v, dict) and k != "protocol":
            nums = {k2: v2 for k2, v2 in v.items() if _is_number(v2)}
            other = {k2: v2 for k2, v2 in v.items() if not _is_number(v2)}
            if nums:
                numbers[k] = nums
            if other or not nums:
                rest[k] = other
        else:
            rest[k] = v
    return numbers, rest


def merge(numbers: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split`."""
    out = dict(numbers)
    for k, v in rest.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def write(record: dict[str, Any], metrics_path: str | Path, protocol: str | Path | None = None) -> None:
    numbers, rest = split(record)
    write_json(metrics_path, numbers)
    write_json(protocol or protocol_path(metrics_path), rest)


def read(metrics_path: str | Path, protocol: str | Path | None = None) -> dict[str, Any]:
    """metrics.json and its protocol file as one record (the protocol file may be missing)."""
    p = Path(protocol or protocol_path(metrics_path))
    return merge(read_json(metrics_path), read_json(p) if p.exists() else {})
