"""Gates: the one definition of kept, soft/hard/off masks, temperature, saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.gates import GateGroup, Gates, attach, keep_from_gates, snap_units
from hawada.core.recipe import GatesSpec

SPEC = GatesSpec(round_to=8, min_channels=8, prune_residual=True)


def group(
    units: int = 32, unit_width: int = 1, round_to: int = 8, min_channels: int = 8, name: str = "g"
) -> GateGroup:
    return GateGroup.from_channels(
        name,
        units * unit_width,
        unit_width=unit_width,
        modules=["bn"],
        covers=["conv", "bn"],
        round_to=round_to,
        min_channels=min_channels,
    )


class ConvBN(nn.Module):
    """conv -> bn -> relu, the smallest thing a gate sits in."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))

    def pre_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, 8), (3, 8), (8, 8), (11, 8), (12, 16), (13, 16), (20, 24), (29, 32), (32, 32)],
)
def test_snap_rounds_to_nearest_with_floor_and_cap(count: int, expected: int) -> None:
    assert snap_units(count, group(32)) == expected


def test_snap_full_width_allowed_and_floor_rounded_up() -> None:
    assert snap_units(36, group(36)) == 36  # 36 is not a multiple of 8 but full is allowed
    assert snap_units(35, group(36)) == 36  # full (1 away) is nearer than 32
    assert snap_units(33, group(36)) == 32
    assert snap_units(34, group(36)) == 36  # tie between 32 and full: up
    assert snap_units(0, group(32, min_channels=10)) == 16  # floor is a multiple too
    assert snap_units(0, group(6)) == 6  # smaller than the floor: stays full


@pytest.mark.parametrize(
    ("units", "round_to", "min_channels"),
    [(32, 8, 8), (36, 8, 8), (72, 16, 20), (6, 8, 8), (64, 1, 1), (10, 3, 5)],
)
def test_hard_mask_count_follows_snap_units_for_every_count(
    units: int, round_to: int, min_channels: int
) -> None:
    g = group(units, round_to=round_to, min_channels=min_channels)
    gates = Gates([g])
    for count in range(units + 1):
        with torch.no_grad():  # exactly `count` positive logits, in scrambled positions
            logit = gates.logit("g")
            logit.copy_(-1.0 - torch.rand(units))
            logit[torch.randperm(units)[:count]] = 1.0
        assert len(gates.kept_units("g")) == snap_units(count, g), count


def test_group_units_for_grouped_convs() -> None:
    g = group(32, unit_width=4)
    assert (g.channels, g.round_units, g.min_units) == (128, 2, 2)
    g = group(32, unit_width=8)
    assert (g.round_units, g.min_units) == (1, 1)
    g = group(8, unit_width=12, min_channels=30)
    assert (g.round_units, g.min_units) == (2, 3)  # 2 units = 24 channels, a multiple of 8


def test_kept_units_are_top_k_of_snapped_positive_count() -> None:
    gates = Gates([group(32)])
    gen = torch.Generator().manual_seed(0)
    logits = torch.linspace(-1.0, 1.0, 32)[torch.randperm(32, generator=gen)]
    top = logits.sort(descending=True).values
    logits = logits - (top[12] + top[13]) / 2  # exactly 13 positive
    with torch.no_grad():
        gates.logit("g").copy_(logits)
    assert int((gates.logit("g") > 0).sum()) == 13
    # 13 positive -> snapped to 16 -> the 16 largest logits are kept, in ascending order.
    kept = gates.kept_units("g")
    assert kept.tolist() == sorted(set(logits.argsort(descending=True)[:16].tolist()))


def test_kept_all_negative_goes_to_floor_and_ties_resolve_by_index() -> None:
    gates = Gates([group(32)], init_logit=-2.0)
    assert gates.kept_units("g").tolist() == list(range(8))
    gates = Gates([group(32)], init_logit=3.0)
    assert gates.kept_units("g").tolist() == list(range(32))


