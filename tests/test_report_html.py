"""report.html as a reader meets it: one self-contained page, readable at 1280 px (checked in
headless Chromium: figures present and non-empty in a screenshot, no script error, nothing wider
than the window), the warnings a reader needs, older reports without the newer fields."""

from __future__ import annotations

import copy
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hawada.core.report_checks import ACCURACY_DROP, diagnose, merge_warnings
from hawada.core.report_html import layer_label, render_report_html, write_report_html

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
WIDTH = 1280


def _latency(median: float, spread: float = 0.06) -> dict[str, Any]:
    return {
        "median_ms": median,
        "p10_ms": median * (1 - spread / 2),
        "p90_ms": median * (1 + spread / 2),
        "device": "cpu:test x2",
        "batch_size": 16,
        "dtype": "float32",
        "channels_last": False,
        "repeats": 20,
        "note": "interleaved with 1 other model(s)",
    }


def _report() -> dict[str, Any]:
    """A report shaped like the pipeline's (resnet18 on digits), built without torch."""
    groups = [
        ("stream.layer1", ["conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2"], 64, 48),
        ("layer1.0.inner1", ["layer1.0.conv1", "layer1.0.bn1"], 64, 40),
        ("stream.layer2", ["layer2.0.conv2", "layer2.0.bn2", "layer2.0.downsample.0"], 128, 96),
        ("layer2.0.inner1", ["layer2.0.conv1", "layer2.0.bn1"], 128, 64),
        ("fc", ["fc"], 10, 10),
    ]
    layers, base_costs, pruned_costs = [], {}, {}
    for name, modules, before, after in groups:
        layers.append(
            {
                "name": name,
                "modules": modules,
                "before": before,
                "trained": after + 8 if after < before else after,
                "after": after,
                "kept": list(range(after)),
            }
        )
        for m in modules:
            base_costs[m] = {"flops": 1e6 * before, "ms": 0.01 * before}
            pruned_costs[m] = {"flops": 1e6 * after, "ms": 0.01 * after}
    history = [
        {
            "step": s,
            "steps": 100,
            "loss": 2.0 * math.exp(-s / 30) + 0.1,
            "kd": 1.5 * math.exp(-s / 30),
            "ce": 0.0,
            "cost_ratio": 1.0 - 0.5 * (1 - math.exp(-s / 25)),
            "target": max(0.5, 1.0 - s / 60),
            "multiplier": 0.02 * s,
            "temperature": 1.0 - 0.009 * s,
        }
        for s in range(5, 101, 5)
    ]
    finetune = [
        {"step": s, "steps": 40, "loss": 0.6 * math.exp(-s / 15), "kd": 0.5, "ce": 0.0, "lr": 0.01}
        for s in range(5, 41, 5)
    ]
    recipe = {
        "method": "gates",
        "model": {
            "arch": "resnet18",
            "num_classes": 10,
            "stem": "cifar",
            "input_size": [3, 16, 16],
            "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "data": {"source": "digits", "batch_size": 32},
        "target": {"metric": "flops", "ratio": 0.5},
        "train": {"steps": 100, "lr": 0.05},
        "finetune": {"epochs": 1, "lr": 0.01},
    }
    return {
        "baseline": {
            "params": 11_173_962,
            "flops": 277_719_040,
            "latency_ms": 12.0,
            "latency": _latency(12.0),
            "accuracy": 0.95,
        },
        "pruned": {
            "params": 6_311_962,
            "flops": 138_609_888,
            "latency_ms": 7.0,
            "latency": _latency(7.0),
            "accuracy": 0.94,
        },
        "target": {
            "metric": "flops",
            "ratio": 0.5,
            "latency_ms": None,
            "value": 138_859_520.0,
            "unit": "FLOPs",
            "tolerance": 0.0,
        },
        "target_met": True,
        "target_reason": None,
        "speedup": {"measured": 12 / 7, "flops_ideal": 2.0, "ratio": 0.857},
        "history": history,
        "finetune_history": finetune,
        "layers": layers,
        "layer_costs": {"baseline": base_costs, "pruned": pruned_costs},
        "weights_mapping": {"counts": {"mapped": 122, "missing": 0, "mismatched": 0}},
        "data": {"source": "digits", "n_train": 1437, "n_heldout": 360, "num_classes": 10},
        "phases": {"loading": 1.2, "training": 30.5, "evaluating": 2.0},
        "device": "cpu:test x2",
        "versions": {"hawada": "0", "torch": "2"},
        "recipe": recipe,
        "warnings": [],
    }


# -- content ------------------------------------------------------------------------------------
def test_summary_states_heldout_size_and_standard_error() -> None:
    page = render_report_html(_report())
    # 95% on 360 samples: sqrt(.95 * .05 / 360) = 1.15%
    assert "95.0%" in page and "± 1.1%" in page
    assert re.search(r"held-out accuracy on <b>360</b> samples", page)
    assert "p10-p90 11.6-12.4" in page  # the baseline's latency spread beside its median
    assert "1.71x</b> measured" in page


def test_heldout_block_of_newer_reports_wins() -> None:
    report = _report()
    report["heldout"] = {
        "source": "heldout_path",
        "size": 1000,
        "stderr": 0.0123,  # the pruned model's
        "stderr_baseline": 0.0234,
        "fingerprint": "ab" * 20,
    }
    page = render_report_html(report)
    assert "<b>1 k</b> samples (heldout_path, fingerprint abababababab)" in page
    row = page.split("held-out accuracy (top-1", 1)[1].split("</tr>", 1)[0]
    assert row.index("± 2.3%") < row.index("± 1.2%")  # baseline column first, then pruned


def test_budget_correction_block_is_summarised() -> None:
    report = _report()
    report["correction"] = {
        "cost_ratio_trained": 0.53,
        "cost_ratio_after": 0.499,
        "closed_channels": 24,
        "accuracy_before": 0.95,
        "accuracy_after": 0.93,
    }
    page = render_report_html(report)
    assert "cost ratio 0.530 → 0.499, 24 channels closed" in page
    assert "hard-gated held-out accuracy 95.0% → 93.0% (-2.0 points)" in page


def test_recipe_is_folded_and_plots_have_axis_titles() -> None:
    page = render_report_html(_report())
    assert re.search(r"<details><summary>Recipe</summary><pre>", page)
    assert "<details open" not in page
    for label in ("step", "loss", "cost ratio", "multiplier", "learning rate", "output channels"):
        assert f">{label}<" in page, label  # matplotlib keeps SVG text as text
    assert "Fine-tuning: loss" in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/", "")


def test_layers_are_named_by_their_modules() -> None:
    report = _report()
    assert layer_label(report["layers"][1]) == "layer1.0: conv1, bn1"
    assert layer_label(report["layers"][0]) == "conv1, bn1, layer1.0.conv2 +1"
    page = render_report_html(report)
    table = page.split("<table class=layers>", 1)[1].split("</table>", 1)[0]
    # group stream.layer1: 4 modules at 64 channels of a baseline total of 14 modules
    assert "<td class=name>stream.layer1</td>" in table
    assert "layer1.0.conv2" in table and "256 M <span class=dim>" in table


def test_older_report_without_newer_fields_still_renders() -> None:
    report = _report()
    for key in ("layer_costs", "finetune_history", "warnings", "speedup", "heldout"):
        report.pop(key, None)
    for row in report["layers"]:
        row.pop("trained")
    for block in ("baseline", "pruned"):
        report[block].pop("latency")
    page = render_report_html(report)
    assert "No fine-tuning" in page and "FLOPs before" not in page and "<svg" in page


def test_extra_numbers_in_blocks_are_shown() -> None:
    report = _report()
    report["baseline"]["macs"] = report["baseline"]["flops"] // 2
    report["pruned"]["macs"] = report["pruned"]["flops"] // 2
    report["pruned"]["accuracy_hard_gated"] = 0.91
    page = render_report_html(report)
    assert "MACs (batch 1)" in page and "accuracy hard gated" in page and "91.0%" in page


# -- warnings -----------------------------------------------------------------------------------
def test_clean_report_has_no_warnings() -> None:
    assert diagnose(_report()) == []


def test_baseline_near_chance_names_the_likely_causes() -> None:
    report = _report()
    report["baseline"]["accuracy"], report["pruned"]["accuracy"] = 0.2, 0.19
    (warning,) = diagnose(report)
    assert warning["code"] == "baseline_near_chance"
    for cause in ("model.stem", "model.normalize", "model.num_classes"):
        assert cause in warning["message"]
    assert "baseline near chance" in render_report_html(report)
    report["baseline"]["accuracy"] = 0.5  # well above chance for 10 classes
    assert diagnose(report) == [] or diagnose(report)[0]["code"] != "baseline_near_chance"


def test_accuracy_drop_beyond_threshold_is_warned() -> None:
    report = _report()
    report["pruned"]["accuracy"] = report["baseline"]["accuracy"] - ACCURACY_DROP - 0.01
    (warning,) = diagnose(report)
    assert warning["code"] == "accuracy_drop" and "6.0 points" in warning["message"]
    report["pruned"]["accuracy"] = report["baseline"]["accuracy"] - ACCURACY_DROP + 0.01
    assert diagnose(report) == []


def test_wide_latency_spread_is_warned() -> None:
    report = _report()
    report["pruned"]["latency"] = _latency(7.0, spread=0.6)
    (warning,) = diagnose(report)
    assert warning["code"] == "latency_noisy" and "pruned ±30%" in warning["message"]
    assert "1.71x" in warning["message"]


def test_report_warnings_are_kept_and_not_doubled() -> None:
    report = _report()
    report["pruned"]["accuracy"] = 0.5
    report["warnings"] = [{"code": "custom", "message": "from the engine"}]
    once = merge_warnings(report)
    report["warnings"] = once
    assert [w["code"] for w in merge_warnings(report)] == ["custom", "accuracy_drop"]


# -- in a browser -------------------------------------------------------------------------------
# Injected by the test only: collects script errors from the first moment and, once the page
# has loaded, writes what it measured into the DOM that --dump-dom prints.
_PROBE_HEAD = (
    "<script>window.__errors=[];"
    "window.addEventListener('error',e=>window.__errors.push(String(e.message)));</script>"
)
_PROBE_BODY = """<script>window.addEventListener('load',()=>{
const figs=[...document.querySelectorAll('figure')].map(f=>{
  const s=f.querySelector('svg');const r=(s||f).getBoundingClientRect();
  return {svg:!!s,x:r.left+scrollX,y:r.top+scrollY,w:r.width,h:r.height,
          marks:s?s.querySelectorAll('path,line,rect,polyline,use').length:0,
          texts:s?s.querySelectorAll('text').length:0};});
const recipe=document.querySelector('details pre');
const out={errors:window.__errors,figs:figs,
  scrollWidth:document.documentElement.scrollWidth,height:document.documentElement.scrollHeight,
  recipeShown:recipe?recipe.checkVisibility():null};
const p=document.createElement('pre');p.id='probe';p.textContent=JSON.stringify(out);
document.body.appendChild(p);});</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_report_in_headless_chromium_at_1280px(tmp_path: Path) -> None:
    from PIL import Image

    report = _report()
    report["pruned"]["accuracy"] = 0.8  # one warning on the page as well
    page_path = tmp_path / "report.html"
    write_report_html(report, page_path)
    page = page_path.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace(
            "</body>", _PROBE_BODY + "</body>"
        ),
        encoding="utf-8",
    )
    res = _chromium(tmp_path, f"--window-size={WIDTH},900", "--dump-dom", probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert found, res.stdout[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["errors"] == []
    assert "Uncaught" not in res.stderr and "CONSOLE" not in res.stderr
    assert seen["scrollWidth"] <= WIDTH, "the page is wider than a 1280 px window"
    assert seen["recipeShown"] is False, "the recipe must be folded away"
    figs = seen["figs"]
    assert len(figs) >= 8  # 4 training, 2 fine-tune, latency, channels
    for fig in figs:
        assert fig["svg"] and fig["marks"] > 5 and fig["texts"] > 3, fig
        assert fig["w"] >= 500 and fig["h"] >= 150, f"figure too small to read: {fig}"

    shot = tmp_path / "shot.png"
    res = _chromium(
        tmp_path,
        f"--window-size={WIDTH},{int(seen['height'])}",
        f"--screenshot={shot}",
        page_path.as_uri(),
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size[0] == WIDTH
    for fig in figs:  # every figure has drawn pixels where the browser laid it out
        box = (int(fig["x"]), int(fig["y"]), int(fig["x"] + fig["w"]), int(fig["y"] + fig["h"]))
        crop = image.crop(box)
        grey = crop.convert("L").histogram()
        inked = sum(grey[:200]) / sum(grey)  # share of pixels clearly darker than paper
        colours = len(crop.getcolors(1 << 24) or [])
        assert inked > 0.01 and colours > 8, (fig, inked, colours)


def test_written_page_is_one_file_without_assets(tmp_path: Path) -> None:
    report = copy.deepcopy(_report())
    path = tmp_path / "r.html"
    write_report_html(report, path)
    page = path.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(?!#)', page), "the page must not load anything"
    assert page.count("<svg") >= 8 and list(tmp_path.iterdir()) == [path]
