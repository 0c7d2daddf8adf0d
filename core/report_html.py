"""`report.html`: a report as one self-contained page (inline SVG plots, no scripts, no assets).

Reads only the `report.json` content (`core.report.build_report`); no torch. Plots are drawn
with matplotlib (its object API, no pyplot state) into inline SVG. Every block tolerates
fields that older reports lack: a missing field leaves its cell or plot out, never an error.
Laid out for a 1280 px wide window: a summary table, the warnings, two plots per row, the
per-layer table, and the recipe folded away in a ``<details>``.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hawada.atomic import atomic_write
from hawada.core.report_checks import (
    accuracy_stderr,
    heldout_size,
    latency_spread,
    merge_warnings,
)

_BLUE, _RED, _GREEN, _ORANGE, _GREY = "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#bbbbbb"

_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)

Axes = Any  # matplotlib.axes.Axes (imported lazily: matplotlib is only needed to render)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _si(value: Any) -> str:
    """1234567 -> ``1.23 M``; None -> ``–``."""
    v = _num(value)
    if v is None:
        return "–"
    for scale, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.4g}"


def _pct(value: Any, digits: int = 1) -> str:
    v = _num(value)
    return "–" if v is None else f"{100 * v:.{digits}f}%"


# -- plots --------------------------------------------------------------------------------------
def _svg(draw: Callable[[Any], None], size: tuple[float, float], label: str) -> str:
    """Run ``draw(figure)`` on a fresh matplotlib figure and return it as inline ``<svg>``."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(
        {
            "svg.fonttype": "none",  # text stays text: small, sharp and searchable
            "svg.hashsalt": "hawada",  # stable element ids: the same report, the same page
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
        }
    ):
        fig = Figure(figsize=size, dpi=100, layout="constrained")
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: inline in HTML
    text = _METADATA.sub("", text)  # RDF boilerplate (creator, format) that only adds bytes
    # The HTML parser puts xlink:href in its namespace by itself; inline SVG needs no declaration.
    text = text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "", 1)
    return text.replace("<svg ", f'<svg role="img" aria-label="{_esc(label)}" ', 1)


