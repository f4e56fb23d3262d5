"""Tests for pipeline.data.fetch against a real HTTP server on 127.0.0.1.

The server serves files the tests generate in real formats (an MNIST-style IDX gz, a CIFAR-style
tar.gz, a zip of JPEGs) and has misbehaving paths: 404, 500, a body cut short, a flaky body,
a stall longer than the client timeout, a server that ignores Range, and redirects. It records
every request (path and Range header), so tests can tell which mirror was contacted and how.
"""

from __future__ import annotations

import datetime
import gzip
import io
import ipaddress
import socket
import ssl
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from pipeline.data.archive import safe_extract
from pipeline.data.fetch import FileSpec, fetch, is_loopback_url
from pipeline.errors import ChecksumError, DownloadError
from pipeline.io import sha256_bytes

# --------------------------------------------------------------------------------------------
# Test files in real formats
# --------------------------------------------------------------------------------------------


def make_idx_gz(n: int = 64, seed: int = 0) -> bytes:
    """MNIST-style images file: magic 0x00000803, dims (n, 28, 28) big-endian, uint8 data, gzipped."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    raw = struct.pack(">IIII", 0x00000803, n, 28, 28) + data.tobytes()
    return gzip.compress(raw, mtime=0)


def make_cifar_tgz(records: int = 20, seed: int = 1) -> bytes:
    """CIFAR-10 binary layout: a folder of batches, each record 1 label byte + 3072 pixel bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        files = {
            "cifar-10-batches-bin/data_batch_1.bin": rng.integers(0, 256, records * 3073, dtype=np.uint8).tobytes(),
            "cifar-10-batches-bin/test_batch.bin": rng.integers(0, 256, records * 3073, dtype=np.uint8).tobytes(),
            "cifar-10-batches-bin/batches.meta.txt": b"airplane\nautomobile\nbird\ncat\ndeer\n",
        }
        for name, payload in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def make_jpeg_zip(count: int = 3, seed: int = 2) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(count):
            img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            jpg = io.BytesIO()
            img.save(jpg, format="JPEG", quality=90)
            zf.writestr(f"images/img_{i}.jpg", jpg.getvalue())
    return buf.getvalue()


IDX = make_idx_gz()
IDX_SHA = sha256_bytes(IDX)
IDX_NAME = "train-images-idx3-ubyte.gz"
TAMPERED = make_idx_gz(seed=99)  # same format and size, other bytes


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


@dataclass
class Server:
    base: str
    files: dict[str, bytes]
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: set[str] = field(default_factory=set)
    downgrade_to: str = ""  # base URL of the plain-http server, for the https->http redirect

    def url(self, kind: str, name: str = IDX_NAME) -> str:
        return f"{self.base}/{kind}/{name}"

    def hits(self, kind: str) -> list[str | None]:
        """Range headers of the requests to paths starting with /<kind>/ (None: no Range)."""
        with self.lock:
            return [rng for path, rng in self.requests if path.startswith(f"/{kind}/")]


SLOW_SLEEP_S = 3.0
CAP = 20_000  # bytes per answer of the "capped" path


def _make_handler(srv: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            return None

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            rng = self.headers.get("Range")
            with srv.lock:
                srv.requests.append((self.path, rng))
            _, kind, name = self.path.split("/", 2)
            body = srv.files.get(name)
            if kind == "missing" or body is None:
                self._plain(404, b"not found")
            elif kind == "error":
                self._plain(500, b"boom")
            elif kind == "truncate":
                self._truncated(body)
            elif kind == "flaky":  # the first request for a name is cut short, later ones are fine
                with srv.lock:
                    first = name not in srv.seen
                    srv.seen.add(name)
                self._truncated(body) if first else self._ranged(body, rng)
            elif kind == "slow":
                srv.stop.wait(SLOW_SLEEP_S)  # stalls past the client's timeout; teardown wakes it
                self._plain(200, body)
            elif kind == "capped":  # answers a Range with at most CAP bytes, like some CDNs
                self._ranged(body, rng, cap=CAP)
            elif kind == "norange":
                self._plain(200, body)
            elif kind == "redirect":
                self._redirect(f"/files/{name}")
            elif kind == "redirect-external":
                self._redirect("http://example.com/" + name)
            elif kind == "redirect-downgrade":
                self._redirect(f"{srv.downgrade_to}/files/{name}")
            elif kind == "redirect-ftp":
                self._redirect("ftp://127.0.0.1/" + name)
            else:  # "files"
                self._ranged(body, rng)

        def _plain(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _truncated(self, body: bytes) -> None:
            # Promise the whole body, send half, close: what a dropped connection looks like.
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def _ranged(self, body: bytes, rng: str | None, cap: int | None = None) -> None:
            if rng is None:
                self._plain(200, body)
                return
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = len(body) if cap is None else min(len(body), start + cap)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            self.wfile.write(body[start:end])

    return Handler


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    files = {
        IDX_NAME: IDX,
        "tampered.gz": TAMPERED,
        "cifar-10-binary.tar.gz": make_cifar_tgz(),
        "jpegs.zip": make_jpeg_zip(),
    }
    srv = Server(base="", files=files)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(srv))
    httpd.block_on_close = False  # teardown must not wait for a handler stalled on purpose
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    srv.base = f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve()


def _self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (valid one day) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pipeline test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def https_server(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """An https server on 127.0.0.1 (and its certificate file) whose downgrade redirect points at ``server``."""
    cert, key = _self_signed_cert(tmp_path_factory.mktemp("tls"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    for srv in _serve(ctx):
        srv.downgrade_to = server.base
        yield srv, cert


def _closed_port_url() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{IDX_NAME}"


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
    refused = _closed_port_url()
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
