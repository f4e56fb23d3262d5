"""Executors: how a training step runs. Model-agnostic: a step is ``body(draws, variant)``.

* :class:`EagerExecutor` calls the body (PyTorch's eager mode, or torch.compile'd networks
  inside it: compilation is applied to the objective's networks before the executor runs).
* :class:`GraphExecutor` captures each step variant once in a CUDA graph and replays it. Small
  batches are launch-bound (hundreds of kernels per step, each a few microseconds of CPU time);
  a replay launches the whole step at once. Per step the host only draws indices, latents and
  augmentation parameters into static buffers. Every variant (plain, lazy R1, with gradient
  norms) shares one memory pool.

Under DDP the gradient all-reduce is never captured: mixing captured and eager NCCL calls, or
capturing after replays, can hang or stall NCCL. The body's ``sync`` points split the capture
into segments; a replay runs segment, all-reduce, segment, ... on the current stream, so each
rank issues the same collectives in the same order whether a step is eager or replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import distributed as dist_utils
from .distributed import DistInfo

log = logging.getLogger(__name__)

Body = Callable[[Any, Hashable], None]


class EagerExecutor:
    """Runs every step as written."""

    kind = "eager"

    def __init__(self, body: Body, info: DistInfo) -> None:
        self.body, self.info = body, info

    def sync(self, params: list[torch.nn.Parameter]) -> None:
        dist_utils.allreduce_grads(params, self.info)

    def run(self, draws: Any, variant: Hashable) -> None:
        self.body(draws, variant)

    @property
    def captured(self) -> int:
        return 0


class GraphExecutor(EagerExecutor):
    """Warm each variant up eagerly on a side stream (real steps), then capture it and replay."""

    kind = "cuda_graph"
    WARMUP_STEPS = 3

    def __init__(self, body: Body, info: DistInfo, device: torch.device) -> None:
        super().__init__(body, info)
        self.device = device
        self.plans: dict[Hashable, list[Any]] = {}  # variant -> [graph, sync, graph, ...]
        self.warm: dict[Hashable, int] = {}
        self.static: list[torch.Tensor] | None = None
        self.spec: Any = None
        self.pool: Any = None
        self.enabled = True
        self._recording: list[Any] | None = None  # the plan being captured
        # One side stream for every warm-up and capture: per-stream library state (cuBLAS
        # workspaces) is then set up during the warm-ups, never inside a capture.
        self.stream = torch.cuda.Stream(device=device)

    @property
    def captured(self) -> int:
        return len(self.plans)

    def sync(self, params: list[torch.nn.Parameter]) -> None:
        if not self.info.enabled:
            return
        if self._recording is None:
            super().sync(params)
            return
        # Inside a capture: close the segment, remember the all-reduce of these gradient tensors
        # (the graph rewrites them in place on every replay), open the next segment.
        grads = [p.grad for p in params if p.grad is not None]
        self._end_segment()
        self._recording.append(lambda: dist_utils.allreduce_tensors(grads, self.info))
        self._begin_segment()

    def _begin_segment(self) -> None:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread may query events while this thread captures.
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self._recording.append(graph)  # type: ignore[union-attr]

    def _end_segment(self) -> None:
        graph = self._recording[-1]  # type: ignore[index]
        graph.capture_end()
        if self.pool is None:
            self.pool = graph.pool()

    def _load(self, draws: Any) -> None:
        leaves, spec = pytree.tree_flatten(draws)
        if self.static is None:
            self.static, self.spec = [t.clone() for t in leaves], spec
        elif spec != self.spec:
            raise RuntimeError(f"a step drew {spec}, the captured steps {self.spec}")  # programmer error
        for dst, src in zip(self.static, leaves, strict=True):
            dst.copy_(src)

    def run(self, draws: Any, variant: Hashable) -> None:
        if not self.enabled:
            self.body(draws, variant)
            return
        self._load(draws)
        plan = self.plans.get(variant)
        if plan is not None:
            for part in plan:
                part.replay() if isinstance(part, torch.cuda.CUDAGraph) else part()
            return
        static = pytree.tree_unflatten(self.static, self.spec)  # warm-up and capture only, not per replay
        # Warm-up steps are real steps, run eagerly on a side stream as capture requires.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.body(static, variant)
        current.wait_stream(self.stream)
        self.warm[variant] = self.warm.get(variant, 0) + 1
        if self.warm[variant] == self.WARMUP_STEPS:
            self._capture(static, variant)

    def _capture(self, static: Any, variant: Hashable) -> None:
        """Record (nothing runs until replay) the variant's step as a plan of graph segments."""
        torch.cuda.synchronize(self.device)
        self._recording = []
        try:
            with torch.cuda.stream(self.stream):
                self._begin_segment()
                self.body(static, variant)
                self._end_segment()
        except RuntimeError as exc:
            try:  # end the broken capture (it raises once more) so the stream leaves capture mode
                with torch.cuda.stream(self.stream):
                    self._recording[-1].capture_end()  # type: ignore[index]
            except (RuntimeError, IndexError):
                pass
            # Capture is an optimisation: if this step cannot be captured, train eagerly.
            log.warning("CUDA graph capture failed (%s); continuing eagerly", str(exc).splitlines()[0][:200])
            self.enabled = False
            self.plans.clear()
            return
        finally:
            plan, self._recording = self._recording, None
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.plans[variant] = plan


def build_executor(body: Body, info: DistInfo, *, device: torch.device, graph: bool) -> EagerExecutor:
    return GraphExecutor(body, info, device) if graph else EagerExecutor(body, info)
