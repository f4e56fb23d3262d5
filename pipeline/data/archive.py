"""Archive extraction that refuses hostile archives whole.

Dataset archives come from the internet or from colleagues, so an archive is checked member by
member *before* a single byte is written, and any one bad member refuses the whole archive:
partially extracting a dataset and carrying on would hide the problem and leave a half-written
folder. The rules (the README's "Guarantees under failure" lists the tests that hold them):

* Names: no absolute paths, no ``..`` components, no drive letters, no backslashes, no NUL.
* Links: *every* symbolic or hard link is refused, wherever it points. Dataset archives never
  need links, and refusing all of them rules out every link-escape trick (a link to ``/etc``
  followed by a member written "through" it, a link chain, a hard link to a file outside)
  without having to reason about link resolution. This is stricter than tar's "data" filter.
* Types: only regular files and folders; devices, FIFOs and anything unknown are refused.
* Caps: member count, sum of declared uncompressed sizes, and the ratio of that sum to the
  archive's size on disk (a decompression bomb declares far more than it occupies). For tar the
  caps are checked as the headers are read, so a bomb is refused before its body is inflated.

Then the archive is extracted into a temporary sibling of ``dest`` that is renamed into place
(:func:`pipeline.io.staged_dir`), with tar's ``filter="data"`` as defence in depth. Zip members
are streamed through a counter, because a zip's declared sizes are only claims: real bytes beyond
the declared size or the total cap abort the extraction and the temporary folder is removed.
"""

from __future__ import annotations

import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ArchiveError
from ..io import staged_dir

__all__ = ["safe_extract"]

