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


# ---------------------------------------------------------------------------------------------
# Rule: params are refused before any work when DVC would read them differently, when the model
# cannot use them, or when a path leaves the project however it is spelled
# ---------------------------------------------------------------------------------------------

DUPLICATES = {
    "key in a section": "train:\n  steps: 60\n  batch_size: 8\n  steps: 3000\n",
    "section": "train:\n  steps: 60\ntrain:\n  steps: 3000\n",
    "nested mapping": "augment:\n  ops:\n    - name: HorizontalFlip\n      args: {p: 0.5, p: 1.0}\n",
    "same value twice": "data:\n  limit: 600\n  limit: 600\n",
}


@pytest.mark.parametrize("text", list(DUPLICATES.values()), ids=list(DUPLICATES))
def test_a_key_given_twice_is_refused_like_dvc_does(tmp_path: Path, cli: Cli, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=r"is given twice \(lines \d+ and \d+\); keep one of them"):
        load_params(path)
    code, err = cli(["params", "--check", "--params", str(path)], tmp_path)
    assert code == 2 and "given twice" in err and "Traceback" not in err
    code, err = cli(["download", "--params", str(path), "--out", str(tmp_path / "raw")], tmp_path)
    assert code == 2 and "given twice" in err and not (tmp_path / "raw").exists()


@pytest.mark.parametrize("kind", ["folder", "latin-1 bytes", "binary", "utf-16"])
def test_a_params_path_that_is_not_a_utf8_file_is_one_clear_line(tmp_path: Path, cli: Cli, kind: str) -> None:
    path = tmp_path / "params.yaml"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({"latin-1 bytes": "train:\n  model: caf\xe9\n".encode("latin-1"),
                          "binary": bytes(range(256)), "utf-16": "train: {}\n".encode("utf-16")}[kind])
    needle = "is a folder, not a params file" if kind == "folder" else "not UTF-8 text"
    for argv in (["params", "--check", "--params", str(path)], ["train", "--params", str(path)]):
        code, err = cli(argv, tmp_path)
        assert code == 2 and needle in err and "Traceback" not in err, err


SIZES = [([28, 64], "is not square"), ([64, 32], "is not square"), ([32, 28], "is not square"),
         (48, "cannot generate"), (30, "cannot generate"), (100, "cannot generate"), (1000, "cannot generate")]


@pytest.mark.parametrize("model", ["dcgan", "sngan", "wgan_gp", "vae"])
@pytest.mark.parametrize(("size", "needle"), SIZES, ids=[str(s) for s, _ in SIZES])
def test_a_size_the_model_cannot_generate_is_refused_when_params_are_read(tmp_path: Path, model: str, size: Any,
                                                                          needle: str) -> None:
    path = params_file(tmp_path, preprocess={"size": size}, train={"model": model})
    load_params(path)  # the preprocess section alone is valid: tensors of any size can be made
    with pytest.raises(ParamsError, match=f"preprocess.size: .*{needle}.*one of 8, 14, 16, 28, 32, 56, 64"):
        load_params(path, models=True)


@pytest.mark.parametrize("size", [14, 28, 32, [64, 64], 128])
def test_sizes_the_params_accept_are_sizes_every_model_builds_at(tmp_path: Path, size: Any) -> None:
    """Control: what the check lets through, the models really generate (and discriminate) at."""
    from pipeline.models import build_discriminator, build_generator, build_vae, recipe  # noqa: PLC0415

    for model in ("dcgan", "sngan", "wgan_gp", "vae"):
        params = load_params(params_file(tmp_path, preprocess={"size": size}, train={"model": model}), models=True)
        h, w = params.preprocess.hw
        arch = recipe(model)["arch"]
        z = torch.randn(2, 4)
        if arch == "vae":
            g = build_vae(nz=4, ngf=4, ndf=4, channels=1, size=h).decoder
        else:
            g = build_generator(arch, nz=4, ngf=4, channels=1, size=h)
            d = build_discriminator(arch, ndf=4, channels=1, size=h)
            assert d(torch.zeros(2, 1, h, w)).shape[0] == 2
        assert tuple(g(z).shape) == (2, 1, h, w)


def test_preprocess_refuses_a_size_the_model_cannot_generate_before_any_work(tmp_path: Path, cli: Cli) -> None:
    path = params_file(tmp_path, preprocess={"size": [28, 64]})
    code, err = cli(["preprocess", "--params", str(path), "--out", str(tmp_path / "tensors")], tmp_path)
    assert code == 2 and "preprocess.size: [28, 64] is not square" in err and "Traceback" not in err
    assert not (tmp_path / "tensors").exists()
    code, err = cli(["params", "--check", "--params", str(path)], tmp_path)
    assert code == 2 and "is not square" in err


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    return project


def _init_from(project: Path, value: str) -> Path:
    return params_file(project, train={"init_from": value})


LINKS_OUT = {
    "file link to an absolute path": ("models/transfer.pt", "{outside}/g.pt"),
    "folder link to an absolute path": ("models/shared", "{outside}"),
    "relative link climbing out": ("models/transfer.pt", "../../outside/g.pt"),
    "link to a link out": ("models/hop.pt", "transfer.pt"),
}


