"""Pruned export of every torchvision ResNet: hard-gated outputs == exported outputs.

Models get calibrated-then-perturbed BN statistics and random affine parameters so that every
channel matters, and random gate logits of both signs (some groups forced to their floor, some
full), then the hard-gated model, the exported model and the model reloaded from
pruned.json + pruned.safetensors must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import ResNet

from hawada.adapters.torchvision import (
    build_model,
    family_of,
    get_adapter,
    list_architectures,
    load_pruned,
)
from hawada.adapters.torchvision.testing import gated_output, random_gates, randomize_norms
from hawada.core.architectures import supported_architectures
from hawada.core.errors import UnsupportedArch
from hawada.core.gates import Gates, keep_from_gates
from hawada.core.recipe import GatesSpec, parse_recipe

#: The ResNet family in the registry (the graph-derived families: tests/test_graph.py).
ALL_ARCHS = [a for a in list_architectures() if family_of(a) == "resnet"]
SPEC = GatesSpec(round_to=8, min_channels=8, prune_residual=True)
RECIPE = parse_recipe(
    {
        "model": {
            "arch": "resnet18",
            "num_classes": 10,
            "input_size": [3, 32, 32],
            "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        },
        "data": {"source": "synthetic"},
    }
)
TOL = 1e-4


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Calibrated then perturbed BN statistics and affine parameters (32 px batch)."""
    randomize_norms(model, 32, torch.Generator().manual_seed(seed))


def seeded_gates(model: nn.Module, arch: str, spec: GatesSpec, seed: int) -> Gates:
    """Random hard gates of both signs on the adapter's groups (some at the floor, some full)."""
    groups = get_adapter(arch).gate_groups(model, spec)
    return random_gates(groups, torch.Generator().manual_seed(seed))


def check_widths(gates: Gates, keep: dict[str, torch.Tensor], spec: GatesSpec) -> None:
    """Staircase: multiples of round_to (or full), at least min_channels (or full)."""
    for name, group in gates.groups.items():
        width = len(keep[name])
        full = group.channels
        assert width == full or width % spec.round_to == 0, (name, width)
        assert width >= min(spec.min_channels, full), (name, width)
        assert width <= full


def check_convs(pruned: nn.Module, gates: Gates, keep: dict[str, torch.Tensor]) -> None:
    """Grouped convs of tied groups keep whole groups; weights match declared shapes."""
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Conv2d):
            g = module.groups
            assert module.in_channels % g == 0 and module.out_channels % g == 0, name
            assert module.weight.shape[:2] == (module.out_channels, module.in_channels // g)
    for name, group in gates.groups.items():
        if group.unit_width > 1:
            conv2 = pruned.get_submodule(name.removesuffix(".inner") + ".conv2")
            assert conv2.groups == len(keep[name]) // group.unit_width


def export_and_compare(
    arch: str,
    stem: str,
    spec: dict,
    seed: int,
    tmp_path: Path,
) -> tuple[nn.Module, nn.Module, Gates]:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, stem=stem)
    randomize_bn(model, seed)
    gates = seeded_gates(model, arch, spec, seed)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    expected = gated_output(model, gates, x)
    with gates.using("off"):
        original = gated_output(model, gates, x)
    # The removed channels matter: pruning moves the outputs far beyond the tolerance.
    assert (original - expected).abs().max() > 1000 * TOL

    keep = keep_from_gates(gates)
    adapter = get_adapter(arch)
    pruned = adapter.export_pruned(model, keep)
    assert type(pruned) is ResNet
    assert pruned.training is False  # follows the input model's mode
    with torch.no_grad():
        got = pruned(x)
    assert (got - expected).abs().max().item() <= TOL
    check_widths(gates, keep, spec)
    check_convs(pruned, gates, keep)
    n_removed = sum(gates.groups[n].channels - len(k) for n, k in keep.items())
    assert n_removed > 0

    config = adapter.pruned_config(model, keep, RECIPE)
    json_path, weights_path = tmp_path / "pruned.json", tmp_path / "pruned.safetensors"
    json_path.write_text(json.dumps(config))
    save_file(pruned.state_dict(), str(weights_path))
    reloaded = load_pruned(json_path, weights_path)
    assert type(reloaded) is ResNet
    with torch.no_grad():
        assert torch.equal(reloaded(x), got)
    assert config["arch"] == arch and config["stem"] == stem and config["num_classes"] == 10
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Conv2d):
            assert config["channels"][name] == module.out_channels
    return model, pruned, gates


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_hard_gated_equals_exported_and_reloaded(arch: str, tmp_path: Path) -> None:
    export_and_compare(arch, "imagenet", SPEC, seed=ALL_ARCHS.index(arch), tmp_path=tmp_path)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_cifar_stem(arch: str, tmp_path: Path) -> None:
    _, pruned, _ = export_and_compare(arch, "cifar", SPEC, seed=11, tmp_path=tmp_path)
    assert isinstance(pruned.maxpool, nn.Identity)
    assert pruned.conv1.kernel_size == (3, 3) and pruned.conv1.stride == (1, 1)


@pytest.mark.parametrize("arch", ["resnet34", "resnext50_32x4d"])
def test_prune_residual_false_keeps_streams(arch: str, tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"prune_residual": False})
    model, pruned, gates = export_and_compare(arch, "imagenet", spec, seed=5, tmp_path=tmp_path)
    assert not any(name.startswith("stream.") for name in gates.groups)
    assert pruned.fc.in_features == model.fc.in_features
    for i in range(1, 5):
        layer, layer_pruned = model.get_submodule(f"layer{i}"), pruned.get_submodule(f"layer{i}")
        last = "bn2" if arch == "resnet34" else "bn3"
        assert (
            layer_pruned[-1].get_submodule(last).num_features
            == layer[-1].get_submodule(last).num_features
        )


