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
from PIL import Image

from helpers_eval import eval_params, in_dir
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


@pytest.mark.parametrize("model", ["dcgan", "sngan", "wgan_gp", "vae", "biggan"])
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

    for model in ("dcgan", "sngan", "wgan_gp", "vae", "biggan"):
        params = load_params(params_file(tmp_path, preprocess={"size": size}, train={"model": model}), models=True)
        h, w = params.preprocess.hw
        arch = recipe(model)["arch"]
        z = torch.randn(2, 8)  # biggan splits z into a chunk per block and one more: 6 at 128 px
        if arch == "vae":
            g = build_vae(nz=8, ngf=4, ndf=4, channels=1, size=h).decoder
        else:
            g = build_generator(arch, nz=8, ngf=4, channels=1, size=h)
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
    "psi 0": (["--psi", "0"], "--psi 0.0: truncation psi must be in (0, 1]"),
    "psi 1.5": (["--psi", "1.5"], "--psi 1.5: truncation psi must be in (0, 1]"),
    "psi on a generator without truncation": (["--psi", "0.7"], "--psi 0.7: the dcgan generator has no truncation"),
    "device tpu": (["--device", "tpu"], "--device tpu: not a device; use cpu, cuda or cuda:N"),
    "device cuda:x": (["--device", "cuda:x"], "--device cuda:x: not a device"),
    "device cuda:99": (["--device", "cuda:99"], "CUDA device"),
    "out an existing folder": (["--out", "{tmp}/folder.png"], "is an existing folder"),
    "out on a read-only file system": (["--out", "/proc/samples.png"], "cannot write there"),
    "out under a file": (["--out", "{tmp}/file.txt/g.png"], "file.txt is a file, not a folder"),
    "out where root may not write": (["--out", "/sys/samples.png"], "cannot write there"),
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


def test_sample_with_truncation_writes_the_grid(tmp_path: Path, cli: Cli) -> None:
    from pipeline.models import build_generator, save_generator  # noqa: PLC0415

    kwargs = {"nz": 8, "ngf": 8, "channels": 1, "size": 28, "num_classes": 0}
    save_generator(tmp_path / "sg2.pt", build_generator("stylegan2", **kwargs), arch="stylegan2", kwargs=kwargs,
                   info={"model": "stylegan2", "nz": 8, "num_classes": 0, "step": 1, "ema": True})
    for psi in ("1", "0.5"):
        code, err = cli(["sample", "--checkpoint", str(tmp_path / "sg2.pt"), "--n", "4", "--psi", psi,
                         "--device", "cpu", "--out", str(tmp_path / f"g{psi}.npz")], tmp_path)
        assert code == 0, err
    full, truncated = (np.load(tmp_path / f"g{psi}.npz")["images"] for psi in ("1", "0.5"))
    assert full.shape == truncated.shape == (4, 1, 28, 28) and not np.array_equal(full, truncated)


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


# ---------------------------------------------------------------------------------------------
# Rule: a dataset input is either used as given or refused / skipped with its reason; nothing is
# reinterpreted silently (labels, empty classes), nothing crashes (names, permissions)
# ---------------------------------------------------------------------------------------------

BAD_LABELS = {
    "negative": (np.array([0, 1, -1, 2] * 5), "label 2 is -1 (5 negative)"),
    "all -1": (np.full(20, -1), "label 0 is -1 (20 negative)"),
    "fractional floats": (np.array([0.0, 1.5, 2.0, 3.0] * 5), "label 1 is 1.5 (5 not whole numbers)"),
    "NaN": (np.array([0.0, np.nan, 1.0, 2.0] * 5), "label 1 is nan"),
    "strings": (np.array(["cat", "dog"] * 10), "got an array of <U3"),
    "booleans": (np.array([True, False] * 10), "got an array of bool"),
}


