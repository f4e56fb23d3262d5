"""Faults: kill -9 mid-checkpoint, a stage killed under dvc repro, a file-size limit, a corrupt tensor file.

Each test breaks a real process of a real project (a copy of the session's built project) the way
the world does, then checks the guarantee from the README's "Guarantees under failure".
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_team import (VENV_BIN, assert_cache_sound, dvc, kill_group, pipeline, set_params, tool_env,
                      wait_for)
from pipeline.data.tensors import load_split
from pipeline.errors import CheckpointError
from pipeline.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def _open_files(pid: int) -> set[str]:
    """Paths the process has open right now (from /proc)."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def test_kill_9_during_checkpoint_write_keeps_the_previous_checkpoint_and_resume_finishes(project: Path) -> None:
    # A wide model makes every checkpoint ~90 MB (weights, Adam moments, EMA), so writing it takes
    # long enough to be caught in the act; a checkpoint after every step.
    set_params(project, {"train": {"ngf": 256, "ndf": 256, "batch_size": 8, "steps": 4, "checkpoint_every": 1,
                                   "log_every": 1, "grid_every": 100, "eval_every": 100}})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train"], cwd=project, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def first_checkpoint() -> Path | None:
            for d in (project / ".pipeline" / "train").glob("*"):
                if (d / "checkpoint.pt").exists():
                    return d
            return None

        workdir = wait_for(first_checkpoint, 240, "the first checkpoint")

        def writing() -> str | None:
            # The next checkpoint's temporary file, open for writing by the trainer right now.
            open_now = _open_files(proc.pid)
            return next((f for f in open_now if Path(f).parent == workdir and Path(f).name.startswith(".checkpoint.pt.")
                         and f.endswith(".tmp")), None)

        tmp = wait_for(writing, 240, "a checkpoint write in progress", interval=0.001)
        kill_group(proc, signal.SIGKILL)
    finally:
        kill_group(proc, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert Path(tmp).exists(), "the kill landed after the rename; the test did not catch a write in progress"

    # The previous checkpoint is intact and loads; the half-written one never took its name.
    ckpt = load_checkpoint(workdir / "checkpoint.pt")
    assert 1 <= ckpt["step"] < 4
    with pytest.raises(CheckpointError):
        load_checkpoint(Path(tmp))  # control: the interrupted file is not a loadable checkpoint

    resumed = pipeline("train", cwd=project, timeout=400)
    assert f"resumed from {workdir / 'checkpoint.pt'} at step {ckpt['step']}" in resumed.stderr
    summary = json.loads((project / "reports" / "train" / "summary.json").read_text())
    assert summary["steps"] == 4 and "resumed" not in summary  # the published files do not say how they were made
    assert load_checkpoint(workdir / "checkpoint.pt")["step"] == 4
    assert not Path(tmp).exists(), "the killed writer's temporary file was not cleaned up"


def test_stage_killed_midway_leaves_no_partial_output_and_repro_redoes_it(project: Path) -> None:
    # A bigger output (256 x 256 images in 1 MiB shards) keeps preprocess writing for a while.
    set_params(project, {"preprocess": {"size": 256, "shard_mb": 1}})
    old_meta = (project / "data" / "tensors" / "meta.json").read_text()
    proc = subprocess.Popen([VENV_BIN / "dvc", "repro", "preprocess"], cwd=project, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def staged_shard() -> list[Path]:
            return [p for p in (project / "data").glob(".tensors.*.tmp/train_*.npy")]

        wait_for(staged_shard, 240, "preprocess writing its shards", interval=0.002)
        kill_group(proc, signal.SIGKILL)  # dvc and the stage, as a lost machine would
    finally:
        kill_group(proc, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert "Updating lock file" not in out
    leftovers = list((project / "data").glob(".tensors.*.tmp"))
    assert leftovers, "the kill landed after preprocess finished; nothing was caught midway"

    # Under the final name: nothing (DVC removes a stage's outputs before running it), or else the
    # previous complete output, every file matching its recorded hash; never a half-written one.
    final = project / "data" / "tensors"
    if final.exists():
        assert (final / "meta.json").read_text() == old_meta
        assert load_split(final, "train").images.shape[2:] == (28, 28)
        assert load_split(final, "test").images.shape[2:] == (28, 28)

    redo = dvc("repro", "preprocess", cwd=project, timeout=400)
    assert "Running stage 'preprocess'" in redo.stdout
    assert not list((project / "data").glob(".tensors.*.tmp")), "the killed run's temporary folder is still there"
    new = load_split(project / "data" / "tensors", "train")  # verifies every shard's sha256
    assert new.images.shape[1:] == (1, 256, 256)
    status = dvc("status", "preprocess", cwd=project)
    assert "up to date" in status.stdout, status.stdout
    assert_cache_sound(project / ".dvc" / "cache")


def _limit_file_size(limit: int) -> None:
    # Only the limit: the pipeline itself must turn SIGXFSZ into a readable error.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_while_writing_tensors_is_a_clear_error_and_leaves_no_output(project: Path) -> None:
    limit = 64 * 1024  # the train split is 160 x 28 x 28 = 125 KB: its shard cannot fit
    out_dir = project / "data" / "tensors_limited"
    proc = pipeline("preprocess", "--out", str(out_dir.relative_to(project)), cwd=project, check=False,
                    preexec_fn=lambda: _limit_file_size(limit))
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err
    assert f"writing {Path('data/tensors_limited/train_000.npy')}: file too large" in err, err[-2000:]
    assert f"RLIMIT_FSIZE, `ulimit -f`) is {limit} bytes" in err
    assert "preprocess.shard_mb" in err
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(".tensors_limited.*")), "a temporary folder was left behind"

    # Control: the same command without the limit writes the output.
    pipeline("preprocess", "--out", str(out_dir.relative_to(project)), cwd=project)
    assert load_split(out_dir, "train").images.shape[0] > 0


def test_corrupted_cached_tensor_is_detected_by_its_hash_before_training(project: Path) -> None:
    shard = project / "data" / "augmented" / "train_000.npy"
    # The workspace copy is a file of its own (cache.type default: reflink or copy), so flipping a
    # byte here corrupts the workspace and not the DVC cache; with hardlink/symlink cache types it
    # would be the cache itself (DVC marks those read-only for that reason).
    assert not shard.is_symlink() and shard.stat().st_nlink == 1
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # a pixel in the middle: still a valid .npy, only the hash knows
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    assert not (project / ".pipeline" / "train").exists()

    proc = pipeline("train", cwd=project, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data/augmented/train_000.npy: content hash" in proc.stderr
    assert "does not match the recorded" in proc.stderr and "dvc checkout" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Nothing was trained on it: no work directory, no step logged.
    assert not (project / ".pipeline" / "train").exists()
    assert "train:" not in proc.stderr

    # DVC sees the change too, and `dvc checkout` restores the recorded bytes.
    assert "modified" in dvc("status", "augment", cwd=project).stdout
    dvc("checkout", "--force", "data/augmented", cwd=project)
    assert load_split(project / "data" / "augmented", "train").images.shape[0] > 0


def test_two_trainings_of_one_config_at_once_do_not_share_a_checkpoint(project: Path) -> None:
    """A steps sweep run in parallel (`dvc queue start -j 2`): same config key, two processes."""
    import yaml  # noqa: PLC0415

    base = yaml.safe_load((project / "params.yaml").read_text())
    for name, steps in (("a", 30), ("b", 40)):
        params = {**base, "train": {**base["train"], "steps": steps, "log_every": 5}}
        (project / f"params_{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    procs = {name: subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--params", f"params_{name}.yaml",
                                     "--models", f"models_{name}", "--reports", f"reports/train_{name}"],
                                    cwd=project, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True) for name in ("a", "b")}
    errs = {}
    try:
        for name, proc in procs.items():
            errs[name] = proc.communicate(timeout=400)[1].decode(errors="replace")
    finally:
        for proc in procs.values():
            kill_group(proc)
    for name, steps in (("a", 30), ("b", 40)):
        assert procs[name].returncode == 0, errs[name][-3000:]
        log = [json.loads(x) for x in (project / "reports" / f"train_{name}" / "log.jsonl").read_text().splitlines()]
        loss_steps = [r["step"] for r in log if "loss_d" in r]
        assert loss_steps == list(range(5, steps + 1, 5)), (name, loss_steps)
        summary = json.loads((project / "reports" / f"train_{name}" / "summary.json").read_text())
        assert summary["steps"] == steps
        assert load_checkpoint(project / f"models_{name}" / "checkpoint.pt")["step"] == steps
    assert sum("another training run of the same config" in e for e in errs.values()) == 1, errs
    # The shared directory holds one run's state; the private one is gone after publishing.
    assert len([d for d in (project / ".pipeline" / "train").iterdir() if d.is_dir()]) == 1


def test_a_zombie_writer_counts_as_gone() -> None:
    """A killed stage whose parent (dvc) was killed with it lingers as a zombie until init reaps it;
    its temporary output must still be cleaned up on the next run."""
    from pipeline.io import pid_alive

    child = subprocess.Popen(["true"])
    try:
        wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 30,
                 "the child to exit (unreaped)")
        assert not pid_alive(child.pid)
        assert pid_alive(os.getpid())
    finally:
        child.wait()
    assert not pid_alive(child.pid)