@pytest.mark.parametrize("case", list(LINKS_OUT), ids=list(LINKS_OUT))
def test_init_from_through_a_link_that_leaves_the_project_is_refused(tmp_path: Path, case: str) -> None:
    project = _project(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "g.pt").write_bytes(b"weights")
    link, target = LINKS_OUT[case]
    (project / link).symlink_to(target.format(outside=outside))
    if case == "link to a link out":
        (project / "models/transfer.pt").symlink_to(outside / "g.pt")
    value = "models/shared/g.pt" if "folder" in case else link
    with pytest.raises(ParamsError, match=f"train.init_from: '{value}' is a link to {outside / 'g.pt'}, outside"):
        load_params(_init_from(project, value))


OWN_OUTPUTS = ["models/generator.pt", "models/best.pt", "./models/checkpoint.pt", "models/../models/best.pt",
               "{project}/models/generator.pt", "models/alias.pt"]


@pytest.mark.parametrize("value", OWN_OUTPUTS)
def test_init_from_one_of_the_train_stages_own_outputs_is_refused(tmp_path: Path, value: str) -> None:
    project = _project(tmp_path)
    (project / "models/generator.pt").write_bytes(b"weights")
    (project / "models/alias.pt").symlink_to("generator.pt")
    with pytest.raises(ParamsError, match="is an output of the train stage .*which DVC deletes before train runs"):
        load_params(_init_from(project, value.format(project=project)))


def test_init_from_links_inside_the_project_or_into_its_dvc_cache_are_accepted(tmp_path: Path) -> None:
    """Controls: a link that stays inside, and DVC's symlink checkout into a cache outside (cache.dir)."""
    project = _project(tmp_path)
    (project / "models/transfer.pt").write_bytes(b"weights")
    (project / "models/link.pt").symlink_to("transfer.pt")
    assert load_params(_init_from(project, "models/link.pt")).train.init_from == "models/link.pt"
    cache = tmp_path / "shared-cache"
    (cache / "files/md5/ab").mkdir(parents=True)
    (cache / "files/md5/ab/cdef").write_bytes(b"weights")
    (project / ".dvc").mkdir()
    (project / ".dvc/config").write_text(f"[cache]\n    dir = {cache}\n    type = symlink\n")
    (project / "models/imported.pt").symlink_to(cache / "files/md5/ab/cdef")
    assert load_params(_init_from(project, "models/imported.pt")).train.init_from == "models/imported.pt"


# ---------------------------------------------------------------------------------------------
# Rule: every command line option is checked; a bad one is one line and exit status 2
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import build_generator, save_generator  # noqa: PLC0415

    path = tmp_path_factory.mktemp("gen") / "generator.pt"
    kwargs = {"nz": 8, "ngf": 8, "channels": 1, "size": 28, "num_classes": 0}
    save_generator(path, build_generator("dcgan", **kwargs), arch="dcgan", kwargs=kwargs,
                   info={"model": "dcgan", "nz": 8, "num_classes": 0, "step": 1, "ema": False})
    return path


SAMPLE_BAD = {
    "nrow 0": (["--nrow", "0"], "--nrow 0: must be at least 1"),
    "nrow -1": (["--nrow", "-1"], "--nrow -1: must be at least 1"),
    "scale 0": (["--scale", "0"], "--scale 0: must be at least 1"),
    "scale -3": (["--scale", "-3"], "--scale -3: must be at least 1"),
    "n 0": (["--n", "0"], "--n 0: must be at least 1"),
    "device tpu": (["--device", "tpu"], "--device tpu: not a device; use cpu, cuda or cuda:N"),
    "device cuda:x": (["--device", "cuda:x"], "--device cuda:x: not a device"),
    "device cuda:99": (["--device", "cuda:99"], "CUDA device"),
    "out an existing folder": (["--out", "{tmp}/folder.png"], "is an existing folder"),
    "out on a read-only file system": (["--out", "/proc/samples.png"], "cannot write there"),
    "out under a file": (["--out", "{tmp}/file.txt/g.png"], "cannot write there"),
    "npz on a read-only file system": (["--out", "/proc/samples.npz"], "cannot write there"),
}


@pytest.mark.parametrize("case", list(SAMPLE_BAD), ids=list(SAMPLE_BAD))
def test_sample_refuses_bad_options_in_one_line(tmp_path: Path, cli: Cli, generator_file: Path, case: str) -> None:
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.txt").write_text("x")
    extra, needle = SAMPLE_BAD[case]
    argv = ["sample", "--checkpoint", str(generator_file), "--n", "4", "--out", str(tmp_path / "g.png")]
    argv += [a.format(tmp=tmp_path) for a in extra]
    code, err = cli(argv, tmp_path)
    assert code == 2, err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "g.png").exists()


def test_sample_with_good_options_writes_the_grid(tmp_path: Path, cli: Cli, generator_file: Path) -> None:
    code, err = cli(["sample", "--checkpoint", str(generator_file), "--n", "6", "--nrow", "3", "--scale", "1",
                     "--device", "cpu", "--out", str(tmp_path / "g.png")], tmp_path)
    assert code == 0, err
    assert Image.open(tmp_path / "g.png").size == (3 * 30 + 2, 2 * 30 + 2)


@pytest.mark.parametrize("argv", [["params"], ["--help"], ["train", "--help"], ["sample", "--help"]],
                         ids=["params", "help", "train help", "sample help"])
def test_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path, argv: list[str]) -> None:
    """`python -m pipeline params | head -1`: the reader leaves early; no BrokenPipeError, no traceback."""
    env = venv_env()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first write (`| head -0`, `| true`)
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert code in (0, 141)
