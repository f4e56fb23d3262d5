"""Where the training images live and what each step draws from them.

Three placements (``train.data_placement``; ``auto`` picks from the set's size and free memory,
and the choice is logged with its reason):

* device: the whole set (this rank's shard under DDP) on the GPU as uint8, when it takes at most
  half of the free device memory; a batch is an index_select inside the step;
* host: in pinned host memory, one host-to-device copy per batch;
* stream: the set stays in its shard files (:class:`~pipeline.io.ShardedImages`); a background
  thread reads each batch's rows into a ring of pinned buffers and copies them to the GPU on a
  side stream, ahead of the step that needs them. The uint8 batch is then one of the step's
  draws, so a captured step (CUDA graph) only normalises a static device tensor.

Every random draw of the loop (latents, labels, augmentation parameters, noise; the permutations
of the resident placements) comes from one device generator, seeded from the run's seed and the
rank, and saved in checkpoints with the position in the current permutation: a resumed run draws
exactly what an uninterrupted one would. A streamed epoch's order is a function of (seed, epoch)
only (:func:`epoch_order`); under DDP rank r reads positions r, r + world, ... of it and nothing
else, and a checkpoint records (epoch, batch) to continue from.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..imaging import normalize
from ..io import ShardedImages, host_memory_available
from ..models.layers import channels_last_strided
from .distributed import DistInfo

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "host", "stream")
PREFETCH = 3  # batches read ahead of the step in streamed mode


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def choose_placement(requested: str, own_bytes: int, device: torch.device) -> tuple[str, str]:
    """(placement, why) for ``own_bytes`` of uint8 images on ``device``; see the module docstring."""
    if requested not in PLACEMENTS:
        raise UserError(f"train.data_placement: {requested!r} is not allowed; use one of {', '.join(PLACEMENTS)}")
    cuda = device.type == "cuda"
    if requested != "auto":
        if requested == "device" and not cuda:
            return "device", "train.data_placement=device (on cpu the device is host memory)"
        return requested, f"train.data_placement={requested}"
    host = host_memory_available()
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        if own_bytes <= free // 2:
            return "device", f"{_mib(own_bytes)} fit in half of the GPU's free {_mib(free)}"
        if own_bytes <= host // 2:
            return "host", (f"{_mib(own_bytes)} exceed half of the GPU's free {_mib(free)} but fit in half of the "
                            f"host's available {_mib(host)}")
        return "stream", (f"{_mib(own_bytes)} exceed half of the GPU's free {_mib(free)} and half of the host's "
                          f"available {_mib(host)}")
    if own_bytes <= host // 2:
        return "device", f"{_mib(own_bytes)} fit in half of the host's available {_mib(host)} (device is cpu)"
    return "stream", f"{_mib(own_bytes)} exceed half of the host's available {_mib(host)}"


def _agree(placement: str, why: str, device: torch.device) -> tuple[str, str]:
    """The placement every DDP rank uses: the most frugal any rank chose. Ranks that chose apart
    (one GPU with less free memory) would otherwise read different parts of the set, and their
    checkpoints would not resume together."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        return placement, why
    order = ("device", "host", "stream")
    level = torch.tensor([order.index(placement)], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(level, op=dist.ReduceOp.MAX)
    agreed = order[int(level.item())]
    if agreed != placement:
        return agreed, f"{why}; another process could not hold its share there, and every process places its share alike"
    return placement, why


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's part of epoch ``epoch``'s permutation of ``n`` images (a function of these
    arguments only): positions rank, rank + world_size, ... of one global permutation, cut so
    every rank gets ``n // world_size`` images."""
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 17]))).permutation(n)
    return perm[rank::world_size][: n // world_size]


def _resident(images: ShardedImages, rows: slice, device: torch.device, pin: bool) -> torch.Tensor:
    """Rows ``rows`` of a set left in its shard files, copied 64 MiB at a time into one uint8 tensor on
    ``device`` (pinned when ``pin``): the host never holds the set twice, nor at all for the GPU."""
    idx = np.arange(len(images))[rows]
    out = torch.empty((len(idx), *images.shape[1:]), dtype=torch.uint8, device=device, pin_memory=pin)
    step = max(1, (64 << 20) // images.row_bytes)
    for i in range(0, len(idx), step):
        part = torch.from_numpy(images.gather(idx[i : i + step]))
        out[i : i + step].copy_(part)
    return out


class _Prefetcher:
    """A background thread that reads streamed batches ahead of the step, in the sampler's order.

    A ring of slots, each a (pinned) host buffer and, on CUDA, a device buffer. The thread takes a
    free slot, reads the batch's rows into its host buffer (shard by shard), copies it to the
    device buffer on a side stream and records ``copied``; the step's stream waits for that event.
    A slot handed to a step goes back to the ring when the loop says the step is enqueued
    (:meth:`release`); its ``released`` event, recorded then on the step's stream, keeps the next
    copy into it behind the step's reads, with no host wait.
    """

    def __init__(self, source: Any, labels: np.ndarray, order: Any, *, batch: int, slots: int,
                 device: torch.device) -> None:
        self.source, self.labels, self.order, self.device = source, labels, order, device
        self.cuda = device.type == "cuda"
        shape = (batch, *source.shape[1:])
        self.host_x = [torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)]
        self.host_y = [torch.empty(batch, dtype=torch.long, pin_memory=self.cuda) for _ in range(slots)]
        if self.cuda:
            self.dev_x = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(slots)]
            self.dev_y = [torch.empty(batch, dtype=torch.long, device=device) for _ in range(slots)]
            self.copied = [torch.cuda.Event() for _ in range(slots)]
            self.released = [torch.cuda.Event() for _ in range(slots)]
            self.stream = torch.cuda.Stream(device=device)
        self.slots = slots
        self.thread: threading.Thread | None = None

    def start(self, epoch: int, pos: int) -> None:
        self.free: queue.Queue[int | None] = queue.Queue()
        for i in range(self.slots):
            self.free.put(i)
        self.ready: queue.Queue[Any] = queue.Queue()
        self.held: list[int] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, args=(epoch, pos), name="batch-prefetch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is None:
            return
        self.stopping = True
        self.free.put(None)
        self.thread.join()
        self.thread = None
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy in flight into a buffer reused later

    def _run(self, epoch: int, pos: int) -> None:
        try:
            if self.cuda and self.device.index is not None:
                torch.cuda.set_device(self.device)
            rows = self.order(epoch)
            while True:
                slot = self.free.get()
                if slot is None or self.stopping:
                    return
                if (pos + 1) * len(self.host_y[slot]) > len(rows):
                    epoch, pos = epoch + 1, 0
                    rows = self.order(epoch)
                b = len(self.host_y[slot])
                # Sorted: rows of one shard are read together; the order inside a batch is no
                # part of what a step computes beyond being fixed.
                idx = np.sort(rows[pos * b : (pos + 1) * b])
                if self.cuda:
                    self.copied[slot].synchronize()  # the last copy out of this host buffer is done
                self.source.gather(idx, out=self.host_x[slot].numpy())
                self.host_y[slot].numpy()[:] = self.labels[idx]
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        self.stream.wait_event(self.released[slot])
                        self.dev_x[slot].copy_(self.host_x[slot], non_blocking=True)
                        self.dev_y[slot].copy_(self.host_y[slot], non_blocking=True)
                        self.copied[slot].record(self.stream)
                self.ready.put((slot, epoch, pos))
                pos += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
            self.ready.put(exc)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The next batch (x uint8, y int64 on the device) and its (epoch, batch) position."""
        if len(self.held) >= self.slots - 1:
            raise RuntimeError("streamed batches drawn without Sampler.release(); the ring is exhausted")
        item = self.ready.get()
        if isinstance(item, BaseException):
            self.thread = None
            raise item
        slot, epoch, pos = item
        self.held.append(slot)
        if not self.cuda:  # CPU: the step reads the buffer before the slot is released
            return self.host_x[slot], self.host_y[slot], epoch, pos
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        return self.dev_x[slot], self.dev_y[slot], epoch, pos

    def release(self) -> None:
        """The step that reads the held batches is enqueued: their slots may be refilled behind it."""
        for slot in self.held:
            if self.cuda:
                self.released[slot].record(torch.cuda.current_stream(self.device))
            self.free.put(slot)
        self.held.clear()


class Sampler:
    def __init__(self, images: torch.Tensor | ShardedImages, labels: torch.Tensor, *, batch_size: int, nz: int,
                 num_classes: int, seed: int, device: torch.device, info: DistInfo, channels_last: bool = False,
                 placement: str = "auto", batches_per_step: int = 1) -> None:
        """images: uint8 [N, C, H, W] (a CPU or device tensor, or shard files); labels: int64 [N] (-1 when
        unlabeled); batches_per_step: most batches one step draws (the streamed ring holds them)."""
        self.batch_size, self.nz, self.num_classes = batch_size, nz, num_classes
        self.device, self.channels_last, self.seed, self.info = device, channels_last, seed, info
        shard = slice(info.rank, None, info.world_size)
        n = len(images)
        row_bytes = int(np.prod(images.shape[1:]))
        own_n = n // info.world_size if placement == "stream" else len(range(n)[shard])
        self.placement, why = choose_placement(placement, own_n * row_bytes, device)
        if info.enabled and placement == "auto":
            self.placement, why = _agree(self.placement, why, device)
        self.streamed = self.placement == "stream"
        self.on_device = self.placement == "device"
        if self.streamed:
            if isinstance(images, torch.Tensor):
                images = images.cpu().numpy()  # an in-memory set streamed anyway (forced): same reads
            self.images = images
            self.prefetch = _Prefetcher(_Rows(images), labels.cpu().numpy(), self._order, batch=batch_size,
                                        slots=batches_per_step + PREFETCH + 1, device=device)
            self.epoch, self.pos = 0, 0
            count, where = n // info.world_size, "streamed from the shard files"
        else:
            if isinstance(images, ShardedImages):
                try:
                    if self.on_device:
                        own = _resident(images, shard, device, pin=False)
                    else:
                        own = _resident(images, shard, torch.device("cpu"), pin=device.type == "cuda")
                except (MemoryError, RuntimeError, OSError) as exc:
                    # torch reports a failed allocation as RuntimeError, a refused mapping is ENOMEM
                    if isinstance(exc, OSError) and exc.errno != errno.ENOMEM or (
                            isinstance(exc, RuntimeError) and "memory" not in str(exc).lower()):
                        raise
                    raise UserError(
                        f"train.data_placement={placement}: the {own_n} training images ({_mib(own_n * row_bytes)}) "
                        f"do not fit {'on ' + str(device) if self.on_device else 'in host memory'} "
                        f"({str(exc).splitlines()[0][:160]}); set train.data_placement: stream (or auto, "
                        "which streams sets that do not fit)") from None
            else:
                own = images[shard]
                if self.on_device:
                    own = own.to(device)
                else:  # pinned host memory, one host-to-device copy per batch
                    own = own.cpu().pin_memory() if device.type == "cuda" else own.cpu()
            self.images = own
            count = len(own)
            where = f"on {device}" if self.on_device else "in pinned host memory"
            self.perm = torch.empty(0, dtype=torch.long, device=device)
            self.pos = 0
            self.labels = labels[shard].to(device)
        log.info("training data: %d images %s uint8 (%s) %s: %s", count, tuple(images.shape[1:]),
                 _mib(count * row_bytes), where, why)
        if count < batch_size:
            raise UserError(f"train.batch_size={batch_size} is larger than the {count} training images "
                            "(per process); lower it")
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed * 7919 + 1 + info.rank)

    @property
    def capturable(self) -> bool:
        """Whether a step's batch is a device tensor the step can read inside a CUDA graph."""
        return self.on_device or self.streamed

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.images), seed=self.seed, epoch=epoch, rank=self.info.rank,
                           world_size=self.info.world_size)

    # -- draws (outside the captured step) --------------------------------------------------------

    def indices(self) -> Any:
        """What the step's :meth:`batch` reads: the next batch of indices [B] of a seeded permutation (a
        new one each epoch) for a resident set; the batch itself ({"x": uint8, "y": labels}) when streamed."""
        if self.streamed:
            if self.prefetch.thread is None:
                self.prefetch.start(self.epoch, self.pos)
            x, y, epoch, pos = self.prefetch.next()
            self.epoch, self.pos = epoch, pos + 1  # the position of the next batch to hand out
            return {"x": x, "y": y}
        b = self.batch_size
        if self.pos + b > len(self.perm):
            self.perm = torch.randperm(len(self.images), device=self.device, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + b]
        self.pos += b
        return idx

    def release(self) -> None:
        """Called once the step that read the drawn batches is enqueued (streamed slots are reused)."""
        if self.streamed and self.prefetch.thread is not None:
            self.prefetch.release()

    def close(self) -> None:
        """Stop reading ahead (a later draw starts again from the current position)."""
        if self.streamed:
            self.prefetch.stop()

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z [n, nz] ~ N(0, I) and, for conditional runs, uniform class labels [n]."""
        z = torch.randn(n, self.nz, device=self.device, generator=self.gen)
        y = None
        if self.num_classes:
            y = torch.randint(0, self.num_classes, (n,), device=self.device, generator=self.gen)
        return z, y

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, generator=self.gen)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=self.device, generator=self.gen)

    # -- inside the step ---------------------------------------------------------------------------

    def batch(self, idx: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images of a draw of :meth:`indices` as float [B, C, H, W] in [-1, 1] on the device (and labels [B])."""
        if isinstance(idx, dict):  # streamed: the batch is already on the device
            x, y = idx["x"], (idx["y"] if self.num_classes else None)
        else:
            if self.on_device:
                x = self.images.index_select(0, idx)
            else:
                x = self.images.index_select(0, idx.cpu()).to(self.device, non_blocking=True)
            y = self.labels.index_select(0, idx) if self.num_classes else None
        x = normalize(x)
        if self.channels_last:
            x = channels_last_strided(x)
        return x, y

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.streamed:
            return {"epoch": self.epoch, "pos": self.pos, "generator": self.gen.get_state()}
        return {"perm": self.perm.cpu(), "pos": self.pos, "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.streamed != ("epoch" in state):
            raise ValueError("the checkpoint's sampler was "
                             f"{'streamed' if 'epoch' in state else 'resident'}, this run's is {self.placement}")
        if self.streamed:
            self.close()  # batches read ahead from the old position are dropped
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        else:
            self.perm = state["perm"].to(self.device)
            self.pos = int(state["pos"])
        self.gen.set_state(state["generator"])


class _Rows:
    """Row reads of a set in memory, shaped like :class:`ShardedImages` (a forced stream of a tensor)."""

    def __init__(self, images: Any) -> None:
        self.images, self.shape = images, images.shape

    def gather(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        if isinstance(self.images, ShardedImages):
            return self.images.gather(idx, out=out)
        np.take(self.images, idx, axis=0, out=out)
        return out
