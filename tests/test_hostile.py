"""Hostile input through the real entry points: code-running pickles, escaping archives, bombs, bad params.

The unit tests (test_archive.py, test_images.py) cover each rule of the safe extractor and the
image decoder in detail; these tests check that the stages a user actually runs
(``python -m pipeline download|clean|train|sample``) refuse the same inputs whole, exit with a
clear message, and leave nothing behind, and that no code from a file ever runs.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_team import pipeline, set_params, tool_env
from pipeline.errors import CheckpointError

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------------------------
# Checkpoints whose pickle runs code
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls os.system(command): what a booby-trapped checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def booby_trapped(path: Path, marker: Path, fmt: str) -> Path:
    """A .pt file shaped like one of ours whose loading (with full pickle) touches ``marker``."""
    torch.save({"format": fmt, "state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(f"touch {marker}")}, path)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "CODE-RAN"


def test_trap_works_when_unpickled_without_restriction(tmp_path: Path, marker: Path) -> None:
    """Control: the file really runs its code under a plain torch.load(weights_only=False)."""
    evil = booby_trapped(tmp_path / "evil.pt", marker, "pipeline.checkpoint/1")
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", ["checkpoint", "generator", "evaluator"])
def test_code_running_pickle_is_refused_by_every_loader(tmp_path: Path, marker: Path, loader: str) -> None:
    from pipeline.metrics.evaluator import load_evaluator  # noqa: PLC0415
    from pipeline.models import load_generator  # noqa: PLC0415
    from pipeline.training.checkpoint import load_checkpoint  # noqa: PLC0415

    fmt = {"checkpoint": "pipeline.checkpoint/1", "generator": "pipeline.generator/1",
           "evaluator": "pipeline.evaluator/1"}[loader]
    evil = booby_trapped(tmp_path / "evil.pt", marker, fmt)
    load = {"checkpoint": load_checkpoint, "generator": load_generator, "evaluator": load_evaluator}[loader]
    with pytest.raises(CheckpointError, match="refused: it needs arbitrary code to load"):
        load(evil)
    assert not marker.exists()


def test_sample_command_refuses_a_code_running_checkpoint(project: Path, marker: Path) -> None:
    evil = booby_trapped(project / "models" / "downloaded.pt", marker, "pipeline.generator/1")
    proc = pipeline("sample", "--checkpoint", str(evil), "--out", "samples.npz", cwd=project, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refused: it needs arbitrary code to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (project / "samples.npz").exists()


def test_train_refuses_a_code_running_transfer_source(project: Path, marker: Path) -> None:
    booby_trapped(project / "models" / "transfer.pt", marker, "pipeline.checkpoint/1")
    set_params(project, {"train": {"init_from": "models/transfer.pt"}})
    proc = pipeline("train", cwd=project, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "models/transfer.pt: refused: it needs arbitrary code to load" in proc.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Archives (data.source: archive) through the download stage
# ---------------------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


GOOD = {f"digits/{c}/{i}.png": _png(10 * c + i) for c in range(2) for i in range(3)}


def _tar(path: Path, entries: list[tuple[str, bytes | None, bytes, str]]) -> Path:
    """entries: (name, data, tar type, link target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data, kind, link in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode, ti.size = kind, link, 0o644, len(data or b"")
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _good_entries() -> list[tuple[str, bytes | None, bytes, str]]:
    return [(n, b, tarfile.REGTYPE, "") for n, b in GOOD.items()]


def hostile_archive(kind: str, where: Path) -> tuple[Path, str, list[Path]]:
    """(archive, the member the refusal must name, paths it tries to write outside the destination)."""
    outside = where / "outside"
    outside.mkdir(exist_ok=True)
    if kind == "dotdot":
        name = "digits/../../../../ESCAPED-dotdot.png"
        return _tar(where / "a.tar.gz", [*_good_entries(), (name, _png(99), tarfile.REGTYPE, "")]), name, []
    if kind == "absolute":
        target = outside / "ESCAPED-absolute.png"
        return _tar(where / "a.tar.gz", [*_good_entries(), (str(target), _png(99), tarfile.REGTYPE, "")]), \
            str(target), [target]
    if kind == "symlink":
        entries = [*_good_entries(), ("digits/1/link", None, tarfile.SYMTYPE, str(outside)),
                   ("digits/1/link/ESCAPED-through-link.png", _png(99), tarfile.REGTYPE, "")]
        return _tar(where / "a.tar.gz", entries), "digits/1/link", [outside / "ESCAPED-through-link.png"]
    if kind == "zip-dotdot":
        name = "../../ESCAPED-zip.png"
        return _zip(where / "a.zip", {**GOOD, name: _png(99)}), name, []
    if kind == "ratio-bomb":
        # 32 MiB of zeros deflate to ~32 KiB: a declared/actual ratio of ~1000 (the cap is 200).
        return _zip(where / "a.zip", {**GOOD, "digits/0/huge.png": bytes(32 << 20)}), "digits/0/huge.png", []
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "zip-dotdot", "ratio-bomb"])
def test_hostile_archive_is_refused_whole_and_nothing_is_written_outside(project: Path, tmp_path: Path,
                                                                         kind: str) -> None:
    archive, member, targets = hostile_archive(kind, tmp_path)
    set_params(project, {"data": {"source": "archive", "path": str(archive)}})
    manifest_before = (project / "data" / "raw" / "manifest.parquet").read_bytes()
    proc = pipeline("download", cwd=project, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"refused archive {archive}: member {member!r}" in proc.stderr and "Nothing was extracted" in proc.stderr
    # Nothing escaped, nothing was extracted, the previous data/raw is untouched, no temp is left.
    escaped = [p for p in tmp_path.rglob("ESCAPED-*") if not p.is_relative_to(tmp_path / "outside")]
    escaped += [t for t in targets if t.exists()]
    assert not escaped, escaped
    downloads = project / "data" / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir()), list(downloads.iterdir())
    assert (project / "data" / "raw" / "manifest.parquet").read_bytes() == manifest_before
    assert not [p.name for p in (project / "data").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Images (data.source: folder) through download + clean
# ---------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side zeros: tens of kB on disk, side^2 pixels declared."""
    line = bytes(1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(line * 500) for _ in range(side // 500)) + comp.compress(line * (side % 500))
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n%%EndComments\nnewpath 0 0 moveto 32 32 lineto stroke\n" \
      b"showpage\n%%EOF\n"
PSD = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 32, 32, 8, 3) + struct.pack(">III", 0, 0, 0) + b"\x00\x00" \
      + bytes(32 * 32 * 3)


def test_bombs_and_disguised_formats_are_rejected_without_starting_a_program(project: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name, data in GOOD.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    hostile = {"digits/0/bomb.png": bomb_png(14_000),  # over twice Pillow's limit: refused at open
               "digits/0/bomb-warning.png": bomb_png(10_000),  # Pillow would only warn and decode it
               "digits/1/vector.png": EPS,  # EPS named .png: Pillow would run Ghostscript on it
               "digits/1/layers.png": PSD}  # PSD named .png
    for name, data in hostile.items():
        (folder / name).write_bytes(data)
    # Every program an image library could hand these files to, as a trap that leaves a trace.
    trap_bin = tmp_path / "bin"
    trap_bin.mkdir()
    ran = tmp_path / "PROGRAM-RAN"
    for prog in ("gs", "gsc", "gswin64c", "convert", "magick", "identify"):
        (trap_bin / prog).write_text(f'#!/bin/sh\necho "{prog} $*" >> "{ran}"\nexit 1\n')
        (trap_bin / prog).chmod(0o755 | stat.S_IEXEC)
    env = tool_env(PATH=f"{trap_bin}{os.pathsep}{tool_env()['PATH']}")

    set_params(project, {"data": {"source": "folder", "path": str(folder), "limit": None,
                                  "max_pixels": 10**12}})  # Pillow's own bomb limits must still hold
    pipeline("download", cwd=project, env=env)
    pipeline("clean", cwd=project, env=env)
    import json  # noqa: PLC0415

    report = json.loads((project / "reports" / "clean_report.json").read_text())
    assert report["accepted"] == len(GOOD)
    assert report["rejected_by_reason"] == {"decompression_bomb": 2, "format_not_allowed": 2}, report
    assert sorted(report["examples"]["decompression_bomb"]) == ["digits/0/bomb-warning.png", "digits/0/bomb.png"]
    assert sorted(report["examples"]["format_not_allowed"]) == ["digits/1/layers.png", "digits/1/vector.png"]
    assert not ran.exists(), ran.read_text()


# ---------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------


BAD_PARAMS = [
    ("wrong type", {"train": {"steps": "many"}}, "train.steps: 'many' is not allowed; expected an integer"),
    ("bool for an int", {"train": {"batch_size": True}}, "train.batch_size: True is not allowed; expected an integer"),
    ("unknown key", {"train": {"stpes": 10}}, "train.stpes: unknown key (did you mean 'steps'?)"),
    ("unknown section", {"trian": {"steps": 10}}, "trian: unknown key (did you mean 'train'?)"),
    ("negative size", {"preprocess": {"size": -28}}, "preprocess.size: -28 is not allowed; it must be >= 8"),
    ("negative limit", {"data": {"limit": -5}}, "data.limit: -5 is not allowed; it must be >= 1"),
    ("zero batch", {"evaluate": {"batch_size": 0}}, "evaluate.batch_size: 0 is not allowed; it must be >= 1"),
    ("path climbing out", {"train": {"init_from": "../elsewhere/model.pt"}},
     "train.init_from: '../elsewhere/model.pt' is outside the project"),
    ("absolute path outside", {"train": {"init_from": "/etc/passwd"}}, "train.init_from: '/etc/passwd' is outside the project"),
    ("URL", {"train": {"init_from": "https://example.com/g.pt"}}, "train.init_from: 'https://example.com/g.pt' is a URL"),
]


def _write_params(project: Path, changes: dict) -> None:
    """set_params, but allowing new (unknown) sections and keys."""
    import yaml  # noqa: PLC0415

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize(("case", "changes", "message"), BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_are_refused_before_any_work_naming_the_key(project: Path, case: str, changes: dict,
                                                                message: str) -> None:
    _write_params(project, changes)
    models_before = {p.name: p.stat().st_mtime_ns for p in (project / "models").iterdir()}
    proc = pipeline("train", cwd=project, env=tool_env(PIPELINE_TRACKING="1"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # Before any work: no tracked run was opened, no training started, no output touched.
    assert not (project / ".pipeline" / "tracking").exists()
    assert not (project / ".pipeline" / "train").exists()
    assert not (project / "mlruns.db").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (project / "models").iterdir()} == models_before


def test_paths_that_may_point_anywhere_or_stay_inside_are_accepted(project: Path, tmp_path: Path) -> None:
    """Controls for the path rule: data inputs anywhere (documented), init_from inside the project."""
    _write_params(project, {"data": {"source": "folder", "path": str(tmp_path / "my-photos")},
                            "train": {"init_from": "models/../models/transfer.pt"}})
    proc = pipeline("params", "--check", cwd=project)
    assert "valid" in proc.stdout
    _write_params(project, {"train": {"init_from": str(project / "models" / "transfer.pt")}})
    assert "valid" in pipeline("params", "--check", cwd=project).stdout
