"""Cost models agree with what torch counts on real (and exported pruned) models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.cost import FlopsCost, ParamsCost, make_cost_model
from hawada.core.gates import Gates, keep_from_gates
from hawada.core.layers import LayerSpec
from hawada.core.recipe import GatesSpec

SPEC = GatesSpec(round_to=8, min_channels=8, prune_residual=True)


def counted_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "stem", "size"),
    [
        ("resnet18", "imagenet", 32),
        ("resnet50", "imagenet", 32),
        ("resnext50_32x4d", "imagenet", 32),
        ("resnet18", "cifar", 16),
        ("resnext50_32x4d", "cifar", 24),
    ],
)
def test_costs_match_torch_at_full_and_pruned_width(arch: str, stem: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 10, stem=stem)
    adapter = get_adapter(arch)
    layers = adapter.layers(model, (3, size, size))
    flops, params = FlopsCost(layers), ParamsCost(layers)
    assert flops.baseline() == counted_flops(model, (3, size, size))
    assert params.baseline() == n_params(model)

    gates = Gates(adapter.gate_groups(model, SPEC))
    with torch.no_grad():
        for name in gates.groups:
            gates.logit(name).normal_()
    keep = keep_from_gates(gates)
    pruned = adapter.export_pruned(model, keep)
    widths = {name: float(len(idx)) for name, idx in keep.items()}
    assert flops.cost(widths).item() == counted_flops(pruned, (3, size, size))
    assert params.cost(widths).item() == n_params(pruned)
    assert flops.cost(widths).item() < 0.9 * flops.baseline()


def test_layers_record_groups_and_spatial_sizes() -> None:
    model = build_model("resnext50_32x4d", 10, stem="imagenet")
    layers = {s.name: s for s in get_adapter("resnext50_32x4d").layers(model, (3, 64, 48))}
    assert layers["conv1"].out_hw == (32, 24) and layers["conv1"].in_hw == (64, 48)
    assert layers["conv1"].in_group is None and layers["conv1"].out_group == "stem"
    assert layers["conv1"].stride == (2, 2) and layers["conv1"].norm == "bn1"
    conv2 = layers["layer2.0.conv2"]
    assert conv2.tied_groups and conv2.groups == 32
    assert conv2.in_group == conv2.out_group == "layer2.0.inner"
    assert layers["layer2.0.downsample.0"].in_group == "stream.layer1"
    assert layers["layer2.0.downsample.0"].out_group == "stream.layer2"
    assert layers["fc"].kind == "linear" and layers["fc"].in_group == "stream.layer4"
    assert model.training  # layers() restores the mode it found


def test_hand_computed_costs_and_gradients() -> None:
    layers = [
        LayerSpec("c1", "conv", None, "a", 3, 8, 1, False, (3, 3), (4, 4), bias=True, norm="bn"),
        LayerSpec("c2", "conv", "a", "a2", 8, 8, 4, True, (3, 3), (2, 2)),
        LayerSpec("fc", "linear", "a2", None, 8, 5, 1, False, (1, 1), (1, 1), bias=True),
    ]
    flops, params = FlopsCost(layers), ParamsCost(layers)
    # c1: 2*16*9*3*8; c2 (tied, 2 in-channels per group): 2*4*9*2*8; fc: 2*8*5
    assert flops.baseline() == 2 * 16 * 9 * 3 * 8 + 2 * 4 * 9 * 2 * 8 + 2 * 8 * 5
    # c1: 9*3*8 + 8 bias + 16 norm; c2: 9*2*8; fc: 8*5 + 5
    assert params.baseline() == 9 * 3 * 8 + 8 + 16 + 9 * 2 * 8 + 45
    a = torch.tensor(4.0, requires_grad=True)
    cost = flops.cost({"a": a, "a2": 6})
    assert cost.item() == 2 * 16 * 9 * 3 * 4 + 2 * 4 * 9 * 2 * 6 + 2 * 6 * 5
    cost.backward()
    assert a.grad.item() == 2 * 16 * 9 * 3
    assert flops.cost({"a": 4.0, "a2": 6}).item() == cost.item()
    # absent groups are full width; float32 tensor widths work the same
    assert flops.cost({"a": torch.tensor(8.0)}).item() == flops.baseline()
    with pytest.raises(KeyError):
        flops.cost({"nope": 1.0})


def test_inconsistent_group_widths_are_rejected() -> None:
    layers = [
        LayerSpec("c1", "conv", None, "a", 3, 8, 1, False, (1, 1), (1, 1)),
        LayerSpec("c2", "conv", "a", None, 16, 8, 1, False, (1, 1), (1, 1)),
    ]
    with pytest.raises(ValueError, match="group a"):
        FlopsCost(layers)


def test_make_cost_model() -> None:
    layers = get_adapter("resnet18").layers(build_model("resnet18", 10, "cifar"), (3, 16, 16))
    assert isinstance(make_cost_model("flops", layers), FlopsCost)
    assert make_cost_model("params", layers).metric == "params"
    with pytest.raises(ValueError, match="lut"):
        make_cost_model("latency", layers)
    with pytest.raises(ValueError, match="unknown"):
        make_cost_model("energy", layers)
