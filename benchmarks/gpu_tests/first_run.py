"""Does the first training run of a process compute what a second, identical run computes?

Trains the GPU tests' seeded StyleGAN2 run (or another family's) several times in one process, in
the order given (E = eager, G = replayed from CUDA graphs), and compares every tensor of the
networks (not the EMA copy) of every run with the first run's and the second run's after each step: it prints the first step
after which they differ and the tensors that differ most.

Training runs its backward passes on the calling thread (``Trainer.backward_on_calling_thread``);
``--worker-thread`` puts them back on autograd's CUDA worker thread, PyTorch's default and the
engine's way before. On an H100 (torch 2.11) with the worker thread, StyleGAN2 in fp32 and bf16
ended apart in its first run of a process after step 1 (the mapping network's weights and biases)
and identical in every later run, eager or replayed: it took lazy R1 and path length in the same
step (either one alone: bitwise equal). Warming cuBLAS, cuDNN or a double backward up before the
runs did not change it, nor did --cudnn-off, --no-tf32, --empty-cache or
PYTORCH_NO_CUDA_MEMORY_CACHING=1; with cuDNN off only the mapping network's biases part
(benchmarks/results/raw/gpu_tests_stylegan2_first_run_h100.txt). One step of another family's run
before the first (DCGAN, conditional DCGAN, SNGAN, BigGAN or the VAE) also made the first run equal
to the second; building SNGAN's trainer without a step did not, and neither did one or four WGAN-GP
steps, unless the gradient penalty was off or the critic's GroupNorm was swapped for BatchNorm or
none; a DCGAN step with R1 through a GroupNorm D did not either. So it looks like state that
autograd's worker thread keeps from one backward to the next; what that state is is not found.
On the calling thread every run was bitwise equal, fp32 and bf16, eager and replayed, with no
warm-up (before training moved there: fp32 eager and replayed, bf16 eager; after: fp32 and bf16,
eager and replayed). On the CPU every run is equal.

Examples (on a CUDA machine; --device cpu runs the same steps on the CPU)::

    python benchmarks/gpu_tests/first_run.py --order EEGG
    python benchmarks/gpu_tests/first_run.py --order EE --worker-thread
    python benchmarks/gpu_tests/first_run.py --order EE --worker-thread --set pl_weight=0 --cudnn-off
    python benchmarks/gpu_tests/first_run.py --order EE --worker-thread --warm-run dcgan_r1 --warm-steps 1
    python benchmarks/gpu_tests/first_run.py --order EE --worker-thread --warm-run wgan_gp --warm-set gp_weight=0

With the worker thread, in the GPU tests' process StyleGAN2's first eager run came after the other
families' runs and matched the later ones; ``--warm-run`` trains another family first, and ``--warm
adam`` runs only the optimizer's and the EMA's kernels as training runs them, to find which part of
a training run makes the difference (the warm-ups' backward passes run on the thread the runs' do).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import parse_overrides  # noqa: E402
from runs import FAMILIES, STEPS, run, weights  # noqa: E402

from pipeline.errors import ParamsError  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402

WARMUPS = ("none", "mm", "conv", "gconv", "dbl", "adam", "all")


def warm_up(kind: str, device: str) -> None:
    """Use a library before the runs: cuBLAS (mm), cuDNN (conv, grouped conv), a double backward, or
    (adam) two steps of Adam built as training builds it (fused and capturable on CUDA) and two
    updates of the pipeline's EMA from a device-tensor step, as training makes them."""
    if kind in ("mm", "all"):
        a = torch.randn(64, 64, device=device)
        torch.nn.functional.linear(a, a, a[0]).sum().item()
    if kind in ("conv", "gconv", "all"):
        for groups in ([1] if kind == "conv" else [4] if kind == "gconv" else [1, 4]):
            x = torch.randn(8, 16, 8, 8, device=device, requires_grad=True)
            w = torch.randn(16, 16 // groups, 3, 3, device=device, requires_grad=True)
            torch.nn.functional.conv2d(x, w, padding=1, groups=groups).sum().backward()
    if kind in ("dbl", "all"):
        x = torch.randn(32, 32, device=device, requires_grad=True)
        w = torch.randn(32, 32, device=device, requires_grad=True)
        y = torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, w), 0.2)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.square().sum().backward()
    if kind in ("adam", "all"):
        from pipeline.training.ema import EMA  # noqa: PLC0415

        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1)).to(device)
        ema = EMA(net, decay=0.99)
        fused = {"fused": True, "capturable": True} if device == "cuda" else {}
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.99), **fused)
        for i in range(2):
            opt.zero_grad(set_to_none=True)
            net(torch.randn(16, 8, device=device)).square().mean().backward()
            opt.step()
            with torch.no_grad():
                ema.update_with(net, torch.tensor(i + 1, device=device))


