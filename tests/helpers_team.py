"""Helpers (and fixtures, re-exported by conftest.py) for the team-use and failure tests: a real project built once with a tiny config.

Tests of team use and failure run the real thing (``dvc``, ``python -m pipeline``, ``mlflow
server``, ``sshd``) in subprocesses against a copy of this repository. Building the project costs
one ``dvc repro`` of every stage (about a minute on two cores), so it happens once per session
(:func:`built_project`); tests copy it (:func:`copy_project`) and change what they need.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The interpreter running the tests is the project's venv; its bin/ also holds dvc and mlflow.
VENV_BIN = Path(sys.executable).parent

# Small enough that a full `dvc repro` takes about a minute on two CPU cores.
TINY: dict[str, dict[str, Any]] = {
    "data": {"limit": 200, "workers": 1},
    "evaluator": {"epochs": 1},
    "train": {"steps": 20, "batch_size": 32, "log_every": 5, "checkpoint_every": 10, "grid_every": 10,
              "eval_every": 10, "eval_samples": 100, "num_threads": 1},
    "evaluate": {"n_samples": 100, "bootstrap": 2, "kid_subsets": 2},
    "report": {"grid_n": 16, "neighbours": 2},
}


def tool_env(**extra: str | None) -> dict[str, str]:
    """The environment for dvc, mlflow and stage subprocesses.

    The venv's bin/ comes first, so that dvc's ``python -m pipeline`` finds the venv's python.
    Tracking is off unless a test turns it on (it is orthogonal to most faults, and slow), and no
    tracking URI leaks in from the caller. ``extra`` values of None remove a variable.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PIPELINE_", "DVC_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PIPELINE_TRACKING="0",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="pipeline tests", GIT_AUTHOR_EMAIL="tests@example.invalid",
        GIT_COMMITTER_NAME="pipeline tests", GIT_COMMITTER_EMAIL="tests@example.invalid",
        PYTHONUNBUFFERED="1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # the server's job runner: 7 idle processes
    )
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(cmd: list[str | os.PathLike], cwd: Path, *, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, and fail with that output when ``check`` and it fails."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=dict(env or tool_env()), capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def dvc(*args: str, cwd: Path, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run([VENV_BIN / "dvc", *args], cwd, env=env, check=check, timeout=timeout)


def pipeline(*args: str, cwd: Path, env: Mapping[str, str] | None = None, check: bool = True,
             timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pipeline", *args], cwd, env=env, check=check, timeout=timeout, **kwargs)


def git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run(["git", *args], cwd)


def set_params(project: Path, changes: Mapping[str, Mapping[str, Any]]) -> None:
    """Update params.yaml section by section (comments are not kept: tests only)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path) -> Path:
    """A fresh git repository holding this repository's files (as in the working tree) and TINY params."""
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file() or rel.startswith("tests/"):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    set_params(dest, TINY)
    git("init", "-q", "-b", "main", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", "project under test", cwd=dest)
    return dest


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after a full ``dvc repro`` with TINY params, committed (lock file included)."""
    project = make_project(tmp_path_factory.mktemp("built") / "project")
    dvc("repro", cwd=project, timeout=600)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", "dvc repro", cwd=project)
    return project


def copy_project(built: Path, dest: Path) -> Path:
    """A private copy of a built project (git history, workspace, DVC cache).

    Without its run journals and training work directories: a test's train stage trains (instead
    of resuming the finished run of the same config) and its journals are its own.
    """
    shutil.copytree(built, dest, symlinks=True)
    for private in ("tracking", "train"):
        shutil.rmtree(dest / ".pipeline" / private, ignore_errors=True)
    return dest


@pytest.fixture()
def project(built_project: Path, tmp_path: Path) -> Path:
    return copy_project(built_project, tmp_path / "project")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def md5_file(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - DVC names cache objects by md5
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_objects(cache_dir: Path) -> list[Path]:
    """Every object file of a DVC 3 cache or directory remote (files/md5/xx/yyyy...)."""
    base = cache_dir / "files" / "md5"
    return sorted(p for p in base.rglob("*") if p.is_file() and len(p.parent.name) == 2)


def assert_cache_sound(cache_dir: Path) -> int:
    """Re-hash every cache object against its name (DVC names objects by content)."""
    objects = cache_objects(cache_dir)
    assert objects, f"no objects in {cache_dir}"
    bad = []
    for obj in objects:
        expected = obj.parent.name + obj.name.removesuffix(".dir")
        if md5_file(obj) != expected:
            bad.append(str(obj))
    assert not bad, f"cache objects whose content does not match their name: {bad}"
    return len(objects)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the process group this test started (with start_new_session=True)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend and an artifact root.

    Started in its own session so that stop() ends it and every worker it forked; restartable on
    the same store (the outage test stops it mid-training and brings it back).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "mlflow.db"
        self.artifacts = root / "artifacts"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [VENV_BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.artifacts),
             "--workers", "1"],
            cwd=self.root, env=tool_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(self.healthy, timeout, f"mlflow server on {self.uri} (log: {self.root / 'server.log'})", 0.2)

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"mlflow server exited {self.proc.returncode}: {(self.root / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        kill_group(self.proc, signal.SIGKILL)  # an outage, not a polite shutdown
        self.proc.wait(timeout=30)
        self.proc = None

    def client(self) -> Any:
        import mlflow  # noqa: PLC0415

        return mlflow.MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()
