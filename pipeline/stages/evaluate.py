"""evaluate: FID/KID/IS/precision/recall/density/coverage (+ VAE ELBO, conditional scores) -> reports/metrics.json."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..imaging import normalize
from ..io import write_json
from ..params import Params
from .common import add_common, device_from, run_stage, set_determinism, set_threads

log = logging.getLogger(__name__)

SECTIONS = ["evaluate", "evaluator", "base"]


def _vae_metrics(checkpoint: Path, test_images: Any, *, device: str, batch_size: int,
                 seed: int) -> tuple[dict[str, float], str]:
    """ELBO, reconstruction NLL and KL per test image, one posterior sample each (seeded), in nats
    and in bits per dimension, and the likelihood they use (from the checkpoint's config).

    The reconstruction NLL is that of the stored 8-bit image: the discretised Gaussian and logistic
    are probabilities of the 256 levels already; a Bernoulli decoder is normalised over them
    (:func:`~pipeline.models.vae.bernoulli_log_normaliser`), so the number is a bound on the
    image's log-probability and bits/dim compare across likelihoods. Bits per dimension carry the
    usual sign: ``vae_bpd`` is the negative ELBO, lower is better. Every number has a 95% interval,
    mean ± 1.96 standard errors over test images (the per-image values are independent given the
    model, so the normal interval of their mean is the honest one).
    """
    import torch  # noqa: PLC0415

    from ..models import load_vae  # noqa: PLC0415
    from ..models.vae import bits_per_dim, vae_terms  # noqa: PLC0415

    vae, cfg = load_vae(checkpoint, device=device)
    torch.manual_seed(seed)
    nlls, kls = [], []
    x_all = torch.from_numpy(test_images)
    dims = int(x_all[0].numel())
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            x = normalize(x_all[i : i + batch_size].to(device))
            logits, mu, logvar = vae(x)
            nll, kl = vae_terms(x, logits, mu, logvar, recon=cfg["vae_likelihood"], log_scale=vae.log_scale,
                                discrete=True)
            nlls.append(nll.double().cpu())
            kls.append(kl.double().cpu())
    nll, kl = torch.cat(nlls), torch.cat(kls)  # [N] each
    out: dict[str, float] = {}
    for key, values, bpd_key in (("vae_elbo", -(nll + kl), "vae_bpd"), ("vae_recon_nll", nll, "vae_recon_bpd"),
                                 ("vae_kl", kl, "vae_kl_bpd")):
        mean = float(values.mean())
        half = 1.96 * float(values.std(correction=1)) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        out.update({key: mean, f"{key}_ci_low": mean - half, f"{key}_ci_high": mean + half})
        sign = -1.0 if key == "vae_elbo" else 1.0  # bits/dim of the negative ELBO
        lo, hi = sorted((sign * (mean - half), sign * (mean + half)))
        out.update({bpd_key: bits_per_dim(sign * mean, dims), f"{bpd_key}_ci_low": bits_per_dim(lo, dims),
                    f"{bpd_key}_ci_high": bits_per_dim(hi, dims)})
    return out, cfg["vae_likelihood"]


def conditional_metrics(generator: Any, gen_info: dict[str, Any], net: Any, test: Any, train: Any, *,
                        real_feats: Any, n_per_class: int, device: str, seed: int, batch_size: int,
                        recipe: Any) -> dict[str, Any]:
    """Intra-class FID (mean over classes), the classification accuracy score (CAS) and its real baseline,
    with their values per class.

    CAS (Ravuri & Vinyals 2019): a classifier trained only on generated images (labels as
    conditioned), tested on the real test split. It uses the offline evaluator's recipe
    (``recipe``: params.evaluator) and the same number of optimizer steps the evaluator got on the
    real training split, so a small generated set is not also an under-trained classifier.
    ``cas_real`` is that recipe trained on as many real training images: CAS reads against what
    real data of that size achieves. Per class: ``cas_per_class`` and ``cas_real_per_class`` are the
    share of each class's real test images the two classifiers got right, and ``cas_confusion``
    counts where the sample-trained one put them (rows: true class, columns: predicted), so a class
    whose samples teach the wrong boundary shows, and which class it is taken for (the same
    predictions as ``cas``).
    """
    import torch  # noqa: PLC0415

    from ..metrics.compute import sample  # noqa: PLC0415
    from ..metrics.evaluator import extract, train_evaluator  # noqa: PLC0415
    from ..metrics.math import frechet_distance, gaussian_stats  # noqa: PLC0415

    k = gen_info["num_classes"]
    labels = torch.arange(k).repeat_interleave(n_per_class)
    imgs, y = sample(generator, len(labels), nz=gen_info["nz"], num_classes=k, seed=seed + 2, device=device,
                     labels=labels, batch_size=batch_size)
    fake_feats = extract(net, imgs, device=device, batch_size=batch_size)[0]
    per_class: list[float | None] = []  # None: a class with fewer than 2 test images has no FID
    for c in range(k):
        rf, ff = real_feats[torch.from_numpy(test.labels == c)], fake_feats[y == c]
        ok = len(rf) >= 2 and len(ff) >= 2
        per_class.append(frechet_distance(gaussian_stats(rf), gaussian_stats(ff)) if ok else None)
    scored = [v for v in per_class if v is not None]
    bs = min(recipe.batch_size, len(labels))
    steps = recipe.epochs * max(1, len(train.images) // recipe.batch_size)  # the evaluator's budget
    kw = {"epochs": max(1, -(-steps // max(1, len(labels) // bs))), "batch_size": bs, "lr": recipe.lr,
          "width": recipe.width, "feature_dim": recipe.feature_dim, "seed": seed, "device": device, "progress": False,
          "confusion": True}
    _, cas_report = train_evaluator(imgs.numpy(), y.numpy(), test.images, test.labels, **kw)
    pick = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))[: len(labels)].numpy()
    _, real_report = train_evaluator(train.images[pick], train.labels[pick], test.images, test.labels, **kw)

    def recall(counts: list[list[int]]) -> list[float | None]:  # None: a class without test images
        return [counts[c][c] / sum(counts[c]) if sum(counts[c]) else None for c in range(k)]

    return {"intra_fid": sum(scored) / max(1, len(scored)), "intra_fid_per_class": per_class,
            "cas": cas_report["test_accuracy"], "cas_real": real_report["test_accuracy"],
            "cas_per_class": recall(cas_report["confusion"]), "cas_real_per_class": recall(real_report["confusion"]),
            "cas_confusion": cas_report["confusion"]}


def _check_inputs(params: Params, test: Any, train: Any, tensors_dir: Path, net: Any, evaluator_path: Path,
                  gen_info: dict[str, Any], generator_path: Path, device: str) -> None:
    """Before any work: enough real images, an evaluator and a generator made for these tensors, memory."""
    from ..data.tensors import require_images  # noqa: PLC0415
    from ..errors import UserError  # noqa: PLC0415
    from ..metrics.evaluator import check_memory  # noqa: PLC0415

    p = params.evaluate
    require_images(tensors_dir, train=train, test=test)
    k = max(p.pr_k, p.dc_k)
    if len(test.images) <= k:
        raise UserError(f"{tensors_dir}: the test split holds {len(test.images)} images; the k-NN metrics need more than "
                        f"k = {k} (evaluate.pr_k {p.pr_k}, evaluate.dc_k {p.dc_k}): lower them or add images")
    shape = tuple(int(s) for s in test.images.shape[1:])
    if (net.channels, net.size, net.size) != shape:
        raise UserError(f"{evaluator_path} was trained on images {net.channels}x{net.size}x{net.size}, {tensors_dir} "
                        f"holds {'x'.join(map(str, shape))}: train an evaluator on these tensors (python -m pipeline "
                        "evaluator --tensors ... --out ...) or pass the matching --evaluator")
    kw = gen_info.get("kwargs") or {}
    if "channels" in kw and (kw["channels"], kw.get("size"), kw.get("size")) != shape:
        raise UserError(f"{generator_path} generates images {kw['channels']}x{kw.get('size')}x{kw.get('size')}, "
                        f"{tensors_dir} holds {'x'.join(map(str, shape))}: evaluate it against the tensors it was "
                        "trained on (--tensors), or train on these")
    check_memory(what="evaluate", shape=shape, net_width=int(net.trunk[0][0].out_channels),
                 batch_size=min(p.batch_size, max(len(test.images), p.n_samples)), training=False, device=device,
                 knob="evaluate.batch_size")


def draw_seeds(seed: int, n: int) -> list[int]:
    """Latent seeds of the n generated draws: the base seed first (the report's grids), then far from it
    (the training loop's in-loop score uses seed + 1, the conditional metrics seed + 2)."""
    return [seed] + [seed + 1000 + i for i in range(1, n)]


def run(params: Params, models_dir: Path, tensors_dir: Path, evaluator_path: Path, out_path: Path,
        details_path: Path) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from ..data.tensors import load_split  # noqa: PLC0415
    from ..metrics import record  # noqa: PLC0415
    from ..metrics.compute import fid_only, memorisation, metric_set, sample  # noqa: PLC0415
    from ..metrics.evaluator import extract, load_evaluator, quality_warning  # noqa: PLC0415
    from ..metrics.math import gaussian_stats  # noqa: PLC0415
    from ..models import load_generator  # noqa: PLC0415

    p = params.evaluate
    set_determinism(params)
    set_threads(0)
    device = device_from(params)
    seed = params.base.seed
    # Inception weights are resolved and verified first: a wrong pin fails before any work.
    inception_weights = _inception_weights(params) if p.inception_weights else None
    generator, gen_info = load_generator(models_dir / "best.pt", device=device)
    net, ev = load_evaluator(evaluator_path, device=device)
    test = load_split(tensors_dir, "test")
    train = load_split(tensors_dir, "train", mmap=True)  # only features of it are kept: read batch by batch
    _check_inputs(params, test, train, tensors_dir, net, evaluator_path, gen_info, models_dir / "best.pt", device)
    warning = ev.get("warning") or quality_warning(ev)
    if warning:
        log.warning("evaluate: WARNING: %s", warning)
    seeds = draw_seeds(seed, p.seeds)
    fakes = [sample(generator, p.n_samples, nz=gen_info["nz"], num_classes=gen_info["num_classes"], seed=s,
                    batch_size=p.batch_size, device=device)[0] for s in seeds]  # S x uint8 [n, C, H, W]
    draws = [extract(net, f, device=device, batch_size=p.batch_size) for f in fakes]
    real_feats, real_probs = extract(net, test.images, device=device, batch_size=p.batch_size)
    train_feats, _ = extract(net, train.images, device=device, batch_size=p.batch_size)
    metrics, per_draw = metric_set(real_feats, real_probs, draws, kid_subsets=p.kid_subsets, pr_k=p.pr_k,
                                   dc_k=p.dc_k, n_boot=p.bootstrap, seed=seed)
    # The floor: real training images scored like a generator (same count as a generated draw).
    idx = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(seed))[: p.n_samples]
    metrics["fid_train_vs_test"] = fid_only(gaussian_stats(real_feats), train_feats[idx])
    mem = memorisation(draws[0][0], train_feats, real_feats, seed=seed)
    metrics["memorisation_ratio"] = mem["ratio"]
    vae_recon = None
    if gen_info["model"] == "vae":
        vae, vae_recon = _vae_metrics(models_dir / "checkpoint.pt", test.images, device=device,
                                      batch_size=p.batch_size, seed=seed)
        metrics.update(vae)
        if gen_info["latent_sampler"] != "prior":
            # What the ex-post density buys: the same decoder sampled from N(0, I), first seed.
            prior_g, _ = load_generator(models_dir / "best.pt", device=device, sampler="prior")
            prior = sample(prior_g, p.n_samples, nz=gen_info["nz"], num_classes=gen_info["num_classes"], seed=seed,
                           batch_size=p.batch_size, device=device)[0]
            metrics["vae_fid_prior"] = fid_only(gaussian_stats(real_feats),
                                                extract(net, prior, device=device, batch_size=p.batch_size)[0])
    details: dict[str, Any] = {"memorisation": mem, "draws": {"seeds": seeds, "offline": per_draw}}
    if gen_info["num_classes"]:
        cond = conditional_metrics(generator, gen_info, net, test, train, real_feats=real_feats,
                                   n_per_class=max(2, p.n_samples // gen_info["num_classes"]), device=device,
                                   seed=seed, batch_size=p.batch_size, recipe=params.evaluator)
        metrics.update(intra_fid=cond["intra_fid"], cas=cond["cas"], cas_real=cond["cas_real"])
        details.update({key: cond[key] for key in ("intra_fid_per_class", "cas_per_class", "cas_real_per_class",
                                                   "cas_confusion")})
    if inception_weights is not None:
        metrics["inception"], details["draws"]["inception"] = _inception(params, inception_weights, test.images, fakes,
                                                                         device=device)
    else:
        metrics["inception"] = {"computed": False, "reason": "evaluate.inception_weights is not set; Inception-v3 "
                                "FID/IS/KID need its weights file (path or URL) and their sha256 in params.yaml"}
    metrics["protocol"] = {
        "generated_samples": p.n_samples, "sample_seeds": seeds, "reference_split": "test",
        "reference_images": int(len(test.images)),
        "generator": "best in-loop checkpoint (EMA weights)" if gen_info.get("ema") else "best in-loop checkpoint",
        "generator_step": gen_info["step"], "model": gen_info["model"], "seed": seed,
        "extractor": ev["name"], "extractor_kind": ev["kind"], "extractor_sha256": ev["sha256"],
        "extractor_test_accuracy": ev.get("test_accuracy"), "resize": "none (native resolution)",
        "dtype": "uint8 -> float32 in [-1, 1]", "channels": int(test.images.shape[1]),
        "fid_ci": f"95%, bootstrap over the first draw's features ({p.bootstrap} resamples), bias-centred",
        "other_ci": f"95% Student-t prediction interval over {len(seeds)} independent draws"
                    if len(seeds) > 1 else "none (evaluate.seeds = 1)",
        "kid_subsets": p.kid_subsets, "pr_k": p.pr_k, "dc_k": p.dc_k, "device": device,
        "memorisation_reference": f"{mem['reference_size']} training vs {mem['reference_size']} test images",
    }
    if vae_recon is not None:
        metrics["protocol"]["vae_likelihood"] = vae_recon
        metrics["protocol"]["latent_sampler"] = gen_info["latent_sampler"]
    # An untrusted extractor is marked by a number in metrics.json (shown by `dvc metrics` and
    # `dvc exp show`) and by its reason beside the protocol.
    metrics["extractor_trusted"] = float(warning is None)
    metrics["protocol"]["extractor_trusted"] = warning is None
    if warning:
        metrics["extractor_warning"] = warning
    record.write(metrics, out_path)  # numbers to metrics.json, the protocol beside it (eval_protocol.json)
    write_json(details_path, details)
    log.info("evaluate: FID %.3f [%.3f, %.3f] (real-vs-real floor %.3f), KID %.4f, IS %s, precision %.3f, recall %.3f",
             metrics["fid"], metrics["fid_ci_low"], metrics["fid_ci_high"], metrics["fid_train_vs_test"], metrics["kid"],
             f"{metrics['IS']:.3f}" if "IS" in metrics else "n/a", metrics["precision"], metrics["recall"])
    if warning:
        log.warning("evaluate: WARNING: these numbers are not to be trusted: %s", warning)
    return numeric_metrics(metrics)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numeric view for MLflow: top-level numbers and ``inception.<name>`` for Inception's."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k, v in metrics.get("inception", {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"inception.{k}"] = v
    return out


def _inception_weights(params: Params) -> tuple[Path, str]:
    """The verified local Inception weights file (fetched into the cache when given as a URL) and its sha256."""
    from ..io import work_dir  # noqa: PLC0415
    from ..metrics.inception import resolve_weights  # noqa: PLC0415

    p = params.evaluate
    assert p.inception_weights is not None  # the caller checked
    path = resolve_weights(p.inception_weights, p.inception_sha256, cache_dir=work_dir("cache", "weights"),
                           timeout_s=params.data.timeout_s)
    return path, str(p.inception_sha256).strip().lower()  # resolve_weights refused anything but a sha256


def _inception(params: Params, weights: tuple[Path, str], real_images: Any, fakes: list[Any], *,
               device: str) -> tuple[dict[str, Any], Any]:
    """Inception-v3 FID/KID/IS/PR/DC on the same generated draws (real features cached by content)."""
    from ..io import work_dir  # noqa: PLC0415
    from ..metrics.compute import metric_set  # noqa: PLC0415
    from ..metrics.inception import PROTOCOL, extract_inception, load_inception, real_features_cached  # noqa: PLC0415

    p = params.evaluate
    path, sha = weights
    net = load_inception(path, sha256=sha, device=device)
    real_feats, real_probs, cache = real_features_cached(net, real_images, weights_sha256=sha,
                                                         cache_dir=work_dir("cache", "inception"),
                                                         batch_size=p.batch_size, device=device)
    draws = [extract_inception(net, f, batch_size=p.batch_size, device=device) for f in fakes]
    metrics, per_draw = metric_set(real_feats, real_probs, draws, kid_subsets=p.kid_subsets, pr_k=p.pr_k,
                                   dc_k=p.dc_k, n_boot=p.bootstrap, seed=params.base.seed)
    metrics.update(computed=True, weights_sha256=sha, real_stats_cache_key=cache["cache_key"],
                   real_stats_from_cache=cache["cached"], protocol=dict(PROTOCOL))
    return metrics, per_draw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--models", type=Path, default=Path("models"), help="trained models")
    parser.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="real tensors")
    parser.add_argument("--evaluator", type=Path, default=Path("models/evaluator.pt"),
                        help="offline evaluator")
    parser.add_argument("--out", type=Path, default=Path("reports/metrics.json"),
                        help="metrics (numbers only; the protocol goes to eval_protocol.json beside it)")
    parser.add_argument("--details", type=Path, default=Path("reports/eval_details.json"),
                        help="per-class scores, nearest pairs")


def main(args: argparse.Namespace) -> int:
    def body(params: Params, tracker: Any) -> dict[str, Any]:
        from ..metrics import record  # noqa: PLC0415
        from ..tracking import PARENT_METRICS  # noqa: PLC0415

        metrics = run(params, args.models, args.tensors, args.evaluator, args.out, args.details)
        written = record.read(args.out)
        # The protocol travels with the numbers in MLflow too (as params: protocol.extractor_sha256, ...).
        protocol = {"protocol": written["protocol"]}
        if written["inception"].get("computed"):
            protocol["protocol_inception"] = written["inception"]["protocol"]
        tracker.log_params(protocol)
        tracker.set_tags({"pipeline.extractor_sha256": written["protocol"]["extractor_sha256"]})
        tracker.log_artifact(args.out, "evaluate")
        tracker.log_artifact(record.protocol_path(args.out), "evaluate")
        # The headline numbers also go on the pipeline's parent run (MLflow's table and charts).
        tracker.log_parent(metrics={k: metrics[k] for k in PARENT_METRICS if k in metrics})
        tracker.log_artifact(args.details, "evaluate")
        return metrics

    return run_stage("evaluate", args, body, SECTIONS)
