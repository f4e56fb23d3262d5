"""Ordered, bounded parallel map over worker processes (clean, preprocess and augment use it).

Why not ``Pool.imap``: imap feeds every task to the workers at once and keeps every finished
result until the caller takes it, so when the caller is slower than the workers (writing shards,
say) the results pile up in memory without bound. :func:`ordered_map` keeps at most ``window``
jobs in flight and yields results in job order, so memory holds ``window`` results at most,
whatever the dataset's size, and the output never depends on which worker ran which job.

Processes are started with "spawn", never "fork": the parent may run threads (the MLflow sender),
and a forked child of a threaded process can deadlock. When the work needs heavy imports
(albumentations imports torch: ~3 s of CPU per process), ``preload`` names modules for a
"forkserver": a fresh single-threaded interpreter imports them once and forks each worker from
itself, so N workers cost one import instead of N, and no worker is a fork of the threaded parent.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

J = TypeVar("J")
R = TypeVar("R")

# Libraries that start their own thread pools in every worker would oversubscribe the cores
# (N workers x N threads); a worker runs one thread of each.
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _init_worker() -> None:
    for name in _THREAD_ENV:
        os.environ[name] = "1"
    os.environ["PIPELINE_WORKER"] = "1"


def in_worker() -> bool:
    """True inside a worker process started by :func:`ordered_map`."""
    return os.environ.get("PIPELINE_WORKER") == "1"


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[J], R], jobs: Iterable[J], *, workers: int, window: int | None = None,
                preload: Sequence[str] = ()) -> Iterator[R]:
    """Yield ``fn(job)`` for each job, in order; with ``workers`` > 1 in that many processes.

    fn: a module-level function (it is pickled by name); jobs: consumed lazily, so a generator
    of chunks is never materialised; window: most jobs submitted but not yet yielded
    (default 2 x workers: every worker busy while the caller handles one result); preload:
    modules a forkserver imports once for all workers (where the platform has one; else spawn).
    An exception in a worker is re-raised here (UserError subclasses keep their type and message).
    """
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    import multiprocessing as mp  # noqa: PLC0415

    window = max(1, window if window is not None else 2 * workers)
    if preload and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Read when the server starts (once per parent process); later calls reuse that server.
        ctx.set_forkserver_preload(list(preload))
    else:
        ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
