"""Inception-v3 features for the standard FID / KID / IS, from a verified weights file (never a silent download).

The offline evaluator (:mod:`pipeline.metrics.evaluator`) is always available; Inception-v3
numbers are what papers report, so they are computed in addition whenever
``evaluate.inception_weights`` (a local path or an https URL) and ``evaluate.inception_sha256``
are set. The network is torch-fidelity's ``FeatureExtractorInceptionV3`` -- the port of the
TensorFlow FID graph that torch-fidelity and pytorch-fid validate against the original code --
so our numbers are comparable with theirs given the same images.

Security and reproducibility:

* The weights file's sha256 is checked against the pin *before* anything reads it as a torch
  file; a mismatch raises :class:`~pipeline.errors.ChecksumError` (a URL goes through
  :func:`pipeline.data.fetch.fetch`, which verifies the pin and deletes a bad download).
* The verified file is loaded with ``torch.load(weights_only=True)`` (:func:`safe_load`); the
  tensors are then handed to torch-fidelity's constructor as an in-memory copy that this module
  serialised itself, because torch-fidelity's own loader unpickles with ``weights_only=False``.
* Real-data features are cached under ``.pipeline/cache/inception/`` keyed by the sha256 of the
  images' bytes, the weights' sha256 and the protocol below, and written atomically.

The protocol (recorded in metrics.json, see :data:`PROTOCOL`): uint8 images; a 1-channel image is
repeated to 3 channels; torch-fidelity resizes to 299x299 inside the network with TF1-compatible
bilinear interpolation (``interpolate_bilinear_2d_like_tensorflow1x``, the filter of the original
TensorFlow FID code) and maps x to (x - 128) / 128; the network runs in float32; FID/KID/PR use
the 2048-d pool3 features, IS the softmax of the 1008-way ``logits_unbiased`` (as torch-fidelity).
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ChecksumError, CheckpointError, UserError
from ..io import atomic_write, sha256_file
from ..safeload import safe_load

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOL",
    "extract_inception",
    "load_inception",
    "random_inception_weights",
    "real_features_cached",
    "resolve_weights",
    "to_rgb_uint8",
    "verify_sha256",
]

FEATURES = ("2048", "logits_unbiased")
CACHE_FORMAT = "pipeline.inception-features/1"
PROTOCOL: dict[str, str] = {
    "extractor": "inception-v3 (torch-fidelity FeatureExtractorInceptionV3; pool3 2048-d for FID/KID/PR, "
                 "softmax of the 1008-way logits_unbiased for IS)",
    "input": "uint8 [0, 255]; 1 channel repeated to 3",
    "resize": "to 299x299 inside the network, bilinear TF1-compatible (align_corners=False), "
              "as the original TensorFlow FID code",
    "normalisation": "(x - 128) / 128",
    "internal_dtype": "float32",
}


def _check_pin(value: str | None, what: str) -> str:
    """``value`` as a lowercase sha256, or a UserError saying how to pin one."""
    if not value or len(value.strip()) != 64 or any(c not in "0123456789abcdef" for c in value.strip().lower()):
        raise UserError(f"evaluate.inception_sha256: {value!r} is not a sha256 (64 hex digits); pin the sha256 of "
                        f"{what} (e.g. `sha256sum FILE`) -- weights are never used unverified")
    return value.strip().lower()


def verify_sha256(path: Path, expected: str) -> str:
    """Return the file's sha256 if it equals ``expected``; raise ChecksumError otherwise (nothing loaded)."""
    expected = _check_pin(expected, str(path))
    if not Path(path).is_file():
        raise UserError(f"evaluate.inception_weights: {path} is not a file")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 {actual} does not match the pinned evaluate.inception_sha256 {expected}; "
                            "the weights were not loaded. Fix the pin or the file.")
    return actual


def resolve_weights(spec: str, sha256: str | None, *, cache_dir: Path, timeout_s: float = 60.0,
                    progress: bool = True) -> Path:
    """A local, verified weights file for ``spec`` (a path, file:// URL or https URL).

    A URL is fetched into ``cache_dir`` by :func:`pipeline.data.fetch.fetch` (resumable, https only,
    the pinned sha256 checked before the file gets its final name); a local path is verified where
    it lies (a 100 MB copy would buy nothing).
    """
    pin = _check_pin(sha256, spec)
    if "://" in spec and not spec.startswith("file://"):
        from ..data.fetch import fetch  # noqa: PLC0415

        name = spec.rstrip("/").rsplit("/", 1)[-1] or "inception-weights.pth"
        return fetch([spec], Path(cache_dir) / name, sha256=pin, timeout_s=timeout_s, progress=progress)
    path = Path(spec.removeprefix("file://")).expanduser()
    verify_sha256(path, pin)
    return path


