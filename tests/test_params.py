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