def first_difference(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> tuple[int, list] | None:
    """(step, [(tensor, largest difference), ...] most first) of the first step where two runs differ."""
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        bad = sorted(((k, (x[k].double() - y[k].double()).abs().max().item()) for k in x if not torch.equal(x[k], y[k])),
                     key=lambda kv: -kv[1])
        if bad:
            return step, bad
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="stylegan2", choices=sorted(FAMILIES), help="one of the GPU tests' runs")
    ap.add_argument("--order", default="EEE", help="runs in order: E eager, G CUDA graphs (default EEE)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--set", default="", metavar="KEY=VALUE,...", help="train keys over the family's, e.g. pl_weight=0")
    ap.add_argument("--warm", default="none", choices=WARMUPS, help="a library to use before the first run")
    ap.add_argument("--warm-run", default=None, choices=sorted(FAMILIES), metavar="FAMILY",
                    help="train this family's run eagerly (--warm-steps steps, not compared) before the runs")
    ap.add_argument("--warm-steps", type=int, default=None,
                    help="steps of the --warm-run (default 4; 0 builds and checks its trainer, training no step)")
    ap.add_argument("--warm-set", default="", metavar="KEY=VALUE,...", help="train keys over the --warm-run family's")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--cudnn-off", action="store_true", help="torch.backends.cudnn.enabled = False")
    ap.add_argument("--no-tf32", action="store_true", help="fp32 convolutions and matrix products without TF32")
    ap.add_argument("--empty-cache", action="store_true", help="free the CUDA caching allocator's memory between runs")
    ap.add_argument("--worker-thread", action="store_true",
                    help="backward passes on autograd's CUDA worker thread (PyTorch's default), as training ran "
                         "them before it moved them to the calling thread")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a CUDA machine, or pass --device cpu")
    if args.warm_steps is not None and (args.warm_run is None or args.warm_steps < 0):
        ap.error(f"--warm-steps {args.warm_steps}: 0 or more steps, given with --warm-run FAMILY")
    if args.warm_set and args.warm_run is None:
        ap.error("--warm-set: given with --warm-run FAMILY")
    if args.warm_steps is None:
        args.warm_steps = 4
    if len(args.order) < 2 or set(args.order) - {"E", "G"} or ("G" in args.order and args.device == "cpu"):
        raise SystemExit(f"--order {args.order!r}: two or more of E (eager) and G (CUDA graphs, CUDA only), e.g. EEGG")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.enabled = not args.cudnn_off
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    Trainer.backward_on_calling_thread = not args.worker_thread
    torch.autograd.set_multithreading_enabled(args.worker_thread)  # the warm-ups' backward passes too
    train = {**FAMILIES[args.family], **parse_overrides(args.set)}
    warm_up(args.warm, args.device)
    history: list[list[dict[str, torch.Tensor]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.warm_run:
            run({**FAMILIES[args.warm_run], **parse_overrides(args.warm_set)}, False, args.precision,
                Path(tmp) / "warm", device=args.device, steps=args.warm_steps)
        for i, kind in enumerate(args.order):
            snaps: list[dict[str, torch.Tensor]] = []
            run(train, kind == "G", args.precision, Path(tmp) / f"run{i}", device=args.device, steps=args.steps,
                after_step=lambda tr, snaps=snaps: snaps.append(weights(tr)))
            history.append(snaps)
            if args.empty_cache and args.device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    head = f"{args.family} {args.precision} order {args.order} set {args.set or '-'} warm {args.warm}" + \
        (f", warm run {args.warm_run}{' ' + args.warm_set if args.warm_set else ''} "
         f"({args.warm_steps} step{'s' * (args.warm_steps != 1)})" if args.warm_run else "") + \
        "".join(f" {name}" for name, on in (("worker thread", args.worker_thread), ("cudnn off", args.cudnn_off),
                                            ("no tf32", args.no_tf32), ("empty cache", args.empty_cache)) if on)
    for i in range(1, len(history)):
        for j in (0, 1) if i > 1 else (0,):
            diff = first_difference(history[j], history[i])
            what = "bitwise equal at every step" if diff is None else \
                f"differs after step {diff[0]}: " + ", ".join(f"{k} {v:.3g}" for k, v in diff[1][:4]) + \
                f" ({len(diff[1])} tensors)"
            print(f"{head}: run {i} ({args.order[i]}) vs run {j} ({args.order[j]}): {what}")


if __name__ == "__main__":
    try:
        main()
    except ParamsError as exc:
        raise SystemExit(f"first_run.py: {exc} (a key given with --set or --warm-set)") from None
