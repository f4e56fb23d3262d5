"""dvc.yaml's code deps are each stage's static import closure (every branch), checked by a command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import deps

from helpers_project import ROOT, run, venv_env

STAGES = ["inputs", "download", "clean", "preprocess", "augment", "evaluator", "train", "evaluate", "report"]


def _copy_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel == "dvc.yaml" or rel.startswith("pipeline/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for src in (ROOT / "pipeline").rglob("*.py"):  # new modules not yet known to git
        if not (dest / src.relative_to(ROOT)).exists():
            (dest / src.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.relative_to(ROOT))
    return dest


def _deps_cmd(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pipeline", "deps", "--root", str(root), *args], ROOT, env=venv_env(),
               check=check)


def test_the_projects_dvc_yaml_passes_the_check() -> None:
    out = _deps_cmd(ROOT, "--check")
    assert "every stage lists exactly the pipeline modules it can import" in out.stdout
    assert sorted(deps.stages(ROOT)) == sorted(STAGES)


def test_a_module_imported_only_in_an_untaken_branch_is_a_dep_and_write_fixes_dvc_yaml(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    before = (root / "dvc.yaml").read_text()
    assert "pipeline/metrics/selfcheck.py" not in yaml.safe_load(before)["stages"]["download"]["deps"]
    # A function-local import in a branch no default run takes.
    with open(root / "pipeline/stages/download.py", "a") as fh:
        fh.write("\n\ndef _rarely(flag: bool) -> None:\n    if flag:\n        from ..metrics import selfcheck  # noqa\n")
    bad = _deps_cmd(root, "--check", check=False)
    assert bad.returncode == 1
    assert "download: imports pipeline/metrics/selfcheck.py but dvc.yaml does not list it as a dep" in bad.stderr
    assert "pipeline/metrics/math.py" in bad.stderr  # and what selfcheck imports in turn
    assert "clean:" not in bad.stderr  # other stages are not affected

    _deps_cmd(root, "--write")
    after = (root / "dvc.yaml").read_text()
    assert _deps_cmd(root, "--check").returncode == 0
    download = yaml.safe_load(after)["stages"]["download"]["deps"]
    assert "pipeline/metrics/selfcheck.py" in download and "pipeline/metrics/__init__.py" in download
    # Only code-dep lines changed: comments, data deps, params and outs are as they were.
    removed = [ln for ln in before.splitlines() if ln not in after.splitlines()]
    assert removed == []
    added = [ln for ln in after.splitlines() if ln not in before.splitlines()]
    assert added and all(ln.strip().startswith("- pipeline/") for ln in added)

    # A module no longer imported is stale: reported, then removed by --write.
    (root / "pipeline/stages/download.py").write_text((ROOT / "pipeline/stages/download.py").read_text())
    stale = _deps_cmd(root, "--check", check=False)
    assert "download: lists pipeline/metrics/selfcheck.py as a dep but never imports it" in stale.stderr
    _deps_cmd(root, "--write")
    assert (root / "dvc.yaml").read_text() == before


def test_relative_submodule_imports_and_parent_packages_are_followed(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    (root / "pipeline/extra").mkdir()
    (root / "pipeline/extra/__init__.py").write_text("")
    (root / "pipeline/extra/leaf.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                 "    from ..report import html  # noqa\n")
    with open(root / "pipeline/stages/clean.py", "a") as fh:
        fh.write("\ntry:\n    from ..extra import leaf  # noqa\nexcept ImportError:\n    pass\n")
    closure = deps.closure(root, "clean")
    for rel in ("pipeline/extra/__init__.py", "pipeline/extra/leaf.py", "pipeline/report/__init__.py",
                "pipeline/report/html.py"):
        assert rel in closure, rel
    # __main__'s own commands (sample, metrics-check, ...) are not part of a stage.
    assert "pipeline/metrics/selfcheck.py" not in deps.closure(ROOT, "clean")


@pytest.mark.parametrize("stage", ["download", "train", "evaluate", "report"])
def test_the_static_closure_covers_what_the_stage_command_really_imports(stage: str) -> None:
    """Building the stage's CLI imports its module and everything at module level: a subset of the closure."""
    code = ("import json, sys\nfrom pipeline.__main__ import build_parser\nbuild_parser(sys.argv[1])\n"
            "print(json.dumps(sorted({m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] == 'pipeline' and getattr(m, '__file__', None)})))")
    out = run([sys.executable, "-c", code, stage], ROOT, env=venv_env())
    imported = {str(Path(p).resolve().relative_to(ROOT)) for p in json.loads(out.stdout)}
    assert imported and imported <= set(deps.closure(ROOT, stage)), imported - set(deps.closure(ROOT, stage))
