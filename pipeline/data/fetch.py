"""Downloads that cannot corrupt the cache.

A dataset file is fetched from an ordered list of mirrors and only ever appears under its final
name once its bytes match a pinned sha256. The rules (the README's "Guarantees under failure" lists
the tests that hold them):

* Bytes stream into ``<dest>.part`` beside the destination; a verified ``.part`` is renamed over
  ``dest`` with :func:`os.replace`, so a reader sees the old file or the new one, never a mix.
  A killed download leaves only the ``.part``, which the next run resumes with an HTTP ``Range``.
* A checksum mismatch is fatal: the ``.part`` is removed and no other mirror is tried. Shopping
  for a mirror that happens to agree would defeat the pin. Only *network* errors (refused,
  timeout, 4xx/5xx from that mirror, a body cut short) move on to the next mirror, after
  ``retries_per_mirror`` retries of the same mirror (none for 404/410: the file is not there).
* https only, unless the host is loopback (tests, a local cache server) or the caller opts in
  with ``allow_http`` (``data.allow_http`` in params.yaml). A redirect never downgrades https to
  http, and no redirect leaves http(s).
* A mirror may also be a ``file://`` URL or a local path (a file, or a folder holding a file of
  ``dest``'s name), so a team can point at a shared folder and an offline user can pass a copy.
"""

from __future__ import annotations

import http.client
import ipaddress
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from ..errors import ChecksumError, DownloadError
from ..io import sha256_file

__all__ = ["FileSpec", "USER_AGENT", "fetch", "is_loopback_url"]

USER_AGENT = "pipeline-fetch/0.1 (reproducible GAN/VAE pipeline; python-urllib)"

# Backoff before retry k (k = 1, 2, ...) of the same mirror: 0.2 s, 0.4 s, ... capped. Short on
# purpose: a mirror that is down for seconds is better skipped, and the .part resumes later.
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 2.0

