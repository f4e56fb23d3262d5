"""Figures quoted in the README are the ones in the files the code wrote; README links resolve."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers_project import ROOT

README = (ROOT / "README.md").read_text()


def _load(rel: str) -> Any:
    return json.loads((ROOT / rel).read_text())


def _committed(rel: str) -> Any:
    """A JSON file as committed at HEAD: the README quotes the committed outputs, and a user's own
    `dvc repro` (other params, or a CPU whose math libraries give other bits) rewrites the workspace
    copy. Outside a git checkout, the workspace copy."""
    try:
        out = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:  # no git
        return _load(rel)
    return json.loads(out.stdout) if out.returncode == 0 else _load(rel)


def cpu_default_figures(m: dict[str, float]) -> str:
    """The sentence of the README's Evaluation section, as reports/metrics.json dictates it."""
    def ci(key: str, fmt: str) -> str:
        return f"{m[key]:{fmt}} [{m[key + '_ci_low']:{fmt}}, {m[key + '_ci_high']:{fmt}}]"

    return (f"FID {ci('fid', '.2f')}, KID {ci('kid', '.3f')}, IS {ci('IS', '.2f')} (real {m['IS_real']:.2f}), "
            f"precision {ci('precision', '.3f')}, recall {ci('recall', '.3f')}, density {ci('density', '.3f')}, "
            f"coverage {ci('coverage', '.3f')}, floor (real train vs test) {m['fid_train_vs_test']:.3f}, "
            f"memorisation ratio {m['memorisation_ratio']:.2f}")


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_cpu_default_metrics_in_the_readme_are_those_of_reports_metrics_json() -> None:
    expected = cpu_default_figures(_committed("reports/metrics.json"))
    assert expected in _flat(README), f"README should quote: {expected}"


def metrics_check_block(report: dict[str, Any]) -> str:
    """The abridged `python -m pipeline metrics-check` output the README shows, from its --json report."""
    checks = {c["name"]: c for c in report["checks"]}

    def g(v: float) -> str:
        return f"{v:.3g}"

    noise = checks["noise"]["values"]
    blur = checks["blur"]["values"]
    mode = checks["mode_dropping"]["values"]
    halves = checks["halves"]["values"]
    worst = max(c["relative_difference"] for c in checks["fid_math"]["values"])
    lines = [
        ("halves", f"fid {g(halves['fid'])} ({halves['relative_to_total_variance']:.2g} of total variance)"),
        ("noise", ", ".join(g(noise[f"std={s}"]) for s in ("0.02", "0.05", "0.1", "0.2", "0.4"))),
        ("blur", ", ".join(g(blur[f"sigma={s}px"]) for s in ("0.5", "0.75", "1", "1.5", "2"))),
        ("mode_dropping", "keep 10: " + ", ".join(f"{k}: " * (k != 10) + g(mode[f"classes_kept={k}"])
                                                 for k in (10, 8, 6, 4, 2))
         + f"  ({mode['images_per_level']} images per level)"),
        ("fid_math", f"worst relative difference {worst:.1e}"),
        ("is_sharp_balanced", f"IS = {checks['is_sharp_balanced']['values']['IS']:.0f}"),
    ]
    out = [f"    {'PASS' if checks[n]['passed'] else 'FAIL'}  {n:<17}  {text}".rstrip() for n, text in lines]
    out.append("    ALL CHECKS PASSED" if report["passed"] else "    SOME CHECKS FAILED")
    return "\n".join(out)


CPU_DEFAULT_VARIANTS = [  # (dvc exp name, the README's label)
    ("base", "no R1, 3,000 steps (the default before)"),
    ("r1g1", "R1 gamma 1, 3,000 steps"),
    ("r1g1s2800", "**R1 gamma 1, 2,800 steps (the default now)**"),
    ("r1g1e32", "R1 gamma 1 every 32 D steps, 3,000 steps"),
    ("r1g05", "R1 gamma 0.5, 3,000 steps"),
    ("r1g2", "R1 gamma 2, 3,000 steps"),
    ("r1decay", "R1 gamma 1, rates falling over the second half, 3,000 steps"),
    ("decay", "no R1, rates falling over the second half, 3,000 steps"),
    ("lrd4", "no R1, D at 4e-4 (twice G's rate), 3,000 steps"),
    ("diffaugT", "no R1, `diffaug: [translation]`, 3,000 steps"),
]


