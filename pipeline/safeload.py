"""Loading torch files without running code from them.

Every .pt file this pipeline reads (generators, checkpoints, the evaluator, transfer sources,
Inception weights) goes through :func:`safe_load`: ``torch.load(weights_only=True)`` accepts
tensors and plain containers only, so a file whose pickle would run code (``__reduce__``) is
refused before anything in it executes.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def safe_load(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; a file that needs code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (a bare pickle, a truncated or foreign
        # file) is refused without being handed to an unpickler at all.
        raise CheckpointError(f"{path}: corrupt or not a torch file (torch.save writes zip archives); "
                              "nothing in it was loaded")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it needs arbitrary code to load ({str(exc).splitlines()[0][:200]}). "
            "Only files holding tensors and plain data are loaded; use a checkpoint written by this pipeline."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a torch file ({str(exc)[:200]})") from None
