"""Typed schema of params.yaml.

Every section of params.yaml is a frozen dataclass below; every field has a type, a default that
matches params.yaml, a one-line help text and (where it matters) a range or a set of choices.
:func:`load_params` reads the YAML file and rejects, before any work, an unknown key (listing the
keys that are allowed), a value of the wrong type, or a value outside its range. Stages receive
the typed objects, never the raw dict.

The validator is deliberately small and local (no pydantic): the train and evaluate code must run
on GPU machines where only torch is installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ParamsError


def spec(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None, default_factory: Any = None, semantic: bool = True) -> Any:
    """A dataclass field with its help text and numeric bounds (checked by :func:`validate`).

    semantic=False marks a key that does not change what is computed (a step budget, how often
    something is logged or saved, how fast a step runs): a checkpoint stays resumable, and a work
    directory reusable, when only such keys change (see :func:`non_semantic_keys`)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "semantic": semantic}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

DeviceName = str  # "auto", "cpu", "cuda" or "cuda:N"; checked in Base.__post_init__


@dataclass(frozen=True)
class Base:
    seed: int = spec(0, "global seed; every stage derives its own generators from it", ge=0)
    device: DeviceName = spec("auto", "auto (cuda when present, else cpu), cpu, cuda or cuda:N")
    deterministic: bool = spec(True, "deterministic kernels (bitwise reproducible on CPU; slower on GPU)")

    def __post_init__(self) -> None:
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ParamsError(f"base.device: {d!r} is not allowed; use auto, cpu, cuda or cuda:N")


Source = Literal["mnist-embedded", "sklearn-digits", "mnist", "fashion-mnist", "cifar10", "svhn",
                 "celeba", "idx", "folder", "archive", "npz"]


@dataclass(frozen=True)
class Data:
    source: Source = spec("mnist-embedded", "dataset source (see README: Sources)")
    path: str | None = spec(None, "input path or URL for idx/folder/archive/npz sources; null otherwise")
    sha256: str | None = spec(None, "pinned sha256 of data.path when it is a remote archive/npz")
    mirrors: list[str] = spec(None, "extra mirrors tried first (URLs or local directories)", default_factory=list)
    allow_http: bool = spec(False, "allow plain http to non-loopback hosts (off: https only)")
    timeout_s: float = spec(30.0, "network timeout per socket operation, seconds", gt=0)
    limit: int | None = spec(None, "keep N images of each split, evenly spaced so every class stays (quick runs); null = all",
                             ge=1)
    channels: Literal["gray", "rgb"] = spec("gray", "decode every image to 1-channel gray or 3-channel RGB")
    background: list[int] = spec(None, "RGB colour alpha is composited on", default_factory=lambda: [255, 255, 255])
    min_size: int = spec(8, "reject images smaller than this on either side, pixels", ge=1)
    max_pixels: int = spec(64_000_000, "reject images with more pixels (decompression bombs)", ge=1)
    animated: Literal["reject", "first_frame"] = spec("first_frame", "animated images: reject or keep frame 0")
    dedup: bool = spec(True, "drop exact duplicates (same decoded pixels), keeping the first")
    near_dup_distance: int = spec(0, "also drop near duplicates within this pHash distance (0 = off)", ge=0, le=32)
    workers: int = spec(0, "decoding processes for the clean stage (0 = all cores)", ge=0)

    def __post_init__(self) -> None:
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise ParamsError(f"data.background: {self.background!r} is not allowed; use three ints in 0..255")
        needs_path = {"idx", "folder", "archive", "npz"}
        if self.source in needs_path and not self.path:
            raise ParamsError(f"data.path: source {self.source!r} needs a path; set data.path")