def cpu_default_variant_rows() -> list[str]:
    """The README's table of the experiments that chose the default, from the dvc exp show export."""
    import csv  # noqa: PLC0415

    path = ROOT / "benchmarks/results/raw/cpu_default_variants_dvc_exp_2core_amd_epyc.csv"
    runs = {r["experiment"]: r for r in csv.DictReader(path.open())}
    assert set(runs) == {name for name, _ in CPU_DEFAULT_VARIANTS}
    rows = []
    for name, label in CPU_DEFAULT_VARIANTS:
        r = {k: (float(v) if k in ("train_seconds", "fid", "fid_ci_low", "fid_ci_high", "kid", "precision", "recall")
                 else v) for k, v in runs[name].items()}
        rows.append(f"| {label} | {r['train_seconds']:.0f} | {r['fid']:.2f} [{r['fid_ci_low']:.2f}, "
                    f"{r['fid_ci_high']:.2f}] | {r['kid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return rows


def test_the_experiments_that_chose_the_default_match_their_export() -> None:
    _assert_rows_in_readme(cpu_default_variant_rows())
    from pipeline.models import RECIPES  # noqa: PLC0415

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    assert RECIPES["dcgan"]["r1_gamma"] == 1.0 and params["steps"] == 2800 and params["r1_gamma"] is None
    assert params["r1_every"] == 16


def test_metrics_check_output_in_the_readme_is_that_of_reports_metrics_check_json() -> None:
    report = _load("reports/metrics_check.json")
    block = metrics_check_block(report)
    assert block in README, f"README should show:\n{block}"
    sha = re.search(r"offline evaluator ([0-9a-f]{8})", report["data"]["extractor"]).group(1)
    assert f"sha256 {sha}…" in _flat(README)


FAMILY_LABELS = {"dcgan": "dcgan", "sngan": "sngan (ResNet, spectral norm, hinge)",
                 "wgan_gp": "wgan_gp (5 critic steps, gradient penalty)", "conditional_dcgan": "conditional dcgan",
                 "vae": "vae", "dcgan_diffaug": "dcgan + DiffAugment"}


def throughput_rows(results: dict[str, Any]) -> list[str]:
    """The README's per-family throughput table, as benchmarks/results/train_throughput_*.json dictates it."""
    rows = []
    for fam, label in FAMILY_LABELS.items():
        cells = [label]
        for b in ("batch_64", "batch_512"):
            m = results[b][fam]
            fast = m["fastest"]
            mfu = f" ({fast['mfu_vs_bf16_peak'] * 100:.0f}% MFU)" if fam == "dcgan" and b == "batch_512" else ""
            cells += [f"{round(m['eager_fp32']['images_per_s']):,}", f"{round(fast['images_per_s']):,}{mfu}",
                      f"{fast['x_eager_fp32']:.1f}x"]
        rows.append("| " + " | ".join(cells) + " |")
    c = [f"{round(results[b]['classic']['images_per_s']):,}" for b in ("batch_64", "batch_512")]
    rows.append(f"| classic loop (pytorch/examples: CPU DataLoader + PIL, fp32, Sigmoid+BCELoss) | {c[0]} | | | {c[1]} | | |")
    return rows


def _assert_rows_in_readme(rows: list[str]) -> None:
    missing = [row for row in rows if row not in README]
    assert rows and not missing, "README should hold the rows:\n" + "\n".join(missing)


def test_gpu_throughput_table_matches_benchmarks_results() -> None:
    results = _load("benchmarks/results/train_throughput_h100-80gb-hbm3.json")["results"]
    _assert_rows_in_readme(throughput_rows(results))


# The model zoo's time-to-quality table: (label, result file stem, variant name) per row.
ZOO_ROWS = [
    ("`fmnist-gpu.yaml` (DCGAN, 40 epochs)", "zoo_2min_a", "recipe"),
    ("`fmnist-conditional.yaml` (40 epochs", "zoo_2min_b", "conditional"),
    ("`fmnist-wgan-gp.yaml` (2 critic steps, batch 256)", "zoo_2min_c", "wgan_gp"),
    ("`fmnist-sngan.yaml` (the paper's Adam, plus lazy R1 and EMA; D uncompiled)", "zoo_2min_c", "sngan_paper_ema_r1"),
    ("`fmnist-sngan.yaml` (D compiled too)", "sngan_2min_compiled_d", "recipe"),
    ("`fmnist-biggan.yaml` (2-minute budget, uncompiled", "zoo_2min_b", "biggan"),
    ("`fmnist-biggan.yaml` (4-minute budget, uncompiled", "biggan_4min", "recipe"),
    ("`fmnist-biggan.yaml` (4-minute budget, compiled", "biggan_4min_compiled", "compiled"),
    ("`fmnist-sngan.yaml` (standing statistics)", "sngan_2min_standing", "recipe"),
    ("`fmnist-biggan.yaml` (4-minute budget, compiled, standing statistics", "biggan_4min_standing", "standing"),
    ("`fmnist-biggan.yaml` (EMA 0.9995, standing statistics, 40 epochs", "biggan_7min_ema9995", "ema9995"),
    ("`fmnist-stylegan2.yaml` (cold compile cache)", "ttq_stylegan2_ema_ramp10", "ema_ramp10"),
    ("`fmnist-stylegan2.yaml` again (warm compile cache)", "ttq_stylegan2_ema_ramp10_warm_cache", "ema_ramp10"),
    ("`fmnist-stylegan2.yaml` uncompiled (`compile: false`, CUDA graphs only)", "ab_sg2_eager_graphs", "eager_graphs"),
    ("`fmnist-biggan.yaml` at 3,500 steps (R1 gamma 4, standing statistics, warm compile cache, 3 other runs on the host",
     "ag_biggan_g4_s0", "g4"),
    ("`fmnist-biggan.yaml` now (4,688 steps, warm compile cache, 3 other runs on the host, first scored at step 2,344",
     "ak_biggan_g4long_s0", "g4long"),
    ("`fmnist-biggan.yaml` now, stopped after 2 minutes (warm compile cache, 3 other runs on the host, scored every 586 steps",
     "aq_biggan_2min_s0", "recipe"),
]


def _within_2_minutes(run: dict[str, Any]) -> str:
    """The best score reached within 120 s of training, or a dash when the first came later."""
    early = [c["fid"] for c in run["curve"] if c["train_seconds"] <= 120]
    return f"{min(early):.2f}" if early else "—"


def zoo_rows() -> list[str]:
    """The README's zoo table rows, as benchmarks/results/<stem>_h100-80gb-hbm3.json dictate them
    (a conditional run's label ends with its intra-FID and CAS)."""
    rows = []
    for label, stem, name in ZOO_ROWS:
        file = f"{stem}_h100-80gb-hbm3.json"
        run = next(e for e in _load(f"benchmarks/results/{file}")["engine"] if e["name"] == name)
        if "intra_fid" in run:
            label += f"; intra-FID {run['intra_fid']:.2f}, CAS {run['cas']:.3f}, real {run['cas_real']:.3f})"
        rows.append(f"| {label} | {round(run['images_per_s']):,} | {_within_2_minutes(run)} | "
                    f"{run['best_fid']:.2f} | {round(run['best_at_seconds'])} s | {run['final_fid']:.2f} | `{file}` |")
    return rows


def test_gpu_zoo_table_matches_benchmarks_results() -> None:
    _assert_rows_in_readme(zoo_rows())


# The seed and variant tables' runs are listed in benchmarks/seed_runs.py, which also draws their curves.
_spec = importlib.util.spec_from_file_location("seed_runs", ROOT / "benchmarks" / "seed_runs.py")
seed_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed_runs)  # type: ignore[union-attr]
SEED_ROWS, VARIANT_ROWS, _log_curve, _seed_run, _seed_table = (
    seed_runs.SEED_ROWS, seed_runs.VARIANT_ROWS, seed_runs.log_curve, seed_runs.seed_run, seed_runs.seed_table)


