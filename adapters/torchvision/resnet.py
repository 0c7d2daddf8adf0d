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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from hawada.adapters.torchvision.registry import (
    build_skeleton,
    model_meta,
    register_arch,
    register_family,
)
from hawada.core.export import slice_bn, slice_conv, slice_linear
from hawada.core.gates import GateGroup
from hawada.core.layers import LayerSpec
from hawada.core.recipe import GatesSpec, Recipe

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


@register_family(FAMILY)
class ResNetAdapter:
    """Family adapter for torchvision ResNets (see docs/internals.md, Adapters)."""

    family = FAMILY

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

    def gate_groups(self, model: nn.Module, gates_spec: GatesSpec) -> list[GateGroup]:
        """Coupling groups; stream groups only when `gates_spec.prune_residual` is true."""
        round_to, min_channels = gates_spec.round_to, gates_spec.min_channels
        prune_residual = gates_spec.prune_residual
        return [
            GateGroup.from_channels(
                g.name,
                g.channels,
                unit_width=g.unit_width,
                modules=g.modules,
                covers=g.covers,
                round_to=round_to,
                min_channels=min_channels,
            )
            for g in _topology(model).groups.values()
            if prune_residual or not g.stream
        ]

    def layers(self, model: nn.Module, input_size: Sequence[int]) -> list[LayerSpec]:
        """Convs and the classifier with their groups and spatial sizes at `input_size`.

        Groups are named as with `prune_residual` true; a cost model treats groups absent from
        its widths as full, so the same specs serve both settings.
        """
        topo = _topology(model)
        shapes = _io_shapes(model, input_size)
        specs = []
        for node in topo.convs:
            conv = _sub(model, node.conv, nn.Conv2d)
            (in_h, in_w), (out_h, out_w) = shapes[node.conv]
            specs.append(
                LayerSpec(
                    name=node.conv,
                    kind="conv",
                    in_group=node.in_group,
                    out_group=node.out_group,
                    in_channels=conv.in_channels,
                    out_channels=conv.out_channels,
                    groups=conv.groups,
                    tied_groups=node.tied,
                    kernel=_pair(conv.kernel_size),
                    out_hw=(out_h, out_w),
                    in_hw=(in_h, in_w),
                    stride=_pair(conv.stride),
                    padding=_pair(conv.padding),
                    dilation=_pair(conv.dilation),
                    bias=conv.bias is not None,
                    norm=node.bn,
                )
            )
        fc = _as_resnet(model).fc
        specs.append(
            LayerSpec(
                name=FC,
                kind="linear",
                in_group=topo.fc_group,
                out_group=None,
                in_channels=fc.in_features,
                out_channels=fc.out_features,
                groups=1,
                tied_groups=False,
                kernel=(1, 1),
                out_hw=(1, 1),
                bias=fc.bias is not None,
            )
        )
        return specs

    def export_pruned(self, model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
        """New plain ResNet with the kept channels only; `model` is not modified.

        The new model is built on the meta device and every conv/BN/fc is replaced by a sliced
        copy, so weights are copied exactly once.
        """
        arch, stem = model_meta(model)
        topo = _topology(model)
        checked = _checked_keep(topo, keep)
        fc = _as_resnet(model).fc
        new = _as_resnet(build_skeleton(arch, fc.out_features, stem))
        for node in topo.convs:
            conv = _sub(model, node.conv, nn.Conv2d)
            out_idx = checked.get(node.out_group)
            if node.tied:
                groups = None
                if out_idx is not None:
                    groups = int(out_idx.numel()) // topo.groups[node.out_group].unit_width
                new.set_submodule(node.conv, slice_conv(conv, out_idx, None, groups=groups))
            else:
                in_idx = None if node.in_group is None else checked.get(node.in_group)
                new.set_submodule(node.conv, slice_conv(conv, out_idx, in_idx))
            new.set_submodule(node.bn, slice_bn(_sub(model, node.bn, _BatchNorm), out_idx))
        new.fc = slice_linear(fc, checked.get(topo.fc_group))
        _check_materialised(new)
        return new.train(model.training)

    def pruned_config(
        self, model: nn.Module, keep: Mapping[str, Tensor], recipe: Recipe
    ) -> dict[str, Any]:
        """`pruned.json` content: enough to rebuild the pruned skeleton on its own.

        `channels` holds the output width of every conv, BN and the fc; `groups` the new group
        count of every grouped conv whose groups changed.
        """
        arch, stem = model_meta(model)
        topo = _topology(model)
        checked = _checked_keep(topo, keep)
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
        base = build_skeleton(config["arch"], int(config["num_classes"]), config["stem"])
        topo = _topology(base)
        channels = {k: int(v) for k, v in dict(config.get("channels", {})).items()}
        groups = {k: int(v) for k, v in dict(config.get("groups", {})).items()}
        known = {n.conv for n in topo.convs} | {n.bn for n in topo.convs} | {FC}
        unknown = (set(channels) | set(groups)) - known
        if unknown:
            raise ValueError(f"pruned config names unknown modules: {sorted(unknown)[:10]}")
        if any(v < 1 for v in channels.values()) or any(v < 1 for v in groups.values()):
            raise ValueError("pruned config channel and group counts must be >= 1")
        producer = topo.producer()

        def width(conv_name: str) -> int:
            return channels.get(conv_name, _sub(base, conv_name, nn.Conv2d).out_channels)

        new = _as_resnet(build_skeleton(config["arch"], int(config["num_classes"]), config["stem"]))
        with torch.device("meta"):
            for node in topo.convs:
                conv = _sub(base, node.conv, nn.Conv2d)
                out = width(node.conv)
                in_ = conv.in_channels if node.in_group is None else width(producer[node.in_group])
                g = groups.get(node.conv, conv.groups)
                if out % g or in_ % g:
                    raise ValueError(f"{node.conv}: {in_}->{out} channels, groups={g}")
                new.set_submodule(
                    node.conv,
                    nn.Conv2d(
                        in_,
                        out,
                        _pair(conv.kernel_size),
                        stride=_pair(conv.stride),
                        padding=_pair(conv.padding),
                        dilation=_pair(conv.dilation),
                        groups=g,
                        bias=conv.bias is not None,
                    ),
                )
                if channels.get(node.bn, out) != out:
                    raise ValueError(
                        f"{node.bn}: {channels[node.bn]} channels after a {out}-channel conv"
                    )
                new.set_submodule(node.bn, nn.BatchNorm2d(out))
            new.fc = nn.Linear(
                width(producer[topo.fc_group]),
                channels.get(FC, _as_resnet(base).fc.out_features),
            )
        return new


def _checked_keep(topo: _Topology, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validate keep indices (known group, sorted unique in range, whole units)."""
    out: dict[str, Tensor] = {}
    for name, idx in keep.items():
        if name not in topo.groups:
            raise ValueError(f"keep names unknown group {name!r}")
        group = topo.groups[name]
        idx = torch.as_tensor(idx).reshape(-1).to(torch.long).cpu()
        n = idx.numel()
        if (
            n == 0
            or int(idx[0]) < 0
            or int(idx[-1]) >= group.channels
            or (n > 1 and not bool((idx[1:] > idx[:-1]).all()))
        ):
            raise ValueError(
                f"keep[{name}] must be sorted unique indices in [0, {group.channels}), non-empty"
            )
        w = group.unit_width
        if w > 1:
            blocks = idx.view(-1, w) if n % w == 0 else None
            if (
                blocks is None
                or bool((blocks[:, 0] % w).any())
                or not torch.equal(blocks - blocks[:, :1], torch.arange(w).expand_as(blocks))
            ):
                raise ValueError(f"keep[{name}] must keep whole units of {w} channels")
        out[name] = idx
    return out


def _io_shapes(
    model: nn.Module, input_size: Sequence[int]
) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Input and output H, W of every conv from one no-grad eval forward at batch 1."""
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    handles: list[RemovableHandle] = []

    def recorder(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            (ih, iw), (oh, ow) = inputs[0].shape[-2:], output.shape[-2:]
            shapes[name] = ((int(ih), int(iw)), (int(oh), int(ow)))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(recorder(name)))
    ref = next(model.parameters())
    was_training = model.training
    try:
        model.eval()  # eval: no running-stat updates, no batch-1 BN error
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _check_materialised(model: nn.Module) -> None:
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"export left tensors unset: {meta[:5]}")


def _pair(value: int | tuple[int, ...] | str) -> tuple[int, int]:
    """A conv's kernel/stride/padding/dilation as (h, w) (torch stores tuples; ints allowed)."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"expected an (h, w) pair, got {value!r}")
    return (int(value[0]), int(value[1]))