_CHUNK = 1 << 20
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# Errors the decompressors and readers raise on corrupt or truncated data.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_members: int = 1_000_000,
    max_total_bytes: int = 64 * 2**30,
    max_ratio: float = 200.0,
) -> list[Path]:
    """Extract ``archive`` so that ``dest`` holds exactly its files; refuse it whole if hostile.

    archive: a .zip, .tar, .tar.gz/.tgz, .tar.bz2 or .tar.xz file (recognised by content).
    dest: folder to create. An existing ``dest`` is *replaced as a whole* once extraction has
        succeeded (stage-output semantics); a refused or failed extraction leaves it untouched.
    max_members: most entries (files and folders) the archive may have.
    max_total_bytes: most bytes the files may hold once extracted (declared, and counted while
        writing zip members).
    max_ratio: most (declared uncompressed bytes) / (archive size in bytes); beyond it the
        archive is treated as a decompression bomb.

    Returns the extracted regular files (paths under ``dest``), sorted. Raises
    :class:`ArchiveError` naming the archive, the first offending member and the rule.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found (or not a file); check the path or download it first")
    if dest.exists() and not dest.is_dir():
        raise ArchiveError(f"{dest}: extraction target exists and is not a folder; choose another dest")
    if archive.resolve().is_relative_to(dest.resolve()):
        raise ArchiveError(f"{archive} lies inside the extraction target {dest}, which is replaced; move it out first")
    if max_members < 0 or max_total_bytes < 0 or max_ratio <= 0:
        raise ArchiveError(
            f"extraction caps must be non-negative (max_ratio > 0), got max_members={max_members}, "
            f"max_total_bytes={max_total_bytes}, max_ratio={max_ratio}"
        )
    budget = _Budget(archive, archive.stat().st_size, max_members, max_total_bytes, max_ratio)

    try:
        is_tar = tarfile.is_tarfile(archive)
        # Tar first: an uncompressed tar whose last member is a zip can look like a zip (a zip is
        # recognised by its trailer), while a tar is recognised by a checksummed first header.
        is_zip = not is_tar and zipfile.is_zipfile(archive)
    except OSError as exc:
        raise ArchiveError(f"{archive}: cannot read ({exc.strerror or exc})") from None
    if is_tar:
        _extract_tar(archive, dest, budget)
    elif is_zip:
        _extract_zip(archive, dest, budget)
    else:
        raise ArchiveError(
            f"{archive}: not a zip or tar archive (checked by content, not name); "
            "supported: .zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz"
        )
    return sorted(p for p in dest.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Checks shared by both formats
# --------------------------------------------------------------------------------------------


class _Refused(Exception):
    """A member breaks a rule; the message is the rule, turned into an ArchiveError by the caller.

    ``hostile`` is False for the caps, which a large but honest archive can also exceed.
    """

    def __init__(self, rule: str, *, hostile: bool = True) -> None:
        super().__init__(rule)
        self.hostile = hostile


@dataclass
class _Budget:
    archive: Path
    archive_bytes: int
    max_members: int
    max_total_bytes: int
    max_ratio: float
    members: int = field(default=0)
    declared_bytes: int = field(default=0)

    def add(self, declared_size: int) -> None:
        """Count one member of ``declared_size`` bytes; raise _Refused once a cap is passed."""
        self.members += 1
        self.declared_bytes += max(declared_size, 0)
        if self.members > self.max_members:
            raise _Refused(
                f"is entry number {self.members}, over the cap of max_members={self.max_members}; "
                "if the archive is trusted and really this large, raise max_members",
                hostile=False,
            )
        if self.declared_bytes > self.max_total_bytes:
            raise _Refused(
                f"brings the declared uncompressed total to {self.declared_bytes} bytes, over "
                f"max_total_bytes={self.max_total_bytes}; if the archive is trusted, raise max_total_bytes",
                hostile=False,
            )
        ratio = self.declared_bytes / max(self.archive_bytes, 1)
        if ratio > self.max_ratio:
            raise _Refused(
                f"brings the declared uncompressed total to {self.declared_bytes} bytes, "
                f"{ratio:.0f}x the archive's {self.archive_bytes} bytes, over max_ratio={self.max_ratio:g} "
                "(a decompression bomb); if the archive is trusted, raise max_ratio",
                hostile=False,
            )


def _safe_parts(name: str) -> tuple[str, ...]:
    """Split a member name into path parts that stay inside the destination, or raise _Refused."""
    if not name:
        raise _Refused("has an empty name")
    if "\x00" in name:
        raise _Refused("has a NUL byte in its name")
    if "\\" in name:
        # On Windows (or a tool that treats "\" as a separator) "a\..\..\x" escapes, and on POSIX
        # it makes a file with a backslash in its name: neither is wanted.
        raise _Refused("has a backslash in its name (a Windows path separator trick)")
    if name.startswith("/"):
        raise _Refused("has an absolute path")
    if _DRIVE_RE.match(name):
        raise _Refused("starts with a drive letter")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Refused("has a '..' component that climbs out of the destination")
    return parts


def _refuse(archive: Path, member: str, rule: str, *, hostile: bool = True) -> ArchiveError:
    hint = " Normal tools do not make such archives: check where this file came from." if hostile else ""
    return ArchiveError(f"refused archive {archive}: member {member!r} {rule}. Nothing was extracted.{hint}")


# --------------------------------------------------------------------------------------------
# tar
# --------------------------------------------------------------------------------------------


def _tar_rule(ti: tarfile.TarInfo) -> str | None:
    """Why the member's type is refused, or None for a regular file or folder."""
    if ti.isreg() or ti.isdir():
        return None
    if ti.issym():
        return f"is a symbolic link to {ti.linkname!r}; links are refused, whatever they point at"
    if ti.islnk():
        return f"is a hard link to {ti.linkname!r}; links are refused, whatever they point at"
    if ti.ischr():
        return "is a character device; only regular files and folders are extracted"
    if ti.isblk():
        return "is a block device; only regular files and folders are extracted"
    if ti.isfifo():
        return "is a FIFO (named pipe); only regular files and folders are extracted"
    return f"has unsupported tar type {ti.type!r}; only regular files and folders are extracted"


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        tf = tarfile.open(archive, "r:*")
    except _CORRUPT as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc}); download it again") from None
    with tf:
        members: list[tarfile.TarInfo] = []
        name = "<first member>"
        try:
            # Iterating reads one header at a time, so the caps stop a bomb before its body is
            # decompressed (tarfile only inflates a member's data when skipping to the next header).
            for ti in tf:
                name = ti.name
                parts = _safe_parts(ti.name)
                rule = _tar_rule(ti)
                if rule is not None:
                    raise _Refused(rule)
                if not parts and not ti.isdir():
                    raise _Refused("names the destination folder itself but is not a folder")
                budget.add(ti.size if ti.isreg() else 0)
                members.append(ti)
        except _Refused as exc:
            raise _refuse(archive, name, str(exc), hostile=exc.hostile) from None
        except _CORRUPT as exc:
            raise ArchiveError(f"{archive}: corrupt or truncated after member {name!r} ({exc}); download it again") from None

        with staged_dir(dest) as tmp:
            try:
                # filter="data" re-checks names, links and special files and drops unsafe mode
                # bits: a second, independent line of defence behind the checks above.
                tf.extractall(tmp, members=members, filter="data")
            except _CORRUPT as exc:
                raise ArchiveError(f"{archive}: extraction failed ({exc}); nothing was extracted") from None


