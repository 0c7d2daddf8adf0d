"""Baseline methods (`l1`, `slimming`, `uniform`) through the job pipeline, and their selections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synthetic_job import save_resnet18_weights, synthetic_recipe

from hawada.adapters.torchvision import build_model, get_adapter, load_pruned
from hawada.core import baselines
from hawada.core.cost import FlopsCost
from hawada.core.gates import Gates
from hawada.core.recipe import GatesSpec
from hawada.worker.pipeline import JobContext, run_job

INPUT = (3, 16, 16)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_resnet18_weights(tmp_path_factory.mktemp("w") / "in.safetensors")


@pytest.mark.parametrize("method", ["l1", "slimming", "uniform"])
def test_method_produces_a_valid_export_meeting_its_target(
    method: str, weights: Path, tmp_path: Path
) -> None:
    recipe = synthetic_recipe(
        method=method,
        target={"metric": "flops", "ratio": 0.4},
        train={"steps": 3, "log_every": 1},
        finetune={"epochs": 0},
        latency={"batch_size": 2, "repeats": 2, "warmup": 0},
    )
    out = tmp_path / "out"
    report = run_job(JobContext(recipe=recipe, weights=weights, out_dir=out, device="cpu"))
    assert report["method"] == method
    assert report["target_met"] is True
    assert report["pruned"]["flops"] <= 0.4 * report["baseline"]["flops"]
    assert report["export_max_abs_diff"] <= 1e-4  # the export is the method's gated model
    pruned = load_pruned(out / "pruned.json", out / "pruned.safetensors")
    assert sum(p.numel() for p in pruned.parameters()) == report["pruned"]["params"]
    for layer in report["layers"]:
        assert 0 < layer["after"] == len(layer["kept"]) <= layer["trained"] <= layer["before"]
    if method == "slimming":
        assert len(report["history"]) == 3 and "bn_l1" in report["history"][0]
    else:
        assert report["history"] == []


def _setup(round_to: int = 8):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, stem="cifar").eval()
    adapter = get_adapter("resnet18")
    groups = adapter.gate_groups(model, GatesSpec(round_to=round_to, min_channels=8))
    return model, Gates(groups), FlopsCost(adapter.layers(model, INPUT))


def test_l1_keeps_the_largest_filters() -> None:
    model, gates, cost = _setup()
    with torch.no_grad():  # four tiny filters in layer1.0.conv1 and 28 small ones: tiny go first
        model.layer1[0].conv1.weight[:4] *= 1e-3
        model.layer1[0].conv1.weight[4:32] *= 0.5
    chosen = baselines.select_l1(model, gates, cost, 0.6 * cost.baseline())
    kept = set(chosen.kept_channels("layer1.0.inner1").tolist())
    assert len(kept) < 64 and not kept & {0, 1, 2, 3}
    widths = {n: float(len(chosen.kept_channels(n))) for n in chosen.groups}
    assert float(cost.cost(widths)) <= 0.6 * cost.baseline()


def test_uniform_uses_one_multiplier() -> None:
    model, gates, cost = _setup(round_to=1)
    chosen = baselines.select_uniform(model, gates, cost, 0.3 * cost.baseline())
    shares = [len(chosen.kept_channels(n)) / g.units for n, g in chosen.groups.items()]
    assert max(shares) - min(shares) < 0.05  # the same share everywhere (up to rounding)
    widths = {n: float(len(chosen.kept_channels(n))) for n in chosen.groups}
    assert float(cost.cost(widths)) <= 0.3 * cost.baseline()


def test_slimming_threshold_is_global_with_floors() -> None:
    _model, gates, cost = _setup()
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(g.units, generator=gen) + 0.5 for n, g in gates.groups.items()}
    scores["stream.layer4"] = torch.full((512,), 1e-3)  # the whole group is below the rest
    chosen = baselines.select_threshold(gates, scores, cost, 0.5 * cost.baseline())
    widths = {n: len(chosen.kept_channels(n)) for n in chosen.groups}
    # one global threshold: layer4's stream goes first, down to its floor, never to zero,
    # while the others are cut by the same threshold (the highest scores stay)
    assert widths["stream.layer4"] == 8
    assert all(8 < w < chosen.groups[n].channels for n, w in widths.items() if n != "stream.layer4")
    assert float(cost.cost({n: float(w) for n, w in widths.items()})) <= 0.5 * cost.baseline()
    for n in ("layer1.0.inner1", "layer3.1.inner1"):
        kept = chosen.kept_channels(n)
        dropped = torch.ones(chosen.groups[n].units, dtype=torch.bool)
        dropped[kept] = False
        assert float(scores[n][kept].min()) >= float(scores[n][dropped].max())
