"""Tests for pipeline.data.fetch against a real HTTP server on 127.0.0.1.

The server serves files the tests generate in real formats (an MNIST-style IDX gz, a CIFAR-style
tar.gz, a zip of JPEGs) and has misbehaving paths: 404, 500, a body cut short, a flaky body,
a stall longer than the client timeout, a server that ignores Range, and redirects. It records
every request (path and Range header), so tests can tell which mirror was contacted and how.
"""

from __future__ import annotations

import gzip
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_http import (
    CAP,
    IDX,
    IDX_NAME,
    IDX_SHA,
    SLOW_SLEEP_S,
    TAMPERED,
    Server,
    closed_port_url,
    self_signed_cert,
    serve,
)
from PIL import Image

from pipeline.data.archive import safe_extract
from pipeline.data.fetch import FileSpec, fetch, is_loopback_url
from pipeline.errors import ChecksumError, DownloadError
from pipeline.io import sha256_bytes

# --------------------------------------------------------------------------------------------
# The servers: `server` (tests/conftest.py) and an https one
# --------------------------------------------------------------------------------------------


@pytest.fixture
def https_server(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """An https server on 127.0.0.1 (and its certificate file) whose downgrade redirect points at ``server``."""
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    for srv in serve(ctx):
        srv.downgrade_to = server.base
        yield srv, cert


def _fetch(mirrors: list[str], dest: Path, **kw) -> Path:
    kw.setdefault("sha256", IDX_SHA)
    kw.setdefault("progress", False)
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("chunk_bytes", 4096)  # several chunks per file, so cuts land mid-stream
    return fetch(mirrors, dest, **kw)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------------------------
# Success paths
# --------------------------------------------------------------------------------------------


def test_download_verifies_hash_and_leaves_no_part(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "raw" / IDX_NAME
    assert _fetch([server.url("files")], dest) == dest
    assert dest.read_bytes() == IDX
    with gzip.open(dest) as fh:  # the real format survived the trip
        magic, n, h, w = struct.unpack(">IIII", fh.read(16))
    assert (magic, n, h, w) == (0x803, 64, 28, 28)
    assert not _part(dest).exists()
    assert server.hits("files") == [None]
    assert sorted(p.name for p in dest.parent.iterdir()) == [IDX_NAME]


def test_sha256_is_case_insensitive(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([server.url("files")], dest, sha256=IDX_SHA.upper())
    assert dest.read_bytes() == IDX


def test_progress_bar_goes_to_stderr_only_when_asked(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fetch([server.url("files")], tmp_path / "a" / IDX_NAME, progress=True)
    out = capsys.readouterr()
    assert IDX_NAME in out.err and out.out == ""
    _fetch([server.url("files")], tmp_path / "b" / IDX_NAME, progress=False)
    assert capsys.readouterr().err == ""


def test_fetched_archives_extract_to_real_files(server: Server, tmp_path: Path) -> None:
    tgz, zp = server.files["cifar-10-binary.tar.gz"], server.files["jpegs.zip"]
    got_tgz = _fetch([server.url("files", "cifar-10-binary.tar.gz")], tmp_path / "c.tar.gz", sha256=sha256_bytes(tgz))
    got_zip = _fetch([server.url("files", "jpegs.zip")], tmp_path / "j.zip", sha256=sha256_bytes(zp))
    cifar = safe_extract(got_tgz, tmp_path / "cifar")
    assert [p.name for p in cifar] == ["batches.meta.txt", "data_batch_1.bin", "test_batch.bin"]
    assert (tmp_path / "cifar/cifar-10-batches-bin/data_batch_1.bin").stat().st_size == 20 * 3073
    jpegs = safe_extract(got_zip, tmp_path / "jpegs")
    assert len(jpegs) == 3
    for p in jpegs:
        with Image.open(p) as im:
            im.load()
            assert im.format == "JPEG" and im.size == (32, 32)


# --------------------------------------------------------------------------------------------
# Network errors move on; checksum errors stop
# --------------------------------------------------------------------------------------------


def test_404_on_first_mirror_then_second_mirror(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([server.url("missing"), server.url("files")], dest, retries_per_mirror=0)
    assert dest.read_bytes() == IDX
    assert len(server.hits("missing")) == 1 and len(server.hits("files")) == 1


def test_404_is_not_retried(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([server.url("missing"), server.url("files")], dest, retries_per_mirror=2)
    assert dest.read_bytes() == IDX
    assert len(server.hits("missing")) == 1  # a missing file does not appear on a retry


def test_500_is_retried_then_next_mirror(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([server.url("error"), server.url("files")], dest, retries_per_mirror=2)
    assert dest.read_bytes() == IDX
    assert len(server.hits("error")) == 3  # first try + 2 retries


def test_checksum_mismatch_is_fatal_and_no_other_mirror_is_tried(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    with pytest.raises(ChecksumError) as ei:
        _fetch([server.url("files", "tampered.gz"), server.url("norange")], dest)
    msg = str(ei.value)
    assert server.url("files", "tampered.gz") in msg
    assert IDX_SHA in msg and sha256_bytes(TAMPERED) in msg
    assert not dest.exists() and not _part(dest).exists()
    assert server.hits("norange") == []  # the second mirror was never contacted
    assert len(server.hits("files")) == 1  # and the bad mirror was not retried
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_keeps_an_existing_dest(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    dest.write_bytes(b"old bytes")
    with pytest.raises(ChecksumError):
        _fetch([server.url("files", "tampered.gz")], dest)
    assert dest.read_bytes() == b"old bytes"  # not deleted: no verified replacement existed
    assert not _part(dest).exists()


def test_truncated_body_moves_to_next_mirror_which_resumes(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([server.url("truncate"), server.url("files")], dest, retries_per_mirror=0)
    assert dest.read_bytes() == IDX
    assert server.hits("truncate") == [None]
    # The half received from the first mirror was kept and continued, not thrown away.
    assert server.hits("files") == [f"bytes={len(IDX) // 2}-"]


def test_truncated_body_resumes_on_retry_of_same_mirror(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([server.url("flaky")], dest, retries_per_mirror=1)
    assert dest.read_bytes() == IDX
    assert server.hits("flaky") == [None, f"bytes={len(IDX) // 2}-"]


def test_when_every_try_is_cut_short_the_part_is_kept_for_later(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    with pytest.raises(DownloadError) as ei:
        _fetch([server.url("truncate")], dest, retries_per_mirror=1)
    assert not isinstance(ei.value, ChecksumError)
    msg = str(ei.value)
    assert "closed early" in msg and server.url("truncate") in msg and "try 2" in msg
    assert not dest.exists()
    assert _part(dest).read_bytes() == IDX[: len(IDX) // 2]
    # Each retry re-sent Range but the server answered 200 with half a body again.
    assert server.hits("truncate") == [None, f"bytes={len(IDX) // 2}-"]


def test_resume_from_existing_part_sends_range(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _part(dest).write_bytes(IDX[:1000])
    _fetch([server.url("files")], dest)
    assert dest.read_bytes() == IDX
    assert server.hits("files") == ["bytes=1000-"]
    assert not _part(dest).exists()


def test_stale_garbage_part_is_refetched_from_zero_not_blamed_on_mirror(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _part(dest).write_bytes(b"\xff" * 1000)
    _fetch([server.url("files")], dest)
    assert dest.read_bytes() == IDX
    assert server.hits("files") == ["bytes=1000-", None]


def test_complete_part_from_an_interrupted_run_is_used_without_network(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _part(dest).write_bytes(IDX)
    _fetch([server.url("files")], dest)
    assert dest.read_bytes() == IDX and server.requests == []


def test_part_longer_than_the_file_is_dropped_on_416(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _part(dest).write_bytes(b"\x00" * (len(IDX) + 10))
    _fetch([server.url("files")], dest, retries_per_mirror=0)  # recovers within a single try
    assert dest.read_bytes() == IDX
    assert server.hits("files") == [f"bytes={len(IDX) + 10}-", None]


def test_range_answers_shorter_than_asked_are_continued(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _part(dest).write_bytes(IDX[:1000])
    _fetch([server.url("capped")], dest, retries_per_mirror=0)  # all within one try
    assert dest.read_bytes() == IDX
    starts = list(range(1000, len(IDX), CAP))
    assert len(starts) >= 3
    assert server.hits("capped") == [f"bytes={s}-" for s in starts]


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _part(dest).write_bytes(b"\x00" * 1000)  # garbage: appending the 200 body to it would fail the hash
    _fetch([server.url("norange")], dest)
    assert dest.read_bytes() == IDX
    assert server.hits("norange") == ["bytes=1000-"]  # one request: the 200 body was taken whole


def test_slow_server_fails_in_bounded_time(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as ei:
        _fetch([server.url("slow")], dest, timeout_s=0.3, retries_per_mirror=1)
    elapsed = time.monotonic() - t0
    assert "timed out" in str(ei.value)
    assert len(server.hits("slow")) == 2
    # Two 0.3 s timeouts and a 0.2 s backoff, far below the server's stall: the timeout worked.
    assert elapsed < SLOW_SLEEP_S - 0.5


def test_all_mirrors_failing_lists_each_and_says_how_to_fix(server: Server, tmp_path: Path) -> None:
    refused = closed_port_url()
    mirrors = [server.url("missing"), server.url("error"), refused, str(tmp_path / "nowhere")]
    with pytest.raises(DownloadError) as ei:
        _fetch(mirrors, tmp_path / IDX_NAME, retries_per_mirror=0)
    msg = str(ei.value)
    for m in mirrors:
        assert m in msg
    assert "HTTP 404" in msg and "HTTP 500" in msg and "Connection refused" in msg
    assert "local path" in msg and IDX_SHA in msg
    assert not (tmp_path / IDX_NAME).exists()


# --------------------------------------------------------------------------------------------
# What is allowed
# --------------------------------------------------------------------------------------------


def test_plain_http_to_non_loopback_is_refused_before_any_network(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as ei:
        # The good loopback mirror comes first: the refusal is a configuration check made up front.
        _fetch([server.url("files"), "http://example.com/x"], tmp_path / IDX_NAME)
    msg = str(ei.value)
    assert "http://example.com/x" in msg and "data.allow_http" in msg
    assert server.requests == []
    assert not (tmp_path / IDX_NAME).exists()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.gz", "s3://bucket/x.gz", "gopher://h/x"])
def test_other_schemes_are_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(DownloadError, match="unsupported scheme") as ei:
        _fetch([url], tmp_path / IDX_NAME)
    assert url.split(":")[0] in str(ei.value)


def test_credentials_in_urls_are_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as ei:
        _fetch(["http://alice:s3cret@example.com/x"], tmp_path / IDX_NAME)
    assert "s3cret" not in str(ei.value) and "example.com" in str(ei.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000/x", True),
        ("http://127.255.3.4/x", True),
        ("http://localhost/x", True),
        ("http://LOCALHOST./x", True),
        ("http://[::1]:9000/x", True),
        ("http://[::ffff:127.0.0.1]/x", True),
        ("http://128.0.0.1/x", False),
        ("http://example.com/x", False),
        ("http://localhost.example.com/x", False),
        ("http://127.0.0.1.nip.io/x", False),
        ("http://10.0.0.1/x", False),
        ("file:///tmp/x", False),
        ("not a url", False),
    ],
)
def test_is_loopback_url(url: str, expected: bool) -> None:
    assert is_loopback_url(url) is expected


def test_https_download_verifies_the_certificate(
    https_server: tuple[Server, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, cert = https_server
    dest = tmp_path / IDX_NAME
    # Without trusting the test certificate the TLS handshake fails: a network error, next mirror.
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        _fetch([srv.url("files")], dest, retries_per_mirror=0)
    assert not dest.exists()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by OpenSSL for each new default context
    _fetch([srv.url("files")], dest)
    assert dest.read_bytes() == IDX


def test_redirect_from_https_to_http_is_refused(
    https_server: tuple[Server, Path], server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, cert = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    dest = tmp_path / IDX_NAME
    with pytest.raises(DownloadError, match="from https to plain http") as ei:
        # Refused even though the target is loopback and allow_http is on: never downgrade.
        _fetch([srv.url("redirect-downgrade")], dest, allow_http=True, retries_per_mirror=2)
    assert not isinstance(ei.value, ChecksumError)
    assert len(srv.hits("redirect-downgrade")) == 1
    assert server.requests == [] and not dest.exists()


def test_redirect_within_loopback_is_followed(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([server.url("redirect")], dest)
    assert dest.read_bytes() == IDX
    assert len(server.hits("redirect")) == 1 and len(server.hits("files")) == 1


@pytest.mark.parametrize("kind", ["redirect-external", "redirect-ftp"])
def test_unsafe_redirects_are_refused_and_not_retried(server: Server, tmp_path: Path, kind: str) -> None:
    dest = tmp_path / IDX_NAME
    with pytest.raises(DownloadError) as ei:
        _fetch([server.url(kind)], dest, retries_per_mirror=2)
    assert "redirect" in str(ei.value) and "refused" in str(ei.value)
    assert len(server.hits(kind)) == 1
    assert not dest.exists()


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, IDX_SHA[:-1]])
def test_malformed_sha256_is_a_user_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(DownloadError, match="sha256"):
        _fetch([str(tmp_path)], tmp_path / IDX_NAME, sha256=bad)


def test_a_single_string_is_not_taken_for_a_list_of_mirrors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sequence"):
        fetch("https://example.com/x", tmp_path / "x", sha256=IDX_SHA)  # type: ignore[arg-type]


def test_filespec_validates_its_fields() -> None:
    spec = FileSpec(IDX_NAME, IDX_SHA, size=len(IDX))
    assert spec.size == len(IDX)
    with pytest.raises(DownloadError, match="plain file name"):
        FileSpec("../x.gz", IDX_SHA)
    with pytest.raises(DownloadError, match="hex"):
        FileSpec("x.gz", "nope")


# --------------------------------------------------------------------------------------------
# Local mirrors and an existing destination
# --------------------------------------------------------------------------------------------


def test_local_file_directory_and_file_url_mirrors(tmp_path: Path) -> None:
    shared = tmp_path / "team-mirror"
    shared.mkdir()
    (shared / IDX_NAME).write_bytes(IDX)
    for i, mirror in enumerate([str(shared / IDX_NAME), str(shared), (shared / IDX_NAME).as_uri()]):
        dest = tmp_path / f"out{i}" / IDX_NAME
        _fetch([mirror], dest)
        assert dest.read_bytes() == IDX and not _part(dest).exists()


def test_missing_local_mirror_moves_on_to_the_next(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    _fetch([str(tmp_path / "absent-folder"), server.url("files")], dest)
    assert dest.read_bytes() == IDX


def test_tampered_local_copy_is_fatal(server: Server, tmp_path: Path) -> None:
    (tmp_path / "copy.gz").write_bytes(TAMPERED)
    with pytest.raises(ChecksumError, match="copy.gz"):
        _fetch([str(tmp_path / "copy.gz"), server.url("files")], tmp_path / "out" / IDX_NAME)
    assert server.requests == []


def test_existing_dest_with_right_hash_makes_no_request(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    dest.write_bytes(IDX)
    before = dest.stat().st_mtime_ns
    assert _fetch([server.url("missing")], dest) == dest
    assert server.requests == [] and dest.stat().st_mtime_ns == before


def test_existing_dest_with_wrong_hash_is_replaced(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / IDX_NAME
    dest.write_bytes(TAMPERED)
    _fetch([server.url("files")], dest)
    assert dest.read_bytes() == IDX
    assert server.hits("files") == [None]
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDX_NAME]
