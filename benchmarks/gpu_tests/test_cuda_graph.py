"""The CUDA-graph executor against the eager one, on a GPU (not part of the CPU suite; run on a
CUDA machine with ``python -m pytest benchmarks/gpu_tests -q``).

For every family the same seeded run is trained eagerly, replayed from CUDA graphs, and eagerly
again, for enough steps that every variant (plain, lazy R1, with gradient norms) is captured and
replayed; the replayed run's parameters, EMA and logged means must agree with the eager run after
it. The first eager run only shows whether the first run of the process ended apart (a test of its
own checks that in a fresh process). cuDNN is
asked for deterministic algorithms (no atomics in fp32 weight gradients), so the comparison is of
the executors alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import FAMILIES, run, weights  # noqa: E402

if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu_tests need a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_replay_trains_as_eager_does(family: str, precision: str, tmp_path: Path) -> None:
    # The first run of a process once ended apart from every later run, eager or replayed alike
    # (StyleGAN2 with lazy R1 and path length in one step, backward passes on autograd's worker
    # thread: see first_run.py); the executors are compared on the two runs after it.
    before = run(FAMILIES[family], False, precision, tmp_path / "before")
    graph = run(FAMILIES[family], True, precision, tmp_path / "graph")
    eager = run(FAMILIES[family], False, precision, tmp_path / "eager")
    assert eager.executor.captured == 0 and graph.executor.captured >= 2, graph.executor.captured
    worst, bitwise = 0.0, True
    for name, module in eager.objective.modules.items():
        other = graph.objective.modules[name].state_dict()
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                bitwise &= torch.equal(v, other[k])
                worst = max(worst, (v - other[k]).abs().max().item())
                assert torch.allclose(v, other[k], rtol=1e-3, atol=1e-4), (name, k)
    for a, b in zip(eager.ema.shadow.parameters(), graph.ema.shadow.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    ma, mb = eager.monitor.means(), graph.monitor.means()
    assert ma.keys() == mb.keys()
    for k in ma:
        assert abs(ma[k] - mb[k]) <= 1e-3 * max(1.0, abs(ma[k])), (k, ma[k], mb[k])
    if FAMILIES[family].get("lr_decay_start", 1.0) < 1:  # the replays ran at the rates written in place
        for k, opt in graph.objective.optimizers.items():
            for i, group in enumerate(opt.param_groups):
                assert group["lr"] is graph.lrs.tensors[k][i] and float(group["lr"]) == 0.0, (k, i)
    same_before = all(torch.equal(a, b) for a, b in zip(weights(before).values(), weights(eager).values(), strict=True))
    print(f"\n{family} {precision}: variants captured {graph.executor.captured}, bitwise equal {bitwise}, "
          f"largest parameter difference {worst:.3g}; the eager run before them bitwise equal {same_before}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_first_run_of_a_process_matches_the_next(precision: str) -> None:
    """Two identical eager StyleGAN2 runs in a fresh process (first_run.py --order EE), with lazy R1
    and path length in the same steps, must be bitwise equal after every step. With the backward
    passes on autograd's CUDA worker thread (``first_run.py --worker-thread``, the engine's way
    before) the first run ended apart on an H100."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "first_run.py"), "--order", "EE",
                          "--precision", precision], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("run 1 (E) vs run 0 (E): bitwise equal at every step"), out.stdout
