"""Helpers for tests that build projects: tiny configurations, subprocess runs, throw-away copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# A configuration small enough that the whole pipeline runs in well under a minute on 2 cores,
# yet every stage does its real work (real MNIST digits, real training steps, every metric).
TINY: dict[str, dict[str, Any]] = {
    "data": {"limit": 80},
    "evaluator": {"epochs": 1, "batch_size": 16, "width": 8, "feature_dim": 16},
    "train": {"steps": 6, "batch_size": 8, "ngf": 8, "ndf": 8, "nz": 8, "log_every": 2, "grid_every": 3,
              "eval_every": 3, "checkpoint_every": 3, "eval_samples": 20},
    "evaluate": {"n_samples": 40, "batch_size": 20, "kid_subsets": 2, "bootstrap": 2},
    "report": {"grid_n": 16, "interpolation_steps": 4, "neighbours": 4},
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """The project's params.yaml with the TINY overrides (and any given) applied."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return merge(merge(params, TINY), sections)


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def venv_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first (dvc runs `python -m pipeline`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@example.com", DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, *, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env or venv_env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\nstdout:\n{out.stdout[-4000:]}\n"
                             f"stderr:\n{out.stderr[-8000:]}")
    return out


def make_project(dest: Path, params: dict[str, Any]) -> Path:
    """A fresh git+DVC project holding this checkout's code and the given params (nothing run yet)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dest.mkdir(parents=True, exist_ok=True)
    for rel in files:
        if rel == "dvc.lock" or rel.startswith(("reports/", "tests/")):
            continue
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree but not yet committed
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    # Files of the working tree that git does not know yet (new modules during development).
    for src in (ROOT / "pipeline").rglob("*.py"):
        target = dest / src.relative_to(ROOT)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    (dest / "reports").mkdir(exist_ok=True)
    write_params(dest / "params.yaml", params)
    env = venv_env()
    run(["git", "init", "-q", "-b", "main"], dest, env=env)
    run(["git", "add", "-A"], dest, env=env)
    run(["git", "commit", "-q", "-m", "project"], dest, env=env)
    return dest
