"""core/lut.py: per-layer latency table, its cache, the differentiable latency cost, calibration."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import hawada.core.lut.build as lut_build
from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.cost import make_cost_model
from hawada.core.layers import LayerSpec
from hawada.core.lut import (
    FolderLutCache,
    LatencyCost,
    LatencyTable,
    LutEntry,
    axis_values,
    build_lut,
    fit_calibration,
    get_or_build_lut,
    layer_shape,
    make_width_measurer,
)
from hawada.core.recipe import GatesSpec, LatencySpec

SPEC = LatencySpec(batch_size=1, dtype="float32", repeats=2, warmup=0, channels_last=False)
INPUT = (3, 16, 16)
FAST = {"max_points_per_axis": 3}


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, stem="cifar").eval()
    adapter = get_adapter("resnet18")
    return model, adapter, adapter.layers(model, INPUT)


@pytest.fixture(scope="module")
def table(resnet18) -> LatencyTable:
    _, _, layers = resnet18
    return build_lut(layers, SPEC, "cpu", 16, repeats=2, warmup=0, **FAST)


# ------------------------------------------------------------------ synthetic table (exact numbers)


def _toy_layers() -> list[LayerSpec]:
    return [
        LayerSpec("a", "conv", None, "g1", 3, 32, 1, False, (3, 3), (8, 8), (8, 8), (1, 1), (1, 1)),
        LayerSpec(
            "b", "conv", "g1", "g2", 32, 64, 1, False, (3, 3), (8, 8), (8, 8), (1, 1), (1, 1)
        ),
        LayerSpec("fc", "linear", "g2", None, 64, 10, 1, False, (1, 1), (1, 1)),
    ]


def _toy_table() -> LatencyTable:
    sa, sb, sf = (layer_shape(la, 1).signature for la in _toy_layers())
    return LatencyTable(
        key="toy",
        device="cpu:test",
        entries={
            sa: LutEntry([3], [16, 32], [[1.0, 2.0]]),
            sb: LutEntry([16, 32], [32, 64], [[1.0, 3.0], [2.0, 6.0]]),
            sf: LutEntry([16, 64], [10], [[0.5], [1.0]]),
        },
        meta={"batch_size": 1, "round_to": 16},
    )


def test_interpolation_is_exact_at_grid_points() -> None:
    cost = LatencyCost(_toy_layers(), _toy_table())
    # g1=16, g2=32: a -> 1.0, b(16, 32) -> 1.0, fc(32) -> 0.5 + (32-16)/48 * 0.5
    assert float(cost.cost({"g1": 16.0, "g2": 32.0})) == pytest.approx(1.0 + 1.0 + 0.5 + 1 / 6)
    assert float(cost.cost({})) == pytest.approx(2.0 + 6.0 + 1.0)
    assert cost.baseline() == pytest.approx(float(cost.cost({"g1": 32, "g2": 64})))


def test_interpolation_is_monotone_between_points() -> None:
    cost = LatencyCost(_toy_layers(), _toy_table())
    values = [float(cost.cost({"g1": 32.0, "g2": float(w)})) for w in range(32, 65, 4)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[0] < values[-1]


def test_latency_cost_is_differentiable_and_calibrated() -> None:
    table = _toy_table()
    cost = LatencyCost(_toy_layers(), table)
    w = torch.tensor(24.0, requires_grad=True)
    cost.cost({"g1": w}).backward()
    assert w.grad is not None and float(w.grad) > 0
    # at full width the gradient does not vanish (extrapolates the last interval)
    full = torch.tensor(64.0, requires_grad=True)
    cost.cost({"g2": full}).backward()
    assert float(full.grad) > 0
    raw = float(cost.raw({}))
    table.scale, table.offset = 2.0, 0.5
    assert float(cost.cost({})) == pytest.approx(2.0 * raw + 0.5)
    assert cost.baseline() == pytest.approx(2.0 * raw + 0.5)


def test_make_cost_model_builds_a_latency_cost() -> None:
    cm = make_cost_model("latency", _toy_layers(), lut=_toy_table())
    assert cm.metric == "latency" and cm.baseline() == pytest.approx(9.0)


def test_fit_calibration_recovers_scale_and_offset() -> None:
    table = _toy_table()
    samples = [(x, 1.7 * x + 0.3) for x in (1.0, 2.0, 5.0, 9.0)]
    scale, offset = fit_calibration(table, samples)
    assert scale == pytest.approx(1.7) and offset == pytest.approx(0.3)
    assert table.meta["calibration_samples"] == 4
    # one sample: scale only
    scale, offset = fit_calibration(table, [(2.0, 5.0)])
    assert (scale, offset) == (pytest.approx(2.5), 0.0)


def test_axis_values_keep_smallest_and_full() -> None:
    assert axis_values(64, 16, 10) == [16, 32, 48, 64]
    assert axis_values(72, 16, 10) == [16, 32, 48, 64, 72]  # full width even off the ladder
    sub = axis_values(512, 8, 5)
    assert len(sub) == 5 and sub[0] == 8 and sub[-1] == 512
    assert all(v % 8 == 0 for v in sub)


# ------------------------------------------------------------------ measured table on resnet18


def test_build_dedupes_layers_and_samples_round_to(resnet18, table: LatencyTable) -> None:
    _, _, layers = resnet18
    assert len(table.entries) < len(layers)  # repeated blocks share entries
    for e in table.entries.values():
        assert len(e.ms) == len(e.cin) and all(len(r) == len(e.cout) for r in e.ms)
        assert all(v > 0 for r in e.ms for v in r)
        for axis in (e.cin, e.cout):
            assert axis == sorted(axis) and len(axis) <= 3
    summary = table.summary()
    assert summary["entries"] == len(table.entries) and summary["points"] == table.points
    assert summary["device"].startswith("cpu:") and summary["build_seconds"] > 0
    # the full widths are sampled: the cost at full width is a sum of measured points
    cost = LatencyCost(layers, table)
    assert cost.baseline() > 0


def test_table_roundtrips_through_bytes(resnet18, table: LatencyTable) -> None:
    _, _, layers = resnet18
    data = table.to_bytes()
    again = LatencyTable.from_bytes(data)
    assert again.to_bytes() == data
    assert LatencyCost(layers, again).baseline() == pytest.approx(
        LatencyCost(layers, table).baseline()
    )
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable.from_bytes(b"\x80\x04not json")


def test_cache_hit_reuses_table_without_measuring(resnet18, tmp_path, monkeypatch) -> None:
    _, _, layers = resnet18
    calls = {"n": 0}
    real = lut_build._time_point

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lut_build, "_time_point", counting)
    cache = FolderLutCache(tmp_path / "lut")
    parts = {"arch": "resnet18", "input_size": list(INPUT)}
    first = get_or_build_lut(layers, SPEC, "cpu", 16, cache, parts, **FAST)
    built = calls["n"]
    assert built >= first.points
    assert list((tmp_path / "lut").glob("*.json")) == [tmp_path / "lut" / f"{first.key}.json"]
    second = get_or_build_lut(layers, SPEC, "cpu", 16, cache, parts, **FAST)
    assert calls["n"] == built  # nothing measured on a hit
    assert second.to_bytes() == first.to_bytes()
    # a different batch size is a different table
    other = get_or_build_lut(
        layers, SPEC.model_copy(update={"batch_size": 2}), "cpu", 16, cache, parts, **FAST
    )
    assert other.key != first.key and calls["n"] > built
    # a corrupt cache entry is rebuilt, not trusted
    (tmp_path / "lut" / f"{first.key}.json").write_bytes(b"{broken")
    rebuilt = get_or_build_lut(layers, SPEC, "cpu", 16, cache, parts, **FAST)
    assert rebuilt.key == first.key and rebuilt.points == first.points
    assert LatencyTable.from_bytes(cache.get(first.key)).points == first.points


def test_grid_shrinks_to_the_time_budget(resnet18) -> None:
    _, _, layers = resnet18
    small = build_lut(layers, SPEC, "cpu", 8, 6, repeats=1, warmup=0, time_budget_s=0.0)
    assert small.meta["max_points_per_axis"] == 2
    assert all(len(e.cin) <= 2 and len(e.cout) <= 2 for e in small.entries.values())


def test_folder_cache_refuses_keys_that_are_not_hashes(tmp_path) -> None:
    cache = FolderLutCache(tmp_path)
    with pytest.raises(ValueError, match="invalid latency table key"):
        cache.put("../../etc/passwd", b"x")
    assert cache.get("0" * 40) is None


def test_calibration_against_exported_models_is_cached(resnet18, tmp_path) -> None:
    model, adapter, layers = resnet18
    groups = adapter.gate_groups(
        model, GatesSpec(round_to=16, min_channels=16, prune_residual=True)
    )
    measurer = make_width_measurer(model, adapter.export_pruned, groups, INPUT, SPEC, "cpu")
    widths = measurer.random_widths(random.Random(0))
    assert all(w % 16 == 0 or w == g.channels for g in groups for w in [widths[g.name]])
    cache = FolderLutCache(tmp_path)
    table = get_or_build_lut(
        layers,
        SPEC,
        "cpu",
        16,
        cache,
        {"arch": "resnet18"},
        calibrate_with=measurer,
        n_calibration=2,
        **FAST,
    )
    assert table.meta["calibration_samples"] == 3 and table.scale > 0
    assert table.summary()["calibrated"] is True
    again = LatencyTable.from_bytes(cache.get(table.key))
    assert (again.scale, again.offset) == (table.scale, table.offset)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_table_in_reduced_precision(dtype: str) -> None:
    layers = _toy_layers()
    spec = SPEC.model_copy(update={"batch_size": 4, "dtype": dtype, "channels_last": True})
    table = build_lut(layers, spec, "cuda", 16, 3)
    assert table.device == torch.cuda.get_device_name(0)
    assert table.meta["dtype"] == dtype and table.meta["channels_last"] is True
    cost = LatencyCost(layers, table)
    w = torch.tensor(24.0, device="cuda", requires_grad=True)
    cost.cost({"g1": w}).backward()  # buffers follow the widths to the GPU
    assert cost.baseline() > 0 and w.grad is not None


def test_cost_rows_equal_cost_row_by_row(resnet18, table: LatencyTable) -> None:
    """The projection's batched costs are the same numbers as one `cost` call per candidate."""
    _, _, layers = resnet18
    models = [make_cost_model(m, layers, lut=table) for m in ("flops", "params", "latency")]
    names = ["stream.layer1", "layer2.0.inner1", "stream.layer4"]  # others stay at full width
    gen = torch.Generator().manual_seed(0)
    full = torch.tensor([64.0, 128.0, 512.0])
    rows = torch.cat([full[None], (torch.rand(5, 3, generator=gen) * full).round().clamp_min(1)])
    for model in models:
        got = model.cost_rows(names, rows)
        want = torch.stack([model.cost(dict(zip(names, r.tolist(), strict=True))) for r in rows])
        assert got.shape == (6,) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert float(got[0]) == pytest.approx(model.baseline())
    with pytest.raises(KeyError, match="nope"):
        models[2].cost_rows(["nope"], rows[:, :1])


@pytest.mark.parametrize("arch", ["densenet121", "mobilenet_v2"])
def test_cost_rows_equal_cost_on_concatenated_and_depthwise_layers(arch: str) -> None:
    """DenseNet's concatenated inputs and MobileNet's depthwise (tied) convs price the same
    batched as one call per row, for every cost model."""
    model = build_model(arch, num_classes=10).eval()
    layers = get_adapter(arch).layers(model, (3, 32, 32))
    table = build_lut(layers, SPEC, "cpu", 16, repeats=1, warmup=0, max_points_per_axis=2)
    models = [make_cost_model(m, layers, lut=table) for m in ("flops", "params", "latency")]
    full = models[2].full_widths
    names = sorted(full)[:8]
    gen = torch.Generator().manual_seed(0)
    top = torch.tensor([float(full[n]) for n in names])
    rows = (torch.rand(4, len(names), generator=gen) * top).round().clamp_min(1)
    for cost in models:
        want = torch.stack([cost.cost(dict(zip(names, r.tolist(), strict=True))) for r in rows])
        torch.testing.assert_close(cost.cost_rows(names, rows), want, rtol=1e-12, atol=1e-12)
