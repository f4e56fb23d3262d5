"""The H100 seed runs behind the README's seed and recipe-variant tables, and a figure of their curves.

Each run is a ``benchmarks/time_to_quality.py`` result (``benchmarks/results/<stem>_h100-80gb-hbm3.json``,
one engine entry per variant name) or, where the JSON did not come back from the GPU machine, the
scores its log printed (``benchmarks/results/raw/<stem>_h100-80gb-hbm3.txt``).

    python benchmarks/seed_runs.py [--out benchmarks/results/recipe_variants_h100-80gb-hbm3.png]

draws every run's FID against training seconds, one panel per model family: the first recipe's
seeds in grey, the recipe's seeds now in colour, each final score marked.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = RESULTS / "recipe_variants_h100-80gb-hbm3.png"

# Seeds with standing statistics: (recipe label, seed, result file stem, variant name); a stem under
# raw/ is a run whose JSON did not come back, read from the scores its log printed instead.
def _seeds(label: str, *runs: tuple[int, str, str]) -> list[tuple[str, int, str, str]]:
    return [(label, seed, stem, name) for seed, stem, name in runs]


SEED_ROWS = [
    *_seeds("`fmnist-gpu.yaml` (DCGAN, R1 gamma 0.1)", (0, "raw/zoo_standing_dcgan_log", "recipe"),
            (1, "seeds_dcgan_s1", "recipe"), (2, "seeds_dcgan_s2", "recipe")),
    *_seeds("`fmnist-conditional.yaml` (R1 gamma 0.1)", (0, "zoo_standing_conditional", "recipe"),
            (1, "seeds_conditional_s1", "recipe"), (2, "seeds_conditional_s2", "recipe")),
    *_seeds("`fmnist-wgan-gp.yaml`", (0, "raw/zoo_standing_wgan_gp_log", "recipe")),
    *_seeds("`fmnist-sngan.yaml` (R1 gamma 0.1)", (0, "sngan_2min_standing", "recipe"),
            (1, "seeds_sngan_s1", "recipe"), (2, "seeds_sngan_s2", "recipe")),
    *_seeds("`fmnist-biggan.yaml` (EMA 0.9995, no R1, constant rates)", (0, "biggan_7min_ema9995", "ema9995"),
            (1, "seeds_biggan_s1", "recipe"), (2, "seeds_biggan_s2", "recipe")),
]
POINT = re.compile(r"step \d+, ([\d.]+) s, FID ([\d.]+) \(live G's BN statistics: ([\d.]+)\)")


def log_curve(path: Path) -> list[dict[str, float]]:
    """The scores a time_to_quality log printed, both ways (recomputed and copied statistics)."""
    return [{"train_seconds": float(m[1]), "fid": float(m[2]), "fid_copied_bn_stats": float(m[3])}
            for m in POINT.finditer(path.read_text())]


def seed_run(stem: str, name: str) -> dict[str, Any]:
    """A run: the JSON's engine entry ``name``, or a raw log's scores and summary figures."""
    if not stem.startswith("raw/"):
        file = RESULTS / f"{stem}_h100-80gb-hbm3.json"
        runs = [e for e in json.loads(file.read_text())["engine"] if e["name"] == name]
        if not runs:
            raise ValueError(f"{file.name} has no variant {name!r}")
        if "error" in runs[0]:
            raise ValueError(f"{file.name}: variant {name!r} failed ({runs[0]['error']}), so it has no result to show")
        return runs[0]  # one a time limit stopped (marked partial) counts with the scores it reached
    curve = log_curve(RESULTS / f"{stem}_h100-80gb-hbm3.txt")
    fids = [c["fid"] for c in curve]
    best = min(range(len(fids)), key=fids.__getitem__)
    return {"curve": curve, "best_fid": fids[best], "best_at_seconds": curve[best]["train_seconds"],
            "final_fid": fids[-1]}


def ends_near_best(run: dict[str, Any]) -> bool:
    """Whether a run's final FID is within 10% of its best (no late decline)."""
    return run["final_fid"] <= 1.1 * run["best_fid"]


def seed_table(recipe: str) -> list[tuple[int, str, str]]:
    """(seed, result file stem, variant name) of the seed table's rows for ``recipe`` (a file name)."""
    return [(seed, stem, name) for label, seed, stem, name in SEED_ROWS if label.startswith(f"`{recipe}`")]


