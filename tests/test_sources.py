"""The download stage for every source, end to end, against real files and a real HTTP server.

Standard datasets (MNIST, Fashion-MNIST, CIFAR-10, SVHN, CelebA) are served by the local server
from files generated here in their real formats (IDX gz with the official names, the CIFAR-10
*binary* tar.gz, SVHN's MATLAB .mat, CelebA's zip + partition list). Generated files cannot match
the real checksums, so the tests pass a resource table pinning the generated files' sha256
explicitly (``download.run(..., resources=...)``); the production pins are checked separately,
and one test shows that without that table a generated file is refused.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
from helpers_http import IDX_NAME, Server, cifar_records, closed_port_url, idx_bytes, tar_gz, zip_bytes
from helpers_images import encode, natural_image
from PIL import Image

from pipeline.data.raw import read_manifest
from pipeline.data.sources import CIFAR10_CLASSES, Pinned, pick, standard_resources
from pipeline.errors import ArchiveError, ChecksumError, DataError, DownloadError, UserError
from pipeline.io import sha256_bytes
from pipeline.params import Data, validate
from pipeline.stages import download


def data_params(**kw: Any) -> Data:
    """Validated ``data`` params, exactly as params.yaml would give them."""
    return validate(Data, kw, "data")


def run(p: Data, tmp_path: Path, resources: dict[str, Pinned] | None = None, *,
        cache: Path | None = None) -> tuple[Any, dict[str, Any], Path]:
    out = tmp_path / "data" / "raw"
    download.run(p, out, cache or tmp_path / "cache", resources=resources)
    df, info = read_manifest(out)
    return df, info, out


def arrays_of(out: Path, df: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = df[(df["split"] == split) & (df["kind"] == "array")]
    arr = np.load(out / rows["file"].iloc[0], allow_pickle=False)
    return arr[rows["index"].to_numpy()], rows["label"].to_numpy()


def pin_files(files: dict[str, bytes], mirrors: tuple[str, ...]) -> dict[str, Pinned]:
    return {name: Pinned(name, sha256=sha256_bytes(data), mirrors=mirrors) for name, data in files.items()}


def no_partial_files(folder: Path) -> bool:
    return not any(p.name.endswith(".part") for p in folder.rglob("*")) if folder.exists() else True


# ---------------------------------------------------------------------------------------------
# Production pins
# ---------------------------------------------------------------------------------------------


def test_production_pins_come_from_torchvision_and_the_cifar_page() -> None:
    import torchvision.datasets as tvd

    for source, cls in (("mnist", tvd.MNIST), ("fashion-mnist", tvd.FashionMNIST)):
        res = standard_resources(source)
        assert {(f, r.md5) for f, r in res.items()} == set(cls.resources)
        assert all(r.sha256 is None and r.mirrors == tuple(cls.mirrors) for r in res.values())
    svhn = standard_resources("svhn")
    assert {f: r.md5 for f, r in svhn.items()} == {v[1]: v[2] for k, v in tvd.SVHN.split_list.items() if k != "extra"}
    celeba = standard_resources("celeba")
    md5s = {name: md5 for _, md5, name in tvd.CelebA.file_list}
    assert {f: r.md5 for f, r in celeba.items()} == {f: md5s[f] for f in ("img_align_celeba.zip", "list_eval_partition.txt")}
    assert all(not r.mirrors for r in celeba.values())  # Google Drive: a team mirror is needed
    (cifar,) = standard_resources("cifar10").values()
    assert (cifar.filename, cifar.md5) == ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")
    assert standard_resources("folder") == {}
    with pytest.raises(ValueError, match="exactly one"):
        Pinned("x.gz")


def mnist_like(n_train: int = 30, n_test: int = 10, seed: int = 0) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The four MNIST .gz files (official names) of random digits, labels sorted as in MNIST."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": np.repeat(np.arange(3, dtype=np.uint8), -(-n_train // 3))[:n_train],
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(n_test) % 3).astype(np.uint8),
    }
    files = {
        "train-images-idx3-ubyte.gz": idx_bytes(arrays["train_x"]),
        "train-labels-idx1-ubyte.gz": idx_bytes(arrays["train_y"]),
        "t10k-images-idx3-ubyte.gz": idx_bytes(arrays["test_x"]),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(arrays["test_y"]),
    }
    return files, arrays


def test_without_a_resource_table_the_production_pins_refuse_generated_files(tmp_path: Path) -> None:
    files, _ = mnist_like()
    mirror = tmp_path / "team-mirror"
    mirror.mkdir()
    for name, data in files.items():
        (mirror / name).write_bytes(data)
    with pytest.raises(ChecksumError, match="md5"):
        run(data_params(source="mnist", mirrors=[str(mirror)]), tmp_path)
    assert not (tmp_path / "data" / "raw").exists()
    assert no_partial_files(tmp_path / "cache") and not list((tmp_path / "cache").rglob("*.gz"))


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST: IDX gz files from mirrors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["official", "404_then_official", "team_directory"])
def test_mnist_downloads_and_reads_idx(server: Server, tmp_path: Path, scenario: str) -> None:
    files, arrays = mnist_like()
    server.files.update(files)
    official = (f"{server.base}/files/",)
    mirrors: list[str] = []
    if scenario == "404_then_official":
        mirrors = [f"{server.base}/missing"]
    elif scenario == "team_directory":
        team = tmp_path / "team"
        team.mkdir()
        for name, data in files.items():
            (team / name).write_bytes(data)
        mirrors, official = [str(team)], (closed_port_url().rsplit("/", 1)[0] + "/",)
    df, info, out = run(data_params(source="mnist", mirrors=mirrors), tmp_path, pin_files(files, official))

    assert info["source"] == "mnist" and info["splits"] == {"test": 10, "train": 30}
    assert info["class_names"] == [str(i) for i in range(10)]
    for split, key in (("train", "train"), ("test", "test")):
        x, y = arrays_of(out, df, split)
        np.testing.assert_array_equal(x, arrays[f"{key}_x"])
        np.testing.assert_array_equal(y, arrays[f"{key}_y"])
    assert set(info["provenance"]["sha256"]) == set(files)
    assert info["provenance"]["pins"] == {n: {"sha256": sha256_bytes(d)} for n, d in files.items()}
    if scenario == "404_then_official":
        assert len(server.hits("missing")) == 4 and len(server.hits("files")) == 4  # one 404 per file, no retries
    elif scenario == "team_directory":
        assert server.requests == []  # the local mirror came first; the network was never used
    cache = tmp_path / "cache" / "MNIST"
    assert sorted(p.name for p in cache.iterdir()) == sorted(files) and no_partial_files(cache)
    # A second run reuses the verified cache without a request (or a copy from the team folder).
    before = len(server.requests)
    df2, _, _ = run(data_params(source="mnist", mirrors=mirrors), tmp_path / "again", pin_files(files, official),
                    cache=tmp_path / "cache")
    assert len(server.requests) == before and df2.equals(df)


def test_fashion_mnist_checksum_mismatch_is_fatal_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    files, _ = mnist_like()
    server.files.update(files)
    pins = pin_files(files, (f"{server.base}/files/",))
    name = "train-images-idx3-ubyte.gz"
    pins[name] = Pinned(name, sha256=sha256_bytes(b"other bytes"), mirrors=pins[name].mirrors)
    second = f"{server.base}/norange"  # a second mirror must never be asked after a mismatch
    with pytest.raises(ChecksumError) as ei:
        run(data_params(source="fashion-mnist", mirrors=[f"{server.base}/files", second]), tmp_path, pins)
    assert name in str(ei.value) and "no other mirror" in str(ei.value)
    assert server.hits("norange") == []
    assert not (tmp_path / "data" / "raw").exists()
    cache = tmp_path / "cache" / "FashionMNIST"
    assert not (cache / name).exists() and no_partial_files(cache)


def test_fashion_mnist_class_names(server: Server, tmp_path: Path) -> None:
    files, _ = mnist_like(n_train=6, n_test=3)
    server.files.update(files)
    _, info, _ = run(data_params(source="fashion-mnist"), tmp_path, pin_files(files, (f"{server.base}/files/",)))
    assert info["class_names"][0] == "T-shirt/top" and info["class_names"][9] == "Ankle boot"


def test_plain_http_mirrors(server: Server, tmp_path: Path) -> None:
    files, _ = mnist_like()
    server.files.update(files)
    # An official plain-http mirror (as MNIST's second one) is left out, not fatal: the https or
    # loopback one is used.
    pins = pin_files(files, ("http://example.com/mnist/", f"{server.base}/files/"))
    df, _, _ = run(data_params(source="mnist"), tmp_path, pins)
    assert len(df) == 40
    # With only a plain-http official mirror (Fashion-MNIST, SVHN), the message says what to do.
    pins = pin_files(files, ("http://example.com/fashion/",))
    with pytest.raises(DownloadError, match="plain http.*data.mirrors.*data.allow_http"):
        run(data_params(source="fashion-mnist"), tmp_path / "b", pins)
    # A plain-http mirror the user wrote is a configuration error, refused before any request.
    before = len(server.requests)
    with pytest.raises(DownloadError, match="refusing plain-http mirror http://example.com/team"):
        run(data_params(source="mnist", mirrors=["http://example.com/team"]), tmp_path / "c",
            pin_files(files, (f"{server.base}/files/",)))
    assert len(server.requests) == before


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (binary tar.gz), SVHN (.mat), CelebA (zip + partition)
# ---------------------------------------------------------------------------------------------


def cifar_like(per_batch: int = 4, seed: int = 1) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 6 * per_batch
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    members = {f"cifar-10-batches-bin/data_batch_{i + 1}.bin":
               cifar_records(images[i * per_batch : (i + 1) * per_batch], labels[i * per_batch : (i + 1) * per_batch])
               for i in range(5)}
    members["cifar-10-batches-bin/test_batch.bin"] = cifar_records(images[5 * per_batch :], labels[5 * per_batch :])
    members["cifar-10-batches-bin/batches.meta.txt"] = "\n".join(CIFAR10_CLASSES).encode()
    return tar_gz(members), images, labels


@pytest.mark.parametrize("first_mirror", ["none", "truncate", "slow"])
def test_cifar10_binary_archive(server: Server, tmp_path: Path, first_mirror: str) -> None:
    tgz, images, labels = cifar_like()
    server.files["cifar-10-binary.tar.gz"] = tgz
    mirrors = [] if first_mirror == "none" else [f"{server.base}/{first_mirror}"]
    p = data_params(source="cifar10", mirrors=mirrors, timeout_s=0.3)
    df, info, out = run(p, tmp_path, pin_files({"cifar-10-binary.tar.gz": tgz}, (f"{server.base}/files/",)))
    x, y = arrays_of(out, df, "train")
    np.testing.assert_array_equal(x, images[:20])  # record layout CHW -> HWC exactly
    np.testing.assert_array_equal(y, labels[:20])
    x, y = arrays_of(out, df, "test")
    np.testing.assert_array_equal(x, images[20:])
    assert info["class_names"] == CIFAR10_CLASSES
    if first_mirror == "truncate":
        # Three tries of the cut-short mirror, then the good one continued the kept half.
        assert len(server.hits("truncate")) == 3
        assert server.hits("files") == [f"bytes={len(tgz) // 2}-"]
    elif first_mirror == "slow":
        assert len(server.hits("slow")) == 3 and server.hits("files") == [None]
    assert not (tmp_path / "cache" / "cifar-10-extracted").exists()  # extraction is scratch


def test_cifar10_archive_without_the_batches_is_refused(server: Server, tmp_path: Path) -> None:
    tgz = tar_gz({"cifar-10-batches-py/data_batch_1": b"pickled batches are never read"})
    server.files["cifar-10-binary.tar.gz"] = tgz
    with pytest.raises(DataError, match="data_batch_1.bin missing"):
        run(data_params(source="cifar10"), tmp_path, pin_files({"cifar-10-binary.tar.gz": tgz}, (f"{server.base}/files/",)))


def svhn_mat(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """SVHN's layout: X uint8 [32, 32, 3, N], y uint8 [N, 1] with digit 0 stored as 10."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    digits = np.arange(n) % 10
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": images.transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits)[:, None].astype(np.uint8)})
    return buf.getvalue(), images, digits


