"""The benchmark scripts' shared helpers (benchmarks/common.py) that guard their results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