def seed_rows() -> list[str]:
    rows = []
    for label, seed, stem, name in SEED_ROWS:
        run = _seed_run(stem, name)
        ok = "yes" if seed_runs.ends_near_best(run) else "**no**"
        cond = f"{run['intra_fid']:.2f} | {run['cas']:.3f}" if "intra_fid" in run else " | "
        file = f"{stem}_h100-80gb-hbm3." + ("txt" if stem.startswith("raw/") else "json")
        rows.append(f"| {label} | {seed} | {_within_2_minutes(run)} | {run['best_fid']:.2f} | {round(run['best_at_seconds'])} s | "
                    f"{run['final_fid']:.2f} | {ok} | {cond} | `{file}` |")
    return rows


def standing_tally() -> tuple[int, int, int, int]:
    """Over every H100 run scored both ways (the EMA generator with recomputed and with copied
    BatchNorm statistics): (points where recomputed scored lower, points, runs whose final score
    is lower recomputed, runs)."""
    runs = []
    for f in sorted((ROOT / "benchmarks/results").glob("*_h100-80gb-hbm3.json")):
        d = json.loads(f.read_text())
        engine = d.get("engine", []) if isinstance(d, dict) else []
        runs += [e["curve"] for e in engine if e.get("curve") and "fid_copied_bn_stats" in e["curve"][0]]
    for f in sorted((ROOT / "benchmarks/results/raw").glob("*_log_h100-80gb-hbm3.txt")):
        runs += [curve] if (curve := _log_curve(f)) else []
    points = [c for run in runs for c in run]
    return (sum(c["fid"] < c["fid_copied_bn_stats"] for c in points), len(points),
            sum(run[-1]["fid"] < run[-1]["fid_copied_bn_stats"] for run in runs), len(runs))


