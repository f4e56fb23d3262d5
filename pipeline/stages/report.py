"""report: figures (grids, interpolation, nearest pairs, curves) and reports/index.html."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from ..io import check_replaceable, read_json, staged_dir, write_text
from ..params import Params
from .common import add_common, device_from, run_stage, set_threads

log = logging.getLogger(__name__)

SECTIONS = ["report", "base"]
FIGURES = ("samples", "real", "interpolation", "nearest", "reconstructions", "traversal", "samples_prior",
           "samples_gmm", "curves")
OWNS = tuple(f"{name}.png" for name in FIGURES) + tuple(  # reports/figures holds only these
    f"training_{pct:03d}pct.png" for pct in (0, 25, 50, 100))


def _at_head(path: Path) -> dict[str, Any] | None:
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
        out = subprocess.run(["git", "show", f"HEAD:{rel.as_posix()}"], capture_output=True, text=True, timeout=20)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return None


def previous_metrics(metrics_path: Path) -> dict[str, Any] | None:
    """metrics.json and its protocol file as committed at HEAD (both git-tracked: cache: false), or None."""
    from ..metrics import record  # noqa: PLC0415

    numbers = _at_head(metrics_path)
    if numbers is None:
        return None
    return record.merge(numbers, _at_head(record.protocol_path(metrics_path)) or {})


def per_class_rows(details: dict[str, Any], class_names: list[str]) -> list[dict[str, Any]]:
    """The report's per-class rows of a conditional generator (none for an unconditional one):
    name, intra-FID, CAS and real-trained accuracy on the class, how many test images the CAS
    classifier called the class per test image of it (``called``: below 1 suggests samples of the
    class narrower than its real images; above 1, that real images of other classes are called by
    this class), and (class, share of its test images) the CAS classifier most often put in another
    class, from the evaluate stage's details."""
    if "cas_confusion" not in details:
        return []
    confusion = details["cas_confusion"]
    k = len(confusion)
    names = [str(n) for n in class_names] if len(class_names) == k else [str(c) for c in range(k)]
    rows = []
    for c in range(k):
        total = sum(confusion[c])
        # The other class that got most of them (a tie: the lower class).
        j = min((o for o in range(k) if o != c), key=lambda o: (-confusion[c][o], o), default=c)
        count = confusion[c][j] if j != c else 0
        called = sum(row[c] for row in confusion)
        rows.append({"name": names[c], "intra_fid": details["intra_fid_per_class"][c], "cas": details["cas_per_class"][c],
                     "real": details["cas_real_per_class"][c], "called": called / total if total else None,
                     "taken_for": (names[j], count / total) if total and count else None})
    return rows