# --------------------------------------------------------------------------------------------
# zip
# --------------------------------------------------------------------------------------------


def _zip_rule(info: zipfile.ZipInfo) -> str | None:
    """Why the member is refused (link, special file, encryption, method), or None."""
    mode = info.external_attr >> 16  # Unix st_mode, when the creating tool recorded one
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        return "is a symbolic link (Unix mode in the zip); links are refused, whatever they point at"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return f"is a special file (Unix mode {mode:o}); only regular files and folders are extracted"
    if info.flag_bits & 0x1:
        return "is encrypted; decrypt the archive first"
    if info.compress_type not in _ZIP_METHODS:
        return f"uses zip compression method {info.compress_type}, which is not supported; repack it with deflate"
    return None


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable zip archive ({exc}); download it again") from None
    with zf:
        checked: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        for info in zf.infolist():
            try:
                parts = _safe_parts(info.filename)
                rule = _zip_rule(info)
                if rule is not None:
                    raise _Refused(rule)
                if not parts and not info.is_dir():
                    raise _Refused("names the destination folder itself but is not a folder")
                budget.add(0 if info.is_dir() else info.file_size)
            except _Refused as exc:
                raise _refuse(archive, info.filename, str(exc), hostile=exc.hostile) from None
            checked.append((info, parts))

        with staged_dir(dest) as tmp:
            written = 0  # real bytes written so far, all members
            for info, parts in checked:
                if not parts:
                    continue
                target = tmp.joinpath(*parts)
                try:
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    written += _copy_member(zf, info, target, archive, written, budget.max_total_bytes)
                except _CORRUPT as exc:
                    raise ArchiveError(
                        f"{archive}: member {info.filename!r} could not be extracted ({exc}); "
                        "the archive is corrupt. Nothing was extracted."
                    ) from None


def _copy_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path, written_before: int, max_total: int
) -> int:
    """Stream one member to ``target``, counting real bytes; return how many were written."""
    n = 0
    with zf.open(info) as fin, open(target, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            n += len(chunk)
            if n > info.file_size:
                raise _refuse(archive, info.filename, f"inflates past its declared size of {info.file_size} bytes")
            if written_before + n > max_total:
                raise _refuse(
                    archive, info.filename, f"takes the bytes actually written past max_total_bytes={max_total}",
                    hostile=False,
                )
            fout.write(chunk)
    if n != info.file_size:
        raise _refuse(
            archive, info.filename, f"holds {n} bytes but declares {info.file_size} (a lying or truncated entry)"
        )
    return n