def test_gpu_seed_table_and_standing_statistics_tally_match_benchmarks_results() -> None:
    _assert_rows_in_readme(seed_rows())
    big, dc = ([_seed_run(stem, name) for _, stem, name in _seed_table(recipe)]
               for recipe in ("fmnist-biggan.yaml", "fmnist-conditional.yaml"))
    for how, f in (("Means", statistics.mean), ("Medians", statistics.median)):
        assert (f"**{how}:** intra-FID {f(r['intra_fid'] for r in big):.2f} against "
                f"{f(r['intra_fid'] for r in dc):.2f}, CAS {f(r['cas'] for r in big):.3f} against "
                f"{f(r['cas'] for r in dc):.3f}") in README
    lower, points, final_lower, runs = standing_tally()
    assert (f"lower at {lower} of {points} scoring points, and the final score lower in {final_lower} of "
            f"{runs} runs") in _flat(README)


def variant_rows() -> list[str]:
    """The README's table of recipe variants over seeds: final FID per seed (the best in brackets
    where it was lower at two decimals), how many runs ended within 10% of their best, the mean final FID, and the
    mean intra-FID and CAS where every run has them."""
    rows = []
    for label, runs in VARIANT_ROWS:
        got = [_seed_run(stem, name) for _, stem, name in runs]
        shown = [(f"{r['final_fid']:.2f}", f"{r['best_fid']:.2f}") for r in got]
        finals = " / ".join(final + (f" ({best})" if best != final else "") for final, best in shown)
        within = sum(map(seed_runs.ends_near_best, got))
        cond = (f"{statistics.mean(r['intra_fid'] for r in got):.2f} | {statistics.mean(r['cas'] for r in got):.3f}"
                if all("intra_fid" in r for r in got) else " | ")
        seeds = ", ".join(str(seed) for seed, _, _ in runs)
        rows.append(f"| {label} | {seeds} | {finals} | {within} of {len(got)} | "
                    f"{statistics.mean(r['final_fid'] for r in got):.2f} | {cond} |")
    return rows


