"""Inception-v3 metrics with real files: a randomly initialised network saved to disk, pinned by sha256.

Real Inception weights cannot be fetched here, and the code path does not care what the weights
are: a random torch-fidelity Inception-v3 exercises the same verification, loading, protocol,
caching and metric code. A wrong pin must be refused before the file is read as a torch file.
"""

from __future__ import annotations

import functools
import http.server
import json
import pathlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ChecksumError, CheckpointError, UserError
from pipeline.io import read_json, sha256_file, write_json, write_split
from pipeline.metrics import record
from pipeline.metrics.inception import (
    extract_inception,
    load_inception,
    random_inception_weights,
    real_features_cached,
    resolve_weights,
    to_rgb_uint8,
)

from helpers_eval import TinyRun, eval_params, in_dir

WRONG = "0" * 64


def read_split_images(tensors: Path) -> np.ndarray:
    from pipeline.data.tensors import load_split

    return load_split(tensors, "test").images


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("inception") / "inception-random.pt"
    return path, random_inception_weights(path, seed=0)


@pytest.fixture(scope="module")
def net(weights: tuple[Path, str]) -> torch.nn.Module:
    return load_inception(weights[0], sha256=weights[1])


class _TouchOnLoad:
    """Pickles as a call to Path.touch(marker): unpickling it with weights_only=False creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_wrong_sha256_is_refused_before_the_file_is_read(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "weights.pt"
    torch.save({"Conv2d_1a_3x3.conv.weight": _TouchOnLoad(marker)}, hostile)
    with pytest.raises(ChecksumError, match="does not match the pinned"):
        load_inception(hostile, sha256=WRONG)
    assert not marker.exists()
    # With the right pin the file still never runs code: the weights_only loader refuses it.
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_inception(hostile, sha256=sha256_file(hostile))
    assert not marker.exists()
    with pytest.raises(UserError, match="not a sha256"):
        load_inception(hostile, sha256="abc")


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_inception(other, sha256=sha256_file(other))


def test_features_and_protocol(net: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (3, 1, 28, 28), generator=g, dtype=torch.uint8)
    feats, probs = extract_inception(net, gray, batch_size=2)
    assert feats.shape == (3, 2048) and probs.shape == (3, 1008)
    assert feats.dtype == torch.float32 and bool(torch.isfinite(feats).all()) and float(feats.abs().mean()) > 1e-3
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-5)
    # Gray is the same picture as RGB with R = G = B.
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (3, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2])
    feats_rgb, _ = extract_inception(net, rgb.contiguous(), batch_size=3)
    assert torch.allclose(feats, feats_rgb, atol=1e-5)
    with pytest.raises(UserError, match="uint8"):
        extract_inception(net, gray.float())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        return


@pytest.fixture()
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving a temporary folder."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


def test_weights_by_url_are_fetched_verified_and_cached(weights: tuple[Path, str], http_dir: tuple[Path, str],
                                                       tmp_path: Path) -> None:
    path, sha = weights
    root, base = http_dir
    shutil.copyfile(path, root / "inception.pt")
    cache = tmp_path / "cache"
    got = resolve_weights(f"{base}/inception.pt", sha, cache_dir=cache, progress=False)
    assert got == cache / "inception.pt" and sha256_file(got) == sha
    with pytest.raises(ChecksumError):
        resolve_weights(f"{base}/inception.pt", WRONG, cache_dir=tmp_path / "other", progress=False)
    assert not (tmp_path / "other" / "inception.pt").exists()
    assert not list((tmp_path / "other").glob("*.part"))
    # A local path is verified where it lies.
    assert resolve_weights(str(path), sha, cache_dir=cache) == path
    with pytest.raises(ChecksumError):
        resolve_weights(str(path), WRONG, cache_dir=cache)


def test_real_features_are_cached_by_content(net: torch.nn.Module, weights: tuple[Path, str], tmp_path: Path) -> None:
    sha = weights[1]
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    feats, probs, info = real_features_cached(net, images, weights_sha256=sha, cache_dir=tmp_path, batch_size=4)
    assert not info["cached"] and Path(info["cache_path"]).is_file()
    # Second time: read back (no network given, so it cannot have been recomputed).
    feats2, probs2, info2 = real_features_cached(None, images, weights_sha256=sha, cache_dir=tmp_path)
    assert info2["cached"] and info2["cache_key"] == info["cache_key"]
    assert torch.equal(feats, feats2) and torch.equal(probs, probs2)
    # One changed pixel, or other weights, is another key.
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(UserError, match="no cached Inception features"):
        real_features_cached(None, changed, weights_sha256=sha, cache_dir=tmp_path)
    with pytest.raises(UserError, match="no cached Inception features"):
        real_features_cached(None, images, weights_sha256=WRONG, cache_dir=tmp_path)


def test_evaluate_stage_computes_inception_metrics(tiny_gan: TinyRun, weights: tuple[Path, str],
                                                   tmp_path: Path) -> None:
    """The evaluate stage with the weights pinned in params: every Inception metric, cached real features."""
    from pipeline.params import load_params
    from pipeline.stages import evaluate

    path, sha = weights
    # 8 real test images keep the 299x299 CPU forward passes few (10 samples x 2 draws + 8 real).
    tensors = tmp_path / "tensors"
    tensors.mkdir()
    src = tiny_gan.data.tensors
    meta = read_json(src / "meta.json")
    from pipeline.data.tensors import load_split

    test = load_split(src, "test")
    for name in meta["splits"]["train"]["shards"]:
        shutil.copyfile(src / name["file"], tensors / name["file"])
    shutil.copyfile(src / meta["splits"]["train"]["labels"]["file"], tensors / meta["splits"]["train"]["labels"]["file"])
    meta["splits"]["test"] = write_split(tensors, "test", test.images[::15][:8], test.labels[::15][:8])
    write_json(tensors / "meta.json", meta)

    params = load_params(eval_params(tmp_path / "params.yaml", {"evaluate": {
        "n_samples": 10, "seeds": 2, "batch_size": 16, "inception_weights": str(path), "inception_sha256": sha}}))
    out, details = tmp_path / "metrics.json", tmp_path / "details.json"
    with in_dir(tmp_path):
        flat = evaluate.run(params, tiny_gan.models, tensors, tiny_gan.data.evaluator, out, details)
    assert "kid_warning" not in json.loads(out.read_text())["inception"]  # numbers only in metrics.json
    first = record.read(out)["inception"]
    assert first["computed"] is True and first["weights_sha256"] == sha
    for key in ("fid", "kid", "IS", "precision", "recall", "density", "coverage"):
        assert np.isfinite(first[key]), key
        assert first[f"{key}_ci_low"] <= first[key] <= first[f"{key}_ci_high"], key
        assert flat[f"inception.{key}"] == first[key]
    assert first["fid"] > 0 and first["IS"] >= 1.0
    assert "kid_warning" in first and first["kid_subset_size"] == 8  # 8 real images: said plainly
    assert "TF1-compatible" in first["protocol"]["resize"] and "repeated to 3" in first["protocol"]["input"]
    # The real features went to the project's cache under their content key (reuse: see the test above).
    assert first["real_stats_from_cache"] is False
    cached = tmp_path / ".pipeline/cache/inception" / f"{first['real_stats_cache_key']}.pt"
    assert real_features_cached(None, read_split_images(tensors), weights_sha256=sha,
                                cache_dir=cached.parent)[2]["cached"]
    assert json.loads(details.read_text())["draws"]["inception"]["fid"][0] == first["fid"]
    # A wrong pin fails the stage before anything is computed.
    bad = load_params(eval_params(tmp_path / "bad.yaml", {"evaluate": {
        "n_samples": 10, "inception_weights": str(path), "inception_sha256": WRONG}}))
    with in_dir(tmp_path), pytest.raises(ChecksumError):
        evaluate.run(bad, tiny_gan.models, tensors, tiny_gan.data.evaluator, tmp_path / "m2.json", details)
    assert not (tmp_path / "m2.json").exists()
