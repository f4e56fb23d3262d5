"""Offline augmentation with albumentations, byte-identical for any number of workers.

Every augmented image gets its own seed, derived from the global seed, the copy number and the
sample index (NumPy's SeedSequence), and the pipeline is re-seeded with it right before that image
is transformed. Nothing depends on which worker handles which image or in what order, so 1 worker
and 4 workers write the same bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import warnings
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import UserError


def build_pipeline(ops: list[dict[str, Any]]) -> Any:
    """albumentations.Compose from [{"name": "HorizontalFlip", "args": {"p": 0.5}}, ...]."""
    import albumentations as A  # noqa: PLC0415

    transforms = []
    for i, op in enumerate(ops):
        cls = getattr(A, op["name"], None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
            names = sorted(n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)
                           and not n.startswith("_"))
            raise UserError(f"augment.ops[{i}].name: {op['name']!r} is not an albumentations transform; "
                            f"for example: {', '.join(names[:12])}, …")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                transforms.append(cls(**op.get("args", {})))
        except (TypeError, ValueError) as exc:
            raise UserError(f"augment.ops[{i}] ({op['name']}): bad args {op.get('args')}: {exc}") from None
    return A.Compose(transforms, seed=0)


def sample_seed(global_seed: int, copy: int, index: int) -> int:
    return int(np.random.SeedSequence([global_seed, copy, index]).generate_state(1)[0])


def _augment_chunk(args: tuple[np.ndarray, int, list[int], int, list[dict[str, Any]]]) -> np.ndarray:
    images, copy, indices, seed, ops = args
    pipe = build_pipeline(ops)
    out = np.empty_like(images)
    for j, (img, idx) in enumerate(zip(images, indices, strict=True)):
        pipe.set_random_seed(sample_seed(seed, copy, idx))
        hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
        res = pipe(image=hwc)["image"]
        if res.ndim == 2:
            res = res[:, :, None]
        if res.shape != hwc.shape:
            raise UserError(f"augment: the pipeline changed the image shape {hwc.shape} -> {res.shape}; "
                            "add a Resize or use shape-preserving transforms")
        out[j] = res.transpose(2, 0, 1)
    return out


def augment(images: np.ndarray, *, ops: list[dict[str, Any]], copies: int, seed: int, workers: int,
            progress: bool = True, chunk: int = 1024) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [copies * N, C, H, W] (copy-major order)."""
    build_pipeline(ops)  # validate names and args before any work
    jobs = [(images[s : s + chunk], c, list(range(s, min(s + chunk, len(images)))), seed, ops)
            for c in range(copies) for s in range(0, len(images), chunk)]
    bar = tqdm(total=copies * len(images), desc="augment", unit="img", disable=not progress, mininterval=1.0)
    parts = []
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for part in pool.imap(_augment_chunk, jobs):
                parts.append(part)
                bar.update(len(part))
    else:
        for job in jobs:
            part = _augment_chunk(job)
            parts.append(part)
            bar.update(len(part))
    bar.close()
    if not parts:
        return np.zeros((0, *images.shape[1:]), np.uint8)
    return np.concatenate(parts)