def test_biggan_against_the_conditional_dcgan_matches_benchmarks_results() -> None:
    """The recipes now, as the README compares them: means, ranges and Welch's t-test on CAS."""
    from scipy import stats

    big, dc = ([_seed_run(stem, name) for _, stem, name in seed_runs.variant(start)[1]]
               for start in ("BigGAN, non-saturating loss, R1 gamma 4, falling rates, 4,688 steps",
                             "conditional DCGAN, R1 gamma 1, constant rates"))
    reruns = [_seed_run(stem, name) for _, stem, name in seed_runs.variant("conditional DCGAN, the recipe now")[1]]
    bi, di = ([r["intra_fid"] for r in g] for g in (big, dc))
    bc, dcas = ([r["cas"] for r in g] for g in (big, dc))
    text = _flat(README)
    assert (f"BigGAN's eight seeds (`ak_biggan_g4long_s*`, `am_biggan_g4long_s*`) against the conditional DCGAN's "
            f"six. Mean intra-FID {statistics.mean(bi):.2f} against {statistics.mean(di):.2f}: BigGAN's is lower in "
            f"every run ({min(bi):.2f} to {max(bi):.2f} against {min(di):.2f} to {max(di):.2f}). Mean CAS "
            f"{statistics.mean(bc):.3f} against {statistics.mean(dcas):.3f}: BigGAN's runs lie between {min(bc):.3f} "
            f"and {max(bc):.3f}, the conditional DCGAN's between {min(dcas):.3f} and {max(dcas):.3f}") in text
    assert max(bi) < min(di) and len(big) == 8 and len(dc) == 6
    ranked = sorted(dcas)
    assert min(bc) > ranked[3] and sum(c > ranked[4] for c in bc) == 6 and min(bc) < ranked[4]
    welch = stats.ttest_ind(bc, dcas, equal_var=False).pvalue
    mw = stats.mannwhitneyu(bc, dcas, alternative="two-sided").pvalue
    assert [seed for seed, _, _ in seed_runs.variant("conditional DCGAN, the recipe now")[1]] == [3, 4]
    averaged = [*dcas[:3], (dcas[3] + reruns[0]["cas"]) / 2, (dcas[4] + reruns[1]["cas"]) / 2, dcas[5]]
    by_seed = stats.ttest_ind(bc, averaged, equal_var=False).pvalue
    assert (f"Welch's t-test gives p = {welch:.3f} (Mann-Whitney {mw:.3f}); with the conditional DCGAN's reruns "
            f"of seeds 3 and 4 (CAS {reruns[0]['cas']:.3f} and {reruns[1]['cas']:.3f}) averaged into their seeds, "
            f"p = {by_seed:.3f}. So BigGAN conditions better by intra-FID in every run, and by CAS at "
            f"p = {welch:.3f}") in text


def test_the_seed_curves_figure_draws_each_panels_runs(tmp_path: Path) -> None:
    from PIL import Image

    for _, *rows in seed_runs.PANELS:  # every panel names two rows, each of runs with scores
        for start, _ in rows:
            _, runs = seed_runs.variant(start)
            assert runs and all(len(_seed_run(stem, name)["curve"]) >= 2 for _, stem, name in runs)
    out = seed_runs.plot(tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1210, 1034)
        blue = sum(n for n, (r, g, b) in im.convert("RGB").getcolors(1 << 20) if b > r + 60 and b > g + 20)
        assert blue > 2000  # the blue curves of the recipes now are drawn
    with pytest.raises(ValueError, match="5 variant rows start with 'BigGAN, hinge'"):
        seed_runs.variant("BigGAN, hinge")  # a panel must name one row
    with pytest.raises(ValueError, match="has no variant 'nope'"):
        seed_runs.seed_run("x_dcgan_s0", "nope")
    assert (ROOT / "benchmarks/results/recipe_variants_h100-80gb-hbm3.png").is_file()


def test_a_seed_run_stopped_by_a_time_limit_counts_with_its_scores_and_a_failed_one_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """time_to_quality.py leaves a stopped run's entry marked partial, and a failed one marked error,
    both with the scores they reached: the tables take the first as it stands and refuse the second."""
    curve = [{"train_seconds": 10.0, "fid": 3.0}, {"train_seconds": 20.0, "fid": 2.0}]
    stopped = {"name": "v", "curve": curve, "best_fid": 2.0, "final_fid": 2.0, "best_at_seconds": 20.0,
               "partial": "the grid, intra-FID and CAS"}
    for stem, entry in (("stopped", stopped), ("failed", {**stopped, "error": "RuntimeError('boom')"})):
        (tmp_path / f"{stem}_h100-80gb-hbm3.json").write_text(json.dumps({"engine": [entry]}))
    monkeypatch.setattr(seed_runs, "RESULTS", tmp_path)
    run = seed_runs.seed_run("stopped", "v")
    assert run["final_fid"] == 2.0 and seed_runs.ends_near_best(run)
    with pytest.raises(ValueError, match=r"failed_h100-80gb-hbm3.json: variant 'v' failed \(RuntimeError\('boom'\)\)"):
        seed_runs.seed_run("failed", "v")
    assert "benchmarks/results/recipe_variants_h100-80gb-hbm3.png" in README