@dataclass(frozen=True)
class Preprocess:
    size: int | list[int] = spec(28, "output size in pixels: N (N x N) or [N, N]; one the model can generate "
                                     "(14, 16, 28, 32, 56, 64, 128, ...)",
                                 ge=8, le=1024)
    resize: Literal["crop", "letterbox", "stretch"] = spec("crop", "aspect policy: center-crop, pad (letterbox) or stretch")
    filter: Literal["lanczos", "bicubic", "bilinear", "area", "box", "nearest"] = spec(
        "lanczos", "resampling filter (recorded: the filter alone moves FID)")
    fill: int = spec(0, "letterbox padding value, 0..255", ge=0, le=255)
    test_fraction: float = spec(0.2, "held-out share when the source has no test split (stratified)", gt=0, lt=1)
    shard_mb: int = spec(256, "maximum size of one tensor shard file, MiB", ge=1)

    def __post_init__(self) -> None:
        if isinstance(self.size, list):
            if len(self.size) != 2 or any(not 8 <= v <= 1024 for v in self.size):
                raise ParamsError(f"preprocess.size: {self.size!r} is not allowed; use N or [height, width], "
                                  "each in 8..1024")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the output images."""
        return (self.size, self.size) if isinstance(self.size, int) else (self.size[0], self.size[1])


@dataclass(frozen=True)
class AugmentOp:
    name: str = spec("HorizontalFlip", "albumentations transform class name")
    args: dict[str, Any] = spec(None, "keyword arguments of the transform", default_factory=dict)


@dataclass(frozen=True)
class Augment:
    copies: int = spec(0, "augmented copies per training image added to the originals (0 = none)", ge=0, le=64)
    ops: list[AugmentOp] = spec(None, "albumentations transforms applied in order", default_factory=list)
    workers: int = spec(1, "worker processes (output is identical for any count)", ge=1)


@dataclass(frozen=True)
class Evaluator:
    epochs: int = spec(4, "training epochs of the offline feature network", ge=1)
    batch_size: int = spec(128, "batch size", ge=1)
    lr: float = spec(2e-3, "Adam learning rate", gt=0)
    width: int = spec(32, "channels of the first conv layer", ge=4)
    feature_dim: int = spec(128, "dimension of the feature vector used for FID/KID/PR", ge=8)


Model = Literal["dcgan", "sngan", "wgan_gp", "vae", "stylegan2", "biggan"]
Loss = Literal["nonsaturating", "hinge", "lsgan", "wasserstein"]
DiffAug = Literal["translation", "cutout", "color"]
AdaOp = Literal["xflip", "rotate90", "translation", "geometric", "color", "cutout"]


@dataclass(frozen=True)
class Train:
    model: Model = spec("dcgan", "recipe: dcgan, sngan (ResNet + spectral norm + hinge), wgan_gp, vae, stylegan2, "
                                 "biggan (hierarchical latents, self-attention, orthogonal regularisation)")
    conditional: bool = spec(False, "class-conditional G (conditional BN) and projection D; needs labels")
    steps: int = spec(2800, "generator optimizer steps (a longer run resumes a shorter one, unless the learning "
                            "rates decay)", ge=1, semantic=False)
    batch_size: int = spec(64, "images per step (per process under DDP)", ge=2)
    nz: int = spec(64, "latent dimension", ge=1)
    ngf: int = spec(32, "generator width (channels of its last hidden layer)", ge=4)
    ndf: int = spec(32, "discriminator/encoder width (channels of its first layer)", ge=4)
    loss: Loss | None = spec(None, "GAN loss on logits; null = the recipe's (dcgan: nonsaturating)")
    d_norm: Literal["batch", "layer", "none"] | None = spec(None, "D normalisation; null = the recipe's")
    spectral_norm: bool | None = spec(None, "spectral normalization in D; null = the recipe's (sngan: true)")
    mbstd: bool | None = spec(None, "minibatch standard-deviation channel in D; null = the recipe's (stylegan2: true, "
                                    "else false)")
    n_critic: int | None = spec(None, "D steps per G step; null = the recipe's (wgan_gp: 5, biggan: 2, else 1)", ge=1)
    gp_weight: float | None = spec(None, "gradient penalty weight; null = the recipe's (wgan_gp: 10)", ge=0)
    r1_gamma: float | None = spec(None, "lazy R1 penalty weight on real images (0 = off); null = the recipe's "
                                        "(dcgan: 1, stylegan2: 0.01, else 0)", ge=0)
    r1_every: int = spec(16, "apply R1 every N D steps (lazy regularisation)", ge=1)
    lr_g: float | None = spec(None, "generator (or VAE) learning rate; null = the recipe's (2e-4; vae: 1e-3; "
                                    "biggan: 1e-4; stylegan2: 0.0025)", gt=0)
    lr_d: float | None = spec(None, "discriminator learning rate (two time-scale rule: may differ from lr_g); "
                                    "null = the recipe's (2e-4; biggan: 4e-4; stylegan2: 0.0025)", gt=0)
    lr_decay_start: float = spec(1.0, "fraction of train.steps after which both learning rates fall linearly, "
                                      "reaching lr_decay_to times their value at the last step (1 = constant)",
                                 ge=0, le=1)
    lr_decay_to: float = spec(0.0, "with lr_decay_start < 1: the learning rates' last value, as a fraction of "
                                   "their first", ge=0, le=1)
    beta1: float | None = spec(None, "Adam beta1; null = the recipe's (0.5; biggan, stylegan2: 0)", ge=0, lt=1)
    beta2: float | None = spec(None, "Adam beta2; null = the recipe's (0.999; stylegan2: 0.99)", ge=0, lt=1)
    ortho_reg: float | None = spec(None, "orthogonal regularisation of G's weights (BigGAN's off-diagonal form, "
                                         "GANs only); null = the recipe's (biggan: 1e-4, else 0)", ge=0)
    label_smoothing: float = spec(0.0, "one-sided: real targets become 1 - this (nonsaturating, lsgan)", ge=0, lt=0.5)
    instance_noise: float = spec(0.0, "std of Gaussian noise added to D inputs at step 0", ge=0)
    instance_noise_decay_steps: int = spec(1000, "steps over which instance noise decays linearly to 0", ge=1)
    diffaug: list[DiffAug] = spec(None, "differentiable augmentation of D inputs (translation, cutout, color)",
                                  default_factory=list)
    ada: bool = spec(False, "adaptive discriminator augmentation (ADA): D's inputs augmented with a probability p "
                            "that follows D's overfitting (for small datasets; any GAN)")
    ada_ops: list[AdaOp] = spec(None, "ADA's transforms: xflip, rotate90, translation, geometric, color, cutout",
                                default_factory=lambda: ["xflip", "rotate90", "translation", "geometric", "color"])
    ada_target: float = spec(0.6, "ADA: the r_t = E[sign(D(real))] that p is adjusted to hold", gt=0, lt=1)
    ada_interval: int = spec(4, "ADA: steps between adjustments of p", ge=1)
    ada_kimg: float = spec(500.0, "ADA: thousands of real images over which p can move from 0 to 1 (the paper's 500)",
                           gt=0)
    ada_p_init: float = spec(0.0, "ADA: p at step 0", ge=0, le=1)
    ema_decay: float = spec(0.999, "EMA of generator weights, warmed up (0 = off); grids and metrics use it", ge=0, lt=1)
    ema_start: int = spec(0, "step from which the EMA averages (before: it copies the weights)", ge=0)
    ema_standing_stats: int = spec(16, "GANs: before the EMA generator samples (grids, scores, saved files), its "
                                       "BatchNorm statistics are recomputed over this many batches of fresh latents "
                                       "(0 = keep the live G's, which belong to other weights)", ge=0)
    ema_kimg: float | None = spec(None, "EMA half-life in thousands of images, replacing ema_decay when > 0 "
                                        "(StyleGAN2); null = the recipe's (stylegan2: 10, else 0)", ge=0)
    ema_rampup: float | None = spec(None, "with ema_kimg: the half-life is at most this times the images seen "
                                          "(0 = no ramp-up); null = the recipe's (stylegan2: 0.05, else 0)", ge=0)
    style_mixing: float | None = spec(None, "StyleGAN2: probability of mixing two latents' styles at a random "
                                            "layer; null = the recipe's (0.9)", ge=0, le=1)
    pl_weight: float | None = spec(None, "StyleGAN2: path-length regularisation weight (0 = off); null = the "
                                         "recipe's (2)", ge=0)
    mapping_layers: int | None = spec(None, "StyleGAN2: depth of the mapping network z -> w; null = the recipe's "
                                            "(8, the paper's; StyleGAN2-ADA uses 2 for small data)", ge=1)
    pl_every: int = spec(4, "StyleGAN2: apply path-length regularisation every N G steps (lazy, on half the batch)",
                         ge=1)
    grad_clip: float = spec(0.0, "clip gradient norm of G and D to this (0 = off)", ge=0)
    init: Literal["normal", "xavier", "he", "orthogonal"] = spec(
        "normal", "weight init: N(0, 0.02) as DCGAN, Xavier, He, orthogonal (BigGAN's) (stylegan2: unused, "
                  "equalized learning rate)")
    kl_weight: float = spec(1.0, "VAE: beta, the weight of the KL term", ge=0)
    kl_warmup_steps: int = spec(500, "VAE: steps over which the KL weight ramps up from 0", ge=0)
    vae_likelihood: Literal["bernoulli", "gaussian", "logistic"] = spec(
        "logistic", "VAE: pixel likelihood: bernoulli, or a gaussian or logistic discretised to 256 levels "
                     "with a learned scale")
    vae_scale: Literal["pixel", "global"] = spec("pixel", "VAE: learned scale of gaussian/logistic: per pixel or one")
    free_bits: float = spec(0.0, "VAE: KL floor per latent dimension, nats (batch mean; 0 = off)", ge=0)
    vae_sampler: Literal["prior", "gmm"] = spec(
        "gmm", "VAE: latents of samples: prior N(0, I), or a Gaussian mixture fitted to the encoder's means (ex-post)")
    gmm_components: int = spec(30, "VAE: components of the ex-post Gaussian mixture", ge=1)
    gmm_covariance: Literal["full", "diag"] = spec("full", "VAE: covariance of each mixture component")
    checkpoint_every: int = spec(500, "steps between checkpoints", ge=1, semantic=False)
    log_every: int = spec(25, "steps between log lines (the only host syncs of the loop)", ge=1, semantic=False)
    grid_every: int = spec(250, "steps between fixed-seed sample grids", ge=1, semantic=False)
    eval_every: int = spec(500, "steps between in-loop evaluator scores (best checkpoint kept)", ge=1, semantic=False)
    eval_samples: int = spec(1000, "generated images per in-loop score", ge=10, semantic=False)
    collapse_margin: float = spec(0.5, "collapse: score worse than best by this fraction ...", gt=0, semantic=False)
    collapse_patience: int = spec(3, "... for this many evaluations in a row", ge=1, semantic=False)
    stop_on_collapse: bool = spec(False, "stop training when a collapse is detected", semantic=False)
    resume: bool = spec(True, "continue from the run's last checkpoint when its params match", semantic=False)
    init_from: str | None = spec(None, "start from another run's checkpoint or generator file (transfer); "
                                       "a path inside the project")
    freeze_d_layers: int = spec(0, "with init_from: freeze this many first D layers", ge=0)
    precision: Literal["fp32", "bf16"] = spec("fp32", "autocast precision on CUDA (bf16 is faster)")
    channels_last: bool = spec(True, "channels_last memory format on CUDA")
    cuda_graph: bool = spec(True, "on CUDA, capture each GAN step (D, G, lazy R1) in CUDA graphs", semantic=False)
    compile: bool = spec(False, "torch.compile the models' forward and backward (fuses BatchNorm and "
                                "activations; the first steps compile: about 25 s on an H200, cached on disk)", semantic=False)
    devices: int | Literal["all"] = spec(1, "GPUs: 1, N or all (N > 1 runs DDP through torchrun)", semantic=False)
    sync_bn: bool = spec(False, "synchronise BatchNorm statistics across DDP processes")
    num_threads: int = spec(0, "CPU threads for torch (0 = all cores)", ge=0, semantic=False)
    data_placement: Literal["auto", "device", "host", "stream"] = spec(
        "auto", "training images on the GPU, in pinned host memory, or streamed from the shard files; auto picks "
                "from the set's size and free memory", semantic=False)

    def __post_init__(self) -> None:
        if isinstance(self.devices, int) and self.devices < 1:
            raise ParamsError(f"train.devices: {self.devices} is not allowed; use 1, N > 1 or 'all'")


@dataclass(frozen=True)
class Evaluate:
    n_samples: int = spec(2000, "generated images per metric evaluation", ge=10)
    batch_size: int = spec(250, "batch size for sampling and features", ge=1)
    kid_subsets: int = spec(50, "KID subsets", ge=1)
    pr_k: int = spec(3, "k of the k-NN precision/recall", ge=1)
    dc_k: int = spec(5, "k of density/coverage", ge=1)
    bootstrap: int = spec(20, "bootstrap resamples for confidence intervals", ge=2)
    seeds: int = spec(5, "independent draws of n_samples (latent seeds) for the other metrics' intervals (1 = none)",
                      ge=1, le=100)
    inception_weights: str | None = spec(None, "path or URL of Inception-v3 FID weights (null = not computed)")
    inception_sha256: str | None = spec(None, "pinned sha256 of the Inception weights file")


@dataclass(frozen=True)
class Report:
    grid_nrow: int = spec(8, "images per row in sample grids", ge=1)
    grid_n: int = spec(64, "images in each sample grid", ge=1)
    interpolation_steps: int = spec(10, "images in the latent interpolation strip", ge=2)
    neighbours: int = spec(8, "closest generated/train pairs shown (memorisation panel)", ge=1)
    truncation_psi: float = spec(1.0, "truncation psi of the report's sample grids and interpolations (1 = off; "
                                      "needs a generator with truncation, e.g. stylegan2); metrics always use 1",
                                 gt=0, le=1)


@dataclass(frozen=True)
class Params:
    base: Base = field(default_factory=Base)
    data: Data = field(default_factory=Data)
    preprocess: Preprocess = field(default_factory=Preprocess)
    augment: Augment = field(default_factory=Augment)
    evaluator: Evaluator = field(default_factory=Evaluator)
    train: Train = field(default_factory=Train)
    evaluate: Evaluate = field(default_factory=Evaluate)
    report: Report = field(default_factory=Report)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (with ints widened to float)."""
    origin = typing.get_origin(tp)
    bad = ParamsError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ParamsError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return validate(tp, value, key)
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # programmer error


