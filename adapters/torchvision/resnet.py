"""ResNet family adapter (resnet18..152, wide_resnet50/101_2, resnext50/101).

Coupling groups: channels joined by a residual add form one stream group per stage
("stream.layerN": the stage's downsample BN plus every block's last BN; for BasicBlock nets
layer1 has no downsample and its stream also covers the stem). Block-inner channels are free
("layerN.M.inner1", "layerN.M.inner2"), except that a grouped 3x3 conv (ResNeXt) ties bn1 and
bn2 into one group "layerN.M.inner" whose unit is a whole conv group, so `groups` stays valid
after export. Bottleneck nets have a free "stem" group (its output feeds layer1's downsample,
not an add).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from hawada.adapters.torchvision.generic import GraphAdapter, checked_keep, narrowed
from hawada.adapters.torchvision.graph import Analysis, ConvRec, Group, NormRec
from hawada.adapters.torchvision.registry import (
    build_skeleton,
    model_meta,
    register_arch,
    register_family,
)
from hawada.core.recipe import Recipe

FAMILY = "resnet"
FC = "fc"
M = TypeVar("M", bound=nn.Module)


def _sub(model: nn.Module, name: str, kind: type[M]) -> M:
    """Submodule `name` of `model`, checked to be a `kind` (so its attributes are typed)."""
    module = model.get_submodule(name)
    if not isinstance(module, kind):
        raise TypeError(f"{name}: expected {kind.__name__}, got {type(module).__name__}")
    return module


def _as_resnet(model: nn.Module) -> ResNet:
    if not isinstance(model, ResNet):
        raise TypeError(f"ResNet adapter needs torchvision.models.ResNet, got {type(model)}")
    return model


# --- the architectures of the family (no pretrained weights are ever downloaded) -------------


def _build(builder: Callable[..., Any], num_classes: int) -> ResNet:
    model = builder(weights=None, num_classes=num_classes)
    if not isinstance(model, ResNet):  # torchvision's builders are untyped (decorated)
        raise TypeError(f"{builder.__name__} built a {type(model).__name__}, not a ResNet")
    return model


@register_arch("resnet18", family=FAMILY)
def resnet18(*, num_classes: int) -> ResNet:
    """torchvision ResNet-18."""
    return _build(tvm.resnet18, num_classes)


@register_arch("resnet34", family=FAMILY)
def resnet34(*, num_classes: int) -> ResNet:
    """torchvision ResNet-34."""
    return _build(tvm.resnet34, num_classes)


@register_arch("resnet50", family=FAMILY)
def resnet50(*, num_classes: int) -> ResNet:
    """torchvision ResNet-50."""
    return _build(tvm.resnet50, num_classes)


@register_arch("resnet101", family=FAMILY)
def resnet101(*, num_classes: int) -> ResNet:
    """torchvision ResNet-101."""
    return _build(tvm.resnet101, num_classes)


@register_arch("resnet152", family=FAMILY)
def resnet152(*, num_classes: int) -> ResNet:
    """torchvision ResNet-152."""
    return _build(tvm.resnet152, num_classes)


@register_arch("wide_resnet50_2", family=FAMILY)
def wide_resnet50_2(*, num_classes: int) -> ResNet:
    """torchvision Wide ResNet-50-2."""
    return _build(tvm.wide_resnet50_2, num_classes)


@register_arch("wide_resnet101_2", family=FAMILY)
def wide_resnet101_2(*, num_classes: int) -> ResNet:
    """torchvision Wide ResNet-101-2."""
    return _build(tvm.wide_resnet101_2, num_classes)


@register_arch("resnext50_32x4d", family=FAMILY)
def resnext50_32x4d(*, num_classes: int) -> ResNet:
    """torchvision ResNeXt-50 32x4d."""
    return _build(tvm.resnext50_32x4d, num_classes)


@register_arch("resnext101_32x8d", family=FAMILY)
def resnext101_32x8d(*, num_classes: int) -> ResNet:
    """torchvision ResNeXt-101 32x8d."""
    return _build(tvm.resnext101_32x8d, num_classes)


@register_arch("resnext101_64x4d", family=FAMILY)
def resnext101_64x4d(*, num_classes: int) -> ResNet:
    """torchvision ResNeXt-101 64x4d."""
    return _build(tvm.resnext101_64x4d, num_classes)


# --- coupling groups derived from the block structure ----------------------------------------


@dataclass
class _ConvNode:
    """A conv, the BN right after it, and the groups deciding its input/output channels."""

    conv: str
    bn: str
    in_group: str | None
    out_group: str
    tied: bool = False


@dataclass
class _GroupDef:
    name: str
    stream: bool
    channels: int
    unit_width: int = 1
    modules: list[str] = field(default_factory=list)
    covers: list[str] = field(default_factory=list)


@dataclass
class _Topology:
    convs: list[_ConvNode]
    groups: dict[str, _GroupDef]
    fc_group: str

    def producer(self) -> dict[str, str]:
        """First conv writing each group: its width is the group's width."""
        first: dict[str, str] = {}
        for node in self.convs:
            first.setdefault(node.out_group, node.conv)
        return first


