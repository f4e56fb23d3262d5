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
figure { margin: 0; background: white; border: 1px solid #dde2ea; padding: 8px; }
figcaption { font-size: 13px; color: #5b6475; margin-top: 6px; max-width: 520px; }
img { max-width: 100%; height: auto; } img.px { image-rendering: pixelated; }
.note { background: #fff7e0; border: 1px solid #f0d890; padding: 8px 12px; font-size: 14px; }
code { background: #eef1f6; padding: 1px 4px; }
"""


def img_tag(path: Path, *, alt: str, width: int | None = None, pixelated: bool = True) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
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
    head = "<tr><th>metric</th><th>value</th><th>uncertainty</th>" + ("<th>change vs previous commit</th>" if have_previous else "") + "</tr>"
    body = []
    for r in rows:
        cells = f"<td>{html.escape(r['label'])}</td><td class='num'>{_fmt(r['value'])}</td><td>{html.escape(r['uncertainty'])}</td>"
        if have_previous:
            d = r["delta"]
            if d is None:
                cells += "<td>new</td>"
            elif abs(d) < 1e-12:
                cells += "<td class='num'>unchanged</td>"
            else:
                good = (d < 0) if r["better"] == "lower" else (d > 0)
                cells += f"<td class='num {'better' if good else 'worse'}'>{d:+.4g}</td>"
        body.append(f"<tr>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def kv_table(items: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items) + "</table>"


def render(ctx: dict[str, Any]) -> str:
    """Build the page from a context dict assembled by the report stage."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(ctx['title'])}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(ctx['title'])}</h1><p class='sub'>{html.escape(ctx['subtitle'])}</p>"]
    parts.append("<h2>Metrics</h2>")
    parts.append(metrics_table(ctx["metric_rows"], ctx["have_previous"]))
    if ctx.get("inception_note"):
        parts.append(f"<p class='note'>{html.escape(ctx['inception_note'])}</p>")
    parts.append(kv_table(ctx["protocol"]))
    parts.append("<h2>Real vs generated</h2><div class='row'>")
    parts.append(figure(ctx["figures"].get("real"), "Real test images"))
    parts.append(figure(ctx["figures"].get("samples"), "Generated (best checkpoint, EMA, fixed latent seeds)"))
    parts.append("</div>")
    if ctx.get("timeline"):
        parts.append("<h2>Fixed-seed samples over training</h2><div class='row'>")
        for step, path in ctx["timeline"]:
            parts.append(figure(path, f"step {step}", width=200))
        parts.append("</div>")
    parts.append("<h2>Training curves</h2>")
    parts.append(figure(ctx["figures"].get("curves"), "Losses, discriminator outputs and the in-loop evaluator score",
                        pixelated=False))
    parts.append("<h2>Latent interpolation</h2>")
    parts.append(figure(ctx["figures"].get("interpolation"), "Each row walks the latent sphere (slerp) between two fixed latents"))
    if ctx["figures"].get("reconstructions"):
        parts.append("<h2>VAE reconstructions</h2>")
        parts.append(figure(ctx["figures"]["reconstructions"], "Top of each pair: real test image; below: its reconstruction"))
    parts.append("<h2>Nearest training images (memorisation check)</h2>")
    parts.append(figure(ctx["figures"].get("nearest"),
                        "Generated samples closest to a training image (top) and that training image (below), "
                        "in evaluator feature space"))
    parts.append(kv_table(ctx["memorisation"]))
    parts.append("<h2>Data cleaning</h2>")
    parts.append(kv_table(ctx["cleaning"]))
    parts.append(f"<p class='sub'>Generated by <code>python -m pipeline report</code> at commit {html.escape(ctx['commit'])}.</p>")
    parts.append("</body></html>")
    return "".join(p for p in parts if p)
