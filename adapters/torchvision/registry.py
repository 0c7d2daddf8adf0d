"""The one architecture registry: torchvision builders registered by name, family adapters by
family, and the plain-model builder.

User strings are only ever looked up in the registry (an allowlist); nothing is resolved with
`getattr`. Builders register themselves with `@register_arch(name, family=...)` in their family
module (e.g. `resnet.py`); the torch-free list the API serves (`core/architectures.json`) is
generated from this registry by `python -m hawada.adapters.torchvision.catalog --write`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from hawada.core.errors import UnsupportedArch
from hawada.core.gates import GateGroup
from hawada.core.layers import LayerSpec
from hawada.core.recipe import GatesSpec, Recipe

STEMS: tuple[str, ...] = ("imagenet", "cifar")

#: A torchvision constructor without pretrained weights: `builder(num_classes=...) -> model`.
Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class ArchEntry:
    """One registered architecture: its name, its family (which adapter handles it), builder."""

    name: str
    family: str
    builder: Builder


class FamilyAdapter(Protocol):
    """What the engine needs from one model family (docs/internals.md, "Adapters")."""

    family: str

    def apply_stem(self, model: nn.Module, stem: str) -> None:
        """Turn a freshly built model into the `stem` variant (`cifar`: small-image stem)."""
        ...

    def gate_groups(self, model: nn.Module, gates_spec: GatesSpec) -> list[GateGroup]:
        """The coupling groups of `model` under the recipe's `gates` block."""
        ...

    def layers(self, model: nn.Module, input_size: Sequence[int]) -> list[LayerSpec]:
        """Every conv/linear with its groups and spatial sizes at `input_size` (C, H, W)."""
        ...

    def export_pruned(self, model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
        """A new plain model keeping the channels `keep` names; `model` is untouched."""
        ...

    def pruned_config(
        self, model: nn.Module, keep: Mapping[str, Tensor], recipe: Recipe
    ) -> dict[str, Any]:
        """The `pruned.json` content for `keep`."""
        ...

    def pruned_skeleton(self, config: Mapping[str, Any]) -> nn.Module:
        """A meta-device model narrowed to a `pruned.json` config."""
        ...


_ARCHS: dict[str, ArchEntry] = {}
_ADAPTERS: dict[str, FamilyAdapter] = {}
A = TypeVar("A", bound=type[Any])


def register_arch(name: str, *, family: str) -> Callable[[B], B]:
    """Decorator registering a builder under `name` for the adapter of `family`."""

    def decorate(builder: B) -> B:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is registered twice")
        _ARCHS[name] = ArchEntry(name, family, builder)
        return builder

    return decorate


def register_family(family: str) -> Callable[[A], A]:
    """Class decorator registering (an instance of) the adapter of `family`."""

    def decorate(cls: A) -> A:
        if family in _ADAPTERS:
            raise ValueError(f"family {family!r} has two adapters")
        _ADAPTERS[family] = cls()
        return cls

    return decorate


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register an adapter instance for its `family` (for adapters built from data)."""
    if adapter.family in _ADAPTERS:
        raise ValueError(f"family {adapter.family!r} has two adapters")
    _ADAPTERS[adapter.family] = adapter
    return adapter


def list_architectures() -> list[str]:
    """Supported architecture names, sorted."""
    return sorted(_ARCHS)


def get_arch(name: str) -> ArchEntry:
    """The registered architecture `name`; `UnsupportedArch` naming the supported ones."""
    entry = _ARCHS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise UnsupportedArch(
            f"unsupported architecture {name!r}; supported: {', '.join(list_architectures())}"
        )
    return entry


def family_of(arch: str) -> str:
    """Family name of a registered arch; `UnsupportedArch` otherwise."""
    return get_arch(arch).family


def get_adapter(arch: str) -> FamilyAdapter:
    """Adapter of a registered arch; `UnsupportedArch` for anything else."""
    family = family_of(arch)
    if family not in _ADAPTERS:
        raise UnsupportedArch(f"no adapter for family {family!r} (arch {arch!r})")
    return _ADAPTERS[family]


def build_model(arch: str, num_classes: int, stem: str = "imagenet") -> nn.Module:
    """Fresh randomly initialised plain torchvision model (no weights are downloaded).

    `stem="cifar"` swaps in a small-image stem (ResNet: 3x3 stride-1 first conv, no max-pool);
    the object stays the torchvision class. The arch and stem are stored on the model as
    `hawada_arch` and `hawada_stem` so adapters can rebuild the same skeleton at export time.
    """
    entry = get_arch(arch)
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = entry.builder(num_classes=int(num_classes))
    get_adapter(arch).apply_stem(model, stem)
    tag_model(model, arch, stem)
    return model


def tag_model(model: nn.Module, arch: str, stem: str) -> None:
    """Record arch and stem on `model` as plain attributes (not in its state dict)."""
    vars(model).update(hawada_arch=arch, hawada_stem=stem)


def build_skeleton(arch: str, num_classes: int, stem: str) -> nn.Module:
    """`build_model` on the meta device: structure only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return build_model(arch, num_classes, stem)


def model_meta(model: nn.Module) -> tuple[str, str]:
    """(arch, stem) recorded by `build_model`; ValueError for a model built otherwise."""
    arch = getattr(model, "hawada_arch", None)
    stem = getattr(model, "hawada_stem", None)
    if not isinstance(arch, str) or not isinstance(stem, str):
        raise ValueError(
            "model has no hawada_arch/hawada_stem; build it with "
            "hawada.adapters.torchvision.build_model"
        )
    return arch, stem
