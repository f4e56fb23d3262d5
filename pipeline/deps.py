"""Code dependencies of each DVC stage, derived statically from the stage's import closure.

DVC re-runs a stage only when one of its declared deps changed, so every module a stage may
import has to be listed under its ``deps`` in dvc.yaml. Tracing one run is not enough: a branch
that run never takes (another data source, Inception weights, the VAE) imports modules it never
saw. This module reads the source instead and follows *every* import statement, at module level
or inside a function, in any branch (``if``/``try``/``TYPE_CHECKING``), relative or absolute:

* a stage ``S`` runs as ``python -m pipeline S``, so its roots are ``pipeline/__main__.py`` and
  ``pipeline/stages/S.py`` (which ``__main__`` imports by name). Of ``__main__`` only the
  module-level imports count: its other functions are the ``sample``/``params``/... commands,
  which a stage never runs;
* importing ``pipeline.a.b`` also runs ``pipeline/__init__.py`` and ``pipeline/a/__init__.py``,
  so those are deps too;
* ``from .pkg import name`` depends on ``pkg/name.py`` when that file exists (a submodule), else
  on ``pkg/__init__.py`` only.

``python -m pipeline deps --check`` compares the result with dvc.yaml (exit 1 on a difference,
naming each missing or stale file); ``--write`` rewrites the ``pipeline/`` entries of each
stage's deps in place, keeping every other line of dvc.yaml (data deps, comments) as it is.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

PACKAGE = "pipeline"


def _module_file(root: Path, module: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py (relative to root), or None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(root)
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(root)
    return None


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(root: Path, rel: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute names of the pipeline modules that ``rel`` imports, in any branch."""
    tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=str(rel))
    this = _module_name(rel)
    package = this if rel.name == "__init__.py" else this.rpartition(".")[0]
    if top_level_only:  # module level, including inside if/try blocks at module level
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                if node.level > 1:
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            out.add(base)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if _module_file(root, sub) is not None:
                    out.add(sub)
    return out


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(root: Path, stage: str) -> list[str]:
    """Sorted project-relative paths of every pipeline module ``python -m pipeline <stage>`` may import."""
    root = Path(root)
    main = Path(PACKAGE, "__main__.py")
    todo = [f"{PACKAGE}.stages.{stage}"] + sorted(_imported_modules(root, main, top_level_only=True))
    seen: set[Path] = {main}
    done: set[str] = set()
    while todo:
        module = todo.pop()
        for name in _with_parents(module):
            if name in done:
                continue
            done.add(name)
            rel = _module_file(root, name)
            if rel is None:
                continue
            seen.add(rel)
            todo.extend(_imported_modules(root, rel))
    return sorted(str(p) for p in seen)


def _code_dep(entry: str) -> bool:
    return entry.startswith(f"{PACKAGE}/") and entry.endswith(".py")


def stages(root: Path) -> dict[str, list[str]]:
    """Each stage of dvc.yaml whose command is ``python -m pipeline <stage>``, with its deps as written."""
    spec = yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8"))
    out = {}
    for name, st in (spec.get("stages") or {}).items():
        m = re.match(rf"python -m {PACKAGE} ([\w-]+)", str(st.get("cmd", "")))
        if m:
            out[m.group(1)] = [next(iter(d)) if isinstance(d, dict) else str(d) for d in st.get("deps") or []]
    return out


def check(root: Path) -> list[str]:
    """One line per difference between dvc.yaml's code deps and the import closures (empty: all good)."""
    problems = []
    for stage, deps in stages(root).items():
        want = set(closure(root, stage))
        have = {d for d in deps if _code_dep(d)}
        for path in sorted(want - have):
            problems.append(f"{stage}: imports {path} but dvc.yaml does not list it as a dep")
        for path in sorted(have - want):
            problems.append(f"{stage}: lists {path} as a dep but never imports it")
    return problems


def write(root: Path) -> bool:
    """Rewrite the ``pipeline/*.py`` deps of each stage in dvc.yaml; return whether anything changed.

    The edit is textual: within each stage's ``deps:`` list, the code entries are replaced by the
    sorted closure (placed where the first code entry was, or after the last entry), and every
    other line stays as written.
    """
    path = Path(root) / "dvc.yaml"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    closures = {stage: closure(root, stage) for stage in stages(root)}
    out: list[str] = []
    stage: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  ([\w-]+):\s*$", line)
        if m:
            stage = m.group(1)
        elif re.match(r"^\S", line):
            stage = None
        dm = re.match(r"^(\s+)deps:\s*$", line)
        if not (dm and stage in closures):
            out.append(line)
            i += 1
            continue
        out.append(line)
        i += 1
        block: list[str] = []
        item_indent = None
        while i < len(lines):
            im = re.match(r"^(\s+)- (.*?)\s*$", lines[i])
            if not im or len(im.group(1)) <= len(dm.group(1)):
                break
            item_indent = im.group(1)
            block.append(lines[i])
            i += 1
        item_indent = item_indent or dm.group(1) + "  "
        kept: list[str] = []
        insert_at = None
        for entry in block:
            value = re.match(r"^\s+- (.*?)\s*$", entry).group(1)  # type: ignore[union-attr]
            if _code_dep(value):
                if insert_at is None:
                    insert_at = len(kept)
                continue
            kept.append(entry)
        code = [f"{item_indent}- {p}\n" for p in closures[stage]]
        if insert_at is None:
            insert_at = len(kept)
        out.extend(kept[:insert_at] + code + kept[insert_at:])
    new = "".join(out)
    if new == path.read_text(encoding="utf-8"):
        return False
    path.write_text(new, encoding="utf-8")
    return True
