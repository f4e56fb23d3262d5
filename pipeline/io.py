"""Files: atomic writes, content hashes, and uint8 array shards with a hashed index.

Every output of every stage is written through :func:`atomic_write` (or one of its wrappers):
the bytes go to a temporary file in the same directory, are flushed and fsynced, and only then
renamed over the final name. A stage killed midway therefore never leaves a partial file under a
final name, and a reader sees either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import DataError, OutputError, StorageError

_CHUNK = 1 << 20

# Errors that mean "the storage refused the bytes", which a user can fix (raise the limit, free
# space) and which must not leave a partial file behind. EFBIG is what a write past the process
# file-size limit (RLIMIT_FSIZE, `ulimit -f`) returns once SIGXFSZ is ignored (run_stage does).
STORAGE_ERRNOS = frozenset({errno.EFBIG, errno.ENOSPC, errno.EDQUOT})

# Temporary siblings are named ".<final name>.<pid>.<random>.tmp": the pid lets a later writer
# remove what a killed process (kill -9, OOM, power loss) left behind, and only that.
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""  # not Linux: fall back to the set-and-restore idiom below
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and can still write (someone else's counts).

    A killed process whose parent died with it is a zombie until the system reaps it, which can
    take a while under some init processes; it writes nothing more, so it counts as gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): existing is all we know
    return state not in ("Z", "X")


def remove_stale_temps(directory: Path, name: str) -> list[Path]:
    """Remove temporary siblings of ``directory/name`` whose writing process no longer exists.

    A process killed with SIGKILL cannot clean up; its temporary file or folder stays beside the
    final name (never under it). Writers call this before writing the same name again, so such
    leftovers do not pile up or show up as untracked files. Temps of live processes are kept.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or m["name"] != name or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def storage_error(path: str | os.PathLike, exc: OSError) -> StorageError:
    """A user-facing error for a write the storage refused, naming the file and the fix."""
    path = Path(path)
    if exc.errno == errno.EFBIG:
        import resource  # noqa: PLC0415 - POSIX only, and only needed here

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = ("no process limit is set, so the filesystem's maximum file size was reached"
                 if soft == resource.RLIM_INFINITY else
                 f"the process file-size limit (RLIMIT_FSIZE, `ulimit -f`) is {soft} bytes")
        return StorageError(f"writing {path}: file too large: {limit}. Nothing was written under {path}. "
                            "Raise the limit (`ulimit -f unlimited`) or make the file smaller "
                            "(for tensor shards: lower preprocess.shard_mb).")
    if exc.errno == errno.EDQUOT:
        return StorageError(f"writing {path}: disk quota exceeded on {path.parent}. Nothing was written under "
                            f"{path}. Free space in your quota (e.g. `dvc gc`) or ask for a larger quota.")
    return StorageError(f"writing {path}: no space left on the device holding {path.parent}. Nothing was written "
                        f"under {path}. Free space (e.g. `dvc gc -w`, old checkpoints in .pipeline/) and re-run.")


def _storage_errno(exc: OSError, tmp: str) -> int | None:
    """The storage errno behind a failed write, or None when it is some other error.

    C writers (numpy's tofile, Arrow) report a short write as an OSError without an errno; the
    temporary file's size against the file-size limit, or a full filesystem, tells what happened.
    """
    if exc.errno in STORAGE_ERRNOS:
        return exc.errno
    if exc.errno is not None:
        return None
    import resource  # noqa: PLC0415 - POSIX only

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        size = os.stat(tmp).st_size
        free = os.statvfs(os.path.dirname(tmp)).f_bavail
    except OSError:
        return None
    if soft != resource.RLIM_INFINITY and size >= soft:
        return errno.EFBIG
    if free == 0:
        return errno.ENOSPC
    return None


