"""Command line: ``python -m pipeline <command> [options]``; each DVC stage is one command.

Stage commands read params.yaml (``--params``) and take their input and output paths as options
whose defaults match dvc.yaml, so ``python -m pipeline train`` by hand does what ``dvc repro``
does. ``--help`` on any command lists its options.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
from pathlib import Path

STAGES = {
    "inputs": "fingerprint your own data (data.path) so that DVC re-runs download when it changes (data/inputs.json)",
    "download": "fetch the dataset named by data.source into data/raw",
    "clean": "decode, repair, quarantine and dedupe every raw image (data/clean, reports/clean_report.json)",
    "preprocess": "resize and split accepted images into uint8 tensors (data/tensors)",
    "augment": "add albumentations copies of the training split (data/augmented)",
    "evaluator": "train the offline feature network used by the metrics (models/evaluator.pt)",
    "train": "train the generator: GAN recipes or the VAE (models/, reports/train/)",
    "evaluate": "FID/KID/IS/precision/recall and more (reports/metrics.json)",
    "report": "figures and the HTML report (reports/figures/, reports/index.html)",
}


def _sample(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from .errors import UserError  # noqa: PLC0415
    from .imaging import save_grid  # noqa: PLC0415
    from .io import atomic_write  # noqa: PLC0415
    from .metrics.compute import sample  # noqa: PLC0415
    from .models import check_truncation, load_generator  # noqa: PLC0415
    from .stages.common import setup_logging  # noqa: PLC0415

    setup_logging(False)
    try:
        if args.out.suffix not in (".npz", ".png"):
            raise UserError(f"--out {args.out}: use a .npz (uint8 array 'images' [N, C, H, W]) or a .png (a grid)")
        if args.out.is_dir():
            raise UserError(f"--out {args.out}: is an existing folder; give a file name such as {args.out / 'samples.png'}")
        for name in ("n", "nrow", "scale"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
        device = cli_device(args.device, "--device")
        g, info = load_generator(args.checkpoint, device=device)
        check_truncation(g, args.psi, option="--psi", model=info["model"])
        k = info["num_classes"]
        labels = None
        if args.label is not None:
            if not k or not 0 <= args.label < k:
                raise UserError(f"--label {args.label}: this generator has {k or 'no'} classes")
            labels = torch.full((args.n,), args.label, dtype=torch.long)
        images, y = sample(g, args.n, nz=info["nz"], num_classes=k, seed=args.seed, device=device, labels=labels,
                           psi=args.psi)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.out.suffix == ".png":
            save_grid(images.numpy(), args.out, nrow=args.nrow, scale=args.scale)
        else:
            arrays = {"images": images.numpy()}
            if y is not None:
                arrays["labels"] = y.numpy()
            with atomic_write(args.out) as fh:
                np.savez(fh, **arrays)
    except UserError as exc:  # a full disk or a file-size limit (StorageError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: --out {args.out}: cannot write there ({exc.strerror or exc}); "
              "choose a writable folder", file=sys.stderr)
        return 2
    print(f"wrote {args.n} samples {tuple(images.shape[1:])} to {args.out}")
    return 0


def cli_device(value: str | None, option: str) -> str:
    """A --device option: cpu, cuda or cuda:N (None: cuda when present); a GPU that is not there is a UserError."""
    import torch  # noqa: PLC0415

    from .errors import UserError  # noqa: PLC0415

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())):
        raise UserError(f"{option} {value}: not a device; use cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value[5:]) if ":" in value else 0
        if index >= count:
            raise UserError(f"{option} {value}: {'no CUDA device is' if not count else f'only {count} CUDA device(s) are'} "
                            "available here; use cpu (or leave --device out)")
    return value


def _mlflow_sync(args: argparse.Namespace) -> int:
    """Replay journals that did not reach MLflow; exit 1 while any could not be sent."""
    from . import mlflow_models  # noqa: F401, PLC0415 - journals may hold generator models to log
    from .stages.common import setup_logging  # noqa: PLC0415
    from .tracking import pending_journals, sync  # noqa: PLC0415

    setup_logging(False)
    pending = pending_journals()
    if not pending:
        print("nothing to sync: every local run journal has reached MLflow")
        return 0
    print(f"replaying {len(pending)} run journal(s) into MLflow ...")
    try:
        results = sync(uri=args.tracking_uri)
    except Exception as exc:  # noqa: BLE001 - report the server's error plainly and keep the journals
        print(f"error: MLflow is still unreachable ({type(exc).__name__}: {exc}); the journals are kept, try again later",
              file=sys.stderr)
        return 1
    for name, outcome, detail in results:
        print(f"  {name}: {outcome}: {detail}")
    failed = [name for name, outcome, _ in results if outcome == "failed"]
    if failed:
        print(f"error: {len(failed)} journal(s) could not be sent (see above); they are kept, run mlflow-sync again",
              file=sys.stderr)
        return 1
    return 0


def _params(args: argparse.Namespace) -> int:
    from .errors import UserError  # noqa: PLC0415
    from .params import describe, load_params  # noqa: PLC0415

    if args.check:
        try:
            load_params(args.params, models=True)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{args.params}: valid")
        return 0
    print(describe())
    return 0


def _metrics_check(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from .data.tensors import load_split  # noqa: PLC0415
    from .errors import UserError  # noqa: PLC0415
    from .io import write_json  # noqa: PLC0415
    from .metrics.selfcheck import format_report, run_selfcheck  # noqa: PLC0415
    from .stages.common import setup_logging  # noqa: PLC0415

    setup_logging(False)
    try:
        device = cli_device(args.device, "--device")
        splits = ["train", "test"] if args.split == "all" else [args.split]
        parts = [load_split(args.tensors, s) for s in splits]
        images = np.concatenate([p.images for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        if args.inception_weights:
            from .metrics.inception import extract_inception, load_inception, resolve_weights  # noqa: PLC0415

            from .io import work_dir  # noqa: PLC0415

            path = resolve_weights(args.inception_weights, args.inception_sha256, cache_dir=work_dir("cache", "weights"))
            net = load_inception(path, sha256=str(args.inception_sha256), device=device)
            name = f"inception-v3 {str(args.inception_sha256)[:12]}"

            def extractor(x: torch.Tensor) -> torch.Tensor:
                return extract_inception(net, x, batch_size=args.batch_size, device=device)[0]
        else:
            from .metrics.evaluator import extract, load_evaluator  # noqa: PLC0415

            ev_net, info = load_evaluator(args.evaluator, device=device)
            if tuple(images.shape[1:]) != (ev_net.channels, ev_net.size, ev_net.size):
                raise UserError(f"{args.evaluator} was trained on images {ev_net.channels}x{ev_net.size}x{ev_net.size}, "
                                f"{args.tensors} holds {tuple(images.shape[1:])}: train an evaluator on these tensors "
                                "(python -m pipeline evaluator --tensors ... --out ...)")
            name = f"offline evaluator {info['sha256'][:12]} ({info['kind']})"

            def extractor(x: torch.Tensor) -> torch.Tensor:
                return extract(ev_net, x, batch_size=args.batch_size, device=device)[0]

        report = run_selfcheck(images, labels, extractor, num_classes=parts[0].num_classes, seed=args.seed,
                               max_images=args.max_images)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["data"].update(tensors=str(args.tensors), split=args.split, extractor=name, device=device)
    print(f"extractor: {name}; tensors: {args.tensors} ({args.split} split)")
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0 if report["passed"] else 1


def _deps(args: argparse.Namespace) -> int:
    """Compare (--check) or rewrite (--write) dvc.yaml's code deps with each stage's import closure."""
    from . import deps  # noqa: PLC0415

    root = args.root
    if args.write:
        changed = deps.write(root)
        print(f"{root / 'dvc.yaml'}: {'code deps rewritten' if changed else 'code deps already match'}")
    problems = deps.check(root)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        print("run `python -m pipeline deps --write` to fix dvc.yaml", file=sys.stderr)
        return 1
    if not args.write:
        print(f"{root / 'dvc.yaml'}: every stage lists exactly the pipeline modules it can import")
    return 0


def _plain(doc: str) -> str:
    """A docstring as --help text: reST literals (``x``) and roles (:func:`x`) become plain x."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default to show: not on required options, flags or None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "%(default)" in text):
            return text
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI; only the chosen stage's module is imported (so a stage imports no other stage)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=_plain(__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in STAGES.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"pipeline.stages.{name}")
        p = sub.add_parser(name, help=help_text, description=_plain(module.__doc__.strip()),
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    s = sub.add_parser("sample", help="write N samples of a trained generator to .npz or .png",
                       formatter_class=_HelpFormatter)
    s.add_argument("--checkpoint", type=Path, default=Path("models/best.pt"), help="generator file (models/best.pt or generator.pt)")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--out", type=Path, required=True, help=".npz (uint8 'images' [N, C, H, W]) or .png (grid)")
    s.add_argument("--seed", type=int, default=0, help="latent seed (same seed, same images)")
    s.add_argument("--label", type=int, default=None, help="class to sample (conditional generators)")
    s.add_argument("--psi", type=float, default=1.0,
                   help="truncation psi in (0, 1]: 1 = none, smaller = closer to the average image "
                        "(generators with truncation, e.g. stylegan2)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    s.add_argument("--nrow", type=int, default=8, help="grid: images per row")
    s.add_argument("--scale", type=int, default=2, help="grid: pixel enlargement")
    s.set_defaults(func=_sample)
    m = sub.add_parser("mlflow-sync", help="replay run journals that did not reach MLflow (after an outage)")
    m.add_argument("--tracking-uri", default=None, help="target (default: MLFLOW_TRACKING_URI or the project's mlruns.db)")
    m.set_defaults(func=_mlflow_sync)
    mc = sub.add_parser("metrics-check", help="self-test of the metrics on real data (FID near 0 for real halves, "
                        "monotone in noise, blur and mode dropping; FID math vs scipy; IS of sharp balanced sets)",
                        formatter_class=_HelpFormatter)
    mc.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="real images (a preprocess output)")
    mc.add_argument("--evaluator", type=Path, default=Path("models/evaluator.pt"),
                    help="offline evaluator trained on these tensors (the evaluator stage's output)")
    mc.add_argument("--split", choices=["test", "train", "all"], default="test",
                    help="real images to check on (test: held out from the evaluator's training)")
    mc.add_argument("--max-images", type=int, default=10000, help="seeded random subset of at most this many images")
    mc.add_argument("--seed", type=int, default=0, help="seed of the halves, noise and class order")
    mc.add_argument("--batch-size", type=int, default=500, help="feature extraction batch size")
    mc.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    mc.add_argument("--inception-weights", default=None,
                    help="check Inception-v3 features instead (weights path or URL; needs --inception-sha256)")
    mc.add_argument("--inception-sha256", default=None, help="pinned sha256 of the Inception weights")
    mc.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    mc.set_defaults(func=_metrics_check)
    pr = sub.add_parser("params", help="list every params.yaml key with its default and meaning (as YAML); "
                        "--check validates", formatter_class=_HelpFormatter)
    pr.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file --check validates")
    pr.add_argument("--check", action="store_true", help="validate the params file and exit")
    pr.set_defaults(func=_params)
    dp = sub.add_parser("deps", help="check (or --write) dvc.yaml's code deps against each stage's import closure",
                        formatter_class=_HelpFormatter,
                        description="Each stage's code deps are the pipeline modules its command can import, "
                        "following every import statement in every branch (see pipeline/deps.py). "
                        "Exit status 1 when dvc.yaml differs.")
    mode = dp.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report differences and exit 1 if any (the default)")
    mode.add_argument("--write", action="store_true", help="rewrite the pipeline/*.py entries of each stage's deps")
    dp.add_argument("--root", type=Path, default=Path("."), help="project root (where dvc.yaml is)")
    dp.set_defaults(func=_deps)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(signal, "SIGXFSZ"):
        # A write past `ulimit -f` then fails with a clear error instead of killing the process
        # silently (see pipeline.stages.common.ignore_sigxfsz).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`python -m pipeline params | head`): not an error of ours. Point
        # stdout at /dev/null so that the interpreter's final flush does not raise again.
        import os  # noqa: PLC0415

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by the signal


if __name__ == "__main__":
    sys.exit(main())
