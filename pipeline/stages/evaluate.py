"""evaluate: FID/KID/IS/precision/recall/density/coverage (+ VAE ELBO, conditional scores) -> reports/metrics.json."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..io import write_json
from ..params import Params
from .common import add_common, device_from, run_stage, set_determinism, set_threads

log = logging.getLogger(__name__)

SECTIONS = ["evaluate", "base"]


def _vae_metrics(checkpoint: Path, test_images: Any, *, device: str, batch_size: int, seed: int) -> dict[str, float]:
    """ELBO, reconstruction NLL and KL per test image (nats), one posterior sample each (seeded)."""
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ..models import build_vae  # noqa: PLC0415
    from ..safeload import safe_load  # noqa: PLC0415
    from ..models.vae import vae_terms  # noqa: PLC0415

    ckpt = safe_load(checkpoint)
    cfg = json.loads(ckpt["config"])
    c, h, _ = cfg["image_shape"]
    vae = build_vae(nz=cfg["nz"], ngf=cfg["ngf"], ndf=cfg["ndf"], channels=c, size=h, num_classes=cfg["num_classes"])
    vae.load_state_dict(ckpt["models"]["vae"])
    vae.to(device).eval()
    torch.manual_seed(seed)
    nll_sum = kl_sum = 0.0
    x_all = torch.from_numpy(test_images)
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            x = x_all[i : i + batch_size].to(device).float() / 127.5 - 1
            logits, mu, logvar = vae(x)
            nll, kl = vae_terms(x, logits, mu, logvar, recon=cfg["recon"])
            nll_sum += float(nll.sum())
            kl_sum += float(kl.sum())
    n = len(x_all)
    return {"vae_recon_nll": nll_sum / n, "vae_kl": kl_sum / n, "vae_elbo": -(nll_sum + kl_sum) / n,
            "vae_recon": cfg["recon"]}


def _conditional_metrics(generator: Any, gen_info: dict[str, Any], net: Any, test: Any, *, n_per_class: int,
                         device: str, seed: int, batch_size: int) -> dict[str, Any]:
    """Intra-class FID (mean over classes) and the classification accuracy score (CAS)."""
    import torch  # noqa: PLC0415

    from ..metrics.compute import sample  # noqa: PLC0415
    from ..metrics.evaluator import extract, train_evaluator  # noqa: PLC0415
    from ..metrics.math import frechet_distance, gaussian_stats  # noqa: PLC0415

    k = gen_info["num_classes"]
    labels = torch.arange(k).repeat_interleave(n_per_class)
    imgs, y = sample(generator, len(labels), nz=gen_info["nz"], num_classes=k, seed=seed + 2, device=device,
                     labels=labels, batch_size=batch_size)
    fake_feats = extract(net, imgs, device=device)[0]
    real_feats = extract(net, test.images, device=device)[0]
    per_class = []
    for c in range(k):
        rf, ff = real_feats[torch.from_numpy(test.labels == c)], fake_feats[y == c]
        if len(rf) >= 2 and len(ff) >= 2:
            per_class.append(frechet_distance(gaussian_stats(rf), gaussian_stats(ff)))
    # CAS: a classifier trained only on generated images, tested on the real test split.
    _, cas_report = train_evaluator(imgs.numpy(), y.numpy(), test.images, test.labels, epochs=3, batch_size=128,
                                    lr=2e-3, width=16, feature_dim=64, seed=seed, device=device, progress=False)
    return {"intra_fid": sum(per_class) / max(1, len(per_class)), "intra_fid_per_class": per_class,
            "cas": cas_report["test_accuracy"]}


def run(params: Params, models_dir: Path, tensors_dir: Path, evaluator_path: Path, out_path: Path,
        details_path: Path) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from ..data.tensors import load_split  # noqa: PLC0415
    from ..metrics.compute import memorisation, metric_set, sample  # noqa: PLC0415
    from ..metrics.evaluator import extract, load_evaluator  # noqa: PLC0415
    from ..models import load_generator  # noqa: PLC0415

    p = params.evaluate
    set_determinism(params)
    set_threads(0)
    device = device_from(params)
    seed = params.base.seed
    generator, gen_info = load_generator(models_dir / "best.pt", device=device)
    net, ev = load_evaluator(evaluator_path, device=device)
    test = load_split(tensors_dir, "test")
    train = load_split(tensors_dir, "train")
    fake, _ = sample(generator, p.n_samples, nz=gen_info["nz"], num_classes=gen_info["num_classes"], seed=seed,
                     batch_size=p.batch_size, device=device)
    fake_feats, fake_probs = extract(net, fake, device=device, batch_size=p.batch_size)
    real_feats, real_probs = extract(net, test.images, device=device, batch_size=p.batch_size)
    train_feats, _ = extract(net, train.images, device=device, batch_size=p.batch_size)
    metrics = metric_set(real_feats, real_probs, fake_feats, fake_probs, kid_subsets=p.kid_subsets, pr_k=p.pr_k,
                         dc_k=p.dc_k, n_boot=p.bootstrap, seed=seed)
    # The floor: real training images scored like a generator (same count as the generated set).
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_feats), generator=g)[: min(p.n_samples, len(train_feats))]
    floor = metric_set(real_feats, real_probs, train_feats[idx], None, kid_subsets=p.kid_subsets, pr_k=p.pr_k,
                       dc_k=p.dc_k, n_boot=2, seed=seed)
    metrics["fid_train_vs_test"] = floor["fid"]
    mem = memorisation(fake_feats, train_feats, real_feats)
    metrics["memorisation_ratio"] = mem["ratio"]
    if gen_info["model"] == "vae":
        metrics.update(_vae_metrics(models_dir / "checkpoint.pt", test.images, device=device,
                                    batch_size=p.batch_size, seed=seed))
    details: dict[str, Any] = {"memorisation": mem}
    if gen_info["num_classes"]:
        cond = _conditional_metrics(generator, gen_info, net, test, n_per_class=max(2, p.n_samples // gen_info["num_classes"]),
                                    device=device, seed=seed, batch_size=p.batch_size)
        metrics.update(intra_fid=cond["intra_fid"], cas=cond["cas"])
        details["intra_fid_per_class"] = cond["intra_fid_per_class"]
    if p.inception_weights:
        from ..metrics.inception import inception_metrics  # noqa: PLC0415

        metrics["inception"] = inception_metrics(p, generator, gen_info, test.images, fake, seed=seed, device=device)
    else:
        metrics["inception"] = {"computed": False, "reason": "evaluate.inception_weights is not set; Inception-v3 "
                                "FID/IS/KID need its weights file (path or URL) and their sha256 in params.yaml"}
    metrics["protocol"] = {
        "generated_samples": p.n_samples, "reference_split": "test", "reference_images": int(len(test.images)),
        "generator": "best in-loop checkpoint (EMA weights)" if gen_info.get("ema") else "best in-loop checkpoint",
        "generator_step": gen_info["step"], "model": gen_info["model"], "seed": seed,
        "extractor": ev["name"], "extractor_kind": ev["kind"], "extractor_sha256": ev["sha256"],
        "extractor_test_accuracy": ev.get("test_accuracy"), "resize": "none (native resolution)",
        "dtype": "uint8 -> float32 in [-1, 1]", "channels": int(test.images.shape[1]),
        "fid_ci": f"bootstrap over generated features, {p.bootstrap} resamples, 95%",
        "kid_subsets": p.kid_subsets, "pr_k": p.pr_k, "dc_k": p.dc_k, "device": device,
    }
    write_json(out_path, metrics)
    write_json(details_path, details)
    log.info("evaluate: FID %.3f [%.3f, %.3f] (real-vs-real floor %.3f), KID %.4f, IS %s, precision %.3f, recall %.3f",
             metrics["fid"], metrics["fid_ci_low"], metrics["fid_ci_high"], metrics["fid_train_vs_test"], metrics["kid"],
             f"{metrics['IS']:.3f}" if "IS" in metrics else "n/a", metrics["precision"], metrics["recall"])
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--models", type=Path, default=Path("models"), help="trained models")
    parser.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="real tensors")
    parser.add_argument("--evaluator", type=Path, default=Path("models/evaluator.pt"),
                        help="offline evaluator")
    parser.add_argument("--out", type=Path, default=Path("reports/metrics.json"), help=None)
    parser.add_argument("--details", type=Path, default=Path("reports/eval_details.json"),
                        help="per-class scores, nearest pairs")


def main(args: argparse.Namespace) -> int:
    def body(params: Params, tracker: Any) -> dict[str, Any]:
        metrics = run(params, args.models, args.tensors, args.evaluator, args.out, args.details)
        tracker.log_artifact(args.out, "evaluate")
        return metrics

    return run_stage("evaluate", args, body, SECTIONS)
