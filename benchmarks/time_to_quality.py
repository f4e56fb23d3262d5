"""Time to quality on Fashion-MNIST: the default GPU recipe vs the classic loop, same evaluator.

Both generators are scored during training by the pipeline's offline evaluator (a classifier
trained here on the real 64x64 training split; FID on its features against the test split, 5,000
generated images, EMA weights for the engine, eval mode for both). Training seconds exclude the
scoring. Recorded: the score-vs-time curve of each, the engine's best score and when it was first
reached, whether it collapsed afterwards (final within 10% of best), and the classic loop's best
over 25 epochs (or the time budget).

    python benchmarks/time_to_quality.py [--data DIR] [--seconds 60] [--classic-epochs 25] [--compare-fp32]
                                         [--variants 'name:key=value,key=value;...'] [--recipe FILE]
                                         [--score-npz NAME=FILE] [--n-eval 5000] [--grids]

Another model's recipe is the base with ``--recipe benchmarks/recipes/fmnist-stylegan2.yaml``; a
variant's ``recipe=FILE`` takes that file's train block as its own base.
``--score-npz`` scores samples made elsewhere (uint8 [N, 1, 64, 64] or [N, 64, 64] under the key
``images``, e.g. another implementation's) with the same evaluator, first ``--n-eval`` of them.
Runs side by side (one per GPU) need a ``--name`` each: a second run started with a name that a
running one holds stops at once, rather than overwrite its results and grids. The result file is
rewritten after every score of an engine run (not the classic loop), so a run stopped by a time
limit leaves what it reached: its entry then carries ``partial``, naming what was still to come
(more training, the grid, intra-FID and CAS). ``--results DIR`` writes the file and grids elsewhere
than ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from common import (RESULTS, ROOT, claim_result_name, device_tag, fast_cuda_kernels, find_fmnist, load_fmnist, machine,
                    make_trainer, parse_overrides, resize_on_device, write_result)

from pipeline.imaging import save_grid  # noqa: E402
from pipeline.metrics.compute import sample  # noqa: E402
from pipeline.metrics.evaluator import extract, train_evaluator  # noqa: E402
from pipeline.metrics.math import frechet_distance, gaussian_stats  # noqa: E402
from pipeline.training.ema import has_running_stats  # noqa: E402

RECIPE_DEFAULT = ROOT / "benchmarks" / "recipes" / "fmnist-gpu.yaml"
RECIPE = RECIPE_DEFAULT
SEED = 0
N_EVAL = 5000
DEVICE = "cuda"


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


class Scorer:
    def __init__(self, data: dict[str, np.ndarray], train64: torch.Tensor, test64: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.net, self.report = train_evaluator(train64.cpu().numpy(), data["train_y"], test64.cpu().numpy(),
                                                data["test_y"], epochs=1 if DEVICE == "cpu" else 3, batch_size=256, lr=2e-3, width=32,
                                                feature_dim=128, seed=0, device=DEVICE, progress=False)
        self.report["train_seconds"] = time.perf_counter() - t0
        self.test_feats = extract(self.net, test64, device=DEVICE)[0]
        self.real = gaussian_stats(self.test_feats)
        self.data, self.train64, self.test64 = data, train64, test64
        half = extract(self.net, train64[:N_EVAL], device=DEVICE)[0]
        self.report["fid_train5k_vs_test"] = frechet_distance(self.real, gaussian_stats(half))

    def fid_of(self, images: torch.Tensor) -> float:
        """FID of uint8 images [N, 1, 64, 64] (the first N_EVAL), generated here or elsewhere."""
        return frechet_distance(self.real, gaussian_stats(extract(self.net, images[:N_EVAL], device=DEVICE)[0]))

    def fid(self, generator: torch.nn.Module, nz: int, num_classes: int = 0) -> float:
        imgs, _ = sample(generator, N_EVAL, nz=nz, num_classes=num_classes, seed=1, device=DEVICE, batch_size=1000)
        return self.fid_of(imgs)


def conditional_scores(generator: torch.nn.Module, nz: int, num_classes: int, scorer: Scorer) -> dict[str, Any]:
    """The evaluate stage's intra-FID (mean over classes) and CAS (a classifier trained on generated
    images, tested on the real test split) for a conditional generator, 500 images per class."""
    from types import SimpleNamespace  # noqa: PLC0415

    from pipeline.params import Evaluator  # noqa: PLC0415
    from pipeline.stages.evaluate import conditional_metrics  # noqa: PLC0415

    test = SimpleNamespace(images=scorer.test64.cpu().numpy(), labels=scorer.data["test_y"])
    train = SimpleNamespace(images=scorer.train64.cpu().numpy(), labels=scorer.data["train_y"])
    return conditional_metrics(generator, {"num_classes": num_classes, "nz": nz}, scorer.net, test, train,
                               real_feats=scorer.test_feats, n_per_class=500, device=DEVICE, seed=0, batch_size=500,
                               recipe=Evaluator())


def summary(curve: list[dict[str, float]], batch_size: int) -> dict[str, Any]:
    """A run's figures from its scores so far: best and final FID, when the best came, images/s."""
    fids = [c["fid"] for c in curve]
    best_i = int(np.argmin(fids))
    return {"curve": curve, "best_fid": fids[best_i], "best_at_seconds": curve[best_i]["train_seconds"],
            "best_at_epochs": curve[best_i]["epochs"], "final_fid": fids[-1],
            "final_within_10pct_of_best": fids[-1] <= 1.1 * fids[best_i],
            "images_per_s": curve[-1]["step"] * batch_size / curve[-1]["train_seconds"],
            "steady_images_per_s": steady_rate(curve)}


