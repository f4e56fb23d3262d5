"""A self-contained HTML report (images inlined as base64, no scripts, no network)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d2330; background: #fafbfc; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 2px solid #e3e7ee;
     padding-bottom: 4px; }
.sub { color: #5b6475; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; background: white; }
td, th { border: 1px solid #dde2ea; padding: 5px 10px; text-align: left; font-size: 14px; }
th { background: #eef1f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #137333; font-weight: 600; } .worse { color: #b3261e; font-weight: 600; }
.row { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.pair { display: flex; gap: 24px; flex-wrap: nowrap; align-items: flex-start; }
.pairs { display: flex; gap: 10px; flex-wrap: wrap; }
.pairs figure { padding: 4px; } .pairs figcaption { font-size: 12px; margin-top: 2px; }
td.group { color: #5b6475; font-size: 12px; }
figure { margin: 0; background: white; border: 1px solid #dde2ea; padding: 8px; }
figcaption { font-size: 13px; color: #5b6475; margin-top: 6px; max-width: 520px; }
img { max-width: 100%; height: auto; } img.px { image-rendering: pixelated; }
.note { background: #fff7e0; border: 1px solid #f0d890; padding: 8px 12px; font-size: 14px; }
.warning { background: #fde8e8; border: 2px solid #c0392b; padding: 10px 14px; font-size: 15px; }
code { background: #eef1f6; padding: 1px 4px; }
"""


def img_tag(path: Path | bytes, *, alt: str, width: int | None = None, pixelated: bool = True) -> str:
    """An <img> with the PNG inlined (a file path, or the PNG bytes themselves)."""
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    data = base64.b64encode(raw).decode()
    w = f' width="{width}"' if width else ""
    cls = ' class="px"' if pixelated else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{w}>'


def figure(path: Path | None, caption: str, *, width: int | None = None, pixelated: bool = True) -> str:
    if path is None or not Path(path).exists():
        return ""
    return f"<figure>{img_tag(path, alt=caption, width=width, pixelated=pixelated)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def metrics_table(rows: list[dict[str, Any]], have_previous: bool) -> str:
    head = ("<tr><th>metric</th><th>features</th><th>value</th><th>uncertainty</th>"
            + ("<th>change vs previous commit</th>" if have_previous else "") + "</tr>")
    body = []
    for r in rows:
        cells = (f"<td>{html.escape(r['label'])}</td><td class='group'>{html.escape(r['group'])}</td>"
                 f"<td class='num'>{_fmt(r['value'])}</td><td>{html.escape(r['uncertainty'])}</td>")
        if have_previous:
            d = r["delta"]
            if not r.get("comparable", True):
                cells += "<td>not comparable (other extractor)</td>"
            elif d is None:
                cells += "<td>new</td>"
            elif abs(d) <= 1e-5 * max(abs(r["value"]), abs(r["value"] - d)):  # float noise (thread count)
                cells += "<td class='num'>unchanged</td>"
            else:
                good = (d < 0) if r["better"] == "lower" else (d > 0)
                cells += f"<td class='num {'better' if good else 'worse'}'>{d:+.4g}</td>"
        body.append(f"<tr data-key='{html.escape(r['group'])}:{html.escape(r['key'])}'>{cells}</tr>")
    return f"<table id='metrics-table'>{head}{''.join(body)}</table>"


def kv_table(items: list[tuple[str, Any]], *, table_id: str = "") -> str:
    tid = f" id='{html.escape(table_id)}'" if table_id else ""
    return f"<table{tid}>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items) + "</table>"


def per_class_table(rows: list[dict[str, Any]]) -> str:
    """A conditional generator's classes: intra-FID, the accuracy on each class's real test images of
    a classifier trained on the generated images (CAS) and of one trained on as many real images,
    how many test images the first called the class per real one, and the class it most often
    mistook them for. A class the samples teach far worse than real images do (10 points or more)
    is marked."""
    head = ("<tr><th>class</th><th>intra-FID</th><th>CAS: right on its real test images</th>"
            "<th>the same classifier trained on real images</th>"
            "<th>test images the CAS classifier called this class, per real image of it</th>"
            "<th>CAS classifier most often took them for</th></tr>")
    body = []
    for r in rows:
        cas, real = r["cas"], r["real"]
        bad = cas is not None and real is not None and round(real - cas, 9) >= 0.10
        taken = "" if r["taken_for"] is None else f"{html.escape(r['taken_for'][0])} ({r['taken_for'][1]:.0%})"
        called = "" if r["called"] is None else f"{r['called']:.2f}"
        body.append(f"<tr><td>{html.escape(r['name'])}</td><td class='num'>{'' if r['intra_fid'] is None else _fmt(r['intra_fid'])}</td>"
                    f"<td class='num{' worse' if bad else ''}'>{'' if cas is None else f'{cas:.3f}'}</td>"
                    f"<td class='num'>{'' if real is None else f'{real:.3f}'}</td>"
                    f"<td class='num'>{called}</td>"
                    f"<td>{taken}</td></tr>")
    return f"<table id='per-class-table'>{head}{''.join(body)}</table>"


def _section(sid: str, title: str, *body: str) -> str:
    return f"<section id='{sid}'><h2>{html.escape(title)}</h2>{''.join(b for b in body if b)}</section>"