def test_stream_groups_couple_residual_adds() -> None:
    model = build_model("resnet50", 10)
    groups = {g.name: g for g in get_adapter("resnet50").gate_groups(model, SPEC)}
    assert groups["stem"].modules == ["bn1"]
    assert groups["stream.layer2"].modules == [
        "layer2.0.bn3",
        "layer2.0.downsample.1",
        "layer2.1.bn3",
        "layer2.2.bn3",
        "layer2.3.bn3",
    ]
    assert "layer2.0.downsample.0" in groups["stream.layer2"].covers
    basic = {
        g.name: g for g in get_adapter("resnet18").gate_groups(build_model("resnet18", 10), SPEC)
    }
    assert basic["stream.layer1"].modules == ["bn1", "layer1.0.bn2", "layer1.1.bn2"]
    assert "stem" not in basic
    nxt = {
        g.name: g
        for g in get_adapter("resnext50_32x4d").gate_groups(
            build_model("resnext50_32x4d", 10), SPEC
        )
    }
    inner = nxt["layer1.0.inner"]
    assert (inner.units, inner.unit_width, inner.round_units, inner.min_units) == (32, 4, 2, 2)
    assert inner.modules == ["layer1.0.bn1", "layer1.0.bn2"]


def test_keep_all_export_is_bit_identical() -> None:
    torch.manual_seed(0)
    model = build_model("resnext50_32x4d", 10, stem="cifar")
    randomize_bn(model, 0)
    adapter = get_adapter("resnext50_32x4d")
    everything = {g.name: torch.arange(g.channels) for g in adapter.gate_groups(model, SPEC)}
    for keep in ({}, everything):
        exported = adapter.export_pruned(model, keep)
        ref, got = model.state_dict(), exported.state_dict()
        assert list(got) == list(ref)
        for key in ref:
            assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
            assert got[key].data_ptr() != ref[key].data_ptr()  # a copy, not shared storage


def test_export_leaves_input_model_untouched() -> None:
    torch.manual_seed(1)
    model = build_model("resnet18", 10, stem="cifar")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = seeded_gates(model, "resnet18", SPEC, 1)
    get_adapter("resnet18").export_pruned(model, keep_from_gates(gates))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.layer1[0].conv1.out_channels == 64


def test_export_rejects_bad_keep() -> None:
    model = build_model("resnext50_32x4d", 10, stem="cifar")
    adapter = get_adapter("resnext50_32x4d")
    with pytest.raises(ValueError, match="whole units"):
        adapter.export_pruned(model, {"layer1.0.inner": torch.arange(6)})
    with pytest.raises(ValueError, match="unknown group"):
        adapter.export_pruned(model, {"layer9.inner": torch.arange(8)})
    with pytest.raises(ValueError, match="sorted unique"):
        adapter.export_pruned(model, {"stem": torch.tensor([3, 1])})


def test_load_pruned_rejects_mismatched_weights(tmp_path: Path) -> None:
    model = build_model("resnet18", 10, stem="cifar")
    adapter = get_adapter("resnet18")
    keep = {"layer1.0.inner1": torch.arange(16)}
    (tmp_path / "pruned.json").write_text(json.dumps(adapter.pruned_config(model, keep, RECIPE)))
    save_file(model.state_dict(), str(tmp_path / "full.safetensors"))  # full, not pruned
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_pruned(tmp_path / "pruned.json", tmp_path / "full.safetensors")


def test_registry_allowlist() -> None:
    # The torch-free catalogue the API serves is generated from this registry (test_catalog.py).
    assert set(list_architectures()) == set(supported_architectures())
    assert {"resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"} <= set(ALL_ARCHS)
    with pytest.raises(UnsupportedArch):
        get_adapter("__class__")
    with pytest.raises(UnsupportedArch):
        build_model("vit_b_16", 10)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", 10, stem="tiny")
    model = build_model("resnet18", 7, stem="cifar")
    assert isinstance(model, ResNet) and model.fc.out_features == 7
    assert (model.hawada_arch, model.hawada_stem) == ("resnet18", "cifar")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_on_gpu_matches_hard_gates() -> None:
    torch.backends.cudnn.allow_tf32 = False  # compare in true float32
    torch.manual_seed(3)
    model = build_model("resnext50_32x4d", 10)
    randomize_bn(model, 3)
    model = model.cuda()
    gates = seeded_gates(model, "resnext50_32x4d", SPEC, 3).cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    expected = gated_output(model, gates, x)
    pruned = get_adapter("resnext50_32x4d").export_pruned(model, keep_from_gates(gates))
    assert next(pruned.parameters()).is_cuda
    with torch.no_grad():
        assert (pruned(x) - expected).abs().max().item() <= TOL


def test_load_pruned_rejects_incomplete_json(tmp_path: Path) -> None:
    (tmp_path / "pruned.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(ValueError, match="num_classes"):
        load_pruned(tmp_path / "pruned.json", tmp_path / "none.safetensors")
    (tmp_path / "pruned.json").write_text(
        json.dumps({"arch": "os.system", "num_classes": 1, "stem": "cifar", "channels": {}})
    )
    with pytest.raises(UnsupportedArch):
        load_pruned(tmp_path / "pruned.json", tmp_path / "none.safetensors")