def test_svhn_mat_files(server: Server, tmp_path: Path) -> None:
    train, tr_x, tr_y = svhn_mat(12, 0)
    test, te_x, te_y = svhn_mat(5, 1)
    files = {"train_32x32.mat": train, "test_32x32.mat": test}
    server.files.update(files)
    df, info, out = run(data_params(source="svhn"), tmp_path, pin_files(files, (f"{server.base}/files/",)))
    x, y = arrays_of(out, df, "train")
    np.testing.assert_array_equal(x, tr_x)
    np.testing.assert_array_equal(y, tr_y)  # 10 -> 0
    x, y = arrays_of(out, df, "test")
    np.testing.assert_array_equal(x, te_x)
    np.testing.assert_array_equal(y, te_y)


def test_svhn_file_of_another_layout_is_a_data_error(server: Server, tmp_path: Path) -> None:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": np.zeros((4, 32, 32, 3), np.uint8), "y": np.zeros((4, 1), np.uint8)})
    files = {"train_32x32.mat": buf.getvalue(), "test_32x32.mat": buf.getvalue()}
    server.files.update(files)
    with pytest.raises(DataError, match=r"X \[32, 32, 3, N\]"):
        run(data_params(source="svhn"), tmp_path, pin_files(files, (f"{server.base}/files/",)))