def render(ctx: dict[str, Any]) -> str:
    """Build the page from a context dict assembled by the report stage.

    Every panel is a <section> with a fixed id (metrics, real-vs-generated, per-class, timeline, curves,
    interpolation, reconstructions, latent-samplers, traversal, nearest, cleaning, protocol), so a
    reader -- or a test -- can find it; images are inlined, so the file is the whole report.
    """
    figs = ctx["figures"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(ctx['title'])}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(ctx['title'])}</h1><p class='sub'>{html.escape(ctx['subtitle'])}</p>"]
    note = f"<p class='note'>{html.escape(ctx['inception_note'])}</p>" if ctx.get("inception_note") else ""
    if ctx["have_previous"]:
        prev = "<p class='sub'>Change: against reports/metrics.json as committed at HEAD.</p>"
    else:
        prev = "<p class='sub'>No previous commit holds reports/metrics.json: nothing to compare against.</p>"
    warning = (f"<p class='warning' id='extractor-warning'><strong>Warning: these metrics are not to be trusted."
               f"</strong> {html.escape(ctx['warning'])}</p>") if ctx.get("warning") else ""
    parts.append(_section("metrics", "Metrics", warning, metrics_table(ctx["metric_rows"], ctx["have_previous"]), prev,
                          note))
    parts.append(_section("real-vs-generated", "Real vs generated", "<div class='pair'>",
                          figure(figs.get("real"), "Real test images (random, fixed seed)"),
                          figure(figs.get("samples"), "Generated (best checkpoint, EMA, fixed latent seeds"
                                 f"{ctx.get('truncation_note', '')})"),
                          "</div>"))
    if ctx.get("per_class"):
        parts.append(_section("per-class", "Per class (conditional generator)",
                              "<p class='sub'>Intra-FID compares each class's samples with that class's real "
                              "test images. CAS trains the evaluator's classifier on the generated images, "
                              "labelled as conditioned, and tests it on real ones: a class it gets wrong far "
                              "more often than the real-trained classifier (marked) is one whose samples do "
                              "not look like it, look like the class in the last column, or are too alike "
                              "(a collapse inside the class). A class the CAS classifier calls less often "
                              "than it occurs (below 1) suggests samples narrower than its real images; above "
                              "1, that the classifier trained on them also calls real images of other classes "
                              "by this class. 1 alone does not mean right: read it beside the CAS column.</p>",
                              per_class_table(ctx["per_class"])))
    if ctx.get("timeline"):
        frames = "".join(figure(path, f"step {step}", width=200) for step, path in ctx["timeline"])
        parts.append(_section("timeline", "Fixed-seed samples over training", f"<div class='row'>{frames}</div>"))
    parts.append(_section("curves", "Training curves",
                          figure(figs.get("curves"), "Losses, discriminator outputs, the in-loop evaluator score, "
                                 "with train.ada ADA's p and the r_t it holds at its target, and the learning "
                                 "rates when they fall (train.lr_decay_start)", pixelated=False)))
    parts.append(_section("interpolation", "Latent interpolation",
                          figure(figs.get("interpolation"),
                                 "Each row walks the latent sphere (slerp) between two fixed latents"
                                 f"{ctx.get('truncation_note', '')}")))
    if figs.get("reconstructions"):
        parts.append(_section("reconstructions", "VAE reconstructions",
                              figure(figs["reconstructions"], "Top of each pair: real test image; below: its "
                                     "reconstruction (posterior mean)")))
    if figs.get("samples_prior") and figs.get("samples_gmm"):
        parts.append(_section("latent-samplers", "VAE latent samplers", "<div class='pair'>",
                              figure(figs["samples_prior"], "Latents from the prior N(0, I)"),
                              figure(figs["samples_gmm"], "Latents from the ex-post Gaussian mixture fitted to the "
                                     "encoder's means (same seeds)"), "</div>"))
    if figs.get("traversal"):
        parts.append(_section("traversal", "VAE latent traversal",
                              figure(figs["traversal"], "One test image's posterior mean; each row sweeps one latent "
                                     "dimension (the most used ones) from -3 to +3 prior standard deviations")))
    pairs = "".join(
        f"<figure>{img_tag(p['png'], alt='generated sample over its nearest training image')}"
        f"<figcaption>train #{p['train_index']}<br>d<sub>train</sub> {p['distance_train']:.3g}<br>"
        f"d<sub>test</sub> {p['distance_test']:.3g}</figcaption></figure>" for p in ctx.get("nearest_pairs", []))
    parts.append(_section("nearest", "Nearest training images (memorisation check)",
                          "<p class='sub'>The generated samples closest to any training image (top of each pair) "
                          "and that training image (below), with the feature-space distance to it and to the "
                          "sample's nearest test image. Copies would sit much nearer to training than to test "
                          "images.</p>", f"<div class='pairs'>{pairs}</div>" if pairs else "",
                          kv_table(ctx["memorisation"], table_id="memorisation-table")))
    parts.append(_section("cleaning", "Data cleaning", kv_table(ctx["cleaning"], table_id="cleaning-table")))
    parts.append(_section("protocol", "Evaluation protocol", kv_table(ctx["protocol"], table_id="protocol-table")))
    # No commit hash or time on the page: the same inputs must give the same bytes (a DVC output);
    # the commit that produced it is the one whose dvc.lock records its hash.
    parts.append("<p class='sub'>Generated by <code>python -m pipeline report</code>; dvc.lock records the "
                 "inputs and the hash of this page.</p>")
    parts.append("</body></html>")
    return "".join(p for p in parts if p)