# Recipe variants over seeds: (label, [(seed, result file stem, variant name), ...]); raw/ stems as above.
# The recipes before are the seed table's runs, with more seeds where there are.
VARIANT_ROWS = [
    ("DCGAN, R1 gamma 0.1, constant rates (the first recipe)",
     seed_table("fmnist-gpu.yaml") + [(s, f"u_dcgan_s{s}", "recipe") for s in (3, 4)]),
    ("DCGAN, R1 gamma 0.1, rates falling over the second half",
     [(s, f"decay_dcgan_s{s}", "decay") for s in range(3)] + [(s, f"u_dcgan_s{s}", "decay") for s in (3, 4)]),
    ("DCGAN, R1 gamma 1, constant rates (`fmnist-gpu.yaml` now)",
     [(s, f"x_dcgan_s{s}", "r1g1") for s in range(3)] + [(s, f"y_dcgan_s{s}", "r1g1") for s in (3, 4)]),
    ("conditional DCGAN, R1 gamma 0.1, constant rates (the first recipe)",
     seed_table("fmnist-conditional.yaml") + [(s, f"u_cond_base_s{s}", "recipe") for s in (3, 4)]),
    ("conditional DCGAN, R1 gamma 0.1, falling rates", [(s, f"decay_conditional_s{s}", "decay") for s in range(3)]),
    ("conditional DCGAN, R1 gamma 0.1, D at 4e-4 (2x G), falling rates", [(s, f"u_cond_fix_s{s}", "lrd4decay") for s in range(4)]),
    ("conditional DCGAN, R1 gamma 1, falling rates", [(s, f"u_cond_fix_s{s}", "r1decay") for s in range(4)]),
    ("conditional DCGAN, R1 gamma 1, constant rates (`fmnist-conditional.yaml` now)",
     [(s, f"v_cond_r1_s{s}", "r1") for s in range(3)] + [(s, f"ab_cond_s{s}", "recipe") for s in (3, 4)]
     + [(5, "ah_cond_s5", "recipe")]),
    ("conditional DCGAN, the recipe now, seeds 3 and 4 run again", [(s, f"af_cond_s{s}", "recipe") for s in (3, 4)]),
    ("SNGAN, 2 minutes, R1 gamma 0.1, constant rates (the first recipe)", seed_table("fmnist-sngan.yaml")),
    ("SNGAN, 5,000 steps, R1 gamma 0.1, falling rates", [(s, f"decay_sngan_s{s}", "decay") for s in range(3)]),
    ("SNGAN, 2 minutes, R1 gamma 1, constant rates (`fmnist-sngan.yaml` now)",
     [(0, "w_sngan_s0", "r1g1"), (1, "w_sngan_s1", "r1g1"), (2, "x_sngan_s2", "r1g1"), (3, "x_sngan_s3", "r1g1"),
      (4, "y_sngan_s4", "r1g1")] + [(s, f"ap_sngan_s{s}", "recipe") for s in (5, 6, 7)]),
    ("SNGAN, the recipe now, seed 4 run again", [(4, "ap_sngan_s4", "recipe")]),
    ("SNGAN, the recipe now, seed 2 with a cold compile cache while 3 other jobs compiled",
     [(2, "w_sngan_s2", "r1g1")]),
    ("SNGAN, R1 gamma 1, rates falling over the second half of 9,380 steps (about 2 minutes)",
     [(0, "ai_sngan_decay_s0", "r1decay"), (1, "ai_sngan_decay_s1", "r1decay"), (2, "aa_sngan_decay_s2", "r1decay")]),
    ("SNGAN, the same, seed 4 with a cold compile cache: 4,690 steps in 2 minutes, so its rates never fell",
     [(4, "aa_sngan_decay_s4", "r1decay")]),
    ("BigGAN, hinge, no R1, constant rates, 4,688 steps (the first recipe)", seed_table("fmnist-biggan.yaml")),
    ("BigGAN, hinge, no R1, falling rates, 4,688 steps", [(1, "decay_biggan_s1", "decay")]),
    ("BigGAN, hinge, R1 gamma 1, falling rates, 3,500 steps (logs only)",
     [(s, f"raw/biggan_r1_decay_s{s}_log", "r1decay") for s in range(3)]),
    ("BigGAN, hinge, R1 gamma 1, falling rates, 3,500 steps (the same, run again)",
     [(s, f"w_biggan_s{s}", "recipe") for s in range(3)]),
    ("BigGAN, hinge, R1 gamma 1, constant rates, 3,500 steps", [(s, f"x_biggan_s{s}", "r1const") for s in range(2)]),
    ("BigGAN, non-saturating loss, R1 gamma 1, falling rates, 3,500 steps",
     [(s, f"y_biggan_s{s}", "ns") for s in range(2)] + [(s, f"aa_biggan_s{s}", "recipe") for s in (2, 3, 4)]),
    ("BigGAN, the same with R1 gamma 1, seed 4 run again", [(4, "af_biggan_s4", "recipe")]),
    ("BigGAN, non-saturating loss, R1 gamma 1, falling rates, 4,700 steps (logs only)",
     [(s, f"raw/ab_biggan_4700_s{s}_log", "steps4700") for s in (3, 4)]),
    ("BigGAN, non-saturating loss, R1 gamma 4, falling rates, 3,500 steps (the recipe before)",
     [(s, f"ag_biggan_g4_s{s}", "g4") for s in range(4)] + [(4, "af_biggan_g4_s4", "g4")]),
    ("BigGAN, non-saturating loss, R1 gamma 10, falling rates, 3,500 steps", [(4, "af_biggan_g10_s4", "g10")]),
    ("BigGAN, R1 gamma 4, 3,500 steps, with D at 2e-4 (2x G)",
     [(s, f"ai_biggan_g4lrd2_s{s}", "g4lrd2") for s in range(3)] + [(4, "ah_biggan_g4lrd2_s4", "g4lrd2")]),
    ("BigGAN, R1 gamma 4, 3,500 steps, with the EMA at 0.999", [(4, "ah_biggan_g4ema999_s4", "g4ema999")]),
    ("BigGAN, R1 gamma 4, 3,500 steps, with one D step per G step", [(4, "ah_biggan_g4nc1_s4", "g4nc1")]),
    ("BigGAN, non-saturating loss, R1 gamma 4, falling rates, 4,688 steps (`fmnist-biggan.yaml` now)",
     [(s, f"ak_biggan_g4long_s{s}", "g4long") for s in range(4)]
     + [(s, f"am_biggan_g4long_s{s}", "g4long") for s in range(4, 8)]),
    ("BigGAN, the recipe now, seeds 0-3 with a cold compile cache, stopped before intra-FID and CAS (logs only)",
     [(s, f"raw/aj_biggan_g4long_s{s}_log", "g4long") for s in range(4)]),
    ("BigGAN, the recipe now, seeds 4-7 with a cold compile cache, stopped before intra-FID and CAS",
     [(s, f"al_biggan_g4long_s{s}", "g4long") for s in range(4, 8)]),
]


