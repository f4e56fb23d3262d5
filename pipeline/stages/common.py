"""What every stage's thin ``main()`` shares: params, logging, signals, tracking, exit codes."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import STORAGE_ERRNOS, storage_error
from ..params import Params, load_params, to_dict

log = logging.getLogger("pipeline")

# OSErrors that mean "this place cannot be written or read by you", not a bug.
PLACE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR})


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # MLflow and alembic are chatty at INFO; their warnings still show.
    for name in ("alembic", "mlflow", "urllib3", "git", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (dvc queue kill, a scheduler's preemption) becomes KeyboardInterrupt so that the
    # same cleanup runs as for Ctrl-C: training saves a checkpoint, the run ends KILLED.
    raise KeyboardInterrupt(f"signal {signum}")


def ignore_sigxfsz() -> None:
    """Turn "file size limit exceeded" from a silent kill into an error we can report.

    By default a write past RLIMIT_FSIZE (``ulimit -f``) kills the process with SIGXFSZ (and a
    core dump), so the user sees no message. Ignored, the write fails with EFBIG instead, which
    pipeline.io turns into a StorageError naming the file and the limit (exit status 2).
    """
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", type=Path, help="params file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def device_from(params: Params) -> str:
    """Resolve base.device ("auto" means cuda when present)."""
    import torch  # noqa: PLC0415

    d = params.base.device
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"base.device: {d!r} was asked for but no CUDA device is available; use auto or cpu")
    return d


@contextmanager
def tracked(stage: str, params: Params, sections: list[str]) -> Iterator[Any]:
    """Open the stage's MLflow run with the params sections it reads."""
    from ..params import flatten  # noqa: PLC0415
    from ..tracking import PARENT_PARAMS, StageRun  # noqa: PLC0415

    logged = {s: to_dict(getattr(params, s)) for s in sections}
    with StageRun(stage, params=logged) as run:
        # Every stage puts the same key params on the pipeline's parent run, so the parent has
        # them whichever stages this `dvc repro` re-ran.
        flat = flatten(to_dict(params))
        run.log_parent(params={k: flat[k] for k in PARENT_PARAMS if k in flat})
        yield run


def run_stage(stage: str, args: argparse.Namespace, body: Callable[[Params, Any], dict[str, Any] | None],
              sections: list[str], *, models: bool = False) -> int:
    """Load params, run ``body(params, run)`` inside a tracked run, map errors to exit codes.

    ``models``: the stage builds or feeds the generator, so params are also checked against what
    ``train.model`` supports (:func:`pipeline.params.check_model_fits`) before any work.
    """
    setup_logging(getattr(args, "verbose", False))
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    ignore_sigxfsz()
    t0 = time.perf_counter()
    try:
        params = load_params(args.params, models=models)  # fails before any work on a bad params.yaml
        with tracked(stage, params, sections) as run:
            metrics = body(params, run) or {}
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            run.log_metrics({**numeric, "stage_seconds": time.perf_counter() - t0})
    except UserError as exc:
        log.error("%s failed: %s", stage, exc)
        return 2
    except OSError as exc:
        if exc.errno in PLACE_ERRNOS:
            # A path the user gave that cannot be written (read-only file system, permissions, a
            # file where a folder is needed): the user's to fix, in one line.
            log.error("%s failed: %s: %s; give a path you can write (an --out/--report option) or read (data.path), "
                      "or fix its permissions", stage, exc.filename or "a path", exc.strerror or exc)
            return 2
        if exc.errno not in STORAGE_ERRNOS:
            raise
        # A write outside pipeline.io's atomic helpers (a library's own file) hit the same wall.
        log.error("%s failed: %s", stage, storage_error(exc.filename or "an output file", exc))
        return 2
    except KeyboardInterrupt:
        log.error("%s interrupted", stage)
        return 130
    log.info("%s done in %.1f s", stage, time.perf_counter() - t0)
    return 0


def set_threads(n: int) -> None:
    """torch CPU threads: n; when 0, every core unless OMP_NUM_THREADS caps it.

    The cap matters on shared machines: OpenMP threads that outnumber the free cores spin at
    barriers, and a 2-thread run of small kernels can take 5-10x longer than a 1-thread one.
    """
    import torch  # noqa: PLC0415

    if n <= 0:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        n = int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)


def set_determinism(params: Params) -> None:
    """base.deterministic: deterministic kernels (bitwise reproducible on CPU); must run before CUDA init."""
    import torch  # noqa: PLC0415

    if params.base.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def workers(n: int) -> int:
    """n worker processes, or one per core this process may run on when n is 0.

    The affinity mask, not os.cpu_count(): a container or taskset that grants 4 of 64 cores
    must get 4 workers, not 64 fighting over 4.
    """
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
