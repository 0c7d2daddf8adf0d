"""What a reader of a report should be warned about, derived from the report alone (no torch).

`diagnose(report)` returns ``[{"code", "message"}]``: a baseline near chance level (the weights
probably do not fit the model or the data), an accuracy drop beyond `ACCURACY_DROP`, a latency
measurement whose spread is too wide to trust the speed-up, weights that did not map cleanly.
`build_report` stores them in ``report["warnings"]``; the HTML report and the command line show
them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: A baseline whose held-out accuracy is below chance + this share of the way to 100% is
#: "near chance" (10 classes: below 23.5%).
CHANCE_MARGIN = 0.15
#: Held-out top-1 lost beyond this (absolute, 0.05 = 5 points) earns a warning.
ACCURACY_DROP = 0.05
#: (p90 - p10) / median beyond this: the latency was measured on a busy host.
LATENCY_SPREAD = 0.25


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def heldout_size(report: Mapping[str, Any]) -> int | None:
    """Number of held-out samples the accuracies were measured on (None when unknown)."""
    heldout = report.get("heldout")
    if isinstance(heldout, Mapping) and isinstance(heldout.get("size"), int):
        return int(heldout["size"])
    data = report.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("n_heldout"), int):
        return int(data["n_heldout"])
    return None


def accuracy_stderr(accuracy: float | None, n: int | None) -> float | None:
    """Standard error of a top-1 accuracy measured on ``n`` samples: sqrt(p (1 - p) / n)."""
    if accuracy is None or not n:
        return None
    return math.sqrt(max(0.0, accuracy * (1.0 - accuracy)) / n)


def num_classes(report: Mapping[str, Any]) -> int | None:
    """The model's number of classes (recipe), else the data's."""
    recipe = report.get("recipe")
    if isinstance(recipe, Mapping) and isinstance(recipe.get("model"), Mapping):
        n = recipe["model"].get("num_classes")
        if isinstance(n, int) and n > 0:
            return n
    data = report.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("num_classes"), int):
        return int(data["num_classes"]) or None
    return None


def latency_spread(block: Mapping[str, Any] | None) -> float | None:
    """(p90 - p10) / median of a report block's latency, None when not measured."""
    lat = block.get("latency") if isinstance(block, Mapping) else None
    if not isinstance(lat, Mapping):
        return None
    med, p10, p90 = (_num(lat.get(k)) for k in ("median_ms", "p10_ms", "p90_ms"))
    if not med or p10 is None or p90 is None:
        return None
    return (p90 - p10) / med


def _baseline_near_chance(report: Mapping[str, Any]) -> dict[str, str] | None:
    acc = _num((report.get("baseline") or {}).get("accuracy"))
    classes = num_classes(report)
    if acc is None or not classes or classes < 2:
        return None
    chance = 1.0 / classes
    if acc >= chance + CHANCE_MARGIN * (1.0 - chance):
        return None
    stem = normalize = None
    recipe = report.get("recipe")
    if isinstance(recipe, Mapping) and isinstance(recipe.get("model"), Mapping):
        stem, normalize = recipe["model"].get("stem"), recipe["model"].get("normalize")
    return {
        "code": "baseline_near_chance",
        "message": (
            f"the baseline scores {acc:.1%} on held-out data, near chance level "
            f"({chance:.1%} for {classes} classes): the weights probably do not fit this model "
            "or this data, and compressing them is meaningless. Likely causes: model.stem "
            f"({stem}) differs from the stem the weights were trained with (imagenet vs cifar); "
            f"model.normalize ({normalize}) differs from the training preprocessing; "
            f"model.num_classes ({classes}) or the label order differs from the weights' "
            "classifier; the weights belong to another architecture"
        ),
    }


def _accuracy_drop(report: Mapping[str, Any]) -> dict[str, str] | None:
    before = _num((report.get("baseline") or {}).get("accuracy"))
    after = _num((report.get("pruned") or {}).get("accuracy"))
    if before is None or after is None or before - after <= ACCURACY_DROP:
        return None
    recipe = report.get("recipe") if isinstance(report.get("recipe"), Mapping) else {}
    assert isinstance(recipe, Mapping)
    target = report.get("target") if isinstance(report.get("target"), Mapping) else {}
    assert isinstance(target, Mapping)
    steps = (recipe.get("train") or {}).get("steps")
    epochs = (recipe.get("finetune") or {}).get("epochs")
    return {
        "code": "accuracy_drop",
        "message": (
            f"held-out accuracy dropped {100 * (before - after):.1f} points "
            f"({before:.1%} -> {after:.1%}), more than {100 * ACCURACY_DROP:.0f}. Likely causes: "
            f"the target ({target.get('metric')} at {_num(target.get('ratio')) or 0:.2f} of the "
            "baseline) is too aggressive for this model; gate training or fine-tuning too short "
            f"(train.steps {steps}, finetune.epochs {epochs}); too little training data. Try a "
            "milder target, more train.steps or finetune.epochs"
        ),
    }


def _latency_noisy(report: Mapping[str, Any]) -> dict[str, str] | None:
    spreads = {
        name: latency_spread(report.get(name) if isinstance(report.get(name), Mapping) else None)
        for name in ("baseline", "pruned")
    }
    wide = {k: v for k, v in spreads.items() if v is not None and v > LATENCY_SPREAD}
    if not wide:
        return None
    speedup = report.get("speedup")
    measured = _num(speedup.get("measured")) if isinstance(speedup, Mapping) else None
    spread = ", ".join(f"{k} ±{v / 2:.0%}" for k, v in wide.items())
    return {
        "code": "latency_noisy",
        "message": (
            f"latency varied widely between repeats ({spread} of the median, p10-p90): the "
            "device was busy while it was measured, so the measured speed-up"
            f"{f' ({measured:.2f}x)' if measured else ''} is uncertain. Measure again on a "
            "quiet machine or raise latency.repeats"
        ),
    }


def _weights_mapping(report: Mapping[str, Any]) -> dict[str, str] | None:
    mapping = report.get("weights_mapping")
    counts = mapping.get("counts") if isinstance(mapping, Mapping) else None
    if not isinstance(counts, Mapping):
        return None
    bad = {k: counts.get(k) for k in ("missing", "mismatched", "unexpected", "filled")}
    bad = {k: v for k, v in bad.items() if isinstance(v, int) and v > 0}
    if not bad:
        return None
    return {
        "code": "weights_mapping",
        "message": (
            "the weights did not map one-to-one onto the model ("
            + ", ".join(f"{v} {k}" for k, v in bad.items())
            + "); see weights_mapping in report.json"
        ),
    }


def diagnose(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """Warnings a reader of this report should see first, ``[{"code", "message"}]``."""
    checks = (_baseline_near_chance, _accuracy_drop, _latency_noisy, _weights_mapping)
    return [w for w in (check(report) for check in checks) if w is not None]


def merge_warnings(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """The report's own ``warnings`` followed by `diagnose`'s, one per code."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for item in [*(report.get("warnings") or []), *diagnose(report)]:
        if isinstance(item, Mapping):
            warning = {
                "code": str(item.get("code", "warning")),
                "message": str(item.get("message", "")),
            }
        else:
            warning = {"code": "warning", "message": str(item)}
        key = warning["code"] if warning["code"] != "warning" else warning["message"]
        if key not in seen:
            seen.add(key)
            out.append(warning)
    return out
