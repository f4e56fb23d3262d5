"""The HTML report as a user sees it: rendered by headless Chromium, checked pixel by pixel against its images.

A first Chromium run loads a copy of the page with a small script that records where every image
and section was laid out (``--dump-dom``); a second run screenshots the unmodified page at the
same width. Each image's screen region is then compared with the PNG embedded in the page, so
the test fails if a panel is missing, empty, hidden, mis-scaled or overlapping -- not only if a
file is absent.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.report.figures import metric_rows, plot_curves
from pipeline.report.html import per_class_table, render
from pipeline.stages.report import per_class_rows

from helpers_eval import TinyData, TinyRun, in_dir, run_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WIDTH = 1280
PANELS = ["metrics", "real-vs-generated", "timeline", "curves", "interpolation", "nearest", "cleaning", "protocol"]

PROBE = """<script>
window.addEventListener('load', () => {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height}; };
  const out = {height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth,
               images: [], sections: {}};
  document.querySelectorAll('img').forEach((img) => out.images.push(Object.assign(box(img), {
    src: img.src, alt: img.alt, px: img.classList.contains('px'),
    section: img.closest('section') ? img.closest('section').id : null,
    natural: [img.naturalWidth, img.naturalHeight], complete: img.complete})));
  document.querySelectorAll('section').forEach((s) => { out.sections[s.id] = box(s); });
  const pre = document.createElement('pre'); pre.id = 'layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--hide-scrollbars", "--force-device-scale-factor=1",
           "--force-color-profile=srgb", "--virtual-time-budget=5000", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def _layout(html_path: Path, tmp: Path) -> dict[str, Any]:
    probe = tmp / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp, f"--window-size={WIDTH},1000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S)
    assert found, "the layout probe did not run"
    import html as html_lib

    return json.loads(html_lib.unescape(found.group(1)))


def _screenshot(html_path: Path, tmp: Path, height: int) -> np.ndarray:
    shot = tmp / "screenshot.png"
    _chromium(tmp, f"--window-size={WIDTH},{height}", f"--screenshot={shot}", html_path.as_uri())
    return np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)  # [H, W, 3]