def run_engine(name: str, overrides: dict[str, Any], images: torch.Tensor, scorer: Scorer, seconds: float,
               eval_every_epochs: float, grid: Path | None = None, labels: torch.Tensor | None = None,
               on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one variant, scoring it every ``eval_every_epochs``; then its grid and, when conditional,
    its intra-FID and CAS. ``on_progress`` receives the entry as it stands after every score and after
    each later part (the grid, the intra-FID and CAS), marked ``partial`` with what is still to come,
    so a run stopped by a time limit leaves what it reached behind."""
    overrides = dict(overrides)
    base = Path(overrides.pop("recipe", RECIPE))  # a variant may name its own recipe file
    base = base if base.is_absolute() else ROOT / base
    train = {**yaml.safe_load(base.read_text())["train"], **overrides}
    if DEVICE == "cpu":  # --smoke: a few steps, nothing to compile
        train.update(compile=False, steps=min(train["steps"], 40), batch_size=min(train["batch_size"], 64))
    curve: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(train, images, Path(tmp), device=DEVICE, labels=labels if train.get("conditional") else None,
                          seed=SEED)
        cfg = tr.cfg
        head = {"name": name, "recipe": str(base.relative_to(ROOT)) if base.is_relative_to(ROOT) else str(base),
                "train": train}

        chunk = max(1, round(eval_every_epochs * len(images) / cfg.batch_size))
        bn_paired = cfg.ema_standing_stats > 0 and has_running_stats(tr.ema.shadow)
        still = ["the grid"] if grid is not None else []  # what comes after training, in order
        still += ["intra-FID and CAS"] if cfg.num_classes else []
        still += ["intra-FID and CAS with the live G's BatchNorm statistics"] if bn_paired and cfg.num_classes else []

        def progress(to_come: list[str], **extra: Any) -> None:
            if on_progress is not None and curve:
                on_progress({**extra, **head, **summary(list(curve), cfg.batch_size),
                             "partial": ", ".join(to_come) or "nothing (the result was being written)"})

        spent = 0.0
        while spent < seconds and tr.step < cfg.steps:
            _sync()
            t0 = time.perf_counter()
            for _ in range(min(chunk, cfg.steps - tr.step)):  # no host sync inside a chunk
                tr.train_step()
            _sync()
            spent += time.perf_counter() - t0
            tr.check()
            point = {"train_seconds": spent, "step": tr.step, "epochs": tr.step * cfg.batch_size / len(images),
                     "images_seen": tr.step * cfg.batch_size}
            if bn_paired:  # the same EMA weights with the live G's BatchNorm statistics, as before they were recomputed
                point["fid_copied_bn_stats"] = scorer.fid(tr.ema.shadow, cfg.nz, cfg.num_classes)
            curve.append({**point, "fid": scorer.fid(tr.ema_generator(), cfg.nz, cfg.num_classes)})
            progress((["more training"] if tr.step < cfg.steps and spent < seconds else []) + still)
            print(f"{name}: step {tr.step}, {spent:.1f} s, FID {curve[-1]['fid']:.2f}"
                  + (f" (live G's BN statistics: {point['fid_copied_bn_stats']:.2f})" if bn_paired else ""), flush=True)
        # Cheapest and most wanted first, so a time limit takes the least: the grid, the scores of the
        # EMA generator as it samples, then the same with the live G's BatchNorm statistics.
        if grid is not None:  # the final EMA generator's 64 samples (latent seed 1), to look at
            imgs, _ = sample(tr.ema_generator(), 64, nz=cfg.nz, num_classes=cfg.num_classes, seed=1, device=DEVICE,
                             batch_size=64, labels=torch.arange(64) % 8 if cfg.num_classes else None)
            grid.parent.mkdir(parents=True, exist_ok=True)
            save_grid(imgs.cpu().numpy(), grid, nrow=8)
            still.pop(0)
            progress(still)
        extra = conditional_scores(tr.ema_generator(), cfg.nz, cfg.num_classes, scorer) if cfg.num_classes else {}
        if bn_paired and cfg.num_classes:  # the conditional scores with the live G's statistics too
            still.pop(0)
            progress(still, **extra)
            copied = copy.deepcopy(tr.ema.shadow)
            with torch.no_grad():
                for b_s, b in zip(copied.buffers(), tr.objective.generator.buffers(), strict=True):
                    b_s.copy_(b)
            extra.update({f"{k}_copied_bn_stats": v for k, v in
                          conditional_scores(copied.eval(), cfg.nz, cfg.num_classes, scorer).items()
                          if k in ("intra_fid", "cas")})
    return {**extra, **head, **summary(curve, cfg.batch_size)}


def steady_rate(curve: list[dict[str, float]]) -> float | None:
    """Images/s between scores after the first (compiling and graph capture excluded): the median
    over consecutive points, or None with fewer than three points."""
    rates = [(b["images_seen"] - a["images_seen"]) / (b["train_seconds"] - a["train_seconds"])
             for a, b in zip(curve[1:], curve[2:]) if b["train_seconds"] > a["train_seconds"]]
    return float(np.median(rates)) if rates else None


def run_classic(train_x: np.ndarray, scorer: Scorer, *, epochs: int, seconds: float | None) -> dict[str, Any]:
    from classic_dcgan import ClassicDCGAN

    run = ClassicDCGAN(train_x, device=DEVICE, batch_size=64, workers=2)
    if DEVICE == "cpu":
        run.netG.float()
    curve: list[dict[str, float]] = []

    def on_epoch(epoch: int, spent: float) -> None:
        run.netG.eval()
        curve.append({"train_seconds": spent, "epochs": epoch, "fid": scorer.fid(run.netG, 100)})
        run.netG.train()
        print(f"classic epoch {epoch}: {spent:.1f} s, FID {curve[-1]['fid']:.2f}", flush=True)

    run.train(epochs=epochs, seconds=seconds, on_epoch=on_epoch)
    fids = [c["fid"] for c in curve]
    best_i = int(np.argmin(fids))
    return {"name": "classic (pytorch/examples DCGAN)", "curve": curve, "best_fid": fids[best_i],
            "best_at_epochs": curve[best_i]["epochs"], "best_at_seconds": curve[best_i]["train_seconds"],
            "final_fid": fids[-1], "final_over_best": fids[-1] / fids[best_i]}


def zoo_goals(rec: dict[str, Any], *, seconds: float = 120.0) -> dict[str, Any]:
    """A zoo recipe's goals: its best score within ``seconds`` of training (to set against twice the
    DCGAN recipe's best, measured on the same card) and no collapse (final within 10% of best)."""
    within = [c["fid"] for c in rec["curve"] if c["train_seconds"] <= seconds]
    return {f"best_fid_within_{seconds:g}s": {"measured": min(within) if within else None},
            "final_within_10pct_of_best": {"final": rec["final_fid"], "best": rec["best_fid"],
                                           "ratio": rec["final_fid"] / rec["best_fid"],
                                           "met": bool(rec["final_within_10pct_of_best"])}}


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The time-to-quality goals next to what this run measured: for the default DCGAN recipe, its
    best within 60 s and an epoch under a second (an epoch's time is the median wall-clock between
    evaluations one epoch apart, start-up and compiling excluded); for another recipe, :func:`zoo_goals`."""
    rec = next(e for e in result["engine"] if e["name"] == "recipe")
    if Path(result["recipe"]).name != RECIPE_DEFAULT.name:
        return zoo_goals(rec)
    c = rec["curve"]
    spans = [(b["train_seconds"] - a["train_seconds"]) / (b["epochs"] - a["epochs"]) for a, b in zip(c, c[1:])
             if b["epochs"] - a["epochs"] > 0.9]
    out: dict[str, Any] = {
        "best_fid_within_60s": {"measured_seconds": rec["best_at_seconds"], "goal_at_most": 60.0,
                                "met": bool(rec["best_at_seconds"] < 60.0)},
        "epoch_seconds": {"measured": float(np.median(spans)) if spans else None, "goal_at_most": 1.0,
                          "met": bool(spans) and float(np.median(spans)) < 1.0},
    }
    if "classic" in result:
        out["better_than_classic_best"] = {"recipe_best": rec["best_fid"], "classic_best": result["classic"]["best_fid"],
                                           "met": bool(rec["best_fid"] < result["classic"]["best_fid"])}
    if "bf16_vs_fp32" in result and "ratio_at_step" in result["bf16_vs_fp32"]:
        cmp = result["bf16_vs_fp32"]
        out["bf16_within_5pct_of_fp32"] = {"ratio_at_last_step": cmp["ratio_at_step"],
                                           "ratio_mean_last5": cmp["ratio_mean_last5"],
                                           "met_at_last_step": cmp["within_5pct_at_step"],
                                           "met_mean_last5": cmp["within_5pct_mean_last5"]}
    return out


def compare_runs(bf16: dict[str, Any], fp32: dict[str, Any]) -> dict[str, Any]:
    """bf16 vs fp32 scores at the same step counts: the last common step, and the mean over the last
    five common evaluations (one evaluation of a GAN is noisy)."""
    a = {c["step"]: c["fid"] for c in bf16["curve"]}
    b = {c["step"]: c["fid"] for c in fp32["curve"]}
    common = sorted(set(a) & set(b))
    if not common:
        return {"error": "no common step: the bf16 run stopped before fp32's first evaluation"}
    last = common[-1]
    tail = common[-5:]
    mean_a, mean_b = float(np.mean([a[s] for s in tail])), float(np.mean([b[s] for s in tail]))
    return {"step": last, "fid_bf16": a[last], "fid_fp32": b[last], "ratio_at_step": a[last] / b[last],
            "within_5pct_at_step": abs(a[last] / b[last] - 1) <= 0.05, "last5_steps": tail,
            "mean_last5_bf16": mean_a, "mean_last5_fp32": mean_b, "ratio_mean_last5": mean_a / mean_b,
            "within_5pct_mean_last5": abs(mean_a / mean_b - 1) <= 0.05,
            "best_bf16": min(a.values()), "best_fp32": min(b.values()),
            "images_per_s_bf16": bf16["images_per_s"], "images_per_s_fp32": fp32["images_per_s"]}


def parse_variants(text: str, *, recipe: bool = True) -> list[tuple[str, dict[str, Any]]]:
    out = [("recipe", {})] if recipe else []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        name, _, kvs = chunk.partition(":")
        out.append((name, parse_overrides(kvs)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--seconds", type=float, default=60.0, help="training budget per engine variant")
    ap.add_argument("--eval-every", type=float, default=0.5, help="epochs between scores")
    ap.add_argument("--classic-epochs", type=int, default=25)
    ap.add_argument("--classic-seconds", type=float, default=None, help="cap on the classic run's training time")
    ap.add_argument("--variants", default="", help="extra engine variants: 'name:key=value,...;...'")
    ap.add_argument("--skip-classic", action="store_true")
    ap.add_argument("--compare-fp32", action="store_true",
                    help="also train the recipe in fp32 to its last step (no time cap) and compare scores step by step")
    ap.add_argument("--skip-recipe", action="store_true", help="run only the --variants")
    ap.add_argument("--name", default="time_to_quality")
    ap.add_argument("--results", type=lambda text: Path(text).resolve(), default=RESULTS,
                    help="folder for the result JSON (<name>_<device>.json) and grids/ (default benchmarks/results)")
    ap.add_argument("--recipe", default=str(RECIPE_DEFAULT.relative_to(ROOT)), help="recipe file whose train block the variants override")
    ap.add_argument("--n-eval", type=int, default=5000, help="generated images per score")
    ap.add_argument("--score-npz", action="append", default=[], metavar="NAME=FILE",
                    help="also score samples made elsewhere (uint8 under the key 'images'); repeatable")
    ap.add_argument("--wait-npz", type=float, default=0.0, help="seconds to wait for a --score-npz file to appear")
    ap.add_argument("--grids", action="store_true",
                    help="write each variant's final 8x8 grid to <--results>/grids/NAME_VARIANT_<device>.png")
    ap.add_argument("--seed", type=int, default=0, help="base.seed of every engine run (weights, latents, batches)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script runs")
    args = ap.parse_args()
    claim_result_name(args.name, args.results)
    global DEVICE, N_EVAL, RECIPE, SEED
    SEED = args.seed
    RECIPE, N_EVAL = (ROOT / args.recipe if not Path(args.recipe).is_absolute() else Path(args.recipe)), args.n_eval
    if args.smoke:
        DEVICE, N_EVAL = "cpu", 200
    fast_cuda_kernels()
    data = load_fmnist(find_fmnist(args.data))
    if args.smoke:
        data = {k: v[:256] for k, v in data.items()}
    train64 = resize_on_device(data["train_x"], 64, DEVICE)
    test64 = resize_on_device(data["test_x"], 64, DEVICE)
    scorer = Scorer(data, train64, test64)
    result: dict[str, Any] = {"machine": machine(), "evaluator": scorer.report, "n_eval": N_EVAL, "seed": SEED,
                              "engine": []}
    print(f"evaluator: {scorer.report}", flush=True)
    result["recipe"] = str(RECIPE.resolve().relative_to(ROOT)) if RECIPE.resolve().is_relative_to(ROOT) else str(RECIPE)
    labels = torch.from_numpy(data["train_y"]).to(DEVICE)  # used by conditional variants
    last: dict[str, Any] = {}  # the entry of the run in progress, as far as it got

    def on_progress(entry: dict[str, Any]) -> None:  # the result file as it stands, this run partial
        last.clear()
        last.update(entry)
        try:
            write_result(args.name, {**result, "engine": [*result["engine"], entry]}, args.results)
        except OSError as exc:  # a full disk costs this snapshot, not the run
            print(f"warning: could not save the scores so far ({exc}); training goes on", flush=True)

    for name, over in parse_variants(args.variants, recipe=not args.skip_recipe):
        last.clear()
        try:
            grid = args.results / "grids" / f"{args.name}_{name}_{device_tag()}.png" if args.grids else None
            r = run_engine(name, over, train64, scorer, args.seconds, args.eval_every, grid,
                           labels=labels, on_progress=on_progress)
            if grid is not None:
                r["grid"] = str(grid.relative_to(ROOT)) if grid.is_relative_to(ROOT) else str(grid)
            r["zoo_goals"] = zoo_goals(r)
        except Exception as exc:  # noqa: BLE001 - keep the other variants, and this one's scores so far
            r = {**last, "name": name, "overrides": over, "error": repr(exc)}
        result["engine"].append(r)
        print({k: v for k, v in r.items() if k not in ("curve", "train")}, flush=True)
        write_result(args.name, result, args.results)
    for spec_ in args.score_npz:  # after the variants: the file may be written meanwhile by another process
        label, _, file = spec_.partition("=")
        deadline = time.monotonic() + args.wait_npz
        while not Path(file).exists() and time.monotonic() < deadline:
            time.sleep(2)
        if not Path(file).exists():
            result.setdefault("external", {})[label] = {"file": file, "error": f"not found within {args.wait_npz:g} s"}
            continue
        with np.load(file, allow_pickle=False) as z:
            imgs = torch.from_numpy(z["images"])
        imgs = (imgs[:, None] if imgs.ndim == 3 else imgs).to(DEVICE)
        if imgs.dtype != torch.uint8 or tuple(imgs.shape[1:]) != (1, 64, 64):
            raise SystemExit(f"--score-npz {file}: expected uint8 [N, 1, 64, 64], got {imgs.dtype} {tuple(imgs.shape)}")
        result.setdefault("external", {})[label] = {"file": file, "n": min(len(imgs), N_EVAL), "fid": scorer.fid_of(imgs)}
        print(f"external {label}: FID {result['external'][label]['fid']:.3f} on {min(len(imgs), N_EVAL)} images", flush=True)
        write_result(args.name, result, args.results)
    rec = next((e for e in result["engine"] if e["name"] == "recipe" and "error" not in e), None)
    if args.compare_fp32 and rec:
        fp32 = run_engine("recipe_fp32", {"precision": "fp32"}, train64, scorer, float("inf"), args.eval_every,
                          on_progress=on_progress)
        result["engine"].append(fp32)
        result["bf16_vs_fp32"] = compare_runs(rec, fp32)
        print({"bf16_vs_fp32": result["bf16_vs_fp32"]}, flush=True)
        write_result(args.name, result, args.results)
    if not args.skip_classic:
        result["classic"] = run_classic(data["train_x"], scorer, epochs=args.classic_epochs, seconds=args.classic_seconds)
        if rec:
            result["recipe_best_vs_classic_best"] = rec["best_fid"] / result["classic"]["best_fid"]
            classic_at = [c for c in result["classic"]["curve"] if c["train_seconds"] <= rec["curve"][-1]["train_seconds"]]
            if classic_at:
                result["classic_best_within_same_wallclock"] = min(c["fid"] for c in classic_at)
        print({k: v for k, v in result["classic"].items() if k != "curve"}, flush=True)
    if rec:
        result["goals"] = goals(result)
    print(f"wrote {write_result(args.name, result, args.results)}")


if __name__ == "__main__":
    main()
