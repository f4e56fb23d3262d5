"""`dvc plots diff` between two commits draws both revisions' curves and images (a GAN run, then a VAE run).

The plot definitions are the project's own (the top-level ``plots:`` of dvc.yaml, copied
verbatim, and its offline page template from .dvc/); the files are what the tiny GAN and VAE runs
really wrote, committed one after the other in a temporary git + DVC repository. The page DVC
writes is opened in headless Chromium with every host name unresolvable: the curves must draw.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from helpers_eval import REPO, TinyRun

FILES = ["reports/train/losses.csv", "reports/train/scores.csv", "reports/figures/samples.png",
         "reports/figures/interpolation.png", "reports/figures/nearest.png",
         *[f"reports/figures/training_{p:03d}pct.png" for p in (0, 25, 50, 100)]]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The colours DVC's line template gives the two revisions (HEAD~1, HEAD).
REVISION_COLOURS = [(148, 93, 214), (19, 173, 199)]


def _put(run: TinyRun, repo: Path) -> None:
    for rel in FILES:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.root / rel, repo / rel)


def test_plots_diff_shows_both_commits(tiny_gan: TinyRun, tiny_vae: TinyRun, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    dvc = [sys.executable, "-m", "dvc"]

    def sh(*cmd: str) -> str:
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    sh(*git, "init", "-q")
    sh(*dvc, "init", "-q")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    shutil.copytree(REPO / ".dvc/plots", repo / ".dvc/plots")
    shutil.copyfile(REPO / ".dvc/config", repo / ".dvc/config")
    _put(tiny_gan, repo)
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "gan")
    _put(tiny_vae, repo)
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "vae")

    data = json.loads(sh(*dvc, "plots", "diff", "HEAD~1", "HEAD", "--json"))["data"]
    curves = [next(iter(p)) for p in plots if isinstance(p, dict)]
    assert len(curves) == 2
    for name in curves:
        (vega,) = data[name]
        assert vega["type"] == "vega" and vega["revisions"] == ["HEAD~1", "HEAD"]
        rows = vega["content"]["data"]["values"]
        y = next(iter(next(p for p in plots if isinstance(p, dict) and name in p)[name]["y"].values()))
        for rev in ("HEAD~1", "HEAD"):
            assert any(r["rev"] == rev and r.get(y) not in (None, "") for r in rows), (name, rev)
    # GAN rows have a discriminator loss, VAE rows a KL term: both runs are really in the plot.
    objective = data[curves[0]][0]["content"]["data"]["values"]
    assert any("loss_d" in r for r in objective if r["rev"] == "HEAD~1")
    assert any("kl" in r for r in objective if r["rev"] == "HEAD")
    images = [p for p in plots if isinstance(p, str)]
    # The final grid and the grids at fixed fractions of training: one row each, both revisions.
    assert images[:5] == ["reports/figures/samples.png", *[f"reports/figures/training_{p:03d}pct.png"
                                                           for p in (0, 25, 50, 100)]]
    for name in images:
        entries = {e["revisions"][0]: e for e in data[name]}
        assert set(entries) == {"HEAD~1", "HEAD"}, name
        for rev, run in (("HEAD~1", tiny_gan), ("HEAD", tiny_vae)):
            assert entries[rev]["type"] == "image"
            assert Path(entries[rev]["url"]).read_bytes() == (run.root / name).read_bytes(), (name, rev)
    # The static page `dvc plots diff -o` writes names both revisions.
    sh(*dvc, "plots", "diff", "HEAD~1", "HEAD", "-o", "plots-html")
    page = (repo / "plots-html/index.html").read_text()
    assert "HEAD~1" in page and page.count("reports_figures_samples.png") >= 2
    assert "cdn.jsdelivr" not in page and "<script src=" not in page  # vega is inlined: no network needed
    shot = tmp_path / "plots.png"
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=10000", "--hide-scrollbars", "--window-size=1400,400",
                          f"--screenshot={shot}", (repo / "plots-html/index.html").as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64)  # [400, 1400, 3]: the two charts
    for colour in REVISION_COLOURS:  # each revision's line is drawn (a legend dot alone is < 100 pixels)
        drawn = int((np.abs(pixels - np.array(colour)).sum(-1) < 30).sum())
        assert drawn > 300, (colour, drawn)
