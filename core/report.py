"""The job report: the content of `report.json` (fields in docs/contract.md).

Pure data in, data out; the HTML rendering of a report is `core.report_html`.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from hawada.core.report_checks import merge_warnings

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


def model_block(
    *, params: int, flops: int, accuracy: float | None, latency: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One `baseline` / `pruned` block of the report; `latency` is `LatencyStats.to_dict()`.

    `flops` counts conv and linear layers as 2 x multiply-accumulates; `macs` is given too.
    """
    lat = None if latency is None else dict(latency)
    return {
        "params": int(params),
        "flops": int(flops),
        "macs": int(flops) // 2,
        "latency_ms": None if lat is None else float(lat["median_ms"]),
        "latency": lat,
        "accuracy": None if accuracy is None else float(accuracy),
    }


def heldout_block(
    *,
    source: str,
    size: int,
    fingerprint: str | None,
    accuracy: float | None,
    baseline_accuracy: float | None = None,
) -> dict[str, Any]:
    """Where the reported accuracy was measured: the held-out `source`, its `size`, the standard
    error sqrt(p (1 - p) / n) of the pruned model's accuracy (`stderr`; the baseline's as
    `stderr_baseline`) and a `fingerprint` of the held-out sample indices."""

    def stderr(p: float | None) -> float | None:
        return None if p is None or size <= 0 else math.sqrt(p * (1.0 - p) / size)

    return {
        "source": source,
        "size": int(size),
        "stderr": stderr(accuracy),
        "stderr_baseline": stderr(baseline_accuracy),
        "fingerprint": fingerprint,
    }


def target_block(
    metric: str,
    *,
    baseline_value: float,
    ratio: float | None = None,
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """Target in both forms: the ratio of baseline and the absolute value in the metric's unit."""
    if ratio is None:
        if latency_ms is None:
            raise ValueError("a target needs ratio or latency_ms")
        ratio = float(latency_ms) / float(baseline_value)
        value = float(latency_ms)
    else:
        value = float(ratio) * float(baseline_value)
    return {
        "metric": metric,
        "ratio": float(ratio),
        "latency_ms": latency_ms,
        "value": value,
        "unit": _UNITS.get(metric, metric),
        "tolerance": LATENCY_TOLERANCE if metric == "latency" else 0.0,
    }


def _achieved(metric: str, pruned: Mapping[str, Any]) -> float | None:
    return {
        "flops": pruned["flops"],
        "params": pruned["params"],
        "latency": pruned["latency_ms"],
    }.get(metric)


def judge_target(
    target: Mapping[str, Any],
    baseline: Mapping[str, Any],
    pruned: Mapping[str, Any],
    hint: str | None = None,
) -> tuple[bool, str | None]:
    """(met, reason): met when the pruned model's measured metric <= value * (1 + tolerance)."""
    metric = target["metric"]
    got = _achieved(metric, pruned)
    if got is None:
        return False, f"the pruned model's {metric} was not measured"
    limit = target["value"] * (1.0 + target["tolerance"])
    if got <= limit:
        return True, None
    base = _achieved(metric, baseline) or float("nan")
    reason = (
        f"pruned {metric} {got:.6g} {target['unit']} exceeds the target "
        f"{target['value']:.6g} ({got / base:.3f} of baseline vs {target['ratio']:.3f})"
    )
    if hint:
        reason += f": {hint}"
    return False, reason


def speedup_block(
    baseline: Mapping[str, Any], pruned: Mapping[str, Any]
) -> dict[str, float | None]:
    """Measured speed-up next to the FLOPs-ideal one; `ratio` = measured / ideal."""
    ideal = baseline["flops"] / pruned["flops"] if pruned["flops"] else None
    b, p = baseline.get("latency_ms"), pruned.get("latency_ms")
    measured = b / p if b and p else None
    return {
        "measured": measured,
        "flops_ideal": ideal,
        "ratio": measured / ideal if measured and ideal else None,
    }


def build_report(
    *,
    recipe: Mapping[str, Any],
    baseline: Mapping[str, Any],
    pruned: Mapping[str, Any],
    target: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    layers: Sequence[Mapping[str, Any]],
    weights_mapping: Mapping[str, Any] | None,
    data: Mapping[str, Any],
    phases: Mapping[str, float],
    device: str,
    lut: Mapping[str, Any] | None = None,
    finetune_history: Sequence[Mapping[str, Any]] = (),
    target_hint: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble report.json: blocks from `model_block`, target from `target_block`.

    `layers` rows are {name, modules, before, after, kept}; `target_hint` explains a missed
    target (e.g. every group already at its floor) and is appended to `target_reason`.
    """
    met, reason = judge_target(target, baseline, pruned, target_hint)
    report: dict[str, Any] = {
        "baseline": dict(baseline),
        "pruned": dict(pruned),
        "target": dict(target),
        "target_met": met,
        "target_reason": reason,
        "speedup": speedup_block(baseline, pruned),
        "history": [dict(r) for r in history],
        "finetune_history": [dict(r) for r in finetune_history],
        "layers": [dict(r) for r in layers],
        "weights_mapping": None if weights_mapping is None else dict(weights_mapping),
        "data": dict(data),
        "phases": {k: round(float(v), 4) for k, v in phases.items()},
        "device": device,
        "versions": versions(),
        "recipe": dict(recipe),
        "lut": None if lut is None else dict(lut),
    }
    if extra:
        report.update(extra)
    # What a reader should see first (near-chance baseline, accuracy drop, noisy latency...).
    report["warnings"] = merge_warnings(report)
    return report