def _embedded(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def _compare(shot: np.ndarray, img: dict[str, Any]) -> tuple[float, float]:
    """(mean absolute difference, correlation) between an image's screen region and its embedded PNG."""
    x, y, w, h = (round(img[k]) for k in ("x", "y", "w", "h"))
    crop = shot[y : y + h, x : x + w]
    assert crop.shape[:2] == (h, w), f"{img['alt']}: outside the screenshot"
    ref = _embedded(img["src"]).resize((w, h), Image.Resampling.NEAREST if img["px"] else Image.Resampling.BILINEAR)
    ref_a = np.asarray(ref, dtype=np.float64)
    corr = float(np.corrcoef(crop.ravel(), ref_a.ravel())[0, 1])
    return float(np.abs(crop - ref_a).mean()), corr


def _check_page(html_path: Path, tmp: Path, panels: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    layout = _layout(html_path, tmp)
    assert layout["width"] <= WIDTH, "the page scrolls sideways"
    for pid in panels:
        assert pid in layout["sections"], f"panel {pid} missing"
        assert layout["sections"][pid]["h"] > 20, f"panel {pid} is empty"
    shot = _screenshot(html_path, tmp, layout["height"])
    assert shot.shape[0] >= layout["height"] - 1 and shot.std() > 20, "blank screenshot"
    for img in layout["images"]:
        assert img["complete"] and img["natural"][0] > 0, f"{img['alt']}: not decoded"
        assert img["w"] > 30 and img["h"] > 30, f"{img['alt']}: not visible"
        mad, corr = _compare(shot, img)
        # Images shown at their own size must match to the pixel; scaled ones (timeline thumbnails,
        # curves) differ by resampling but keep their structure.
        natural = abs(img["w"] - img["natural"][0]) < 1 and abs(img["h"] - img["natural"][1]) < 1
        assert corr > (0.99 if natural else 0.8), f"{img['alt']} in {img['section']}: corr {corr:.3f}"
        if natural:
            assert mad < 2.0, f"{img['alt']}: differs from its PNG by {mad:.2f} on average"
    return layout, shot


def test_report_renders_every_panel_as_embedded(tiny_gan: TinyRun, tmp_path: Path) -> None:
    layout, shot = _check_page(tiny_gan.html, tmp_path, PANELS)
    by_section: dict[str, list[dict[str, Any]]] = {}
    for img in layout["images"]:
        by_section.setdefault(img["section"], []).append(img)
    # Real and generated grids side by side, at their own size, both the files the report wrote.
    assert "per-class" not in layout["sections"]  # an unconditional generator has no classes
    real, gen = by_section["real-vs-generated"]
    assert abs(real["y"] - gen["y"]) < 1 and gen["x"] >= real["x"] + real["w"]
    for img, name in ((real, "real.png"), (gen, "samples.png")):
        assert np.array_equal(np.asarray(_embedded(img["src"])),
                              np.asarray(Image.open(tiny_gan.figures / name).convert("RGB")))
        assert round(img["w"]) == img["natural"][0]
    # The two grids hold different pictures (real digits vs a 40-step generator).
    x0, y0 = round(real["x"]), round(real["y"])
    x1, y1 = round(gen["x"]), round(gen["y"])
    w, h = round(min(real["w"], gen["w"])), round(min(real["h"], gen["h"]))
    assert np.abs(shot[y0 : y0 + h, x0 : x0 + w] - shot[y1 : y1 + h, x1 : x1 + w]).mean() > 10
    # Training timeline: first and last frames of the run (40 steps, a grid every 10).
    assert len(by_section["timeline"]) == 5
    assert len(by_section["curves"]) == 1 and len(by_section["interpolation"]) == 1
    assert len(by_section["nearest"]) == 4  # report.neighbours
    html = tiny_gan.html.read_text()
    metrics = json.loads(tiny_gan.metrics.read_text())
    for label in ("FID", "KID", "Precision", "Recall", "Density", "Coverage", "Memorisation ratio"):
        assert f"<td>{label}" in html
    assert f"{metrics['fid']:.4g}" in html and f"{metrics['fid_ci_low']:.4g}" in html
    assert "Inception-v3 metrics were not computed" in html
    assert "No previous commit holds reports/metrics.json" in html
    assert "d<sub>train</sub>" in html and "train #" in html
    assert "<th>accepted</th>" in html and "<th>extractor_sha256</th>" in html


def test_a_conditional_report_shows_each_class(tiny_conditional: TinyRun, tmp_path: Path) -> None:
    """Per class: intra-FID, the CAS classifier's and the real-trained classifier's accuracy on that
    class's real test images, how often the CAS classifier called the class per real image of it,
    and the class it most often took them for, all as the evaluate stage's details hold them, laid
    out on the page."""
    layout, _ = _check_page(tiny_conditional.html, tmp_path, [*PANELS, "per-class"])
    assert layout["sections"]["per-class"]["y"] < layout["sections"]["timeline"]["y"]
    details = json.loads(tiny_conditional.details.read_text())
    rows = per_class_rows(details, [f"digit {c}" for c in range(10)])
    assert [r["name"] for r in rows] == [f"digit {c}" for c in range(10)]
    confusion = details["cas_confusion"]
    for c, r in enumerate(rows):
        assert (r["intra_fid"], r["cas"], r["real"]) == (details["intra_fid_per_class"][c], details["cas_per_class"][c],
                                                          details["cas_real_per_class"][c])
        assert r["called"] == sum(row[c] for row in confusion) / sum(confusion[c])
        others = [n for j, n in enumerate(confusion[c]) if j != c]
        if max(others) > 0:
            name, share = r["taken_for"]
            j = int(name.split()[1])
            assert j != c and confusion[c][j] == max(others) and share == confusion[c][j] / sum(confusion[c])
        else:
            assert r["taken_for"] is None
    html = tiny_conditional.html.read_text()
    table = html[html.index("<table id='per-class-table'>"):]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 11  # a header and one row per class (the tensors' names: "0" .. "9")
    assert "<th>test images the CAS classifier called this class, per real image of it</th>" in table
    for c, r in enumerate(rows):  # the called-per-real cell sits just before the "taken for" cell
        taken = "" if r["taken_for"] is None else f"{r['taken_for'][0].split()[1]} ({r['taken_for'][1]:.0%})"
        assert f"<td class='num'>{r['called']:.2f}</td><td>{taken}</td></tr>" in table
    for c in range(10):
        assert f"<tr><td>{c}</td><td class='num'>{details['intra_fid_per_class'][c]:.4g}</td>" in table
    # A class taught 10 points or more worse by the samples than by real images is marked.
    marked = per_class_table([{"name": "shirt", "intra_fid": 2.0, "cas": 0.41, "real": 0.62, "called": 0.853,
                               "taken_for": ("T-shirt", 0.3)},
                              {"name": "bag", "intra_fid": 1.0, "cas": 0.90, "real": 0.95, "called": 1.0, "taken_for": None}])
    assert "<td class='num worse'>0.410</td>" in marked and "<td class='num'>0.900</td>" in marked
    assert "<td class='num'>0.85</td><td>T-shirt (30%)</td>" in marked
    # An exact 10-point gap is marked; a tie between two other classes names the lower one; a class
    # without test images (no scores) gets empty cells and no "taken for".
    edge = per_class_rows({"cas_confusion": [[5, 2, 2], [0, 0, 0], [1, 1, 3]], "intra_fid_per_class": [1.0, None, 2.0],
                           "cas_per_class": [5 / 9, None, 0.6], "cas_real_per_class": [0.9, None, 0.7]}, ["a", "b", "c"])
    assert [r["taken_for"] for r in edge] == [("b", 2 / 9), None, ("a", 0.2)]
    # Called per real one: column sums over row sums (a: 6 of 9; c: 5 of 5); b has no test images.
    assert [r["called"] for r in edge] == [6 / 9, None, 1.0]
    assert "<td class='num worse'>0.600</td><td class='num'>0.700</td><td class='num'>1.00</td>" in per_class_table(edge)
    assert "<td class='num'>0.67</td><td>b (22%)</td>" in per_class_table(edge)
    assert ("<tr><td>b</td><td class='num'></td><td class='num'></td><td class='num'></td><td class='num'></td>"
            "<td></td></tr>") in per_class_table(edge)
    # A class the CAS classifier never predicts is called 0 times per real one (a cell, not a blank).
    never = per_class_rows({"cas_confusion": [[3, 0], [2, 0]], "intra_fid_per_class": [1.0, 1.0],
                            "cas_per_class": [1.0, 0.0], "cas_real_per_class": [1.0, 1.0]}, ["x", "y"])
    assert [r["called"] for r in never] == [5 / 3, 0.0]
    assert "<td class='num'>0.00</td><td>x (100%)</td>" in per_class_table(never)
    assert per_class_rows({"memorisation": {}}, []) == []  # details of an unconditional run: no table


def test_vae_report_has_reconstructions(tiny_vae: TinyRun, tmp_path: Path) -> None:
    layout, _ = _check_page(tiny_vae.html, tmp_path, [*PANELS, "reconstructions", "latent-samplers", "traversal"])
    recon = [i for i in layout["images"] if i["section"] == "reconstructions"]
    assert len(recon) == 1
    assert len([i for i in layout["images"] if i["section"] == "latent-samplers"]) == 2
    assert len([i for i in layout["images"] if i["section"] == "traversal"]) == 1
    assert "VAE ELBO" in tiny_vae.html.read_text()


def test_change_against_previous_commit(tiny_gan: TinyRun, tmp_path: Path) -> None:
    """metrics.json committed at HEAD is the baseline; the table shows signed, coloured changes."""
    from pipeline.metrics import record
    from pipeline.params import load_params
    from pipeline.stages import report

    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    current = json.loads(tiny_gan.metrics.read_text())
    before = dict(current, fid=current["fid"] + 1.5, precision=current["precision"] - 0.25)
    del before["recall"]
    (repo / "reports/metrics.json").write_text(json.dumps(before))
    protocol = json.loads(record.protocol_path(tiny_gan.metrics).read_text())
    shutil.copyfile(record.protocol_path(tiny_gan.metrics), repo / "reports/eval_protocol.json")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "reports/metrics.json", "reports/eval_protocol.json"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True)
    shutil.copyfile(tiny_gan.metrics, repo / "reports/metrics.json")
    d = tiny_gan.data
    with in_dir(repo):
        assert report.previous_metrics(Path("reports/metrics.json")) == record.merge(before, protocol)
        report.run(load_params(tiny_gan.params), tiny_gan.models, d.tensors, tiny_gan.train_reports,
                   repo / "reports/metrics.json", tiny_gan.details, d.clean_report, repo / "reports/figures",
                   repo / "reports/index.html")
    html = (repo / "reports/index.html").read_text()
    assert "<th>change vs previous commit</th>" in html
    row = re.search(r"<tr data-key='offline evaluator:fid'>(.*?)</tr>", html).group(1)
    assert "class='num better'>-1.5</td>" in row  # FID fell by 1.5: better
    row = re.search(r"<tr data-key='offline evaluator:precision'>(.*?)</tr>", html).group(1)
    assert "class='num better'>+0.25</td>" in row
    row = re.search(r"<tr data-key='offline evaluator:recall'>(.*?)</tr>", html).group(1)
    assert "<td>new</td>" in row
    row = re.search(r"<tr data-key='offline evaluator:kid'>(.*?)</tr>", html).group(1)
    assert "unchanged" in row


def test_curves_show_the_learning_rates_only_when_they_change(tmp_path: Path) -> None:
    """The curves figure gains a learning-rate panel (figures are 5 inches, 550 px, per panel) for a
    run whose rates fall, and none for constant rates."""
    widths = {}
    for name, lr_d in (("constant", [8e-4] * 4), ("falling", [8e-4, 8e-4, 4e-4, 0.0])):
        rows = ["step,loss_d,loss_g,lr_d,lr_g,p_fake,p_real"] + [
            f"{s},1.{s},2.{s},{d:.6g},{d / 4:.6g},0.4,0.6" for s, d in zip((2, 4, 6, 8), lr_d, strict=True)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
        (tmp_path / "scores.csv").write_text("step,score\n4,30.5\n8,12.25\n")
        assert plot_curves(tmp_path / f"{name}.csv", tmp_path / "scores.csv", tmp_path / f"{name}.png")
        widths[name] = Image.open(tmp_path / f"{name}.png").size[0]
    assert widths == {"constant": 3 * 550, "falling": 4 * 550}, widths


def test_metric_rows_include_inception_when_computed() -> None:
    metrics = {"fid": 3.0, "fid_ci_low": 2.5, "fid_ci_high": 3.5, "kid": 0.1, "kid_std": 0.01,
               "inception": {"computed": True, "fid": 40.0, "fid_ci_low": 39.0, "fid_ci_high": 41.0, "IS": 2.0}}
    previous = {"fid": 4.0, "inception": {"computed": True, "fid": 38.0}}
    rows = {(r["group"], r["key"]): r for r in metric_rows(metrics, previous)}
    assert rows[("offline evaluator", "fid")]["uncertainty"] == "95% [2.5, 3.5]"
    assert rows[("offline evaluator", "kid")]["uncertainty"] == "± 0.01 (std)"
    assert rows[("Inception-v3", "fid")]["delta"] == pytest.approx(2.0)
    assert rows[("Inception-v3", "IS")]["delta"] is None
    page = render({"title": "t", "subtitle": "s", "metric_rows": list(rows.values()), "have_previous": True,
                   "inception_note": None, "figures": {}, "timeline": [], "memorisation": [], "cleaning": [],
                   "protocol": [], "commit": "abc"})
    assert "<tr data-key='Inception-v3:fid'>" in page and "class='num worse'>+2</td>" in page


def test_the_pixel_check_catches_a_faded_panel(tiny_gan: TinyRun, tmp_path: Path) -> None:
    """The same checks on the same page, with the generated grid faded by CSS: they must fail."""
    faded = tmp_path / "faded.html"
    style = "<style>#real-vs-generated figure:last-child img { opacity: 0.2; }</style>"
    faded.write_text(tiny_gan.html.read_text().replace("</head>", style + "</head>"))
    with pytest.raises(AssertionError, match="Generated"):
        _check_page(faded, tmp_path, PANELS)


def test_no_change_is_shown_against_another_extractor() -> None:
    """A retrained evaluator (or other Inception weights) moves every number: no "change" is claimed."""
    metrics = {"fid": 3.0, "protocol": {"extractor_sha256": "a" * 64},
               "inception": {"computed": True, "fid": 40.0, "weights_sha256": "c" * 64}}
    previous = {"fid": 4.0, "protocol": {"extractor_sha256": "b" * 64},
                "inception": {"computed": True, "fid": 38.0, "weights_sha256": "c" * 64}}
    rows = {(r["group"], r["key"]): r for r in metric_rows(metrics, previous)}
    assert rows[("offline evaluator", "fid")]["delta"] is None
    assert rows[("offline evaluator", "fid")]["comparable"] is False
    assert rows[("Inception-v3", "fid")]["delta"] == pytest.approx(2.0)  # same weights: compared
    page = render({"title": "t", "subtitle": "s", "metric_rows": list(rows.values()), "have_previous": True,
                   "inception_note": None, "figures": {}, "timeline": [], "memorisation": [], "cleaning": [],
                   "protocol": [], "commit": "abc"})
    assert "not comparable (other extractor)" in page
    previous["protocol"]["extractor_sha256"] = "a" * 64
    assert metric_rows(metrics, previous)[0]["delta"] == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def tiny_stylegan2(tiny_data: TinyData) -> TinyRun:
    return run_model(tiny_data, "stylegan2", {"train": {"model": "stylegan2", "steps": 20},
                                              "report": {"truncation_psi": 0.7}})


def test_stylegan2_report_grids_use_the_truncation_psi(tiny_stylegan2: TinyRun, tmp_path: Path) -> None:
    """report.truncation_psi: the sample grid and interpolation are drawn at psi (their captions say
    so, and that the metrics use psi 1)."""
    from pipeline.models import latents, load_generator
    from pipeline.params import load_params
    from pipeline.report import figures as F

    html = tiny_stylegan2.html.read_text()
    note = "; truncation psi 0.7 (the metrics use psi 1)"
    assert f"fixed latent seeds{note})" in html and f"between two fixed latents{note}" in html
    r = load_params(tiny_stylegan2.params).report
    g, info = load_generator(tiny_stylegan2.models / "best.pt")
    for psi in (0.7, 1.0):
        F.save_png(F.generate(g, latents(r.grid_n, info["nz"], 0), psi=psi), tmp_path / f"{psi}.png",
                   nrow=r.grid_nrow, scale=2)
    written = (tiny_stylegan2.figures / "samples.png").read_bytes()
    assert written == (tmp_path / "0.7.png").read_bytes() != (tmp_path / "1.0.png").read_bytes()