def make_parent(path: Path) -> None:
    """Create ``path``'s folder; a file standing where a folder is needed is an :class:`OutputError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), path.parent)
        raise OutputError(f"{path}: {blocker} is a file, not a folder; give a path under a folder") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` on success.

    On any exception (including KeyboardInterrupt and an exceeded file-size limit) the temporary
    file is removed and ``path`` is left as it was. A full disk, a quota or the file-size limit
    raise :class:`~pipeline.errors.StorageError` naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, where a file is to be written; give a file name (or move the folder)")
    make_parent(path)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            # mkstemp creates 0600; give the file the mode a plain open() would (team-readable
            # under a group umask), since outputs end up in a shared DVC cache.
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        code = _storage_errno(exc, tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if code is not None:
            raise storage_error(path, OSError(code, os.strerror(code))) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` through :func:`atomic_write` (temp, fsync, rename)."""
    with open(src, "rb") as fin, atomic_write(dst) as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def try_flock(path: str | os.PathLike) -> int | None:
    """An exclusive advisory lock on ``path`` without waiting: its descriptor, or None if another process holds it.

    The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a
    lock never goes stale. Close the descriptor to release it.
    """
    import fcntl  # noqa: PLC0415 - POSIX only

    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes, so DVC sees no spurious change)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; run the stage that writes it first (dvc repro)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete it and re-run the stage that writes it") from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Save ``array`` atomically in .npy format (never pickled) and return the file's sha256."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError(f"{path}: object arrays would need pickle; refusing to save")
    with atomic_write(path) as fh:
        # np.save's bytes, written through Python rather than numpy's C tofile(): a refused write
        # (file-size limit, full disk) then raises OSError with its errno instead of a bare
        # "N requested and M written", so the user gets told what happened.
        header = np.lib.format.header_data_from_array_1_0(array)
        try:
            np.lib.format.write_array_header_1_0(fh, header)
        except ValueError:  # header too long for format 1.0 (huge shapes): numpy's fallback
            np.lib.format.write_array_header_2_0(fh, header)
        fh.write(memoryview(array.reshape(-1)).cast("B"))
    return sha256_file(path)


def load_npy(path: str | os.PathLike, *, sha256: str | None = None, mmap: bool = False) -> np.ndarray:
    """Load a .npy file without pickle; when ``sha256`` is given, verify it first."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; run the stage that writes it first (dvc repro)")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise DataError(
                f"{path}: content hash {actual[:12]}… does not match the recorded {sha256[:12]}…; "
                "the file is corrupt or was changed by hand. Restore it with `dvc checkout` "
                "or re-create it with `dvc repro --force <stage>`."
            )
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        raise DataError(f"{path}: not a plain .npy array ({exc})") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` into place as ``final_dir`` (replacing an old one).

    Stages that write a directory build it beside the final name and call this last, so a stage
    killed midway leaves the old directory (or none), never a half-written one.
    """
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def check_replaceable(final_dir: str | os.PathLike, owns: tuple[str, ...], *, option: str = "--out") -> None:
    """Refuse to replace ``final_dir`` unless it is missing, empty, or holds only what the stage writes.

    A stage writes a folder output whole: it builds a new one and swaps it in, so whatever the old
    folder held is gone. That is right for the stage's own output and disastrous for anything else
    (a user's photo folder given as ``--out``, ``reports/`` with the metrics in it). ``owns`` are
    the stage's entry names (glob patterns) at the top of its folder; any other entry (a note, a
    hidden file, a loose image, a git-tracked ``.gitignore``) makes the folder someone else's, and
    the stage refuses before doing any work. Call it before the work; :func:`staged_dir` calls it
    again before swapping.
    """
    import fnmatch  # noqa: PLC0415

    final_dir = Path(final_dir)
    if not final_dir.exists() and not final_dir.is_symlink():
        return
    if final_dir.is_symlink() or not final_dir.is_dir():
        kind = "a link" if final_dir.is_symlink() else "a file"
        raise OutputError(f"{option} {final_dir}: is {kind}, not a folder this stage wrote; the stage would replace it. "
                        f"Give {option} a new or empty folder, or move it away.")
    try:
        names = sorted(os.listdir(final_dir))
    except OSError as exc:
        raise OutputError(f"{option} {final_dir}: cannot be listed ({exc.strerror}); give {option} a folder "
                        "you can write") from None
    foreign = [n for n in names if not any(fnmatch.fnmatchcase(n, pat) for pat in owns)]
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"{option} {final_dir}: holds {shown}, which this stage did not write; it replaces its output folder "
            f"whole, so those would be lost. Nothing was changed. Give {option} a new or empty folder (the "
            f"stage's default is its DVC output), or move those files away.")