_MD5_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset source, as a source registry pins it.

    ``name`` is the file name under the download folder (no directories), ``sha256`` the pinned
    lowercase hex digest, ``size`` the expected size in bytes (None: not recorded).
    """

    name: str
    sha256: str
    size: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise DownloadError(f"FileSpec name {self.name!r} must be a plain file name without folders")
        if not _SHA256_RE.fullmatch(self.sha256):
            raise DownloadError(
                f"FileSpec {self.name!r}: sha256 {self.sha256!r} is not 64 lowercase hex digits"
            )
        if self.size is not None and self.size < 0:
            raise DownloadError(f"FileSpec {self.name!r}: size {self.size} must be >= 0 bytes or None")


def is_loopback_url(url: str) -> bool:
    """True when ``url`` names a loopback host literally: 127.0.0.0/8, ::1 or ``localhost``.

    No DNS lookup is made: a name that merely resolves to 127.0.0.1 does not count, because the
    answer could change between this check and the connection.
    """
    try:
        host = urlsplit(url).hostname
    except ValueError:  # e.g. an unbalanced "[" in the netloc: not a URL we can vouch for
        return False
    if not host:
        return False
    host = host.rstrip(".")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return ip.is_loopback


def fetch(
    mirrors: Sequence[str],
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout_s: float = 30.0,
    allow_http: bool = False,
    retries_per_mirror: int = 2,
    progress: bool = True,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """Make ``dest`` hold the file whose sha256 is ``sha256``, fetching it from ``mirrors``.

    mirrors: ordered sources of the same file; each an ``https://`` URL, an ``http://`` URL
        (loopback only unless ``allow_http``), a ``file://`` URL, or a local path to the file or
        to a folder that holds a file named ``dest.name``. Tried in order.
    dest: final path of the file. If it already holds the right bytes, nothing is fetched. If it
        holds other bytes it is kept until a verified replacement is renamed over it.
    sha256: pinned hex digest of the file (64 hex digits, any case).
    md5: instead of sha256, an md5 pin (32 hex digits) -- only for files whose only published pin
        is an md5 (torchvision's dataset definitions); prefer sha256 everywhere else.
    timeout_s: seconds allowed for each socket operation (connect, each read), so a stalled
        server fails in bounded time; not a limit on the whole download.
    allow_http: accept plain-http mirrors on non-loopback hosts (``data.allow_http``). The sha256
        check still applies, but the transfer can be observed and blocked.
    retries_per_mirror: extra tries of a mirror after a network error (0: try each mirror once).
    progress: show a tqdm bar on stderr when the size is known.
    chunk_bytes: bytes read and written per step.

    Returns ``dest``. Raises :class:`ChecksumError` when a mirror serves other bytes (fatal; no
    other mirror is tried) and :class:`DownloadError` when a mirror is not allowed or every
    mirror failed with a network error.
    """
    if isinstance(mirrors, (str, bytes, os.PathLike)):
        # A single URL would be iterated character by character.
        raise TypeError("mirrors must be a sequence of URLs or paths, not a single string")
    dest = Path(dest)
    if (sha256 is None) == (md5 is None):
        raise DownloadError(f"{dest.name}: pin exactly one checksum (sha256, or md5 where only that is published)")
    algo = "sha256" if sha256 is not None else "md5"
    pin = sha256 if sha256 is not None else md5
    expected = pin.strip().lower() if isinstance(pin, str) else ""
    if not (_SHA256_RE if algo == "sha256" else _MD5_RE).fullmatch(expected):
        raise DownloadError(f"{dest.name}: {algo} {pin!r} is not {64 if algo == 'sha256' else 32} hex digits; "
                            f"pin the file's real {algo}")
    digest = _hasher(algo)
    if timeout_s <= 0:
        raise DownloadError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    if retries_per_mirror < 0:
        raise DownloadError(f"retries_per_mirror must be >= 0, got {retries_per_mirror}")
    if chunk_bytes <= 0:
        raise DownloadError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    if not mirrors:
        raise DownloadError(
            f"{dest.name}: no mirror given; add an https URL, or a local path to the file "
            f"(or to a folder that contains {dest.name})"
        )
    # Every mirror is checked before anything is fetched: a disallowed URL is a configuration
    # mistake and should fail loudly even when an earlier mirror would have worked.
    sources = [_parse_mirror(m, dest.name, allow_http) for m in mirrors]

    if dest.is_dir():
        raise DownloadError(f"{dest} is a folder; fetch() needs the path of the file to create")
    if dest.is_file() and digest(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.is_file() and digest(part) == expected:
        # A previous run finished the body but died before the rename.
        os.replace(part, dest)
        return dest

    failures: list[str] = []
    for src in sources:
        tries: list[str] = []
        for attempt in range(retries_per_mirror + 1):
            if attempt:
                time.sleep(min(_BACKOFF_FIRST_S * 2 ** (attempt - 1), _BACKOFF_MAX_S))
            try:
                _fetch_verified(src, part, expected, digest=digest, algo=algo, timeout_s=timeout_s, allow_http=allow_http,
                                progress=progress, chunk_bytes=chunk_bytes, desc=dest.name)
            except _MirrorFailed as exc:
                tries.append(f"try {attempt + 1}: {exc}")
                if not exc.retryable:
                    break
                continue
            os.replace(part, dest)
            return dest
        failures.append(f"  - {src.label}: " + "; ".join(tries))

    kept = ""
    if part.exists():
        kept = f" The partial download {part} ({part.stat().st_size} bytes) was kept; the next run resumes it."
    raise DownloadError(
        f"could not download {dest.name} from any of {len(sources)} mirror(s):\n"
        + "\n".join(failures)
        + f"\nFix: add a reachable mirror to the source's mirror list, or fetch the file by other means "
        f"(sha256 {expected}) and pass its local path, or a folder containing {dest.name}, as a mirror."
        + kept
    )


# --------------------------------------------------------------------------------------------
# Mirrors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    label: str  # the mirror as the user wrote it (credentials hidden), for messages
    url: str | None = None  # an http(s) URL, or None for a local source
    path: Path | None = None  # a local file or folder, or None for a URL


class _MirrorFailed(Exception):
    """One try of one mirror failed in a way that says nothing about the file's true bytes."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def _redact(url: str) -> str:
    """Hide ``user:password@`` so credentials in a mirror URL never reach logs or messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _check_http_allowed(url: str, allow_http: bool, *, what: str = "mirror") -> None:
    if not allow_http and not is_loopback_url(url):
        raise DownloadError(
            f"refusing plain-http {what} {_redact(url)}: downloads use https so nobody on the path can "
            "swap or watch the bytes. Use an https URL, or set data.allow_http: true in params.yaml "
            "(fetch(..., allow_http=True)) if this network is trusted; the sha256 check still applies."
        )


def _parse_mirror(mirror: str | os.PathLike, dest_name: str, allow_http: bool) -> _Source:
    text = os.fspath(mirror)
    if not isinstance(text, str) or not text:
        raise DownloadError(f"mirror {mirror!r} for {dest_name} is empty or not text; give a URL or a path")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise DownloadError(f"mirror {_redact(text)} has no host; write it as https://host/path")
        if scheme == "http":
            _check_http_allowed(text, allow_http)
        return _Source(label=_redact(text), url=text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(
                f"mirror {text}: file:// URLs must name a local file (file:///path), not host {parts.netloc!r}; "
                "mount the share and give its local path"
            )
        return _Source(label=text, path=Path(urllib.request.url2pathname(parts.path)))
    if scheme == "" or len(scheme) == 1:  # no scheme, or a Windows drive letter such as C:
        return _Source(label=text, path=Path(text))
    raise DownloadError(
        f"mirror {_redact(text)} uses unsupported scheme {parts.scheme!r}; use an https:// URL, "
        "a file:// URL or a local path"
    )


# --------------------------------------------------------------------------------------------
# Transfers
# --------------------------------------------------------------------------------------------


def _hasher(algo: str):  # noqa: ANN202
    if algo == "sha256":
        return sha256_file

    def md5_file(path: Path) -> str:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    return md5_file


def _fetch_verified(src: _Source, part: Path, expected: str, *, desc: str, digest=sha256_file,  # noqa: ANN001
                    algo: str = "sha256", **kw) -> None:
    """Bring ``part`` to the verified file from ``src``, or raise.

    A mismatch on bytes this mirror served from byte 0 is fatal. A mismatch on a *resumed* file
    is not evidence against the mirror (the prefix may come from another mirror or a stale run),
    so the ``.part`` is discarded and the file fetched once more from byte 0 before judging.
    """
    resumed_from = _transfer(src, part, desc=desc, **kw)
    actual = digest(part)
    if actual == expected:
        return
    part.unlink()
    if resumed_from:
        _transfer(src, part, desc=desc, **kw)
        actual = digest(part)
        if actual == expected:
            return
        part.unlink()
    raise ChecksumError(
        f"{desc}: the bytes from mirror {src.label} have {algo} {actual}, expected {expected}. "
        "The download was deleted and no other mirror was tried: a mismatch means the mirror serves "
        "other content (or the pinned hash is wrong), which another mirror cannot fix. Check the pin; "
        "if the file changed upstream on purpose, update the pinned checksum."
    )


def _transfer(src: _Source, part: Path, **kw) -> int:
    """Write ``src``'s bytes to ``part``; return the byte offset a resume started from (0: none)."""
    if src.url is not None:
        return _download_http(src.url, part, **kw)
    assert src.path is not None
    return _copy_local(src.path, part, **kw)


def _copy_local(path: Path, part: Path, *, desc: str, progress: bool, chunk_bytes: int, **_: object) -> int:
    src = path / desc if path.is_dir() else path
    if src.resolve() == part.with_name(desc).resolve():
        raise _MirrorFailed("this mirror is the destination file itself", retryable=False)
    try:
        fin = open(src, "rb")
    except OSError as exc:
        # A missing or unreadable local copy will not appear by retrying: go to the next mirror.
        raise _MirrorFailed(f"cannot read {src}: {exc.strerror or exc}", retryable=False) from None
    with fin:
        total = os.fstat(fin.fileno()).st_size
        fout = _open_part(part, "wb")
        with fout, _bar(total, 0, progress, desc) as bar:
            while True:
                try:
                    chunk = fin.read(chunk_bytes)
                except OSError as exc:
                    raise _MirrorFailed(f"error reading {src}: {exc}", retryable=False) from None
                if not chunk:
                    break
                _write(fout, chunk, part)
                bar.update(len(chunk))
            _sync(fout, part)
    return 0


class _SafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within http(s), never from https to http, and never to a plain-http
    host that the mirror list itself would not have been allowed to name."""

    def __init__(self, allow_http: bool) -> None:
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        reason = self._refusal(urlsplit(req.full_url).scheme.lower(), newurl)
        if reason is not None:
            fp.close()  # urllib closes the 30x body only when it follows the redirect
            raise _MirrorFailed(reason, retryable=False)
        return super().redirect_request(req, fp, code, msg, headers, newurl)

    def _refusal(self, old_scheme: str, newurl: str) -> str | None:
        new_scheme = urlsplit(newurl).scheme.lower()
        if new_scheme not in ("http", "https"):
            return f"redirect to {_redact(newurl)} refused (only http(s) redirects are followed)"
        if old_scheme == "https" and new_scheme == "http":
            return f"redirect from https to plain http ({_redact(newurl)}) refused"
        if new_scheme == "http" and not self.allow_http and not is_loopback_url(newurl):
            return (f"redirect to plain-http host {_redact(newurl)} refused; "
                    "set data.allow_http: true only if that network is trusted")
        return None


def _opener(url: str, allow_http: bool) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [_SafeRedirectHandler(allow_http)]
    if is_loopback_url(url):
        # A proxy from the environment cannot reach this machine's loopback interface.
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _download_http(
    url: str, part: Path, *, desc: str, timeout_s: float, allow_http: bool, progress: bool, chunk_bytes: int
) -> int:
    """Fetch ``url`` into ``part``, resuming from its current size; return the resume offset.

    Loops because a server may answer a ``Range`` request with less than the rest of the file
    (a capped 206); each pass must make progress or it is a network error.
    """
    opener = _opener(url, allow_http)
    resumed_from: int | None = None  # where the bytes now in the .part began to be appended
    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        req = urllib.request.Request(url, headers=headers)
        try:
            resp = opener.open(req, timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                # The .part is no prefix the server can continue (longer than the file): start
                # over from byte 0 within this try; without a Range header 416 cannot recur.
                part.unlink()
                continue
            # 404/410: the file is not on this mirror, and will not be on a retry a second later.
            raise _MirrorFailed(f"HTTP {exc.code} {exc.reason}", retryable=exc.code not in (404, 410)) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, TLS errors
            raise _MirrorFailed(_describe(exc)) from None

        with resp:
            final = resp.geturl()
            if urlsplit(url).scheme.lower() == "https" and urlsplit(final).scheme.lower() != "https":
                raise _MirrorFailed(f"ended on non-https URL {_redact(final)}", retryable=False)
            status = resp.status
            if status == 206 and offset:
                start, end, total = _parse_content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    # Not the range asked for: drop the .part and ask for the whole file instead.
                    part.unlink()
                    continue
                expected_len: int | None = end - start + 1
                mode = "ab"
            elif 200 <= status < 300 and status != 206:
                # A full body: the server ignored Range (or none was sent). Start from byte 0.
                offset, mode = 0, "wb"
                expected_len = total = _content_length(resp)
            elif status == 206:
                raise _MirrorFailed("HTTP 206 (a partial body) to a request without Range")
            else:
                raise _MirrorFailed(f"unexpected HTTP {status} {resp.reason}")
            if mode == "wb" or resumed_from is None:
                resumed_from = offset
            received = _stream(resp, part, mode, total, offset, progress, desc, chunk_bytes)

        if expected_len is not None and received < expected_len:
            raise _MirrorFailed(
                f"body ended after {offset + received} bytes of {offset + expected_len} "
                "(connection closed early); the partial file is kept so the next try resumes"
            )
        if mode == "ab" and total is not None and offset + received < total:
            if received == 0:
                raise _MirrorFailed(f"server sent an empty range at byte {offset} of {total}")
            continue  # a capped range: ask for the rest
        return resumed_from


def _stream(resp, part: Path, mode: str, total: int | None, offset: int, progress: bool, desc: str,
            chunk_bytes: int) -> int:
    """Copy the response body to ``part``; return the number of body bytes received."""
    received = 0
    fout = _open_part(part, mode)
    with fout, _bar(total, offset, progress, desc) as bar:
        while True:
            try:
                chunk = resp.read(chunk_bytes)
            except (OSError, http.client.HTTPException) as exc:
                # Whatever arrived is written to the .part (closed below), so the next try resumes.
                raise _MirrorFailed(f"connection failed after {offset + received} bytes: {_describe(exc)}") from None
            if not chunk:
                break
            _write(fout, chunk, part)
            received += len(chunk)
            bar.update(len(chunk))
        _sync(fout, part)
    return received


def _content_length(resp) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        raise _MirrorFailed(f"malformed Content-Length {value!r}") from None
    if n < 0:
        raise _MirrorFailed(f"malformed Content-Length {value!r}")
    return n


def _parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """Parse ``bytes START-END/TOTAL`` (TOTAL may be ``*``)."""
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if not match:
        raise _MirrorFailed(f"206 answer with a missing or malformed Content-Range {value!r}")
    start, end = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if end < start or (total is not None and end >= total):
        raise _MirrorFailed(f"206 answer with an impossible Content-Range {value!r}")
    return start, end, total


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return "timed out"
        return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _open_part(part: Path, mode: str):
    try:
        return open(part, mode)
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}; check the folder's permissions") from None


def _write(fout, chunk: bytes, part: Path) -> None:
    # A local write error (disk full, quota) is not the mirror's fault: stop, do not try others.
    try:
        fout.write(chunk)
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}; free disk space and run again") from None


def _sync(fout, part: Path) -> None:
    try:
        fout.flush()
        os.fsync(fout.fileno())
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}; free disk space and run again") from None


def _bar(total: int | None, initial: int, progress: bool, desc: str) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        disable=not progress or total is None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        leave=False,
    )
