"""The resolved config of a training run: ``params.train`` with the recipe applied and what the data dictates.

:class:`TrainConfig` is frozen and typed, with no ``None`` left where the recipe decides (only
``init_from`` stays ``None``, meaning "no transfer"). Which keys change the result is declared
once, beside each key in :mod:`pipeline.params` (``semantic=False``), with the one exception
that the learning-rate decay makes (:meth:`TrainConfig.semantic`); :meth:`TrainConfig.key`
hashes the others, and that one hash drives the resume check, the work directory and the
checkpoint's config check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..models import recipe
from ..params import Train, non_semantic_keys, validate

NON_SEMANTIC_KEYS = non_semantic_keys(Train)


@dataclass(frozen=True)
class TrainConfig(Train):
    seed: int = 0                                  # base.seed: every generator of the run derives from it
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (channels, height, width) of the training images
    num_classes: int = 0                           # classes the models condition on (0 = unconditional)
    arch: str = "dcgan"                            # network family of the recipe (models registry name)
    objective: str = "gan"                         # training objective of the recipe (objectives registry name)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): what checkpoints, generator files and summaries record."""
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    def semantic(self) -> dict[str, Any]:
        """The keys that change what is computed. The learning-rate decay decides two exceptions:
        with a decay, ``steps`` counts (where training ends sets every step's rate, so a longer run
        is another run); without one, the decay's keys do not (so keys made before they existed,
        and the checkpoints under them, still match)."""
        d = {k: v for k, v in self.to_dict().items() if k not in NON_SEMANTIC_KEYS}
        if self.lr_decay_start < 1:
            d["steps"] = self.steps
        else:
            del d["lr_decay_start"], d["lr_decay_to"]
        return d

    def key(self, **extra: Any) -> str:
        """Hash of the semantic config plus ``extra`` (data hash, model layout, world size...)."""
        blob = json.dumps({"config": self.semantic(), **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def resolve(train: Train | dict[str, Any], *, seed: int, image_shape: tuple[int, ...], num_classes: int) -> TrainConfig:
    """params.train (typed or a plain dict) + the recipe's defaults + the data -> the run's config."""
    values = dataclasses.asdict(train) if isinstance(train, Train) else dict(train)
    values = dataclasses.asdict(validate(Train, values, "train"))
    rec = recipe(values["model"])
    for k, v in rec.items():
        if k in values and values[k] is None:
            values[k] = v
    if values["ada"] and values["diffaug"]:
        raise UserError("train.ada and train.diffaug both augment D's inputs; choose one (set train.diffaug: [] "
                        "or train.ada: false)")
    if values["ada"] and rec.get("objective", "gan") == "vae":
        raise UserError(f"train.ada: {values['model']} has no discriminator; ADA is for GANs (set train.ada: false)")
    if values["conditional"] and num_classes < 2:
        raise UserError("train.conditional: the dataset has no labels (or one class); "
                        "set train.conditional: false or use a labeled source")
    cfg = TrainConfig(**values, seed=seed, image_shape=tuple(int(v) for v in image_shape),  # type: ignore[arg-type]
                      num_classes=num_classes if values["conditional"] else 0, arch=rec["arch"],
                      objective=rec.get("objective", "gan"))
    unset = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is None and f.name != "init_from"]
    assert not unset, f"recipe {values['model']!r} leaves {unset} unset"  # programmer error in RECIPES
    return cfg


def from_json(text: str) -> TrainConfig:
    """The config recorded in a checkpoint or generator file (plain data) -> TrainConfig."""
    d = json.loads(text)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: v for k, v in d.items() if k in fields}
    d["image_shape"] = tuple(d.get("image_shape", (1, 28, 28)))
    return TrainConfig(**d)
