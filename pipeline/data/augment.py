"""Offline augmentation with albumentations, byte-identical for any number of workers.

Every augmented image gets its own seed, derived from the global seed, the copy number and the
sample index (NumPy's SeedSequence), and the pipeline is re-seeded with it right before that image
is transformed. Nothing depends on which worker handles which image or in what order, so 1 worker
and 4 workers write the same bytes.

``augment.ops`` is checked before any work: every name must be an albumentations transform and
every argument a parameter of that transform (albumentations itself only *warns* about an unknown
argument and ignores it, so a typo such as ``{"limit": 10}`` for ``rotate_limit`` would silently
do nothing); values are checked by the transform's own schema. The results are streamed, chunk
by chunk in order, so memory holds a bounded window of chunks (see :mod:`pipeline.data.parallel`).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import UserError
from .parallel import ordered_map

log = logging.getLogger(__name__)


def _albumentations() -> Any:
    # albumentations checks PyPI for a newer version on import (a network request with a 2 s
    # timeout, in every worker process); a reproducible, offline pipeline does not phone home.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations as A  # noqa: PLC0415
    except ImportError:
        raise UserError("augment.ops needs albumentations 2.0.x (the MIT release): pip install 'albumentations>=2.0,<2.1'") from None
    return A


def _transform_names(A: Any) -> list[str]:
    return sorted(n for n in dir(A) if not n.startswith("_") and isinstance(getattr(A, n), type)
                  and issubclass(getattr(A, n), A.BasicTransform) and n not in ("BasicTransform",
                                                                                 "ImageOnlyTransform", "DualTransform"))


def build_pipeline(ops: list[dict[str, Any]], *, check: bool = False) -> Any:
    """albumentations.Compose from [{"name": "HorizontalFlip", "args": {"p": 0.5}}, ...].

    Raises UserError naming the op (``augment.ops[i]``), the bad name or argument, and what is
    allowed. With ``check`` the transforms' other warnings (deprecations) are logged once.
    """
    A = _albumentations()
    transforms = []
    for i, op in enumerate(ops):
        name, args = op.get("name"), op.get("args") or {}
        cls = getattr(A, name, None) if isinstance(name, str) else None
        if cls is None or not isinstance(cls, type) or not issubclass(cls, A.BasicTransform) or name.startswith("_"):
            import difflib  # noqa: PLC0415

            names = _transform_names(A)
            close = difflib.get_close_matches(str(name), names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"augment.ops[{i}].name: {name!r} is not an albumentations transform{hint}; "
                            f"for example: {', '.join(n for n in ('HorizontalFlip', 'Affine', 'ShiftScaleRotate', 'RandomCrop', 'ColorJitter', 'GaussNoise') if n in names)}")
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            allowed = [k for k in params if k != "self"]
            unknown = sorted(set(args) - set(allowed))
            if unknown:
                raise UserError(f"augment.ops[{i}] ({name}): unknown argument(s) {', '.join(unknown)}; "
                                f"{name} takes {', '.join(allowed) or 'no arguments'}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                transforms.append(cls(**args))
            except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                raise UserError(f"augment.ops[{i}] ({name}): bad arguments {args}: {exc}") from None
        for w in caught:
            text = str(w.message)
            if "are not valid" in text:  # albumentations' own check, for transforms taking **kwargs
                raise UserError(f"augment.ops[{i}] ({name}): {text}")
            if check:
                log.warning("augment.ops[%d] (%s): %s", i, name, text)
    return A.Compose(transforms, seed=0)


def sample_seed(global_seed: int, copy: int, index: int) -> int:
    """The seed of augmented copy ``copy`` of training image ``index``: independent of workers and chunks."""
    return int(np.random.SeedSequence([global_seed, copy, index]).generate_state(1)[0])


def _augment_chunk(args: tuple[np.ndarray, int, int, int, list[dict[str, Any]]]) -> np.ndarray:
    """uint8 [n, C, H, W] (images start..start+n-1) -> their copy number ``copy``, same shape."""
    images, copy, start, seed, ops = args
    pipe = build_pipeline(ops)
    out = np.empty_like(images)
    for j, img in enumerate(images):
        idx = start + j
        pipe.set_random_seed(sample_seed(seed, copy, idx))
        hwc = np.ascontiguousarray(img.transpose(1, 2, 0))  # [C, H, W] -> [H, W, C]
        try:
            res = pipe(image=hwc)["image"]
        except Exception as exc:  # noqa: BLE001 - any failure inside albumentations is a configuration problem
            names = ", ".join(op["name"] for op in ops)
            raise UserError(f"augment.ops ({names}) failed on training image {idx} of shape {hwc.shape}: "
                            f"{type(exc).__name__}: {exc}") from None
        if res.ndim == 2:
            res = res[:, :, None]
        if res.shape != hwc.shape or res.dtype != np.uint8:
            raise UserError(f"augment.ops: the pipeline changed the image {hwc.shape} uint8 -> {res.shape} {res.dtype}; "
                            "the augmented set must keep the tensors' shape: use shape-preserving transforms or end "
                            "with a Resize to the same size")
        out[j] = res.transpose(2, 0, 1)
    return out


def iter_augment(images: np.ndarray, *, ops: list[dict[str, Any]], copies: int, seed: int, workers: int,
                 chunk: int = 1024) -> Iterator[np.ndarray]:
    """Yield the augmented copies of uint8 [N, C, H, W] in order (copy-major), one chunk at a time."""
    build_pipeline(ops)  # validate names and args before any work (the stage also logs warnings)
    jobs = ((images[s : s + chunk], c, s, seed, ops) for c in range(copies) for s in range(0, len(images), chunk))
    n_jobs = copies * -(-len(images) // chunk)
    yield from ordered_map(_augment_chunk, jobs, workers=workers if n_jobs > 1 else 1,
                           preload=("albumentations", __name__))


def augment(images: np.ndarray, *, ops: list[dict[str, Any]], copies: int, seed: int, workers: int,
            progress: bool = True, chunk: int = 1024) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [copies * N, C, H, W] (copy-major order), all in memory."""
    from tqdm import tqdm  # noqa: PLC0415

    parts = []
    with tqdm(total=copies * len(images), desc="augment", unit="img", disable=not progress, mininterval=1.0) as bar:
        for part in iter_augment(images, ops=ops, copies=copies, seed=seed, workers=workers, chunk=chunk):
            parts.append(part)
            bar.update(len(part))
    if not parts:
        return np.zeros((0, *images.shape[1:]), np.uint8)
    return np.concatenate(parts)