@contextlib.contextmanager
def staged_dir(final_dir: str | os.PathLike, *, owns: tuple[str, ...] | None = None,
               option: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``final_dir`` when the block succeeds.

    ``owns``: the stage's entry names (glob patterns) at the top of ``final_dir``; an existing
    folder holding anything else is refused (:func:`check_replaceable`), before and after the
    block. None: the caller owns the place (a private cache), no check.
    """
    final_dir = Path(final_dir)
    if owns is not None:
        check_replaceable(final_dir, owns, option=option)
    make_parent(final_dir)
    remove_stale_temps(final_dir.parent, final_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.{os.getpid()}.", suffix=".tmp", dir=final_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if owns is not None:
            check_replaceable(final_dir, owns, option=option)  # something appeared meanwhile
        replace_dir(tmp, final_dir)
    except StorageError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # Name the file as the user knows it (under final_dir), not its temporary location.
        raise StorageError(str(exc).replace(str(tmp), str(final_dir))) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def project_root(start: Path | None = None) -> Path:
    """The project root: the nearest directory upwards holding dvc.yaml (or .dvc/).

    A queued ``dvc exp run`` executes in a temporary copy under ``<root>/.dvc/tmp/exps/``; runs from
    there belong to the real root, so that parallel experiments log to one store.
    """
    here = (start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "dvc.yaml").is_file() or (p / ".dvc").is_dir():
            parts = p.parts
            for i in range(len(parts) - 3):
                if parts[i : i + 3] == (".dvc", "tmp", "exps"):
                    return Path(*parts[:i])
            return p
    return here


def work_dir(*parts: str) -> Path:
    """A private working directory under <project root>/.pipeline (not a DVC output, git-ignored)."""
    d = project_root().joinpath(".pipeline", *parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------------------------
# Sharded uint8 image arrays
#
# A split is stored as shards ``<split>_000.npy``, ``<split>_001.npy`` … of uint8 [N, C, H, W],
# each at most ``shard_bytes`` large, plus ``<split>_labels.npy`` (int64 [N], -1 when unlabeled).
# The index (file names, shapes, sha256 of every file) lives in the directory's ``meta.json`` so
# a reader can verify every byte before training uses it.
# --------------------------------------------------------------------------------------------

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


class ShardWriter:
    """Streams uint8 [n, C, H, W] batches of one split into shards of at most ``shard_bytes``.

    Memory stays bounded by one shard however large the split is: batches are copied into a
    single shard buffer (allocated once, reused; the OS only backs the pages written) that is
    written out each time it fills, so the caller may drop every batch right after ``add``.
    """

    def __init__(self, out_dir: Path, split: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_bytes = shard_bytes
        self.shape: tuple[int, ...] | None = None
        self.per_shard = 0
        self.buffer: np.ndarray | None = None  # uint8 [per_shard, C, H, W]
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.labels: list[np.ndarray] = []
        self.count = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, C, H, W], got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if self.shape is None:
            self.shape = tuple(int(s) for s in images.shape[1:])
            # A shard holds at least one image, even one larger than shard_bytes.
            self.per_shard = max(1, self.shard_bytes // max(1, int(np.prod(self.shape))))
        elif tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"image shape {images.shape[1:]} differs from {self.shape}")
        self.labels.append(np.asarray(labels, np.int64).copy())
        self.count += len(images)
        done = 0
        while done < len(images):
            if self.buffer is None:
                self.buffer = np.empty((self.per_shard, *self.shape), np.uint8)
            take = min(len(images) - done, self.per_shard - self.buffered)
            self.buffer[self.buffered : self.buffered + take] = images[done : done + take]
            self.buffered += take
            done += take
            if self.buffered == self.per_shard:
                self._flush()

    def _flush(self) -> None:
        if self.buffer is None:
            return
        part = self.buffer[: self.buffered]
        name = f"{self.split}_{len(self.shards):03d}.npy"
        self.shards.append({"file": name, "count": int(len(part)), "sha256": save_npy(self.out_dir / name, part)})
        self.buffered = 0

    def close(self, *, shape: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Write the last shard and the labels; return the split's index entry for meta.json."""
        if self.shape is None:
            if shape is None:
                raise ValueError(f"split {self.split!r} is empty and no shape was given")
            self.shape = tuple(int(s) for s in shape)
            self.buffer = np.zeros((0, *self.shape), np.uint8)
        if self.buffered or not self.shards:
            self._flush()
        self.buffer = None
        labels_name = f"{self.split}_labels.npy"
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        return {
            "count": int(self.count),
            "shape": [int(s) for s in self.shape],
            "shards": self.shards,
            "labels": {"file": labels_name, "sha256": save_npy(self.out_dir / labels_name, labels)},
        }


def write_split(
    out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, *, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> dict[str, Any]:
    """Write one whole split as shards; return its index entry for meta.json."""
    writer = ShardWriter(out_dir, split, shard_bytes=shard_bytes)
    writer.add(images, labels)
    return writer.close()


def read_split(in_dir: Path, entry: dict[str, Any], *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a split written by :func:`write_split`, verifying every file's sha256 by default."""
    in_dir = Path(in_dir)
    parts = [load_npy(in_dir / s["file"], sha256=s["sha256"] if verify else None) for s in entry["shards"]]
    images = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    labels = load_npy(in_dir / entry["labels"]["file"], sha256=entry["labels"]["sha256"] if verify else None)
    if images.shape[0] != entry["count"] or labels.shape[0] != entry["count"]:
        raise DataError(f"{in_dir}: split has {images.shape[0]} images and {labels.shape[0]} labels, meta says {entry['count']}")
    return images, labels


# A mapping costs address space, not memory, until rows are touched; the window bounds both the
# touched (resident, file-backed) pages of a streamed set and the address space, which is what a
# process limit (RLIMIT_AS, `ulimit -v`) counts. 1 GiB keeps a streamed run's footprint small
# however large the set is. Shards are mapped in blocks of at most MAP_BLOCK_BYTES, so a window
# smaller than a shard still works; mapping and unmapping a block is a pair of system calls.
MAP_WINDOW_BYTES = 1 << 30
MAP_BLOCK_BYTES = 64 << 20


def address_space_headroom() -> int | None:
    """Bytes of address space left under RLIMIT_AS (``ulimit -v``), or None when no limit is set."""
    import resource  # noqa: PLC0415 - POSIX only

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        status = Path("/proc/self/status").read_text()
        used = next(int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmSize:"))
    except (OSError, StopIteration):
        used = 0
    return max(0, soft - used)


def host_memory_available() -> int:
    """Bytes this process could still take from the host: the least of MemAvailable, the cgroup's
    memory.max headroom and the RLIMIT_AS headroom (whichever are set)."""
    limits = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        limits.append(next(int(ln.split()[1]) * 1024 for ln in meminfo.splitlines() if ln.startswith("MemAvailable:")))
    except (OSError, StopIteration):
        pass
    try:
        cg = Path("/sys/fs/cgroup")
        top = cg / "memory.max"
        if top.is_file() and (v := top.read_text().strip()) != "max":
            limits.append(max(0, int(v) - int((cg / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    room = address_space_headroom()
    if room is not None:
        limits.append(room)
    return min(limits) if limits else 1 << 62


class ShardedImages:
    """A split's uint8 [N, C, H, W] images left in their shard files and read on demand.

    Each shard's sha256 is checked once when the split is opened (the file is streamed through
    the hash, never loaded); rows are then read through memory maps of blocks of a shard. At most
    ``map_bytes`` are mapped at a time (least recently used blocks unmapped first), so neither
    memory nor address space grows with the set. Reads copy rows out: no view of a mapping
    escapes, which is what lets a block be unmapped. Thread-safe (one lock): the training prefetcher reads
    while the main thread may evaluate.
    """

    def __init__(self, paths: list[Path], counts: list[int], shape: tuple[int, ...], *,
                 map_bytes: int | None = None) -> None:
        import threading  # noqa: PLC0415

        self.paths = [Path(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.shape = (int(self.starts[-1]), *(int(s) for s in shape))
        self.dtype = np.dtype(np.uint8)
        self.row_bytes = int(np.prod(self.shape[1:]))
        self.offsets = [self._header(p, c) for p, c in zip(self.paths, self.counts, strict=True)]
        if map_bytes is None:
            room = address_space_headroom()
            # Under an address-space limit, a 64th of what is left: the rest is for the
            # batches, the models, the threads and whatever the libraries map later. A smaller
            # window costs more mapping calls, never a failure.
            map_bytes = MAP_WINDOW_BYTES if room is None else min(MAP_WINDOW_BYTES, max(self.row_bytes, room // 64))
        self.map_bytes = map_bytes
        self.block_rows = max(1, min(MAP_BLOCK_BYTES, map_bytes // 4) // self.row_bytes)
        self._maps: dict[tuple[int, int], tuple[Any, np.ndarray]] = {}  # (shard, block) -> (mmap, view), LRU first
        self._mapped = 0
        self._lock = threading.Lock()
        self.rows_read = 0  # rows copied out so far (what a DDP rank really read)

    def _header(self, path: Path, count: int) -> int:
        """Byte offset of the rows in a .npy shard, after checking its header against the index."""
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy shard ({exc}); re-create it with `dvc repro --force <stage>`") from None
        if fortran or dtype != np.uint8 or tuple(shape) != (count, *self.shape[1:]):
            raise DataError(f"{path}: holds {dtype} {tuple(shape)}, the index says uint8 {(count, *self.shape[1:])}; "
                            "the directory is inconsistent: re-create it with `dvc repro --force <stage>`")
        return offset

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def _block(self, s: int, k: int) -> np.ndarray:
        """Rows [k * block_rows, (k + 1) * block_rows) of shard ``s`` as a read-only view of a mapping
        (the caller holds the lock); the least recently used blocks are unmapped to stay in the window."""
        import mmap  # noqa: PLC0415

        hit = self._maps.pop((s, k), None)
        if hit is None:
            r0 = k * self.block_rows
            rows = min(self.counts[s], r0 + self.block_rows) - r0
            size = rows * self.row_bytes
            while self._maps and self._mapped + size > self.map_bytes:
                old = next(iter(self._maps))
                mm, view = self._maps.pop(old)
                self._mapped -= view.nbytes
                del view  # the mapping closes only once no array uses it
                mm.close()
            start = self.offsets[s] + r0 * self.row_bytes
            skip = start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
            with open(self.paths[s], "rb") as fh:
                mm = mmap.mmap(fh.fileno(), size + skip, offset=start - skip, access=mmap.ACCESS_READ)
            view = np.frombuffer(mm, np.uint8, count=size, offset=skip).reshape(rows, *self.shape[1:])
            hit = (mm, view)
            self._mapped += size
        self._maps[(s, k)] = hit  # most recently used last
        return hit[1]

    def gather(self, index: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed) as uint8 [len(index), C, H, W], read block by block."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        if len(idx) == 0:
            return out
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"row index out of range for {len(self)} images")
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[shard]
        block = local // self.block_rows
        cuts = np.flatnonzero((np.diff(shard) != 0) | (np.diff(block) != 0)) + 1
        with self._lock:
            for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rows)]]), strict=True):
                s, k = int(shard[lo]), int(block[lo])
                out[order[lo:hi]] = self._block(s, k)[local[lo:hi] - k * self.block_rows]
            self.rows_read += len(idx)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        """A copy of the selected rows (an int, a slice or an index array)."""
        if isinstance(key, (int, np.integer)):
            return self.gather([int(key) % len(self)])[0]
        if isinstance(key, slice):
            return self.gather(np.arange(len(self))[key])
        return self.gather(key)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.gather(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)

    def close(self) -> None:
        with self._lock:
            while self._maps:
                mm, view = self._maps.popitem()[1]
                del view  # the mapping closes only once no array uses it
                mm.close()
            self._mapped = 0


def open_split(in_dir: Path, entry: dict[str, Any], *, verify: bool = True,
               map_bytes: int | None = None) -> tuple[ShardedImages, np.ndarray]:
    """Like :func:`read_split`, but the images stay in their files (:class:`ShardedImages`); labels are loaded."""
    in_dir = Path(in_dir)
    paths, counts = [], []
    for s in entry["shards"]:
        path = in_dir / s["file"]
        if not path.is_file():
            raise DataError(f"{path}: file not found; run the stage that writes it first (dvc repro)")
        if verify and (actual := sha256_file(path)) != s["sha256"]:
            raise DataError(f"{path}: content hash {actual[:12]}… does not match the recorded {s['sha256'][:12]}…; "
                            "the file is corrupt or was changed by hand. Restore it with `dvc checkout` "
                            "or re-create it with `dvc repro --force <stage>`.")
        paths.append(path)
        counts.append(int(s["count"]))
    images = ShardedImages(paths, counts, tuple(entry["shape"]), map_bytes=map_bytes)
    labels = load_npy(in_dir / entry["labels"]["file"], sha256=entry["labels"]["sha256"] if verify else None)
    if len(images) != entry["count"] or labels.shape[0] != entry["count"]:
        raise DataError(f"{in_dir}: split has {len(images)} images and {labels.shape[0]} labels, meta says {entry['count']}")
    return images, labels
