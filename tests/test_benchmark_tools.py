"""The benchmark scripts' shared helpers (benchmarks/common.py) that guard their results, and the
GPU tests' first-run check, on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    whose first run ends apart on an H100), trained three times in one CPU process: every run equals
    the first after every step. The script also refuses CUDA-graph runs without a GPU, naming --order."""
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
    stray = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--warm-steps", "2"],
                           capture_output=True, text=True, timeout=600)
    assert stray.returncode != 0 and "--warm-steps 2" in stray.stderr and "--warm-run FAMILY" in stray.stderr
    bad = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--order", "EG"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--order 'EG'" in bad.stderr and "CUDA only" in bad.stderr
