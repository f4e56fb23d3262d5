"""params.yaml: the typed schema rejects bad input before any work, naming the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.params import Params, load_params, to_dict, validate

from helpers_project import ROOT, venv_env


def test_params_yaml_matches_schema_defaults_and_every_key_is_commented() -> None:
    text = (ROOT / "params.yaml").read_text()
    loaded = load_params(ROOT / "params.yaml")
    assert to_dict(loaded) == to_dict(Params()), "params.yaml values must equal the schema defaults"
    raw = yaml.safe_load(text)
    for section in dataclasses.fields(Params):
        assert section.name in raw, f"section {section.name} missing from params.yaml"
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            line = next((ln for ln in text.splitlines() if re.match(rf"\s+{f.name}:", ln)), None)
            assert line is not None, f"{section.name}.{f.name} missing from params.yaml"
            assert "#" in line and line.split("#", 1)[1].strip(), f"{section.name}.{f.name} has no comment"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"train": {"stpes": 10}}, "train.stpes: unknown key (did you mean 'steps'?)"),
        ({"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
        ({"train": {"steps": "many"}}, "train.steps: 'many' is not allowed; expected an integer"),
        ({"train": {"steps": 0}}, "train.steps: 0 is not allowed; it must be >= 1"),
        ({"train": {"batch_size": True}}, "train.batch_size: True is not allowed"),
        ({"preprocess": {"size": -28}}, "preprocess.size: -28 is not allowed; it must be >= 8"),
        ({"train": {"model": "stylegan9"}}, "train.model: 'stylegan9' is not allowed; expected one of 'dcgan'"),
        ({"train": {"lr_g": "fast"}}, "train.lr_g: 'fast' is not allowed; expected a number"),
        ({"train": {"diffaug": ["color", "zoom"]}}, "train.diffaug[1]: 'zoom' is not allowed"),
        ({"data": {"background": [0, 0]}}, "data.background"),
        ({"data": {"source": "folder"}}, "data.path: source 'folder' needs a path"),
        ({"base": {"device": "tpu"}}, "base.device: 'tpu' is not allowed"),
        ({"augment": {"ops": [{"name": "HorizontalFlip", "prob": 1}]}}, "augment.ops[0].prob: unknown key"),
        ({"train": {"devices": 0}}, "train.devices"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(raw: object, needle: str) -> None:
    with pytest.raises(ParamsError) as err:
        validate(Params, raw)
    assert needle in str(err.value)


def test_ints_widen_to_floats_and_nulls_take_recipe_defaults() -> None:
    p = validate(Params, {"train": {"lr_g": 1, "loss": None, "devices": "all"}})
    assert p.train.lr_g == 1.0 and isinstance(p.train.lr_g, float)
    assert p.train.loss is None and p.train.devices == "all"


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_a_stage_refuses_bad_params_before_any_work(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["limit"] = -5
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    out = tmp_path / "raw"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "download", "--params", str(bad), "--out", str(out),
                           "--cache", str(tmp_path / "cache")], cwd=tmp_path, env=venv_env(PIPELINE_TRACKING="0"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "data.limit: -5 is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_params_command_lists_and_checks(tmp_path: Path) -> None:
    listing = subprocess.run([sys.executable, "-m", "pipeline", "params"], cwd=ROOT, env=venv_env(),
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    assert "train:" in listing.stdout and "ema_decay" in listing.stdout and "EMA of generator weights" in listing.stdout
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  ema_decay: 1.5\n")
    check = subprocess.run([sys.executable, "-m", "pipeline", "params", "--check", "--params", str(bad)], cwd=ROOT,
                           env=venv_env(), capture_output=True, text=True, timeout=120)
    assert check.returncode == 2 and "train.ema_decay: 1.5 is not allowed; it must be < 1" in check.stderr


def test_params_listing_is_yaml_that_loads_back_as_the_defaults() -> None:
    listing = subprocess.run([sys.executable, "-m", "pipeline", "params"], cwd=ROOT, env=venv_env(),
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    assert "init_from: null  #" in listing.stdout and "deterministic: true  #" in listing.stdout
    assert "None" not in listing.stdout.replace("none", "") and "True" not in listing.stdout
    assert validate(Params, yaml.safe_load(listing.stdout)) == Params()


@pytest.mark.parametrize("text", ["None", "null", "NULL", "~", "none", " "])
def test_null_like_strings_are_refused_where_a_path_or_null_is_meant(text: str, tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"train": {"init_from": text}, "data": {"path": text}}))
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert f"train.init_from: {text!r} is a string, not null" in str(err.value)
    assert f"data.path: {text!r} is a string, not null" in str(err.value)
    # Unquoted None in YAML is that same string; null (or ~) unquoted is a real null.
    bad.write_text("train:\n  init_from: None\n")
    with pytest.raises(ParamsError, match="train.init_from: 'None' is a string, not null; write null"):
        load_params(bad)
    bad.write_text("train:\n  init_from: null\ndata:\n  path: ~\n")
    assert load_params(bad).train.init_from is None


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  stpes: 3\n  steps: 0\n  init_from: None\ndata:\n  limit: -1\n"
                   "augment:\n  ops:\n    - {name: HorizontalFlip, prob: 1}\n")
    check = subprocess.run([sys.executable, "-m", "pipeline", "params", "--check", "--params", str(bad)], cwd=ROOT,
                           env=venv_env(), capture_output=True, text=True, timeout=120)
    assert check.returncode == 2 and "5 problems:" in check.stderr, check.stderr
    for needle in ("train.stpes: unknown key (did you mean 'steps'?)", "train.steps: 0 is not allowed",
                   "train.init_from: 'None' is a string", "data.limit: -1 is not allowed",
                   "augment.ops[0].prob: unknown key"):
        assert needle in check.stderr, needle


@pytest.mark.parametrize("command", ["download", "clean", "preprocess", "augment", "evaluator", "train", "evaluate",
                                     "report", "sample", "params", "metrics-check", "mlflow-sync", "deps"])
def test_help_texts_are_plain_and_every_option_is_explained(command: str) -> None:
    from pipeline.__main__ import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    p = sub.choices[command]
    text = p.format_help()
    assert "``" not in text and ":func:" not in text, text
    assert "(default: None)" not in text
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help"
        if action.required:
            assert "(default:" not in (p.formatter_class(prog="x")._get_help_string(action) or "")


RECIPE_FILES = sorted((ROOT / "benchmarks" / "recipes").glob("*.yaml"))


def _recipe_params(over: dict) -> Params:
    """params.yaml with a recipe file's sections laid over it, validated as `dvc exp run -S` would
    set them; the train block also resolves against its data's image shape (10 classes)."""
    from pipeline.training.config import resolve

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(over) <= set(base), f"sections params.yaml lacks: {sorted(set(over) - set(base))}"
    params = validate(Params, {s: {**base[s], **over.get(s, {})} for s in base})
    size = params.preprocess.size
    resolve(params.train, seed=0, image_shape=(1, size, size), num_classes=10)
    return params


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_benchmark_recipe_files_are_valid_params(path: Path) -> None:
    """A mistyped key or value in a recipe fails here, on the CPU, rather than on the GPU machine."""
    over = yaml.safe_load(path.read_text())
    params = _recipe_params(over)
    assert params.train.model == over["train"]["model"]
    assert dataclasses.asdict(params.train).items() >= over["train"].items()  # every value taken as written


def test_a_mistyped_recipe_value_is_refused() -> None:
    over = yaml.safe_load((ROOT / "benchmarks/recipes/fmnist-biggan.yaml").read_text())
    over["train"]["loss"] = "nonsaturting"
    with pytest.raises(ParamsError, match="train.loss"):
        _recipe_params(over)
    over["train"].update(loss="nonsaturating", r1_gama=1.0)
    with pytest.raises(ParamsError, match="r1_gama.*did you mean 'r1_gamma'"):
        _recipe_params(over)