def _figure(title: str, svg: str, note: str = "", wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    caption = f"<figcaption>{_esc(title)}{f' — {_esc(note)}' if note else ''}</figcaption>"
    return f"<figure{cls}>{svg}{caption}</figure>"


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _num(row.get(key))
        if y is not None:
            xs.append(_num(row.get("step")) or float(i))
            ys.append(y)
    return xs, ys


def _line_plot(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    lines: Sequence[tuple[str, str, str]],
    ylabel: str,
    xlabel: str = "step",
    logy: bool = False,
) -> str:
    """One plot of ``lines`` = [(key, legend, colour)] against the rows' step; '' when no data."""
    data = [(label, colour, *_series(rows, key)) for key, label, colour in lines]
    data = [d for d in data if d[2]]
    if not data:
        return ""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for label, colour, xs, ys in data:
            dashed = label.startswith("target")
            ax.plot(xs, ys, label=label, color=colour, lw=1.6, ls="--" if dashed else "-")
        if logy and all(y > 0 for d in data for y in d[3]):
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if len(data) > 1:
            ax.legend(frameon=False)

    return _figure(title, _svg(draw, (6.0, 3.3), title))


def _latency_plot(report: Mapping[str, Any]) -> str:
    """Median latency with its p10-p90 range, baseline vs pruned."""
    rows = []
    for name, colour in (("baseline", _GREY), ("pruned", _BLUE)):
        lat = (report.get(name) or {}).get("latency")
        if isinstance(lat, Mapping) and _num(lat.get("median_ms")) is not None:
            rows.append((name, colour, lat))
    if not rows:
        return ""
    unit = rows[0][2]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for i, (_name, colour, lat) in enumerate(rows):
            med = float(lat["median_ms"])
            lo, hi = _num(lat.get("p10_ms")) or med, _num(lat.get("p90_ms")) or med
            ax.barh(i, med, color=colour, height=0.55)
            ax.errorbar(med, i, xerr=[[med - lo], [hi - med]], color="#222", capsize=5)
            ax.text(hi, i, f"  {med:.3g} ms ({lo:.3g}-{hi:.3g})", va="center")
        ax.set_yticks(range(len(rows)), [r[0] for r in rows])
        ax.set_xlabel(f"ms per batch of {unit.get('batch_size')} ({unit.get('dtype')})")
        ax.set_title("Latency: median, bar p10-p90")
        ax.set_xlim(0, max(_num(r[2].get("p90_ms")) or r[2]["median_ms"] for r in rows) * 1.6)
        ax.grid(axis="y", visible=False)

    return _figure(
        "Latency, baseline and pruned timed interleaved",
        _svg(draw, (6.0, 2.4), "latency"),
        note=str(unit.get("device") or ""),
    )


def layer_label(row: Mapping[str, Any]) -> str:
    """A coupling group named by the layers it covers: ``layer1.0: conv1, bn1``;
    a group over many layers: ``conv1, bn1, layer1.0.conv2 +3``."""
    modules = [str(m) for m in row.get("modules") or []]
    if not modules:
        return str(row.get("name", "?"))
    if len(modules) == 1:
        return modules[0]
    parts = [m.split(".") for m in modules]
    prefix: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1 or len(prefix) >= min(len(p) for p in parts) - 1:
            break
        prefix.append(level[0])
    if prefix:
        tails = [".".join(p[len(prefix) :]) for p in parts]
        shown = ", ".join(tails[:4]) + (f" +{len(tails) - 4}" if len(tails) > 4 else "")
        return f"{'.'.join(prefix)}: {shown}"
    shown = ", ".join(modules[:3])
    return shown + (f" +{len(modules) - 3}" if len(modules) > 3 else "")


def _channels_plot(layers: Sequence[Mapping[str, Any]]) -> str:
    rows = [r for r in layers if _num(r.get("before")) is not None]
    if not rows:
        return ""
    labels = [layer_label(r) for r in rows]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        ys = list(range(len(rows)))[::-1]
        before = [float(r["before"]) for r in rows]
        after = [float(r.get("after") or 0) for r in rows]
        ax.barh(ys, before, color="#dddddd", height=0.8, label="before")
        if any(_num(r.get("trained")) is not None for r in rows):
            trained = [float(r.get("trained") or 0) for r in rows]
            ax.scatter(trained, ys, marker="|", s=120, color=_ORANGE, label="trained", zorder=3)
        ax.barh(ys, after, color=_BLUE, height=0.5, label="after")
        for y, b, a in zip(ys, before, after, strict=True):
            ax.text(b, y, f" {a:.0f}/{b:.0f}", va="center", fontsize=8)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_xlabel("output channels")
        ax.set_title("Channels per layer group: kept (blue) of the original (grey)")
        ax.set_xlim(0, max(before) * 1.15)
        ax.grid(axis="y", visible=False)
        ax.legend(frameon=False, loc="upper right")

    height = 1.2 + 0.24 * len(rows)
    return _figure("Channels per layer group", _svg(draw, (12.0, height), "channels"), wide=True)


# -- tables -------------------------------------------------------------------------------------
def _latency_cell(block: Mapping[str, Any]) -> str:
    lat = block.get("latency")
    med = _num(block.get("latency_ms"))
    if med is None:
        return "–"
    if not isinstance(lat, Mapping) or _num(lat.get("p10_ms")) is None:
        return f"{med:.4g} ms"
    return (
        f"{med:.4g} ms <span class=dim>(p10-p90 {float(lat['p10_ms']):.3g}-"
        f"{float(lat['p90_ms']):.3g})</span>"
    )


def _summary_table(report: Mapping[str, Any]) -> str:
    b, p = report.get("baseline") or {}, report.get("pruned") or {}
    n = heldout_size(report)
    heldout = _block(report, "heldout")

    def acc(block: Mapping[str, Any]) -> str:
        a = _num(block.get("accuracy"))
        if a is None:
            return "– <span class=dim>(no labels)</span>"
        # report.json's heldout block: `stderr` is the pruned model's, `stderr_baseline` the
        # baseline's; older reports have neither (computed here from the sample count).
        se = _num(heldout.get("stderr_baseline" if block is b else "stderr"))
        se = accuracy_stderr(a, n) if se is None else se
        return f"{_pct(a)}" + (f" <span class=dim>± {_pct(se)}</span>" if se else "")

    def ratio(key: str) -> str:
        x, y = _num(b.get(key)), _num(p.get(key))
        return f"{y / x:.3f}" if x and y is not None else "–"

    rows = [
        ("held-out accuracy (top-1 ± standard error)", acc(b), acc(p), _delta(b, p)),
        ("parameters", _si(b.get("params")), _si(p.get("params")), ratio("params")),
        ("FLOPs (batch 1)", _si(b.get("flops")), _si(p.get("flops")), ratio("flops")),
    ]
    if "macs" in b or "macs" in p:
        rows.append(("MACs (batch 1)", _si(b.get("macs")), _si(p.get("macs")), ratio("macs")))
    rows.append(("latency (median)", _latency_cell(b), _latency_cell(p), ratio("latency_ms")))
    known = {"params", "flops", "macs", "latency_ms", "latency", "accuracy", "latency_profiling"}
    for key in sorted(set(b) | set(p)):  # fields later reports add (e.g. hard-gated accuracy)
        if key not in known and (_num(b.get(key)) is not None or _num(p.get(key)) is not None):
            fmt = _pct if "acc" in key else _si
            rows.append((key.replace("_", " "), fmt(b.get(key)), fmt(p.get(key)), ratio(key)))
    body = "".join(
        f"<tr><th>{_esc(name)}</th><td>{x}</td><td>{y}</td><td>{r}</td></tr>"
        for name, x, y, r in rows
    )
    return (
        "<table class=summary><tr><th></th><th>baseline</th><th>pruned</th>"
        f"<th>pruned / baseline</th></tr>{body}</table>"
    )


def _delta(b: Mapping[str, Any], p: Mapping[str, Any]) -> str:
    x, y = _num(b.get("accuracy")), _num(p.get("accuracy"))
    return "–" if x is None or y is None else f"{100 * (y - x):+.1f} points"


def _costs_by_group(
    report: Mapping[str, Any], row: Mapping[str, Any], which: str
) -> tuple[float, float, float, float] | None:
    """(flops, flops share, ms, ms share) of one layer group in the baseline or pruned model."""
    costs = (report.get("layer_costs") or {}).get(which)
    if not isinstance(costs, Mapping) or not costs:
        return None
    total_f = sum(float(c.get("flops", 0)) for c in costs.values()) or 1.0
    total_t = sum(float(c.get("ms", 0)) for c in costs.values()) or 1.0
    mods = [costs[m] for m in row.get("modules") or [] if m in costs]
    f = sum(float(c.get("flops", 0)) for c in mods)
    t = sum(float(c.get("ms", 0)) for c in mods)
    return f, f / total_f, t, t / total_t


def _layer_table(report: Mapping[str, Any]) -> str:
    layers = [r for r in report.get("layers") or [] if isinstance(r, Mapping)]
    if not layers:
        return "<p>No per-layer data in this report.</p>"
    has_trained = any("trained" in r for r in layers)
    has_costs = isinstance(report.get("layer_costs"), Mapping)
    head = ["layer group", "layers (output channels)", "before"]
    head += ["trained"] if has_trained else []
    head += ["after", "kept"]
    if has_costs:
        head += ["FLOPs before", "FLOPs after", "time before", "time after"]
    out = ["<table class=layers><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in layers:
        before, after = _num(r.get("before")), _num(r.get("after"))
        cells = [
            f"<td class=name>{_esc(r.get('name'))}</td>",
            f"<td class=mods>{_esc(', '.join(map(str, r.get('modules') or [])))}</td>",
            f"<td>{_si(before)}</td>",
        ]
        if has_trained:
            cells.append(f"<td>{_si(r.get('trained'))}</td>")
        kept = _pct(after / before, 0) if before and after is not None else "–"
        cells += [f"<td>{_si(after)}</td>", f"<td>{kept}</td>"]
        if has_costs:
            for which in ("baseline", "pruned"):
                c = _costs_by_group(report, r, which)
                cells.append(
                    f"<td>{_si(c[0])} <span class=dim>{_pct(c[1])}</span></td>"
                    if c
                    else "<td>–</td>"
                )
            for which in ("baseline", "pruned"):
                c = _costs_by_group(report, r, which)
                cells.append(
                    f"<td>{c[2]:.3g} ms <span class=dim>{_pct(c[3])}</span></td>"
                    if c
                    else "<td>–</td>"
                )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    note = (
        "<p class=dim>FLOPs and time of the layers each group covers, with their share of the "
        "model's total (time: per-layer forward time measured with hooks at the latency batch "
        "size; shares, not a latency).</p>"
        if has_costs
        else ""
    )
    return "".join(out) + note


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td class=left>{_esc(_plain(v))}</td></tr>"
        for k, v in items.items()
    )
    return f"<table>{rows}</table>"


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


# -- the page -----------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#222;
  background:#fff;line-height:1.4}
main{max-width:1240px;margin:0 auto;padding:16px 20px}
h1{font-size:1.6em;margin:0.2em 0}h2{font-size:1.25em;margin:1.4em 0 0.4em;
  border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.92em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}
th{text-align:left;background:#f6f6f6;font-weight:600}td.left,td.name,td.mods{text-align:left}
td.mods{font-size:0.85em;color:#444;max-width:360px;overflow-wrap:anywhere}
table.summary td{min-width:150px}
.dim{color:#777;font-size:0.9em}
.verdict{font-size:1.1em;padding:8px 12px;border-radius:4px;margin:0.6em 0}
.ok{background:#e8f5e9;color:#1b5e20}.bad{background:#ffebee;color:#b71c1c}
.warn{background:#fff8e1;border-left:4px solid #f9a825;padding:8px 12px;margin:0.6em 0}
.warn b{color:#8d6e00}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:12px}
figure{margin:0;border:1px solid #eee;padding:6px;min-width:0}
figure.wide{grid-column:1 / -1}
figure svg{width:100%;height:auto;display:block}
figcaption{font-size:0.85em;color:#555;margin-top:4px}
details{margin:0.8em 0}summary{cursor:pointer;font-weight:600}
pre{background:#f6f6f6;padding:10px;overflow-x:auto;font-size:0.85em}
"""


def _block(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``report[key]`` when it is a mapping, else an empty one (older or partial reports)."""
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def _facts(report: Mapping[str, Any]) -> list[str]:
    """The summary's bullet points: held-out size, speed-up, latency spread."""
    heldout, data, sp = _block(report, "heldout"), _block(report, "data"), _block(report, "speedup")
    source = heldout.get("source") or data.get("source") or "?"
    fingerprint = heldout.get("fingerprint")
    facts = [
        f"held-out accuracy on <b>{_si(heldout_size(report))}</b> samples ({_esc(source)}"
        + (f", fingerprint {_esc(str(fingerprint)[:12])}" if fingerprint else "")
        + ") the gates never trained on",
    ]
    measured, ideal = _num(sp.get("measured")), _num(sp.get("flops_ideal"))
    if measured is not None:
        facts.append(
            f"speed-up <b>{measured:.2f}x</b> measured"
            + (f", {ideal:.2f}x FLOPs-ideal" if ideal else "")
        )
    corr = _block(report, "correction")
    if corr:
        before, after = _num(corr.get("accuracy_before")), _num(corr.get("accuracy_after"))
        trained, fitted = (
            _num(corr.get(k)) or 0.0 for k in ("cost_ratio_trained", "cost_ratio_after")
        )
        line = (
            f"budget correction after training: cost ratio {trained:.3f} → {fitted:.3f}, "
            f"{_si(corr.get('closed_channels'))} channels closed"
        )
        if before is not None and after is not None:
            line += (
                f"; hard-gated held-out accuracy {_pct(before)} → {_pct(after)} "
                f"({100 * (after - before):+.1f} points)"
            )
        facts.append(_esc(line))
    spreads = {k: latency_spread(_block(report, k)) for k in ("baseline", "pruned")}
    shown = [f"{k} {_pct(v, 0)}" for k, v in spreads.items() if v is not None]
    if shown:
        facts.append("latency spread (p90-p10)/median: " + ", ".join(shown))
    return facts


_LOSSES = (
    ("loss", "total loss", _BLUE),
    ("kd", "distillation (KD)", _ORANGE),
    ("ce", "cross-entropy", _GREEN),
)


def _plots(report: Mapping[str, Any]) -> list[str]:
    hist = [r for r in report.get("history") or [] if isinstance(r, Mapping)]
    ft = [r for r in report.get("finetune_history") or [] if isinstance(r, Mapping)]
    cost = [("cost_ratio", "expected cost / baseline", _BLUE), ("target", "target", _RED)]
    plots = [
        _line_plot("Gate training: loss", hist, _LOSSES, "loss"),
        _line_plot("Gate training: cost vs target", hist, cost, "cost ratio"),
        _line_plot(
            "Gate training: Lagrange multiplier", hist, [("multiplier", "", _BLUE)], "multiplier"
        ),
        _line_plot(
            "Gate training: temperature", hist, [("temperature", "", _BLUE)], "gate temperature"
        ),
    ]
    if ft:
        plots += [
            _line_plot("Fine-tuning: loss", ft, _LOSSES, "loss"),
            _line_plot("Fine-tuning: learning rate", ft, [("lr", "", _BLUE)], "learning rate"),
        ]
    else:
        plots.append("<p class=dim>No fine-tuning (finetune.epochs 0).</p>")
    layers = [r for r in report.get("layers") or [] if isinstance(r, Mapping)]
    return [*plots, _latency_plot(report), _channels_plot(layers)]


def _folded(title: str, value: Any) -> str:
    text = _esc(json.dumps(value, indent=2, default=str))
    return f"<details><summary>{_esc(title)}</summary><pre>{text}</pre></details>"


def render_report_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML page with no external assets and no scripts."""
    recipe = _block(report, "recipe")
    model, target = _block(recipe, "model"), _block(report, "target")
    goal = (
        f"{_esc(target.get('metric'))} &le; {_si(target.get('value'))} "
        f"{_esc(target.get('unit', ''))} ({_num(target.get('ratio')) or 0:.3g} of the baseline)"
    )
    verdict = (
        f"<div class='verdict ok'>Target met: {goal}</div>"
        if report.get("target_met")
        else f"<div class='verdict bad'>Target missed: {goal}. "
        f"{_esc(report.get('target_reason') or '')}</div>"
    )
    warnings = "".join(
        f"<div class=warn><b>{_esc(w['code'].replace('_', ' '))}</b>: {_esc(w['message'])}</div>"
        for w in merge_warnings(report)
    )
    phases = {k: f"{float(v):.1f} s" for k, v in _block(report, "phases").items() if _num(v)}
    data = _block(report, "data")
    method = report.get("method") or recipe.get("method") or "gates"
    title = f"{model.get('arch', 'model')} · {method}"
    size = "x".join(map(str, model.get("input_size") or []))
    details = {k: report.get(k) for k in ("versions", "weights_mapping", "budget", "lut")}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>HawAda report: {_esc(title)}</title>
<style>{_CSS}</style></head><body><main>
<h1>HawAda compression report</h1>
<p class=dim>{_esc(title)} · {_esc(model.get("num_classes", "?"))} classes · input
{_esc(size)} · device {_esc(report.get("device"))}</p>
{verdict}
{warnings}
{_summary_table(report)}
<ul>{"".join(f"<li>{f}</li>" for f in _facts(report))}</ul>
<h2>Plots</h2>
<div class=plots>{"".join(_plots(report))}</div>
<h2>Per layer</h2>
{_layer_table(report)}
<h2>Run</h2>
{_kv_table(phases) if phases else ""}
{_kv_table(data) if data else ""}
{_folded("Recipe", recipe)}
{_folded("Versions, weights mapping, budget", details)}
</main></body></html>
"""


def write_report_html(report: Mapping[str, Any], path: Path | str) -> None:
    """Write `render_report_html(report)` to `path` atomically (temporary name, then rename)."""
    page = render_report_html(report)
    atomic_write(Path(path), lambda tmp: tmp.write_text(page, encoding="utf-8"))