def celeba_like(n: int = 9) -> tuple[dict[str, bytes], dict[str, str]]:
    jpgs = {f"{i + 1:06d}.jpg": encode(Image.fromarray(natural_image(i, 64)[:, :52]), "JPEG", quality=90)
            for i in range(n)}
    part = {name: str(i % 3) for i, name in enumerate(jpgs)}  # 0 train, 1 valid, 2 test
    files = {"img_align_celeba.zip": zip_bytes({f"img_align_celeba/{k}": v for k, v in jpgs.items()}),
             "list_eval_partition.txt": "".join(f"{k} {v}\n" for k, v in part.items()).encode()}
    return files, part


def test_celeba_needs_a_mirror(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="data.mirrors"):
        run(data_params(source="celeba"), tmp_path)


def test_celeba_from_a_team_mirror_with_partition_and_limit(server: Server, tmp_path: Path) -> None:
    files, part = celeba_like()
    server.files.update(files)
    pins = pin_files(files, ())
    df, info, out = run(data_params(source="celeba", mirrors=[f"{server.base}/files"]), tmp_path, pins)
    by_split = {s: sorted(Path(o).name for o in df.loc[df["split"] == s, "origin"]) for s in ("train", "test")}
    assert by_split["test"] == sorted(k for k, v in part.items() if v == "2")
    assert by_split["train"] == sorted(k for k, v in part.items() if v in "01")
    assert (df["label"] == -1).all() and info["class_names"] == []
    for f in df["file"]:
        with Image.open(out / f) as im:
            assert im.format == "JPEG" and im.size == (52, 64)
    assert not (tmp_path / "cache" / "celeba" / "extracted").exists()
    df, info, _ = run(data_params(source="celeba", mirrors=[f"{server.base}/files"], limit=2), tmp_path / "lim", pins)
    assert info["splits"] == {"test": 2, "train": 2}
    assert info["provenance"]["limit"] == {"test": {"available": 3, "kept": 2}, "train": {"available": 6, "kept": 2}}


