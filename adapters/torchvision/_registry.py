"""Allowlist of supported architectures and the plain-model builder.

User strings are only ever looked up in `_ARCHS`; nothing is resolved with getattr.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from hawada.core.cost import LayerSpec
from hawada.core.errors import UnsupportedArch
from hawada.core.gates import GateGroup

STEMS: tuple[str, ...] = ("imagenet", "cifar")

# arch name -> (family, torchvision builder). Families map to adapters in __init__.py.
_ARCHS: dict[str, tuple[str, Callable[..., nn.Module]]] = {
    "resnet18": ("resnet", tvm.resnet18),
    "resnet34": ("resnet", tvm.resnet34),
    "resnet50": ("resnet", tvm.resnet50),
    "resnet101": ("resnet", tvm.resnet101),
    "resnet152": ("resnet", tvm.resnet152),
    "wide_resnet50_2": ("resnet", tvm.wide_resnet50_2),
    "wide_resnet101_2": ("resnet", tvm.wide_resnet101_2),
    "resnext50_32x4d": ("resnet", tvm.resnext50_32x4d),
    "resnext101_32x8d": ("resnet", tvm.resnext101_32x8d),
    "resnext101_64x4d": ("resnet", tvm.resnext101_64x4d),
}


class FamilyAdapter(Protocol):
    """What the engine needs from one model family (see docs/internals.md, Adapters)."""

    def gate_groups(self, model: nn.Module, gates_spec: Any) -> list[GateGroup]: ...

    def layers(self, model: nn.Module, input_size: Sequence[int]) -> list[LayerSpec]: ...

    def export_pruned(self, model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module: ...

    def pruned_config(self, model: nn.Module, keep: Mapping[str, Tensor], recipe: Any
                      ) -> dict: ...

    def pruned_skeleton(self, config: Mapping[str, Any]) -> nn.Module: ...


def list_architectures() -> list[str]:
    """Supported architecture names, sorted."""
    return sorted(_ARCHS)


def family_of(arch: str) -> str:
    """Family name of an allowlisted arch; `UnsupportedArch` otherwise."""
    try:
        return _ARCHS[arch][0]
    except (KeyError, TypeError):
        raise UnsupportedArch(
            f"unsupported architecture {arch!r}; supported: {', '.join(list_architectures())}"
        ) from None


def build_model(arch: str, num_classes: int, stem: str = "imagenet") -> nn.Module:
    """Fresh randomly initialised plain torchvision model (no weights are downloaded).

    `stem="cifar"` swaps in a 3x3 stride-1 first conv and drops the max-pool; the object stays
    the torchvision class. The arch and stem are stored on the model as `hawada_arch` and
    `hawada_stem` so adapters can rebuild the same skeleton at export time.
    """
    family_of(arch)
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = _ARCHS[arch][1](weights=None, num_classes=int(num_classes))
    if stem == "cifar":
        conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                          bias=False, device=model.conv1.weight.device)
        # Same init torchvision applies to every conv of a fresh ResNet.
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv1
        model.maxpool = nn.Identity()
    model.hawada_arch = arch
    model.hawada_stem = stem
    return model


def build_skeleton(arch: str, num_classes: int, stem: str) -> nn.Module:
    """`build_model` on the meta device: structure only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return build_model(arch, num_classes, stem)