def _check_bounds(value: Any, f: dataclasses.Field, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    m = f.metadata
    for op, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                         ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = m.get(op)
        if bound is not None and not ok(value, bound):
            raise ParamsError(f"{key}: {value!r} is not allowed; it must be {word} {bound} ({m['help']})")


# Strings that mean "nothing" in Python or YAML; copied into params.yaml as `key: None` (or quoted)
# they would be read as the string, where a path or null is meant.
_NULL_LIKE = {"none", "null", "~", "nil", ""}


def _null_like_string(value: Any, tp: Any, key: str) -> None:
    """Refuse 'None'-like strings for optional string keys (paths, URLs, sha256s)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else ()
    if str in args and type(None) in args and isinstance(value, str) and value.strip().lower() in _NULL_LIKE:
        raise ParamsError(f"{key}: {value!r} is a string, not null; write null (unquoted) or leave the key out "
                          "for no value, or give a real path")


def _raise_all(errors: list[str]) -> None:
    if len(errors) == 1:
        raise ParamsError(errors[0])
    if errors:
        raise ParamsError(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))


def _messages(exc: ParamsError) -> list[str]:
    text = str(exc)
    if "\n  - " in text:
        return [ln[4:] for ln in text.splitlines()[1:]]
    return [text]


def validate(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys, wrong types and bad values.

    Every problem is reported at once (one ParamsError listing them all), not just the first.
    """
    where = prefix or "params.yaml"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors: list[str] = []
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            full = f"{prefix}.{key}" if prefix else str(key)
            errors.append(f"{full}: unknown key{hint}; allowed keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        try:
            _null_like_string(raw[name], hints[name], key)
            value = _coerce(raw[name], hints[name], key)
            _check_bounds(value, f, key)
        except ParamsError as exc:
            errors.extend(_messages(exc))
            continue
        values[name] = value
    _raise_all(errors)
    try:
        return cls(**values)
    except ParamsError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - a programmer error in the schema
        raise ParamsError(f"{where}: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain PyYAML keeps the last
    one silently; DVC refuses the same file, so the stage and DVC would disagree on the params)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports an unhashable key
            if key in seen:
                raise ParamsError(f"{self.name}: key {key!r} is given twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document of ``path`` (a duplicate key, a folder or bytes that are not UTF-8 are
    :class:`ParamsError`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params PATH") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a folder, not a params file; pass --params PATH/params.yaml") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          "save the file as UTF-8") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror or exc}); pass a readable --params file") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_params(path: str | Path = "params.yaml", *, models: bool = False) -> Params:
    """Read and validate params.yaml; raise :class:`ParamsError` naming the first bad key.

    ``models``: also check that the chosen ``train.model`` can be built at ``preprocess.size``
    (imports torch; stages that build or feed a model pass True, see :func:`check_model_fits`).
    """
    path = Path(path)
    raw = read_yaml(path)
    params = validate(Params, raw)
    check_paths(params, path.resolve().parent)
    if models:
        check_model_fits(params)
    return params