# Which rows count in the README's tallies of runs ending within 10% of their best.
FIRST_RECIPES = ["DCGAN, R1 gamma 0.1, constant rates", "conditional DCGAN, R1 gamma 0.1, constant rates",
                 "SNGAN, 2 minutes, R1 gamma 0.1"]
RECIPES_NOW = ["DCGAN, R1 gamma 1, constant rates", "conditional DCGAN, R1 gamma 1, constant rates",
               "SNGAN, 2 minutes, R1 gamma 1"]
R1_GAMMA_1 = [*RECIPES_NOW, "conditional DCGAN, R1 gamma 1, falling rates",  # the cold-cache runs left out
              "conditional DCGAN, the recipe now", "SNGAN, the recipe now, seed 4 run again",
              "SNGAN, R1 gamma 1, rates falling"]
# BigGAN's runs with R1 (gamma 1 or more), under either loss (every row of each start).
BIGGAN_R1 = ["BigGAN, hinge, R1 gamma 1", "BigGAN, non-saturating loss", "BigGAN, the same", "BigGAN, R1 gamma",
             "BigGAN, the recipe now"]
R1_GAMMA_01 = [*FIRST_RECIPES, "DCGAN, R1 gamma 0.1, rates falling", "conditional DCGAN, R1 gamma 0.1, falling",
               "conditional DCGAN, R1 gamma 0.1, D at 4e-4", "SNGAN, 5,000 steps"]


