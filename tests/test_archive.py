"""Tests for pipeline.data.archive.safe_extract with archives built here by zipfile and tarfile.

Every hostile case checks three things: ArchiveError is raised, its message names the offending
member, and nothing was written anywhere: ``dest`` was not created (or an existing one is
unchanged), no temporary folder is left beside it, and no file appeared where the hostile member
pointed outside.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from pipeline.data.archive import safe_extract
from pipeline.errors import ArchiveError

GOOD_FILES = {
    "ds/README.txt": b"a small dataset\n",
    "ds/train/0001.bin": bytes(range(256)) * 4,
    "ds/train/sub/0002.bin": b"\x00\x01" * 300,
    "ds/test/0003.bin": b"xyz",
}


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def tar_info(name: str, *, size: int = 0, type: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname, ti.mode = size, type, linkname, 0o644
    return ti


def build_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def tar_files(files: dict[str, bytes]) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [(tar_info(n, size=len(b)), b) for n, b in files.items()]


def build_zip(path: Path, files: dict[str, bytes], *, unix_modes: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if unix_modes and name in unix_modes:
                info.create_system = 3
                info.external_attr = unix_modes[name] << 16
            zf.writestr(info, data)
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    return d


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """The extraction target, inside its own parent so stray temp folders can be spotted."""
    return tmp_path / "out" / "dataset"


def assert_refused(archive: Path, dest: Path, member: str, *, rule: str = "", **caps: object) -> str:
    parent = dest.parent
    before = sorted(os.listdir(parent)) if parent.exists() else None
    old = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} if dest.exists() else None
    with pytest.raises(ArchiveError) as ei:
        safe_extract(archive, dest, **caps)
    msg = str(ei.value)
    assert repr(member) in msg, msg
    assert archive.name in msg
    assert rule in msg, msg
    if old is None:
        assert not dest.exists()
    else:  # an existing dest is left exactly as it was
        assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == old
    after = sorted(os.listdir(parent)) if parent.exists() else None
    assert after == before or (before is None and after == []), f"left behind in {parent}: {after}"
    return msg


# --------------------------------------------------------------------------------------------
# Good archives
# --------------------------------------------------------------------------------------------


def _check_good(got: list[Path], dest: Path) -> None:
    assert got == sorted(dest / n for n in GOOD_FILES)
    for name, data in GOOD_FILES.items():
        assert (dest / name).read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temp folder left


def test_good_zip_extracts(src: Path, dest: Path) -> None:
    _check_good(safe_extract(build_zip(src / "good.zip", GOOD_FILES), dest), dest)


@pytest.mark.parametrize("mode", ["w:gz", "w", "w:bz2", "w:xz"])
def test_good_tar_extracts_in_every_compression(src: Path, dest: Path, mode: str) -> None:
    # A neutral name: the format is recognised by content, not by the extension.
    archive = build_tar(src / "download.bin", tar_files(GOOD_FILES), mode)
    _check_good(safe_extract(archive, dest), dest)


def test_tar_made_from_dot_with_folder_entries_extracts(src: Path, dest: Path) -> None:
    entries = [(tar_info("./", type=tarfile.DIRTYPE), None), (tar_info("./ds/", type=tarfile.DIRTYPE), None)]
    entries += tar_files({"./" + n: b for n, b in GOOD_FILES.items()})
    _check_good(safe_extract(build_tar(src / "dot.tgz", entries), dest), dest)


def test_zip_with_folder_entries_extracts(src: Path, dest: Path) -> None:
    files = {"ds/": b"", "ds/empty/": b"", **GOOD_FILES}
    got = safe_extract(build_zip(src / "dirs.zip", files), dest)
    assert got == sorted(dest / n for n in GOOD_FILES)
    assert (dest / "ds/empty").is_dir()


def test_existing_dest_is_replaced_as_a_whole(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from an older run")
    _check_good(safe_extract(build_zip(src / "good.zip", GOOD_FILES), dest), dest)
    assert not (dest / "stale.txt").exists()


def test_tar_file_modes_are_sanitised(src: Path, dest: Path) -> None:
    ti = tar_info("run.sh", size=3)
    ti.mode = 0o4777  # setuid and world-writable
    safe_extract(build_tar(src / "m.tgz", [(ti, b"hi\n")]), dest)
    mode = (dest / "run.sh").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_IWOTH)


# --------------------------------------------------------------------------------------------
# Hostile names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_dotdot_member_is_refused(src: Path, dest: Path, tmp_path: Path, fmt: str) -> None:
    files = {**GOOD_FILES, "../escaped.txt": b"pwned", "ds/zzz.txt": b"after"}
    archive = build_zip(src / "a.zip", files) if fmt == "zip" else build_tar(src / "a.tgz", tar_files(files))
    assert_refused(archive, dest, "../escaped.txt", rule="'..'")
    assert not (dest.parent / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_dotdot_in_the_middle_is_refused(src: Path, dest: Path, fmt: str) -> None:
    files = {"ds/a.txt": b"a", "ds/../../../x.txt": b"pwned"}
    archive = build_zip(src / "a.zip", files) if fmt == "zip" else build_tar(src / "a.tgz", tar_files(files))
    assert_refused(archive, dest, "ds/../../../x.txt", rule="'..'")


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_absolute_member_is_refused(src: Path, dest: Path, tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "absolute_target.txt"  # where a naive extractor would write
    files = {"ds/a.txt": b"a", str(target): b"pwned"}
    if fmt == "zip":
        archive = src / "a.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("ds/a.txt", b"a")
            info = zipfile.ZipInfo("x")
            info.filename = str(target)  # ZipInfo() strips a leading "/"; a hostile tool does not
            zf.writestr(info, b"pwned")
    else:
        archive = build_tar(src / "a.tgz", tar_files(files))
    assert_refused(archive, dest, str(target), rule="absolute path")
    assert not target.exists()


@pytest.mark.parametrize(
    ("name", "rule"),
    [("..\\..\\evil.txt", "backslash"), ("C:/Windows/evil.txt", "drive letter"), ("c:evil.txt", "drive letter")],
)
def test_windows_path_tricks_are_refused(src: Path, dest: Path, name: str, rule: str) -> None:
    archive = build_zip(src / "win.zip", {"ds/a.txt": b"a", name: b"pwned"})
    assert_refused(archive, dest, name, rule=rule)


# --------------------------------------------------------------------------------------------
# Links and special files
# --------------------------------------------------------------------------------------------


def test_symlink_escaping_dest_is_refused(src: Path, dest: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = tar_files({"ds/a.txt": b"a"})
    entries += [(tar_info("ds/link", type=tarfile.SYMTYPE, linkname=str(outside)), None)]
    entries += tar_files({"ds/link/pwned.txt": b"written through the link"})
    assert_refused(build_tar(src / "s.tgz", entries), dest, "ds/link", rule="symbolic link")
    assert list(outside.iterdir()) == []


def test_relative_symlink_climbing_out_is_refused(src: Path, dest: Path) -> None:
    entries = [(tar_info("up", type=tarfile.SYMTYPE, linkname="../../.."), None)]
    assert_refused(build_tar(src / "s.tar", entries, "w"), dest, "up", rule="symbolic link")


def test_symlink_inside_dest_is_refused_too(src: Path, dest: Path) -> None:
    # Policy: every link is refused, even a harmless-looking one (see the module docstring).
    entries = tar_files({"ds/a.txt": b"a"}) + [(tar_info("ds/b.txt", type=tarfile.SYMTYPE, linkname="a.txt"), None)]
    assert_refused(build_tar(src / "s.tgz", entries), dest, "ds/b.txt", rule="links are refused")


def test_hardlink_escaping_dest_is_refused(src: Path, dest: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not touch")
    entries = tar_files({"ds/a.txt": b"a"})
    entries += [(tar_info("ds/hl", type=tarfile.LNKTYPE, linkname=str(secret)), None)]
    entries += [(tar_info("ds/hl2", type=tarfile.LNKTYPE, linkname="../../secret.txt"), None)]
    assert_refused(build_tar(src / "h.tgz", entries), dest, "ds/hl", rule="hard link")
    assert secret.read_text() == "do not touch" and secret.stat().st_nlink == 1


def test_zip_symlink_member_is_refused(src: Path, dest: Path) -> None:
    archive = build_zip(src / "l.zip", {"ds/a.txt": b"a", "ds/link": b"/etc/passwd"},
                        unix_modes={"ds/link": stat.S_IFLNK | 0o777})
    assert_refused(archive, dest, "ds/link", rule="symbolic link")


@pytest.mark.parametrize(
    ("type", "rule"),
    [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "FIFO")],
)
def test_device_and_fifo_members_are_refused(src: Path, dest: Path, type: bytes, rule: str) -> None:
    dev = tar_info("ds/dev", type=type)
    dev.devmajor, dev.devminor = 1, 3  # /dev/null's numbers
    entries = tar_files({"ds/a.txt": b"a"}) + [(dev, None)]
    assert_refused(build_tar(src / "d.tgz", entries), dest, "ds/dev", rule=rule)


def test_zip_device_member_is_refused(src: Path, dest: Path) -> None:
    archive = build_zip(src / "d.zip", {"ds/a.txt": b"a", "ds/null": b""}, unix_modes={"ds/null": stat.S_IFCHR | 0o666})
    assert_refused(archive, dest, "ds/null", rule="special file")


# --------------------------------------------------------------------------------------------
# Caps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_too_many_members_is_refused(src: Path, dest: Path, fmt: str) -> None:
    files = {f"f{i}.txt": b"x" for i in range(5)}
    archive = build_zip(src / "n.zip", files) if fmt == "zip" else build_tar(src / "n.tgz", tar_files(files))
    assert_refused(archive, dest, "f3.txt", rule="max_members=3", max_members=3)
    assert len(safe_extract(archive, dest, max_members=5)) == 5  # exactly at the cap is fine


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_declared_total_over_cap_is_refused(src: Path, dest: Path, fmt: str) -> None:
    files = {"a.bin": b"a" * 600, "b.bin": b"b" * 600}
    archive = build_zip(src / "t.zip", files) if fmt == "zip" else build_tar(src / "t.tgz", tar_files(files))
    assert_refused(archive, dest, "b.bin", rule="max_total_bytes=1000", max_total_bytes=1000, max_ratio=1e9)


def test_tar_ratio_bomb_is_refused(src: Path, dest: Path) -> None:
    zeros = bytes(50 * 2**20)  # 50 MiB of zeros gzip to ~50 KiB: a ratio near 1000
    archive = build_tar(src / "bomb.tar.gz", tar_files({"ds/a.txt": b"a", "ds/zeros.bin": zeros}))
    assert archive.stat().st_size < 200_000
    assert_refused(archive, dest, "ds/zeros.bin", rule="decompression bomb")


def test_zip_ratio_bomb_is_refused(src: Path, dest: Path) -> None:
    archive = build_zip(src / "bomb.zip", {"ds/a.txt": b"a", "ds/zeros.bin": bytes(50 * 2**20)})
    assert_refused(archive, dest, "ds/zeros.bin", rule="max_ratio=200")


def test_ratio_cap_is_a_parameter(src: Path, dest: Path) -> None:
    archive = build_zip(src / "z.zip", {"zeros.bin": bytes(2**20)})  # ~1000x
    assert_refused(archive, dest, "zeros.bin", rule="max_ratio=10", max_ratio=10)
    assert safe_extract(archive, dest, max_ratio=5000) == [dest / "zeros.bin"]


def _patch_zip_sizes(path: Path, member: str, new_size: int) -> None:
    """Rewrite the uncompressed size a zip declares for ``member`` (local header and central directory)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    local = data.find(b"PK\x03\x04")
    while local != -1:  # local file header: size at offset 22, name length at 26, name at 30
        if data[local + 30 : local + 30 + len(name)] == name:
            struct.pack_into("<I", data, local + 22, new_size)
        local = data.find(b"PK\x03\x04", local + 4)
    central = data.find(b"PK\x01\x02")
    while central != -1:  # central directory header: size at offset 24, name at 46
        if data[central + 46 : central + 46 + len(name)] == name:
            struct.pack_into("<I", data, central + 24, new_size)
        central = data.find(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("delta", [-500, +500])
def test_zip_whose_declared_size_lies_is_refused_while_streaming(src: Path, dest: Path, delta: int) -> None:
    real = os.urandom(3000)
    archive = build_zip(src / "liar.zip", {"ds/a.txt": b"a", "ds/liar.bin": real, "ds/z.txt": b"z"})
    _patch_zip_sizes(archive, "ds/liar.bin", len(real) + delta)
    assert zipfile.ZipFile(archive).getinfo("ds/liar.bin").file_size == len(real) + delta
    # The lie passes every up-front check; it is caught while bytes are counted (or by the CRC
    # check that comes with them), and the half-written temporary folder is removed.
    dest.mkdir(parents=True)
    (dest / "previous.txt").write_text("kept")
    assert_refused(archive, dest, "ds/liar.bin")
    assert (dest / "previous.txt").read_text() == "kept"


# --------------------------------------------------------------------------------------------
# Not archives, broken archives, bad arguments
# --------------------------------------------------------------------------------------------


def test_non_archive_is_refused(src: Path, dest: Path) -> None:
    junk = src / "data.zip"
    junk.write_bytes(b"this is not an archive at all\n" * 100)
    with pytest.raises(ArchiveError, match="not a zip or tar archive"):
        safe_extract(junk, dest)
    assert not dest.exists()


def test_truncated_tar_gz_is_refused_whole(src: Path, dest: Path) -> None:
    big = {f"ds/{i}.bin": os.urandom(20_000) for i in range(5)}
    archive = build_tar(src / "cut.tgz", tar_files(big))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="cut.tgz"):
        safe_extract(archive, dest)
    assert not dest.exists() and not dest.parent.exists()


def test_corrupt_zip_member_is_refused_whole(src: Path, dest: Path) -> None:
    archive = build_zip(src / "crc.zip", {"ds/a.txt": b"a" * 100, "ds/b.bin": os.urandom(4000)})
    data = bytearray(archive.read_bytes())
    crc_at = data.find(b"PK\x01\x02", 0) + 16  # first central entry's CRC-32
    struct.pack_into("<I", data, crc_at, zlib.crc32(b"something else"))
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="'ds/a.txt'"):
        safe_extract(archive, dest)
    assert not dest.exists() and os.listdir(dest.parent) == []


def test_missing_archive_and_file_dest_are_user_errors(src: Path, dest: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not found"):
        safe_extract(src / "nope.zip", dest)
    archive = build_zip(src / "good.zip", GOOD_FILES)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ArchiveError, match="not a folder"):
        safe_extract(archive, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"


def test_archive_inside_dest_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "ds"
    dest.mkdir()
    archive = build_zip(dest / "self.zip", GOOD_FILES)
    with pytest.raises(ArchiveError, match="lies inside"):
        safe_extract(archive, dest)
    assert archive.exists()