def check_model_fits(params: Params) -> None:
    """Refuse a ``preprocess.size`` that ``train.model`` cannot generate (before any work).

    The sizes come from the model registry (:func:`pipeline.models.supported_sizes`), so a model
    added there brings its own rule.
    """
    from .models import supported_sizes  # noqa: PLC0415 - imports torch

    height, width = params.preprocess.hw
    model = params.train.model
    sizes = supported_sizes(model)
    shown = ", ".join(str(s) for s in sizes if s <= 256)
    if height != width:
        raise ParamsError(f"preprocess.size: {params.preprocess.size!r} is not square; train.model {model!r} "
                          f"generates square images only: set preprocess.size to one number N (N x N), one of "
                          f"{shown}, ... (resize: crop or letterbox keeps the aspect of your images)")
    if height not in sizes:
        raise ParamsError(f"preprocess.size: {height} is a size train.model {model!r} cannot generate (its layers "
                          f"double from 4x4 or 7x7); use one of {shown}, ...")


# Path-valued keys and where they may point. Data inputs (data.path, data.mirrors) and the
# sha256-pinned Inception weights may live anywhere: users point at their own folders and shared
# files, and DVC reproduces the result through the download stage's recorded hashes. A transfer
# source (train.init_from) is a model file that changes what train computes but is not a DVC
# dependency of the stage, so it must sit inside the project, where it is versioned with the
# commit (`dvc add` / `dvc import` it there); a path that climbs out could not be reproduced by a
# teammate's clone and would let `-S train.init_from=...` read any file the user can read.
PROJECT_PATH_KEYS = ("train.init_from",)


