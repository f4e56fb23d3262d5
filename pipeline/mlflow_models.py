"""The generator as an MLflow model: registers the logger of tracking's "model" events.

It lives apart from :mod:`pipeline.tracking` so that the stages that never log a model (all but
``train``) do not depend on the model code: importing this module is what lets a process log one
(the train stage and ``python -m pipeline mlflow-sync`` import it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .models import load_generator
from .tracking import MODEL_LOGGERS


def log_generator_model(writer: Any, event: Mapping[str, Any], path: Path) -> None:
    """Log a generator as an MLflow pytorch model (loadable with mlflow.pytorch.load_model).

    Saved in MLflow's "pt2" format (torch.export): a traced graph, so loading it unpickles no
    code -- the same rule as for our own checkpoints. The example batch has 2 rows because
    torch.export specialises a batch dimension of 1 to a constant. Conditional generators take
    (z, y): the signature names both tensors and the example is the list [z, y] (MLflow's pyfunc
    serving cannot take two tensors and says so in a warning; mlflow.pytorch.load_model can).
    The loaded module is called as ``model(z)`` or ``model(z, y)``; it is already in eval mode.
    """
    generator, info = load_generator(path, device="cpu")
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from mlflow.models import ModelSignature  # noqa: PLC0415
    from mlflow.types import Schema, TensorSpec  # noqa: PLC0415

    z = torch.randn(2, info["nz"], generator=torch.Generator().manual_seed(0))  # [2, nz]
    y = torch.arange(2) % info["num_classes"] if info["num_classes"] else None  # [2] or None
    with torch.no_grad():
        out = generator(z, y).numpy()  # [2, C, H, W] in [-1, 1]
    # One unnamed tensor for z, so MLflow's pyfunc serving accepts a plain array; named z and y
    # for conditional generators (pyfunc cannot serve two tensors; load_model can).
    inputs = [TensorSpec(np.dtype(np.float32), (-1, info["nz"]))]
    example: Any = z.numpy()
    if y is not None:
        inputs = [TensorSpec(np.dtype(np.float32), (-1, info["nz"]), "z"),
                  TensorSpec(np.dtype(np.int64), (-1,), "y")]
        example = [z.numpy(), y.numpy()]
    signature = ModelSignature(inputs=Schema(inputs),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]), "images")]))
    mlflow = writer.mlflow
    # Pinned requirements: left to infer them, MLflow re-imports the model in a subprocess,
    # which takes ~15 s per stage on a CPU machine.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    # log_model works through the fluent API: point it at our store and attach it to our run.
    mlflow.set_tracking_uri(writer.uri)
    try:
        with mlflow.start_run(run_id=writer.run_id, nested=True):
            mlflow.pytorch.log_model(generator, name=event.get("artifact_path", "generator"), signature=signature,
                                     input_example=example, serialization_format="pt2",
                                     pip_requirements=requirements)
    finally:
        # Leaving start_run ends the run; it is still running until its own "end" event.
        writer.client.update_run(writer.run_id, status="RUNNING")


MODEL_LOGGERS["generator"] = log_generator_model