def test_kept_channels_expand_whole_units() -> None:
    gates = Gates([group(8, unit_width=4)])
    with torch.no_grad():
        gates.logit("g").copy_(torch.tensor([-1.0, 2, -1, 3, -1, -1, -1, -1]))
    assert gates.kept_units("g").tolist() == [1, 3]
    assert gates.kept_channels("g").tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert keep_from_gates(gates)["g"].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_soft_hard_and_off_masks_on_outputs() -> None:
    torch.manual_seed(0)
    net = ConvBN(16).eval()
    with torch.no_grad():
        net.bn.bias.normal_()
    g = GateGroup.from_channels(
        "g", 16, modules=["bn"], covers=["conv", "bn"], round_to=4, min_channels=4
    )
    gates = Gates([g])
    with torch.no_grad():
        gates.logit("g").copy_(torch.linspace(-2, 2, 16))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = net(x)
        pre = net.pre_relu(x)
    handle = attach(net, gates)
    with torch.no_grad():
        gates.temperature = 0.5
        soft = net(x)
        probs = torch.sigmoid(torch.linspace(-2, 2, 16) / 0.5)
        torch.testing.assert_close(soft, torch.relu(pre * probs[None, :, None, None]))
        gates.temperature = 2.0
        assert not torch.allclose(net(x), soft)  # temperature changes the soft mask
        with gates.using("hard"):
            hard = net(x)
        with gates.using("off"):
            off = net(x)
    kept = gates.kept_units("g")
    removed = sorted(set(range(16)) - set(kept.tolist()))
    assert len(kept) == 8
    assert torch.count_nonzero(hard[:, removed]) == 0
    assert torch.equal(hard[:, kept], plain[:, kept])
    assert torch.equal(off, plain)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(net(x), plain)


def test_mode_off_is_exactly_the_original_resnet() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, stem="cifar").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    gates = Gates(get_adapter("resnet18").gate_groups(model, SPEC), init_logit=-1.0)
    handle = attach(model, gates)
    with torch.no_grad(), gates.using("off"):
        assert torch.equal(model(x), ref)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)  # soft gates at -1 really act
    assert gates.mode == "soft"
    handle.remove()


def test_mode_validation_and_restore() -> None:
    gates = Gates([group()])
    with pytest.raises(ValueError, match="gate mode"):
        gates.mode = "half"

    def fail_inside() -> None:
        with gates.using("hard"):
            assert gates.mode == "hard"
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert gates.mode == "soft"


def test_expected_units_soft_is_differentiable_hard_is_kept_count() -> None:
    gates = Gates([group(32, unit_width=4)], init_logit=0.0)
    expected = gates.expected_units("g")
    assert expected.item() == pytest.approx(16.0)
    expected.backward()
    assert gates.logit("g").grad is not None and gates.logit("g").grad.abs().sum() > 0
    widths = gates.expected_widths()
    assert widths["g"].item() == pytest.approx(64.0)
    with gates.using("hard"):
        assert gates.expected_units("g").item() == len(gates.kept_units("g")) == 2


def test_logits_roundtrip_through_safetensors(tmp_path: Path) -> None:
    model = build_model("resnext50_32x4d", 10, stem="cifar")
    groups = get_adapter("resnext50_32x4d").gate_groups(model, SPEC)
    gates = Gates(groups)
    with torch.no_grad():
        for name in gates.groups:
            gates.logit(name).normal_()
    save_file(gates.named_logits(), str(tmp_path / "gates.safetensors"))
    again = Gates(groups)
    again.load_logits(load_file(str(tmp_path / "gates.safetensors")))
    assert {n: k.tolist() for n, k in keep_from_gates(again).items()} == {
        n: k.tolist() for n, k in keep_from_gates(gates).items()
    }
    assert "layer1.0.inner" in load_file(str(tmp_path / "gates.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        again.load_logits({})


def test_ste_mode_forward_is_hard_gradient_is_soft() -> None:
    g = GateGroup.from_channels("g", 8, modules=[], covers=[], round_to=1, min_channels=1)
    gates = Gates([g])
    with torch.no_grad():
        gates.logit("g").copy_(torch.tensor([2.0, -1.0, 0.5, -0.2, 3.0, -4.0, 1.0, 0.1]))
    gates.temperature = 0.5
    with gates.using("hard"):
        hard = gates.unit_mask("g")
    with gates.using("ste"):
        ste = gates.unit_mask("g")
        units = gates.expected_units("g")
    assert hard is not None and ste is not None
    assert torch.equal(ste.detach(), hard) and float(units.detach()) == float(hard.sum())
    (ste * torch.arange(8.0)).sum().backward()
    p = gates.logit("g").detach()
    s = torch.sigmoid(p / 0.5)
    torch.testing.assert_close(gates.logit("g").grad, torch.arange(8.0) * s * (1 - s) / 0.5)
