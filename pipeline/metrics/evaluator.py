"""The offline evaluator: a feature network trained on the real training split, always available.

Standard FID needs Inception-v3 weights, a download that fails offline and fits natural photos
rather than 28x28 digits. The pipeline therefore trains its own feature network on the real
training images: a classifier when labels exist (its penultimate layer gives features, its
softmax gives the class probabilities IS needs; its test accuracy is reported), else a
convolutional autoencoder whose bottleneck gives features (IS is then not defined). The network
file's sha256 is recorded with every metric, so numbers are only compared when it matches.
"""

from __future__ import annotations

import io as _io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..errors import CheckpointError
from ..imaging import normalize
from ..io import atomic_write, sha256_file
from ..safeload import safe_load

log = logging.getLogger(__name__)

EVALUATOR_FORMAT = "pipeline.evaluator/1"


class FeatureNet(nn.Module):
    """Conv trunk -> global average pool -> ``feature_dim`` features (-> class logits when labeled)."""

    def __init__(self, *, channels: int, width: int, feature_dim: int, num_classes: int, size: int) -> None:
        super().__init__()
        self.num_classes, self.channels, self.size = num_classes, channels, size
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.trunk = nn.Sequential(block(channels, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                   block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes) if num_classes else None
        if not num_classes:
            # Autoencoder decoder: features -> image at 1/4 resolution -> upsampled reconstruction.
            s = max(1, size // 4)
            self.dec_fc = nn.Linear(feature_dim, 4 * w * s * s)
            self.dec = nn.Sequential(nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(4 * w, 2 * w, 3, 1, 1), nn.ReLU(),
                                     nn.Upsample(size=(size, size)), nn.Conv2d(2 * w, channels, 3, 1, 1), nn.Tanh())
            self._s, self._w = s, w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] in [-1, 1] -> features [N, feature_dim] (after ReLU, as Inception's pool3)."""
        return F.relu(self.embed(self.trunk(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.head is not None:
            return self.head(f)
        h = self.dec_fc(f).reshape(-1, 4 * self._w, self._s, self._s)
        return self.dec(h)


TEST_CHUNK = 500  # images per forward pass when scoring the test split


def memory_needed(*, channels: int, height: int, width: int, net_width: int, batch_size: int,
                  training: bool) -> int:
    """Bytes a batch through :class:`FeatureNet` needs at its peak, estimated from the layer sizes.

    Per image, the trunk's three conv blocks keep six activations each (conv, BatchNorm, ReLU,
    twice) at full, half and quarter resolution with width w, 2w, 4w: about 10.5 w H W floats.
    Training keeps them all for backward and as many again for their gradients; inference holds
    about two full-resolution activations at a time. The estimate errs high by a small factor,
    never low by a large one (it is what the kernel's OOM killer would otherwise decide).
    """
    pixels = height * width
    per_image = 4 * net_width * pixels * (2 * 10.5 if training else 2.0) + 4 * channels * pixels * 2
    return int(per_image * batch_size)


def available_memory(device: str) -> int:
    """Bytes this process can still allocate on ``device``: free GPU memory, or MemAvailable capped by the cgroup."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
            usage_file = limit_file.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
            if text.isdigit():
                free = int(text) - int(Path(usage_file).read_text().strip())
                avail = free if avail is None else min(avail, free)
            break
        except (OSError, ValueError):
            continue
    return avail if avail is not None else 1 << 62


def check_memory(*, what: str, shape: tuple[int, int, int], net_width: int, batch_size: int, training: bool,
                 device: str, knob: str | None) -> None:
    """Refuse, before the work, a batch that would not fit in memory (the OOM killer ends a process without a word).

    ``knob``: the batch size param to lower (named in the message with the largest value that fits).
    """
    from ..errors import UserError  # noqa: PLC0415

    c, h, w = shape
    need = memory_needed(channels=c, height=h, width=w, net_width=net_width, batch_size=batch_size, training=training)
    avail = available_memory(device)
    if need <= avail:
        return
    per = memory_needed(channels=c, height=h, width=w, net_width=net_width, batch_size=1, training=training)
    fits = max(0, int(avail // per))
    gib = 1 << 30
    size_fix = f"lower preprocess.size ({h}x{w}) or evaluator.width ({net_width})"
    if knob and fits >= 1:
        fix = f"lower {knob} to {fits} or less, or {size_fix}"
    else:
        fix = size_fix + ("" if fits >= 1 else " (not even one image fits)")
    raise UserError(f"{what}: batches of {batch_size} images of {c}x{h}x{w} need about {need / gib:.1f} GiB of memory "
                    f"on {device}, {avail / gib:.1f} GiB are available; {fix}")


def train_evaluator(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray, *,
                    epochs: int, batch_size: int, lr: float, width: int, feature_dim: int, seed: int, device: str,
                    progress: bool = True, confusion: bool = False) -> tuple[FeatureNet, dict[str, Any]]:
    """Train on uint8 NCHW images (an array, or a split's shard files); returns the network (eval mode) and its
    test report. ``confusion``: a classifier's report also holds its test predictions' counts
    [true class, predicted class] (``confusion``, a list of lists): row c is where class c's images went."""
    torch.manual_seed(seed)
    labeled = bool((labels >= 0).all()) and len(np.unique(labels)) >= 2
    num_classes = int(labels.max()) + 1 if labeled else 0
    c, h, _ = images.shape[1:]
    net = FeatureNet(channels=c, width=width, feature_dim=feature_dim, num_classes=num_classes, size=h).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if not isinstance(images, np.ndarray):  # shard files left on disk (ShardedImages)
        from ..io import host_memory_available  # noqa: PLC0415

        if images.nbytes <= host_memory_available() // 2:
            images = np.asarray(images)
    # A set larger than memory stays in its files and each batch's rows are read from them: the
    # same rows in the same order as from memory, so the same network.
    x_all = torch.from_numpy(images).to(device) if isinstance(images, np.ndarray) else None
    y_all = torch.from_numpy(labels).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shift_gen = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="evaluator", unit="step", disable=not progress, mininterval=1.0)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), device=device, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = normalize(x_all[idx] if x_all is not None else torch.from_numpy(images.gather(idx.cpu().numpy())).to(device))
            # Small random shifts make the features robust to the jitter generators produce.
            dx, dy = torch.randint(-2, 3, (2,), generator=shift_gen).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            out = net(x)
            loss = F.cross_entropy(out, y_all[idx]) if num_classes else F.mse_loss(out, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    report: dict[str, Any] = {"kind": "classifier" if num_classes else "autoencoder", "num_classes": num_classes,
                              "train_images": int(len(images)), "test_images": int(len(test_images))}
    with torch.no_grad():
        xt = torch.from_numpy(test_images)
        outs = torch.cat([net(normalize(xt[i : i + TEST_CHUNK].to(device))).cpu() for i in range(0, len(xt), TEST_CHUNK)])
    if num_classes:
        pred = outs.argmax(1).numpy()
        report["test_accuracy"] = float((pred == test_labels).mean())
        if confusion:
            counts = np.zeros((num_classes, num_classes), dtype=np.int64)
            np.add.at(counts, (np.asarray(test_labels, dtype=np.int64), pred), 1)
            report["confusion"] = counts.tolist()
    else:
        report["test_reconstruction_mse"] = float(F.mse_loss(outs, normalize(xt)).item())
        # What "reconstructing" every test image as the mean training image scores: the bar to beat.
        mean = normalize(torch.from_numpy(images)).mean(0)
        report["test_mean_image_mse"] = float((normalize(xt) - mean).pow(2).mean().item())
    warning = quality_warning(report)
    if warning:
        report["warning"] = warning
    return net, report


def quality_warning(report: dict[str, Any]) -> str | None:
    """Why the evaluator's features cannot be trusted (it has not learned), or None.

    A classifier must beat chance by a quarter of the way to perfect (10 classes: accuracy 0.325);
    an autoencoder must reconstruct the test images better than their mean training image does
    (MSE below 0.8 of that). An untrained network still gives features, and from them FID near 0,
    IS near 1 and precision/recall near 0 whatever the generator does: those numbers are noise.
    """
    if report.get("kind") == "classifier" and "test_accuracy" in report:
        k = int(report.get("num_classes") or 0)
        chance = 1 / k if k else 0.0
        bar = chance + 0.25 * (1 - chance)
        if report["test_accuracy"] < bar:
            return (f"the offline evaluator has not learned: test accuracy {report['test_accuracy']:.3f} with "
                    f"{k} classes (chance {chance:.3f}, needed {bar:.3f}); its FID/KID/IS/precision/recall are "
                    "noise, not a judgement of the generator. Train it longer (evaluator.epochs) or on more "
                    "images (data.limit)")
    if report.get("kind") == "autoencoder" and "test_mean_image_mse" in report:
        mse, base = report["test_reconstruction_mse"], report["test_mean_image_mse"]
        if mse >= 0.8 * base:
            return (f"the offline evaluator has not learned: test reconstruction MSE {mse:.4f}, no better than the "
                    f"mean training image ({base:.4f}); its FID/KID/precision/recall are noise, not a judgement "
                    "of the generator. Train it longer (evaluator.epochs) or on more images (data.limit)")
    return None


def save_evaluator(path: Path, net: FeatureNet, *, kwargs: dict[str, Any], report: dict[str, Any]) -> str:
    """Write the evaluator file atomically; returns its sha256 (the evaluator's identity)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    buf = _io.BytesIO()
    torch.save({"format": EVALUATOR_FORMAT, "kwargs": kwargs, "state_dict": state, "report": report}, buf)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())
    return sha256_file(path)


def load_evaluator(path: Path, *, device: str = "cpu") -> tuple[FeatureNet, dict[str, Any]]:
    """Load (weights_only) and return (network in eval mode, info with its sha256)."""
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != EVALUATOR_FORMAT:
        raise CheckpointError(f"{path}: not an evaluator file of this pipeline; run the evaluator stage")
    net = FeatureNet(**payload["kwargs"])
    net.load_state_dict(payload["state_dict"])
    info = dict(payload["report"], sha256=sha256_file(path), name="offline-evaluator", kwargs=payload["kwargs"])
    return net.to(device).eval(), info


@torch.no_grad()
def extract(net: FeatureNet, images: torch.Tensor | np.ndarray, *, batch_size: int = 500,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features [N, D] (float32, CPU) and class probabilities [N, K] (or None) for uint8 or [-1, 1] images
    (a tensor, an array, or a split's shard files read batch by batch)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    # Written into outputs allocated once: thousands of small kept tensors between each batch's
    # large temporaries fragment the C heap, which then grows with the number of batches.
    n = len(images)
    feats: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size]
        if isinstance(x, np.ndarray):  # shard files left on disk (ShardedImages) give rows as arrays
            x = torch.from_numpy(x)
        x = x.to(device)
        x = normalize(x) if x.dtype == torch.uint8 else x.float()
        f = net.features(x)
        if feats is None:
            feats = torch.empty(n, f.shape[1])
        feats[i : i + len(f)] = f.float().cpu()
        if net.head is not None:
            p = torch.softmax(net.head(f).float(), dim=1).cpu()
            if probs is None:
                probs = torch.empty(n, p.shape[1])
            probs[i : i + len(p)] = p
    if feats is None:
        raise ValueError("extract: no images")
    return feats, probs
