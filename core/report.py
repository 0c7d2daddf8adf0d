"""The job report: `report.json` content and a self-contained `report.html` with inline SVG plots.

Pure data in, data out (plus one file write in `write_report_html`); no torch needed here.
"""
from __future__ import annotations

import html
import json
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# Measured latency is noisy: a latency target counts as met within this relative slack.
LATENCY_TOLERANCE = 0.05
_UNITS = {"flops": "FLOPs", "params": "parameters", "latency": "ms"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers in a report."""
    out: dict[str, str | None] = {"hawada": _version("hawada"), "python": platform.python_version()}
    try:
        import torch
        import torchvision
        out["torch"], out["torchvision"] = torch.__version__, torchvision.__version__
    except ImportError:  # pragma: no cover - the engine always has torch
        out["torch"] = out["torchvision"] = None
    return out


def latency_dict(stats: Any) -> dict[str, Any] | None:
    """A LatencyStats (or a dict of its fields) as a plain dict; None stays None."""
    if stats is None:
        return None
    if isinstance(stats, Mapping):
        return dict(stats)
    fields = ("median_ms", "p10_ms", "p90_ms", "device", "batch_size", "dtype", "channels_last",
              "repeats")
    return {f: getattr(stats, f) for f in fields if hasattr(stats, f)}


def model_block(*, params: int, flops: int, accuracy: float | None, latency: Any) -> dict[str, Any]:
    """One `baseline` / `pruned` block of the report."""
    lat = latency_dict(latency)
    return {"params": int(params), "flops": int(flops),
            "latency_ms": None if lat is None else float(lat["median_ms"]),
            "latency": lat, "accuracy": None if accuracy is None else float(accuracy)}


def target_block(metric: str, *, baseline_value: float, ratio: float | None = None,
                 latency_ms: float | None = None) -> dict[str, Any]:
    """Target in both forms: the ratio of baseline and the absolute value in the metric's unit."""
    if ratio is None:
        if latency_ms is None:
            raise ValueError("a target needs ratio or latency_ms")
        ratio = float(latency_ms) / float(baseline_value)
        value = float(latency_ms)
    else:
        value = float(ratio) * float(baseline_value)
    return {"metric": metric, "ratio": float(ratio), "latency_ms": latency_ms, "value": value,
            "unit": _UNITS.get(metric, metric),
            "tolerance": LATENCY_TOLERANCE if metric == "latency" else 0.0}


def _achieved(metric: str, pruned: Mapping[str, Any]) -> float | None:
    return {"flops": pruned["flops"], "params": pruned["params"],
            "latency": pruned["latency_ms"]}.get(metric)


def judge_target(target: Mapping[str, Any], baseline: Mapping[str, Any],
                 pruned: Mapping[str, Any], hint: str | None = None) -> tuple[bool, str | None]:
    """(met, reason): met when the pruned model's measured metric <= value * (1 + tolerance)."""
    metric = target["metric"]
    got = _achieved(metric, pruned)
    if got is None:
        return False, f"the pruned model's {metric} was not measured"
    limit = target["value"] * (1.0 + target["tolerance"])
    if got <= limit:
        return True, None
    base = _achieved(metric, baseline) or float("nan")
    reason = (f"pruned {metric} {got:.6g} {target['unit']} exceeds the target "
              f"{target['value']:.6g} ({got / base:.3f} of baseline vs {target['ratio']:.3f})")
    if hint:
        reason += f": {hint}"
    return False, reason


def speedup_block(baseline: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, float | None]:
    """Measured speed-up next to the FLOPs-ideal one; `ratio` = measured / ideal."""
    ideal = baseline["flops"] / pruned["flops"] if pruned["flops"] else None
    b, p = baseline.get("latency_ms"), pruned.get("latency_ms")
    measured = b / p if b and p else None
    return {"measured": measured, "flops_ideal": ideal,
            "ratio": measured / ideal if measured and ideal else None}


def build_report(*, recipe: Mapping[str, Any], baseline: Mapping[str, Any],
                 pruned: Mapping[str, Any], target: Mapping[str, Any],
                 history: Sequence[Mapping[str, Any]], layers: Sequence[Mapping[str, Any]],
                 weights_mapping: Mapping[str, Any] | None, data: Mapping[str, Any],
                 phases: Mapping[str, float], device: str, lut: Mapping[str, Any] | None = None,
                 finetune_history: Sequence[Mapping[str, Any]] = (),
                 target_hint: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble report.json: blocks from `model_block`, target from `target_block`.

    `layers` rows are {name, modules, before, after, kept}; `target_hint` explains a missed
    target (e.g. every group already at its floor) and is appended to `target_reason`.
    """
    met, reason = judge_target(target, baseline, pruned, target_hint)
    report: dict[str, Any] = {
        "baseline": dict(baseline), "pruned": dict(pruned), "target": dict(target),
        "target_met": met, "target_reason": reason,
        "speedup": speedup_block(baseline, pruned),
        "history": [dict(r) for r in history],
        "finetune_history": [dict(r) for r in finetune_history],
        "layers": [dict(r) for r in layers],
        "weights_mapping": None if weights_mapping is None else dict(weights_mapping),
        "data": dict(data), "phases": {k: round(float(v), 4) for k, v in phases.items()},
        "device": device, "versions": versions(), "recipe": dict(recipe),
        "lut": None if lut is None else dict(lut),
    }
    if extra:
        report.update(extra)
    return report


# ---------------------------------------------------------------------------------------- HTML

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
    return (f'<text x="{x}" y="{y}" text-anchor="{anchor}" font-size="{size}">'
            f"{html.escape(text)}</text>")


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
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
         f'aria-label="{html.escape(title)}">'),
        (f'<rect x="{_PAD}" y="{_PAD / 2}" width="{inner_w}" height="{inner_h}" fill="none" '
         'stroke="#ccc"/>'),
        _svg_text(_PAD - 4, _PAD / 2 + 10, f"{y1:.3g}", anchor="end"),
        _svg_text(_PAD - 4, _H - _PAD, f"{y0:.3g}", anchor="end"),
        _svg_text(_PAD, _H - _PAD + 14, f"{x0:g}"),
        _svg_text(_W - _PAD / 2, _H - _PAD + 14, f"{x1:g}", anchor="end"),
    ]
    for i, (name, ys) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys) if y is not None)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{_PAD + 6 + 110 * i}" y="{_H - 6}" font-size="11" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>"


def _width_bars(layers: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars per coupling group: full width grey, kept width blue."""
    if not layers:
        return ""
    widest = max(int(r["before"]) for r in layers) or 1
    row_h, label_w, bar_w = 16, 180, 320
    height = row_h * len(layers) + 10
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 80}" '
              f'height="{height}" role="img" aria-label="channels per group">')]
    for i, r in enumerate(layers):
        y = 5 + i * row_h
        before, after = int(r["before"]), int(r["after"])
        parts.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end" font-size="11">'
                     f'{html.escape(str(r["name"]))}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bar_w * before / widest:.1f}" '
                     f'height="{row_h - 4}" fill="#ddd"/>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bar_w * after / widest:.1f}" '
                     f'height="{row_h - 4}" fill="{_COLOURS[0]}"/>')
        parts.append(f'<text x="{label_w + bar_w * before / widest + 4:.1f}" y="{y + 11}" '
                     f'font-size="10">{after}/{before}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(report: Mapping[str, Any]) -> str:
    b, p = report["baseline"], report["pruned"]
    rows = [("accuracy (held-out top-1)", b.get("accuracy"), p.get("accuracy")),
            ("parameters", b.get("params"), p.get("params")),
            ("FLOPs (batch 1)", b.get("flops"), p.get("flops")),
            ("latency median ms", b.get("latency_ms"), p.get("latency_ms"))]
    body = "".join(f"<tr><th>{html.escape(n)}</th><td>{_fmt(x)}</td><td>{_fmt(y)}</td>"
                   f"<td>{_fmt(y / x) if isinstance(x, (int, float)) and x and y is not None else '–'}"
                   "</td></tr>" for n, x, y in rows)
    return ("<table><tr><th></th><th>baseline</th><th>pruned</th><th>pruned / baseline</th></tr>"
            f"{body}</table>")


def render_report_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML page with no external assets."""
    hist = report.get("history") or []
    xs = [float(r["step"]) for r in hist]

    def col(key: str) -> list[Any]:
        return [r.get(key) for r in hist]

    t = report["target"]
    met = report.get("target_met")
    verdict = ("target met" if met else f"target missed: {report.get('target_reason') or ''}")
    sp = report.get("speedup") or {}
    phases = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.2f} s</td></tr>"
                     for k, v in (report.get("phases") or {}).items())
    lat = (report.get("pruned") or {}).get("latency") or {}
    plots = "".join([
        _line_plot("loss", xs, {"loss": col("loss"), "kd": col("kd")}),
        _line_plot("cost ratio vs target", xs, {"cost ratio": col("cost_ratio"),
                                                "target": col("target")}),
        _line_plot("multiplier", xs, {"multiplier": col("multiplier")}),
        _line_plot("temperature", xs, {"temperature": col("temperature")}),
    ])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>HawAda report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{text-align:left;background:#f6f6f6}}figure{{display:inline-block;margin:0.5em}}
.ok{{color:#2ca02c}}.bad{{color:#d62728}}
</style></head><body>
<h1>HawAda compression report</h1>
<p>Target: {html.escape(t['metric'])} &le; {_fmt(t['value'])} {html.escape(t.get('unit', ''))}
(ratio {_fmt(t['ratio'])} of baseline) &mdash;
<strong class="{'ok' if met else 'bad'}">{html.escape(verdict)}</strong></p>
<p>Device {html.escape(str(report.get('device')))}; latency at batch {_fmt(lat.get('batch_size'))},
{html.escape(str(lat.get('dtype')))}. Speed-up measured {_fmt(sp.get('measured'))},
FLOPs-ideal {_fmt(sp.get('flops_ideal'))}.</p>
{_table(report)}
<h2>Gate training</h2>{plots}
<h2>Channels per coupling group</h2>{_width_bars(report.get('layers') or [])}
<h2>Phases</h2><table>{phases}</table>
<h2>Recipe</h2><pre>{html.escape(json.dumps(report.get('recipe'), indent=2, default=str))}</pre>
</body></html>
"""


def write_report_html(report: Mapping[str, Any], path: Path | str) -> None:
    """Write `render_report_html(report)` to `path` atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_report_html(report), encoding="utf-8")
    os.replace(tmp, path)