@pytest.mark.parametrize("layout", ["images/labels", "x_train/y_train"])
@pytest.mark.parametrize("case", list(BAD_LABELS), ids=list(BAD_LABELS))
def test_npz_labels_that_are_not_class_indices_are_refused_naming_the_file(tmp_path: Path, case: str,
                                                                           layout: str) -> None:
    from pipeline.stages import download  # noqa: PLC0415

    labels, needle = BAD_LABELS[case]
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    path = tmp_path / "data.npz"
    if layout == "images/labels":
        np.savez(path, images=images, labels=labels)
    else:
        np.savez(path, x_train=images, y_train=labels)
    params = validate(Params, tiny_params(data={"source": "npz", "path": str(path), "limit": None}))
    key = "labels" if layout == "images/labels" else "y_train"
    with pytest.raises(DataError, match=f"{path}:{key}: labels must be non-negative integers") as err:
        download.run(params.data, tmp_path / "raw", tmp_path / "cache")
    assert needle in str(err.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("labels", [np.arange(20) % 4, (np.arange(20) % 4).astype(np.float32),
                                    (np.arange(20) % 4).astype(np.uint8)], ids=["int64", "whole floats", "uint8"])
def test_npz_labels_that_are_class_indices_are_accepted(tmp_path: Path, labels: np.ndarray) -> None:
    from pipeline.data.raw import read_manifest  # noqa: PLC0415
    from pipeline.stages import download  # noqa: PLC0415

    path = tmp_path / "data.npz"
    np.savez(path, images=np.zeros((20, 28, 28), np.uint8), labels=labels)
    params = validate(Params, tiny_params(data={"source": "npz", "path": str(path), "limit": None}))
    download.run(params.data, tmp_path / "raw", tmp_path / "cache")
    manifest, _ = read_manifest(tmp_path / "raw")
    assert manifest["label"].tolist() == (np.arange(20) % 4).tolist()


EMPTY_CLASSES = {
    "empty folder": lambda d: d.mkdir(),
    "only a hidden file": lambda d: (d.mkdir(), (d / ".DS_Store").write_bytes(b"x")),
    "only a link": lambda d: (d.mkdir(), (d / "link.png").symlink_to("/etc/hostname")),
    "only empty subfolders": lambda d: (d / "a" / "b").mkdir(parents=True),
}


@pytest.mark.parametrize("case", list(EMPTY_CLASSES), ids=list(EMPTY_CLASSES))
def test_an_empty_class_folder_is_skipped_with_its_reason_not_made_a_class(tmp_path: Path, case: str) -> None:
    from pipeline.data.sources import scan_folder  # noqa: PLC0415

    photos = tmp_path / "photos"
    digit_pngs(photos, 6, classes=("cat", "dog"))
    EMPTY_CLASSES[case](photos / "bird")
    classes, found, skipped = scan_folder(photos)
    assert classes == ["cat", "dog"]
    assert sorted({f.label for f in found}) == [0, 1] and len(found) == 6
    assert {"path": "bird/", "reason": "empty_folder", "split": ""} in skipped


def test_conditional_training_refuses_a_class_without_training_images(tiny_data: Any, tmp_path: Path) -> None:
    """A class that lost every image after cleaning (or in data.limit) fails train before any step."""
    from pipeline.data.tensors import load_meta, load_split  # noqa: PLC0415
    from pipeline.io import write_json, write_split  # noqa: PLC0415
    from pipeline.stages import train  # noqa: PLC0415

    data = load_split(tiny_data.augmented, "train")
    for missing in ([3], [0, 9]):
        keep = ~np.isin(data.labels, missing)
        out = tmp_path / f"augmented-{missing}"
        out.mkdir()
        meta = dict(load_meta(tiny_data.augmented))
        meta["splits"] = {"train": write_split(out, "train", data.images[keep], data.labels[keep])}
        write_json(out / "meta.json", meta)
        params = load_params(eval_params(tmp_path / "params.yaml", {"train": {"conditional": True}}))
        names = ", ".join(repr(meta["class_names"][i]) for i in missing)
        with in_dir(tmp_path), pytest.raises(UserError, match=f"class\\(es\\) {names} of .* have no training images"):
            train.run(params, out, tiny_data.tensors, None, tmp_path / "models", tmp_path / "reports", progress=False)
        assert not (tmp_path / "models").exists()


def _tar_with(path: Path, members: dict[bytes, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(os.fsdecode(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("where", ["file in a class folder", "class folder", "flat folder", "tar member"])
def test_names_that_are_not_utf8_are_skipped_with_their_reason(tmp_path: Path, where: str) -> None:
    from pipeline.stages import clean, download  # noqa: PLC0415

    photos = tmp_path / "photos"
    good = digit_pngs(photos, 8, classes=() if where == "flat folder" else ("a", "b"))
    png = good[0].read_bytes()
    bad = b"caf\xe9.png"  # latin-1: not valid UTF-8
    if where == "file in a class folder":
        (photos / "a" / os.fsdecode(bad)).write_bytes(png)
        expect = "a/caf\\xe9.png"
    elif where == "class folder":
        (photos / os.fsdecode(b"\xff\xfe")).mkdir()
        (photos / os.fsdecode(b"\xff\xfe") / "x.png").write_bytes(png)
        expect = "\\xff\\xfe/"
    elif where == "flat folder":
        (photos / os.fsdecode(bad)).write_bytes(png)
        expect = "caf\\xe9.png"
    else:
        members = {f"digits/{p.parent.name}/{p.name}".encode(): p.read_bytes() for p in good}
        members[b"digits/a/" + bad] = png
        archive = _tar_with(tmp_path / "digits.tar", members)
        expect = "a/caf\\xe9.png"
    source = {"source": "archive", "path": str(archive)} if where == "tar member" else \
        {"source": "folder", "path": str(photos)}
    params = validate(Params, tiny_params(data={**source, "limit": None, "workers": 1}))
    with in_dir(tmp_path):
        download.run(params.data, tmp_path / "raw", tmp_path / "cache")
        clean.run(params.data, tmp_path / "raw", tmp_path / "clean", tmp_path / "clean_report.json", progress=False)
    report = json.loads((tmp_path / "clean_report.json").read_text())
    assert report["accepted"] == 8
    assert report["skipped_by_reason"] == {"name_not_utf8": 1}, report
    assert any(expect in e for e in report["examples"]["name_not_utf8"]), report["examples"]


def test_unreadable_files_and_class_folders_are_skipped_for_another_user(tmp_path: Path) -> None:
    """Run as an unprivileged user (root reads everything): a file and a class folder without read permission."""
    base = Path("/tmp") / f"unreadable-{os.getpid()}"  # not under pytest's 0700 tmp: the other user must reach it
    shutil.rmtree(base, ignore_errors=True)
    try:
        base.mkdir(mode=0o777)
        os.chmod(base, 0o777)
        photos = base / "photos"
        digit_pngs(photos, 8, classes=("a", "b"))
        secret = photos / "a" / "secret.png"
        shutil.copy(photos / "a" / "img000.png", secret)
        secret.chmod(0o000)
        (photos / "locked").mkdir()
        shutil.copy(photos / "a" / "img000.png", photos / "locked" / "x.png")
        (photos / "locked").chmod(0o000)
        for p in [photos, *photos.rglob("*")]:
            if p not in (secret, photos / "locked") and p.parent != photos / "locked":
                p.chmod(0o777 if p.is_dir() else 0o644)
        project = base / "project"
        project.mkdir(mode=0o777)
        project.chmod(0o777)
        write_params(project / "params.yaml", tiny_params(data={"source": "folder", "path": str(photos), "limit": None,
                                                                "workers": 1}))
        (project / "params.yaml").chmod(0o644)
        env = venv_env(PIPELINE_TRACKING="0", HOME=str(project))
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for stage in ("download", "clean"):
            proc = subprocess.run([*nobody, sys.executable, "-m", "pipeline", stage], cwd=project, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr
        report = json.loads((project / "reports" / "clean_report.json").read_text())
        assert report["accepted"] == 8
        assert report["skipped_by_reason"] == {"unreadable": 2}, report
        assert sorted(report["examples"]["unreadable"]) == ["a/secret.png", "locked/"]
    finally:
        for p in (base / "photos" / "locked", base / "photos" / "a" / "secret.png"):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


NO_ITEMS = {
    "only hidden files": (lambda d: [(d / f".img{i}.png").write_bytes(b"x") for i in range(3)], "3 skipped as hidden"),
    "only links": (lambda d: [(d / f"l{i}.png").symlink_to("/etc/hostname") for i in range(2)],
                   "2 skipped as symlink_not_followed"),
    "only empty class folders": (lambda d: [(d / n).mkdir() for n in ("cat", "dog")], "2 skipped as empty_folder"),
    "images beside the split folders": (lambda d: ((d / "train" / "a").mkdir(parents=True),
                                                   (d / "train" / "a" / ".x").write_bytes(b"x"),
                                                   *[(d / f"loose{i}.png").write_bytes(b"x") for i in range(4)]),
                                        "4 skipped as outside_split_folders"),
}


@pytest.mark.parametrize("case", list(NO_ITEMS), ids=list(NO_ITEMS))
def test_no_items_says_what_was_skipped_and_why(tmp_path: Path, case: str) -> None:
    from pipeline.stages import download  # noqa: PLC0415

    photos = tmp_path / "photos"
    photos.mkdir()
    make, needle = NO_ITEMS[case]
    make(photos)
    params = validate(Params, tiny_params(data={"source": "folder", "path": str(photos), "limit": None}))
    with pytest.raises(DataError, match="source 'folder' produced no items") as err:
        download.run(params.data, tmp_path / "raw", tmp_path / "cache")
    assert needle in str(err.value), str(err.value)


def test_an_empty_folder_named_like_an_image_no_longer_hides_the_images_beside_it(tmp_path: Path) -> None:
    """The red-team case: `photo.png/` (an empty folder) beside 8 images. It is skipped as an empty
    folder, so the 8 images are a flat (unlabeled) folder and are read."""
    from pipeline.data.raw import read_manifest  # noqa: PLC0415
    from pipeline.stages import download  # noqa: PLC0415

    photos = tmp_path / "photos"
    digit_pngs(photos, 8)
    (photos / "photo.png").mkdir()
    params = validate(Params, tiny_params(data={"source": "folder", "path": str(photos), "limit": None}))
    download.run(params.data, tmp_path / "raw", tmp_path / "cache")
    manifest, source = read_manifest(tmp_path / "raw")
    assert len(manifest) == 8 and (manifest["label"] == -1).all()
    assert source["provenance"]["skipped"] == [{"path": "photo.png/", "reason": "empty_folder", "split": ""}]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_too_few_images_for_a_run_fails_at_preprocess_saying_how_many_are_needed(tmp_path: Path, n: int) -> None:
    from pipeline.stages import clean, download, preprocess  # noqa: PLC0415

    photos = tmp_path / "photos"
    digit_pngs(photos, n)
    params = validate(Params, tiny_params(data={"source": "folder", "path": str(photos), "limit": None, "workers": 1}))
    with in_dir(tmp_path):
        download.run(params.data, tmp_path / "raw", tmp_path / "cache")
        clean.run(params.data, tmp_path / "raw", tmp_path / "clean", tmp_path / "clean_report.json", progress=False)
        with pytest.raises(DataError, match="a run needs at least 2 images in each of the train and test splits"):
            preprocess.run(params, tmp_path / "clean", tmp_path / "raw", tmp_path / "tensors", progress=False)
    assert not (tmp_path / "tensors").exists()


def test_enough_images_pass_preprocess(tmp_path: Path) -> None:
    """Control: 8 images of an unlabeled folder make 6 train / 2 test (test_fraction 0.2)."""
    from pipeline.stages import clean, download, preprocess  # noqa: PLC0415

    photos = tmp_path / "photos"
    digit_pngs(photos, 8)
    params = validate(Params, tiny_params(data={"source": "folder", "path": str(photos), "limit": None, "workers": 1}))
    with in_dir(tmp_path):
        download.run(params.data, tmp_path / "raw", tmp_path / "cache")
        clean.run(params.data, tmp_path / "raw", tmp_path / "clean", tmp_path / "clean_report.json", progress=False)
        out = preprocess.run(params, tmp_path / "clean", tmp_path / "raw", tmp_path / "tensors", progress=False)
    assert (out["images_train"], out["images_test"]) == (6, 2)


# ---------------------------------------------------------------------------------------------
# Rule: an evaluator is used only on tensors of its shape, and only within memory
# ---------------------------------------------------------------------------------------------


def _tensors(path: Path, shape: tuple[int, int, int], n: int = 12) -> Path:
    from pipeline.io import write_json, write_split  # noqa: PLC0415

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {s: write_split(path, s, rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 2)
              for s in ("train", "test")}
    write_json(path / "meta.json", {"splits": splits, "num_classes": 2, "class_names": ["a", "b"], "source": "test"})
    return path


@pytest.mark.parametrize("shape", [(3, 28, 28), (1, 32, 32), (3, 64, 64)], ids=["rgb", "32 px", "rgb 64 px"])
def test_evaluate_refuses_tensors_the_evaluator_was_not_trained_on(tiny_gan: Any, tmp_path: Path, shape: tuple,
                                                                   cli: Cli) -> None:
    tensors = _tensors(tmp_path / "tensors", shape)
    code, err = cli(["evaluate", "--params", str(tiny_gan.params), "--models", str(tiny_gan.models), "--tensors",
                     str(tensors), "--evaluator", str(tiny_gan.data.evaluator), "--out", str(tmp_path / "m.json"),
                     "--details", str(tmp_path / "d.json")], tmp_path)
    assert code == 2, err
    assert f"was trained on images 1x28x28, {tensors} holds {'x'.join(map(str, shape))}" in err
    assert "Traceback" not in err and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(("size", "width", "n"), [(1024, 512, 16), (512, 256, 64), (256, 512, 200)])
def test_an_evaluator_that_cannot_fit_in_memory_is_refused_with_the_figure_and_the_knob(tmp_path: Path, size: int,
                                                                                        width: int, n: int) -> None:
    """Hundreds of GiB, on any machine: refused in a moment, not killed by the kernel after swapping."""
    from pipeline.stages import evaluator  # noqa: PLC0415

    tensors = _tensors(tmp_path / "tensors", (3, size, size), n=n)
    params = validate(Params, tiny_params(evaluator={"batch_size": 256, "width": width, "epochs": 1}))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=rf"evaluator: batches of {n} images of 3x{size}x{size} need about [\d.]+ GiB of "
                                        r"memory on cpu, [\d.]+ GiB are available; "
                                        r"(lower evaluator.batch_size to \d+ or less, or )?lower preprocess.size"):
        evaluator.run(params, tensors, tmp_path / "evaluator.pt", tmp_path / "evaluator.json", progress=False)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "evaluator.pt").exists()


def test_memory_estimate_lets_the_usual_sizes_through() -> None:
    from pipeline.metrics.evaluator import available_memory, memory_needed  # noqa: PLC0415

    need = memory_needed(channels=3, height=64, width=64, net_width=32, batch_size=128, training=True)
    assert 100 << 20 < need < 2 << 30  # a real figure: about 1 GiB, not nothing, not absurd
    assert available_memory("cpu") > 0


# ---------------------------------------------------------------------------------------------
# Rule: numbers from a feature extractor that has not learned are marked where they are read
# ---------------------------------------------------------------------------------------------

REPORTS = {
    "10 classes at chance": ({"kind": "classifier", "num_classes": 10, "test_accuracy": 0.10}, True),
    "10 classes, a little over chance": ({"kind": "classifier", "num_classes": 10, "test_accuracy": 0.30}, True),
    "2 classes at chance": ({"kind": "classifier", "num_classes": 2, "test_accuracy": 0.55}, True),
    "10 classes, learned": ({"kind": "classifier", "num_classes": 10, "test_accuracy": 0.90}, False),
    "2 classes, learned": ({"kind": "classifier", "num_classes": 2, "test_accuracy": 0.80}, False),
    "autoencoder no better than the mean image": ({"kind": "autoencoder", "test_reconstruction_mse": 0.30,
                                                   "test_mean_image_mse": 0.31}, True),
    "autoencoder, learned": ({"kind": "autoencoder", "test_reconstruction_mse": 0.05, "test_mean_image_mse": 0.31},
                             False),
}


@pytest.mark.parametrize("case", list(REPORTS), ids=list(REPORTS))
def test_an_evaluator_that_has_not_learned_is_recognised(case: str) -> None:
    from pipeline.metrics.evaluator import quality_warning  # noqa: PLC0415

    report, untrusted = REPORTS[case]
    warning = quality_warning(report)
    assert (warning is not None) == untrusted, warning
    if untrusted:
        assert "has not learned" in warning and "evaluator.epochs" in warning


def test_metrics_from_an_untrained_evaluator_are_marked_in_every_place_they_are_read(
        tiny_gan: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An evaluator that did not train (lr 1e-9: its weights stay at their random start) is at chance;
    evaluator.json, metrics.json, the console and the HTML report all say so."""
    from pipeline.metrics import record  # noqa: PLC0415
    from pipeline.stages import evaluate, evaluator, report  # noqa: PLC0415


    params = load_params(eval_params(tmp_path / "params.yaml", {"evaluator": {"lr": 1e-9, "epochs": 1}}))
    data = tiny_gan.data
    with in_dir(tmp_path):
        evaluator.run(params, data.tensors, tmp_path / "evaluator.pt", tmp_path / "evaluator.json", progress=False)
        ev = json.loads((tmp_path / "evaluator.json").read_text())
        assert ev["test_accuracy"] < 0.325 and "has not learned" in ev["warning"]
        caplog.clear()
        evaluate.run(params, tiny_gan.models, data.tensors, tmp_path / "evaluator.pt", tmp_path / "metrics.json",
                     tmp_path / "details.json")
        assert "these numbers are not to be trusted" in caplog.text
        numbers = json.loads((tmp_path / "metrics.json").read_text())
        assert numbers["extractor_trusted"] == 0.0  # a number in metrics.json: `dvc metrics show` shows it
        metrics = record.read(tmp_path / "metrics.json")  # with the protocol beside it
        assert "has not learned" in metrics["extractor_warning"]
        assert metrics["protocol"]["extractor_trusted"] is False
        report.run(params, tiny_gan.models, data.tensors, tiny_gan.train_reports, tmp_path / "metrics.json",
                   tmp_path / "details.json", data.clean_report, tmp_path / "figures", tmp_path / "index.html")
    page = (tmp_path / "index.html").read_text()
    assert "id='extractor-warning'" in page and "these metrics are not to be trusted" in page
    # Control: the tiny run's own (trained) evaluator carries no mark.
    trained = record.read(tiny_gan.metrics)
    assert trained["extractor_trusted"] == 1.0
    assert trained["protocol"]["extractor_trusted"] is True and "extractor_warning" not in trained
    assert "extractor-warning" not in tiny_gan.html.read_text()


# ---------------------------------------------------------------------------------------------
# Rule: a tracking server known to be down costs one connection attempt, not one per journal
# ---------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed: connections are refused


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_mlflow_sync_against_a_refused_connection_fails_at_once_and_keeps_the_journals(tmp_path: Path,
                                                                                       scheme: str) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    uri = f"{scheme}://127.0.0.1:{_closed_port()}"
    make = ("from pipeline.tracking import StageRun\n"
            "for i in range(10):\n"
            "    with StageRun(f's{i}', params={'a': {'b': i}}, enabled=True) as run:\n"
            "        run.log_metrics({'x': 1.0}, step=1)\n")
    # Journals written during the outage (no client retries, to make them quickly).
    run([sys.executable, "-c", make], tmp_path, env=venv_env(MLFLOW_TRACKING_URI=uri, PIPELINE_TRACKING_FLUSH_S="0.5",
                                                             MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))
    journals = sorted((tmp_path / ".pipeline" / "tracking").iterdir())
    assert len(journals) == 10
    t0 = time.perf_counter()
    proc = run([sys.executable, "-m", "pipeline", "mlflow-sync", "--tracking-uri", uri], tmp_path, check=False)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 1
    assert f"cannot connect to the tracking server {uri}" in proc.stderr and "Connection refused" in proc.stderr
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # One refused connect; before, each journal waited out the client's retries (about 2.5 s each).
    assert elapsed < 15, elapsed
    assert sorted((tmp_path / ".pipeline" / "tracking").iterdir()) == journals


# ---------------------------------------------------------------------------------------------
# Rule: your own data is an input DVC watches; a change to it re-runs download, no change does not
# ---------------------------------------------------------------------------------------------


def _ran(output: str) -> list[str]:
    import re  # noqa: PLC0415

    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.mark.parametrize("source", ["folder", "npz"])
def test_dvc_repro_notices_changes_to_your_data_outside_the_project(tmp_path: Path, source: str) -> None:
    from pipeline.data.raw import read_manifest  # noqa: PLC0415

    photos = tmp_path / "my-photos"
    images = digit_pngs(photos, 8, classes=("a", "b"))
    npz = tmp_path / "digits.npz"
    np.savez(npz, images=np.zeros((8, 28, 28), np.uint8), labels=np.arange(8) % 2)
    path = photos if source == "folder" else npz
    project = make_project(tmp_path / "project", tiny_params(data={"source": source, "path": str(path), "limit": None}))
    env = venv_env(PIPELINE_TRACKING="0")

    def repro() -> tuple[list[str], int]:
        out = run(["dvc", "repro", "download"], project, env=env)
        return _ran(out.stdout), len(read_manifest(project / "data" / "raw")[0])

    assert repro() == (["inputs", "download"], 8)
    assert repro() == (["inputs"], 8)  # unchanged: download is skipped
    if source == "folder":
        changes = [("added", lambda: shutil.copy(images[0], photos / "a" / "new.png"), 9),
                   ("edited in place", lambda: images[1].write_bytes(images[2].read_bytes()), 9),
                   ("removed", lambda: images[3].unlink(), 8),
                   ("renamed", lambda: images[4].rename(photos / "b" / "renamed.png"), 8),
                   ("new class folder", lambda: shutil.copytree(photos / "a", photos / "c"), 12)]
    else:
        changes = [("rewritten larger", lambda: np.savez(npz, images=np.zeros((9, 28, 28), np.uint8),
                                                         labels=np.arange(9) % 2), 9)]
    for what, change, items in changes:
        time.sleep(0.01)  # a modification time that differs even on coarse-grained file systems
        change()
        assert repro() == (["inputs", "download"], items), what
        assert repro() == (["inputs"], items), what


FILE_OUTPUTS = [("clean", "--report"), ("evaluator", "--report"), ("inputs", "--out")]


@pytest.mark.parametrize("place", ["an existing folder", "a read-only file system", "under a file"])
@pytest.mark.parametrize(("stage", "option"), FILE_OUTPUTS, ids=[f"{s} {o}" for s, o in FILE_OUTPUTS])
def test_a_file_output_that_cannot_be_written_is_one_line(tiny_data: Any, tmp_path: Path, cli: Cli, stage: str,
                                                          option: str, place: str) -> None:

    params = eval_params(tmp_path / "params.yaml")
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "file").write_text("x")
    target = {"an existing folder": str(tmp_path / "folder.json"), "a read-only file system": "/sys/out.json",
              "under a file": str(tmp_path / "file" / "out.json")}[place]
    inputs = {"clean": ["--raw", str(tiny_data.root / "data/raw"), "--out", str(tmp_path / "clean")],
              "evaluator": ["--tensors", str(tiny_data.tensors), "--out", str(tmp_path / "ev.pt")],
              "inputs": []}[stage]
    code, err = cli([stage, "--params", str(params), *inputs, option, target], tmp_path)
    assert code == 2, err
    assert "Traceback" not in err and any(s in err for s in ("is a folder", "not a folder", "give a path you can write")), err
    assert (tmp_path / "folder.json").is_dir() and (tmp_path / "file").read_text() == "x"


def test_a_data_path_you_may_not_read_is_one_line(tmp_path: Path) -> None:
    """As an unprivileged user: data.path itself without read permission fails download in one line."""
    base = Path("/tmp") / f"unreadable-root-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    try:
        base.mkdir(mode=0o777)
        base.chmod(0o777)
        photos = base / "photos"
        digit_pngs(photos, 8)
        photos.chmod(0o700)  # root's: the other user may not list it
        project = base / "project"
        project.mkdir(mode=0o777)
        project.chmod(0o777)
        write_params(project / "params.yaml", tiny_params(data={"source": "folder", "path": str(photos), "limit": None}))
        (project / "params.yaml").chmod(0o644)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                               "pipeline", "download"], cwd=project, env=venv_env(PIPELINE_TRACKING="0",
                                                                                   HOME=str(project)),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"data.path: {photos} cannot be read (permissions)" in proc.stderr and "Traceback" not in proc.stderr
        assert not (project / "data" / "raw").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
