"""inputs: fingerprint your own data (data.path) so that DVC re-runs download when it changes.

Your folder (or local file) usually lives outside the repository, and ``data.path`` is a param,
not a DVC dependency: DVC would see no change when you add, remove or edit images there and
would skip the download stage, so the new images would never be used. This stage runs on every
``dvc repro`` (``always_changed``; it stats files, reads none: milliseconds for thousands of
images) and writes ``data/inputs.json``: the path with a digest of every file's relative name,
size and modification time. download depends on that file, so it re-runs exactly when your data
changed; when nothing did, the file is byte-identical and every later stage is skipped.

Standard datasets, URLs and the embedded digits are pinned by their sha256 (params), so for them
the fingerprint is null. The stage opens no tracking run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import write_json
from ..params import Data, load_params
from .common import PLACE_ERRNOS, add_common, ignore_sigxfsz


def fingerprint(p: Data) -> dict[str, Any]:
    """{"source", "path", "files", "bytes", "sha256"} of data.path; the last three are null when it is not local."""
    out: dict[str, Any] = {"source": p.source, "path": p.path, "files": None, "bytes": None, "sha256": None}
    if not p.path or "://" in p.path:
        return out
    root = Path(p.path).expanduser()
    h = hashlib.sha256()
    files = size = 0
    try:
        st = root.stat()
    except OSError:
        return out  # the download stage reports a missing path, with the fix
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                full = os.path.join(dirpath, name)
                try:
                    fst = os.lstat(full)
                except OSError:
                    continue
                rel = os.path.normpath(os.path.join(rel_dir, name))
                h.update(os.fsencode(rel) + b"\0" + f"{fst.st_size} {fst.st_mtime_ns} {fst.st_mode}\n".encode())
                files += 1
                size += fst.st_size
    else:
        h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        files, size = 1, st.st_size
    out.update(files=files, bytes=size, sha256=h.hexdigest())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--out", type=Path, default=Path("data/inputs.json"), help="fingerprint file")


def main(args: argparse.Namespace) -> int:
    from .common import setup_logging  # noqa: PLC0415

    setup_logging(args.verbose)
    ignore_sigxfsz()
    try:
        params = load_params(args.params)
        write_json(args.out, fingerprint(params.data))
    except UserError as exc:
        print(f"error: inputs failed: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in PLACE_ERRNOS:
            raise
        print(f"error: inputs failed: {exc.filename or args.out}: {exc.strerror or exc}; give a path you can write "
              "(--out)", file=sys.stderr)
        return 2
    return 0