def run(params: Params, models_dir: Path, tensors_dir: Path, train_reports: Path, metrics_path: Path,
        details_path: Path, clean_report: Path, figures_dir: Path, html_path: Path) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from ..data.tensors import load_split  # noqa: PLC0415
    from ..imaging import make_grid, normalize, png_bytes, to_uint8  # noqa: PLC0415
    from ..metrics import record  # noqa: PLC0415
    from ..models import check_truncation, latents, load_generator  # noqa: PLC0415
    from ..report import figures as F  # noqa: PLC0415
    from ..report.html import render  # noqa: PLC0415

    r = params.report
    seed = params.base.seed
    check_replaceable(figures_dir, OWNS, option="--figures")  # before any work
    set_threads(0)
    device = device_from(params)
    metrics = record.read(metrics_path)
    details = read_json(details_path)
    cleaning = read_json(clean_report)
    generator, info = load_generator(models_dir / "best.pt", device=device)
    psi = r.truncation_psi  # the grids' and interpolations'; the nearest pairs are the metrics' samples (psi 1)
    check_truncation(generator, psi, option="report.truncation_psi:", model=info["model"])
    test = load_split(tensors_dir, "test")
    train = load_split(tensors_dir, "train")
    nz, k = info["nz"], info["num_classes"]
    figs: dict[str, Path] = {}
    with staged_dir(figures_dir, owns=OWNS, option="--figures") as tmp:
        # Fixed-seed grid: the first grid_n latents of the evaluation seed (the same images every run).
        y = (torch.arange(r.grid_n) % k) if k else None
        samples = F.generate(generator, latents(r.grid_n, nz, seed), y, device=device, psi=psi)
        # Scale 2: a grid of 8 28x28 digits is 484 px wide, so real and generated fit side by side.
        F.save_png(samples, tmp / "samples.png", nrow=r.grid_nrow, scale=2)
        # A seeded random choice: test splits are often stored class-sorted.
        idx = np.random.default_rng(seed).permutation(len(test.images))[: r.grid_n]
        F.save_png(test.images[idx], tmp / "real.png", nrow=r.grid_nrow, scale=2)
        strip = F.interpolation_strip(generator, nz=nz, num_classes=k, steps=r.interpolation_steps, rows=4, seed=seed,
                                      device=device, psi=psi)
        F.save_png(strip, tmp / "interpolation.png", nrow=r.interpolation_steps, scale=3)
        closest = details["memorisation"]["closest"][: r.neighbours]
        nearest_pairs = []
        if closest:
            # The memorisation metric used the first draw: latents of the base seed, in order.
            z_all = latents(metrics["protocol"]["generated_samples"], nz, seed)
            fake_idx = [c["sample"] for c in closest]
            yk = (torch.tensor(fake_idx) % k) if k else None
            fake = F.generate(generator, z_all[fake_idx], yk, device=device)
            real = train.images[[c["train_index"] for c in closest]]
            F.save_png(F.pairs_figure(fake, real), tmp / "nearest.png", nrow=min(8, len(closest)), scale=3)
            for i, c in enumerate(closest):
                png = png_bytes(make_grid(np.stack([fake[i], real[i]]), nrow=1), scale=3)
                nearest_pairs.append(dict(c, png=png))
        if info["model"] == "vae":
            from ..models import load_vae  # noqa: PLC0415

            vae, _ = load_vae(models_dir / "checkpoint.pt")
            x = normalize(torch.from_numpy(test.images[idx[:16]]))
            with torch.no_grad():
                mu, _ = vae.encode(x)
                rec = torch.tanh(vae.decoder.logits(mu))
            F.save_png(F.pairs_figure(test.images[idx[:16]], to_uint8(rec)), tmp / "reconstructions.png", nrow=8, scale=3)
            F.save_png(F.latent_traversal(vae, x, steps=r.interpolation_steps, rows=8), tmp / "traversal.png",
                       nrow=r.interpolation_steps, scale=3)
            if "gmm" in info["samplers"]:
                # The same latent seeds through both samplers: what the ex-post density changes.
                for mode in ("prior", "gmm"):
                    g_mode, _ = load_generator(models_dir / "best.pt", device=device, sampler=mode)
                    F.save_png(F.generate(g_mode, latents(r.grid_n, nz, seed), y, device=device),
                               tmp / f"samples_{mode}.png", nrow=r.grid_nrow, scale=2)
        F.plot_curves(train_reports / "losses.csv", train_reports / "scores.csv", tmp / "curves.png")
        F.progress_grids(train_reports / "grids", tmp)  # training_000pct.png ... for `dvc plots diff`
    for name in FIGURES:
        if (figures_dir / f"{name}.png").exists():
            figs[name] = figures_dir / f"{name}.png"
    previous = previous_metrics(metrics_path)
    prot = metrics["protocol"]
    mem = details["memorisation"]
    inception = metrics.get("inception", {})
    meta = read_json(tensors_dir / "meta.json")
    ctx = {
        "per_class": per_class_rows(details, meta.get("class_names") or []),
        "title": f"{info['model'].upper()} on {meta.get('source', '?')}",
        "subtitle": f"{len(train.images)} training / {len(test.images)} test images of {list(test.images.shape[1:])}; "
                    f"generator step {info['step']}",
        "metric_rows": F.metric_rows(metrics, previous),
        "have_previous": previous is not None,
        "inception_note": None if inception.get("computed") else f"Inception-v3 metrics were not computed: {inception.get('reason', '')}",
        "warning": metrics.get("extractor_warning"),
        "protocol": [(k2, v) for k2, v in prot.items()],
        "figures": figs,
        "truncation_note": "" if psi == 1 else f"; truncation psi {psi} (the metrics use psi 1)",
        "timeline": F.grid_timeline(train_reports / "grids"),
        "nearest_pairs": nearest_pairs,
        "memorisation": [("reference sets (equal size)", f"{mem['reference_size']} training vs "
                                                          f"{mem['reference_size']} test images"),
                         ("median distance to nearest training image", mem["nn_train_median"]),
                         ("median distance to nearest test image", mem["nn_test_median"]),
                         ("ratio (well below 1 suggests copying)", mem["ratio"]),
                         ("samples nearer to a training than to a test image", mem["fraction_closer_to_train"])],
        "cleaning": [("inputs", cleaning["total"]), ("accepted", cleaning["accepted"]),
                     ("rejected", cleaning["rejected"]), ("duplicates removed", cleaning["duplicates"]),
                     ("skipped (links, hidden, special files)", cleaning["skipped"]),
                     *[(f"rejected: {k2}", v) for k2, v in cleaning["rejected_by_reason"].items()],
                     *[(f"repaired: {k2}", v) for k2, v in cleaning["repaired"].items()]],
    }
    write_text(html_path, render(ctx))
    log.info("report: %s (%d figures)", html_path, len(figs))
    return {"figures": len(figs)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--models", type=Path, default=Path("models"), help="trained models (best.pt, checkpoint.pt)")
    parser.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="real tensors")
    parser.add_argument("--train-reports", type=Path, default=Path("reports/train"), help="training curves and grids")
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"),
                        help="metrics (its protocol is read from eval_protocol.json beside it)")
    parser.add_argument("--details", type=Path, default=Path("reports/eval_details.json"),
                        help="per-draw scores and nearest pairs")
    parser.add_argument("--clean-report", type=Path, default=Path("reports/clean_report.json"),
                        help="the clean stage's counts")
    parser.add_argument("--figures", type=Path, default=Path("reports/figures"), help="figures (PNG)")
    parser.add_argument("--out", type=Path, default=Path("reports/index.html"), help="the HTML report")


def main(args: argparse.Namespace) -> int:
    def body(params: Params, tracker: Any) -> dict[str, Any]:
        out = run(params, args.models, args.tensors, args.train_reports, args.metrics, args.details,
                  args.clean_report, args.figures, args.out)
        tracker.log_artifact(args.figures, "report/figures")
        tracker.log_artifact(args.out, "report")
        return out

    return run_stage("report", args, body, SECTIONS)