def _topology(module: nn.Module) -> _Topology:
    """Walk a torchvision ResNet and derive its coupling groups and conv wiring."""
    model = _as_resnet(module)
    convs: list[_ConvNode] = []
    groups: dict[str, _GroupDef] = {}

    def add_member(group: _GroupDef, conv: str, bn: str, in_group: str | None) -> None:
        channels = _sub(model, bn, _BatchNorm).num_features
        if channels != group.channels:
            raise ValueError(
                f"{bn}: {channels} channels, its group {group.name} has {group.channels}"
            )
        group.modules.append(bn)
        group.covers += [conv, bn]
        convs.append(_ConvNode(conv, bn, in_group, group.name))

    # BasicBlock nets add the stem output to layer1's blocks: one stream from conv1 on.
    first = model.layer1[0]
    merged = isinstance(first, (BasicBlock, Bottleneck)) and first.downsample is None
    stem_width = _sub(model, "bn1", _BatchNorm).num_features
    stem = _GroupDef("stream.layer1" if merged else "stem", merged, stem_width)
    groups[stem.name] = stem
    add_member(stem, "conv1", "bn1", None)
    current = stem  # the group feeding the next block

    for stage in range(1, 5):
        layer = _sub(model, f"layer{stage}", nn.Sequential)
        stream = current
        for index, block in enumerate(layer):
            p = f"layer{stage}.{index}"
            block_in = current
            if not isinstance(block, (BasicBlock, Bottleneck)):
                raise TypeError(f"{p}: unsupported block type {type(block).__name__}")
            if block.downsample is not None:
                width = _sub(model, f"{p}.downsample.1", _BatchNorm).num_features
                stream = _GroupDef(f"stream.layer{stage}", True, width)
                groups[stream.name] = stream
            if isinstance(block, BasicBlock):
                inner = _GroupDef(
                    f"{p}.inner1", False, _sub(model, f"{p}.bn1", _BatchNorm).num_features
                )
                groups[inner.name] = inner
                add_member(inner, f"{p}.conv1", f"{p}.bn1", block_in.name)
                add_member(stream, f"{p}.conv2", f"{p}.bn2", inner.name)
            else:
                width, conv_groups = block.conv2.out_channels, block.conv2.groups
                if conv_groups > 1:
                    if block.conv2.in_channels != width:
                        raise ValueError(f"{p}.conv2: grouped conv with in != out channels")
                    inner = _GroupDef(f"{p}.inner", False, width, width // conv_groups)
                    groups[inner.name] = inner
                    add_member(inner, f"{p}.conv1", f"{p}.bn1", block_in.name)
                    add_member(inner, f"{p}.conv2", f"{p}.bn2", inner.name)
                    convs[-1].tied = True
                    last_in = inner.name
                else:
                    bn1 = _sub(model, f"{p}.bn1", _BatchNorm)
                    inner1 = _GroupDef(f"{p}.inner1", False, bn1.num_features)
                    inner2 = _GroupDef(f"{p}.inner2", False, width)
                    groups[inner1.name] = inner1
                    groups[inner2.name] = inner2
                    add_member(inner1, f"{p}.conv1", f"{p}.bn1", block_in.name)
                    add_member(inner2, f"{p}.conv2", f"{p}.bn2", inner1.name)
                    last_in = inner2.name
                add_member(stream, f"{p}.conv3", f"{p}.bn3", last_in)
            if block.downsample is not None:
                add_member(stream, f"{p}.downsample.0", f"{p}.downsample.1", block_in.name)
            current = stream
    return _Topology(convs, groups, current.name)


def _analysis(model: nn.Module, topo: _Topology) -> Analysis:
    """The hand-written topology as a graph `Analysis`: one channel space per group, plus the
    input's and the logits' (no group: full width), so the generic adapter does the rest."""
    space = {name: i for i, name in enumerate(topo.groups)}
    image, logits = len(space), len(space) + 1
    fc = _as_resnet(model).fc
    convs = [
        ConvRec(
            name=node.conv,
            kind="conv",
            in_segs=(image if node.in_group is None else space[node.in_group],),
            in_block=1,
            out_space=space[node.out_group],
            tied=node.tied,
            node=node.conv,
            norm=node.bn,
        )
        for node in topo.convs
    ]
    convs.append(ConvRec(FC, "linear", (space[topo.fc_group],), 1, logits, False, FC))
    groups = [
        Group(g.name, space[g.name], g.channels, g.unit_width, g.modules, g.covers, g.stream)
        for g in topo.groups.values()
    ]
    return Analysis(
        groups=groups,
        convs=convs,
        norms=[NormRec(node.bn, (space[node.out_group],)) for node in topo.convs],
        space_channels=[
            *(g.channels for g in topo.groups.values()),
            _sub(model, "conv1", nn.Conv2d).in_channels,
            fc.out_features,
        ],
        group_of_space={i: name for name, i in space.items()},
    )


@register_family(FAMILY)
class ResNetAdapter(GraphAdapter):
    """Family adapter for torchvision ResNets (see docs/internals.md, Adapters): the generic
    adapter (layer specs, export) on the hand-written coupling groups, with the ResNet stem
    and the ResNet `pruned.json` (no `in_channels`: inputs follow the groups' producers)."""

    def __init__(self) -> None:
        super().__init__(FAMILY)

    def analysis(self, model: nn.Module) -> Analysis:
        """The hand-written groups of `model` (derived again on every call)."""
        return _analysis(model, _topology(model))

    def apply_stem(self, model: nn.Module, stem: str) -> None:
        """`cifar`: a 3x3 stride-1 first conv and no max-pool (the class stays `ResNet`)."""
        if stem != "cifar":
            return
        model = _as_resnet(model)
        conv1 = nn.Conv2d(
            3,
            model.conv1.out_channels,
            kernel_size=3,
            stride=1,
            padding=1,
            bias=False,
            device=model.conv1.weight.device,
        )
        # Same init torchvision applies to every conv of a fresh ResNet.
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv1
        model.maxpool = nn.Identity()  # type: ignore[assignment]  # torchvision types it MaxPool2d

    def export_pruned(self, model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
        """The generic export; a meta-device `model` is refused (no weights to copy)."""
        new = super().export_pruned(model, keep)
        meta = [n for n, t in (*new.named_parameters(), *new.named_buffers()) if t.is_meta]
        if meta:
            raise RuntimeError(f"export left tensors unset: {meta[:5]}")
        return new

    def pruned_config(
        self, model: nn.Module, keep: Mapping[str, Tensor], recipe: Recipe
    ) -> dict[str, Any]:
        """`pruned.json` content: enough to rebuild the pruned skeleton on its own.

        `channels` holds the output width of every conv, BN and the fc; `groups` the new group
        count of every grouped conv whose groups changed.
        """
        arch, stem = model_meta(model)
        topo = _topology(model)
        checked = checked_keep(topo.groups, keep)
        num_classes = _as_resnet(model).fc.out_features
        channels: dict[str, int] = {}
        conv_groups: dict[str, int] = {}
        for node in topo.convs:
            conv = _sub(model, node.conv, nn.Conv2d)
            kept = checked.get(node.out_group)
            width = len(kept) if kept is not None else conv.out_channels
            channels[node.conv] = channels[node.bn] = int(width)
            if node.tied and width != conv.out_channels:
                conv_groups[node.conv] = width // topo.groups[node.out_group].unit_width
        channels[FC] = int(num_classes)
        return {
            "arch": arch,
            "num_classes": int(num_classes),
            "stem": stem,
            "input_size": list(recipe.model.input_size),
            "normalize": recipe.model.normalize.model_dump(),
            "channels": channels,
            "groups": conv_groups,
        }

    def pruned_skeleton(self, config: Mapping[str, Any]) -> nn.Module:
        """Meta-device plain ResNet narrowed to the widths of a `pruned.json` config."""
        new = build_skeleton(config["arch"], int(config["num_classes"]), config["stem"])
        topo = _topology(new)
        channels = {k: int(v) for k, v in dict(config.get("channels", {})).items()}
        groups = {k: int(v) for k, v in dict(config.get("groups", {})).items()}
        known = {n.conv for n in topo.convs} | {n.bn for n in topo.convs} | {FC}
        unknown = (set(channels) | set(groups)) - known
        if unknown:
            raise ValueError(f"pruned config names unknown modules: {sorted(unknown)[:10]}")
        if any(v < 1 for v in channels.values()) or any(v < 1 for v in groups.values()):
            raise ValueError("pruned config channel and group counts must be >= 1")
        producer = topo.producer()
        full = {n.conv: _sub(new, n.conv, nn.Conv2d).out_channels for n in topo.convs}

        def width(conv_name: str) -> int:
            return channels.get(conv_name, full[conv_name])

        for node in topo.convs:
            conv = _sub(new, node.conv, nn.Conv2d)  # still full width: each is narrowed once
            out = width(node.conv)
            in_ = conv.in_channels if node.in_group is None else width(producer[node.in_group])
            new.set_submodule(node.conv, narrowed(node.conv, conv, out, in_, groups.get(node.conv)))
            if channels.get(node.bn, out) != out:
                raise ValueError(
                    f"{node.bn}: {channels[node.bn]} channels after a {out}-channel conv"
                )
            new.set_submodule(node.bn, narrowed(node.bn, new.get_submodule(node.bn), out))
        fc = _as_resnet(new).fc
        in_fc = width(producer[topo.fc_group])
        new.set_submodule(FC, narrowed(FC, fc, channels.get(FC, fc.out_features), in_fc))
        return new