def test_gpu_recipe_variant_table_matches_benchmarks_results() -> None:
    _assert_rows_in_readme(variant_rows())
    (first, n_first), (now, n_now) = seed_runs.within_10pct(seed_runs.FIRST_RECIPES), seed_runs.within_10pct(
        seed_runs.RECIPES_NOW)
    (r1, n_r1), (r01, n_r01) = seed_runs.within_10pct(seed_runs.R1_GAMMA_1), seed_runs.within_10pct(
        seed_runs.R1_GAMMA_01)
    assert (f"Of the DCGAN, conditional DCGAN and SNGAN recipes, {first} of {n_first} runs of the first "
            f"recipes ended within 10% of their best, and {now} of {n_now} runs of the recipes now. Over every "
            f"variant of these three with R1 at gamma 1, {r1} of {n_r1} did; with R1 at 0.1, {r01} of "
            f"{n_r01}") in _flat(README)
    big, n_big = seed_runs.within_10pct(seed_runs.BIGGAN_R1)
    assert f"BigGAN's runs with R1 at gamma 1 or more, under either loss: {big} of {n_big}" in _flat(README)
    with pytest.raises(ValueError, match="no variant row starts with 'nope'"):
        seed_runs.within_10pct(["nope"])


def test_gpu_ddp_figures_match_benchmarks_results() -> None:
    d = _load("benchmarks/results/ddp_scaling_h100-80gb-hbm3.json")
    weak, strong, q = d["weak"], d["strong"], d["quality_same_images_seen"]
    text = _flat(README)
    assert (f"256 images per GPU run at {round(weak['2']['images_per_s']):,} images/s against "
            f"{round(weak['1']['images_per_s']):,} on one GPU, a weak-scaling efficiency of "
            f"{weak['2']['efficiency']:.2f}") in text
    assert f"runs {strong['2']['speedup']:.2f}x faster than on one" in text
    assert (f"evaluator FID ({q['2gpu_seed0']['fid']:.1f}) lies between two one-GPU runs of different seeds "
            f"({q['1gpu_seed0']['fid']:.1f} and {q['1gpu_seed1']['fid']:.1f})") in text
    assert f"ran at {round(d['two_gpu_stage_run']['global_images_per_s_median']):,} images/s" in text


def test_gpu_time_to_quality_matches_benchmarks_results() -> None:
    ttq = _load("benchmarks/results/time_to_quality_h200.json")
    best = ttq["engine"][0]
    row = next(ln for ln in README.splitlines() if ln.startswith("| GPU recipe, 40 epochs"))
    assert f"**{best['best_fid']:.2f}**" in row and f"{round(best['best_at_seconds'])} s of training" in row


def test_readme_links_and_paths_exist() -> None:
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), target
    for path in set(re.findall(r"`((?:reports|benchmarks|pipeline|tests|docs)/[\w./-]+\.(?:py|json|yaml|md|png))`",
                                README)):
        generated = path.startswith(("reports/figures/", "reports/train/", "reports/eval_"))
        assert generated or (ROOT / path).exists(), path


def test_code_points_to_no_document_outside_the_project() -> None:
    for py in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]:
        for doc in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", py.read_text()):
            assert (ROOT / doc).exists() or list(ROOT.glob(f"*/{doc}")), f"{py.relative_to(ROOT)} cites {doc}"


def test_streaming_figures_match_benchmarks_results() -> None:
    d = _load("benchmarks/results/stream_throughput_h100-80gb-hbm3.json")
    p = {k: round(v["images_per_s"]) for k, v in d["placements"].items()}
    ratio = d["goals"]["stream_vs_resident_batch_512"]["measured"]
    assert (f"streamed training ran at {p['stream']:,} images/s against {p['device']:,} with the set on the GPU "
            f"({ratio:.3f} of resident; {p['stream:64']:,} with a 64 MiB map window), and pinned host memory at "
            f"{p['host']:,}") in _flat(README)
