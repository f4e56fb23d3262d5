"""A real HTTP(S) server on 127.0.0.1 for download tests, and files in the real formats it serves.

The server serves ``files`` (name -> bytes) under path prefixes that choose a behaviour:
``/files/`` (honours Range), ``/missing/`` (404), ``/error/`` (500), ``/truncate/`` (half a body,
then a closed connection), ``/flaky/`` (truncated the first time, fine after), ``/slow/`` (stalls
past a client timeout), ``/capped/`` (short Range answers), ``/norange/`` (ignores Range) and
redirects. It records every request (path, Range header) so tests can tell which mirror was
contacted and how. Tests may add their own files to ``server.files`` at any time.
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
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from pipeline.io import sha256_bytes


def idx_bytes(array: np.ndarray, *, gz: bool = True) -> bytes:
    """An IDX file of a uint8 array (magic 0x0000 08 <ndim>, big-endian dims), gzipped by default."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    raw = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: per image 1 label byte, then 1024 R, 1024 G, 1024 B bytes."""
    planes = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)  # NHWC -> N x CHW
    return np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1).tobytes()


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in files.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def make_idx_gz(n: int = 64, seed: int = 0) -> bytes:
    """MNIST-style images file: magic 0x00000803, dims (n, 28, 28) big-endian, uint8 data, gzipped."""
    rng = np.random.default_rng(seed)
    return idx_bytes(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))


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


def make_handler(srv: Server) -> type[BaseHTTPRequestHandler]:
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


def serve(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    files = {
        IDX_NAME: IDX,
        "tampered.gz": TAMPERED,
        "cifar-10-binary.tar.gz": make_cifar_tgz(),
        "jpegs.zip": make_jpeg_zip(),
    }
    srv = Server(base="", files=files)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(srv))
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


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
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


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{IDX_NAME}"