def test_celeba_partition_file_of_another_format_is_refused(server: Server, tmp_path: Path) -> None:
    files, _ = celeba_like(3)
    files["list_eval_partition.txt"] = b"000001.jpg train\n"
    server.files.update(files)
    with pytest.raises(DataError, match="list_eval_partition.txt:1"):
        run(data_params(source="celeba", mirrors=[f"{server.base}/files"]), tmp_path, pin_files(files, ()))


# ---------------------------------------------------------------------------------------------
# Archives and array files by URL or path
# ---------------------------------------------------------------------------------------------


def class_folder_files(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> dict[str, bytes]:
    return {f"pets/{c}/{i}.jpg": encode(Image.fromarray(natural_image(10 * k + i, 32)), "JPEG")
            for k, c in enumerate(classes) for i in range(per_class)}


def test_archive_by_url_with_pinned_sha256(server: Server, tmp_path: Path) -> None:
    members = class_folder_files()
    members["__MACOSX/pets/._0.jpg"] = b"AppleDouble junk"
    archive = zip_bytes(members)
    server.files["pets.zip"] = archive
    url = f"{server.base}/files/pets.zip"
    df, info, out = run(data_params(source="archive", path=url, sha256=sha256_bytes(archive)), tmp_path)
    assert info["class_names"] == ["cat", "dog"]
    assert sorted(df["origin"]) == sorted(m.removeprefix("pets/") for m in members if m.startswith("pets/"))
    assert dict(zip(df["origin"], df["label"])) == {m.removeprefix("pets/"): int("dog" in m) for m in members
                                                      if m.startswith("pets/")}
    for rel in df["file"]:
        assert (out / rel).read_bytes() == members["pets/" + rel.removeprefix("files/")]
    assert info["provenance"]["skipped"] == [{"path": "__MACOSX/", "reason": "hidden", "split": ""}]
    assert not any(p.name.startswith("extracted-") for p in (tmp_path / "cache").iterdir())

    with pytest.raises(UserError, match="data.sha256"):
        run(data_params(source="archive", path=url), tmp_path / "nopin")
    with pytest.raises(ChecksumError):
        run(data_params(source="archive", path=url, sha256="0" * 64), tmp_path / "badpin")
    assert not (tmp_path / "badpin" / "data" / "raw").exists()


def test_local_archive_is_checked_against_a_given_pin(tmp_path: Path) -> None:
    path = tmp_path / "pets.tar.gz"
    path.write_bytes(tar_gz(class_folder_files(per_class=1)))
    with pytest.raises(ChecksumError, match="data.sha256"):
        run(data_params(source="archive", path=str(path), sha256="f" * 64), tmp_path)
    df, _, _ = run(data_params(source="archive", path=str(path), sha256=sha256_bytes(path.read_bytes())), tmp_path)
    assert len(df) == 2


def test_hostile_archive_is_refused_whole(tmp_path: Path) -> None:
    import tarfile

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        good = tarfile.TarInfo("pets/cat/0.jpg")
        data = encode(Image.fromarray(natural_image(0, 16)), "JPEG")
        good.size = len(data)
        tf.addfile(good, io.BytesIO(data))
        link = tarfile.TarInfo("pets/cat/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(ArchiveError, match="'pets/cat/passwd'.*symbolic link"):
        run(data_params(source="archive", path=str(path)), tmp_path)
    assert not (tmp_path / "data" / "raw").exists()
    assert not any(p.name.startswith("extracted-") for p in (tmp_path / "cache").iterdir())


def test_npz_by_url_in_nchw_float_and_uint16(server: Server, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x_train = rng.random((6, 3, 12, 10)).astype(np.float32)  # NCHW in [0, 1]
    x_test = rng.integers(0, 65536, (2, 12, 10), dtype=np.uint16)
    buf = io.BytesIO()
    np.savez(buf, x_train=x_train, y_train=np.arange(6) % 2, x_test=x_test, y_test=np.array([0, 1]),
             class_names=np.array(["a", "b"]))
    server.files["arrays.npz"] = buf.getvalue()
    p = data_params(source="npz", path=f"{server.base}/files/arrays.npz", sha256=sha256_bytes(buf.getvalue()))
    df, info, out = run(p, tmp_path)
    x, y = arrays_of(out, df, "train")
    np.testing.assert_array_equal(x, np.rint(x_train.transpose(0, 2, 3, 1).astype(np.float64) * 255).astype(np.uint8))
    np.testing.assert_array_equal(y, np.arange(6) % 2)
    x, _ = arrays_of(out, df, "test")
    np.testing.assert_array_equal(x, (x_test >> 8).astype(np.uint8))  # scaled like a 16-bit PNG, not clipped
    assert info["class_names"] == ["a", "b"]


class _Payload:
    """Unpickling this would create a marker file: the test proves that never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_npz_with_pickled_objects_is_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.npz"
    np.savez(path, images=np.array([_Payload(marker)], dtype=object))
    assert pickle.loads(pickle.dumps(_Payload(marker))) is None and marker.exists()  # control: the trap works
    marker.unlink()
    with pytest.raises(DataError, match="pickle"):
        run(data_params(source="npz", path=str(path)), tmp_path)
    assert not marker.exists()


def test_local_idx_directory_plain_and_dotted_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = np.arange(7, dtype=np.uint8) % 2
    d = tmp_path / "idx"
    d.mkdir()
    (d / "train-images.idx3-ubyte").write_bytes(idx_bytes(x, gz=False))  # Debian/Kaggle spelling, not gzipped
    (d / "train-labels-idx1-ubyte.gz").write_bytes(idx_bytes(y))
    df, info, out = run(data_params(source="idx", path=str(d)), tmp_path)
    assert info["splits"] == {"train": 7}  # no t10k files: no test split (preprocess makes one)
    got, labels = arrays_of(out, df, "train")
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, y)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(idx_bytes(y[:5]))
    with pytest.raises(DataError, match="labels for 7 images"):
        run(data_params(source="idx", path=str(d)), tmp_path / "b")
    (d / "train-images.idx3-ubyte").write_bytes(idx_bytes(x, gz=False)[:-10])
    with pytest.raises(DataError, match="IDX header says"):
        run(data_params(source="idx", path=str(d)), tmp_path / "c")
    (d / "train-images.idx3-ubyte").unlink()
    (d / IDX_NAME).write_bytes(idx_bytes(x)[:40])
    with pytest.raises(DataError, match="corrupt gzip"):
        run(data_params(source="idx", path=str(d)), tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# Folders and data.limit
# ---------------------------------------------------------------------------------------------


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_folder_layouts_and_everything_that_is_skipped(tmp_path: Path) -> None:
    png = encode(Image.fromarray(natural_image(1, 16)), "PNG")
    root = tmp_path / "photos"
    write_files(root, {"train/cat/a.png": png, "train/cat/deep/b.png": png, "train/dog/c.png": png,
                       "val/cat/d.png": png, "test/dog/e.png": png, "README.txt": b"my pictures",
                       "train/loose.png": png, "train/.DS_Store": b"x", "train/dog/.hidden.png": png,
                       ".git/config": b"[core]", "__MACOSX/train/._a.png": b"x"})
    os.symlink(root / "train/cat/a.png", root / "train/dog/link.png")
    os.symlink(root / "train/cat", root / "train/linked_dir")
    os.mkfifo(root / "train/cat/pipe.png")
    df, info, out = run(data_params(source="folder", path=str(root)), tmp_path)
    got = {o: (s, lab) for o, s, lab in zip(df["origin"], df["split"], df["label"])}
    assert got == {"train/cat/a.png": ("train", 0), "train/cat/deep/b.png": ("train", 0),
                   "train/dog/c.png": ("train", 1), "val/cat/d.png": ("test", 0), "test/dog/e.png": ("test", 1)}
    assert info["class_names"] == ["cat", "dog"]
    skipped = {s["path"]: s["reason"] for s in info["provenance"]["skipped"]}
    assert skipped == {".git/": "hidden", "README.txt": "outside_split_folders", "__MACOSX/": "hidden",
                       "train/.DS_Store": "hidden", "train/loose.png": "outside_class_folders",
                       "train/dog/.hidden.png": "hidden", "train/dog/link.png": "symlink_not_followed",
                       "train/linked_dir": "symlink_not_followed", "train/cat/pipe.png": "not_a_regular_file"}
    assert (out / "files/train/cat/deep/b.png").read_bytes() == png


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    png = encode(Image.fromarray(natural_image(2, 16)), "PNG")
    write_files(tmp_path / "flat", {f"{i}.png": png for i in range(3)})
    df, info, _ = run(data_params(source="folder", path=str(tmp_path / "flat")), tmp_path)
    assert list(df["label"]) == [-1, -1, -1] and info["class_names"] == [] and set(df["split"]) == {""}


def test_limit_keeps_every_class_of_folders_and_arrays(tmp_path: Path) -> None:
    png = encode(Image.fromarray(natural_image(3, 16)), "PNG")
    write_files(tmp_path / "f", {f"{c}/{i}.png": png for c in "abc" for i in range(5)})
    df, info, _ = run(data_params(source="folder", path=str(tmp_path / "f"), limit=6), tmp_path)
    assert list(df["origin"]) == ["a/0.png", "a/2.png", "b/0.png", "b/2.png", "c/0.png", "c/2.png"]
    assert info["provenance"]["limit"] == {"all": {"kept": 6, "available": 15}}
    npz = tmp_path / "a.npz"
    np.savez(npz, images=np.zeros((15, 8, 8), np.uint8), labels=np.repeat(np.arange(3), 5))
    df, info, _ = run(data_params(source="npz", path=str(npz), limit=6), tmp_path / "n")
    assert list(df["label"]) == [0, 0, 1, 1, 2, 2] and list(df["index"]) == list(range(6))
    assert list(pick(15, 6)) == [0, 2, 5, 7, 10, 12] and list(pick(4, 10)) == [0, 1, 2, 3]


def test_a_folder_of_only_skipped_files_is_a_clear_error(tmp_path: Path) -> None:
    write_files(tmp_path / "f", {".a.png": b"x"})
    with pytest.raises(DataError, match="produced no items"):
        run(data_params(source="folder", path=str(tmp_path / "f")), tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        run(data_params(source="folder", path=str(tmp_path / "nope")), tmp_path)
