"""`report.html`: a report as one self-contained page with inline SVG plots (no assets).

Reads only the `report.json` content (`core.report.build_report`); no torch.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hawada.atomic import atomic_write

_W, _H, _PAD = 420, 200, 40
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _svg_text(x: float, y: float, text: str, anchor: str = "start", size: int = 10) -> str:
    return (
        f'<text x="{x}" y="{y}" text-anchor="{anchor}" font-size="{size}">'
        f"{html.escape(text)}</text>"
    )


def _line_plot(title: str, xs: Sequence[float], series: Mapping[str, Sequence[float]]) -> str:
    """One SVG chart with a polyline per series; axes labelled with min/max."""
    pts = [v for ys in series.values() for v in ys if v is not None]
    if not xs or not pts:
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(pts), max(pts)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x1 = x0 + 1

    def sx(x: float) -> float:
        return _PAD + (x - x0) / (x1 - x0) * (_W - 1.5 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD + (y0 - y) / (y1 - y0) * (_H - 1.5 * _PAD)

    inner_w, inner_h = _W - 1.5 * _PAD, _H - 1.5 * _PAD
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
            f'aria-label="{html.escape(title)}">'
        ),
        (
            f'<rect x="{_PAD}" y="{_PAD / 2}" width="{inner_w}" height="{inner_h}" fill="none" '
            'stroke="#ccc"/>'
        ),
        _svg_text(_PAD - 4, _PAD / 2 + 10, f"{y1:.3g}", anchor="end"),
        _svg_text(_PAD - 4, _H - _PAD, f"{y0:.3g}", anchor="end"),
        _svg_text(_PAD, _H - _PAD + 14, f"{x0:g}"),
        _svg_text(_W - _PAD / 2, _H - _PAD + 14, f"{x1:g}", anchor="end"),
    ]
    for i, (name, ys) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'
        )
        parts.append(
            f'<text x="{_PAD + 6 + 110 * i}" y="{_H - 6}" font-size="11" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>"


def _width_bars(layers: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars per coupling group: full width grey, kept width blue."""
    if not layers:
        return ""
    widest = max(int(r["before"]) for r in layers) or 1
    row_h, label_w, bar_w = 16, 180, 320
    height = row_h * len(layers) + 10
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 80}" '
            f'height="{height}" role="img" aria-label="channels per group">'
        )
    ]
    for i, r in enumerate(layers):
        y = 5 + i * row_h
        before, after = int(r["before"]), int(r["after"])
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end" font-size="11">'
            f"{html.escape(str(r['name']))}</text>"
        )
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{bar_w * before / widest:.1f}" '
            f'height="{row_h - 4}" fill="#ddd"/>'
        )
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{bar_w * after / widest:.1f}" '
            f'height="{row_h - 4}" fill="{_COLOURS[0]}"/>'
        )
        parts.append(
            f'<text x="{label_w + bar_w * before / widest + 4:.1f}" y="{y + 11}" '
            f'font-size="10">{after}/{before}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(report: Mapping[str, Any]) -> str:
    b, p = report["baseline"], report["pruned"]
    rows = [
        ("accuracy (held-out top-1)", b.get("accuracy"), p.get("accuracy")),
        ("parameters", b.get("params"), p.get("params")),
        ("FLOPs (batch 1)", b.get("flops"), p.get("flops")),
        ("latency median ms", b.get("latency_ms"), p.get("latency_ms")),
    ]
    body = "".join(
        f"<tr><th>{html.escape(n)}</th><td>{_fmt(x)}</td><td>{_fmt(y)}</td>"
        f"<td>{_fmt(y / x) if isinstance(x, (int, float)) and x and y is not None else '–'}"
        "</td></tr>"
        for n, x, y in rows
    )
    return (
        "<table><tr><th></th><th>baseline</th><th>pruned</th><th>pruned / baseline</th></tr>"
        f"{body}</table>"
    )


def render_report_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML page with no external assets."""
    hist = report.get("history") or []
    xs = [float(r["step"]) for r in hist]

    def col(key: str) -> list[Any]:
        return [r.get(key) for r in hist]

    t = report["target"]
    met = report.get("target_met")
    verdict = "target met" if met else f"target missed: {report.get('target_reason') or ''}"
    sp = report.get("speedup") or {}
    phases = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v:.2f} s</td></tr>"
        for k, v in (report.get("phases") or {}).items()
    )
    lat = (report.get("pruned") or {}).get("latency") or {}
    plots = "".join(
        [
            _line_plot("loss", xs, {"loss": col("loss"), "kd": col("kd")}),
            _line_plot(
                "cost ratio vs target",
                xs,
                {"cost ratio": col("cost_ratio"), "target": col("target")},
            ),
            _line_plot("multiplier", xs, {"multiplier": col("multiplier")}),
            _line_plot("temperature", xs, {"temperature": col("temperature")}),
        ]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>HawAda report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{text-align:left;background:#f6f6f6}}figure{{display:inline-block;margin:0.5em}}
.ok{{color:#2ca02c}}.bad{{color:#d62728}}
</style></head><body>
<h1>HawAda compression report</h1>
<p>Target: {html.escape(t["metric"])} &le; {_fmt(t["value"])} {html.escape(t.get("unit", ""))}
(ratio {_fmt(t["ratio"])} of baseline) &mdash;
<strong class="{"ok" if met else "bad"}">{html.escape(verdict)}</strong></p>
<p>Device {html.escape(str(report.get("device")))}; latency at batch {_fmt(lat.get("batch_size"))},
{html.escape(str(lat.get("dtype")))}. Speed-up measured {_fmt(sp.get("measured"))},
FLOPs-ideal {_fmt(sp.get("flops_ideal"))}.</p>
{_table(report)}
<h2>Gate training</h2>{plots}
<h2>Channels per coupling group</h2>{_width_bars(report.get("layers") or [])}
<h2>Phases</h2><table>{phases}</table>
<h2>Recipe</h2><pre>{html.escape(json.dumps(report.get("recipe"), indent=2, default=str))}</pre>
</body></html>
"""


def write_report_html(report: Mapping[str, Any], path: Path | str) -> None:
    """Write `render_report_html(report)` to `path` atomically (temporary name, then rename)."""
    page = render_report_html(report)
    atomic_write(Path(path), lambda tmp: tmp.write_text(page, encoding="utf-8"))
