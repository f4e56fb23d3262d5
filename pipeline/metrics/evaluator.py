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


def train_evaluator(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray, *,
                    epochs: int, batch_size: int, lr: float, width: int, feature_dim: int, seed: int, device: str,
                    progress: bool = True) -> tuple[FeatureNet, dict[str, Any]]:
    """Train on uint8 NCHW images (an array, or a split's shard files); returns the network (eval mode) and its
    test report."""
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
        outs = torch.cat([net(normalize(xt[i : i + 500].to(device))).cpu() for i in range(0, len(xt), 500)])
    if num_classes:
        report["test_accuracy"] = float((outs.argmax(1).numpy() == test_labels).mean())
    else:
        report["test_reconstruction_mse"] = float(F.mse_loss(outs, normalize(xt)).item())
    return net, report


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