def load_inception(path: Path, *, sha256: str, device: str = "cpu") -> nn.Module:
    """torch-fidelity's Inception-v3 with the verified weights at ``path``, in eval mode on ``device``.

    Order matters: sha256 first, then a weights_only load, then the constructor (see module doc).
    """
    verify_sha256(path, sha256)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: PLC0415
    except ImportError:
        raise UserError("Inception-v3 metrics need torch-fidelity: pip install 'torch-fidelity>=0.3' "
                        "(the project's [inception] extra)") from None
    state = safe_load(path)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not an Inception-v3 state_dict (a mapping of parameter names to tensors)")
    buf = _io.BytesIO()
    torch.save(state, buf)  # tensors only, written here: safe for torch-fidelity's weights_only=False load
    buf.seek(0)
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=buf)
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or wrong shapes
        raise CheckpointError(f"{path}: weights do not fit torch-fidelity's Inception-v3: {str(exc)[:300]}") from None
    return net.to(device).eval()


def random_inception_weights(path: Path, *, seed: int = 0) -> str:
    """Write a randomly initialised Inception-v3 state_dict to ``path``; return its sha256.

    For tests and speed benchmarks (run time does not depend on the weights). torch-fidelity's
    constructor insists on loading weights, so a subclass skips that step; the conv layers are then
    re-drawn He-normal and the classifier N(0, (12/sqrt(2048))^2), because PyTorch's default init
    shrinks activations ~1e7-fold over Inception's depth (features ~1e-8: every distance would be
    rounding noise), while this keeps pool3 features O(0.1) and logits O(1).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: PLC0415

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # noqa: ARG002
            return None  # keep the random initialisation

    empty = _io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = _Unloaded("inception-v3-random", list(FEATURES), feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) * (12.0 / math.sqrt(2048)))
        net.fc.bias.zero_()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    buf = _io.BytesIO()
    torch.save(state, buf)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())
    return sha256_file(path)


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1 or 3, H, W] -> uint8 [N, 3, H, W] (gray repeated: R = G = B, as a gray photo)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"Inception-v3 takes uint8 [N, 1 or 3, H, W] images; got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def extract_inception(net: nn.Module, images: torch.Tensor | np.ndarray, *, batch_size: int = 250,
                      device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pool3 features [N, 2048] and IS probabilities [N, 1008] (float32, CPU) of uint8 images.

    Batches go to ``device`` as uint8 (4x less host-to-device traffic than float) and are
    expanded to 3 channels there.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        x = to_rgb_uint8(images[i : i + batch_size].to(device, non_blocking=True))  # [b, 3, H, W] uint8
        f, logits = net(x)  # [b, 2048], [b, 1008]
        feats.append(f.float().cpu())
        probs.append(torch.softmax(logits.double(), dim=1).float().cpu())
    return torch.cat(feats), torch.cat(probs)


def _content_key(images: np.ndarray, weights_sha256: str) -> str:
    """sha256 over the images' bytes and shape, the weights' sha256 and the protocol."""
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype), "weights": weights_sha256,
                         "protocol": PROTOCOL, "format": CACHE_FORMAT}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def real_features_cached(net: nn.Module | None, images: np.ndarray, *, weights_sha256: str, cache_dir: Path,
                         batch_size: int = 250, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Inception features and probabilities of real ``images`` uint8 [N, C, H, W], from the cache when present.

    Returns (features [N, 2048], probs [N, 1008], info with ``cache_key``, ``cache_path`` and
    ``cached``: whether they were read rather than computed). The file holds tensors only and is
    read with weights_only=True; a file that fails to load is recomputed and overwritten.
    """
    key = _content_key(images, weights_sha256)
    path = Path(cache_dir) / f"{key}.pt"
    info: dict[str, Any] = {"cache_key": key, "cache_path": str(path), "cached": False}
    if path.is_file():
        try:
            payload = safe_load(path)
            if payload.get("format") == CACHE_FORMAT and payload["features"].shape[0] == len(images):
                info["cached"] = True
                return payload["features"], payload["probs"], info
        except (CheckpointError, AttributeError, KeyError) as exc:
            log.warning("inception cache %s unreadable (%s); recomputing", path, exc)
    if net is None:
        raise UserError(f"no cached Inception features for these images ({path}) and no network to compute them")
    feats, probs = extract_inception(net, images, batch_size=batch_size, device=device)
    buf = _io.BytesIO()
    torch.save({"format": CACHE_FORMAT, "features": feats, "probs": probs}, buf)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())
    return feats, probs, info
