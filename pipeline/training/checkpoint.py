"""Training checkpoints: everything needed to continue as if never stopped, loadable safely.

A checkpoint holds the models, the EMA, both optimizers, the step counters, the data sampler's
position, the in-loop evaluation history, the resolved config, and every random state (torch CPU,
every CUDA device, the loop's own generator, NumPy, Python). It contains only tensors and plain
data, so it loads with ``torch.load(weights_only=True)``; it is written to a temporary file,
fsynced and renamed, so a kill -9 midway leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io import atomic_write
from ..safeload import safe_load

CHECKPOINT_FORMAT = "pipeline.checkpoint/1"


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    keys, version = state["python"]
    random.setstate((version, tuple(keys), None))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Serialise in memory first (a failure there leaves no file), then write atomically."""
    payload = dict(payload, format=CHECKPOINT_FORMAT)
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    payload = safe_load(path, map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint of this pipeline")
    return payload


def transfer(path: Path, targets: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Copy into ``targets`` every tensor of another run's file whose name and shape match.

    ``path`` is a training checkpoint (its models by name) or a generator file (the generator as
    ``g``); a target other than g and d with no source of its own name (the VAE) takes the
    generator's. Returns a report of
    the tensors matched and newly initialised."""
    payload = safe_load(path)
    sources: dict[str, dict[str, torch.Tensor]] = {}
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        sources = dict(payload["models"])
    elif isinstance(payload, dict) and payload.get("format") == "pipeline.generator/1":
        sources["g"] = payload["state_dict"]
    else:
        raise CheckpointError(f"train.init_from: {path} is neither a checkpoint nor a generator file of this pipeline")
    report: dict[str, Any] = {"source": str(path), "matched": [], "new": [], "frozen": []}
    with torch.no_grad():
        for name, module in targets.items():
            src = sources.get(name) or (None if name in ("g", "d") else sources.get("g"))
            for key, tensor in module.state_dict().items():
                if src is not None and key in src and src[key].shape == tensor.shape:
                    tensor.copy_(src[key])
                    report["matched"].append(f"{name}.{key}")
                else:
                    report["new"].append(f"{name}.{key}")
    return report