# The train stage's declared outputs (dvc.yaml): DVC deletes them before the stage runs, so a
# transfer source among them would be gone by the time train reads it.
TRAIN_OUTPUTS = ("models/generator.pt", "models/best.pt", "models/checkpoint.pt")


def _dvc_cache_dirs(root: str) -> list[str]:
    """The project's DVC cache folders: .dvc/cache and a ``cache.dir`` set in .dvc/config(.local)."""
    import configparser  # noqa: PLC0415
    import os  # noqa: PLC0415

    dirs = [os.path.join(root, ".dvc", "cache")]
    for name in ("config", "config.local"):
        cfg = configparser.ConfigParser()
        try:
            cfg.read(os.path.join(root, ".dvc", name), encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue
        value = cfg.get("cache", "dir", fallback=None) if cfg.has_section("cache") else None
        if value:
            dirs.append(os.path.join(root, ".dvc", os.path.expanduser(value.strip().strip("'\""))))
    return [os.path.realpath(d) for d in dirs]


def check_paths(params: Params, project_dir: Path) -> None:
    """Reject path params of :data:`PROJECT_PATH_KEYS` that leave ``project_dir``.

    The path is checked as written (``..``, absolute paths) and again with every symlink resolved:
    a link inside the project that points elsewhere is refused like the absolute path it stands
    for. The one exception is a link into the project's DVC cache (``cache.type symlink``, whose
    cache may live outside the project), since that is how DVC checks out a tracked file.
    A ``train.init_from`` that is one of the train stage's own outputs is refused too.
    """
    import os  # noqa: PLC0415

    root = os.path.normpath(os.path.abspath(project_dir))
    real_root = os.path.realpath(root)

    def inside(path: str, base: str) -> bool:
        return path == base or path.startswith(base.rstrip(os.sep) + os.sep)

    for key in PROJECT_PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(params, section), name)
        if value is None:
            continue
        if not value.strip() or "\x00" in value:
            raise ParamsError(f"{key}: {value!r} is not a usable path; use a path inside the project or null")
        if "://" in value:
            raise ParamsError(f"{key}: {value!r} is a URL; download the file into the project "
                              "(e.g. `dvc import-url URL models/transfer.pt`) and give that path")
        outside = ParamsError(
            f"{key}: {value!r} is outside the project ({root}). It must be a path inside the project so that "
            "the result can be reproduced from the commit: copy the file in and track it "
            "(`dvc add models/transfer.pt`, or `dvc import` it from another repository), then set "
            f"{key}: models/transfer.pt")
        full = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
        if not inside(full, root):
            raise outside
        real = os.path.realpath(full)
        if not inside(real, real_root) and not any(inside(real, c) for c in _dvc_cache_dirs(root)):
            raise ParamsError(f"{key}: {value!r} is a link to {real}, outside the project ({root}); copy the file "
                              f"into the project instead of linking to it (`cp {real} models/transfer.pt` and "
                              f"`dvc add models/transfer.pt`), then set {key}: models/transfer.pt")
        if key == "train.init_from":
            for out in TRAIN_OUTPUTS:
                target = os.path.join(root, out)
                if full == target or real == os.path.realpath(target):
                    raise ParamsError(
                        f"{key}: {value!r} is an output of the train stage ({out}), which DVC deletes before "
                        f"train runs; copy it first (`cp {out} models/transfer.pt`, then `dvc add "
                        f"models/transfer.pt`) and set {key}: models/transfer.pt")


def non_semantic_keys(cls: type = Train) -> tuple[str, ...]:
    """Keys of a section declared ``semantic=False`` (they do not change what a run computes)."""
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("semantic", True))


def to_dict(obj: Any) -> Any:
    """Plain-data view of a params object (for checkpoints, MLflow and JSON)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def describe() -> str:
    """Every key with its default and help text, as YAML (``python -m pipeline params``): any line can
    be copied into params.yaml as it is."""
    lines = []
    for section in dataclasses.fields(Params):
        cls = section.default_factory  # type: ignore[misc]
        lines.append(f"{section.name}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            value = yaml.safe_dump(to_dict(default), default_flow_style=True, width=10**6).strip()
            value = value.removesuffix("\n...").strip()  # a bare scalar's document end marker
            lines.append(f"  {f.name}: {value}  # {f.metadata.get('help', '')} [{_type_name(hints[f.name])}]")
    return "\n".join(lines)
