"""Coupling groups from the traced graph, and exact export for every registered CNN.

- The hand-written ResNet groups are the oracle: the graph analysis derives the same groups
  (members, unit width, residual streams) for all ten ResNets.
- One constructor per family (plus the service's three new families) runs a real forward:
  norm statistics calibrated then perturbed, random gates of both signs; the hard-gated model,
  the exported model and the `load_pruned` reload agree within 1e-4 and the keep-all export is
  bit-exact. The removed channels must matter (outputs move far beyond the tolerance).
- Every registered constructor is checked on the meta device (no memory, no compute): export
  of random keeps, `pruned.json` -> skeleton with the same shapes, and a fake-tensor forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hawada.adapters.torchvision import (
    build_model,
    build_skeleton,
    family_of,
    get_adapter,
    list_architectures,
    load_pruned,
)
from hawada.adapters.torchvision.generic import GraphAdapter
from hawada.adapters.torchvision.graph import analyse
from hawada.adapters.torchvision.resnet import _topology
from hawada.adapters.torchvision.testing import gated_output, random_gates, randomize
from hawada.core.gates import keep_from_gates
from hawada.core.recipe import GatesSpec, parse_recipe

TOL = 1e-4
SPEC = GatesSpec(round_to=8, min_channels=8, prune_residual=True)
RESNETS = [a for a in list_architectures() if family_of(a) == "resnet"]
GRAPH_ARCHS = [a for a in list_architectures() if family_of(a) != "resnet"]
#: One per family (the smallest) and the service's new families; a real forward each.
NUMERIC = [
    "alexnet",
    "vgg11",
    "vgg11_bn",
    "squeezenet1_1",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "mnasnet0_5",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "densenet121",
    "convnext_tiny",
    "googlenet",
    "inception_v3",
]
SLOW_NUMERIC = {"efficientnet_v2_s"}
#: Inception-v3's reductions need >= 75 pixels; the others run at 32 with the cifar stem.
SIZES = {"inception_v3": (96, "imagenet")}


def _recipe(arch: str, size: int) -> object:
    return parse_recipe(
        {
            "model": {"arch": arch, "num_classes": 10, "input_size": [3, size, size]},
            "data": {"source": "synthetic"},
        }
    )


# --- the oracle -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", RESNETS)
def test_graph_groups_equal_the_hand_written_resnet_groups(arch: str) -> None:
    model = build_skeleton(arch, 10, "imagenet")
    topo = _topology(model)
    expected = {(frozenset(g.covers), g.unit_width, g.stream) for g in topo.groups.values()}
    derived = {(frozenset(g.covers), g.unit_width, g.stream) for g in analyse(model).groups}
    assert derived == expected
    # gates sit on the norms, the same modules the hand-written adapter masks
    assert {frozenset(g.gates) for g in analyse(model).groups} == {
        frozenset(g.modules) for g in topo.groups.values()
    }


def test_known_group_counts_of_the_prototype() -> None:
    counts = {
        a: len(analyse(build_skeleton(a, 10, "imagenet")).groups)
        for a in ("mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf")
    }
    assert counts == {
        "mobilenet_v2": 25,
        "efficientnet_b0": 40,
        "mobilenet_v3_small": 27,
        "regnet_y_400mf": 37,
    }


# --- real forwards ----------------------------------------------------------------------------


def _numeric(arch: str, tmp_path: Path) -> None:
    size, stem = SIZES.get(arch, (32, "cifar"))
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, stem=stem)
    randomize(model, size, torch.Generator().manual_seed(0))
    gates = random_gates(
        get_adapter(arch).gate_groups(model, SPEC), torch.Generator().manual_seed(0)
    )
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected = gated_output(model, gates, x)
    with gates.using("off"):
        original = gated_output(model, gates, x)
    moved = (original - expected).abs().max().item()
    assert moved > 100 * TOL and moved > 0.1 * original.abs().max().item()  # removals matter

    adapter = get_adapter(arch)
    keep = keep_from_gates(gates)
    assert sum(gates.groups[n].channels - len(k) for n, k in keep.items()) > 0
    pruned = adapter.export_pruned(model, keep)
    assert type(pruned) is type(model) and pruned.training is False
    with torch.no_grad():
        got = pruned(x)
    assert (got - expected).abs().max().item() <= TOL
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())

    full = {n: torch.arange(g.channels) for n, g in gates.groups.items()}
    with torch.no_grad():
        keepall = adapter.export_pruned(model, full)(x)
    assert torch.equal(keepall, original)  # keep-all is bit-exact

    config = adapter.pruned_config(model, keep, _recipe(arch, size))  # type: ignore[arg-type]
    json_path, weights_path = tmp_path / "pruned.json", tmp_path / "pruned.safetensors"
    json_path.write_text(json.dumps(config))
    save_file(pruned.state_dict(), str(weights_path))
    reloaded = load_pruned(json_path, weights_path)
    assert type(reloaded) is type(model)  # the plain torchvision class
    with torch.no_grad():
        assert torch.equal(reloaded(x), got)


@pytest.mark.parametrize("arch", NUMERIC)
def test_export_equals_hard_gated_model(arch: str, tmp_path: Path) -> None:
    _numeric(arch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(SLOW_NUMERIC))
def test_export_equals_hard_gated_model_slow(arch: str, tmp_path: Path) -> None:
    _numeric(arch, tmp_path)


# --- every constructor, on the meta device ----------------------------------------------------


def _random_keep(adapter: GraphAdapter, model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in adapter.gate_groups(model, SPEC):
        n = max(g.min_units, int(torch.randint(1, g.units + 1, (1,), generator=gen)))
        units = torch.randperm(g.units, generator=gen)[:n].sort().values
        w = g.unit_width
        keep[g.name] = (units[:, None] * w + torch.arange(w)[None, :]).reshape(-1)
    return keep


@pytest.mark.parametrize("arch", GRAPH_ARCHS)
def test_every_constructor_exports_and_reloads_its_shapes(arch: str) -> None:
    size, stem = SIZES.get(arch, (64, "imagenet"))
    model = build_skeleton(arch, 10, stem)
    adapter = get_adapter(arch)
    assert isinstance(adapter, GraphAdapter)
    keep = _random_keep(adapter, model, seed=0)
    assert keep, f"{arch}: no prunable group"
    pruned = adapter.export_pruned(model, keep)
    assert type(pruned) is type(model)
    config = adapter.pruned_config(model, keep, _recipe(arch, size))  # type: ignore[arg-type]
    skeleton = adapter.pruned_skeleton(json.loads(json.dumps(config)))
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in skeleton.state_dict().items()} == shapes
    assert shapes != {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():  # a meta-device forward checks every shape without computing
        out = pruned.eval()(torch.zeros(1, 3, size, size, device="meta"))
    assert tuple(out.shape) == (1, 10)


def test_pruned_config_naming_other_modules_is_refused() -> None:
    model = build_skeleton("mobilenet_v2", 10, "imagenet")
    adapter = get_adapter("mobilenet_v2")
    config = adapter.pruned_config(model, {}, _recipe("mobilenet_v2", 32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown modules"):
        adapter.pruned_skeleton({**config, "channels": {"features.99": 8}})
    with pytest.raises(ValueError, match="is a ReLU6"):
        adapter.pruned_skeleton({**config, "channels": {"features.0.2": 8}})
    with pytest.raises(ValueError, match="integer >= 1"):
        adapter.pruned_skeleton({**config, "channels": {"features.0.0": 0}})


# --- the cost model of the new layer kinds ----------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "params_exact"),
    [
        ("mobilenet_v3_small", True),  # depthwise, SE, hard-swish, linear classifier
        ("efficientnet_b0", True),
        ("vgg11_bn", True),  # flatten 512 x 7 x 7 into the classifier
        ("googlenet", True),  # concatenations of pruned branches
        ("regnet_y_400mf", True),  # grouped convs at group granularity
        ("densenet121", False),  # pre-activation norms over concatenations are not layer specs
        ("convnext_tiny", False),  # linears at every position; layer norms are not layer specs
    ],
)
def test_flops_and_params_model_match_torch_on_the_pruned_model(
    arch: str, params_exact: bool
) -> None:
    from hawada.core.cost import FlopsCost, ParamsCost
    from hawada.core.evaluate import count_flops

    size = 32
    torch.manual_seed(0)
    model = build_model(arch, 10, stem="cifar")
    adapter = get_adapter(arch)
    layers = adapter.layers(model, (3, size, size))
    flops, params = FlopsCost(layers), ParamsCost(layers)
    assert flops.baseline() == count_flops(model, (3, size, size))
    keep = _random_keep(adapter, model, seed=1)  # type: ignore[arg-type]
    pruned = adapter.export_pruned(model, keep)
    widths = {name: float(len(idx)) for name, idx in keep.items()}
    assert flops.cost(widths).item() == count_flops(pruned, (3, size, size))
    assert flops.cost(widths).item() < 0.9 * flops.baseline()
    if params_exact:
        assert params.baseline() == sum(p.numel() for p in model.parameters())
        assert params.cost(widths).item() == sum(p.numel() for p in pruned.parameters())