def within_10pct(label_starts: list[str]) -> tuple[int, int]:
    """(runs whose final FID is within 10% of their best, runs) over every row whose label starts with
    one of ``label_starts`` (each must start at least one)."""
    got = []
    for start in label_starts:
        rows = [runs for label, runs in VARIANT_ROWS if label.startswith(start)]
        if not rows:
            raise ValueError(f"no variant row starts with {start!r}")
        got += [seed_run(stem, name) for runs in rows for _, stem, name in runs]
    return sum(map(ends_near_best, got)), len(got)


# The figure's panels: (title, (the first recipe's row, legend), (the recipe's row now, legend)); rows
# by their label's start. BigGAN's recipe now is drawn from its cold-cache runs, scored four times
# each; the warm-cache runs of the same seeds were scored only twice.
PANELS = [
    ("DCGAN (fmnist-gpu.yaml)", ("DCGAN, R1 gamma 0.1, constant rates", "first: R1 gamma 0.1"),
     ("DCGAN, R1 gamma 1, constant rates", "now: R1 gamma 1")),
    ("conditional DCGAN (fmnist-conditional.yaml)",
     ("conditional DCGAN, R1 gamma 0.1, constant rates", "first: R1 gamma 0.1"),
     ("conditional DCGAN, R1 gamma 1, constant rates", "now: R1 gamma 1")),
    ("SNGAN, 2 minutes (fmnist-sngan.yaml)", ("SNGAN, 2 minutes, R1 gamma 0.1", "first: R1 gamma 0.1"),
     ("SNGAN, 2 minutes, R1 gamma 1", "now: R1 gamma 1")),
    ("BigGAN (fmnist-biggan.yaml)", ("BigGAN, hinge, no R1, constant rates", "first: hinge, no R1"),
     ("BigGAN, the recipe now, seeds 0-3 with a cold compile cache",
      "now: R1 gamma 4, 4,688 steps, cold cache")),
]


def variant(label_start: str) -> tuple[str, list[tuple[int, str, str]]]:
    """The VARIANT_ROWS row whose label starts with ``label_start`` (exactly one)."""
    rows = [row for row in VARIANT_ROWS if row[0].startswith(label_start)]
    if len(rows) != 1:
        raise ValueError(f"{len(rows)} variant rows start with {label_start!r}")
    return rows[0]


def plot(out: Path) -> Path:
    """Draw the PANELS' runs (FID of the EMA generator against training seconds) into ``out``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(11, 9.4))
    for ax, (title, *rows) in zip(axes.flat, PANELS, strict=True):
        fids, ends = [], []
        for (start, short), colour, width in zip(rows, ("0.55", "tab:blue"), (1.0, 1.8), strict=True):
            _, runs = variant(start)
            got = [seed_run(stem, name) for _, stem, name in runs]
            within = sum(map(ends_near_best, got))
            for i, ((seed, _, _), run) in enumerate(zip(runs, got, strict=True)):
                xs = [c["train_seconds"] for c in run["curve"]]
                ys = [c["fid"] for c in run["curve"]]
                fids += ys
                ends.append((xs[-1], ys[-1], str(seed), colour))
                ax.plot(xs, ys, color=colour, lw=width, alpha=0.9,
                        label=f"{short}: {within} of {len(got)} seeds end within 10% of their best" if i == 0 else None)
                ax.plot(xs[-1:], ys[-1:], "o", color=colour, ms=4)
        x_span = max(x for x, *_ in ends) - min(x for x, *_ in ends) or 1.0
        placed: list[tuple[float, float, float]] = []
        for x, y, seed, colour in sorted(ends, key=lambda e: e[1]):  # shift a seed's number right past close ones
            dx = 4 + 7 * sum(abs(x - px) < 0.04 * x_span and abs(y / py - 1) < 0.06 for px, py, _ in placed)
            placed.append((x, y, dx))
            ax.annotate(seed, (x, y), textcoords="offset points", xytext=(dx, -3), fontsize=8, color=colour)
        ax.set_yscale("log")
        ax.set_ylim(min(fids) * 0.7, max(y for _, y, *_ in ends) * 4)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training seconds (compiling included)")
        ax.set_ylabel("FID (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.suptitle("Each seed's FID over training (offline evaluator, 5,000 EMA samples), one H100 GPU per run;\n"
                 "dots: the final scores, numbered by seed", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FIGURE, help="PNG to write")
    print(f"wrote {plot(ap.parse_args().out)}")


if __name__ == "__main__":
    main()
