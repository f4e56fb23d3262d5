"""Careless or hostile input never ends in a traceback, a silent wrong number or lost files.

One test (parametrised) per rule; each tries more inputs than the case that revealed the fault.
Stages run for real, in-process through ``python -m pipeline``'s own ``main()`` where the point
is the exit status and message (fast), in subprocesses where the process matters (a broken
pipe, another user's permissions), and under a real ``dvc repro`` where DVC's behaviour is the
point.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers_eval import in_dir
from helpers_project import ROOT, make_project, run, tiny_params, venv_env, write_params
from pipeline.errors import DataError, ParamsError, UserError
from pipeline.params import Params, load_params, validate

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class Cli:
    """``python -m pipeline ARGV`` in this process (tracking off): (exit status, everything it said)."""

    def __init__(self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys, self.caplog, self.monkeypatch = capsys, caplog, monkeypatch
        monkeypatch.setenv("PIPELINE_TRACKING", "0")

    def __call__(self, argv: list[str], cwd: Path) -> tuple[int, str]:
        from pipeline.__main__ import main  # noqa: PLC0415

        self.monkeypatch.chdir(cwd)
        self.capsys.readouterr()
        self.caplog.clear()
        code = main(argv)
        out = self.capsys.readouterr()
        return code, out.err + out.out + self.caplog.text


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(capsys, caplog, monkeypatch)


def params_file(directory: Path, **sections: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_params(directory / "params.yaml", tiny_params(**sections))


def digit_pngs(folder: Path, n: int, *, classes: tuple[str, ...] = ()) -> list[Path]:
    """n distinct 28x28 gray PNGs (in class folders round-robin when ``classes``)."""
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        d = folder / classes[i % len(classes)] if classes else folder
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Rule: a stage replaces only a folder it wrote; anything else is refused before any work
# ---------------------------------------------------------------------------------------------

FOREIGN = {
    "notes": {"notes.txt": b"my notes"},
    "hidden file": {".secret": b"hidden"},
    "loose image": {"holiday.png": b"\x89PNG not really"},
    "subfolder": {"album/a.txt": b"a"},
}
FOLDER_OUTPUTS = [("download", "--out"), ("clean", "--out"), ("preprocess", "--out"), ("augment", "--out"),
                  ("report", "--figures")]


@pytest.mark.parametrize("foreign", list(FOREIGN), ids=list(FOREIGN))
@pytest.mark.parametrize(("stage", "option"), FOLDER_OUTPUTS, ids=[s for s, _ in FOLDER_OUTPUTS])
def test_a_stage_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path, cli: Cli, stage: str, option: str,
                                                               foreign: str) -> None:
    params = params_file(tmp_path / "project")
    target = tmp_path / "theirs"
    for rel, data in FOREIGN[foreign].items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
    before = snapshot(target)
    code, err = cli([stage, "--params", str(params), option, str(target)], tmp_path / "project")
    assert code == 2, err
    assert "which this stage did not write" in err and "Nothing was changed" in err, err
    assert "Traceback" not in err
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "theirs"]  # no temporary left beside it


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_download_refuses_an_out_that_overlaps_your_data_path(tmp_path: Path, cli: Cli, where: str) -> None:
    photos = tmp_path / "my-photos"
    digit_pngs(photos, 8)
    (photos / ".notes").write_text("keep me")
    params = params_file(tmp_path / "project", data={"source": "folder", "path": str(photos), "limit": None})
    out = {"same": photos, "inside": photos / "raw", "around": tmp_path}[where]
    before = snapshot(photos)
    code, err = cli(["download", "--params", str(params), "--out", str(out)], tmp_path / "project")
    assert code == 2 and "overlaps data.path" in err, err
    assert snapshot(photos) == before


def test_a_stage_replaces_its_own_folder_and_an_empty_one(tmp_path: Path, cli: Cli) -> None:
    """Controls: the default output (written by the stage before) and an empty folder are replaced."""
    params = params_file(tmp_path / "project")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "project" / "data" / "raw", tmp_path / "project" / "data" / "raw", empty):
        code, err = cli(["download", "--params", str(params), "--out", str(out)], tmp_path / "project")
        assert code == 0, err
        assert (out / "manifest.parquet").is_file()


def test_train_writes_only_its_declared_files_under_reports(tiny_data: Any, tmp_path: Path) -> None:
    """train --reports reports keeps the metrics, the report and a git-tracked .gitignore beside its files."""
    from pipeline.stages import train  # noqa: PLC0415

    from helpers_eval import eval_params  # noqa: PLC0415

    params = load_params(eval_params(tmp_path / "params.yaml", {"train": {"steps": 4, "eval_every": 2,
                                                                           "checkpoint_every": 2, "grid_every": 2}}))
    reports = tmp_path / "reports"
    theirs = {"metrics.json": b"{}", "index.html": b"<html>", "clean_report.json": b"{}", ".gitignore": b"/grids\n",
              "figures/samples.png": b"png"}
    for rel, data in theirs.items():
        (reports / rel).parent.mkdir(parents=True, exist_ok=True)
        (reports / rel).write_bytes(data)
    with in_dir(tmp_path):
        train.run(params, tiny_data.augmented, tiny_data.tensors, tiny_data.evaluator, tmp_path / "models", reports,
                  progress=False)
    for rel, data in theirs.items():
        assert (reports / rel).read_bytes() == data, rel
    for name in ("log.jsonl", "losses.csv", "scores.csv", "summary.json"):
        assert (reports / name).is_file()
    assert sorted(p.name for p in (reports / "grids").iterdir()) == ["step_000000.png", "step_000002.png",
                                                                     "step_000004.png"]
    # A grids folder holding something else is refused before training starts.
    (reports / "grids" / "mine.txt").write_text("x")
    with in_dir(tmp_path), pytest.raises(UserError, match="which this stage did not write"):
        train.run(params, tiny_data.augmented, tiny_data.tensors, tiny_data.evaluator, tmp_path / "models2", reports,
                  progress=False)
    assert not (tmp_path / "models2").exists()
